"""Per-target quantization policy: what runs in int8 on which CPU, and how weights are scaled.

On x86 without VNNI (AVX2, AVX-512 without VNNI) ONNX Runtime's u8*s8 GEMM kernels add
pairs of products in int16 (``vpmaddubsw``) and saturate with full 8-bit weights; the
depthwise kernels do not. Measured on EfficientNet-Lite0 (shared/notes/int8-on-avx2.md):
8-bit weights everywhere 88.6 % top-1 agreement, 7-bit weights on group=1 convs with 8-bit
depthwise 96.2 %. Those targets therefore get *saturation-free 8-bit* weights on
non-depthwise Conv/Gemm/MatMul: no same-sign neighbour pair in the kernel's K order may exceed
``|q0| + |q1| = 128`` (scale per channel chosen by least squared error, ``params.weight_params``),
so no pair sum can exceed int16 and the integer results equal VNNI's exactly — which is why
fidelity measured on a VNNI machine with ``--target avx2`` is what an AVX2-only CPU computes.
Static mode first renumbers channels so that large same-sign weights are rarely neighbours
(:mod:`.permute`): the bound then costs almost no precision. Measured so (zoo held-out data,
``scripts/bench_int8.py`` scoring): EfficientNet-Lite0 static 99.0 % decisive top-1 agreement,
KL 0.015 (without the renumbering 98.1 %, KL 0.021; 7-bit weights on group=1 layers, the
previous policy and ONNX Runtime's ``reduce_range``: 94.3 %, KL 0.043; ``vnni``: 99.0 %, KL
0.010); PP-OCRv4 rec dynamic 116/116 page lines (7-bit: 113); YOLOv8n static 96.7 %. On VNNI, ARM64 and GPUs all weights use plain 8-bit
scales. Dynamic ``ConvInteger`` is far slower than fp32 on x86 CPU EP, so dynamic mode leaves
Conv in float there.

On the CPU execution provider (every target but ``cuda`` / ``tensorrt``) two more decisions,
measured with onnxruntime 1.32:

* ``Gemm``: ONNX Runtime fuses a Q/DQ ``Gemm`` into nothing (and a Q/DQ ``MatMul`` followed by
  a bias ``Add`` back into such a ``Gemm``): it runs in float with its weight dequantized at
  every run (1280 x 1000: 2.6 ms). Written instead as ``QuantizeLinear -> MatMulInteger ->
  Cast -> Mul(scales) -> Add(bias)`` (standard ONNX ops) it runs as an integer GEMM: 0.03 ms.
* ``ConvTranspose``: the CPU provider has no integer ConvTranspose; a Q/DQ one runs in float
  with its weight dequantized at every run. It stays float with int8 weight storage
  (weight-only: ``Cast -> Mul`` folded at load).
"""

from __future__ import annotations

from dataclasses import dataclass

from ...runtime import cpu_features

TARGETS = ("auto", "avx2", "avx512", "vnni", "arm64", "cuda", "tensorrt", "generic")


@dataclass(frozen=True)
class Policy:
    """Decisions for one target.

    Attributes:
        target: resolved target name.
        pair_safe: saturation-free 8-bit scales for non-depthwise Conv, Gemm and MatMul
            (x86 without VNNI).
        integer_gemm: static Gemm as ``MatMulInteger`` + scale + bias (CPU provider).
        float_compute_ops: op types left in float by static mode (weights stored int8).
    """

    target: str
    pair_safe: bool
    integer_gemm: bool = True
    float_compute_ops: tuple[str, ...] = ("ConvTranspose",)

    def weight_qmax(self, op_type: str, depthwise: bool) -> int:
        """Largest int8 weight magnitude: 127 on every target (saturation is avoided by scales,
        see :meth:`weight_pairs`)."""
        return 127

    def weight_pairs(self, op_type: str, depthwise: bool, ch_axis: int) -> tuple[int, bool] | None:
        """``pairs`` argument of :func:`.params.weight_params` for one node's weight: ``None``
        (plain scales) unless the target saturates u8*s8 pair sums and the node runs an
        integer GEMM (not depthwise)."""
        if not self.pair_safe or depthwise or op_type not in ("Conv", "Gemm", "MatMul"):
            return None
        return ch_axis, op_type == "Conv"


def resolve_policy(target: str = "auto") -> Policy:
    """The policy for ``target`` (``auto`` reads the host CPU's features).

    Raises:
        ValueError: unknown target name.
    """
    if target not in TARGETS:
        raise ValueError(f"unknown target {target!r}; choose from {', '.join(TARGETS)}")
    if target == "auto":
        target = cpu_features().int8_target
    saturating = target in ("avx2", "avx512", "generic")
    if target in ("cuda", "tensorrt"):
        return Policy(target=target, pair_safe=False, integer_gemm=False, float_compute_ops=())
    return Policy(target=target, pair_safe=saturating)
