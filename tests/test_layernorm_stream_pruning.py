"""Channel pruning of a residual stream that LayerNorms normalize (a transformer's embedding width, ConvNeXt's
stage width): the LayerNorm keeps channels aligned, and its scale and bias are sliced, then refit to the
statistics over the kept channels (passes/normalizer_fit); a mean over the channels (a LayerNorm written out)
is such a statistic too, refit by a Mul and an Add after it; the stem that writes the stream (a ViT's patch
embedding) loses the stream's channels with it.
"""

import numpy as np
import onnx
import pytest
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper

from compiler.runtime import run_model
from graphs import init, model, rand
from passes.normalizer_fit import StatisticFit
from test_channel_pruning import feed, pruned
from test_channels_last_pruning import MODELS, compile_sample, convnext_model, spaces_of, top1_drop, weight_shape


def layernorm_model(c: int, scale: np.ndarray, bias: np.ndarray) -> onnx.ModelProto:
    return model([helper.make_node("LayerNormalization", ["x", "g", "b"], ["y"], name="ln", axis=-1, epsilon=1e-5)],
                 [("x", TensorProto.FLOAT, [1, 64, c])], [("y", TensorProto.FLOAT, [1, 64, c])],
                 [init("g", scale), init("b", bias)], opset=17)


def fitted(scale, bias, kept, x) -> onnx.ModelProto:
    """The LayerNorm sliced to `kept` channels, with its scale and bias fit on `x` (all channels)."""
    graph = gs.import_onnx(layernorm_model(len(kept), scale[kept], bias[kept]))
    fit = StatisticFit(graph.nodes[0], np.asarray(kept), axis=2)
    fit.add(x)
    fit.apply(graph)
    return gs.export_onnx(graph)


def test_the_layernorm_fit_is_exact_without_removal_and_repairs_the_statistics_with_it():
    """Nothing removed: the fit leaves onnxruntime's outputs as they were. A quarter of the channels removed
    (the low-energy ones a channel ranking would pick, plus a channel with an offset): onnxruntime's output of
    the fitted LayerNorm on the kept inputs is much closer to the original output at those channels than the
    sliced LayerNorm without the fit (0.44 of its error here)."""
    rng = np.random.default_rng(0)
    c = 32
    spread = np.where(np.arange(c) < 8, 0.2, 1.0)
    x = (rng.standard_normal((1, 64, c)) * spread + np.where(np.arange(c) == 3, 0.5, 0.0)).astype(np.float32)
    x += rng.standard_normal((1, 64, 1)).astype(np.float32) * 0.5  # a per-token offset, removed by the mean
    scale, bias = rand(c, scale=0.2) + 1, rand(c, scale=0.2)
    want = run_model(layernorm_model(c, scale, bias), {"x": x})[0]
    every = np.arange(c)
    same = run_model(fitted(scale, bias, every, x), {"x": x})[0]
    np.testing.assert_allclose(same, want, rtol=1e-5, atol=1e-5)
    kept = np.arange(8, c)
    sliced = run_model(layernorm_model(len(kept), scale[kept], bias[kept]), {"x": x[..., kept]})[0]
    repaired = run_model(fitted(scale, bias, kept, x), {"x": x[..., kept]})[0]
    before = np.linalg.norm(sliced - want[..., kept])
    after = np.linalg.norm(repaired - want[..., kept])
    assert after < 0.6 * before, (before, after)


def quieten(initializers, channels, rows=(), columns=()) -> None:
    """Scale output `channels` of the writing layers by 0.01 in place: on the first axis of the initializers
    named in `rows` (a Conv's weight, any bias), on the last of those in `columns` (a MatMul's weight)."""
    for t in initializers:
        if t.name in rows or t.name in columns:
            v = onnx.numpy_helper.to_array(t).copy()
            v[(slice(None),) * (v.ndim - 1 if t.name in columns else 0) + (list(channels),)] *= 0.01
            t.CopyFrom(onnx.numpy_helper.from_array(v, t.name))


