"""Models exported in half precision: the shipped sample converted to float16 by onnxruntime's converter
(weights and interface in fp16, or fp16 inside with float32 interface) loads, widens and compiles."""

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnxruntime.transformers.float16 import convert_float_to_float16

from compiler.cli import main
from compiler.errors import ModelLoadError
from compiler.instrument import relative_error
from compiler.ir import Module
from compiler.runtime import run_model
from passes.widen_float16 import WidenFloat16

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "models" / "mnist_resnet.onnx"
CALIB = ROOT / "models" / "mnist_calib.npz"


@pytest.fixture(scope="module")
def half_models(tmp_path_factory):
    """{'fp16': all float16, 'fp16-io32': float16 inside, float32 inputs and outputs} as files."""
    base = tmp_path_factory.mktemp("half")
    original = onnx.load(str(SAMPLE))
    paths = {}
    for name, keep_io in (("fp16", False), ("fp16-io32", True)):
        paths[name] = base / f"{name}.onnx"
        onnx.save(convert_float_to_float16(original, keep_io_types=keep_io), str(paths[name]))
    return paths


@pytest.fixture(scope="module")
def test_data():
    with np.load(ROOT / "models" / "mnist_test.npz") as z:
        return z["input"][:256], z["labels"][:256]


def test_inspect_names_the_half_precision_form(half_models, capsys):
    for path in half_models.values():
        assert main(["inspect", str(path), "--json"]) == 0
        assert json.loads(capsys.readouterr().out)["form"] == "float16"


def test_out_of_order_nodes_are_sorted_on_load(half_models):
    """The converter appends its input Casts after their readers; onnx's checker rejects that order, so the
    loader sorts the nodes and checks again instead of refusing the model."""
    proto = onnx.load(str(half_models["fp16-io32"]))
    with pytest.raises(onnx.checker.ValidationError, match="topologically sorted"):
        onnx.checker.check_model(proto)
    module = Module.load(half_models["fp16-io32"])
    onnx.checker.check_model(module.to_proto())
    assert len(module.graph.nodes) == len(proto.graph.node)


def test_a_model_broken_in_other_ways_is_still_refused(tmp_path):
    proto = onnx.load(str(SAMPLE))
    proto.graph.node[3].input[0] = "no_such_tensor"
    path = tmp_path / "broken.onnx"
    onnx.save(proto, str(path))
    with pytest.raises(ModelLoadError, match="broken.onnx: rejected by onnx checker"):
        Module.load(path)


@pytest.mark.parametrize("name", ["fp16", "fp16-io32"])
def test_widen_float16_computes_in_float32_behind_the_same_interface(half_models, test_data, name):
    """No half-precision weight or tensor is left inside; inputs and outputs keep their types; the outputs
    equal the half model's within its rounding, and the float32 original's with its weights rounded to
    half precision (what the half model stores) up to float32 rounding, and to the output's half rounding."""
    x, _ = test_data
    module = Module.load(half_models[name])
    interface = [(t.name, np.dtype(t.dtype)) for t in module.graph.inputs + module.graph.outputs]
    assert WidenFloat16().run(module, None) is True
    proto = module.to_proto(infer_shapes=True)
    onnx.checker.check_model(proto, full_check=True)
    assert [(t.name, np.dtype(t.dtype)) for t in module.graph.inputs + module.graph.outputs] == interface
    assert not [t for t in proto.graph.initializer if t.data_type == onnx.TensorProto.FLOAT16]
    body = [v for v in proto.graph.value_info if v.type.tensor_type.elem_type == onnx.TensorProto.FLOAT16]
    assert not body

    feed = {"input": x.astype(interface[0][1])}
    half = run_model(onnx.load(str(half_models[name])), feed)[0].astype(np.float32)
    widened = run_model(proto, feed)[0].astype(np.float32)
    rounded_weights = onnx.load(str(SAMPLE))
    for init in rounded_weights.graph.initializer:
        if init.data_type == onnx.TensorProto.FLOAT:
            values = onnx.numpy_helper.to_array(init).astype(np.float16).astype(np.float32)
            init.CopyFrom(onnx.numpy_helper.from_array(values, init.name))
    single = run_model(rounded_weights, {"input": feed["input"].astype(np.float32)})[0]
    assert relative_error(half, widened) < WidenFloat16.lossless_rtol
    assert relative_error(single, widened) < (1e-5 if name == "fp16-io32" else float(np.finfo(np.float16).eps))
    assert WidenFloat16().run(module, None) is False  # nothing half is left to widen


