"""Channel pruning where features sit on the last axis: a transformer's Linear layers on [batch, tokens,
features] (MatMul with a constant weight, then a bias Add), and ConvNeXt's Transpose into and out of them.

As in test_channel_pruning, "dead" channels (zero weights and bias in the layer producing them) must go
without changing the outputs, which checks the weight rows, the bias Add and the consumer's columns; live
channels pruned at larger ratios must leave a valid model whose outputs stay close to the original's.
"""

import json
from pathlib import Path

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from compiler.ir import Module
from graphs import init, model, outputs_close, rand
from passes.channel_groups import analyze
from passes.prune_common import prunable_layers
from test_channel_pruning import dead_ratio, feed, pruned

SQRT2 = np.float32(np.sqrt(2.0))


def linear(name, x, fan_in, fan_out, out, inits, dead=()):
    """MatMul(x, W) + b as exporters write a Linear on a token tensor; output features `dead` are zero."""
    w, b = rand(fan_in, fan_out, scale=fan_in ** -0.5), rand(fan_out, scale=0.1)
    w[:, list(dead)] = 0.0
    b[list(dead)] = 0.0
    inits += [init(name + "_w", w), init(name + "_b", b)]
    return [helper.make_node("MatMul", [x, name + "_w"], [name + "_mm"], name=name),
            helper.make_node("Add", [name + "_mm", name + "_b"], [out], name=name + "_bias")]


def gelu(x, out):
    """GELU in the erf form torch.onnx writes: 0.5 · x · (1 + erf(x / √2))."""
    return [helper.make_node("Div", [x, "sqrt2"], [x + "_s"]), helper.make_node("Erf", [x + "_s"], [x + "_e"]),
            helper.make_node("Add", [x + "_e", "one"], [x + "_p"]), helper.make_node("Mul", [x, x + "_p"], [x + "_m"]),
            helper.make_node("Mul", [x + "_m", "half"], [out])]


def norm(x, out, c, inits, name):
    inits += [init(name + "_g", rand(c, scale=0.1) + 1), init(name + "_be", rand(c, scale=0.1))]
    return [helper.make_node("LayerNormalization", [x, name + "_g", name + "_be"], [out], name=name, axis=-1)]


SCALARS = [init("sqrt2", SQRT2), init("one", np.float32(1.0)), init("half", np.float32(0.5))]


def vit_mlp_model(dead=()):
    """Two pre-norm transformer MLP blocks on x[1, 6, 16] (hidden 48), then a Linear head on every token."""
    inits, nodes, x = list(SCALARS), [], "x"
    for b in range(2):
        nodes += norm(x, f"n{b}", 16, inits, f"ln{b}")
        nodes += linear(f"fc{b}a", f"n{b}", 16, 48, f"h{b}", inits, dead)
        nodes += gelu(f"h{b}", f"g{b}")
        nodes += linear(f"fc{b}b", f"g{b}", 48, 16, f"o{b}", inits)
        nodes.append(helper.make_node("Add", [x, f"o{b}"], [f"x{b}"]))
        x = f"x{b}"
    nodes += linear("head", x, 16, 5, "y", inits)
    return model(nodes, [("x", TensorProto.FLOAT, [1, 6, 16])], [("y", TensorProto.FLOAT, [1, 6, 5])], inits, opset=17)


