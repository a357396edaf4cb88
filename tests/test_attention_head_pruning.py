"""Channel pruning of whole attention heads (passes/attention_heads.py): a head's q, k and v rows of the
projection(s) before the attention, its columns of the output projection, and its entries of per-head
constants go together, and the split and merge Reshapes state one head fewer.

A "dead" head has zero q, k and v weights and biases: its attention is uniform over zero values, so it adds
nothing, and removing it must leave the outputs as onnxruntime computes them on the original model. The forms:
timm's fused qkv on tokens with a per-head bias, separate q/k/v Linears with shapes built from Shape() at run
time, YOLO11's attention on NCHW tensors, and the shipped trained ViT in both PyTorch exports.
"""

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper

from compiler.runtime import run_model
from graphs import init, model, outputs_close, rand
from passes.channel_groups import Piece, Space
from passes.prune_channel import _step
from test_channel_pruning import dead_ratio, feed, pruned
from test_channels_last_pruning import (MODELS, compile_sample, linear, norm, spaces_of, top1_drop,
                                        weight_shape)

T, C, H, D = 6, 16, 4, 4  # tokens, features, heads, head width


def head_columns(heads, parts=3):
    """Feature indices of `heads` in a projection writing `parts` (q, k, v) blocks of H heads of D features."""
    return [p * C + h * D + d for p in range(parts) for h in heads for d in range(D)]


def fused_attention_model(dead=(), softmax_axis=-1):
    """Pre-norm attention as timm writes it, on x[1, T, C]: LayerNorm → qkv Linear → Reshape [1, T, 3, H, D] →
    Transpose [3, 1, H, T, D] → Split + Squeeze into q, k, v → q·kᵀ → scale → + relative position bias [H, T, T]
    → Softmax → ·v → Transpose → Reshape [1, T, C] → proj Linear → + x → Linear head on every token."""
    inits = [init("scale", np.float32(D ** -0.5)), init("rel", rand(H, T, T, scale=0.5)),
             init("split_shape", np.array([1, T, 3, H, D])), init("merge_shape", np.array([1, T, C])),
             init("ones", np.array([1, 1, 1])), init("zero", np.array([0]))]
    nodes = norm("x", "n", C, inits, "ln")
    nodes += linear("qkv", "n", C, 3 * C, "qkv_out", inits, head_columns(dead))
    nodes += [helper.make_node("Reshape", ["qkv_out", "split_shape"], ["heads"], name="split"),
              helper.make_node("Transpose", ["heads"], ["qkv_t"], perm=[2, 0, 3, 1, 4]),
              helper.make_node("Split", ["qkv_t", "ones"], ["q5", "k5", "v5"], axis=0)]
    nodes += [helper.make_node("Squeeze", [f"{p}5", "zero"], [p]) for p in "qkv"]
    nodes += [helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
              helper.make_node("MatMul", ["q", "kt"], ["logits"]), helper.make_node("Mul", ["logits", "scale"], ["scaled"]),
              helper.make_node("Add", ["scaled", "rel"], ["biased"], name="rel_bias"),
              helper.make_node("Softmax", ["biased"], ["attn"], axis=softmax_axis),
              helper.make_node("MatMul", ["attn", "v"], ["ctx"]),
              helper.make_node("Transpose", ["ctx"], ["ctx_t"], perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["ctx_t", "merge_shape"], ["merged"], name="merge")]
    nodes += linear("proj", "merged", C, C, "p", inits)
    nodes.append(helper.make_node("Add", ["x", "p"], ["r"]))
    nodes += linear("head", "r", C, 5, "y", inits)
    return model(nodes, [("x", TensorProto.FLOAT, [1, T, C])], [("y", TensorProto.FLOAT, [1, T, 5])], inits, opset=17)


