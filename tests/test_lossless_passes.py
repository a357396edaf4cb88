"""Each lossless pass keeps outputs equal to onnxruntime's on the original model, and does its job."""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from compiler.context import CompileContext
from compiler.ir import Module
from compiler.passmanager import create_pass
from graphs import conv_bn_model, init, model, outputs_close, rand


def run_pass(proto, name, **options):
    module = Module.from_proto(proto)
    changed = create_pass(name, options).run(module, CompileContext())
    return changed, module.to_proto()


def ops(proto):
    return [n.op_type for n in proto.graph.node]


def test_fuse_conv_bn_removes_bn_and_keeps_outputs():
    original = conv_bn_model()
    changed, fused = run_pass(original, "fuse-conv-bn")
    assert changed
    assert ops(fused) == ["Conv", "Relu", "Conv"]
    outputs_close(original, fused, {"x": rand(1, 3, 16, 16)}, rtol=1e-5)
    assert [o.name for o in fused.graph.output] == ["y"]


def test_fuse_conv_bn_convtranspose_grouped():
    nodes = [helper.make_node("ConvTranspose", ["x", "w"], ["c"], name="deconv", group=2, strides=[2, 2]),
             helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["y"], name="bn")]
    inits = [init("w", rand(4, 3, 3, 3)), init("g", rand(6) + 2), init("b", rand(6)), init("m", rand(6)),
             init("v", np.abs(rand(6)) + 0.5)]
    original = model(nodes, [("x", TensorProto.FLOAT, [1, 4, 5, 5])], [("y", TensorProto.FLOAT, None)], inits)
    changed, fused = run_pass(original, "fuse-conv-bn")
    assert changed and ops(fused) == ["ConvTranspose"]
    outputs_close(original, fused, {"x": rand(1, 4, 5, 5)}, rtol=1e-5)


def test_fuse_conv_bn_leaves_shared_conv_output():
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["y"], name="bn"),
             helper.make_node("Relu", ["c"], ["z"], name="relu")]
    inits = [init("w", rand(2, 3, 1, 1)), init("g", rand(2)), init("b", rand(2)), init("m", rand(2)),
             init("v", np.abs(rand(2)) + 1)]
    original = model(nodes, [("x", TensorProto.FLOAT, [1, 3, 4, 4])],
                     [("y", TensorProto.FLOAT, None), ("z", TensorProto.FLOAT, None)], inits)
    changed, _ = run_pass(original, "fuse-conv-bn")
    assert not changed


def test_fuse_pad_conv():
    nodes = [helper.make_node("Pad", ["x", "pads"], ["p"], name="pad"),
             helper.make_node("Conv", ["p", "w"], ["y"], name="conv", pads=[0, 1, 0, 1])]
    inits = [init("pads", np.array([0, 0, 1, 2, 0, 0, 3, 0], np.int64)), init("w", rand(4, 3, 3, 3))]
    original = model(nodes, [("x", TensorProto.FLOAT, [1, 3, 8, 8])], [("y", TensorProto.FLOAT, None)], inits)
    changed, fused = run_pass(original, "fuse-pad-conv")
    assert changed and ops(fused) == ["Conv"]
    conv = fused.graph.node[0]
    assert [a for a in conv.attribute if a.name == "pads"][0].ints == [1, 3, 3, 1]
    outputs_close(original, fused, {"x": rand(1, 3, 8, 8)}, rtol=0)


@pytest.mark.parametrize("mode,value", [("reflect", 0.0), ("constant", 1.5)])
def test_fuse_pad_conv_refuses_non_zero_padding(mode, value):
    nodes = [helper.make_node("Pad", ["x", "pads", "val"], ["p"], name="pad", mode=mode),
             helper.make_node("Conv", ["p", "w"], ["y"], name="conv")]
    inits = [init("pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64)), init("val", np.array(value, np.float32)),
             init("w", rand(4, 3, 3, 3))]
    original = model(nodes, [("x", TensorProto.FLOAT, [1, 3, 8, 8])], [("y", TensorProto.FLOAT, None)], inits)
    changed, _ = run_pass(original, "fuse-pad-conv")
    assert not changed


def test_fuse_matmul_add_to_gemm():
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"], name="mm"),
             helper.make_node("Add", ["m", "b"], ["y"], name="add")]
    original = model(nodes, [("x", TensorProto.FLOAT, [4, 16])], [("y", TensorProto.FLOAT, [4, 10])],
                     [init("w", rand(16, 10)), init("b", rand(1, 10))])
    changed, fused = run_pass(original, "fuse-matmul-add")
    assert changed and ops(fused) == ["Gemm"]
    assert [o.name for o in fused.graph.output] == ["y"]
    outputs_close(original, fused, {"x": rand(4, 16)}, rtol=1e-6)


