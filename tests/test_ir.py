"""The IR keeps what ONNX keeps (opset, metadata, names), saves valid models and prints deterministically."""

from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from compiler.activations import CheckpointedStream, downstream, producing, stream_activations, with_outputs
from compiler.api import input_specs
from compiler.calib_data import load_calibration
from compiler.errors import ModelLoadError
from compiler.ir import Module
from compiler.runtime import run_model
from graphs import conv_bn_model, model, outputs_close, rand


def test_round_trip_keeps_opset_metadata_and_names(tmp_path):
    proto = conv_bn_model()
    proto.producer_name = "unit-test"
    proto.metadata_props.add(key="author", value="drpc tests")
    proto.opset_import.append(helper.make_opsetid("com.example", 2))
    src = tmp_path / "m.onnx"
    onnx.save(proto, src)
    module = Module.load(src)
    assert module.opset == 13 and module.opset_imports["com.example"] == 2
    module.save(tmp_path / "out.onnx")
    back = onnx.load(str(tmp_path / "out.onnx"))
    onnx.checker.check_model(back)
    assert back.producer_name == "unit-test"
    assert {p.key: p.value for p in back.metadata_props} == {"author": "drpc tests"}
    assert [n.name for n in back.graph.node] == [n.name for n in proto.graph.node]
    outputs_close(proto, back, {"x": rand(1, 3, 16, 16)}, rtol=0)


def test_unnamed_nodes_get_unique_names():
    nodes = [helper.make_node("Relu", ["x"], ["a"]), helper.make_node("Relu", ["a"], ["b"], name="r"),
             helper.make_node("Neg", ["b"], ["y"], name="r")]
    module = Module.from_proto(model(nodes, [("x", TensorProto.FLOAT, [2])], [("y", TensorProto.FLOAT, [2])]))
    names = [n.name for n in module.graph.nodes]
    assert len(set(names)) == 3 and all(names)


def test_external_data_is_loaded_and_escape_refused(tmp_path):
    proto = conv_bn_model()
    path = tmp_path / "ext.onnx"
    onnx.save(proto, path, save_as_external_data=True, all_tensors_to_one_file=True, location="w.bin",
              size_threshold=0)
    module = Module.load(path)
    assert module.graph.nodes[0].inputs[1].values.shape == (8, 3, 3, 3)
    evil = onnx.load(str(path), load_external_data=False)
    for t in evil.graph.initializer:
        for e in t.external_data:
            if e.key == "location":
                e.value = "../../etc/passwd"
    onnx.save(evil, tmp_path / "evil.onnx")
    with pytest.raises(ModelLoadError, match="outside the model's folder"):
        Module.load(tmp_path / "evil.onnx")


def test_text_form_is_deterministic(tmp_path):
    proto = conv_bn_model()
    onnx.save(proto, tmp_path / "m.onnx")
    a, b = Module.load(tmp_path / "m.onnx").text(), Module.load(tmp_path / "m.onnx").text()
    assert a == b
    assert "= Conv(%x, %w1:const float32[8x3x3x3], %b1:const float32[8]) pads=[1,1,1,1]  # conv1" in a


def test_infer_shapes_fills_intermediate_shapes():
    module = Module.from_proto(conv_bn_model())
    module.infer_shapes()
    relu = next(n for n in module.graph.nodes if n.op == "Relu")
    assert list(relu.outputs[0].shape) == [1, 8, 16, 16]
    assert np.dtype(relu.outputs[0].dtype) == np.float32


def test_producing_keeps_only_the_needed_nodes_and_their_values():
    """The model stream_activations runs for an intermediate tensor: fewer nodes, the same values as the
    whole model in onnxruntime (sample ResNet, its third node's output and a later one together)."""
    proto = onnx.load(str(Path(__file__).resolve().parents[1] / "models" / "mnist_resnet.onnx"))
    names = [proto.graph.node[2].output[0], proto.graph.node[6].output[0]]
    small = producing(proto, names)
    assert len(small.graph.node) <= 7 < len(proto.graph.node)
    assert [o.name for o in small.graph.output] == names
    x = {"input": rand(4, 1, 28, 28)}
    for a, b in zip(run_model(small, x), run_model(with_outputs(proto, names), x)[-2:]):
        np.testing.assert_array_equal(a, b)


