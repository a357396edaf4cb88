"""merge-parallel-convs: structural re-parameterization of branches that read one tensor and are summed."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from compiler.passmanager import Pass, register_pass
from compiler.rewrite import bypass, const_value, fresh_name, set_input, sole_consumer
from passes.fuse_conv_bn import inference_batchnorm


@dataclass
class _Branch:
    """One summand of an Add, as a convolution of `x`: a Conv, or a per-channel scale of `x` itself (a
    BatchNormalization or the identity), which becomes a 1×1 kernel once a Conv partner fixes its group."""

    x: gs.Tensor
    node: gs.Node | None                    # the Conv or BatchNormalization giving the summand; None for x itself
    bias: np.ndarray
    weight: np.ndarray | None = None        # a Conv's [Cout, Cin/group, *kernel]
    scale: np.ndarray | None = None         # a scale branch's per-channel factor

    @property
    def conv(self) -> gs.Node | None:
        return self.node if self.weight is not None else None


@register_pass
class MergeParallelConvs(Pass):
    """Replace Add(Conv_a(x), Conv_b(x)) by one Conv(x) whose kernel is the sum of both kernels, each placed at
    its offset in the larger one, and whose bias is the sum of both biases. A summand that is x itself, or a
    BatchNormalization of x, counts as a 1×1 Conv with a diagonal kernel (stride 1, as many outputs as inputs).

    This is the re-parameterization RepVGG, MobileOne, FastViT and RepGhost apply before deployment; models
    exported in their training form keep the branches (repvgg_a0: 44 Conv, 39 Add, 17 BatchNormalization).
    Summands merge pairwise until none is left, so a chain of Adds over three or more branches becomes one
    Conv. Guarantees: outputs unchanged up to float rounding; branches with different inputs, groups, strides,
    dilations or channel counts, auto_pad, non-constant weights, shared outputs, or offsets that do not line
    the taps up are left alone.
    """

    name = "merge-parallel-convs"
    lossless = True

    def run(self, module, ctx) -> bool:
        graph = module.graph
        merged, again = 0, True
        while again:
            again = False
            for add in list(graph.nodes):
                if add.op != "Add" or len(add.inputs) != 2 or add.inputs[0] is add.inputs[1] or not add.outputs:
                    continue
                a, b = (_branch(graph, t, other) for t, other in ((add.inputs[0], add.inputs[1]),
                                                                    (add.inputs[1], add.inputs[0])))
                if a is None or b is None or a.x is not b.x or (a.conv is None and b.conv is None):
                    continue
                # the merged Conv keeps the name of the larger kernel's (RepVGG's 3×3 next to its 1×1)
                conv = max((br for br in (a, b) if br.conv is not None), key=lambda br: br.weight.size).conv
                kernel = _merged(a, b)
                if kernel is None or not bypass(graph, add, conv.outputs[0], add.outputs[0]):
                    continue
                weight, pads, bias = kernel
                dtype = const_value(conv.inputs[1]).dtype
                conv.inputs[1] = gs.Constant(fresh_name(graph, conv.name + "_merged_weight"), weight.astype(dtype))
                set_input(conv, 2, gs.Constant(fresh_name(graph, conv.name + "_merged_bias"), bias.astype(dtype)))
                conv.attrs["pads"] = pads
                conv.attrs["kernel_shape"] = list(weight.shape[2:])
                for node in [add, *(br.node for br in (a, b) if br.node is not None and br.node is not conv)]:
                    node.inputs.clear()
                    node.outputs.clear()
                merged += 1
                again = True
        if merged:
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
        if ctx is not None:
            ctx.log(merged=merged)
        return merged > 0


def _branch(graph: gs.Graph, t: gs.Tensor, other: gs.Tensor) -> _Branch | None:
    """Summand `t` of an Add as a branch; `other` is the Add's other input (t may be the tensor it convolves)."""
    node = t.inputs[0] if len(t.inputs) == 1 and sole_consumer(graph, t) is not None else None
    if node is not None and node.op == "Conv":
        w = const_value(node.inputs[1])
        has_bias = len(node.inputs) > 2 and node.inputs[2].name
        b = const_value(node.inputs[2]) if has_bias else np.zeros(0 if w is None else w.shape[0])
        if w is None or w.dtype.kind != "f" or w.ndim < 3 or node.attrs.get("auto_pad", "NOTSET") != "NOTSET" \
                or b is None:
            return None
        return _Branch(node.inputs[0], node, b.astype(np.float64).reshape(-1), weight=w.astype(np.float64))
    affine = inference_batchnorm(node) if node is not None else None
    if affine is not None:
        scale, mean, beta = affine
        return _Branch(node.inputs[0], node, beta - mean * scale, scale=scale)
    # t itself, when the other summand convolves it
    partner = other.inputs[0] if len(other.inputs) == 1 else None
    if partner is not None and partner.op == "Conv" and partner.inputs[0] is t:
        return _Branch(t, None, np.zeros(1), scale=np.ones(1))
    return None


