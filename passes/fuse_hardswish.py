"""fuse-hardswish: recognise HardSwish written out as x * Clip(x + 3, 0, 6) / 6 and use the one op."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from compiler.passmanager import Pass, register_pass
from compiler.rewrite import bypass, const_value, fresh_name, sole_consumer


@register_pass
class FuseHardSwish(Pass):
    """Replace Add(x, 3) → Clip(0, 6) → Mul(x, ·) → Div(·, 6) (or Mul by 1/6, in either order) by HardSwish(x).

    Guarantees: outputs unchanged up to float rounding (HardSwish(x) = x · min(max(x + 3, 0), 6) / 6);
    only exact constants match; intermediate tensors read elsewhere block the rewrite; needs opset >= 14.
    """

    name = "fuse-hardswish"
    lossless = True

    def run(self, module, ctx) -> bool:
        if module.opset < 14:
            return False
        graph = module.graph
        fused = 0
        for clip in list(graph.nodes):
            if clip.op != "Clip" or not clip.inputs or not clip.inputs[0].inputs or not _is_clip_0_6(clip):
                continue
            add = clip.inputs[0].inputs[0]
            if add.op != "Add" or sole_consumer(graph, add.outputs[0]) is not clip:
                continue
            x = _other_than_const(add, 3.0)
            if x is None:
                continue
            end = _scale_by_x_over_6(graph, clip.outputs[0], x)
            if end is None:
                continue
            out = end.outputs[0]
            hs = gs.Node("HardSwish", fresh_name(graph, clip.name + "_hardswish"), inputs=[x],
                         outputs=[gs.Variable(fresh_name(graph, out.name + "_hs"), dtype=out.dtype, shape=out.shape)])
            graph.nodes.append(hs)
            if bypass(graph, end, hs.outputs[0], out):
                fused += 1
            else:
                hs.inputs.clear()
                hs.outputs.clear()
        if fused:
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
        if ctx is not None:
            ctx.log(fused=fused)
        return fused > 0


def _is_clip_0_6(clip: gs.Node) -> bool:
    if "min" in clip.attrs or "max" in clip.attrs:
        lo, hi = clip.attrs.get("min"), clip.attrs.get("max")
    else:
        lo = const_value(clip.inputs[1]) if len(clip.inputs) > 1 and clip.inputs[1].name else None
        hi = const_value(clip.inputs[2]) if len(clip.inputs) > 2 and clip.inputs[2].name else None
    return lo is not None and hi is not None and float(np.asarray(lo)) == 0.0 and float(np.asarray(hi)) == 6.0


def _other_than_const(node: gs.Node, value: float):
    """The non-constant operand of a binary node whose other operand is the scalar `value`."""
    if len(node.inputs) != 2:
        return None
    for a, b in (node.inputs, node.inputs[::-1]):
        c = const_value(b)
        if c is not None and c.size == 1 and np.isclose(float(c.reshape(-1)[0]), value, rtol=1e-6, atol=0) \
                and const_value(a) is None:
            return a
    return None


def _divides_by_6(node: gs.Node, operand: gs.Tensor) -> bool:
    if node.op == "Div" and node.inputs[0] is operand:
        c = const_value(node.inputs[1])
        return c is not None and c.size == 1 and float(c.reshape(-1)[0]) == 6.0
    if node.op == "Mul":
        return _other_than_const(node, 1.0 / 6.0) is operand
    return False


def _scale_by_x_over_6(graph: gs.Graph, clipped: gs.Tensor, x: gs.Tensor):
    """The last node of clipped·x/6 in either order (Mul then Div, or Div then Mul), else None."""
    first = sole_consumer(graph, clipped)
    if first is None:
        return None
    if first.op == "Mul" and set(map(id, first.inputs)) == {id(clipped), id(x)}:
        second = sole_consumer(graph, first.outputs[0])
        return second if second is not None and _divides_by_6(second, first.outputs[0]) else None
    if _divides_by_6(first, clipped):
        second = sole_consumer(graph, first.outputs[0])
        if second is not None and second.op == "Mul" and set(map(id, second.inputs)) == {id(first.outputs[0]), id(x)}:
            return second
    return None