def separate_attention_model(dead=()):
    """Attention with separate q, k and v Linears on x[N, T, C] (a dynamic batch), each reshaped to
    [N, T, H, D] by a shape built from Shape(x) as torch.onnx writes it, heads merged back the same way."""
    inits = [init("scale", np.float32(D ** -0.5)), init("i0", np.array(0)), init("a0", np.array([0])),
             init("tc", np.array([T])), init("h", np.array([H])), init("d", np.array([D])), init("c", np.array([C]))]
    nodes = [helper.make_node("Shape", ["x"], ["xs"]), helper.make_node("Gather", ["xs", "i0"], ["n0"], axis=0),
             helper.make_node("Unsqueeze", ["n0", "a0"], ["n"]),
             helper.make_node("Concat", ["n", "tc", "h", "d"], ["split_shape"], axis=0),
             helper.make_node("Concat", ["n", "tc", "c"], ["merge_shape"], axis=0)]
    for p in "qkv":
        nodes += linear(p, "x", C, C, f"{p}_out", inits, head_columns(dead, parts=1))
        nodes += [helper.make_node("Reshape", [f"{p}_out", "split_shape"], [f"{p}4"], name=f"split_{p}"),
                  helper.make_node("Transpose", [f"{p}4"], [f"{p}h"], perm=[0, 2, 3, 1] if p == "k" else [0, 2, 1, 3])]
    nodes += [helper.make_node("MatMul", ["qh", "kh"], ["logits"]), helper.make_node("Div", ["logits", "scale"], ["scaled"]),
              helper.make_node("Softmax", ["scaled"], ["attn"], axis=-1), helper.make_node("MatMul", ["attn", "vh"], ["ctx"]),
              helper.make_node("Transpose", ["ctx"], ["ctx_t"], perm=[0, 2, 1, 3]),
              helper.make_node("Reshape", ["ctx_t", "merge_shape"], ["merged"], name="merge")]
    nodes += linear("proj", "merged", C, C, "p", inits)
    nodes.append(helper.make_node("Add", ["x", "p"], ["r"]))
    nodes += linear("head", "r", C, 5, "y", inits)
    return model(nodes, [("x", TensorProto.FLOAT, ["N", T, C])], [("y", TensorProto.FLOAT, ["N", T, 5])], inits,
                 opset=17)


