"""Constructs real models have: symbolic dims without data, weights in Constant nodes, If with captures, LSTM."""

from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
import pytest
from onnx import TensorProto, helper

from backends.simulator import simulate
from compiler.api import compile_model
from compiler.runtime import make_session
from graphs import init, rand


def test_symbolic_length_is_probed_without_calibration_data(tmp_path):
    """Reflect padding needs a length >= 3: the synthetic shape probe must find one that runs."""
    nodes = [helper.make_node("Pad", ["x", "pads"], ["p"], name="pad", mode="reflect"),
             helper.make_node("Relu", ["p"], ["y"], name="relu")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", "seq"])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", None])],
                              [init("pads", np.array([0, 2, 0, 2], np.int64))])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.save(m, tmp_path / "m.onnx")
    result = compile_model(tmp_path / "m.onnx", "rzv2h", tmp_path / "pkg")
    assert any("compiled for shape [1, 16]" in w for w in result.warnings)
    assert simulate(tmp_path / "pkg").ok


def if_lstm_model():
    """Weights in a Constant node, an If whose branches read an outer tensor, an LSTM."""
    w = rand(4, 4)
    then_g = helper.make_graph([helper.make_node("MatMul", ["h", "wt"], ["o"], name="then_mm")], "then", [],
                               [helper.make_tensor_value_info("o", TensorProto.FLOAT, [1, 4])], [init("wt", w)])
    else_g = helper.make_graph([helper.make_node("Identity", ["h"], ["o2"], name="else_id")], "else", [],
                               [helper.make_tensor_value_info("o2", TensorProto.FLOAT, [1, 4])])
    nodes = [helper.make_node("Constant", [], ["k"], name="weights_in_constant",
                              value=helper.make_tensor("k", TensorProto.FLOAT, [4, 4], rand(4, 4).ravel())),
             helper.make_node("MatMul", ["x", "k"], ["h"], name="mm"),
             helper.make_node("If", ["cond"], ["b"], name="branch", then_branch=then_g, else_branch=else_g),
             helper.make_node("Unsqueeze", ["b", "axes"], ["seq"], name="unsq"),
             helper.make_node("LSTM", ["seq", "lw", "lr"], ["lstm_y"], name="lstm", hidden_size=3),
             helper.make_node("Flatten", ["lstm_y"], ["y"], name="flat")]
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 4]),
                                           helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 3])],
                              [init("axes", np.array([0], np.int64)), init("lw", rand(1, 12, 4)), init("lr", rand(1, 12, 3))])
    m = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(m)
    return m


def test_if_with_outer_scope_capture_and_lstm_stay_float(tmp_path):
    onnx.save(if_lstm_model(), tmp_path / "m.onnx")
    out = tmp_path / "pkg"
    compile_model(tmp_path / "m.onnx", "rzv2h", out)
    deploy = __import__("json").loads((out / "deploy.json").read_text())
    engines = {l["name"]: l["engine"] for l in deploy["layers"]}
    assert engines["branch"] == "cpu" and engines["lstm"] == "cpu"
    compiled = onnx.load(str(out / "model.onnx"))
    branch = next(n for n in compiled.graph.node if n.op_type == "If")
    then_body = next(a.g for a in branch.attribute if a.name == "then_branch")
    assert [n.op_type for n in then_body.node] == ["MatMul"]  # passed through untouched
    assert simulate(out).ok


def test_fp16_keeps_if_bodies_consistent(tmp_path):
    """rzv2l converts to fp16; the If bodies stay float and read the float version of captured tensors."""
    onnx.save(if_lstm_model(), tmp_path / "m.onnx")
    out = tmp_path / "pkg"
    compile_model(tmp_path / "m.onnx", "rzv2l", out)
    report = simulate(out)
    assert report.ok and report.outputs["y"]["cosine"] > 0.999
    compiled = onnx.load(str(out / "model.onnx"))
    assert any(n.op_type == "Cast" for n in compiled.graph.node)


