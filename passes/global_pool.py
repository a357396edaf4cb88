"""reduce-mean-to-pool: write a mean over all spatial axes as the GlobalAveragePool the accelerator runs.

PyTorch's `adaptive_avg_pool2d(x, 1)` leaves torch.export (the default ONNX exporter since torch 2.9) as
ReduceMean over the last two axes, and `x.mean([2, 3])` leaves both exporters that way. Targets run
GlobalAveragePool on the accelerator and ReduceMean on the CPU, so without this rewrite every squeeze-excite
gate of an EfficientNet or MobileNetV3 becomes a round trip to the CPU.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from compiler.passmanager import Pass, register_pass
from compiler.rewrite import const_value, fresh_name


@register_pass
class ReduceMeanToPool(Pass):
    """Replace ReduceMean over exactly the axes 2 … rank-1 of a float tensor of rank ≥ 3 by GlobalAveragePool,
    followed by Flatten when keepdims = 0.

    Guarantees: outputs unchanged up to float summation order; the output tensor keeps its name; a
    ReduceMean whose axes are not constant, whose input rank is unknown, or that leaves the batch or
    channel axis out or in differently (a mean over C, over H only, over every axis) is left as it is.
    """

    name = "reduce-mean-to-pool"
    lossless = True

    def run(self, module, ctx) -> bool:
        rewritten = 0
        if any(n.op == "ReduceMean" for n in module.graph.nodes):
            module.infer_shapes()  # the input ranks
            rewritten = _rewrite(module.graph)
        if ctx is not None:
            ctx.log(rewritten=rewritten)
        return rewritten > 0


def _rewrite(graph: gs.Graph) -> int:
    rewritten = 0
    for node in list(graph.nodes):
        if node.op != "ReduceMean" or node.domain or not _over_spatial_axes(node):
            continue
        out, keepdims = node.outputs[0], node.attrs.get("keepdims", 1)
        node.op, node.attrs = "GlobalAveragePool", {}
        while len(node.inputs) > 1:  # the axes
            node.inputs.pop()
        if not keepdims:
            pooled = gs.Variable(fresh_name(graph, out.name + "_pooled"), dtype=out.dtype)
            node.outputs.clear()
            node.outputs.append(pooled)
            graph.nodes.append(gs.Node("Flatten", fresh_name(graph, node.name + "_flatten"), {"axis": 1},
                                       inputs=[pooled], outputs=[out]))
        rewritten += 1
    if rewritten:
        graph.toposort()
    return rewritten


def _over_spatial_axes(node: gs.Node) -> bool:
    """Whether the ReduceMean averages exactly the axes after the channel axis of a float tensor."""
    shape = node.inputs[0].shape
    if shape is None or len(shape) < 3 or node.inputs[0].dtype not in (np.float32, np.float16):
        return False
    if len(node.inputs) > 1 and node.inputs[1].name:  # opset 18: axes are an input
        axes = const_value(node.inputs[1])
    else:
        axes = node.attrs.get("axes")
    if axes is None:
        return False
    rank = len(shape)
    return sorted(int(a) % rank for a in np.asarray(axes).reshape(-1)) == list(range(2, rank))