def quiet_stream(proto: onnx.ModelProto, channels) -> onnx.ModelProto:
    """`proto` (convnext_model) with the stream `channels` near zero in both layers writing them."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    quieten(out.graph.initializer, channels, rows=("stem_w", "stem_b", "pw2_b"), columns=("pw2_w",))
    return out


def test_a_layernorm_keeps_the_convnext_stream_aligned_and_the_stream_prunes(tmp_path):
    """In a ConvNeXt block the LayerNorm over the NHWC stream no longer blocks it: the stream (stem, the second
    Linear, with the depthwise conv and the LayerNorm as followers) is one space the LayerNorm normalizes. With
    half its channels near zero, pruning at 0.3 takes them out of the stem, the depthwise conv, the LayerNorm
    and both Linears, and the outputs stay close to the original's."""
    proto = quiet_stream(convnext_model(), range(8, 16))
    spaces, _ = spaces_of(proto)
    stream = spaces["pw2"]
    assert not stream.blocked and stream is spaces["stem"] and [n.name for n in stream.normalizers] == ["ln"]
    assert {f.name for f in stream.followers} >= {"dw", "ln"}
    out = pruned(tmp_path, proto, 0.3)
    assert weight_shape(out, "stem")[0] == weight_shape(out, "pw1")[0] == weight_shape(out, "pw2")[1] < 16
    x = feed(proto)
    want, got = run_model(proto, x)[0], run_model(out, x)[0]
    assert np.linalg.norm(got - want) < 0.13 * np.linalg.norm(want)


def test_the_sample_vit_narrows_its_residual_stream_at_0_7(tmp_path, capsys):
    """models/mnist_vit.onnx at --prune 0.7 --prune-mode channel (int8 package): the 64-wide residual stream
    loses channels in every layer writing it (the patch embedding, each attention output and MLP output
    projection), its width read at run time by the exported x.flatten(2) (Shape → Slice → Concat → Reshape);
    exactly 70% of the prunable weights go, the summary and deploy.json say the 9 LayerNorms were refit, and
    test top-1 stays within 3 points of float (it lost 4.2 points when the stream stayed whole)."""
    layers, out = compile_sample(tmp_path, "mnist_vit.onnx", 0.7)
    summary = capsys.readouterr().out
    assert "70.0% of 163,840 prunable weights removed" in summary
    assert "; 9 LayerNorms and channel means refit to the kept channels" in summary
    assert "kept dense: '/patch/Conv' (channels 64 → 48 with its stream)" in summary
    writers = ["/patch/Conv"] + [f"/blocks/blocks.{b}/{p}/MatMul" for b in range(4) for p in ("proj", "fc2")]
    widths = {layers[w]["channels_after"] for w in writers}
    assert len(widths) == 1 and widths.pop() < 64, [layers[w] for w in writers]
    norms = [l for name, l in layers.items() if l["op"] == "LayerNormalization"]
    assert len(norms) == 9 and all(l["channels_after"] == layers["/patch/Conv"]["channels_after"] for l in norms)
    assert top1_drop(MODELS / "mnist_vit.onnx", out) <= 0.03


def written_out_norm(x: str, out: str, name: str, scale: str, bias: str, inits: list, eps: float = 1e-5) -> list:
    """LayerNorm over the last axis as opset-13 exporters write it: (x - mean) / sqrt(mean((x - mean)^2) + eps)
    * scale + bias."""
    inits += [init(name + "_two", np.float32(2.0)), init(name + "_eps", np.float32(eps))]
    n = name
    return [helper.make_node("ReduceMean", [x], [n + "_mu"], axes=[-1], name=n + "_mean"),
            helper.make_node("Sub", [x, n + "_mu"], [n + "_d"]),
            helper.make_node("Pow", [n + "_d", n + "_two"], [n + "_sq"]),
            helper.make_node("ReduceMean", [n + "_sq"], [n + "_var"], axes=[-1], name=n + "_variance"),
            helper.make_node("Add", [n + "_var", n + "_eps"], [n + "_ve"]),
            helper.make_node("Sqrt", [n + "_ve"], [n + "_sd"]),
            helper.make_node("Div", [n + "_d", n + "_sd"], [n + "_z"]),
            helper.make_node("Mul", [n + "_z", scale], [n + "_zg"]),
            helper.make_node("Add", [n + "_zg", bias], [out])]


