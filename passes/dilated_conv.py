"""dilated-conv-to-batch: a dilated Conv becomes one with a dilation the unit has, over the input's phases.

DeepLab's ASPP (dilations 12, 24, 36) and RFB blocks (ultraface: 3 and 5) use dilations DRP-AI's convolution
unit lacks (it has 1 and 2), so they ran on the CPU with a transfer each way. With dilation d = p*e on an axis,
output row o = p*i + r reads only padded input rows ≡ r (mod p), and within that phase the rows i + e*t: the
Conv splits into p independent Convs of dilation e, one per phase, the same weights in each. Written with data
movement alone (the space-to-batch form): pad to p phases of equal length, Reshape [N, C, rows, p, cols, q],
keep the phases that hold outputs, Transpose them in front, Reshape to a batch of images, the Conv with
dilation e and no padding, then the inverse Reshape, Transpose, Reshape (and a Slice of the rows computed past
the last output). Every phase computes as many rows as the longest one needs, so p is chosen to waste least.
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
    convolution unit lacks that dilation (without a target, every dilated Conv). Per axis the input splits into
    p = d / e phases, e a dilation the unit has that divides d (1 without a target), the Conv keeping dilation e:
    the p that computes the fewest rows beyond those kept (each phase computes as many as the longest needs),
    and only the phases some kept output lies in.
    Guarantees: outputs equal up to float rounding (every output reads the same products); strided or
    auto-padded dilated Convs and dilations the target runs are left alone."""

    name = "dilated-conv-to-batch"

    def match(self, conv, rules):
        dilation = _dilation(conv)
        if dilation is None:
            return None
        runs = set(rules.get("dilations", dilation)) if rules is not None else {1}
        if rules is not None and all(d in runs for d in dilation):
            return None
        return dilation, runs

    def rewrite(self, graph, conv, found):
        _rewrite(graph, conv, *found)


def _dilation(conv: gs.Node) -> tuple[int, int] | None:
    """(dh, dw) when `conv` (a plain 2-D Conv, see conv_rewrite) has stride 1 and a dilation above 1, else None."""
    dilation = tuple(int(d) for d in conv.attrs.get("dilations", (1, 1)))
    if max(dilation) == 1 or any(s != 1 for s in conv.attrs.get("strides", (1, 1))):
        return None
    return dilation


class _Axis:
    """How one spatial axis splits: `phases` interleaved phases of `rows` padded rows each, of which the first
    `kept` hold outputs (`per_phase` each; the phases all compute that many), the Conv keeping dilation `inner`."""

    def __init__(self, size: int, kernel: int, dilation: int, pads: tuple[int, int], runs: set[int]):
        self.padded = size + pads[0] + pads[1]
        self.out = self.padded - dilation * (kernel - 1)

        def layout(inner):
            phases = dilation // inner
            per_phase = -(-self.out // phases)
            return min(phases, self.out) * per_phase, phases, inner, per_phase

        _, self.phases, self.inner, self.per_phase = min(layout(e) for e in {1, *runs} if dilation % e == 0)
        self.kept = min(self.phases, self.out)  # fewer outputs than phases: one each, in the first `out` phases
        self.rows = self.per_phase + self.inner * (kernel - 1)
        self.extra = self.phases * self.rows - self.padded  # >= 0: phases x per_phase >= out


def _rewrite(graph: gs.Graph, conv: gs.Node, dilation: tuple[int, int], runs: set[int]) -> None:
    x, y = conv.inputs[0], conv.outputs[0]
    _, c, h, w = x.shape
    kh, kw = conv.inputs[1].shape[2:]
    pads = list(conv.attrs.get("pads", (0, 0, 0, 0)))
    ah, aw = (_Axis(n, k, d, (pads[i], pads[i + 2]), runs) for i, (n, k, d) in enumerate(((h, kh, dilation[0]),
                                                                                            (w, kw, dilation[1]))))
    chain = NodeChain(graph, conv.name or "dilated_conv", x.dtype)
    if any(pads) or ah.extra or aw.extra:
        x = chain.add("Pad", "pad", [x, chain.ints("pads", [0, 0, pads[0], pads[1], 0, 0, pads[2] + ah.extra,
                                                             pads[3] + aw.extra])])
    x = chain.add("Reshape", "phases", [x, chain.ints("phases_shape", [0, c, ah.rows, ah.phases, aw.rows, aw.phases])])
    if (ah.kept, aw.kept) != (ah.phases, aw.phases):  # phases no kept output lies in
        x = chain.add("Slice", "kept_phases", [x, chain.ints("kept_starts", [0, 0]),
                                               chain.ints("kept_ends", [ah.kept, aw.kept]), chain.ints("kept_axes", [3, 5])])
    moved = chain.add("Transpose", "phase_major", [x], {"perm": [0, 3, 5, 1, 2, 4]})
    conv.inputs[0] = chain.add("Reshape", "space_to_batch", [moved, chain.ints("batch_shape", [-1, c, ah.rows, aw.rows])])
    for key in ("pads", "auto_pad"):
        conv.attrs.pop(key, None)
    conv.attrs["dilations"] = [ah.inner, aw.inner]
    out = gs.Variable(fresh_name(graph, f"{y.name}_phases"), dtype=y.dtype)
    conv.outputs[0] = out
    o = int(conv.inputs[1].shape[0])
    back = chain.add("Reshape", "phase_outputs", [out, chain.ints("outputs_shape", [-1, ah.kept, aw.kept, o, ah.per_phase,
                                                                                    aw.per_phase])])
    woven = chain.add("Transpose", "interleave", [back], {"perm": [0, 3, 4, 1, 5, 2]})
    size = (ah.per_phase * ah.kept, aw.per_phase * aw.kept)
    crop = size != (ah.out, aw.out)
    merged = chain.add("Reshape", "batch_to_space", [woven, chain.ints("merged_shape", [0, o, *size])],
                       out=None if crop else y)
    if crop:  # the rows computed past the last output kept
        chain.add("Slice", "crop", [merged, chain.ints("crop_starts", [0, 0]), chain.ints("crop_ends", [ah.out, aw.out]),
                                    chain.ints("crop_axes", [2, 3])], out=y)