def psa_model(dead=(), pe_of_x=False):
    """YOLO11's position-sensitive attention on NCHW x[1, 16, 4, 4]: a 1×1 Conv writes 2 heads of q, k (2 each)
    and v (8) → Reshape [1, 2, 12, 16] → Split along the head's features → qᵀ·k → scale → Softmax → v·attnᵀ →
    Reshape [1, 16, 4, 4], plus a depthwise Conv of v reshaped the same way → 1×1 proj Conv → + x → pooled
    Gemm head. Dead heads have zero q, k, v filters and positional-conv bias. `pe_of_x`: the positional conv is
    a full 3×3 Conv of x instead, so its output channels are not heads."""
    heads, kd, hd = 2, 2, 8
    per = 2 * kd + hd
    w, b = rand(heads * per, C, 1, 1, scale=0.5), rand(heads * per, scale=0.1)
    pe_b = rand(heads * hd, scale=0.1)
    for h in dead:
        w[h * per:(h + 1) * per], b[h * per:(h + 1) * per], pe_b[h * hd:(h + 1) * hd] = 0.0, 0.0, 0.0
    inits = [init("qkv_w", w), init("qkv_b", b), init("pe_w", rand(heads * hd, 1, 3, 3, scale=0.3)), init("pe_b", pe_b),
             init("proj_w", rand(C, heads * hd, 1, 1, scale=0.3)), init("proj_b", rand(C, scale=0.1)),
             init("fc_w", rand(5, C)), init("fc_b", rand(5)), init("scale", np.float32(kd ** -0.5)),
             init("split_shape", np.array([1, heads, per, 16])), init("image", np.array([1, heads * hd, 4, 4])),
             init("sizes", np.array([kd, kd, hd])), init("pe_full", rand(heads * hd, C, 3, 3, scale=0.1))]
    nodes = [helper.make_node("Conv", ["x", "qkv_w", "qkv_b"], ["qkv"], name="qkv"),
             helper.make_node("Reshape", ["qkv", "split_shape"], ["heads"], name="split"),
             helper.make_node("Split", ["heads", "sizes"], ["q", "k", "v"], axis=2),
             helper.make_node("Transpose", ["q"], ["qt"], perm=[0, 1, 3, 2]),
             helper.make_node("MatMul", ["qt", "k"], ["logits"]), helper.make_node("Mul", ["logits", "scale"], ["scaled"]),
             helper.make_node("Softmax", ["scaled"], ["attn"], axis=-1),
             helper.make_node("Transpose", ["attn"], ["attn_t"], perm=[0, 1, 3, 2]),
             helper.make_node("MatMul", ["v", "attn_t"], ["ctx"]),
             helper.make_node("Reshape", ["ctx", "image"], ["merged"], name="merge"),
             helper.make_node("Reshape", ["v", "image"], ["v_image"], name="merge_v"),
             helper.make_node("Conv", ["x", "pe_full", "pe_b"], ["pe"], name="pe", pads=[1, 1, 1, 1]) if pe_of_x else
             helper.make_node("Conv", ["v_image", "pe_w", "pe_b"], ["pe"], name="pe", group=heads * hd, pads=[1, 1, 1, 1]),
             helper.make_node("Add", ["merged", "pe"], ["mixed"]),
             helper.make_node("Conv", ["mixed", "proj_w", "proj_b"], ["p"], name="proj"),
             helper.make_node("Add", ["x", "p"], ["r"]), helper.make_node("GlobalAveragePool", ["r"], ["g"]),
             helper.make_node("Flatten", ["g"], ["f"]), helper.make_node("Gemm", ["f", "fc_w", "fc_b"], ["y"], name="fc", transB=1)]
    return model(nodes, [("x", TensorProto.FLOAT, [1, C, 4, 4])], [("y", TensorProto.FLOAT, [1, 5])], inits, opset=17)


def torch_mha_model(dead=()):
    """torch's nn.MultiheadAttention as its exporters write it, on x[1, T, C] (batch first): Transpose to
    [T, 1, C] → packed in_proj (MatMul + bias Add, 3·C outputs) → Reshape [T, 1, 3, C] → Unsqueeze → Transpose →
    Squeeze → Gather q, k, v → each Reshape [T, H, D] → Transpose [H, T, D] → Reshape [1, H, T, D] → scaled
    q·kᵀ → Softmax → ·v → Transpose [T, 1, H, D] → Reshape [T, C] → out_proj Gemm → back to [1, T, C] → + x."""
    inits = [init("scale", np.float32(D ** -0.5)), init("unflat", np.array([T, 1, 3, C])), init("a0", np.array([0])),
             init("a3", np.array([3])), init("per_head", np.array([T, H, D])), init("batched", np.array([1, H, T, D])),
             init("merge_shape", np.array([T, C])), init("back", np.array([T, 1, C])),
             init("out_w", rand(C, C, scale=C ** -0.5)), init("out_b", rand(C, scale=0.1))]
    inits += [init(f"i{p}", np.array(k)) for k, p in enumerate("qkv")]
    nodes = [helper.make_node("Transpose", ["x"], ["tokens"], perm=[1, 0, 2])]
    nodes += linear("in_proj", "tokens", C, 3 * C, "packed", inits, head_columns(dead))
    nodes += [helper.make_node("Reshape", ["packed", "unflat"], ["u"]), helper.make_node("Unsqueeze", ["u", "a0"], ["u1"]),
              helper.make_node("Transpose", ["u1"], ["u2"], perm=[3, 1, 2, 0, 4]),
              helper.make_node("Squeeze", ["u2", "a3"], ["u3"])]
    for p in "qkv":
        nodes += [helper.make_node("Gather", ["u3", f"i{p}"], [p], axis=0),
                  helper.make_node("Reshape", [p, "per_head"], [f"{p}3"], name=f"split_{p}"),
                  helper.make_node("Transpose", [f"{p}3"], [f"{p}t"], perm=[1, 0, 2]),
                  helper.make_node("Reshape", [f"{p}t", "batched"], [f"{p}4"])]
    nodes += [helper.make_node("Transpose", ["k4"], ["kT"], perm=[0, 1, 3, 2]),
              helper.make_node("MatMul", ["q4", "kT"], ["logits"]), helper.make_node("Mul", ["logits", "scale"], ["scaled"]),
              helper.make_node("Softmax", ["scaled"], ["attn"], axis=-1), helper.make_node("MatMul", ["attn", "v4"], ["ctx"]),
              helper.make_node("Transpose", ["ctx"], ["ctx_t"], perm=[2, 0, 1, 3]),
              helper.make_node("Reshape", ["ctx_t", "merge_shape"], ["merged"], name="merge"),
              helper.make_node("Gemm", ["merged", "out_w", "out_b"], ["o"], name="out_proj", transB=1),
              helper.make_node("Reshape", ["o", "back"], ["o3"]), helper.make_node("Transpose", ["o3"], ["o4"], perm=[1, 0, 2]),
              helper.make_node("Add", ["x", "o4"], ["r"])]
    nodes += linear("head", "r", C, 5, "y", inits)
    return model(nodes, [("x", TensorProto.FLOAT, [1, T, C])], [("y", TensorProto.FLOAT, [1, T, 5])], inits, opset=17)


