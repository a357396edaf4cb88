"""Dilated Convs on maps about the size of their dilation (DeepLab's ASPP at a low resolution): drop-padding-taps
cuts the taps that read only padding, and dilated-conv-to-batch computes no more rows than it must."""

import json

import numpy as np
import onnx
from onnx import TensorProto, helper

from compiler.context import CompileContext
from compiler.ir import Module
from compiler.passmanager import create_pass
from graphs import init, model, rand
from test_conv_rewrites import kernels, rewrite, same_outputs

O = 8  # output channels of every branch


def aspp_model() -> onnx.ModelProto:
    """An ASPP head on a dynamic batch of 16x10x10 maps: 3x3 branches with dilations 4, 8 and 12 (padding =
    dilation; on 10 rows a dilation of 12 reaches the map through the centre tap alone), a pooled branch whose
    3x3 Conv (padding 1) sees a 1x1 map, and a dilation-4 Conv with padding 3 on a 5x5 max-pooled map (3 output
    rows for 4 phases; its first tap reads only padding, which is too thin to drop it); a 1-D Conv of length 5,
    kernel 7, dilation 4 and padding 12 (taps 0, 1, 5, 6 read only padding)."""
    nodes = [helper.make_node("Conv", ["x", f"w{d}", f"b{d}"], [f"y{d}"], name=f"aspp{d}", kernel_shape=[3, 3],
                              dilations=[d, d], pads=[d] * 4) for d in (4, 8, 12)]
    nodes += [helper.make_node("GlobalAveragePool", ["x"], ["g"], name="gap"),
              helper.make_node("Conv", ["g", "wp"], ["p"], name="pooled", kernel_shape=[3, 3], pads=[1] * 4),
              helper.make_node("Expand", ["p", "ten"], ["pe"], name="broadcast"),
              helper.make_node("MaxPool", ["x"], ["m"], name="half", kernel_shape=[2, 2], strides=[2, 2]),
              helper.make_node("Conv", ["m", "ws"], ["s"], name="short", kernel_shape=[3, 3], dilations=[4, 4],
                               pads=[3] * 4),
              helper.make_node("Concat", ["y4", "y8", "y12", "pe"], ["cat"], name="cat", axis=1),
              helper.make_node("Conv", ["cat", "wo"], ["y"], name="project", kernel_shape=[1, 1]),
              helper.make_node("Conv", ["t", "wt"], ["z"], name="line", kernel_shape=[7], dilations=[4], pads=[12, 12])]
    inits = [init(f"w{d}", rand(O, 16, 3, 3, scale=0.3)) for d in (4, 8, 12)] + [init(f"b{d}", rand(O)) for d in (4, 8, 12)]
    inits += [init("wp", rand(O, 16, 3, 3, scale=0.3)), init("ten", np.array([1, 1, 10, 10], np.int64)),
              init("ws", rand(O, 16, 3, 3, scale=0.3)), init("wo", rand(O, 4 * O, 1, 1, scale=0.3)),
              init("wt", rand(O, 4, 7, scale=0.3))]
    return model(nodes, [("x", TensorProto.FLOAT, ["N", 16, 10, 10]), ("t", TensorProto.FLOAT, ["N", 4, 5])],
                 [(name, TensorProto.FLOAT, None) for name in ("y", "s", "z")], inits)


def feeds(batch):
    return {"x": rand(batch, 16, 10, 10), "t": rand(batch, 4, 5)}


def attribute(proto, node, name):
    return next(list(a.ints) for n in proto.graph.node if n.name == node for a in n.attribute if a.name == name)


def trim(proto) -> tuple[dict[str, str], onnx.ModelProto]:
    """drop-padding-taps on `proto`: (the kernels it cut, before -> after, by Conv; the model after)."""
    module, ctx = Module.from_proto(proto), CompileContext()
    create_pass("drop-padding-taps", {}).run(module, ctx)
    return ctx.records[-1].facts["trimmed"], module.to_proto()


def test_taps_that_read_only_padding_are_cut_with_the_same_outputs():
    original = aspp_model()
    cut, trimmed = trim(original)
    assert cut == {"aspp12": "3x3 -> 1x1", "pooled": "3x3 -> 1x1", "line": "7 -> 3"}
    assert kernels(trimmed) == {"aspp4": [3, 3], "aspp8": [3, 3], "aspp12": [1, 1], "pooled": [1, 1], "short": [3, 3],
                                "project": [1, 1], "line": [3]}
    assert attribute(trimmed, "aspp12", "pads") == [0] * 4 and attribute(trimmed, "aspp12", "dilations") == [1, 1]
    assert attribute(trimmed, "line", "pads") == [4, 4] and attribute(trimmed, "line", "dilations") == [4]
    for batch in (1, 3):
        same_outputs(original, trimmed, feeds(batch))


def test_dilated_convs_compute_only_the_phases_and_rows_they_keep():
    """rzv2h has dilations 1 and 2: dilation 4 on 10 rows is 2 phases of dilation 2 (5 rows each, none wasted),
    dilation 8 is 4 phases of dilation 2 (12 rows computed, against 16 from 8 undilated phases), and the short
    Conv's 3 output rows lie in 3 of its 4 phases (the fourth is sliced away)."""
    original = aspp_model()
    changed, rewritten, names = rewrite(original, "rzv2h", "dilated-conv-to-batch")
    assert changed and sorted(names) == ["aspp12", "aspp4", "aspp8", "short"]
    inner = {name: attribute(rewritten, name, "dilations") for name in names}
    assert inner == {"aspp4": [2, 2], "aspp8": [2, 2], "aspp12": [1, 1], "short": [1, 1]}
    assert [n.op_type for n in rewritten.graph.node if n.name.startswith("short_")].count("Slice") == 1  # no crop
    for batch in (1, 3):
        same_outputs(original, rewritten, feeds(batch))


def test_an_aspp_head_compiles_onto_the_accelerator_with_the_macs_it_needs(tmp_path):
    """Through the CLI, int8 for rzv2h at batch 1: every 2-D Conv on DRP-AI (on the CPU: the 1-D Conv, the
    pooled branch's Expand and the reshape back from the short Conv's phases, which feeds a graph output); the dilation-12 branch costs a 1x1 Conv's
    MACs, dilation 4 exactly its own, dilation 8 its 12x12 computed rows; the package validates."""
    from compiler.cli import main

    source, out = tmp_path / "aspp.onnx", tmp_path / "pkg"
    onnx.save(aspp_model(), str(source))
    assert main(["compile", str(source), "--target", "rzv2h", "--input-shape", "x=1,16,10,10", "--input-shape",
                 "t=1,4,5", "--out", str(out)]) == 0
    deploy = json.loads((out / "deploy.json").read_text())
    layers = {l["name"]: l for l in deploy["layers"]}
    assert {l["name"] for l in deploy["layers"] if l["engine"] == "cpu"} == {"line", "broadcast", "short_batch_to_space"}
    per_tap = O * 16  # MACs of one tap at one output pixel
    assert {name: layers[name]["macs"] for name in ("aspp4", "aspp8", "aspp12", "short")} == {
        "aspp4": per_tap * 9 * 100, "aspp8": per_tap * 9 * 144, "aspp12": per_tap * 100, "short": per_tap * 9 * 9}
    assert main(["simulate", str(out)]) == 0
