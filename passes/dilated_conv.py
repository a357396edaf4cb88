"""dilated-conv-to-batch: a dilated Conv becomes an undilated one over the input's interleaved phases.

DeepLab's ASPP (dilations 12, 24, 36) and RFB blocks (ultraface: 3 and 5) use dilations DRP-AI's convolution
unit lacks (it has 1 and 2), so they ran on the CPU with a transfer each way. With dilation (dh, dw), output
row i = dh*i' + r reads only input rows ≡ r (mod dh) of the padded input: the Conv splits into dh*dw
independent undilated Convs, one per phase, the same weights in each. Written with data movement alone (the
space-to-batch form): pad (up to a multiple of the dilation), Reshape [N, C, H/dh, dh, W/dw, dw], Transpose
the phases in front, Reshape to a batch of N*dh*dw images, the Conv with dilation 1 and no padding, and the
inverse Reshape, Transpose, Reshape (and a Slice where the padding to a multiple added rows).
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from compiler.passmanager import register_pass
from compiler.rewrite import NodeChain, fresh_name
from passes.conv_rewrite import ConvRewrite


@register_pass
class DilatedConvToBatch(ConvRewrite):
    """Rewrite a 2-D Conv with stride 1 and a dilation above 1, explicit (or no) padding and an input of static
    channels, height and width (the batch may be dynamic), into the space-to-batch form above, when the target's
    convolution unit lacks that dilation (without a target, every dilated Conv).
    Guarantees: outputs equal up to float rounding (every output reads the same products); strided or
    auto-padded dilated Convs and dilations the target runs are left alone."""

    name = "dilated-conv-to-batch"

    def match(self, conv, rules):
        dilation = _dilation(conv)
        if dilation is None or (rules is not None and all(d in rules.get("dilations", dilation) for d in dilation)):
            return None
        return dilation

    def rewrite(self, graph, conv, dilation):
        _rewrite(graph, conv, dilation)


def _dilation(conv: gs.Node) -> tuple[int, int] | None:
    """(dh, dw) when `conv` (a plain 2-D Conv, see conv_rewrite) has stride 1 and a dilation above 1, else None."""
    dilation = tuple(int(d) for d in conv.attrs.get("dilations", (1, 1)))
    if max(dilation) == 1 or any(s != 1 for s in conv.attrs.get("strides", (1, 1))):
        return None
    return dilation


def _rewrite(graph: gs.Graph, conv: gs.Node, dilation: tuple[int, int]) -> None:
    x, y = conv.inputs[0], conv.outputs[0]
    _, c, h, w = x.shape
    kh, kw = conv.inputs[1].shape[2:]
    (dh, dw), pads = dilation, list(conv.attrs.get("pads", (0, 0, 0, 0)))
    out_h, out_w = h + pads[0] + pads[2] - dh * (kh - 1), w + pads[1] + pads[3] - dw * (kw - 1)
    extra_h, extra_w = -(h + pads[0] + pads[2]) % dh, -(w + pads[1] + pads[3]) % dw
    ph, pw = (h + pads[0] + pads[2] + extra_h) // dh, (w + pads[1] + pads[3] + extra_w) // dw  # rows per phase
    qh, qw = ph - (kh - 1), pw - (kw - 1)  # output rows per phase
    chain = NodeChain(graph, conv.name or "dilated_conv", x.dtype)
    if any(pads) or extra_h or extra_w:
        x = chain.add("Pad", "pad", [x, chain.ints("pads", [0, 0, pads[0], pads[1], 0, 0, pads[2] + extra_h, pads[3] + extra_w])])
    cut = chain.add("Reshape", "phases", [x, chain.ints("phases_shape", [0, c, ph, dh, pw, dw])])
    moved = chain.add("Transpose", "phase_major", [cut], {"perm": [0, 3, 5, 1, 2, 4]})
    conv.inputs[0] = chain.add("Reshape", "space_to_batch", [moved, chain.ints("batch_shape", [-1, c, ph, pw])])
    for key in ("pads", "dilations", "auto_pad"):
        conv.attrs.pop(key, None)
    out = gs.Variable(fresh_name(graph, f"{y.name}_phases"), dtype=y.dtype)
    conv.outputs[0] = out
    o = int(conv.inputs[1].shape[0])
    back = chain.add("Reshape", "phase_outputs", [out, chain.ints("outputs_shape", [-1, dh, dw, o, qh, qw])])
    woven = chain.add("Transpose", "interleave", [back], {"perm": [0, 3, 4, 1, 5, 2]})
    crop = (qh * dh, qw * dw) != (out_h, out_w)
    merged = chain.add("Reshape", "batch_to_space", [woven, chain.ints("merged_shape", [0, o, qh * dh, qw * dw])],
                       out=None if crop else y)
    if crop:  # the rows the padding to a multiple of the dilation added
        chain.add("Slice", "crop", [merged, chain.ints("crop_starts", [0, 0]), chain.ints("crop_ends", [out_h, out_w]),
                                    chain.ints("crop_axes", [2, 3])], out=y)