def convnext_model(dead=()):
    """A ConvNeXt block: stem → depthwise 3×3 → Transpose to NHWC → LayerNorm → Linear 16→64 → GELU → Linear
    64→16 → layer scale → Transpose to NCHW → + stem; then global pooling and a Gemm classifier."""
    inits = list(SCALARS) + [init("stem_w", rand(16, 3, 2, 2, scale=0.3)), init("stem_b", rand(16, scale=0.1)),
                             init("dw_w", rand(16, 1, 3, 3, scale=0.3)), init("dw_b", rand(16, scale=0.1)),
                             init("gamma", rand(16, scale=0.5)), init("cls_w", rand(16, 5)), init("cls_b", rand(5))]
    nodes = [helper.make_node("Conv", ["x", "stem_w", "stem_b"], ["s"], name="stem", strides=[2, 2]),
             helper.make_node("Conv", ["s", "dw_w", "dw_b"], ["d"], name="dw", group=16, pads=[1, 1, 1, 1]),
             helper.make_node("Transpose", ["d"], ["t"], perm=[0, 2, 3, 1])]
    nodes += norm("t", "n", 16, inits, "ln")
    nodes += linear("pw1", "n", 16, 64, "h", inits, dead) + gelu("h", "g") + linear("pw2", "g", 64, 16, "o", inits)
    nodes += [helper.make_node("Mul", ["o", "gamma"], ["ls"]), helper.make_node("Transpose", ["ls"], ["back"], perm=[0, 3, 1, 2]),
              helper.make_node("Add", ["s", "back"], ["r"]), helper.make_node("GlobalAveragePool", ["r"], ["p"]),
              helper.make_node("Flatten", ["p"], ["f"]), helper.make_node("Gemm", ["f", "cls_w", "cls_b"], ["y"], name="head")]
    return model(nodes, [("x", TensorProto.FLOAT, [1, 3, 8, 8])], [("y", TensorProto.FLOAT, [1, 5])], inits, opset=17)


def weight_shape(proto, node_name):
    node = next(n for n in proto.graph.node if n.name == node_name)
    return tuple({t.name: t for t in proto.graph.initializer}[node.input[1]].dims)


def spaces_of(proto):
    module = Module.from_proto(proto)
    module.infer_shapes()  # as the pipeline does: with data propagation, so shapes built from Shape() resolve
    analysis = analyze(module.graph, prunable_layers(module.graph, True, False))
    return {p.name: s for s in analysis.base() for p in s.producers}, analysis


def test_a_transformer_mlp_hidden_space_is_prunable_and_the_residual_stream_is_not():
    spaces, analysis = spaces_of(vit_mlp_model())
    for b in range(2):
        assert not spaces[f"fc{b}a"].blocked and spaces[f"fc{b}a"].channels == 48
        assert spaces[f"fc{b}b"].blocked  # the residual stream: the graph input's
        hidden = spaces[f"fc{b}a"]
        assert [n.name for n in hidden.followers] == [f"fc{b}a_bias"]  # the bias Add is sliced with the rows
        assert analysis.axis[f"g{b}"] == 2
    assert {n.name for n, _ in analysis.consumers} >= {"fc0b", "fc1b"}


def test_dead_hidden_features_of_a_transformer_mlp_go_without_changing_its_outputs(tmp_path):
    proto = vit_mlp_model(dead=range(0, 48, 4))  # a quarter: a point the sensitivity is measured at
    out = pruned(tmp_path, proto, dead_ratio(proto))
    for b in range(2):
        assert weight_shape(out, f"fc{b}a") == (16, 36) and weight_shape(out, f"fc{b}b") == (36, 16)
    outputs_close(proto, out, feed(proto))


def test_live_transformer_mlp_features_pruned_by_half_stay_close_after_the_refit(tmp_path):
    proto = vit_mlp_model()
    out = pruned(tmp_path, proto, 0.5)
    assert sum(weight_shape(out, f"fc{b}a")[1] for b in range(2)) < 96
    x = feed(proto)
    from compiler.runtime import run_model
    want, got = run_model(proto, x)[0], run_model(out, x)[0]
    assert np.linalg.norm(got - want) < 0.5 * np.linalg.norm(want)


def test_convnext_block_prunes_its_inverted_bottleneck_through_the_transposes(tmp_path):
    proto = convnext_model(dead=range(1, 64, 2))
    spaces, analysis = spaces_of(proto)
    assert not spaces["pw1"].blocked and spaces["pw1"].channels == 64
    assert spaces["pw2"] is spaces["stem"] and [n.name for n in spaces["pw2"].normalizers] == ["ln"]
    assert analysis.axis["t"] == 3 and analysis.axis["back"] == 1
    out = pruned(tmp_path, proto, dead_ratio(proto))
    assert weight_shape(out, "pw1") == (16, 32) and weight_shape(out, "pw2") == (32, 16)
    outputs_close(proto, out, feed(proto))