def test_fp16_names_the_tensors_past_its_range(tmp_path):
    """The sample for rzv2l (fp16): with its own calibration data nothing passes 65504; fed inputs 10^4 times
    larger (pixels not normalized, say), the compile warns and names the largest tensor (onnxruntime's CPU
    kernels run many fp16 layers in float32, so the simulator does not see the overflow)."""
    root = Path(__file__).resolve().parents[1]
    with np.load(root / "models" / "mnist_calib.npz") as z:
        x = z["input"][:16]
    np.save(tmp_path / "calib.npy", x)
    np.save(tmp_path / "raw.npy", x * 1e4)
    warnings = {}
    for name in ("calib", "raw"):
        result = compile_model(root / "models" / "mnist_resnet.onnx", "rzv2l", tmp_path / name,
                               calib=tmp_path / f"{name}.npy")
        warnings[name] = [w for w in result.warnings if "fp16's range" in w]
    assert warnings["calib"] == []
    assert len(warnings["raw"]) == 1 and "the largest '" in warnings["raw"][0], warnings["raw"]
    facts = next(r.facts for r in result.records if r.name == "convert-fp16")
    assert facts["beyond_fp16"] and f"'{facts['beyond_fp16'][0]}'" in warnings["raw"][0]


def test_ir3_model_without_weights_as_inputs_compiles(tmp_path):
    """onnxruntime's quantizer run on an IR-3 model (mnist_cntk) writes IR 3 without listing the weights as
    graph inputs, which onnx's checker refuses: drpc reads it as the IR-4 model it is and compiles it."""
    from graphs import conv_bn_model

    m = conv_bn_model()
    m.opset_import[0].version = 8
    m.ir_version = 3
    with pytest.raises(onnx.checker.ValidationError, match="in initializer but not in graph input"):
        onnx.checker.check_model(m)
    onnx.save(m, tmp_path / "ir3.onnx")
    compile_model(tmp_path / "ir3.onnx", "rzv2h", tmp_path / "pkg")
    assert simulate(tmp_path / "pkg").ok


def test_tensor_with_raw_data_and_float_data_reads_as_onnxruntime_does(tmp_path):
    """AIMET's mnist_cntk sets raw_data on weights it rewrote and leaves their float_data: onnx's checker
    refuses two value fields, onnxruntime reads raw_data. drpc compiles the model onnxruntime runs."""
    from onnx import numpy_helper

    from compiler.ir import Module
    from compiler.runtime import run_model

    root = Path(__file__).resolve().parents[1]
    m = onnx.load(root / "models" / "mnist_resnet.onnx")
    conv = next(n for n in m.graph.node if n.op_type == "Conv")
    weight = next(t for t in m.graph.initializer if t.name == conv.input[1])
    w = numpy_helper.to_array(weight)
    weight.ClearField("raw_data")
    weight.float_data.extend(w.ravel().tolist())
    weight.raw_data = (w * -0.5).astype(np.float32).tobytes()
    with pytest.raises(onnx.checker.ValidationError, match="one and only one value field"):
        onnx.checker.check_model(m)
    onnx.save(m, tmp_path / "two_fields.onnx")

    with np.load(root / "models" / "mnist_calib.npz") as z:
        x = z["input"][:8]
    expected = run_model(m, {"input": x})[0]
    typed = np.abs(expected - run_model(onnx.load(root / "models" / "mnist_resnet.onnx"), {"input": x})[0]).max()
    assert typed > 1e-2  # the two fields give different models
    loaded = Module.load(tmp_path / "two_fields.onnx")
    np.testing.assert_allclose(run_model(loaded.to_proto(), {"input": x})[0], expected, rtol=1e-5, atol=1e-5)
    compile_model(tmp_path / "two_fields.onnx", "rzv2h", tmp_path / "pkg")
    assert simulate(tmp_path / "pkg").ok


