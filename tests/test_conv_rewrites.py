"""Convs the accelerator's convolution unit cannot run, rewritten into data movement and a Conv it can:
strided-conv-to-depth (a stride or kernel it lacks: space-to-depth and a stride-1 Conv) and dilated-conv-to-batch
(a dilation it lacks: space-to-batch and an undilated Conv)."""

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


def strided_model() -> onnx.ModelProto:
    """A dynamic batch of 3x30x34 images read by: a 4x4 stride-4 patch Conv (30 and 34 not multiples of 4: it
    drops two rows and two columns), then a 2x2 stride-2 Conv and a padded 3x3 stride-3 Conv; a padded 7x7
    stride-4 Conv (SegFormer's overlapping patches); a padded 9x9 stride-2 Conv; a 3x3 stride-2 Conv."""
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="stem", kernel_shape=[4, 4], strides=[4, 4]),
             helper.make_node("Relu", ["c1"], ["r1"], name="relu"),
             helper.make_node("Conv", ["r1", "w2"], ["c2"], name="down", kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Conv", ["c2", "w3"], ["y"], name="padded", kernel_shape=[3, 3], strides=[3, 3],
                              pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["x", "w4"], ["y4"], name="overlap", kernel_shape=[7, 7], strides=[4, 4],
                              pads=[3, 3, 3, 3]),
             helper.make_node("Conv", ["x", "w5"], ["y5"], name="wide", kernel_shape=[9, 9], strides=[2, 2],
                              pads=[4, 3, 2, 4]),
             helper.make_node("Conv", ["x", "w6"], ["y6"], name="plain", kernel_shape=[3, 3], strides=[2, 2])]
    inits = [init("w1", rand(16, 3, 4, 4)), init("b1", rand(16)), init("w2", rand(8, 16, 2, 2)), init("w3", rand(4, 8, 3, 3)),
             init("w4", rand(8, 3, 7, 7)), init("w5", rand(8, 3, 9, 9)), init("w6", rand(8, 3, 3, 3))]
    return model(nodes, [("x", TensorProto.FLOAT, ["N", 3, 30, 34])],
                 [(name, TensorProto.FLOAT, None) for name in ("y", "y4", "y5", "y6")], inits)


def feeding(proto, conv: str) -> list[str]:
    """The ops between the graph input and `conv`, in order."""
    made = {o: n for n in proto.graph.node for o in n.output}
    node, ops = next(n for n in proto.graph.node if n.name == conv), []
    while node.input[0] in made:
        node = made[node.input[0]]
        ops.insert(0, node.op_type)
    return ops


def same_outputs(a, b, feed):
    for got, want in zip(run_model(b, feed), run_model(a, feed)):
        np.testing.assert_allclose(got, want, atol=ATOL * np.abs(want).max(), rtol=1e-5)  # float rounding only


def rewrite(proto, target=None, name="strided-conv-to-depth"):
    module = Module.from_proto(proto)
    ctx = CompileContext(target=load_target(target) if target else None)
    changed = create_pass(name, {}).run(module, ctx)
    return changed, module.to_proto(), ctx.records[-1].facts["rewritten"]


def kernels(proto) -> dict[str, list[int]]:
    return {n.name: list(helper.get_attribute_value(a)) for n in proto.graph.node if n.op_type == "Conv"
            for a in n.attribute if a.name == "kernel_shape"}


def test_strides_and_kernels_the_target_lacks_become_space_to_depth_with_the_same_outputs():
    original = strided_model()
    changed, rewritten, names = rewrite(original, "rzv2h")  # rzv2h: kernels up to 7, strides 1 and 2
    assert changed and sorted(names) == ["overlap", "padded", "stem", "wide"]
    assert kernels(rewritten) == {"stem": [1, 1], "down": [2, 2], "padded": [1, 1], "overlap": [2, 2], "wide": [5, 5],
                                  "plain": [3, 3]}
    assert feeding(rewritten, "stem") == ["Slice", "Reshape", "Transpose", "Reshape"]  # crop, no padding
    assert feeding(rewritten, "overlap") == ["Pad", "Reshape", "Transpose", "Reshape"]
    for batch in (1, 3):
        same_outputs(original, rewritten, {"x": rand(batch, 3, 30, 34)})

    changed, everywhere, names = rewrite(original)  # no target: every Conv with a stride above 2
    assert sorted(names) == ["overlap", "padded", "stem"]
    same_outputs(original, everywhere, {"x": rand(2, 3, 30, 34)})


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
    assert [layers[f"/patch/Conv_{part}"]["engine"] for part in ("blocks", "block_major", "space_to_depth")] == ["drpai"] * 3
    assert patch["macs"] == 16 * 49 * 64  # the same MACs: 16 patches, 49 inputs each, 64 outputs
    assert main(["simulate", str(out)]) == 0
    assert top1_drop(MODELS / "mnist_vit.onnx", out) <= 0.01