def transposed_reader_model(matmul_axis_last=True):
    """conv0 → conv1 (8 channels, two dead) → Relu, then either Transpose to NHWC and a Linear over the
    channels, or a MatMul that contracts the width axis of the NCHW tensor (which reads across channels)."""
    w1, b1 = rand(8, 4, 3, 3, scale=0.3), rand(8, scale=0.1)
    w1[[2, 5]], b1[[2, 5]] = 0.0, 0.0
    inits = [init("w0", rand(4, 3, 3, 3, scale=0.3)), init("b0", rand(4)), init("w1", w1), init("b1", b1),
             init("axes", np.array([1, 2], np.int64))]
    nodes = [helper.make_node("Conv", ["x", "w0", "b0"], ["c0"], name="conv0", pads=[1, 1, 1, 1]),
             helper.make_node("Conv", ["c0", "w1", "b1"], ["c1"], name="conv1", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c1"], ["r1"])]
    if matmul_axis_last:
        nodes.append(helper.make_node("Transpose", ["r1"], ["t"], perm=[0, 2, 3, 1]))
        nodes += linear("proj", "t", 8, 5, "p", inits)
        nodes.append(helper.make_node("ReduceMean", ["p", "axes"], ["y"], keepdims=0))
        shape = [1, 5]
    else:
        nodes += linear("proj", "r1", 8, 5, "y", inits)
        shape = [1, 8, 8, 5]
    return model(nodes, [("x", TensorProto.FLOAT, [1, 3, 8, 8])], [("y", TensorProto.FLOAT, shape)], inits, opset=18)


def test_a_linear_reading_transposed_conv_channels_loses_their_rows(tmp_path):
    proto = transposed_reader_model()
    spaces, analysis = spaces_of(proto)
    assert not spaces["conv1"].blocked and "proj" in [n.name for n, _ in analysis.consumers]
    out = pruned(tmp_path, proto, dead_ratio(proto), classifier="true")
    assert weight_shape(out, "conv1")[0] == 6 and weight_shape(out, "proj") == (6, 5)
    outputs_close(proto, out, feed(proto))


def test_a_matmul_across_the_channel_axis_blocks_the_channels_it_reads():
    spaces, _ = spaces_of(transposed_reader_model(matmul_axis_last=False))
    assert "'proj' (MatMul) reads 'r1' across its channel axis" in spaces["conv1"].blocked


@pytest.mark.parametrize("dead", [(), (0, 5, 9)])
def test_a_bias_free_token_linear_gets_a_bias_add_for_the_removed_features_mean(tmp_path, dead):
    """fc2 has no bias: the refit's mean shift needs an Add, inserted after the MatMul under its output name."""
    inits = list(SCALARS)
    nodes = linear("fc1", "x", 8, 12, "h", inits, dead) + gelu("h", "g")
    inits.append(init("fc2_w", rand(12, 8, scale=0.3)))
    nodes.append(helper.make_node("MatMul", ["g", "fc2_w"], ["y"], name="fc2"))
    proto = model(nodes, [("x", TensorProto.FLOAT, [1, 5, 8])], [("y", TensorProto.FLOAT, [1, 5, 8])], inits, opset=17)
    out = pruned(tmp_path, proto, dead_ratio(proto) if dead else 0.4, classifier="true")
    fc2 = next(n for n in out.graph.node if n.name == "fc2")
    bias_add = next(n for n in out.graph.node if fc2.output[0] in n.input)
    assert bias_add.op_type == "Add" and bias_add.output[0] == "y"
    if dead:
        assert weight_shape(out, "fc2") == (9, 8)
        outputs_close(proto, out, feed(proto))


MODELS = Path(__file__).resolve().parents[1] / "models"


def compile_sample(tmp_path, name: str, ratio: float) -> tuple[dict, Path]:
    """`drpc compile models/NAME --prune RATIO --prune-mode channel` with the shipped calibration digits: the
    package's deploy.json layers by name, and the package folder."""
    from compiler.cli import main

    out = tmp_path / "pkg"
    assert main(["compile", str(MODELS / name), "--target", "rzv2h", "--prune", str(ratio), "--prune-mode",
                 "channel", "--calib", str(MODELS / "mnist_calib.npz"), "--out", str(out)]) == 0
    return {l["name"]: l for l in json.loads((out / "deploy.json").read_text())["layers"]}, out


def top1_drop(source: Path, package: Path, samples: int = 500) -> float:
    """Points of test top-1 the package's model loses against `source` on the first test digits (one at a time
    for a model exported at batch 1)."""
    from compiler.runtime import run_model

    with np.load(MODELS / "mnist_test.npz") as t:
        x, y = t["input"][:samples], t["labels"][:samples]
    top1 = []
    for path in (source, package / "model.onnx"):
        proto = onnx.load(str(path))
        batch = proto.graph.input[0].type.tensor_type.shape.dim[0].dim_value
        chunks = [x] if batch != 1 else [x[i:i + 1] for i in range(len(x))]
        logits = np.concatenate([run_model(proto, {"input": c})[0] for c in chunks])
        top1.append(float(np.mean(logits.argmax(1) == y)))
    return top1[0] - top1[1]


def test_sample_vit_loses_mlp_features_through_the_cli_and_keeps_its_accuracy(tmp_path):
    """The shipped vision transformer (models/make_vit_sample.py, trained on MNIST): channel pruning at 0.5
    takes features out of every MLP's hidden layer (an attention loses whole heads or none) and keeps test
    accuracy."""
    layers, out = compile_sample(tmp_path, "mnist_vit.onnx", 0.5)
    hidden = [layers[f"/blocks/blocks.{b}/fc1/MatMul"] for b in range(4)]
    assert all(l["channels_after"] < l["channels_before"] == 192 for l in hidden), hidden
    assert all(layers[f"/blocks/blocks.{b}/qkv/MatMul"].get("channels_after", 192) % 48 == 0 for b in range(4))
    assert top1_drop(MODELS / "mnist_vit.onnx", out) <= 0.02


def token_layout_model(dead=()):
    """A token stream without LayerNorm, through the layout ops that keep channels apart: embed (Linear) →
    Concat of a class token along the tokens → Linear + ReLU added back → Reshape to [tokens, C] around a
    BatchNorm (LeViT) → mean of every other token (Slice, ReduceMean) plus the class token (Gather) →
    Unsqueeze and Squeeze → Gemm."""
    c, dead = 24, list(dead)
    inits = [init("cls", rand(1, 1, c)), init("bn_g", rand(c, scale=0.1) + 1), init("bn_b", rand(c, scale=0.1)),
             init("bn_m", rand(c, scale=0.1)), init("bn_v", np.abs(rand(c)) + 0.5), init("flat", np.array([7, c])),
             init("tokens", np.array([1, 7, c])), init("s0", np.array([1])), init("s1", np.array([7])),
             init("ax", np.array([1])), init("st", np.array([2])), init("zero", np.array(0)),
             init("head_w", rand(c, 5)), init("head_b", rand(5))]
    for name in ("cls", "bn_b", "bn_m"):  # dead channels stay zero through the class token and the BatchNorm
        arr = onnx.numpy_helper.to_array(next(t for t in inits if t.name == name)).copy()
        arr[..., dead] = 0.0
        inits = [t for t in inits if t.name != name] + [init(name, arr)]
    nodes = linear("embed", "x", 16, c, "e", inits, dead)
    nodes.append(helper.make_node("Concat", ["cls", "e"], ["t"], axis=1))
    nodes += linear("fc", "t", c, c, "f", inits, dead)
    nodes += [helper.make_node("Relu", ["f"], ["fr"]), helper.make_node("Add", ["t", "fr"], ["s"]),
              helper.make_node("Reshape", ["s", "flat"], ["s2"]),
              helper.make_node("BatchNormalization", ["s2", "bn_g", "bn_b", "bn_m", "bn_v"], ["b2"]),
              helper.make_node("Reshape", ["b2", "tokens"], ["b"]),
              helper.make_node("Slice", ["b", "s0", "s1", "ax", "st"], ["odd"]),
              helper.make_node("ReduceMean", ["odd"], ["pool"], axes=[1], keepdims=0),
              helper.make_node("Gather", ["b", "zero"], ["first"], axis=1),
              helper.make_node("Add", ["pool", "first"], ["feat"]),
              helper.make_node("Unsqueeze", ["feat", "s0"], ["lifted"]),  # [1, 1, C]
              helper.make_node("Squeeze", ["lifted", "s0"], ["flat_feat"]),
              helper.make_node("Gemm", ["flat_feat", "head_w", "head_b"], ["y"], name="head")]
    return model(nodes, [("x", TensorProto.FLOAT, [1, 6, 16])], [("y", TensorProto.FLOAT, [1, 5])], inits, opset=13)


def test_layout_ops_that_keep_channels_apart_carry_the_token_stream_to_the_head(tmp_path):
    proto = token_layout_model(dead=range(0, 24, 4))
    spaces, analysis = spaces_of(proto)
    stream = spaces["embed"]
    assert not stream.blocked and spaces["fc"] is stream
    assert {n.op for n in stream.followers} >= {"Concat", "BatchNormalization"}
    assert [analysis.axis[t] for t in ("t", "s2", "b", "odd", "pool", "first", "lifted", "flat_feat")] == \
        [2, 1, 2, 2, 1, 1, 2, 1]
    out = pruned(tmp_path, proto, dead_ratio(proto))
    assert weight_shape(out, "embed") == (16, 18) and weight_shape(out, "head") == (18, 5)
    outputs_close(proto, out, feed(proto))


def test_a_class_token_expanded_to_a_dynamic_batch_joins_the_stream_it_is_concatenated_with(tmp_path):
    """torch's `cls.expand(B, -1, -1)` on a dynamic batch stays an Expand of the constant to a size read at run
    time (Shape → Gather → Concat with ones, as fold-constants leaves it): its channels are the constant's, so the Concat with the embedding keeps the
    stream one space (it blocked it before). Dead embedding channels go with the class token's entries, and the
    pruned model answers as before at batch 1 and 3."""
    c, dead = 24, list(range(0, 24, 4))
    cls = rand(1, 1, c)
    cls[..., dead] = 0.0
    inits = [init("cls", cls), init("i0", np.array(0, np.int64)), init("ax0", np.array([0], np.int64)),
             init("ones", np.ones(2, np.int64)), init("head_w", rand(c, 5)), init("head_b", rand(5))]
    nodes = [helper.make_node("Shape", ["x"], ["x_shape"]), helper.make_node("Gather", ["x_shape", "i0"], ["n"], axis=0),
             helper.make_node("Unsqueeze", ["n", "ax0"], ["n1"]),
             helper.make_node("Concat", ["n1", "ones"], ["sizes"], axis=0),
             helper.make_node("Expand", ["cls", "sizes"], ["cls_n"], name="expand_cls")]
    nodes += linear("embed", "x", 16, c, "e", inits, dead)
    nodes.append(helper.make_node("Concat", ["cls_n", "e"], ["t"], axis=1, name="join"))
    nodes += linear("fc", "t", c, c, "f", inits, dead)
    nodes += [helper.make_node("Relu", ["f"], ["fr"]), helper.make_node("Add", ["t", "fr"], ["s"]),
              helper.make_node("ReduceMean", ["s"], ["pool"], axes=[1], keepdims=0),
              helper.make_node("Gemm", ["pool", "head_w", "head_b"], ["y"], name="head")]
    proto = model(nodes, [("x", TensorProto.FLOAT, ["N", 6, 16])], [("y", TensorProto.FLOAT, ["N", 5])], inits)
    spaces, _ = spaces_of(proto)
    assert not spaces["embed"].blocked and spaces["fc"] is spaces["embed"]
    assert "expand_cls" in [n.name for n in spaces["embed"].followers]
    out = pruned(tmp_path, proto, dead_ratio(proto))
    assert weight_shape(out, "embed") == (16, 18) and weight_shape(out, "head") == (18, 5)
    for batch in (1, 3):
        outputs_close(proto, out, feed(proto, batch))


@pytest.mark.parametrize("op", ["ReduceMax", "Slice", "Concat"])
def test_layout_ops_across_the_channel_axis_block_it(op):
    """On features in the last axis, a max over them (a mean is a statistic normalizer_fit corrects), a Slice
    of them or a Concat along them is not followed: the embedding's channels stay."""
    inits = [init("starts", np.array([0])), init("ends", np.array([12])), init("axes", np.array([2]))]
    nodes = linear("embed", "x", 16, 24, "e", inits)
    if op == "ReduceMax":
        nodes += [helper.make_node("ReduceMax", ["e"], ["m"], axes=[2]), helper.make_node("Sub", ["e", "m"], ["r"])]
        width = 24
    elif op == "Slice":
        nodes.append(helper.make_node("Slice", ["e", "starts", "ends", "axes"], ["r"]))
        width = 12
    else:
        nodes.append(helper.make_node("Concat", ["e", "e"], ["r"], axis=2))
        width = 48
    nodes += linear("fc", "r", width, 5, "y", inits)
    proto = model(nodes, [("x", TensorProto.FLOAT, [1, 6, 16])], [("y", TensorProto.FLOAT, [1, 6, 5])], inits)
    spaces, _ = spaces_of(proto)
    assert f"({op})" in spaces["embed"].blocked


def test_sparse_pruning_gives_a_bias_free_token_linear_a_bias_add_that_corrects_its_mean(tmp_path):
    """A bias-free MatMul on tokens has no bias input for the mean shift of its pruned weights: sparse pruning
    inserts an Add after it (under its output name), and that Add brings the outputs closer to the float's."""
    from compiler.runtime import run_model

    inits = list(SCALARS)
    nodes = linear("fc1", "x", 8, 32, "h", inits) + gelu("h", "g")
    inits.append(init("fc2_w", rand(32, 8, scale=0.3)))
    nodes.append(helper.make_node("MatMul", ["g", "fc2_w"], ["y"], name="fc2"))
    proto = model(nodes, [("x", TensorProto.FLOAT, [1, 5, 8])], [("y", TensorProto.FLOAT, [1, 5, 8])], inits, opset=17)
    out = pruned(tmp_path, proto, 0.6, mode="sparse", classifier="true")
    fc2 = next(n for n in out.graph.node if n.name == "fc2")
    bias_add = next(n for n in out.graph.node if fc2.output[0] in n.input)
    assert bias_add.op_type == "Add" and bias_add.output[0] == "y"
    without = onnx.ModelProto()
    without.CopyFrom(out)
    for t in without.graph.initializer:
        if t.name in bias_add.input:
            t.CopyFrom(onnx.numpy_helper.from_array(np.zeros_like(onnx.numpy_helper.to_array(t)), t.name))
    x = {"x": np.random.default_rng(1).standard_normal((1, 5, 8)).astype(np.float32)}
    want = run_model(proto, x)[0]
    error = {name: float(np.abs(run_model(m, x)[0] - want).mean()) for name, m in (("with", out), ("without", without))}
    assert error["with"] < error["without"], error


def test_a_ratio_a_blocked_space_leaves_out_of_reach_is_refused_with_the_ratio_that_fits(tmp_path):
    """conv1's channels are read across by a MatMul over the width axis: only conv0's may go."""
    from compiler.errors import DrpcError

    proto = transposed_reader_model(matmul_axis_last=False)
    with pytest.raises(DrpcError) as refused:
        pruned(tmp_path, proto, 0.97)
    message = str(refused.value)
    most = int(message.split("can remove at most ")[1].split("%")[0])
    assert f"--prune {most / 100:.2f} fits, or --prune-mode sparse" in message, message
    pruned(tmp_path, proto, most / 100)


def test_a_reshape_whose_zero_would_copy_another_axis_in_place_of_the_channels_blocks_them():
    """[1, 4 tokens, 4 features] → Reshape [4, 0]: the 0 copies the token count into the features' place, so
    after pruning it would no longer state the channel count; the embedding's channels stay."""
    inits = [init("target", np.array([4, 0])), init("head_w", rand(4, 5)), init("head_b", rand(5))]
    nodes = linear("embed", "x", 8, 4, "e", inits) + [
        helper.make_node("Reshape", ["e", "target"], ["r"]),
        helper.make_node("Gemm", ["r", "head_w", "head_b"], ["y"], name="head")]
    proto = model(nodes, [("x", TensorProto.FLOAT, [1, 4, 8])], [("y", TensorProto.FLOAT, [4, 5])], inits)
    spaces, _ = spaces_of(proto)
    assert "(Reshape)" in spaces["embed"].blocked


@pytest.mark.parametrize("flatten", ["Flatten", "Reshape"])
def test_a_channels_last_flatten_into_a_dense_layer_takes_each_channel_from_every_position(tmp_path, flatten):
    """Keras models exported by tf2onnx flatten NHWC: feature p·C + c of the Dense input is channel c at position
    p, so a removed channel takes one row of the Dense weight from every position."""
    inits = []
    for name, cout, cin, dead in (("w0", 4, 3, ()), ("w1", 5, 4, (3,))):
        w, b = rand(cout, cin, 3, 3, scale=0.5), rand(cout, scale=0.1)
        w[list(dead)], b[list(dead)] = 0.0, 0.0
        inits += [init(name, w), init(name + "_b", b)]
    inits += [init("wf", rand(4 * 4 * 5, 7)), init("bf", rand(7)), init("flat", np.array([-1, 80], np.int64))]
    flat = helper.make_node("Flatten", ["nhwc"], ["f"]) if flatten == "Flatten" else \
        helper.make_node("Reshape", ["nhwc", "flat"], ["f"])
    nodes = [helper.make_node("Conv", ["x", "w0", "w0_b"], ["c0"], name="conv0", pads=[1, 1, 1, 1]),
             helper.make_node("Relu", ["c0"], ["r0"]),
             helper.make_node("Conv", ["r0", "w1", "w1_b"], ["c1"], name="conv1", pads=[1, 1, 1, 1], strides=[2, 2]),
             helper.make_node("Relu", ["c1"], ["r1"]), helper.make_node("Transpose", ["r1"], ["nhwc"], perm=[0, 2, 3, 1]),
             flat, helper.make_node("Gemm", ["f", "wf", "bf"], ["y"], name="head")]
    proto = model(nodes, [("x", TensorProto.FLOAT, [1, 3, 8, 8])], [("y", TensorProto.FLOAT, [1, 7])], inits)
    out = pruned(tmp_path, proto, dead_ratio(proto))
    assert weight_shape(out, "conv1")[0] == 4
    assert weight_shape(out, "head") == (16 * 4, 7)
    outputs_close(proto, out, feed(proto))


def byte_embedding_model(dead=()):
    """magika's front as jax2tf and tf2onnx write it: a Dense embedding of 16 positions x 8 features into 6
    channels; a Reshape to [batch, 4, 24] (4 positions' channels side by side) whose target is Cast(Concat(batch,
    4, 24)) of int32 pieces; a LayerNorm over the positions written out, its statistics reshaped and Expanded
    back with such a shape; then Unsqueeze, a Slice over every axis and a Transpose into a Conv over the
    positions."""
    inits = []
    nodes = linear("embed", "x", 8, 6, "e", inits, dead)
    nodes.append(helper.make_node("Tanh", ["e"], ["t"]))
    beta = rand(1, 1, 24, scale=0.1)
    beta[..., [f for f in range(24) if f % 6 in dead]] = 0.0
    w, b = rand(5, 24, 3, 1, scale=0.3), rand(5, scale=0.1)
    inits += [init("four", np.array([4], np.int32)), init("one_i", np.array([1], np.int32)),
              init("width", np.array([24], np.int32)), init("zero", np.array([0], np.int64)),
              init("first", np.array([1], np.int64)), init("axis1", np.array([1], np.int64)),
              init("axis3", np.array([3], np.int64)), init("quarter", np.float32(0.25)), init("floor", np.float32(1e-3)),
              init("eps", np.float32(1e-6)), init("gamma", rand(1, 1, 24, scale=0.1) + 1), init("beta", beta),
              init("starts", np.zeros(4, np.int64)), init("ends", np.full(4, 10**9, np.int64)),
              init("cw", w), init("cb", b), init("hw", rand(5, 3)), init("hb", rand(3))]

    def shape(name, middle):
        return [helper.make_node("Concat", ["batch", middle, "width"], [name + "_i32"], axis=0),
                helper.make_node("Cast", [name + "_i32"], [name], to=TensorProto.INT64)]

    nodes += [helper.make_node("Shape", ["x"], ["xs"]), helper.make_node("Cast", ["xs"], ["xs32"], to=TensorProto.INT32),
              helper.make_node("Slice", ["xs32", "zero", "first"], ["batch"])]
    nodes += shape("tokens", "four") + shape("stat", "one_i")
    nodes += [helper.make_node("Reshape", ["t", "tokens"], ["r"], name="merge"),
              helper.make_node("ReduceSum", ["r", "axis1"], ["s"], keepdims=0),
              helper.make_node("Mul", ["s", "quarter"], ["mean"]), helper.make_node("Mul", ["r", "r"], ["r2"]),
              helper.make_node("ReduceSum", ["r2", "axis1"], ["s2"], keepdims=0),
              helper.make_node("Mul", ["s2", "quarter"], ["m2"]), helper.make_node("Mul", ["mean", "mean"], ["mm"]),
              helper.make_node("Sub", ["m2", "mm"], ["d"]), helper.make_node("Max", ["floor", "d"], ["var"])]
    for stat in ("mean", "var"):
        nodes += [helper.make_node("Reshape", [stat, "stat"], [stat + "_r"]),
                  helper.make_node("Expand", [stat + "_r", "stat"], [stat + "_b"])]
    nodes += [helper.make_node("Add", ["var_b", "eps"], ["ve"]), helper.make_node("Sqrt", ["ve"], ["sd"]),
              helper.make_node("Reciprocal", ["sd"], ["inv"]), helper.make_node("Mul", ["inv", "gamma"], ["scale"]),
              helper.make_node("Sub", ["r", "mean_b"], ["centred"]), helper.make_node("Mul", ["centred", "scale"], ["n"]),
              helper.make_node("Add", ["n", "beta"], ["ln"]), helper.make_node("Unsqueeze", ["ln", "axis3"], ["u"]),
              helper.make_node("Slice", ["u", "starts", "ends"], ["sl"]),
              helper.make_node("Transpose", ["sl"], ["nchw"], perm=[0, 2, 1, 3]),
              helper.make_node("Conv", ["nchw", "cw", "cb"], ["c"], name="conv", pads=[1, 0, 1, 0]),
              helper.make_node("Relu", ["c"], ["cr"]), helper.make_node("GlobalMaxPool", ["cr"], ["g"]),
              helper.make_node("Flatten", ["g"], ["gf"]), helper.make_node("Gemm", ["gf", "hw", "hb"], ["y"], name="head")]
    return model(nodes, [("x", TensorProto.FLOAT, [1, 16, 8])], [("y", TensorProto.FLOAT, [1, 3])], inits,
                 opset=15)  # as magika: onnx's shape inference follows a Cast of shape values from opset 14 on


def test_an_embedding_merged_across_positions_loses_its_dead_channels_at_every_position(tmp_path):
    spaces, _ = spaces_of(byte_embedding_model())
    assert not spaces["embed"].blocked and spaces["embed"].channels == 6
    proto = byte_embedding_model(dead=(1, 4))
    out = pruned(tmp_path, proto, dead_ratio(proto))
    assert weight_shape(out, "embed") == (8, 4)
    assert weight_shape(out, "conv") == (5, 16, 3, 1)  # 4 kept channels at each of the 4 merged positions
    widths = [int(onnx.numpy_helper.to_array(t)[0]) for t in out.graph.initializer
              if t.data_type == TensorProto.INT32 and len(t.dims) == 1 and t.dims[0] == 1]
    assert 16 in widths and 24 not in widths  # both shapes built at run time now count the kept features
    outputs_close(proto, out, feed(proto))