def test_a_matrix_matmul_without_bias_becomes_a_gemm():
    """A bias-free Linear (MatMul on a matrix) becomes Gemm(x, W); one whose Add is not a bias stays a Gemm
    followed by that Add. Batched MatMuls stay MatMul."""
    nodes = [helper.make_node("MatMul", ["x", "w"], ["m"], name="mm"),
             helper.make_node("Relu", ["m"], ["r"], name="relu"),
             helper.make_node("MatMul", ["r", "w2"], ["m2"], name="mm2"),
             helper.make_node("Add", ["m2", "x2"], ["y"], name="add"),
             helper.make_node("MatMul", ["x3", "w3"], ["y3"], name="batched")]
    original = model(nodes, [("x", TensorProto.FLOAT, [4, 16]), ("x2", TensorProto.FLOAT, [4, 10]),
                             ("x3", TensorProto.FLOAT, [2, 4, 16])],
                     [("y", TensorProto.FLOAT, [4, 10]), ("y3", TensorProto.FLOAT, [2, 4, 10])],
                     [init("w", rand(16, 8)), init("w2", rand(8, 10)), init("w3", rand(16, 10))])
    original = onnx.shape_inference.infer_shapes(original)
    changed, fused = run_pass(original, "fuse-matmul-add")
    assert changed and sorted(ops(fused)) == ["Add", "Gemm", "Gemm", "MatMul", "Relu"]
    outputs_close(original, fused, {"x": rand(4, 16), "x2": rand(4, 10), "x3": rand(2, 4, 16)}, rtol=1e-6)


def test_fuse_matmul_add_skips_batched_and_activation_matmul():
    nodes = [helper.make_node("MatMul", ["x", "x2"], ["m"], name="mm"),
             helper.make_node("Add", ["m", "b"], ["y"], name="add")]
    original = model(nodes, [("x", TensorProto.FLOAT, [4, 16]), ("x2", TensorProto.FLOAT, [16, 10])],
                     [("y", TensorProto.FLOAT, None)], [init("b", rand(10))])
    assert not run_pass(original, "fuse-matmul-add")[0]


def test_fold_constants_folds_shape_chains_and_constant_nodes():
    shape_const = helper.make_node("Constant", [], ["axes"], name="axes_const",
                                   value=helper.make_tensor("v", TensorProto.INT64, [1], [0]))
    nodes = [shape_const,
             helper.make_node("Shape", ["x"], ["s"], name="shape"),
             helper.make_node("Gather", ["s", "axes"], ["n"], name="gather", axis=0),
             helper.make_node("Concat", ["n", "minus1"], ["target"], name="concat", axis=0),
             helper.make_node("Reshape", ["x", "target"], ["r"], name="reshape"),
             helper.make_node("Add", ["ca", "cb"], ["scale2"], name="const_add"),
             helper.make_node("Mul", ["r", "scale2"], ["y"], name="mul")]
    inits = [init("minus1", np.array([-1], np.int64)), init("ca", np.ones(1, np.float32)),
             init("cb", np.full(1, 2.0, np.float32))]
    original = model(nodes, [("x", TensorProto.FLOAT, [2, 3, 4])], [("y", TensorProto.FLOAT, [2, 12])], inits)
    changed, folded = run_pass(original, "fold-constants")
    assert changed and ops(folded) == ["Reshape", "Mul"]
    outputs_close(original, folded, {"x": rand(2, 3, 4)}, rtol=0)


def test_fold_constants_takes_static_dims_from_the_shape_of_a_dynamic_batch_tensor():
    """Gather/Slice of a Shape that pick dims shape inference knows become constants, and a Reshape target
    built from them and from the batch size of the tensor it reshapes becomes a constant (0: copy that dim),
    so no shape is read at run time; the model still runs at any batch size."""
    nodes = [helper.make_node("Shape", ["x"], ["s"], name="shape"),
             helper.make_node("Gather", ["s", "i0"], ["n"], name="batch", axis=0),
             helper.make_node("Gather", ["s", "i2"], ["w"], name="width", axis=0),
             helper.make_node("Slice", ["s", "one", "three"], ["hw"], name="features"),
             helper.make_node("ReduceProd", ["hw"], ["f"], name="product", keepdims=1),
             helper.make_node("Unsqueeze", ["n", "ax0"], ["n1"], name="n1"),
             helper.make_node("Concat", ["n1", "f"], ["target"], name="target", axis=0),
             helper.make_node("Reshape", ["x", "target"], ["r"], name="reshape"),
             helper.make_node("Cast", ["w"], ["wf"], name="cast", to=TensorProto.FLOAT),
             helper.make_node("Mul", ["r", "wf"], ["y"], name="scale")]
    inits = [init("i0", np.array(0, np.int64)), init("i2", np.array(-1, np.int64)), init("ax0", np.array([0], np.int64)),
             init("one", np.array([1], np.int64)), init("three", np.array([3], np.int64))]
    original = model(nodes, [("x", TensorProto.FLOAT, ["N", 3, 4])], [("y", TensorProto.FLOAT, ["N", 12])], inits)
    changed, folded = run_pass(original, "fold-constants")
    assert changed and ops(folded) == ["Reshape", "Mul"]
    values = {t.name: onnx.numpy_helper.to_array(t) for t in folded.graph.initializer}
    assert values[folded.graph.node[0].input[1]].tolist() == [0, 12]
    for batch in (1, 5):
        outputs_close(original, folded, {"x": rand(batch, 3, 4)}, rtol=0)