def test_a_dynamic_batch_compiles_like_batch_1_where_its_shapes_are_known(tmp_path):
    """The shipped ViT, exported with a dynamic batch, reads its sizes with Shape at run time: compiled as it is,
    it places and counts like the same model at batch 1 (no shape arithmetic left on the CPU, every MAC
    counted, no warning) and answers the same."""
    model = Path(__file__).resolve().parents[1] / "models" / "mnist_vit.onnx"
    with np.load(Path(__file__).resolve().parents[1] / "models" / "mnist_calib.npz") as z:
        np.save(tmp_path / "calib.npy", z[z.files[0]][:16])
    dynamic = compile_model(model, "rzv2h", tmp_path / "dynamic", calib=tmp_path / "calib.npy")
    fixed = compile_model(model, "rzv2h", tmp_path / "fixed", calib=tmp_path / "calib.npy",
                          input_shapes={"input": [1, 1, 28, 28]})
    assert not any("dynamic batch" in w for w in dynamic.warnings + fixed.warnings)
    before, after = dynamic.descriptor["totals"], fixed.descriptor["totals"]
    assert (before["layers_on_cpu"], before["macs"]) == (after["layers_on_cpu"], after["macs"])
    assert simulate(tmp_path / "dynamic").ok
    x = np.load(tmp_path / "calib.npy")
    whole = make_session(tmp_path / "dynamic" / "model.onnx").run(None, {"input": x})[0]
    single = make_session(tmp_path / "fixed" / "model.onnx")
    one_by_one = np.concatenate([single.run(None, {"input": x[i:i + 1]})[0] for i in range(len(x))])
    assert np.array_equal(whole.argmax(1), one_by_one.argmax(1))


def token_model() -> onnx.ModelProto:
    """Tokens x [N, 4, 8] on a dynamic batch, with the sizes read the way torch's exporter writes them: a class
    token expanded to the batch (`cls.expand(N, -1, -1)`: a Where over the sizes), joined to x; a Linear; its
    output viewed as heads with the batch read from x, another tensor (LeViT's `view(B, T, heads, -1)`); heads
    moved first ([heads, N, T, dim], as attention's q, k, v are) and folded into the batch (`view(B * heads, -1)`,
    nn.MultiheadAttention's way); back to [N, 40]; a classifier."""
    def size(name, axis=0, of="x"):
        return [helper.make_node("Shape", [of], [name + "_shape"]),
                helper.make_node("Gather", [name + "_shape", f"i{axis}"], [name + "_size"], axis=0),
                helper.make_node("Unsqueeze", [name + "_size", "ax0"], [name])]

    inits = [init("i0", np.array(0, np.int64)), init("ax0", np.array([0], np.int64)), init("m1", np.array([-1], np.int64)),
             init("ones", np.ones(3, np.int64)), init("two", np.array([2], np.int64)), init("five", np.array([5], np.int64)),
             init("cls", rand(1, 1, 8)), init("w", rand(8, 8)), init("wc", rand(40, 5))]
    nodes = size("b") + [
        helper.make_node("Concat", ["b", "m1", "m1"], ["wanted"], axis=0),
        helper.make_node("Equal", ["wanted", "m1"], ["kept"]),
        helper.make_node("Where", ["kept", "ones", "wanted"], ["sizes"]),
        helper.make_node("Expand", ["cls", "sizes"], ["cls_n"], name="expand_cls"),
        helper.make_node("Concat", ["cls_n", "x"], ["tokens"], axis=1, name="join"),
        helper.make_node("MatMul", ["tokens", "w"], ["h"], name="linear"),
        helper.make_node("Concat", ["b", "five", "two", "m1"], ["heads_shape"], axis=0),
        helper.make_node("Reshape", ["h", "heads_shape"], ["heads"], name="view_heads"),
        helper.make_node("Transpose", ["heads"], ["per_head"], perm=[2, 0, 1, 3], name="heads_first"),
        helper.make_node("Mul", ["b", "two"], ["b2"]),
        helper.make_node("Concat", ["b2", "m1"], ["folded_shape"], axis=0),
        helper.make_node("Reshape", ["per_head", "folded_shape"], ["folded"], name="view_folded"),
        helper.make_node("Relu", ["folded"], ["r"], name="relu_folded"),
        helper.make_node("Concat", ["b", "m1"], ["back_shape"], axis=0),
        helper.make_node("Reshape", ["r", "back_shape"], ["back"], name="view_back"),
        helper.make_node("MatMul", ["back", "wc"], ["y"], name="classifier")]
    graph = helper.make_graph(nodes, "tokens", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 8])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 5])], inits)
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])


