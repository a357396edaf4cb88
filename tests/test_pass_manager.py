"""Pass registry, pipeline text, nesting, instrumentation (dumps, verification, numeric checks), failures."""

import numpy as np
import onnx
import pytest

from compiler.context import CompileContext
from compiler.errors import PassError, UsageError
from compiler.instrument import DumpIR, LosslessCheck, Recorder, Verifier
from compiler.ir import Module
from compiler.passmanager import Option, Pass, PassInstrumentation, PassManager, register_pass
from compiler.pipeline import parse_pipeline
from graphs import conv_bn_model, rand


@register_pass
class _Explode(Pass):
    """Test pass that always fails with a user error."""

    name = "test-explode"

    def run(self, module, ctx):
        from compiler.errors import UnsupportedModelError
        raise UnsupportedModelError("node 'conv1' is not supported")


@register_pass
class _Scale(Pass):
    """Test pass that claims to be lossless but scales the first Conv weight."""

    name = "test-scale-weights"
    lossless = True
    OPTIONS = {"factor": Option(float, 2.0, "scale factor")}

    def run(self, module, ctx):
        import onnx_graphsurgeon as gs
        conv = next(n for n in module.graph.nodes if n.op == "Conv")
        conv.inputs[1] = gs.Constant("scaled_w", conv.inputs[1].values * self.factor)
        return True


@register_pass
class _Round(_Scale):
    """Test pass that changes the arithmetic precision a little and declares the rounding it may show."""

    name = "test-round-weights"
    lossless_rtol = 1e-2


@pytest.mark.parametrize("text", [
    "fold-constants",
    "fold-constants{max_bytes=100},fuse-conv-bn",
    "upgrade-opset{min=13},pipeline(eliminate-identity,pipeline(eliminate-dead-code)),fuse-pad-conv",
    "test-scale-weights{factor=0.5}",
])
def test_pipeline_text_round_trips(text):
    assert parse_pipeline(text).text() == text
    assert parse_pipeline(parse_pipeline(text).text()).text() == text


def test_pipeline_tolerates_spaces():
    assert parse_pipeline(" fold-constants , fuse-conv-bn { } ").text() == "fold-constants,fuse-conv-bn"


@pytest.mark.parametrize("text,message", [
    ("no-such-pass", "unknown pass 'no-such-pass'"),
    ("fold-constants{bogus=1}", "has no option bogus"),
    ("fold-constants{max_bytes=lots}", "max_bytes='lots' is not a int"),
    ("fold-constants{max_bytes=-5}", "outside"),
    ("fold-constants{max_bytes}", "key=value"),
    ("pipeline(fold-constants", "missing ')'"),
    ("", "empty pipeline"),
    ("fold-constants,,", "expected a pass name"),
])
def test_bad_pipeline_text_is_a_usage_error(text, message):
    with pytest.raises(UsageError, match=message.replace("(", r"\(").replace(")", r"\)")):
        parse_pipeline(text)


class Trace(PassInstrumentation):
    def __init__(self):
        self.events = []

    def before_pass(self, p, module, ctx):
        self.events.append(("before", p.name))

    def after_pass(self, p, module, ctx, changed, seconds):
        self.events.append(("after", p.name, changed))


def test_pass_manager_is_a_pass_that_nests():
    inner = parse_pipeline("fuse-conv-bn,eliminate-dead-code")
    outer = PassManager([parse_pipeline("eliminate-identity"), inner])
    trace = Trace()
    outer.instrument(trace)
    module = Module.from_proto(conv_bn_model())
    assert isinstance(inner, Pass)
    changed = outer.run(module, CompileContext())
    assert changed
    assert [e[1] for e in trace.events if e[0] == "before"] == ["eliminate-identity", "fuse-conv-bn", "eliminate-dead-code"]
    assert ("after", "fuse-conv-bn", True) in trace.events
    assert outer.text() == "pipeline(eliminate-identity),pipeline(fuse-conv-bn,eliminate-dead-code)"


def test_failure_names_pass_and_passes_before():
    pm = parse_pipeline("eliminate-identity,fuse-conv-bn,test-explode,eliminate-dead-code")
    with pytest.raises(PassError) as err:
        pm.run(Module.from_proto(conv_bn_model()), CompileContext())
    text = str(err.value)
    assert "pass 'test-explode' failed: node 'conv1' is not supported" in text
    assert "passes before it: eliminate-identity, fuse-conv-bn" in text


def test_lossless_check_catches_a_pass_that_changes_outputs():
    module = Module.from_proto(conv_bn_model())
    pm = parse_pipeline("fuse-conv-bn,test-scale-weights{factor=1.5}")
    pm.instrument(LosslessCheck({"x": rand(1, 3, 16, 16)}))
    with pytest.raises(PassError, match="lossless pass 'test-scale-weights' changed output 'y'"):
        pm.run(module, CompileContext())


