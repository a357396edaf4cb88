"""drop-padding-taps: a Conv loses the kernel taps that only ever read its zero padding.

A dilated Conv on a map smaller than its dilation reads the map through one tap per axis: DeepLab's ASPP
(3x3, dilations 24 and 36, padding = dilation) on a 20x20 map is a 1x1 Conv in disguise, and a 3x3 Conv on a
1x1 map (an SSD head's last level) multiplies eight of its nine taps by zeros. Those taps cost MACs on any
engine and, dilated, a rewrite the accelerator needs; without them the Conv computes the same outputs.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from compiler.passmanager import Pass, register_pass
from compiler.rewrite import fresh_name
from passes.conv_rewrite import static_conv


@register_pass
class DropPaddingTaps(Pass):
    """Cut from each Conv's kernel the leading and trailing taps (per spatial axis) that read only zero padding
    for every output, lowering the padding by what they covered; a kernel left one tap wide on an axis loses its
    dilation there. Needs a constant weight, explicit (or no) padding and static spatial input sizes.
    Guarantees: the same output shape and values up to float rounding (the taps removed multiply zeros only);
    a tap that reads the map for any output, and interior taps, stay."""

    name = "drop-padding-taps"
    lossless = True

    def run(self, module, ctx) -> bool:
        module.infer_shapes()
        trimmed = {}
        for conv in module.graph.nodes:
            cut = _padding_taps(conv)
            if cut is not None:
                before = conv.inputs[1].shape[2:]
                _trim(module.graph, conv, *cut)
                trimmed[conv.name] = f"{'x'.join(map(str, before))} -> {'x'.join(map(str, conv.inputs[1].shape[2:]))}"
        if trimmed:
            module.graph.cleanup(remove_unused_graph_inputs=False)
            module.reinfer_shapes()
        if ctx is not None:
            ctx.log(trimmed=trimmed)
        return bool(trimmed)


def _padding_taps(conv: gs.Node) -> tuple[list[int], list[int]] | None:
    """(taps to cut at the start, at the end) per spatial axis of `conv`, or None when there are none (or the
    Conv is not one this pass can read)."""
    if not static_conv(conv) or not isinstance(conv.inputs[1], gs.Constant):
        return None
    x, kernel = conv.inputs[0].shape, conv.inputs[1].shape[2:]
    axes = len(kernel)
    pads = list(conv.attrs.get("pads", [0] * 2 * axes))
    strides = conv.attrs.get("strides", [1] * axes)
    dilations = conv.attrs.get("dilations", [1] * axes)
    starts, ends = [], []
    for size, k, s, d, begin, end in zip(x[2:], kernel, strides, dilations, pads[:axes], pads[axes:]):
        out = (size + begin + end - d * (k - 1) - 1) // s + 1
        if out < 1:
            return None
        first = s * np.arange(out)[:, None] + d * np.arange(k)[None, :] - begin  # input position of (output, tap)
        live = np.flatnonzero(((first >= 0) & (first < size)).any(axis=0))
        if live.size == 0:  # every output is the bias: leave such a Conv as it is
            return None
        starts.append(min(int(live[0]), begin // d))  # the padding must cover what a cut tap read
        ends.append(min(k - 1 - int(live[-1]), end // d))
    return (starts, ends) if any(starts) or any(ends) else None


def _trim(graph: gs.Graph, conv: gs.Node, starts: list[int], ends: list[int]) -> None:
    weight = np.asarray(conv.inputs[1].values)
    axes = len(starts)
    window = tuple(slice(a, k - b) for a, b, k in zip(starts, ends, weight.shape[2:]))
    conv.inputs[1] = gs.Constant(fresh_name(graph, conv.inputs[1].name + "_taps"),
                                 np.ascontiguousarray(weight[(slice(None),) * 2 + window]))
    dilations = list(conv.attrs.get("dilations", [1] * axes))
    pads = list(conv.attrs.get("pads", [0] * 2 * axes))
    for i in range(axes):
        pads[i] -= dilations[i] * starts[i]
        pads[axes + i] -= dilations[i] * ends[i]
        if conv.inputs[1].shape[2 + i] == 1:
            dilations[i] = 1
    conv.attrs["pads"] = pads
    conv.attrs["dilations"] = dilations
    conv.attrs["kernel_shape"] = list(conv.inputs[1].shape[2:])
    conv.attrs.pop("auto_pad", None)