def test_downstream_part_reproduces_the_outputs_from_its_entry_tensors():
    """The part the sensitivity measurement runs for a layer inside a residual block (sample ResNet): it starts
    at that layer, takes the block's skip tensor as an entry too, and fed the whole model's values of its
    entries gives the whole model's outputs in onnxruntime."""
    proto = onnx.shape_inference.infer_shapes(
        onnx.load(str(Path(__file__).resolve().parents[1] / "models" / "mnist_resnet.onnx")))
    node = next(n for n in proto.graph.node if n.name == "/res1/b/b.0/Conv")
    part, cut = downstream(proto, node.name)
    assert set(cut) == {node.input[0], "/Relu_output_0"}
    assert part.graph.node[0].name == node.name and len(part.graph.node) < len(proto.graph.node)
    x = {"input": rand(4, 1, 28, 28)}
    entries = dict(zip(cut, run_model(producing(proto, cut), x)))
    np.testing.assert_allclose(run_model(part, entries)[0], run_model(proto, x)[0], rtol=1e-5, atol=1e-5)


def test_downstream_part_keeps_only_the_outputs_it_influences_and_refuses_subgraphs():
    """A layer feeding one of two outputs: its part computes only that output (the other is unchanged by it);
    an If node downstream makes it refuse, since its body's outer-scope reads are not listed as inputs."""
    relu = helper.make_node("Relu", ["x"], ["a"], name="left")
    neg = helper.make_node("Neg", ["x"], ["b"], name="right")
    proto = model([relu, neg], [("x", TensorProto.FLOAT, [2])], [("a", TensorProto.FLOAT, [2]),
                                                                 ("b", TensorProto.FLOAT, [2])])
    part, cut = downstream(proto, "left")
    assert [o.name for o in part.graph.output] == ["a"] and cut == [] and [i.name for i in part.graph.input] == ["x"]
    branch = helper.make_graph([helper.make_node("Identity", ["a"], ["c"])], "g", [],
                               [helper.make_tensor_value_info("c", TensorProto.FLOAT, [2])])
    cond = helper.make_node("If", ["flag"], ["c"], name="if", then_branch=branch, else_branch=branch)
    nested = model([relu, cond], [("x", TensorProto.FLOAT, [2]), ("flag", TensorProto.BOOL, [])],
                   [("c", TensorProto.FLOAT, [2])])
    assert downstream(nested, "left") is None


class CountingCalib:
    """A calibration set that counts how often its batches are read."""

    def __init__(self, calib):
        self.calib, self.reads = calib, 0

    def __getattr__(self, name):
        return getattr(self.calib, name)

    def batches(self, batch_size=16):
        self.reads += 1
        return self.calib.batches(batch_size)


@pytest.mark.parametrize("budget", [64 << 20, 0])
def test_checkpointed_stream_gives_the_whole_models_values_from_its_checkpoints(budget):
    """Walking the sample ResNet's convs in order (as the sequential refit does), each conv's input and output
    streamed from the latest checkpoint equal the values of a whole-model run, batch by batch; once the
    checkpoint has moved past the first conv, the model input is not read again; with no budget it never moves."""
    root = Path(__file__).resolve().parents[1]
    module = Module.load(root / "models" / "mnist_resnet.onnx")
    module.infer_shapes()
    proto = module.to_proto()
    calib = load_calibration(root / "models" / "mnist_calib.npz", input_specs(module), max_samples=40)
    counted = CountingCalib(calib)
    walk, moved = CheckpointedStream(counted, batch_size=8, budget=budget), []
    for node in [n for n in proto.graph.node if n.op_type == "Conv"]:
        reads = counted.reads
        names = [node.input[0], node.output[0]]
        for got, want in zip(walk.stream(proto, names), stream_activations(proto, names, calib, 8), strict=True):
            for name in names:
                np.testing.assert_allclose(got[name], want[name], rtol=1e-5, atol=1e-5)
        assert counted.reads == reads + (0 if walk.names else 1)
        moved.append(walk.advance(proto, node.name))
    assert all(moved) if budget else not any(moved)