def test_the_packed_projection_of_torch_attention_unpacks_into_three_with_the_same_outputs():
    from compiler.ir import Module
    from passes.unpack_projection import unpack_projections

    proto = torch_mha_model()
    module = Module.from_proto(proto)
    module.infer_shapes()
    assert unpack_projections(module.graph) == 3
    out = module.to_proto()
    assert sorted(n.name for n in out.graph.node if n.op_type == "MatMul" and n.name.startswith("in_proj")) == \
        ["in_proj_part0", "in_proj_part1", "in_proj_part2"]
    assert not any(n.op_type == "Gather" for n in out.graph.node)
    outputs_close(proto, out, feed(proto))


def test_dead_heads_of_torch_attention_go_without_changing_the_outputs(tmp_path):
    proto = torch_mha_model(dead=(2,))
    out = pruned(tmp_path, proto, dead_ratio_unpacked(proto))
    parts = [n for n in out.graph.node if n.op_type == "MatMul" and n.name.startswith("in_proj")]
    assert len(parts) == 3 and all(weight_shape(out, n.name) == (C, C - D) for n in parts)
    assert weight_shape(out, "out_proj") == (C, C - D)
    outputs_close(proto, out, feed(proto))


def dead_ratio_unpacked(proto) -> float:
    """`dead_ratio` of the model as channel pruning sees it: its packed projections unpacked first."""
    from compiler.ir import Module
    from passes.unpack_projection import unpack_projections

    module = Module.from_proto(proto)
    module.infer_shapes()
    unpack_projections(module.graph)
    return dead_ratio(module.to_proto())


def test_the_heads_of_a_fused_qkv_projection_are_one_channel_space():
    spaces, analysis = spaces_of(fused_attention_model())
    heads = spaces["qkv"]
    assert not heads.blocked and (heads.channels, heads.block) == (H, D)
    assert analysis.view["qkv_out"] == [Piece(heads.index, 0, H, D)] * 3  # q, k, v: each head's D rows in a row
    assert analysis.view["merged"] == [Piece(heads.index, 0, H, D)]
    assert {f.name for f in heads.followers} == {"qkv_bias", "rel_bias"}  # the bias Add and the per-head bias
    assert ("proj", "merged") in [(n.name, t) for n, t in analysis.consumers]
    assert [(n.name, entry) for n, entry, s in analysis.heads] == [("split", 3)]
    assert spaces["proj"].blocked  # the residual stream