def test_sizes_computed_from_a_dynamic_batch_become_constant_where_probes_show_they_can():
    """fold-constants probes the sizes shape inference cannot follow: each Reshape of the token model gets a
    constant target (the batch copied or inferred), the class token's Expand reads the batch from the graph
    input instead of a Where, every tensor after it has known feature sizes, and the model answers as before at
    batches 1, 2 and 3."""
    from compiler.ir import Module
    from passes.fold_constants import FoldConstants

    original = token_model()
    module = Module.from_proto(original)
    assert FoldConstants().run(module, None)
    graph = module.graph
    nodes = {n.name: n for n in graph.nodes}
    targets = {name: nodes[name].inputs[1] for name in ("view_heads", "view_folded", "view_back")}
    assert all(isinstance(t, gs.Constant) for t in targets.values())
    assert targets["view_heads"].values.tolist() == [0, 5, 2, 4]
    assert targets["view_folded"].values.tolist() == [-1, 20]
    assert not any(n.op in ("Where", "Equal") for n in graph.nodes)
    reads = [n for n in graph.nodes if n.op == "Shape"]
    assert [n.inputs[0].name for n in reads] == ["x"]
    tensors = graph.tensors()
    assert tensors["tokens"].shape == ["N", 5, 8] and tensors["per_head"].shape == [2, "N", 5, 4]
    folded = module.to_proto()
    for batch in (1, 2, 3):
        feed = {"x": rand(batch, 4, 8)}
        np.testing.assert_allclose(make_session(folded).run(None, feed)[0], make_session(original).run(None, feed)[0],
                                   rtol=1e-5, atol=1e-6)


def test_shape_arithmetic_left_on_a_dynamic_batch_is_named_with_the_fix(tmp_path):
    """The class token's Expand still reads the batch at run time: the compile warns and names the --input-shape
    that compiles for batch 1, which folds it away. The Transpose that moves the batch off the first axis and the
    Relu on heads folded into the batch run on the accelerator all the same, and every MAC is counted: the
    backend reads the shapes at batch 1, the accelerator's."""
    onnx.save(token_model(), tmp_path / "m.onnx")
    dynamic = compile_model(tmp_path / "m.onnx", "rzv2h", tmp_path / "dynamic")
    engines = {layer["name"]: layer["engine"] for layer in dynamic.descriptor["layers"]}
    assert engines["heads_first"] == engines["relu_folded"] == "drpai" and engines["expand_cls"] == "cpu"
    note = [w for w in dynamic.warnings if "dynamic batch" in w]
    assert note and "--input-shape x=1,4,8" in note[0], dynamic.warnings
    fixed = compile_model(tmp_path / "m.onnx", "rzv2h", tmp_path / "fixed", input_shapes={"x": [1, 4, 8]})
    assert not any("dynamic batch" in w for w in fixed.warnings)
    assert fixed.descriptor["totals"]["layers_on_cpu"] < dynamic.descriptor["totals"]["layers_on_cpu"]
    assert fixed.descriptor["totals"]["macs"] == dynamic.descriptor["totals"]["macs"]
    assert simulate(tmp_path / "dynamic").ok


def test_a_reshape_chain_read_by_a_shape_stays_on_the_accelerator(tmp_path):
    """A token Reshape → Transpose → Reshape chain on a dynamic batch is read by the next conv's quantizer and by
    a Shape whose result the model returns (MobileViT's unfold read it this way to size a Resize, before
    fold-constants learnt to give that Resize constant scales). The Shape reads no data, so the chain stays on
    DRP-AI (it went to the CPU when the Shape counted as its only reader) and no transfer of the tensor to the
    CPU is counted for it; the package answers like the model."""
    inits = [init("w1", rand(4, 4, 1, 1)), init("w2", rand(4, 4, 3, 3)), init("tokens", np.array([-1, 4, 36], np.int64)),
             init("image", np.array([-1, 4, 6, 6], np.int64))]
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c"], name="conv1"),
             helper.make_node("Reshape", ["c", "tokens"], ["t"], name="to_tokens"),
             helper.make_node("Transpose", ["t"], ["tt"], perm=[0, 2, 1], name="mix"),
             helper.make_node("Transpose", ["tt"], ["tb"], perm=[0, 2, 1], name="unmix"),
             helper.make_node("Reshape", ["tb", "image"], ["back"], name="to_image"),
             helper.make_node("Shape", ["back"], ["size"], name="read_shape"),
             helper.make_node("Conv", ["back", "w2"], ["y"], pads=[1, 1, 1, 1], name="conv2")]
    graph = helper.make_graph(nodes, "mobilevit_like", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 4, 6, 6])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 4, 6, 6]),
                               helper.make_tensor_value_info("size", TensorProto.INT64, [4])], inits)
    onnx.save(helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]), tmp_path / "m.onnx")
    result = compile_model(tmp_path / "m.onnx", "rzv2h", tmp_path / "pkg")
    engines = {layer["name"]: layer["engine"] for layer in result.descriptor["layers"]}
    assert engines["read_shape"] == "cpu"
    assert engines["to_tokens"] == engines["mix"] == engines["unmix"] == engines["to_image"] == "drpai", engines
    reshaped = {layer["name"]: layer["outputs"][0] for layer in result.descriptor["layers"]}["to_image"]
    assert not [t for t in result.descriptor["transfers"] if t["tensor"].startswith(reshaped) and t["to"] == "cpu"]
    assert simulate(tmp_path / "pkg").ok


