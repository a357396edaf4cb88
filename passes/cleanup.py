"""eliminate-dead-code and eliminate-identity: remove work that does not affect the outputs."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from compiler.passmanager import Pass, register_pass
from compiler.rewrite import bypass, const_value


@register_pass
class EliminateDeadCode(Pass):
    """Remove nodes and initializers that no graph output depends on.

    Guarantees: graph inputs and outputs are kept as they are (even unused inputs), outputs unchanged.
    """

    name = "eliminate-dead-code"
    lossless = True

    def run(self, module, ctx) -> bool:
        graph = module.graph
        before = (len(graph.nodes), len(graph.tensors()))
        graph.cleanup(remove_unused_graph_inputs=False, remove_unused_node_outputs=False)
        after = (len(graph.nodes), len(graph.tensors()))
        if ctx is not None:
            ctx.log(removed_nodes=before[0] - after[0], removed_tensors=before[1] - after[1])
        return after != before


@register_pass
class EliminateIdentity(Pass):
    """Remove ops that pass their input through unchanged at inference.

    Identity, Dropout (inference, mask unused), Cast to the input's own type, Reshape/Flatten/Expand to the
    input's own static shape, Transpose with the identity permutation, Pad with all-zero pads; on a dynamic
    (batch) size too: an Expand to a constant shape whose every entry is 1 or the input's static size there
    (it broadcasts nothing), a Reshape to a constant target of the input's rank that copies (0) or restates
    every static size and leaves at most the one dynamic axis to -1. Guarantees: outputs bit-identical; graph
    interface (names) unchanged.
    """

    name = "eliminate-identity"
    lossless = True

    def run(self, module, ctx) -> bool:
        module.infer_shapes()
        graph = module.graph
        removed: dict[str, int] = {}
        for node in list(graph.nodes):
            if node.domain or not node.inputs or not node.outputs:
                continue
            if not _is_identity(node):
                continue
            if bypass(graph, node, node.inputs[0], node.outputs[0]):
                removed[node.op] = removed.get(node.op, 0) + 1
        if removed:
            graph.cleanup(remove_unused_graph_inputs=False)
        if ctx is not None:
            ctx.log(removed=removed)
        return bool(removed)


def _is_identity(node: gs.Node) -> bool:
    op, x, y = node.op, node.inputs[0], node.outputs[0]
    if op == "Identity":
        return True
    if op == "Dropout":
        return len(node.outputs) == 1 or not node.outputs[1].outputs
    if op == "Cast":
        return x.dtype is not None and y.dtype is not None and np.dtype(x.dtype) == np.dtype(y.dtype) \
            and not isinstance(x.dtype, int)
    if op in ("Reshape", "Flatten", "Expand", "Squeeze", "Unsqueeze") and _static(x.shape) and _static(y.shape):
        return list(x.shape) == list(y.shape)
    if op == "Expand" and x.shape is not None:
        return _broadcasts_nothing(x.shape, const_value(node.inputs[1]))
    if op == "Reshape" and x.shape is not None and not node.attrs.get("allowzero", 0):
        return _restates(x.shape, const_value(node.inputs[1]))
    if op == "Transpose":
        perm = node.attrs.get("perm")
        return perm is not None and list(perm) == sorted(perm)
    if op == "Pad":
        pads = node.attrs.get("pads") if "pads" in node.attrs else (
            const_value(node.inputs[1]) if len(node.inputs) > 1 else None)
        return pads is not None and not np.any(np.asarray(pads))
    return False


def _broadcasts_nothing(shape, target) -> bool:
    """Whether Expand(x of `shape`, `target`) is x: no new axes, and each entry 1 or x's static size."""
    if target is None or target.ndim != 1 or target.size > len(shape):
        return False
    aligned = shape[len(shape) - target.size:]
    return all(t == 1 or (isinstance(d, int) and d == t) for d, t in zip(aligned, target.tolist()))


def _restates(shape, target) -> bool:
    """Whether Reshape(x of `shape`, `target`) is x: same rank, every entry a copy (0) or x's static size, but
    for at most one -1 (it then stands for the one size left, x's own)."""
    if target is None or target.ndim != 1 or target.size != len(shape):
        return False
    open_axes = 0
    for d, t in zip(shape, target.tolist()):
        if t == -1:
            open_axes += 1
        elif t != 0 and not (isinstance(d, int) and d == t):
            return False
    return open_axes <= 1


def _static(shape) -> bool:
    return shape is not None and all(isinstance(d, int) and d >= 0 for d in shape)
