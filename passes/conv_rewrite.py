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
            found = self.match(conv, rules) if conv.op == "Conv" and not conv.domain else None
            if found is not None:
                self.rewrite(graph, conv, found)
                rewritten.append(conv.name)
        if rewritten:
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
            module.reinfer_shapes()
        if ctx is not None:
            ctx.log(rewritten=rewritten)
        return bool(rewritten)