def test_dead_heads_go_without_changing_the_outputs(tmp_path):
    proto = fused_attention_model(dead=(1,))
    out = pruned(tmp_path, proto, dead_ratio(proto))
    assert weight_shape(out, "qkv") == (C, 3 * (C - D)) and weight_shape(out, "proj") == (C - D, C)
    inits = {t.name: onnx.numpy_helper.to_array(t) for t in out.graph.initializer}
    shapes = {n.name: inits[n.input[1]].tolist() for n in out.graph.node if n.op_type == "Reshape"}
    assert shapes == {"split": [1, T, 3, H - 1, D], "merge": [1, T, C - D]}
    rel = next(n for n in out.graph.node if n.name == "rel_bias")
    assert inits[rel.input[1]].shape == (H - 1, T, T)
    outputs_close(proto, out, feed(proto))


def test_dead_heads_of_separate_projections_go_with_shapes_built_at_run_time(tmp_path):
    proto = separate_attention_model(dead=(0, 2))
    spaces, analysis = spaces_of(proto)
    assert spaces["q"] is spaces["k"] is spaces["v"] and spaces["q"].channels == H
    out = pruned(tmp_path, proto, dead_ratio(proto))
    assert all(weight_shape(out, p) == (C, C - 2 * D) for p in "qkv") and weight_shape(out, "proj") == (C - 2 * D, C)
    outputs_close(proto, out, feed(proto, n=3))  # the batch stays dynamic


def test_dead_heads_of_nchw_attention_go_with_their_positional_conv(tmp_path):
    proto = psa_model(dead=(1,))
    spaces, analysis = spaces_of(proto)
    heads = spaces["qkv"]
    assert not heads.blocked and (heads.channels, heads.block) == (2, 4)  # q/k 2 + v 8 per head: blocks 12 and 8
    assert analysis.view["qkv"] == [Piece(heads.index, 0, 2, 12)] and analysis.axis["merged"] == 1
    assert analysis.view["merged"] == analysis.view["v_image"] == [Piece(heads.index, 0, 2, 8)]  # two merges agree
    out = pruned(tmp_path, proto, dead_ratio(proto))
    assert weight_shape(out, "qkv") == (12, C, 1, 1) and weight_shape(out, "proj") == (C, 8, 1, 1)
    assert weight_shape(out, "pe") == (8, 1, 3, 3)
    outputs_close(proto, out, feed(proto))


def test_merged_heads_added_to_other_channels_keep_the_heads_whole():
    spaces, analysis = spaces_of(psa_model(pe_of_x=True))
    assert "mixed with other channels" in spaces["qkv"].blocked and spaces["qkv"].channels == 2


def test_live_heads_go_in_steps_that_keep_the_features_aligned_and_the_outputs_close(tmp_path):
    assert _step(Space(0, H, block=D), 8) == 2 and _step(Space(0, H, block=16), 8) == 1
    proto = fused_attention_model()
    out = pruned(tmp_path, proto, 0.45, round_to=8)
    assert weight_shape(out, "qkv") == (C, 3 * 2 * D)  # two heads of four features: an 8-aligned width
    x = feed(proto)
    want, got = run_model(proto, x)[0], run_model(out, x)[0]
    assert np.linalg.norm(got - want) < 0.5 * np.linalg.norm(want)


