"""Channel pruning of a residual stream that LayerNorms normalize (a transformer's embedding width, ConvNeXt's
stage width): the LayerNorm keeps channels aligned, its scale and bias are sliced, and its scale and bias are
refit to the statistics over the kept channels (passes/normalizer_fit); the stem that writes the stream (a
ViT's patch embedding) loses the stream's channels with it.
"""

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import TensorProto, helper

from compiler.runtime import run_model
from graphs import init, model, rand
from passes.normalizer_fit import NormalizerFit, apply_fit
from test_channel_pruning import feed, pruned
from test_channels_last_pruning import MODELS, compile_sample, convnext_model, spaces_of, top1_drop, weight_shape


def layernorm_model(c: int, scale: np.ndarray, bias: np.ndarray) -> onnx.ModelProto:
    return model([helper.make_node("LayerNormalization", ["x", "g", "b"], ["y"], name="ln", axis=-1, epsilon=1e-5)],
                 [("x", TensorProto.FLOAT, [1, 64, c])], [("y", TensorProto.FLOAT, [1, 64, c])],
                 [init("g", scale), init("b", bias)], opset=17)


def fitted(scale, bias, kept, x) -> onnx.ModelProto:
    """The LayerNorm sliced to `kept` channels, with its scale and bias fit on `x` (all channels)."""
    graph = gs.import_onnx(layernorm_model(len(kept), scale[kept], bias[kept]))
    fit = NormalizerFit(graph.nodes[0], np.asarray(kept))
    fit.add(x)
    apply_fit(graph, fit)
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


def quiet_stream(proto: onnx.ModelProto, channels) -> onnx.ModelProto:
    """`proto` (convnext_model) with the stream `channels` near zero in both layers writing them."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    for t in out.graph.initializer:
        v = onnx.numpy_helper.to_array(t).copy()
        if t.name in ("stem_w", "stem_b"):
            v[list(channels)] *= 0.01
        elif t.name in ("pw2_w", "pw2_b"):
            v[..., list(channels)] *= 0.01
        else:
            continue
        t.CopyFrom(onnx.numpy_helper.from_array(v, t.name))
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
    assert np.linalg.norm(got - want) < 0.1 * np.linalg.norm(want)


def test_the_sample_vit_narrows_its_residual_stream_at_0_7(tmp_path, capsys):
    """models/mnist_vit.onnx at --prune 0.7 --prune-mode channel (int8 package): the 64-wide residual stream
    loses channels in every layer writing it (the patch embedding, each attention output and MLP output
    projection), its width read at run time by the exported x.flatten(2) (Shape → Slice → Concat → Reshape);
    exactly 70% of the prunable weights go, and test top-1 stays within 3 points of float (it lost 4.2 points
    when the stream stayed whole)."""
    layers, out = compile_sample(tmp_path, "mnist_vit.onnx", 0.7)
    assert "70.0% of 163,840 prunable weights removed" in capsys.readouterr().out
    writers = ["/patch/Conv"] + [f"/blocks/blocks.{b}/{p}/MatMul" for b in range(4) for p in ("proj", "fc2")]
    widths = {layers[w]["channels_after"] for w in writers}
    assert len(widths) == 1 and widths.pop() < 64, [layers[w] for w in writers]
    assert top1_drop(MODELS / "mnist_vit.onnx", out) <= 0.03
