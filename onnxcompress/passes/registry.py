"""The pass registry: every stage a recipe may name, with its declared config.

A *stage* is what a recipe lists (``[[stages]] pass = "quantize-static"``): a name, a config
dataclass of declared parameters (:mod:`onnxcompress.params`) and a function that turns the
config into the passes to run (one pass, or a fixed sequence such as ``fuse``). Adding a
technique is one new pass file plus one :func:`register` line at the bottom of this module
(``docs/ARCHITECTURE.md``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

from .base import CompressionPass, PassContext


@dataclass(frozen=True)
class StageSpec:
    """A registered stage.

    Attributes:
        name: the name recipes use.
        config: its config dataclass (declared parameters).
        passes: ``(config, context) -> [CompressionPass, ...]``, fresh objects each call.
        help: one line for ``recipe list`` / docs.
        checked: run its passes with the per-pass numeric check (exact rewrites); lossy stages
            are judged by validation and the gates instead.
        int8: a quantization stage (the fallback re-runs it; its failure is an error, not a revert).
        lossy: it changes the model's answers by design (pruning, factorization): the default
            fidelity floor of int8, which compares with the input, does not judge such a recipe.
        min_opset: the model is upgraded to this default-domain opset before the stage (0: none).
        needs_data: skipped (with this reason as a note) when no calibration data was given.
        quiet: its report is shown only when it changed or was reverted.
        describe: ``config -> progress text``.
    """

    name: str
    config: type
    passes: Callable[[Any, PassContext], list[CompressionPass]]
    help: str
    checked: bool = True
    int8: bool = False
    lossy: bool = False
    min_opset: int = 0
    needs_data: str = ""
    quiet: bool = False
    describe: Callable[[Any], str] | None = None


STAGES: dict[str, StageSpec] = {}


def register(spec: StageSpec) -> StageSpec:
    """Add a stage (its name must be new)."""
    if spec.name in STAGES:
        raise ValueError(f"stage {spec.name!r} is registered twice")
    STAGES[spec.name] = spec
    return spec


def one(cls: type[CompressionPass]) -> Callable[[Any, PassContext], list[CompressionPass]]:
    """The ``passes`` function of a one-pass stage."""
    return lambda config, ctx: [cls(ctx, config)]


# --------------------------------------------------------------------------- the stages
from .cleanup import ConstantFoldingPass, DeadCodePass, IdentityDropoutPass, InitializerInputsPass, LiftConstantsPass  # noqa: E402
from .fusion import (ConvAffinePass, ConvBiasPass, FoldBatchNormPass, FusePadIntoConvPass, HardSwishPass,  # noqa: E402
                     MatMulAddToGemmPass)
from .distill_stage import DistillConfig, DistillPass  # noqa: E402
from .lowrank import LowRankConfig, LowRankPass  # noqa: E402
from .prune import MagnitudePruneConfig, MagnitudePrunePass  # noqa: E402
from .prune_channels import ChannelPruneConfig, ChannelPrunePass  # noqa: E402
from .prune_nm import NMPruneConfig, NMPrunePass  # noqa: E402
from .quantize.config import EqualizeConfig, QuantizeConfig, SmoothQuantConfig, StaticQuantizeConfig, TargetConfig  # noqa: E402
from .quantize.dynamic import AttentionQuantizePass, DynamicQuantizePass  # noqa: E402
from .quantize.equalize import CrossLayerEqualizationPass  # noqa: E402
from .quantize.gather import GatherQuantizePass  # noqa: E402
from .quantize.permute import PairPermutePass  # noqa: E402
from .quantize.smooth import SmoothQuantPass  # noqa: E402
from .quantize.static import StaticQuantizePass  # noqa: E402
from .quantize.weight_only import WeightOnlyQuantizePass  # noqa: E402
from .transformer import AttentionFusionPass, FuseConfig  # noqa: E402


def prepare_passes(ctx: PassContext) -> list[CompressionPass]:
    """What runs when a recipe has no ``fuse`` stage: initializers out of the graph inputs and
    ``Constant`` weights lifted to initializers (every later pass expects both)."""
    return [InitializerInputsPass(ctx), LiftConstantsPass(ctx)]


def _fuse(config, ctx: PassContext) -> list[CompressionPass]:
    return [InitializerInputsPass(ctx), ConstantFoldingPass(ctx), LiftConstantsPass(ctx), IdentityDropoutPass(ctx),
            ConvBiasPass(ctx), FoldBatchNormPass(ctx), ConvAffinePass(ctx), FusePadIntoConvPass(ctx),
            HardSwishPass(ctx), *([AttentionFusionPass(ctx)] if config.attention else []), MatMulAddToGemmPass(ctx),
            DeadCodePass(ctx)]


def _quantize(mode: str):
    def passes(config, ctx: PassContext) -> list[CompressionPass]:
        main = StaticQuantizePass(ctx, config) if mode == "static" else DynamicQuantizePass(ctx, config)
        # static mode: a fused com.microsoft.Attention becomes QAttention (dynamic int8 input)
        attn = [AttentionQuantizePass(ctx, config)] if mode == "static" else []
        # weight-only int8 (float compute) for what the integer pass leaves float: subgraph nodes
        # (static), Conv (dynamic), LSTM/GRU/RNN weights (both); see quantize/weight_only.py
        return [main, *attn, WeightOnlyQuantizePass(ctx, config, mode=mode), GatherQuantizePass(ctx, config),
                DeadCodePass(ctx)]
    return passes


register(StageSpec("fuse", FuseConfig, _fuse, "clean-up and fusion: constant folding, BatchNorm/affine/Pad folding, "
                   "HardSwish, attention, MatMul+Add -> Gemm, dead code (exact, each checked)",
                   describe=lambda c: "clean-up and fusion"))
register(StageSpec("prune-magnitude", MagnitudePruneConfig, one(MagnitudePrunePass),
                   "unstructured magnitude pruning (Han et al. 2015): zeros that shrink the compressed file",
                   checked=False, describe=lambda c: f"magnitude pruning to {c.sparsity:.0%}", lossy=True))
register(StageSpec("prune-channels", ChannelPruneConfig, one(ChannelPrunePass),
                   "structured channel pruning by dependency group, then least-squares repair: smaller tensors",
                   checked=False, describe=lambda c: f"channel pruning {c.ratio:.0%} per group"
                   + (" + least-squares repair" if c.repair else ""), lossy=True))
register(StageSpec("prune-nm", NMPruneConfig, one(NMPrunePass), "N:M semi-structured sparsity (2:4 by default)",
                   checked=False, describe=lambda c: f"{c.pattern} semi-structured pruning", lossy=True))
register(StageSpec("equalize", EqualizeConfig, one(CrossLayerEqualizationPass),
                   "cross-layer equalization (Nagel et al. 2019) before int8", describe=lambda c: "cross-layer equalization"))
register(StageSpec("pair-permute", TargetConfig, one(PairPermutePass),
                   "renumber channels so saturation-free int8 weights (x86 without VNNI) lose almost nothing",
                   quiet=True, describe=lambda c: "pair renumbering"))
register(StageSpec("smooth-quant", SmoothQuantConfig, one(SmoothQuantPass),
                   "SmoothQuant (Xiao et al. 2022): activation outliers of MatMul/Attention inputs into the weights",
                   min_opset=13, needs_data="SmoothQuant skipped: no --calibration data (smoothing factors chosen on "
                   "random inputs would move real outliers at random)", describe=lambda c: "SmoothQuant"))
register(StageSpec("quantize-dynamic", QuantizeConfig, _quantize("dynamic"),
                   "dynamic int8: int8 weights, activation ranges per run (MatMul/Gemm/Attention; Conv weight-only)",
                   checked=False, int8=True, min_opset=13, describe=lambda c: "dynamic int8 quantization"))
register(StageSpec("quantize-static", StaticQuantizeConfig, _quantize("static"),
                   "static int8 QDQ with calibrated activation ranges, bias correction and per-node fallback",
                   checked=False, int8=True, min_opset=13, describe=lambda c: "static int8 quantization"))
register(StageSpec("low-rank", LowRankConfig, one(LowRankPass), "low-rank factorization of MatMul/Gemm/1x1 Conv/"
                   "Attention weights through rank r, whitened by calibration activations (ASVD / SVD-LLM)",
                   checked=False, lossy=True, describe=lambda c: "low-rank factorization" + (
                       f" removing {c.target_ratio:.0%} of the factorizable MACs" if c.target_ratio is not None and
                       c.rank is None else f" at rank {c.rank}" if c.rank is not None else f" keeping {c.energy:g} energy")))
register(StageSpec("distill", DistillConfig, one(DistillPass), "knowledge distillation (Hinton et al. 2015): train the "
                   "model as it stands (pruned, low-rank) to reproduce the input model on the calibration rows "
                   "(needs the torch extra)", checked=False, lossy=True,
                   needs_data="distillation skipped: no --calibration data (the student trains on its rows)",
                   describe=lambda c: f"distillation, {c.epochs} epoch(s)"))