def test_fold_constants_infers_a_reshape_entry_the_run_time_computes_from_the_batch():
    """torch's nn.MultiheadAttention on a dynamic batch reshapes to [tokens, batch·heads, head size], computing
    batch·heads at run time: that entry becomes -1 (the only one Reshape must infer) and the target a constant."""
    nodes = [helper.make_node("Shape", ["x"], ["s"], name="shape"),
             helper.make_node("Gather", ["s", "i1"], ["n"], name="batch", axis=0),
             helper.make_node("Mul", ["n", "heads"], ["nh"], name="times_heads"),
             helper.make_node("Unsqueeze", ["nh", "ax0"], ["nh1"], name="nh1"),
             helper.make_node("Concat", ["tokens", "nh1", "size"], ["target"], name="target", axis=0),
             helper.make_node("Reshape", ["x", "target"], ["y"], name="reshape")]
    inits = [init("i1", np.array(1, np.int64)), init("heads", np.array(4, np.int64)), init("ax0", np.array([0], np.int64)),
             init("tokens", np.array([6], np.int64)), init("size", np.array([8], np.int64))]
    original = model(nodes, [("x", TensorProto.FLOAT, [6, "N", 32])], [("y", TensorProto.FLOAT, [6, "M", 8])], inits)
    changed, folded = run_pass(original, "fold-constants")
    assert changed and ops(folded) == ["Reshape"]
    values = {t.name: onnx.numpy_helper.to_array(t) for t in folded.graph.initializer}
    assert values[folded.graph.node[0].input[1]].tolist() == [6, -1, 8]
    for batch in (1, 3):
        outputs_close(original, folded, {"x": rand(6, batch, 32)}, rtol=0)


def test_fold_constants_leaves_the_shipped_vit_no_shape_read_at_run_time():
    """models/mnist_vit.onnx (torch, dynamic batch) reads its sizes through Shape → Gather/Slice at run time: after
    fold-constants it reads none, and the outputs are unchanged at another batch size."""
    from pathlib import Path

    original = onnx.load(str(Path(__file__).resolve().parents[1] / "models" / "mnist_vit.onnx"))
    assert sum(n.op_type == "Shape" for n in original.graph.node) == 9
    changed, folded = run_pass(original, "fold-constants")
    assert changed and not any(n.op_type in ("Shape", "Gather", "Concat") for n in folded.graph.node)
    outputs_close(original, folded, {"input": rand(3, 1, 28, 28)}, rtol=1e-6)


def test_fold_constants_never_folds_qdq_and_respects_size_guard():
    nodes = [helper.make_node("DequantizeLinear", ["wq", "ws"], ["w"], name="dq"),
             helper.make_node("ConstantOfShape", ["big_shape"], ["big"], name="cos",
                              value=helper.make_tensor("v", TensorProto.FLOAT, [1], [1.0])),
             helper.make_node("ReduceSum", ["big"], ["total"], name="sum", keepdims=0),
             helper.make_node("Mul", ["x", "w"], ["m"], name="mul"),
             helper.make_node("Add", ["m", "total"], ["y"], name="add")]
    inits = [init("wq", np.array([3, -7], np.int8)), init("ws", np.array(0.5, np.float32)),
             init("big_shape", np.array([1024, 1024], np.int64))]
    original = model(nodes, [("x", TensorProto.FLOAT, [2])], [("y", TensorProto.FLOAT, None)], inits)
    changed, folded = run_pass(original, "fold-constants", max_bytes=1024)
    assert "DequantizeLinear" in ops(folded)
    # the 4 MiB ConstantOfShape result is not materialised, but the scalar sum it feeds is folded
    assert "ConstantOfShape" not in ops(folded) and "ReduceSum" not in ops(folded)
    assert all(np.prod(t.dims) < 1024 for t in folded.graph.initializer)
    outputs_close(original, folded, {"x": rand(2)}, rtol=0)


