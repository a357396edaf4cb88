"""The frame of a pass that rewrites each Conv the target's convolution unit cannot run into ones it can."""

from __future__ import annotations

import onnx_graphsurgeon as gs

from compiler.passmanager import Pass


class ConvRewrite(Pass):
    """Subclasses say which Convs to rewrite (`match`, given the target's Conv rules or None without a target)
    and how (`rewrite`); shapes are inferred before and after, and the rewritten Convs' names are logged."""

    lossless = True

    def match(self, conv: gs.Node, rules: dict | None):
        """What `rewrite` needs to rewrite `conv`, or None to leave it."""
        raise NotImplementedError

    def rewrite(self, graph: gs.Graph, conv: gs.Node, found) -> None:
        raise NotImplementedError

    def run(self, module, ctx) -> bool:
        module.infer_shapes()
        graph = module.graph
        target = getattr(ctx, "target", None)
        rules = None if target is None else target.accelerator_ops.get("Conv", {})
        rewritten = []
        for conv in list(graph.nodes):
            found = self.match(conv, rules) if _plain_2d(conv) else None
            if found is not None:
                self.rewrite(graph, conv, found)
                rewritten.append(conv.name)
        if rewritten:
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
            module.reinfer_shapes()
        if ctx is not None:
            ctx.log(rewritten=rewritten)
        return bool(rewritten)


def _plain_2d(conv: gs.Node) -> bool:
    """A 2-D Conv `static_conv` accepts: what both rewrites need to lay out their data movement."""
    return static_conv(conv) and len(conv.inputs[1].shape) == 4


def static_conv(conv: gs.Node) -> bool:
    """A Conv with a weight of known shape, an input of static channels and spatial sizes (the batch may be
    dynamic) and explicit, non-negative (or no) padding."""
    if conv.op != "Conv" or conv.domain or len(conv.inputs) < 2:
        return False
    weight, x = conv.inputs[1].shape, conv.inputs[0].shape
    if weight is None or x is None or len(x) != len(weight) or not all(isinstance(d, int) for d in x[1:]):
        return False
    return (conv.attrs.get("auto_pad", "NOTSET") in ("NOTSET", b"NOTSET", "VALID", b"VALID")
            and all(p >= 0 for p in conv.attrs.get("pads", ())))