def test_resize_sizes_read_from_a_dynamic_batch_become_constant_scales(tmp_path):
    """A segmentation head on a dynamic batch: a strided conv, a Resize to [N, C] read from its input plus a
    fixed 8 x 8 (MobileViT's unfold resize, scale 8/7), a conv, and a Resize back to the image's own size read
    from the graph input (`interpolate(size=x.shape[-2:])`). fold-constants gives both Resizes constant scales
    (so no Shape is left for the CPU), the model answers as before at batches 1 to 3, and the compile places
    every layer on DRP-AI as the batch-1 form does."""
    from compiler.ir import Module
    from passes.fold_constants import FoldConstants

    def sizes_from(name, of, start, end):
        return [helper.make_node("Shape", [of], [name + "_shape"]),
                helper.make_node("Slice", [name + "_shape", f"at{start}", f"at{end}"], [name])]

    inits = [init("w1", rand(4, 3, 3, 3)), init("w2", rand(4, 4, 3, 3)), init("w3", rand(2, 4, 1, 1)),
             init("at0", np.array([0], np.int64)), init("at2", np.array([2], np.int64)),
             init("at4", np.array([4], np.int64)), init("eight", np.array([8, 8], np.int64))]
    nodes = ([helper.make_node("Conv", ["x", "w1"], ["c1"], strides=[2, 2], pads=[1, 1, 1, 1], name="down")]
             + sizes_from("nc", "c1", 0, 2)
             + [helper.make_node("Concat", ["nc", "eight"], ["to8"], axis=0),
                helper.make_node("Resize", ["c1", "", "", "to8"], ["r8"], mode="linear", name="to_eight"),
                helper.make_node("Conv", ["r8", "w2"], ["c2"], pads=[1, 1, 1, 1], name="mix"),
                helper.make_node("Conv", ["c2", "w3"], ["c3"], name="classes")]
             + sizes_from("nc3", "c3", 0, 2) + sizes_from("hw", "x", 2, 4)
             + [helper.make_node("Concat", ["nc3", "hw"], ["full"], axis=0),
                helper.make_node("Resize", ["c3", "", "", "full"], ["y"], mode="linear", name="to_image")])
    graph = helper.make_graph(nodes, "seg", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["N", 3, 14, 14])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["N", 2, 14, 14])], inits)
    original = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)])
    module = Module.from_proto(original)
    assert FoldConstants().run(module, None)
    resizes = {n.name: n for n in module.graph.nodes if n.op == "Resize"}
    assert [len(n.inputs) for n in resizes.values()] == [3, 3]
    np.testing.assert_array_equal(resizes["to_eight"].inputs[2].values, np.float32([1, 1, 8 / 7, 8 / 7]))
    assert not any(n.op == "Shape" for n in module.graph.nodes)
    folded = module.to_proto()
    for batch in (1, 2, 3):
        feed = {"x": rand(batch, 3, 14, 14)}
        np.testing.assert_array_equal(make_session(folded).run(None, feed)[0], make_session(original).run(None, feed)[0])
    onnx.save(original, tmp_path / "seg.onnx")
    dynamic = compile_model(tmp_path / "seg.onnx", "rzv2h", tmp_path / "dynamic")
    assert dynamic.descriptor["totals"]["layers_on_cpu"] == 0
    assert not any("dynamic batch" in w for w in dynamic.warnings)
