"""Per-target quantization policy: what runs in int8 on which CPU, and with how many bits.

On x86 without VNNI (AVX2, AVX-512 without VNNI) ONNX Runtime's u8*s8 GEMM kernels add
pairs of products in int16 (``vpmaddubsw``) and saturate with full 8-bit weights; the
depthwise kernels do not. Measured on EfficientNet-Lite0 (shared/notes/int8-on-avx2.md):
8-bit weights everywhere 88.6 % top-1 agreement, 7-bit weights on group=1 convs with 8-bit
depthwise 96.2 %. So on those targets weights of non-depthwise Conv/Gemm/MatMul use 7 bits
(qmax 63); on VNNI, ARM64 and GPUs all weights use 8 bits. Dynamic ``ConvInteger`` is far
slower than fp32 on x86 CPU EP, so dynamic mode leaves Conv in float there.

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
        reduce_range_gemm: 7-bit weights for group=1 Conv, Gemm and MatMul.
        integer_gemm: static Gemm as ``MatMulInteger`` + scale + bias (CPU provider).
        float_compute_ops: op types left in float by static mode (weights stored int8).
    """

    target: str
    reduce_range_gemm: bool
    integer_gemm: bool = True
    float_compute_ops: tuple[str, ...] = ("ConvTranspose",)

    def weight_qmax(self, op_type: str, depthwise: bool) -> int:
        """127 (8-bit) or 63 (7-bit) for the weights of one node."""
        if depthwise or not self.reduce_range_gemm:
            return 127
        return 63


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
        return Policy(target=target, reduce_range_gemm=False, integer_gemm=False, float_compute_ops=())
    return Policy(target=target, reduce_range_gemm=saturating)