def test_eliminate_identity_keeps_output_names():
    nodes = [helper.make_node("Relu", ["x"], ["r"], name="relu"),
             helper.make_node("Identity", ["r"], ["i"], name="id"),
             helper.make_node("Dropout", ["i"], ["d"], name="drop"),
             helper.make_node("Cast", ["d"], ["y"], name="cast", to=TensorProto.FLOAT)]
    original = model(nodes, [("x", TensorProto.FLOAT, [3, 4])], [("y", TensorProto.FLOAT, [3, 4])])
    changed, cleaned = run_pass(original, "eliminate-identity")
    assert changed and ops(cleaned) == ["Relu"]
    assert [o.name for o in cleaned.graph.output] == ["y"]
    outputs_close(original, cleaned, {"x": rand(3, 4)}, rtol=0)


def test_eliminate_identity_removes_broadcasts_and_reshapes_that_keep_a_dynamic_batch():
    """jax2tf's written-out LayerNorm on a dynamic batch: the mean is reshaped to [-1, 1] (the batch left to -1)
    and expanded to [1, 1], which broadcasts nothing; a Reshape to [0, 8] copies the batch and restates the rest.
    Those two go; an Expand that does broadcast and Reshapes that change the rank stay. The outputs are the same at batches 1 to 3."""
    nodes = [helper.make_node("ReduceMean", ["x"], ["mean"], name="mean", axes=[1], keepdims=0),
             helper.make_node("Reshape", ["mean", "col"], ["m"], name="as_column"),
             helper.make_node("Expand", ["m", "one_one"], ["me"], name="broadcast_nothing"),
             helper.make_node("Sub", ["x", "me"], ["c"], name="center"),
             helper.make_node("Reshape", ["c", "copy_batch"], ["c2"], name="restate"),
             helper.make_node("Expand", ["m", "one_eight"], ["wide"], name="broadcast_columns"),
             helper.make_node("Reshape", ["c2", "pairs"], ["p"], name="regroup"),
             helper.make_node("Reshape", ["p", "batch_of_two"], ["q"], name="fixed_batch"),
             helper.make_node("Add", ["wide", "q"], ["y"], name="add")]
    inits = [init("col", np.array([-1, 1], np.int64)), init("one_one", np.array([1, 1], np.int64)),
             init("copy_batch", np.array([0, 8], np.int64)), init("one_eight", np.array([1, 8], np.int64)),
             init("pairs", np.array([-1, 4, 2], np.int64)), init("batch_of_two", np.array([-1, 8], np.int64))]
    original = model(nodes, [("x", TensorProto.FLOAT, ["N", 8])], [("y", TensorProto.FLOAT, None)], inits)
    changed, cleaned = run_pass(original, "eliminate-identity")
    names = [n.name for n in cleaned.graph.node]
    assert changed and not {"broadcast_nothing", "restate"} & set(names)
    assert {"as_column", "broadcast_columns", "regroup", "fixed_batch"} <= set(names)
    for batch in (1, 2, 3):
        outputs_close(original, cleaned, {"x": rand(batch, 8)}, rtol=0)


def test_eliminate_identity_keeps_reversing_slice():
    nodes = [helper.make_node("Slice", ["x", "starts", "ends", "axes", "steps"], ["y"], name="rev")]
    inits = [init("starts", np.array([-1], np.int64)), init("ends", np.array([-10], np.int64)),
             init("axes", np.array([0], np.int64)), init("steps", np.array([-1], np.int64))]
    original = model(nodes, [("x", TensorProto.FLOAT, [4])], [("y", TensorProto.FLOAT, [4])], inits)
    assert not run_pass(original, "eliminate-identity")[0]


def test_eliminate_dead_code_keeps_interface():
    nodes = [helper.make_node("Relu", ["x"], ["y"], name="relu"),
             helper.make_node("Sigmoid", ["x"], ["unused"], name="dead")]
    original = model(nodes, [("x", TensorProto.FLOAT, [3]), ("extra", TensorProto.FLOAT, [1])],
                     [("y", TensorProto.FLOAT, [3])], [init("orphan", rand(5))])
    changed, cleaned = run_pass(original, "eliminate-dead-code")
    assert changed and ops(cleaned) == ["Relu"]
    assert [i.name for i in cleaned.graph.input] == ["x", "extra"]
    assert not cleaned.graph.initializer


def test_upgrade_opset_from_8():
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("Reshape", ["c", "shape"], ["y"], name="reshape")]
    original = model(nodes, [("x", TensorProto.FLOAT, [1, 2, 4, 4])], [("y", TensorProto.FLOAT, None)],
                     [init("w", rand(3, 2, 1, 1)), init("shape", np.array([1, -1], np.int64))], opset=8)
    changed, upgraded = run_pass(original, "upgrade-opset", min=13)
    assert changed
    assert {o.domain: o.version for o in upgraded.opset_import}[""] == 13
    onnx.checker.check_model(upgraded)
    outputs_close(original, upgraded, {"x": rand(1, 2, 4, 4)}, rtol=0)