def rfb_model() -> onnx.ModelProto:
    """An RFB block as in ultraface: a dynamic batch of 16x30x40 maps, three 3x3 branches with dilations 2, 3
    and 5 (padded to keep the size; a grouped one), concatenated, and a Conv with dilation (4, 3) and uneven
    padding whose padded size is not a multiple of its dilation, and a Relu."""
    branches = [helper.make_node("Conv", ["x", f"w{d}", f"b{d}"], [f"y{d}"], name=f"dilated{d}", kernel_shape=[3, 3],
                                 dilations=[d, d], pads=[d] * 4, group=2 if d == 3 else 1) for d in (2, 3, 5)]
    nodes = branches + [helper.make_node("Concat", ["y2", "y3", "y5"], ["cat"], name="cat", axis=1),
                        helper.make_node("Conv", ["cat", "wo"], ["u"], name="uneven", kernel_shape=[3, 3],
                                         dilations=[4, 3], pads=[1, 2, 3, 0]),
                        helper.make_node("Relu", ["u"], ["y"], name="relu")]
    inits = [init(f"w{d}", rand(8, 8 if d == 3 else 16, 3, 3, scale=0.3)) for d in (2, 3, 5)]
    inits += [init(f"b{d}", rand(8)) for d in (2, 3, 5)] + [init("wo", rand(4, 24, 3, 3, scale=0.3))]
    return model(nodes, [("x", TensorProto.FLOAT, ["N", 16, 30, 40])], [("y", TensorProto.FLOAT, None)], inits)


def test_dilations_the_target_lacks_become_space_to_batch_with_the_same_outputs():
    original = rfb_model()
    changed, rewritten, names = rewrite(original, "rzv2h", "dilated-conv-to-batch")
    assert changed and sorted(names) == ["dilated3", "dilated5", "uneven"]  # rzv2h has dilations 1 and 2
    dilated = {n.name: [list(a.ints) for a in n.attribute if a.name == "dilations"] for n in rewritten.graph.node
               if n.op_type == "Conv"}
    # (4, 3) on 30x40 padded by (1, 3) and (2, 0): 26 rows from 2 phases of dilation 2 (4 of dilation 1 would
    # compute 28), 36 columns from 3 phases
    assert dilated == {"dilated2": [[2, 2]], "dilated3": [[1, 1]], "dilated5": [[1, 1]], "uneven": [[2, 1]]}
    for batch in (1, 3):
        x = rand(batch, 16, 30, 40)
        same_outputs(original, rewritten, {"x": x})
    _, everywhere, names = rewrite(original, None, "dilated-conv-to-batch")
    assert sorted(names) == ["dilated2", "dilated3", "dilated5", "uneven"]
    same_outputs(original, everywhere, {"x": rand(2, 16, 30, 40)})


def test_an_rfb_block_compiles_onto_the_accelerator_alone(tmp_path):
    """Through the CLI, int8 for rzv2h at batch 1: every layer on DRP-AI (the dilated Convs were on the CPU),
    the same MACs for the Convs whose padded size is a multiple of their dilation, and the package validates."""
    from compiler.cli import main

    source, out = tmp_path / "rfb.onnx", tmp_path / "pkg"
    onnx.save(rfb_model(), str(source))
    assert main(["compile", str(source), "--target", "rzv2h", "--input-shape", "x=1,16,30,40", "--out", str(out)]) == 0
    deploy = json.loads((out / "deploy.json").read_text())
    layers = {l["name"]: l for l in deploy["layers"]}
    assert deploy["totals"]["layers_on_cpu"] == 0
    assert layers["dilated5"]["macs"] == 8 * 16 * 9 * 30 * 40 and layers["dilated5"]["engine"] == "drpai"
    assert main(["simulate", str(out)]) == 0


def test_only_the_rewritten_chain_makes_a_conv_a_stem():
    """float_layers looks through strided-conv-to-depth's space-to-depth chain to the model input, and through
    nothing else: a Conv after a reflect Pad of a 3-channel input is no stem (as before the rewrite existed)."""
    import onnx_graphsurgeon as gs

    from passes.float_layers import float_layers

    nodes = [helper.make_node("Pad", ["x", "pads"], ["p"], name="pad", mode="reflect"),
             helper.make_node("Conv", ["p", "w"], ["y"], name="conv", kernel_shape=[3, 3])]
    padded = model(nodes, [("x", TensorProto.FLOAT, [1, 3, 8, 8])], [("y", TensorProto.FLOAT, None)],
                   [init("pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)), init("w", rand(4, 3, 3, 3))])
    assert float_layers(gs.import_onnx(padded))[0] == {}
    _, rewritten, _ = rewrite(strided_model(), "rzv2h")
    reasons = float_layers(gs.import_onnx(rewritten))[0]
    assert {"stem", "overlap", "wide"} <= set(reasons) and "patch embedding" in reasons["overlap"]
