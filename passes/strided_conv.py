"""strided-conv-to-depth: a strided Conv becomes space-to-depth and a stride-1 Conv with a kernel ceil(k/s).

A ViT's patch embedding (16x16 kernel, stride 16), Swin's and ConvNeXt's stems (4x4, stride 4), SegFormer's
overlapping patch embedding (7x7, stride 4) and AlexNet's first layer (11x11, stride 4) have strides or kernels
DRP-AI's convolution unit lacks (kernels up to 7, strides 1 and 2), so they ran on the CPU and the image went
there and back. With stride (sh, sw), output pixel (i, j) reads input rows sh*i .. sh*i + kh - 1: cut the
(padded) input into sh x sw blocks and stack each block's pixels on the channel axis (Reshape
[N, C, H/sh, sh, W/sw, sw], Transpose to [N, C, sh, sw, H/sh, W/sw], Reshape to [N, C*sh*sw, H/sh, W/sw]), and
the Conv becomes a stride-1 Conv with kernel (ceil(kh/sh), ceil(kw/sw)) whose weight is the old one padded with
zeros to a multiple of the stride and cut the same way. A patch Conv (kernel = stride) becomes a 1x1 Conv.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from compiler.passmanager import register_pass
from compiler.rewrite import NodeChain, const_value, fresh_name
from passes.conv_rewrite import ConvRewrite


@register_pass
class StridedConvToDepth(ConvRewrite):
    """Rewrite a 2-D Conv with dilation 1, group 1, explicit (or no) padding and an input of static channels,
    height and width (the batch may be dynamic), that the target's convolution unit cannot run as it is (a kernel
    above its kernel_max or a stride it lacks) but can after the rewrite, into pad/crop, space-to-depth and a
    stride-1 Conv (without a target: every Conv with a stride above 2).
    Guarantees: outputs equal up to float rounding (the same products, plus products with zero weights); other
    Convs are left alone."""

    name = "strided-conv-to-depth"

    def match(self, conv, rules):
        geometry = _geometry(conv)
        return geometry if geometry is not None and _worth_it(*geometry, rules) else None

    def rewrite(self, graph, conv, geometry):
        _rewrite(graph, conv, *geometry)


def _geometry(conv: gs.Node) -> tuple[tuple[int, int], tuple[int, int]] | None:
    """(kernel, strides) when `conv` (a plain 2-D Conv, see conv_rewrite) has a constant weight, a stride above 1,
    dilation 1 and group 1, else None."""
    weight = const_value(conv.inputs[1])
    attrs = conv.attrs
    strides = tuple(int(s) for s in attrs.get("strides", (1, 1)))
    if (weight is None or max(strides) == 1 or int(attrs.get("group", 1)) != 1
            or any(d != 1 for d in attrs.get("dilations", (1, 1)))):
        return None
    return tuple(int(k) for k in weight.shape[2:]), strides


def _worth_it(kernel, strides, rules) -> bool:
    if rules is None:
        return max(strides) > 2
    kernel_max, allowed = rules.get("kernel_max", max(kernel)), rules.get("strides", strides)
    runs_as_is = max(kernel) <= kernel_max and all(s in allowed for s in strides)
    return not runs_as_is and max(-(-k // s) for k, s in zip(kernel, strides)) <= kernel_max and 1 in allowed


def _rewrite(graph: gs.Graph, conv: gs.Node, kernel: tuple[int, int], strides: tuple[int, int]) -> None:
    x = conv.inputs[0]
    _, c, h, w = x.shape
    (kh, kw), (sh, sw) = kernel, strides
    pads = list(conv.attrs.get("pads", (0, 0, 0, 0)))
    out_h, out_w = (h + pads[0] + pads[2] - kh) // sh + 1, (w + pads[1] + pads[3] - kw) // sw + 1
    qh, qw = -(-kh // sh), -(-kw // sw)  # the new kernel
    bh, bw = out_h + qh - 1, out_w + qw - 1  # blocks the new Conv reads
    end_h, end_w = bh * sh - h - pads[0], bw * sw - w - pads[1]  # > 0: zeros to add after, < 0: rows to drop
    chain = NodeChain(graph, conv.name or "strided_conv", x.dtype)
    if pads[0] or pads[1] or end_h > 0 or end_w > 0:
        x = chain.add("Pad", "pad", [x, chain.ints("pads", [0, 0, pads[0], pads[1], 0, 0, max(end_h, 0), max(end_w, 0)])])
    if end_h < 0 or end_w < 0:  # the Conv never read the last rows/columns a full stride does not reach
        x = chain.add("Slice", "crop", [x, chain.ints("crop_starts", [0, 0]), chain.ints("crop_ends", [bh * sh, bw * sw]),
                                        chain.ints("crop_axes", [2, 3])])
    cut = chain.add("Reshape", "blocks", [x, chain.ints("blocks_shape", [0, c, bh, sh, bw, sw])])
    moved = chain.add("Transpose", "block_major", [cut], {"perm": [0, 1, 3, 5, 2, 4]})
    conv.inputs[0] = chain.add("Reshape", "space_to_depth", [moved, chain.ints("depth_shape", [0, c * sh * sw, bh, bw])])
    weight = const_value(conv.inputs[1])
    padded = np.zeros(weight.shape[:2] + (qh * sh, qw * sw), weight.dtype)
    padded[:, :, :kh, :kw] = weight
    folded = padded.reshape(weight.shape[:2] + (qh, sh, qw, sw)).transpose(0, 1, 3, 5, 2, 4)
    conv.inputs[1] = gs.Constant(fresh_name(graph, conv.inputs[1].name + "_depth"),
                                 np.ascontiguousarray(folded.reshape(weight.shape[0], c * sh * sw, qh, qw)))
    conv.attrs["kernel_shape"] = [qh, qw]
    conv.attrs["strides"] = [1, 1]
    for key in ("pads", "dilations", "auto_pad"):
        conv.attrs.pop(key, None)