@pytest.mark.parametrize("order", ["mul_then_div", "div_then_mul", "mul_by_sixth"])
def test_fuse_hardswish(order):
    nodes = [helper.make_node("Add", ["x", "three"], ["a"], name="add3"),
             helper.make_node("Clip", ["a", "zero", "six"], ["c"], name="relu6")]
    if order == "mul_then_div":
        nodes += [helper.make_node("Mul", ["x", "c"], ["m"], name="mul"), helper.make_node("Div", ["m", "six"], ["y"], name="div")]
    elif order == "div_then_mul":
        nodes += [helper.make_node("Div", ["c", "six"], ["d"], name="div"), helper.make_node("Mul", ["d", "x"], ["y"], name="mul")]
    else:
        nodes += [helper.make_node("Mul", ["c", "x"], ["m"], name="mul"), helper.make_node("Mul", ["m", "sixth"], ["y"], name="scale")]
    inits = [init("three", np.array(3.0, np.float32)), init("zero", np.array(0.0, np.float32)),
             init("six", np.array(6.0, np.float32)), init("sixth", np.array(1 / 6, np.float32))]
    original = model(nodes, [("x", TensorProto.FLOAT, [2, 8])], [("y", TensorProto.FLOAT, [2, 8])], inits, opset=14)
    changed, fused = run_pass(original, "fuse-hardswish")
    assert changed and ops(fused) == ["HardSwish"]
    outputs_close(original, fused, {"x": rand(2, 8, scale=4.0)}, rtol=1e-6)


def test_fuse_hardswish_needs_exact_constants():
    nodes = [helper.make_node("Add", ["x", "three"], ["a"], name="add3"),
             helper.make_node("Clip", ["a", "zero", "six"], ["c"], name="relu6"),
             helper.make_node("Mul", ["x", "c"], ["m"], name="mul"), helper.make_node("Div", ["m", "five"], ["y"], name="div")]
    inits = [init("three", np.array(3.0, np.float32)), init("zero", np.array(0.0, np.float32)),
             init("six", np.array(6.0, np.float32)), init("five", np.array(5.0, np.float32))]
    original = model(nodes, [("x", TensorProto.FLOAT, [2, 8])], [("y", TensorProto.FLOAT, [2, 8])], inits, opset=14)
    assert not run_pass(original, "fuse-hardswish")[0]


@pytest.mark.parametrize("opset,axes,keepdims", [(18, [-1, -2], 1), (13, [2, 3], 0), (18, [3, 2], 0)])
def test_reduce_mean_to_pool(opset, axes, keepdims):
    if opset >= 18:
        node = helper.make_node("ReduceMean", ["x", "axes"], ["y"], name="mean", keepdims=keepdims)
        inits = [init("axes", np.array(axes, np.int64))]
    else:
        node = helper.make_node("ReduceMean", ["x"], ["y"], name="mean", axes=axes, keepdims=keepdims)
        inits = []
    original = model([node], [("x", TensorProto.FLOAT, [2, 5, 7, 6])], [("y", TensorProto.FLOAT, None)], inits,
                     opset=opset)
    changed, pooled = run_pass(original, "reduce-mean-to-pool")
    assert changed and ops(pooled) == ["GlobalAveragePool"] + ([] if keepdims else ["Flatten"])
    assert [o.name for o in pooled.graph.output] == ["y"]
    onnx.checker.check_model(pooled)
    outputs_close(original, pooled, {"x": rand(2, 5, 7, 6)}, rtol=1e-5)


@pytest.mark.parametrize("axes", [[1], [3], [1, 2, 3], [0, 2, 3], [2, 2, 3]])
def test_reduce_mean_to_pool_leaves_other_means(axes):
    node = helper.make_node("ReduceMean", ["x"], ["y"], name="mean", axes=axes)
    original = model([node], [("x", TensorProto.FLOAT, [2, 5, 7, 6])], [("y", TensorProto.FLOAT, None)], opset=13)
    assert not run_pass(original, "reduce-mean-to-pool")[0]


@pytest.mark.parametrize("bias_shape", [(1, 4, 1, 1), (4, 1, 1), ()])
def test_fuse_conv_add(bias_shape):
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("Add", ["c", "b"], ["y"], name="bias_add")]
    original = model(nodes, [("x", TensorProto.FLOAT, [1, 3, 6, 6])], [("y", TensorProto.FLOAT, [1, 4, 6, 6])],
                     [init("w", rand(4, 3, 1, 1)), init("b", rand(*bias_shape) if bias_shape else np.float32(0.7))])
    changed, fused = run_pass(original, "fuse-conv-add")
    assert changed and ops(fused) == ["Conv"]
    outputs_close(original, fused, {"x": rand(1, 3, 6, 6)}, rtol=1e-6)


