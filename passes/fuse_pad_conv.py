"""fuse-pad-conv: merge a zero constant Pad on spatial axes into the following Conv's pads."""

from __future__ import annotations

import numpy as np

from compiler.passmanager import Pass, register_pass
from compiler.rewrite import bypass, const_value, sole_consumer


@register_pass
class FusePadConv(Pass):
    """Fold Pad(mode=constant, value 0, spatial axes only) into a Conv with explicit pads.

    Guarantees: outputs bit-identical (zero padding is what Conv pads mean); Pads with a non-zero value,
    reflect/edge mode, negative pads, padding on batch/channel axes, Convs with auto_pad, or a Pad output
    read by other nodes are left alone.
    """

    name = "fuse-pad-conv"
    lossless = True

    def run(self, module, ctx) -> bool:
        graph = module.graph
        fused = 0
        for pad in list(graph.nodes):
            if pad.op != "Pad" or pad.domain:
                continue
            conv = sole_consumer(graph, pad.outputs[0])
            if conv is None or conv.op != "Conv" or conv.inputs[0] is not pad.outputs[0]:
                continue
            if conv.attrs.get("auto_pad", "NOTSET") not in ("NOTSET", b"NOTSET"):
                continue
            pads = _pad_amounts(pad)
            rank = len(pad.inputs[0].shape) if pad.inputs[0].shape is not None else None
            if pads is None or rank is None or len(pads) != 2 * rank or np.any(pads < 0):
                continue
            begin, end = pads[:rank], pads[rank:]
            if begin[:2].any() or end[:2].any():
                continue
            spatial = rank - 2
            old = list(conv.attrs.get("pads", [0] * (2 * spatial)))
            conv.attrs["pads"] = [int(old[i] + begin[2 + i]) for i in range(spatial)] + \
                                 [int(old[spatial + i] + end[2 + i]) for i in range(spatial)]
            if bypass(graph, pad, pad.inputs[0], pad.outputs[0]):
                fused += 1
        if fused:
            graph.cleanup(remove_unused_graph_inputs=False)
        if ctx is not None:
            ctx.log(fused=fused)
        return fused > 0


def _pad_amounts(pad) -> np.ndarray | None:
    """The full pads vector [begin..., end...] when the Pad is a plain zero constant pad, else None."""
    mode = pad.attrs.get("mode", "constant")
    if mode not in ("constant", b"constant"):
        return None
    if "pads" in pad.attrs:  # opset < 11
        if float(pad.attrs.get("value", 0.0)) != 0.0:
            return None
        return np.asarray(pad.attrs["pads"], dtype=np.int64)
    pads = const_value(pad.inputs[1]) if len(pad.inputs) > 1 else None
    if pads is None:
        return None
    if len(pad.inputs) > 2 and pad.inputs[2].name:
        value = const_value(pad.inputs[2])
        if value is None or np.any(value != 0):
            return None
    if len(pad.inputs) > 3 and pad.inputs[3].name:  # opset 18 axes
        axes = const_value(pad.inputs[3])
        rank = len(pad.inputs[0].shape or [])
        if axes is None or rank == 0:
            return None
        full = np.zeros(2 * rank, dtype=np.int64)
        for i, a in enumerate(np.asarray(axes) % rank):
            full[a], full[rank + a] = pads[i], pads[len(axes) + i]
        return full
    return np.asarray(pads, dtype=np.int64)