def test_readme_command_compiles_a_float16_model_like_its_float32_original(half_models, test_data, tmp_path, capsys):
    """The README's command on the all-fp16 sample: the package takes and gives float16 like the model, every
    layer but the two interface Casts is on DRP-AI, it simulates OK, and it answers like the float32
    original's package."""
    x, labels = test_data
    packages = {}
    for name, source in (("fp32", SAMPLE), ("fp16", half_models["fp16"])):
        packages[name] = tmp_path / name
        assert main(["compile", str(source), "--target", "rzv2h", "--prune", "0.7", "--calib", str(CALIB),
                     "--out", str(packages[name])]) == 0
    assert "half-precision model computed in float32" in " ".join(capsys.readouterr().err.split())
    assert main(["simulate", str(packages["fp16"])]) == 0
    assert "package OK" in capsys.readouterr().out
    deploy = json.loads((packages["fp16"] / "deploy.json").read_text())
    cpu = [l["op"] for l in deploy["layers"] if l["engine"] != "drpai"]
    assert cpu == ["Cast", "Cast"]
    model = onnx.load(str(packages["fp16"] / "model.onnx"))
    assert model.graph.input[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    assert model.graph.output[0].type.tensor_type.elem_type == onnx.TensorProto.FLOAT16
    answers = {"fp32": run_model(onnx.load(str(packages["fp32"] / "model.onnx")), {"input": x})[0].argmax(1),
               "fp16": run_model(model, {"input": x.astype(np.float16)})[0].argmax(1)}
    assert np.mean(answers["fp16"] == answers["fp32"]) >= 0.97
    assert np.mean(answers["fp16"] == labels) >= np.mean(answers["fp32"] == labels) - 0.02


def test_bfloat16_weights_behind_casts_become_float32_weights(test_data):
    """Weights stored in bfloat16 and cast to float32 in the graph (a bf16 checkpoint's export): the weights
    become the float32 values of the bf16 ones, and the outputs stay exactly what onnxruntime gives."""
    x, _ = test_data
    proto = onnx.load(str(SAMPLE))
    weights = [t for t in proto.graph.initializer if t.name.endswith("weight")]
    for t in weights:
        values = onnx.numpy_helper.to_array(t)
        proto.graph.initializer.append(onnx.helper.make_tensor(f"{t.name}_bf16", onnx.TensorProto.BFLOAT16,
                                                               values.shape, values.flatten().tolist()))
        proto.graph.node.insert(0, onnx.helper.make_node("Cast", [f"{t.name}_bf16"], [t.name],
                                                         to=onnx.TensorProto.FLOAT, name=f"{t.name}_cast"))
        proto.graph.initializer.remove(t)
    module = Module.from_proto(proto, check=True)
    assert WidenFloat16().run(module, None) is True
    widened = module.to_proto()
    assert {t.data_type for t in widened.graph.initializer} == {onnx.TensorProto.FLOAT}
    assert np.array_equal(run_model(proto, {"input": x})[0], run_model(widened, {"input": x})[0])
    assert len(weights) == 18


def test_a_float16_model_for_an_fp16_target_keeps_no_cast(half_models, test_data, tmp_path, capsys):
    """rzv2l runs fp16: the all-fp16 sample's package has no Cast left (the widened interface and the fp16
    conversion meet and cancel), every layer is on DRP-AI, and it answers like the model itself."""
    x, _ = test_data
    out = tmp_path / "rzv2l"
    assert main(["compile", str(half_models["fp16"]), "--target", "rzv2l", "--calib", str(CALIB),
                 "--out", str(out)]) == 0
    assert main(["simulate", str(out)]) == 0
    assert "package OK" in capsys.readouterr().out
    model = onnx.load(str(out / "model.onnx"))
    assert "Cast" not in {n.op_type for n in model.graph.node}
    deploy = json.loads((out / "deploy.json").read_text())
    assert deploy["totals"]["layers_on_cpu"] == 0
    given = run_model(onnx.load(str(half_models["fp16"])), {"input": x.astype(np.float16)})[0]
    packaged = run_model(model, {"input": x.astype(np.float16)})[0]
    assert np.mean(given.argmax(1) == packaged.argmax(1)) >= 0.99


def test_half_precision_if_bodies_are_widened_with_their_declared_types():
    """An fp16 model whose If branches read an outer tensor and hold an fp16 weight: the bodies' weights and
    declared output types become float32 with the rest, and the model answers like the fp16 one."""
    from onnx import TensorProto, helper

    half = TensorProto.FLOAT16
    rng = np.random.default_rng(0)

    def weight(name):
        return onnx.numpy_helper.from_array(rng.standard_normal((4, 4)).astype(np.float16), name)

    then_g = helper.make_graph([helper.make_node("MatMul", ["h", "wt"], ["o"], name="then_mm")], "then", [],
                               [helper.make_tensor_value_info("o", half, [1, 4])], [weight("wt")])
    else_g = helper.make_graph([helper.make_node("Identity", ["h"], ["o2"], name="else_id")], "else", [],
                               [helper.make_tensor_value_info("o2", half, [1, 4])])
    nodes = [helper.make_node("MatMul", ["x", "k"], ["h"], name="mm"),
             helper.make_node("If", ["cond"], ["y"], name="branch", then_branch=then_g, else_branch=else_g)]
    inputs = [helper.make_tensor_value_info("x", half, [1, 4]),
              helper.make_tensor_value_info("cond", TensorProto.BOOL, [])]
    built = helper.make_model(helper.make_graph(nodes, "g", inputs, [helper.make_tensor_value_info("y", half, [1, 4])],
                                                [weight("k")]), opset_imports=[helper.make_opsetid("", 13)])
    onnx.checker.check_model(built)
    module = Module.from_proto(built)
    assert WidenFloat16().run(module, None) is True
    widened = module.to_proto(infer_shapes=True)
    onnx.checker.check_model(widened, full_check=True)
    branch = next(n for n in widened.graph.node if n.op_type == "If")
    bodies = [a.g for a in branch.attribute]
    assert all(t.data_type == TensorProto.FLOAT for body in bodies for t in body.initializer)
    assert all(o.type.tensor_type.elem_type == TensorProto.FLOAT for body in bodies for o in body.output)
    x = rng.standard_normal((1, 4)).astype(np.float16)
    for cond in (True, False):
        feed = {"x": x, "cond": np.array(cond)}
        want, have = run_model(built, feed)[0], run_model(widened, feed)[0]
        assert have.dtype == np.float16 and relative_error(want, have) < WidenFloat16.lossless_rtol