def test_fuse_conv_add_refuses_spatial_broadcast():
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv"),
             helper.make_node("Add", ["c", "b"], ["y"], name="add")]
    original = model(nodes, [("x", TensorProto.FLOAT, [1, 3, 6, 6])], [("y", TensorProto.FLOAT, [1, 4, 6, 6])],
                     [init("w", rand(4, 3, 1, 1)), init("b", rand(6))])
    assert not run_pass(original, "fuse-conv-add")[0]


def test_equalize_layers_keeps_outputs_and_evens_out_channel_ranges():
    """pointwise → Relu → depthwise → MaxPool → pointwise with one channel 50x larger: after equalization
    the outputs are unchanged and each pair's per-channel ranges match."""
    w1, w2, w3 = rand(6, 3, 1, 1), rand(6, 1, 3, 3), rand(4, 6, 1, 1)
    w1[2] *= 50
    nodes = [helper.make_node("Conv", ["x", "w1", "b1"], ["c1"], name="pw1"), helper.make_node("Relu", ["c1"], ["r1"]),
             helper.make_node("Conv", ["r1", "w2", "b2"], ["c2"], name="dw", group=6, pads=[1, 1, 1, 1]),
             helper.make_node("MaxPool", ["c2"], ["p"], kernel_shape=[2, 2], strides=[2, 2]),
             helper.make_node("Conv", ["p", "w3"], ["y"], name="pw2")]
    inits = [init("w1", w1), init("b1", rand(6)), init("w2", w2), init("b2", rand(6)), init("w3", w3)]
    original = model(nodes, [("x", TensorProto.FLOAT, [1, 3, 8, 8])], [("y", TensorProto.FLOAT, None)], inits)
    changed, eq = run_pass(original, "equalize-layers", iterations=20)
    assert changed
    outputs_close(original, eq, {"x": rand(1, 3, 8, 8)}, rtol=1e-5)
    weights = {n.name: onnx.numpy_helper.to_array(next(t for t in eq.graph.initializer if t.name == n.input[1]))
               for n in eq.graph.node if n.op_type == "Conv"}
    r_pw1 = np.abs(weights["pw1"]).reshape(6, -1).max(1)
    r_dw = np.abs(weights["dw"]).reshape(6, -1).max(1)
    r_pw2 = np.abs(weights["pw2"]).max(axis=(0, 2, 3))
    np.testing.assert_allclose(r_pw1, r_dw, rtol=0.05)
    np.testing.assert_allclose(r_dw, r_pw2, rtol=0.05)
    assert r_pw1.max() / r_pw1.min() < np.abs(w1).reshape(6, -1).max(1).max() / np.abs(w1).reshape(6, -1).max(1).min()


def test_equalize_layers_leaves_clipped_activations_alone():
    nodes = [helper.make_node("Conv", ["x", "w1"], ["c1"], name="a"), helper.make_node("Clip", ["c1", "lo", "hi"], ["r"]),
             helper.make_node("Conv", ["r", "w2"], ["y"], name="b")]
    inits = [init("w1", rand(4, 3, 1, 1)), init("w2", rand(2, 4, 1, 1)), init("lo", np.float32(0)), init("hi", np.float32(6))]
    original = model(nodes, [("x", TensorProto.FLOAT, [1, 3, 4, 4])], [("y", TensorProto.FLOAT, None)], inits)
    changed, _ = run_pass(original, "equalize-layers")
    assert not changed


def se_block_model(c=10):
    """expand (c ch) → HardSwish → depthwise 5x5 → PRelu → ·per-channel constant → SE gate → project."""
    nodes = [helper.make_node("Conv", ["x", "we", "be"], ["e"], name="expand"), helper.make_node("HardSwish", ["e"], ["h"]),
             helper.make_node("Conv", ["h", "wd", "bd"], ["d0"], name="dw", group=c, pads=[2, 2, 2, 2]),
             helper.make_node("PRelu", ["d0", "slope"], ["d"]),
             helper.make_node("Mul", ["d", "k"], ["dk"]),
             helper.make_node("GlobalAveragePool", ["dk"], ["g"]), helper.make_node("Conv", ["g", "wr", "br"], ["r"], name="se_r"),
             helper.make_node("Relu", ["r"], ["rr"]), helper.make_node("Conv", ["rr", "wx", "bx"], ["s"], name="se_x"),
             helper.make_node("HardSigmoid", ["s"], ["gate"]), helper.make_node("Mul", ["dk", "gate"], ["m"]),
             helper.make_node("Conv", ["m", "wp", "bp"], ["y"], name="project")]
    inits = [init("we", rand(c, 3, 1, 1)), init("be", rand(c)), init("wd", rand(c, 1, 5, 5)), init("bd", rand(c)),
             init("k", rand(c, 1, 1)), init("slope", rand(1, c, 1, 1)), init("wr", rand(4, c, 1, 1)), init("br", rand(4)), init("wx", rand(c, 4, 1, 1)),
             init("bx", rand(c)), init("wp", rand(6, c, 1, 1)), init("bp", rand(6))]
    return model(nodes, [("x", TensorProto.FLOAT, [1, 3, 8, 8])], [("y", TensorProto.FLOAT, None)], inits, opset=14)