def test_a_unit_axis_is_not_a_head_axis():
    """torch's nn.MultiheadAttention works on [tokens, batch, features]: its in_proj output [6, 1, 48] is reshaped
    to [6, 1, 3, 16] and each of q, k, v to [6, 4, 4] (tokens, batch·heads, head width). Read with the batch's
    unit axis, the first looks like the tokens split into [6, 1] and the second like [6, 1] merged back, with
    only token-separable ops between: that must not be taken for heads."""
    from compiler.ir import Module
    from passes.attention_heads import head_regions

    inits = [init("w", rand(16, 48)), init("unflat", np.array([6, 1, 3, 16])), init("zero", np.array(0)),
             init("per_head", np.array([6, 4, 4]))]
    nodes = [helper.make_node("MatMul", ["x", "w"], ["packed"]), helper.make_node("Reshape", ["packed", "unflat"], ["u"]),
             helper.make_node("Gather", ["u", "zero"], ["q"], axis=2), helper.make_node("Reshape", ["q", "per_head"], ["y"])]
    module = Module.from_proto(model(nodes, [("x", TensorProto.FLOAT, [6, 1, 16])], [("y", TensorProto.FLOAT, [6, 4, 4])],
                                     inits, opset=17))
    module.infer_shapes()
    assert head_regions(module.graph) == []


def test_a_softmax_across_the_heads_keeps_them_whole():
    spaces, analysis = spaces_of(fused_attention_model(softmax_axis=1))
    assert spaces["qkv"].blocked and spaces["qkv"].channels == 3 * C and not analysis.heads


def test_sample_vit_loses_attention_heads_at_0_7_through_the_cli(tmp_path, capsys):
    """The shipped vision transformer at --prune 0.7 (refused before heads were prunable: at most 55%): whole
    heads go from some blocks, every MLP loses hidden features, and test accuracy stays within 6 points."""
    layers, out = compile_sample(tmp_path, "mnist_vit.onnx", 0.7)
    qkv = [layers[f"/blocks/blocks.{b}/qkv/MatMul"] for b in range(4)]
    assert any(l.get("heads_after", 4) < 4 for l in qkv), qkv
    assert all(l.get("channels_after", 192) == 48 * l.get("heads_after", 4) for l in qkv), qkv
    assert all(layers[f"/blocks/blocks.{b}/fc1/MatMul"]["channels_after"] < 192 for b in range(4))
    kept = sum(l.get("heads_after", 4) for l in qkv)
    assert f"; attention heads 16 → {kept}" in capsys.readouterr().out
    assert f"192 → {48 * min(l.get('heads_after', 4) for l in qkv)} (heads 4 → " in (out / "report.html").read_text()
    assert top1_drop(MODELS / "mnist_vit.onnx", out) <= 0.06


def test_the_torch_export_form_of_the_sample_vit_loses_heads_too(tmp_path, capsys):
    """models/mnist_vit_dynamo.onnx (the same weights through torch.export: Slice + Squeeze for q, k and v,
    Reshapes with allowzero=1, the patch tokens made by a constant Reshape [-1, 64, 16] under a dynamic batch):
    all four attentions are head regions, the residual stream is one space from the patch embedding on, and
    --prune 0.7 prunes heads and narrows the stream with the same accuracy as the TorchScript form."""
    spaces, analysis = spaces_of(onnx.load(str(MODELS / "mnist_vit_dynamo.onnx")))
    assert len(analysis.heads) == 4 and all(analysis.spaces[s].channels == 4 and not analysis.spaces[s].blocked
                                            for _, _, s in analysis.heads)
    assert "node_conv2d" in spaces and not spaces["node_conv2d"].blocked
    layers, out = compile_sample(tmp_path, "mnist_vit_dynamo.onnx", 0.7)
    assert "; attention heads 16 → " in capsys.readouterr().out
    assert layers["node_conv2d"]["channels_after"] < 64
    assert top1_drop(MODELS / "mnist_vit_dynamo.onnx", out) <= 0.03