def summed_norm(x: str, out: str, name: str, scale: str, bias: str, inits: list, c: int, eps: float = 1e-6) -> list:
    """LayerNorm over the last axis as jax2tf writes it (magika): sums that drop the axis, times 1/C, the
    variance as E[x²] - E[x]² clipped at 0, both unsqueezed back, x - mean times 1/sqrt(var + eps)."""
    inits += [init(name + "_inv", np.float32(1 / c)), init(name + "_eps", np.float32(eps)),
              init(name + "_zero", np.float32(0)), init(name + "_last", np.array([-1], np.int64))]
    n = name
    return [helper.make_node("ReduceSum", [x, n + "_last"], [n + "_s"], keepdims=0, name=n + "_sum"),
            helper.make_node("Mul", [x, x], [n + "_x2"]),
            helper.make_node("ReduceSum", [n + "_x2", n + "_last"], [n + "_s2"], keepdims=0, name=n + "_sum_sq"),
            helper.make_node("Mul", [n + "_s", n + "_inv"], [n + "_mu"]),
            helper.make_node("Mul", [n + "_s2", n + "_inv"], [n + "_m2"]),
            helper.make_node("Mul", [n + "_mu", n + "_mu"], [n + "_mu2"]),
            helper.make_node("Sub", [n + "_m2", n + "_mu2"], [n + "_v"]),
            helper.make_node("Max", [n + "_zero", n + "_v"], [n + "_var"]),
            helper.make_node("Unsqueeze", [n + "_mu", n + "_last"], [n + "_mu_u"]),
            helper.make_node("Unsqueeze", [n + "_var", n + "_last"], [n + "_var_u"]),
            helper.make_node("Add", [n + "_var_u", n + "_eps"], [n + "_ve"]),
            helper.make_node("Sqrt", [n + "_ve"], [n + "_sd"]),
            helper.make_node("Reciprocal", [n + "_sd"], [n + "_rs"]),
            helper.make_node("Mul", [n + "_rs", scale], [n + "_rg"]),
            helper.make_node("Sub", [x, n + "_mu_u"], [n + "_d"]),
            helper.make_node("Mul", [n + "_d", n + "_rg"], [n + "_zg"]),
            helper.make_node("Add", [n + "_zg", bias], [out])]


def normed(x: str, out: str, c: int, inits: list, name: str, form: str = "mean") -> list:
    inits += [init(name + "_g", rand(c, scale=0.1) + 1), init(name + "_be", rand(c, scale=0.1))]
    if form == "sum":
        return summed_norm(x, out, name, name + "_g", name + "_be", inits, c)
    return written_out_norm(x, out, name, name + "_g", name + "_be", inits)