def test_align_channels_pads_depthwise_blocks_with_zero_channels():
    """After padding to 16 channels the outputs are unchanged; a space without a depthwise conv is left alone."""
    original = se_block_model()
    changed, aligned = run_pass(original, "align-channels")
    assert changed
    outputs_close(original, aligned, {"x": rand(1, 3, 8, 8)}, rtol=1e-5)
    shapes = {n.name: [d for d in next(t for t in aligned.graph.initializer if t.name == n.input[1]).dims]
              for n in aligned.graph.node if n.op_type == "Conv"}
    assert shapes["expand"][0] == shapes["dw"][0] == shapes["se_x"][0] == 16
    assert shapes["se_r"][1] == shapes["project"][1] == 16
    assert shapes["se_r"][0] == 4 and shapes["project"][0] == 6  # no depthwise conv reads them
    dw = next(n for n in aligned.graph.node if n.name == "dw")
    assert next(a.i for a in dw.attribute if a.name == "group") == 16


def test_align_channels_pads_a_depthwise_block_read_as_tokens():
    """expand → depthwise → Transpose → Reshape [1, H·W, C] → Linear (MatMul + Add): padding the depthwise
    space to 16 also widens the Reshape's channel count and the Linear's weight rows (found by the fuzzer)."""
    c = 5
    nodes = [helper.make_node("Conv", ["x", "we", "be"], ["e"], name="expand"),
             helper.make_node("Conv", ["e", "wd", "bd"], ["d"], name="dw", group=c, pads=[1, 1, 1, 1]),
             helper.make_node("Transpose", ["d"], ["t"], perm=[0, 2, 3, 1]),
             helper.make_node("Reshape", ["t", "tokens"], ["r"]),
             helper.make_node("MatMul", ["r", "wl"], ["m"], name="linear"), helper.make_node("Add", ["m", "bl"], ["y"])]
    inits = [init("we", rand(c, 3, 1, 1)), init("be", rand(c)), init("wd", rand(c, 1, 3, 3)), init("bd", rand(c)),
             init("tokens", np.array([1, 16, c])), init("wl", rand(c, 6)), init("bl", rand(6))]
    original = model(nodes, [("x", TensorProto.FLOAT, [1, 3, 4, 4])], [("y", TensorProto.FLOAT, None)], inits, opset=14)
    changed, aligned = run_pass(original, "align-channels")
    assert changed
    outputs_close(original, aligned, {"x": rand(1, 3, 4, 4)}, rtol=1e-5)
    weights = {t.name: list(t.dims) for t in aligned.graph.initializer}
    linear = next(n for n in aligned.graph.node if n.name == "linear")
    assert weights[linear.input[1]] == [16, 6]


def test_align_channels_leaves_a_depthwise_block_a_layernorm_normalizes():
    """The depthwise block of test_align_channels_pads_a_depthwise_block_read_as_tokens, with a LayerNorm over
    the tokens' features before the Linear: zero channels would change its mean and variance, so the space
    stays at 5 channels and the outputs are unchanged."""
    c = 5
    nodes = [helper.make_node("Conv", ["x", "we", "be"], ["e"], name="expand"),
             helper.make_node("Conv", ["e", "wd", "bd"], ["d"], name="dw", group=c, pads=[1, 1, 1, 1]),
             helper.make_node("Transpose", ["d"], ["t"], perm=[0, 2, 3, 1]),
             helper.make_node("LayerNormalization", ["t", "g", "b"], ["n"], axis=-1),
             helper.make_node("MatMul", ["n", "wl"], ["m"], name="linear"), helper.make_node("Add", ["m", "bl"], ["y"])]
    inits = [init("we", rand(c, 3, 1, 1)), init("be", rand(c)), init("wd", rand(c, 1, 3, 3)), init("bd", rand(c)),
             init("g", rand(c)), init("b", rand(c)), init("wl", rand(c, 6)), init("bl", rand(6))]
    original = model(nodes, [("x", TensorProto.FLOAT, [1, 3, 4, 4])], [("y", TensorProto.FLOAT, None)], inits, opset=17)
    changed, aligned = run_pass(original, "align-channels")
    assert not changed
    outputs_close(original, aligned, {"x": rand(1, 3, 4, 4)}, rtol=1e-5)


