"""patch-conv-to-pointwise: a Conv that cuts its input into non-overlapping patches becomes space-to-depth and a
1x1 Conv.

A ViT's patch embedding (16x16 kernel, stride 16), Swin's and ConvNeXt's stems (4x4, stride 4) are Convs whose
kernel equals their stride. DRP-AI's convolution unit takes kernels up to 7 and strides 1 and 2, so they ran on
the CPU, and the image went there and back. Each output pixel of such a Conv reads exactly one patch, so the
Conv is a matrix product over patches: Reshape [N, C, H/kh, kh, W/kw, kw], Transpose to
[N, C, kh, kw, H/kh, W/kw], Reshape to [N, C*kh*kw, H/kh, W/kw], then a 1x1 stride-1 Conv whose weight is the
old one flattened per output channel ([O, C*kh*kw, 1, 1], the order Conv's own im2col uses). Rows and
columns a stride does not reach (H not a multiple of kh) are sliced off first, as the Conv ignored them.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from compiler.passmanager import Pass, register_pass
from compiler.rewrite import const_value, fresh_name


@register_pass
class PatchConvToPointwise(Pass):
    """Rewrite a 2-D Conv with kernel == stride (> 1 in some axis), no padding, dilation 1 and group 1, whose
    input has static channels, height and width (the batch may be dynamic), into Reshape, Transpose, Reshape
    and a 1x1 stride-1 Conv, when the target's convolution unit cannot run it as it is (kernel above its
    kernel_max or a stride it lacks; without a target, every such Conv).
    Guarantees: outputs equal up to float rounding (the same products, summed in another order); other Convs
    are left alone."""

    name = "patch-conv-to-pointwise"
    lossless = True

    def run(self, module, ctx) -> bool:
        module.infer_shapes()
        graph = module.graph
        rules = _conv_rules(ctx)
        rewritten = []
        for conv in list(graph.nodes):
            patch = _patch(conv)
            if patch is None or (rules is not None and _runs_as_is(patch, rules)):
                continue
            _rewrite(graph, conv, patch)
            rewritten.append(conv.name)
        if rewritten:
            graph.cleanup(remove_unused_graph_inputs=False).toposort()
            module.reinfer_shapes()
        if ctx is not None:
            ctx.log(rewritten=rewritten)
        return bool(rewritten)


def _conv_rules(ctx) -> dict | None:
    target = getattr(ctx, "target", None)
    if target is None:
        return None
    return target.accelerator_ops.get("Conv", {})


def _runs_as_is(patch: tuple[int, int], rules: dict) -> bool:
    return max(patch) <= rules.get("kernel_max", max(patch)) and all(s in rules.get("strides", patch) for s in patch)


def _patch(conv: gs.Node) -> tuple[int, int] | None:
    """(kh, kw) when `conv` is a patch Conv this pass can rewrite, else None."""
    if conv.op != "Conv" or conv.domain or len(conv.inputs) < 2:
        return None
    weight = const_value(conv.inputs[1])
    shape = conv.inputs[0].shape
    if weight is None or weight.ndim != 4 or shape is None or len(shape) != 4:
        return None
    if not all(isinstance(d, int) for d in shape[1:]):
        return None
    kernel = tuple(int(k) for k in weight.shape[2:])
    attrs = conv.attrs
    auto_pad = attrs.get("auto_pad", "NOTSET")
    if (tuple(attrs.get("strides", (1, 1))) != kernel or max(kernel) == 1 or int(attrs.get("group", 1)) != 1
            or any(d != 1 for d in attrs.get("dilations", (1, 1))) or any(p != 0 for p in attrs.get("pads", (0,) * 4))
            or auto_pad not in ("NOTSET", b"NOTSET", "VALID", b"VALID")):
        return None
    if shape[2] < kernel[0] or shape[3] < kernel[1]:
        return None
    return kernel


def _rewrite(graph: gs.Graph, conv: gs.Node, patch: tuple[int, int]) -> None:
    kh, kw = patch
    x = conv.inputs[0]
    _, c, h, w = x.shape
    oh, ow = h // kh, w // kw
    base = conv.name or "patch_conv"

    def const(name, values):
        return gs.Constant(fresh_name(graph, f"{base}_{name}"), np.asarray(values, dtype=np.int64))

    def node(op, inputs, name, attrs=None):
        out = gs.Variable(fresh_name(graph, f"{base}_{name}_output"), dtype=x.dtype)
        graph.nodes.append(gs.Node(op, fresh_name(graph, f"{base}_{name}"), attrs or {}, inputs, [out]))
        return out

    if (oh * kh, ow * kw) != (h, w):  # the Conv never read the last rows/columns a full patch does not cover
        x = node("Slice", [x, const("crop_starts", [0, 0]), const("crop_ends", [oh * kh, ow * kw]),
                           const("crop_axes", [2, 3])], "crop")
    cut = node("Reshape", [x, const("patches_shape", [0, c, oh, kh, ow, kw])], "patches")
    moved = node("Transpose", [cut], "patch_major", {"perm": [0, 1, 3, 5, 2, 4]})
    stacked = node("Reshape", [moved, const("depth_shape", [0, c * kh * kw, oh, ow])], "space_to_depth")
    weight = const_value(conv.inputs[1])
    conv.inputs[0] = stacked
    conv.inputs[1] = gs.Constant(fresh_name(graph, conv.inputs[1].name + "_pointwise"),
                                 np.ascontiguousarray(weight.reshape(weight.shape[0], -1, 1, 1)))
    conv.attrs["kernel_shape"] = [1, 1]
    conv.attrs["strides"] = [1, 1]
    for key in ("pads", "dilations", "auto_pad"):
        conv.attrs.pop(key, None)