def layernorms_written_out(proto: onnx.ModelProto) -> onnx.ModelProto:
    """`proto` with every LayerNormalization written out (the form opset-13 exports have)."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    nodes, inits = [], []
    for n in out.graph.node:
        if n.op_type != "LayerNormalization":
            nodes.append(n)
            continue
        eps = next((a.f for a in n.attribute if a.name == "epsilon"), 1e-5)
        nodes += written_out_norm(n.input[0], n.output[0], n.name, n.input[1], n.input[2], inits, eps)
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    out.graph.initializer.extend(inits)
    return out


def written_out_model(quiet=range(16, 24), form: str = "mean") -> onnx.ModelProto:
    """embed Linear 16→24 on x[1, 6, 16] → written-out LayerNorm → Linear 24→32 → ReLU → Linear 32→24 added
    back → written-out LayerNorm → head Linear 24→5; stream features `quiet` near zero in both writers. The
    LayerNorms take means (`form` "mean", opset-13 exports) or sums times 1/C ("sum", jax2tf)."""
    from test_channels_last_pruning import linear
    inits: list = []
    nodes = linear("embed", "x", 16, 24, "e", inits) + normed("e", "n0", 24, inits, "ln0", form)
    nodes += linear("fc1", "n0", 24, 32, "h", inits) + [helper.make_node("Relu", ["h"], ["r"])]
    nodes += linear("fc2", "r", 32, 24, "o", inits) + [helper.make_node("Add", ["e", "o"], ["s"])]
    nodes += normed("s", "n1", 24, inits, "ln1", form) + linear("head", "n1", 24, 5, "y", inits)
    quieten(inits, quiet, rows=("embed_b", "fc2_b"), columns=("embed_w", "fc2_w"))
    return model(nodes, [("x", TensorProto.FLOAT, [1, 6, 16])], [("y", TensorProto.FLOAT, [1, 6, 5])], inits)


@pytest.mark.parametrize("op, keepdims", [("ReduceMean", 1), ("ReduceSum", 0)])
def test_a_mean_over_the_channels_is_a_statistic_the_fit_repairs(op, keepdims):
    """ReduceMean over the channel axis, or a ReduceSum dropping it (jax2tf's): with every channel kept the fit
    adds nothing; with the third of the channels that carry little removed (what a ranking removes), the
    fitted statistic of the kept channels (Mul and Add after the reduction, run by onnxruntime) is much closer
    to the statistic over all channels than the plain one over the kept channels."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 64, 24)) * 0.3 + rng.standard_normal((1, 64, 1)) + 0.3
    x[..., :8] *= 0.05
    x = x.astype(np.float32)

    def mean_model(c):
        axes = dict(axes=[2]) if op == "ReduceMean" else {}  # ReduceSum reads them as an input from opset 13
        return model([helper.make_node(op, ["x"] + (["axes"] if not axes else []), ["y"], keepdims=keepdims,
                                       name="mean", **axes)],
                     [("x", TensorProto.FLOAT, [1, 64, c])], [("y", TensorProto.FLOAT, [1, 64, 1][:2 + keepdims])],
                     [] if axes else [init("axes", np.array([2], np.int64))])

    def fitted_mean(kept):
        graph = gs.import_onnx(mean_model(len(kept)))
        fit = StatisticFit(graph.nodes[0], np.asarray(kept), axis=2)
        fit.add(x)
        fit.apply(graph)
        return gs.export_onnx(graph.cleanup().toposort())

    want = run_model(mean_model(24), {"x": x})[0]
    assert len(fitted_mean(np.arange(24)).graph.node) == 1
    kept = np.arange(8, 24)
    plain = run_model(mean_model(16), {"x": x[..., kept]})[0]
    repaired = run_model(fitted_mean(kept), {"x": x[..., kept]})[0]
    assert np.linalg.norm(repaired - want) < 0.3 * np.linalg.norm(plain - want)


@pytest.mark.parametrize("form, statistics", [("mean", ["ln0_mean", "ln0_variance", "ln1_mean", "ln1_variance"]),
                                              ("sum", ["ln0_sum", "ln0_sum_sq", "ln1_sum", "ln1_sum_sq"])])
def test_a_written_out_layernorm_keeps_the_stream_aligned_and_it_prunes(tmp_path, form, statistics):
    """A LayerNorm written out no longer blocks the stream: the opset-13 form (two ReduceMeans over the
    features, Sub, Pow, Sqrt, Div, Mul, Add) or jax2tf's (magika's: ReduceSums that drop the axis, times 1/C,
    Unsqueezed back). Its two reductions are the stream's statistics. Pruned at 0.3 with a third of the stream
    near zero, the stream narrows in the embedding, fc2 and the head's input, and the outputs stay close to
    the original's: for the means, 0.10 of their norm away, against 0.16 without the fit of the four means.
    The sums over the kept features hardly change (the features removed are near zero), so their fitted
    lines stay within 1% of the identity."""
    proto = written_out_model(form=form)
    spaces, _ = spaces_of(proto)
    stream = spaces["embed"]
    assert not stream.blocked and stream is spaces["fc2"]
    assert sorted(n.name for n in stream.normalizers) == statistics
    out = pruned(tmp_path, proto, 0.3)
    width = weight_shape(out, "embed")[1]
    assert width < 24 and weight_shape(out, "fc2")[1] == weight_shape(out, "head")[0] == width
    if form == "sum":
        lines = {t.name: float(onnx.numpy_helper.to_array(t)) for t in out.graph.initializer if t.name.endswith("_a")}
        assert len(lines) == 4 and all(abs(a - 1) < 0.01 for a in lines.values()), lines
    x = feed(proto)
    want, got = run_model(proto, x)[0], run_model(out, x)[0]
    assert np.linalg.norm(got - want) < 0.13 * np.linalg.norm(want)


def test_the_sample_vit_with_its_layernorms_written_out_narrows_its_stream_too(tmp_path, capsys):
    """models/mnist_vit.onnx with its 9 LayerNorms written out (ReduceMean, Sub, Pow, ReduceMean, Add, Sqrt,
    Div, Mul, Add; the compile's reduce-mean-to-pool makes each mean a GlobalAveragePool over the features):
    --prune 0.7 --prune-mode channel refits the 18 means and keeps test top-1 within 3 points of float, as the
    LayerNormalization form does (92.10% against 92.20% from the int8 package, float 93.70%; 89.50% with the
    stream whole)."""
    src = tmp_path / "vit_written_out.onnx"
    onnx.save(layernorms_written_out(onnx.load(str(MODELS / "mnist_vit.onnx"))), src)
    from compiler.cli import main
    out = tmp_path / "pkg"
    assert main(["compile", str(src), "--target", "rzv2h", "--prune", "0.7", "--prune-mode", "channel",
                 "--calib", str(MODELS / "mnist_calib.npz"), "--out", str(out)]) == 0
    assert "; 18 LayerNorms and channel means refit to the kept channels" in capsys.readouterr().out
    assert top1_drop(src, out) <= 0.03


@pytest.mark.parametrize("op", ["ReduceMean", "ReduceSum"])
def test_a_spatial_attention_gate_over_the_channel_statistic_keeps_the_block_prunable(tmp_path, op):
    """CBAM's spatial attention: the mean (or sum) over a conv's channels goes through a 7x7 Conv and a
    Sigmoid and gates the conv's output. The statistic is read by a Conv, not only by broadcasting, so it is a
    one-channel tensor of its own there (no channel of the block indexes it); the block's dead channels still
    go and the statistic is refit: the mean over 12 channels is scaled back to the mean over 16, so
    onnxruntime's outputs are those of the original up to float rounding."""
    from test_channel_pruning import conv, dead_ratio, out_channels, weights

    inits = [init("axes", np.array([1], np.int64))]
    weights("w0", 8, 3, 3, (), inits)
    weights("w1", 16, 8, 1, (2, 5, 9, 12), inits)
    weights("wg", 1, 1, 7, (), inits)
    weights("w2", 4, 16, 1, (), inits)
    reduce = helper.make_node(op, ["r1", "axes"], ["stat"], keepdims=1, name="stat") if op == "ReduceSum" else \
        helper.make_node(op, ["r1"], ["stat"], axes=[1], keepdims=1, name="stat")
    nodes = [conv("conv0", "x", "w0", "c0", pads=[1, 1, 1, 1]), helper.make_node("Relu", ["c0"], ["r0"]),
             conv("conv1", "r0", "w1", "c1"), helper.make_node("Relu", ["c1"], ["r1"]), reduce,
             conv("gate", "stat", "wg", "g", pads=[3, 3, 3, 3]), helper.make_node("Sigmoid", ["g"], ["s"]),
             helper.make_node("Mul", ["r1", "s"], ["gated"]), conv("head", "gated", "w2", "y")]
    proto = model(nodes, [("x", TensorProto.FLOAT, [1, 3, 8, 8])], [("y", TensorProto.FLOAT, None)],
                  inits if op == "ReduceSum" else inits[1:])
    spaces, _ = spaces_of(proto)
    assert not spaces["conv1"].blocked and [n.name for n in spaces["conv1"].normalizers] == ["stat"]
    out = pruned(tmp_path, proto, dead_ratio(proto))
    assert out_channels(out, "conv1") == 12
    x = feed(proto)
    want, got = run_model(proto, x)[0], run_model(out, x)[0]
    assert np.linalg.norm(got - want) < 1e-4 * np.linalg.norm(want)