def test_lossless_check_after_a_lossy_pass_compares_with_that_pass_output(tmp_path):
    """prune changes outputs; align-channels after it is held to the pruned model, not to the original."""
    from compiler.api import compile_model

    src = tmp_path / "se.onnx"
    onnx.save(se_block_model(), src)
    np.savez(tmp_path / "calib.npz", x=rand(8, 3, 8, 8))
    result = compile_model(src, "rzv2h", tmp_path / "pkg", calib=tmp_path / "calib.npz", verify=True,
                           pipeline="prune{ratio=0.5,mode=sparse,first_layer=true},align-channels")
    assert result is not None


def rep_block(kernels, group=1, channels=8, strides=(1, 1), dilation=1, identity="bn", pads=None, start_at_zero=False):
    """Summed branches over one x[1,C,12,12], as re-parameterizable models export in training form: a Conv per
    kernel (each padded to keep the size unless `pads` says otherwise), an identity branch ("bn", "x" or none)
    and, with `start_at_zero`, a first Add of the constant 0 (timm's MobileOne sums from 0)."""
    c = channels
    nodes, inits, terms = [], [], []
    for i, (kh, kw) in enumerate(kernels):
        p = pads[i] if pads else [dilation * (kh // 2), dilation * (kw // 2)] * 2
        inits += [init(f"w{i}", rand(c, c // group, kh, kw)), init(f"b{i}", rand(c))]
        nodes.append(helper.make_node("Conv", ["x", f"w{i}", f"b{i}"], [f"c{i}"], name=f"conv{i}", group=group,
                                      pads=p, strides=list(strides), dilations=[dilation, dilation]))
        terms.append(f"c{i}")
    if identity == "bn":
        inits += [init("g", rand(c) + 2), init("be", rand(c)), init("m", rand(c)), init("v", np.abs(rand(c)) + 0.5)]
        nodes.append(helper.make_node("BatchNormalization", ["x", "g", "be", "m", "v"], ["n"], name="bn"))
        terms.append("n")
    elif identity == "x":
        terms.append("x")
    if start_at_zero:
        inits.append(init("zero", np.zeros((), np.float32)))
        nodes.append(helper.make_node("Add", [terms[0], "zero"], ["s0"], name="add_zero"))
        terms[0] = "s0"
    total = terms[0]
    for k, t in enumerate(terms[1:]):
        nodes.append(helper.make_node("Add", [total, t], [f"s{k + 1}"], name=f"add{k}"))
        total = f"s{k + 1}"
    nodes.append(helper.make_node("Relu", [total], ["y"], name="relu"))
    return model(nodes, [("x", TensorProto.FLOAT, [1, c, 12, 12])], [("y", TensorProto.FLOAT, None)], inits)


@pytest.mark.parametrize("case", [
    dict(kernels=[(3, 3), (1, 1)], identity="bn"),                          # RepVGG
    dict(kernels=[(1, 1), (3, 3), (3, 3), (3, 3)], group=8, identity="bn", start_at_zero=True),  # MobileOne dw
    dict(kernels=[(3, 3), (1, 3), (3, 1)], identity="x"),                   # ACNet-style asymmetric kernels
    dict(kernels=[(5, 5), (3, 3)], group=2, dilation=2, identity="x"),      # dilated, grouped
    dict(kernels=[(3, 3), (1, 1)], strides=(2, 2), identity=None),          # strided, no identity
    dict(kernels=[(3, 3)], identity="x", pads=[[2, 2, 0, 0]]),              # identity at a corner tap
])
def test_merge_parallel_convs_leaves_one_conv_with_the_same_outputs(case):
    original = rep_block(**case)
    proto = onnx.shape_inference.infer_shapes(original)
    module = Module.from_proto(proto)
    ctx = CompileContext()
    for name in ("fuse-conv-add", "merge-parallel-convs", "fuse-conv-add"):
        create_pass(name, {}).run(module, ctx)
    merged = module.to_proto()
    assert ops(merged) == ["Conv", "Relu"]
    assert merged.graph.node[0].name == ("conv0" if case["kernels"][0] != (1, 1) else "conv1")
    outputs_close(original, merged, {"x": rand(1, 8, 12, 12)}, rtol=1e-5)


@pytest.mark.parametrize("case", [
    dict(kernels=[(3, 3), (3, 3)], identity=None, pads=[[1, 1, 1, 1], [2, 2, 0, 0]]),  # same size, offset window
])
def test_merge_parallel_convs_leaves_branches_that_do_not_line_up(case):
    original = onnx.shape_inference.infer_shapes(rep_block(**case))
    changed, after = run_pass(original, "merge-parallel-convs")
    assert not changed and ops(after) == ops(original)