def _as_conv(br: _Branch, like: _Branch) -> tuple[np.ndarray, list[int], list[int]] | None:
    """(kernel, pads at the start, pads at the end) of branch `br`, a scale branch taking `like`'s form."""
    rank = like.weight.ndim - 2
    if br.weight is not None:
        pads = list(br.node.attrs.get("pads", [0] * 2 * rank))
        return br.weight, pads[:rank], pads[rank:]
    group = like.node.attrs.get("group", 1)
    c_out, c_in = like.weight.shape[0], like.weight.shape[1] * group
    if c_out != c_in or any(s != 1 for s in like.node.attrs.get("strides", [1] * rank)) or br.scale.size not in (1, c_out):
        return None
    w = np.zeros((c_out, like.weight.shape[1]) + (1,) * rank)
    w[np.arange(c_out), np.arange(c_out) % like.weight.shape[1]] = np.broadcast_to(br.scale, (c_out,)).reshape(-1, *(1,) * rank)
    return w, [0] * rank, [0] * rank


def _merged(a: _Branch, b: _Branch) -> tuple[np.ndarray, list[int], np.ndarray] | None:
    """(kernel, pads, bias) of the one Conv computing a + b, or None when they do not line up."""
    conv = a if a.weight is not None else b
    rank = conv.weight.ndim - 2
    if a.weight is not None and b.weight is not None:
        for key, default in (("group", 1), ("strides", [1] * rank), ("dilations", [1] * rank)):
            if list(np.atleast_1d(a.node.attrs.get(key, default))) != list(np.atleast_1d(b.node.attrs.get(key, default))):
                return None
        if a.weight.shape[:2] != b.weight.shape[:2]:
            return None
    forms = [_as_conv(a, conv), _as_conv(b, conv)]
    if any(f is None for f in forms):
        return None
    dilations = list(conv.node.attrs.get("dilations", [1] * rank))
    size = [max(f[0].shape[2 + d] for f in forms) for d in range(rank)]
    begin = [max(f[1][d] for f in forms) for d in range(rank)]
    end = [max(f[2][d] for f in forms) for d in range(rank)]
    kernel = np.zeros(conv.weight.shape[:2] + tuple(size))
    for w, pb, pe in forms:
        index = [slice(None), slice(None)]
        for d in range(rank):
            shift, k = begin[d] - pb[d], w.shape[2 + d]
            if shift % dilations[d] or shift // dilations[d] + k > size[d] \
                    or (size[d] - k - shift // dilations[d]) * dilations[d] != end[d] - pe[d]:
                return None
            index.append(slice(shift // dilations[d], shift // dilations[d] + k))
        kernel[tuple(index)] += w
    bias = np.broadcast_to(a.bias, kernel.shape[:1]) + np.broadcast_to(b.bias, kernel.shape[:1])
    return kernel, begin + end, bias
