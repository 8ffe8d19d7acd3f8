"""Clean-up passes: initializer inputs (IR < 4), constant folding, Constant-node weights
lifted to initializers, Identity/Dropout removal, dead code and unused initializers.

All are thin wrappers over onnx-ir's common passes and onnxscript's optimizer/rewriter;
what is ours is the reporting and the checks around them.
"""

from __future__ import annotations

import onnx_ir as ir
import onnx_ir.passes.common as common
from onnxscript.optimizer import fold_constants
from onnxscript.rewriter import RewriteRuleSet
from onnxscript.rewriter.rules.common import dropout_inference_rule, dropout_zero_rule

from .base import CompressionPass


def _count_nodes(model: ir.Model) -> int:
    return sum(1 for _ in ir.traversal.RecursiveGraphIterator(model.graph))


class InitializerInputsPass(CompressionPass):
    """IR < 4 models list every initializer as a graph input too (an overridable default).

    Weights cannot be folded or quantized while a caller may override them, so this pass
    treats them as constants: it removes them from ``graph.input`` and raises the IR version
    to at least 4, with a warning in the report (policy of shared/cases case14). Inputs the
    user may really feed are the non-initializer inputs, which are kept.
    """

    name = "initializer-inputs"

    def applicable(self, model: ir.Model, ops: frozenset[str]) -> bool:
        return any(v.name in model.graph.initializers for v in model.graph.inputs)

    def apply(self, model: ir.Model) -> bool:
        inits = set(model.graph.initializers)
        dup = [v.name for v in model.graph.inputs if v.name in inits]
        if not dup:
            return False
        common.RemoveInitializersFromInputsPass()(model)
        if model.ir_version < 4:
            self.report.counts["ir_version_raised"] = f"{model.ir_version} -> 4"
            model.ir_version = 4
        self.report.counts["inputs_made_constant"] = len(dup)
        self.report.skip(
            ",".join(dup[:5]) + ("..." if len(dup) > 5 else ""),
            "initializer(s) listed as graph inputs (IR<4 overridable defaults) are treated as "
            "constants and removed from the model inputs",
        )
        return True


class ConstantFoldingPass(CompressionPass):
    """Evaluate nodes whose inputs are all constant (onnxscript's constant folder)."""

    name = "constant-folding"

    def apply(self, model: ir.Model) -> bool:
        before = _count_nodes(model)
        # onnxscript keeps ConstantOfShape by default (it can create large tensors); exported
        # padding computations (TF-style 'same' padding) need it folded: the output size
        # limit of the folder still applies.
        result = fold_constants(model, should_fold=lambda n: True if n.op_type == "ConstantOfShape" else None)
        common.RemoveUnusedNodesPass()(model)
        after = _count_nodes(model)
        self.report.counts["nodes_removed"] = before - after
        return bool(result.modified) or before != after


class LiftConstantsPass(CompressionPass):
    """Move tensor-valued ``Constant`` nodes (e.g. Paddle's weights) into initializers.

    Quantizers and folders look for weights among initializers; a weight left in a
    ``Constant`` node stays fp32 in most tools. Works inside subgraphs too.
    """

    name = "lift-constants"
    needs = (frozenset({"Constant"}),)

    def apply(self, model: ir.Model) -> bool:
        before = sum(1 for n in ir.traversal.RecursiveGraphIterator(model.graph) if n.op_type == "Constant")
        common.LiftConstantsToInitializersPass(lift_all_constants=False, size_limit=1)(model)
        after = sum(1 for n in ir.traversal.RecursiveGraphIterator(model.graph) if n.op_type == "Constant")
        self.report.counts["constants_lifted"] = before - after
        return before != after


def _eliminate_identities(model: ir.Model) -> int:
    """onnx-ir's IdentityEliminationPass, minus the cases it gets wrong (onnx-ir 1.1).

    An Identity whose output is a graph output is kept when its input is not produced by a
    node of the same graph (graph input, initializer, outer-scope value of a subgraph) or is
    already a graph output: eliminating it would make that value the output of a second
    graph (``ValueError`` on Silero VAD's ``If`` branches) or rename an outer-scope value.
    Returns the number of nodes removed.
    """
    removed = 0
    for node in list(ir.traversal.RecursiveGraphIterator(model.graph)):
        if node.op_type != "Identity" or node.domain not in ("", "ai.onnx") or len(node.inputs) != 1:
            continue
        x, y = node.inputs[0], node.outputs[0]
        if x is None:
            continue
        was_output = y.is_graph_output()
        if was_output:
            prod = x.producer()
            if prod is None or prod.graph is not node.graph or x.is_graph_output():
                continue
        if x.type is None:
            x.type = y.type
        if x.shape is None:
            x.shape = y.shape
        y.replace_all_uses_with(x, replace_graph_outputs=True)
        if was_output:
            x.name = y.name  # the graph keeps its output names
        node.graph.remove(node, safe=True)
        removed += 1
    return removed


class IdentityDropoutPass(CompressionPass):
    """Remove ``Identity`` nodes and inference-mode ``Dropout`` (outputs kept by name)."""

    name = "identity-dropout"
    needs = (frozenset({"Identity", "Dropout"}),)

    def apply(self, model: ir.Model) -> bool:
        before = _count_nodes(model)
        n_drop = RewriteRuleSet([dropout_inference_rule, dropout_zero_rule]).apply_to_model(model)
        _eliminate_identities(model)
        common.RemoveUnusedNodesPass()(model)
        removed = before - _count_nodes(model)
        self.report.counts["dropout_removed"] = int(n_drop)
        self.report.counts["nodes_removed"] = removed
        return removed > 0


class DeadCodePass(CompressionPass):
    """Remove nodes whose outputs are never used and initializers nobody reads — in the main
    graph and in every subgraph (``If``/``Loop``/``Scan`` bodies: an int8 rewrite there replaces
    a weight, and the float original must not stay behind)."""

    name = "dead-code"

    def apply(self, model: ir.Model) -> bool:
        from ..irutil import subgraphs

        n_before = _count_nodes(model)
        i_before = len(model.graph.initializers)
        common.RemoveUnusedNodesPass()(model)
        common.RemoveUnusedFunctionsPass()(model)
        sub_removed = 0
        for g in subgraphs(model.graph):
            inputs = {id(v) for v in g.inputs}
            for name, v in list(g.initializers.items()):
                if not v.uses() and not v.is_graph_output() and id(v) not in inputs:
                    del g.initializers[name]
                    sub_removed += 1
        self.report.counts["nodes_removed"] = n_before - _count_nodes(model)
        self.report.counts["initializers_removed"] = i_before - len(model.graph.initializers) + sub_removed
        return bool(self.report.counts["nodes_removed"] or self.report.counts["initializers_removed"])