def test_a_precision_changing_pass_is_held_to_its_own_tolerance_and_later_passes_to_its_outputs():
    """test-round-weights changes outputs by about 1e-3: within its lossless_rtol, beyond the default 1e-4.
    fuse-conv-bn after it is compared with the rounded model's outputs, so it passes at float rounding; a
    second rounding past its tolerance fails."""
    check = LosslessCheck({"x": rand(1, 3, 16, 16)})
    parse_pipeline("test-round-weights{factor=1.001},fuse-conv-bn").instrument(check).run(
        Module.from_proto(conv_bn_model()), CompileContext())
    assert 1e-4 < check.worst["test-round-weights"] < 1e-2 and check.worst["fuse-conv-bn"] < 1e-5
    pm = parse_pipeline("test-round-weights{factor=1.1}").instrument(LosslessCheck({"x": rand(1, 3, 16, 16)}))
    with pytest.raises(PassError, match="changed output 'y' by .* \\(limit 0.01;"):
        pm.run(Module.from_proto(conv_bn_model()), CompileContext())


def test_lossless_check_passes_real_lossless_passes():
    module = Module.from_proto(conv_bn_model())
    check = LosslessCheck({"x": rand(1, 3, 16, 16)})
    pm = parse_pipeline("fold-constants,eliminate-identity,fuse-conv-bn,eliminate-dead-code").instrument(check)
    pm.run(module, CompileContext())
    assert 0 < check.worst["fuse-conv-bn"] < 1e-5


def rounding_amplifier() -> onnx.ModelProto:
    """Conv outputs near 9,000 that a BatchNormalization re-centres to about -9 before a Sigmoid (PP-OCRv4's
    detector has a BatchNormalization of variance 1e8 before its Sigmoid map): the outputs, near 1e-4, move by
    about 1e-3 relative when the inputs or the order of the Conv's additions move by float rounding."""
    from onnx import TensorProto, helper

    from graphs import init, model

    w = (700 + np.random.default_rng(0).random((4, 3, 3, 3)) * 80).astype(np.float32)
    nodes = [helper.make_node("Conv", ["x", "w"], ["c"], name="conv", kernel_shape=[3, 3]),
             helper.make_node("BatchNormalization", ["c", "g", "b", "m", "v"], ["n"], name="bn"),
             helper.make_node("Sigmoid", ["n"], ["y"], name="sigmoid")]
    inits = [init("w", w), init("g", np.ones(4, np.float32)), init("b", np.full(4, -9, np.float32)),
             init("m", 0.5 * w.sum(axis=(1, 2, 3))), init("v", np.ones(4, np.float32))]
    return model(nodes, [("x", onnx.TensorProto.FLOAT, [1, 3, 16, 16])], [("y", TensorProto.FLOAT, None)], inits)


def test_lossless_check_allows_the_rounding_a_model_amplifies_and_still_catches_real_changes():
    """Folding the BatchNormalization moves the outputs by about 1e-3 relative, beyond the 1e-4 limit (the check
    refused PP-OCRv4's detector this way) but within what two units in the last place of the inputs move them
    by; a weight scaled by 1.001 still fails."""
    feed = {"x": (0.5 + 1e-4 * np.random.default_rng(1).standard_normal((1, 3, 16, 16))).astype(np.float32)}
    check = LosslessCheck(feed)
    parse_pipeline("fuse-conv-bn").instrument(check).run(Module.from_proto(rounding_amplifier()), CompileContext())
    assert 1e-4 < check.worst["fuse-conv-bn"] < LosslessCheck.NOISE_FACTOR * check.noise
    pm = parse_pipeline("test-scale-weights{factor=1.001}").instrument(LosslessCheck(feed))
    with pytest.raises(PassError, match="changed output 'y' by .*float rounding of the inputs alone moves it by"):
        pm.run(Module.from_proto(rounding_amplifier()), CompileContext())


def test_verifier_rejects_an_invalid_model():
    @register_pass
    class _Break(Pass):
        """Test pass that leaves a node reading a tensor nobody produces."""
        name = "test-break-graph"

        def run(self, module, ctx):
            import onnx_graphsurgeon as gs
            relu = next(n for n in module.graph.nodes if n.op == "Relu")
            relu.inputs[0] = gs.Variable("dangling", dtype=np.float32)
            return True

    pm = parse_pipeline("test-break-graph").instrument(Verifier())
    with pytest.raises(PassError, match="test-break-graph"):
        pm.run(Module.from_proto(conv_bn_model()), CompileContext())


def test_dump_ir_writes_one_numbered_dump_per_changing_pass(tmp_path):
    module = Module.from_proto(conv_bn_model())
    ctx = CompileContext()
    pm = parse_pipeline("eliminate-identity,fuse-conv-bn,eliminate-dead-code")
    pm.instrument(Recorder()).instrument(DumpIR(tmp_path))
    pm.run(module, ctx)
    names = sorted(p.name for p in tmp_path.iterdir())
    assert names == ["000_input.onnx", "000_input.txt", "002_fuse-conv-bn.diff", "002_fuse-conv-bn.onnx",
                     "002_fuse-conv-bn.txt"]
    diff = (tmp_path / "002_fuse-conv-bn.diff").read_text()
    assert "-" in diff and "BatchNormalization" in diff
    onnx.checker.check_model(onnx.load(str(tmp_path / "002_fuse-conv-bn.onnx")))
    assert [(r.name, r.changed) for r in ctx.records] == [
        ("eliminate-identity", False), ("fuse-conv-bn", True), ("eliminate-dead-code", False)]
