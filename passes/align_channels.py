"""align-channels: pad channel counts with zero channels up to a multiple the kernels want.

onnxruntime's fast int8 depthwise convolution (and DRP-AI's memory layout) wants channel counts that are a
multiple of 16; a depthwise block of 200 channels runs on a generic path about twice as slow as one of 208.
This pass widens such channel spaces (found by the dependency analysis of channel_groups): the producing
layers get zero filters and zero bias, depthwise convs and per-channel parameters get neutral entries, and
every layer reading the space gets zero weight columns for the new channels, so outputs do not change.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from compiler.passmanager import Option, Pass, register_pass
from compiler.rewrite import const_value, fresh_name, set_input, set_shape_entry, shape_entry
from passes.channel_groups import Space, analyze, channel_params, resize_sizes
from passes.prune_common import prunable_layers, rows_to_weight, weight_rows

NEUTRAL = {"Div": 1.0, "BatchNormalization": (0.0, 0.0, 0.0, 1.0), "InstanceNormalization": (0.0, 0.0)}


@register_pass
class AlignChannels(Pass):
    """Pad channel spaces to a multiple of `multiple` with zero channels (those of depthwise blocks only,
    unless depthwise_only=false). Guarantees: outputs unchanged up to float rounding; spaces the dependency
    analysis blocks, spaces that reach a Concat/Split/Slice/Flatten and spaces a LayerNorm normalizes (zero
    channels would change its statistics) are left alone."""

    name = "align-channels"
    lossless = True
    OPTIONS = {"multiple": Option(int, 16, "channel counts become a multiple of this", minimum=1),
               "depthwise_only": Option(bool, True, "pad only spaces that feed a depthwise Conv")}

    def run(self, module, ctx) -> bool:
        module.infer_shapes()
        graph = module.graph
        analysis = analyze(graph, prunable_layers(graph, first_layer=True, classifier=True))
        in_views = {p.space for s in analysis.spaces if s.view is not None for p in s.view}
        padded = {}
        for space in analysis.base():
            extra = (-space.channels) % self.multiple
            if (not extra or space.blocked or not space.producers or space.index in in_views or space.normalizers
                    or (self.depthwise_only and not any(f.op == "Conv" for f in space.followers))):
                continue
            _pad_space(graph, analysis, space, extra)
            padded[space.producers[0].name] = [space.channels, space.channels + extra]
        if padded:
            module.reinfer_shapes()
        if ctx is not None:
            ctx.log(padded=padded)
        return bool(padded)


def _pad_space(graph: gs.Graph, analysis, space: Space, extra: int) -> None:
    for node in space.producers:
        w = np.asarray(node.inputs[1].values)
        rows = weight_rows(node, w)
        rows = np.concatenate([rows, np.zeros((extra, rows.shape[1]), rows.dtype)])
        node.inputs[1] = gs.Constant(fresh_name(graph, node.inputs[1].name + "_aligned"), rows_to_weight(node, rows))
        _pad_constant(graph, node, 2, extra, 0.0, axis=0)
    for node in space.followers:
        _pad_follower(graph, node, space.channels, extra, analysis.axis[node.outputs[0].name])
    for node in analysis.rewrites:  # a Reshape that regroups the other axes, or an Expand, states the channel count
        out = node.outputs[0].name
        entry = shape_entry(node, analysis.axis[out]) if node.op in ("Reshape", "Expand") and out in space.tensors else None
        if entry is not None and entry != 1:  # an Expand's 1 broadcasts: it follows by itself
            set_shape_entry(graph, node, analysis.axis[out], entry + extra)  # leaves -1 and 0 as they are
    for node, tensor in analysis.consumers:
        if analysis.view[tensor] == [p for p in analysis.view[tensor] if p.space == space.index]:
            w = np.asarray(node.inputs[1].values)
            per = int(np.prod(w.shape[2:])) if node.op == "Conv" else 1  # columns per input channel
            rows = weight_rows(node, w)
            rows = np.concatenate([rows, np.zeros((rows.shape[0], extra * per), rows.dtype)], axis=1)
            node.inputs[1] = gs.Constant(fresh_name(graph, node.inputs[1].name + "_aligned"), rows_to_weight(node, rows))


def _pad_follower(graph: gs.Graph, node: gs.Node, channels: int, extra: int, axis: int) -> None:
    """Neutral entries for the new channels of a depthwise Conv, a normalization or a per-channel constant."""
    fills = NEUTRAL.get(node.op, 0.0)
    sizes = resize_sizes(node)
    if sizes is not None:
        sizes[1] += extra
        set_input(node, 3, gs.Constant(fresh_name(graph, node.inputs[3].name + "_aligned"), sizes))
    for i, along in channel_params(node, channels, axis):
        _pad_constant(graph, node, i, extra, fills[i - 1] if isinstance(fills, tuple) else fills, along)
    if node.op == "Conv":
        node.attrs["group"] = channels + extra


def _pad_constant(graph: gs.Graph, node: gs.Node, index: int, extra: int, fill: float, axis: int) -> None:
    if index >= len(node.inputs) or not isinstance(node.inputs[index], gs.Constant):
        return
    v = const_value(node.inputs[index])
    shape = list(v.shape)
    shape[axis] = extra
    new = np.concatenate([v, np.full(shape, fill, v.dtype)], axis=axis)
    set_input(node, index, gs.Constant(fresh_name(graph, node.inputs[index].name + "_aligned"), new))
