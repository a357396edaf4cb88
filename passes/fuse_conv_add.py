"""fuse-conv-add: fold a per-channel constant Add after a Conv into the Conv's bias."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from compiler.passmanager import Pass, register_pass
from compiler.rewrite import bypass, const_value, fresh_name, set_input, sole_consumer


@register_pass
class FuseConvAdd(Pass):
    """Replace Add(Conv(x, W[, b]), c) by Conv(x, W, b + c) when c is a constant per output channel.

    c must broadcast as one value per channel ([C,1,1], [1,C,1,1] or a scalar); exporters that keep the
    bias as a separate Add (Paddle) need this for the Conv to run as one integer kernel. Guarantees: outputs
    unchanged up to float rounding; shared Conv outputs and other broadcast shapes are left alone.
    """

    name = "fuse-conv-add"
    lossless = True

    def run(self, module, ctx) -> bool:
        graph = module.graph
        fused = 0
        for conv in list(graph.nodes):
            if conv.op != "Conv" or not isinstance(conv.inputs[1], gs.Constant):
                continue
            add = sole_consumer(graph, conv.outputs[0])
            if add is None or add.op != "Add":
                continue
            other = add.inputs[1] if add.inputs[0] is conv.outputs[0] else add.inputs[0]
            c = const_value(other)
            channels = conv.inputs[1].values.shape[0]
            rank = len(conv.inputs[1].values.shape)
            if c is None or c.dtype.kind != "f" or not _per_channel(c, channels, rank):
                continue
            old = const_value(conv.inputs[2]) if len(conv.inputs) > 2 else np.zeros(channels, c.dtype)
            if old is None:
                continue
            bias = gs.Constant(fresh_name(graph, conv.name + "_B"),
                               (old.astype(np.float64) + np.broadcast_to(c.reshape(-1), (channels,))).astype(old.dtype))
            set_input(conv, 2, bias)
            if bypass(graph, add, conv.outputs[0], add.outputs[0]):
                fused += 1
        if fused:
            graph.cleanup(remove_unused_graph_inputs=False)
        if ctx is not None:
            ctx.log(fused=fused)
        return fused > 0


def _per_channel(c: np.ndarray, channels: int, rank: int) -> bool:
    """True when `c` adds one value per output channel of an NC... tensor of `rank` dims."""
    if c.size == 1:
        return c.ndim <= rank
    shape = list(c.shape)
    while len(shape) < rank:
        shape.insert(0, 1)
    return len(shape) == rank and shape[1] == channels and all(d == 1 for i, d in enumerate(shape) if i != 1)