def test_the_sample_built_from_torch_transformer_layers_prunes_heads_and_stream(tmp_path, capsys):
    """models/mnist_mha.onnx (nn.TransformerEncoderLayer, trained on MNIST; its nn.MultiheadAttention packs q, k
    and v into one in_proj) at --prune 0.7: refused before (at most 55%). Now the unpacked projections' heads
    are channel spaces (at 0.5 some go), at 0.7 the residual stream the post-norm LayerNorms read narrows in
    every layer writing it, and test top-1 stays within 6 points."""
    layers, out = compile_sample(tmp_path / "half", "mnist_mha.onnx", 0.5)
    assert "; attention heads 16 → " in capsys.readouterr().out
    parts = [l for name, l in layers.items() if "self_attn/MatMul_part" in name and l["op"] == "MatMul"]  # q, k, v
    assert len(parts) == 12 and any(l.get("heads_after", 4) < 4 for l in parts), parts
    layers, out = compile_sample(tmp_path / "most", "mnist_mha.onnx", 0.7)
    writers = [l for name, l in layers.items() if "/linear2/" in name and l["op"] == "MatMul"]
    assert len(writers) == 4 and all(l["channels_after"] < 64 for l in writers), writers
    assert top1_drop(MODELS / "mnist_mha.onnx", out) <= 0.06


def test_the_dynamic_batch_export_of_the_transformer_sample_prunes_like_its_batch_1_form(tmp_path, capsys):
    """models/mnist_mha_dynamic.onnx (mnist_mha's weights exported with dynamic_axes: the attention folds the heads
    into a batch it reads at run time) at --prune 0.7: refused before (at most 55%: the head axis had no size).
    Now the channels are analysed and pruned on its batch-1 form, and the package keeps the dynamic batch: the
    same kept channels and top-1 as the batch-1 export, and a batch of 5 gives the 5 single-sample outputs."""
    fixed, _ = compile_sample(tmp_path / "fixed", "mnist_mha.onnx", 0.7)
    summary = [line for line in capsys.readouterr().out.splitlines() if line.startswith(("pruning:", "layers:"))]
    layers, out = compile_sample(tmp_path / "dynamic", "mnist_mha_dynamic.onnx", 0.7)
    printed = capsys.readouterr().out
    assert len(summary) == 2 and all(line in printed for line in summary), (summary, printed)
    assert "70.0% of 163,840 prunable weights removed (channel)" in summary[1]

    def kept(deployed):
        return sorted((l["op"], l["params"], l.get("channels_after")) for l in deployed.values()
                      if l["op"] in ("MatMul", "Gemm", "Conv"))
    assert kept(layers) == kept(fixed)
    proto = onnx.load(str(out / "model.onnx"))
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param  # still dynamic
    with np.load(MODELS / "mnist_test.npz") as t:
        x = t["input"][:5]
    together = run_model(proto, {"input": x})[0]
    alone = np.concatenate([run_model(proto, {"input": x[i:i + 1]})[0] for i in range(5)])
    np.testing.assert_allclose(together, alone, atol=1e-5)
    assert top1_drop(MODELS / "mnist_mha_dynamic.onnx", out) <= 0.06


def test_a_model_pruned_at_batch_1_that_loses_its_dynamic_batch_is_refused_in_one_line():
    """check_any_batch runs the pruned model on two calibration samples together and one by one: a Reshape to
    [1, -1] (the batch folded into the features) fails at batch 2, and the error names the batch-1 compile."""
    from compiler.calib_data import load_calibration
    from compiler.errors import UnsupportedModelError
    from compiler.ir import Module
    from compiler.api import input_specs
    from passes.prune_batch_one import check_any_batch

    nodes = [helper.make_node("Reshape", ["x", "flat"], ["f"]), helper.make_node("Gemm", ["f", "w"], ["y"])]
    module = Module.from_proto(model(nodes, [("x", TensorProto.FLOAT, ["N", 4])], [("y", TensorProto.FLOAT, ["N", 3])],
                                     [init("flat", np.array([1, -1], np.int64)), init("w", rand(4, 3))]))
    with pytest.raises(UnsupportedModelError, match=r"does not keep its dynamic batch: it fails at batch 2.*"
                                                    r"--input-shape x=1,4"):
        check_any_batch(module, load_calibration(None, input_specs(module)))
