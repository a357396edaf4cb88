"""patch-conv-to-pointwise: a Conv with kernel == stride becomes space-to-depth and a 1x1 Conv the accelerator runs."""

import json

import numpy as np
import onnx
from onnx import TensorProto, helper

from compiler.context import CompileContext
from compiler.ir import Module
from compiler.passmanager import create_pass
from compiler.runtime import run_model
from compiler.target import load_target
from graphs import init, model, rand
from test_channels_last_pruning import MODELS

ATOL = 1e-5


def patch_model() -> onnx.ModelProto:
    """A dynamic batch of 3x30x34 images: a 4x4 stride-4 Conv (30 and 34 not multiples of 4: the Conv drops two
    rows and two columns), a 2x2 stride-2 Conv and a padded 3x3 stride-3 Conv."""
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="stem", kernel_shape=[4, 4], strides=[4, 4]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu"),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], name="down", kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Conv", ["c2", "w3"], ["y"], name="padded", kernel_shape=[3, 3], strides=[3, 3],
                              pads=[1, 1, 1, 1])]
    inits = [init("w1", rand(16, 3, 4, 4)), init("b1", rand(16)), init("w2", rand(8, 16, 2, 2)), init("w3", rand(4, 8, 3, 3))]
    return model(nodes, [("x", TensorProto.FLOAT, ["N", 3, 30, 34])], [("y", TensorProto.FLOAT, None)], inits)


def rewrite(proto, target=None):
    module = Module.from_proto(proto)
    ctx = CompileContext(target=load_target(target) if target else None)
    changed = create_pass("patch-conv-to-pointwise", {}).run(module, ctx)
    return changed, module.to_proto(), ctx.records[-1].facts["rewritten"]


def kernels(proto) -> dict[str, list[int]]:
    return {n.name: list(helper.get_attribute_value(a)) for n in proto.graph.node if n.op_type == "Conv"
            for a in n.attribute if a.name == "kernel_shape"}


def test_patch_convs_the_target_cannot_run_become_pointwise_with_the_same_outputs():
    original = patch_model()
    changed, rewritten, names = rewrite(original, "rzv2h")
    assert changed and names == ["stem"]  # rzv2h runs strides 1 and 2 and pads: the other two stay
    assert kernels(rewritten) == {"stem": [1, 1], "down": [2, 2], "padded": [3, 3]}
    assert [n.op_type for n in rewritten.graph.node][:4] == ["Slice", "Reshape", "Transpose", "Reshape"]
    for batch in (1, 3):
        x = rand(batch, 3, 30, 34)
        np.testing.assert_allclose(run_model(rewritten, {"x": x})[0], run_model(original, {"x": x})[0], atol=ATOL, rtol=1e-5)

    changed, everywhere, names = rewrite(original)  # no target: every patch Conv, never a padded one
    assert names == ["stem", "down"] and kernels(everywhere)["padded"] == [3, 3]
    x = rand(2, 3, 30, 34)
    np.testing.assert_allclose(run_model(everywhere, {"x": x})[0], run_model(original, {"x": x})[0], atol=ATOL, rtol=1e-5)


def test_sample_vit_patch_embedding_moves_to_the_accelerator(tmp_path):
    """models/mnist_vit.onnx cuts 28x28 digits into 7x7 patches with a stride-7 Conv, which DRP-AI's
    convolution unit cannot run (strides 1 and 2): compiled for rzv2h, the Conv is a 1x1 Conv on DRP-AI after a
    Reshape/Transpose space-to-depth on DRP-AI, kept float like a stem conv (it sees the pixels), the package
    validates and its test top-1 stays the float model's within 1 point."""
    from compiler.cli import main
    from test_channels_last_pruning import top1_drop

    out = tmp_path / "pkg"
    assert main(["compile", str(MODELS / "mnist_vit.onnx"), "--target", "rzv2h", "--calib",
                 str(MODELS / "mnist_calib.npz"), "--out", str(out)]) == 0
    layers = {l["name"]: l for l in json.loads((out / "deploy.json").read_text())["layers"]}
    patch = layers["/patch/Conv"]
    assert patch["engine"] == "drpai" and not patch["quantized"] and "patch embedding" in patch["float_reason"]
    assert [layers[f"/patch/Conv_{part}"]["engine"] for part in ("patches", "patch_major", "space_to_depth")] == ["drpai"] * 3
    assert patch["macs"] == 16 * 49 * 64  # the same MACs: 16 patches, 49 inputs each, 64 outputs
    assert main(["simulate", str(out)]) == 0
    assert top1_drop(MODELS / "mnist_vit.onnx", out) <= 0.01
