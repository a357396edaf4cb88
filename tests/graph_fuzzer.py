"""Random but valid small CNN graphs for differential testing of the compiler.

`random_model(rng)` draws one model (input "x" [1, C, H, W], output "y"): convolutions (plain, strided,
depthwise, grouped, with or without bias), BatchNormalization, activations, residual Add, summed Conv
branches over one input (RepVGG-style, with a BatchNorm or identity branch), Concat of two branches,
pooling, nearest Resize, a zero Pad before a Conv, a patch embedding (kernel = stride), a dilated Conv, a channels-last MLP (Transpose, LayerNorm as the op or
written out with means or with sums, MatMul Linear layers, GELU), multi-head self-attention over the pixels
(fused or separate q/k/v, per-head biases; or YOLO11's NCHW form), and optionally a classifier head
(GlobalAveragePool and Flatten, or a Flatten of the NHWC map; Gemm or MatMul+Add), at an opset from 13 to 18.
`cnn_models()` is the hypothesis strategy over it.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, helper, numpy_helper


class _Builder:
    def __init__(self, rng: np.random.Generator, opset: int):
        self.rng, self.opset = rng, opset
        self.nodes, self.inits = [], []
        self.count = 0

    def name(self, base: str) -> str:
        self.count += 1
        return f"{base}_{self.count}"

    def const(self, base: str, value: np.ndarray) -> str:
        name = self.name(base)
        self.inits.append(numpy_helper.from_array(np.asarray(value), name))
        return name

    def node(self, op: str, inputs: list[str], **attrs) -> str:
        out = self.name(op.lower())
        self.nodes.append(helper.make_node(op, inputs, [out], name=self.name(op), **attrs))
        return out

    def weights(self, *shape) -> np.ndarray:
        fan_in = int(np.prod(shape[1:])) or 1
        return (self.rng.standard_normal(shape) * np.sqrt(2.0 / fan_in)).astype(np.float32)

    def conv(self, x, c_in, c_out, k=3, stride=1, group=1, pad=True, bias=True):
        inputs = [x, self.const("w", self.weights(c_out, c_in // group, k, k))]
        if bias:
            inputs.append(self.const("b", (self.rng.standard_normal(c_out) * 0.1).astype(np.float32)))
        p = k // 2 if pad else 0
        return self.node("Conv", inputs, kernel_shape=[k, k], strides=[stride, stride], pads=[p, p, p, p], group=group)


def random_model(rng: np.random.Generator) -> onnx.ModelProto:
    """One random valid CNN (see module docstring); deterministic for a given generator state."""
    opset = int(rng.integers(13, 19))
    b = _Builder(rng, opset)
    c, h, w = int(rng.integers(1, 9)), int(rng.integers(4, 17)) * 2, int(rng.integers(4, 17)) * 2
    x, shape = "x", (c, h, w)
    input_shape = [1, c, h, w]
    same_shape: list[tuple[str, tuple]] = []
    for _ in range(int(rng.integers(2, 9))):
        c, h, w = shape
        kind = rng.choice(["conv", "depthwise", "grouped", "bn", "act", "residual", "concat", "pool", "resize", "padconv",
                           "branches", "tokens", "attention", "psa", "patches", "dilated"])
        if kind == "conv" or (kind == "grouped" and c < 2):
            k = int(rng.choice([1, 3, 5]))
            stride = 2 if h >= 8 and w >= 8 and rng.random() < 0.3 else 1
            c_out = int(rng.integers(1, 17))
            x = b.conv(x, c, c_out, k, stride, bias=bool(rng.random() < 0.7))
            shape = (c_out, (h - 1) // stride + 1, (w - 1) // stride + 1)
        elif kind == "depthwise":
            x = b.conv(x, c, c, 3, group=c)
        elif kind == "grouped":
            g = int(rng.choice([d for d in range(2, c + 1) if c % d == 0]))
            c_out = g * int(rng.integers(1, 5))
            x = b.conv(x, c, c_out, 3, group=g)
            shape = (c_out, h, w)
        elif kind == "bn":
            params = [np.abs(rng.standard_normal(c)).astype(np.float32) + 0.5, rng.standard_normal(c).astype(np.float32),
                      rng.standard_normal(c).astype(np.float32) * 0.1, np.abs(rng.standard_normal(c)).astype(np.float32) + 0.5]
            x = b.node("BatchNormalization", [x] + [b.const(n, p) for n, p in zip(("g", "beta", "mean", "var"), params)])
        elif kind == "act":
            act = rng.choice(["Relu", "Clip", "LeakyRelu", "HardSwish" if opset >= 14 else "Sigmoid"])
            if act == "Clip":
                x = b.node("Clip", [x, b.const("lo", np.array(0, np.float32)), b.const("hi", np.array(6, np.float32))])
            elif act == "LeakyRelu":
                x = b.node("LeakyRelu", [x], alpha=0.1)
            else:
                x = b.node(str(act), [x])
        elif kind == "residual":
            match = [t for t, s in same_shape if s == shape and t != x]
            if match:
                x = b.node("Add", [x, match[int(rng.integers(len(match)))]])
        elif kind == "concat":
            c1, c2 = int(rng.integers(1, 9)), int(rng.integers(1, 9))
            left = b.node("Relu", [b.conv(x, c, c1, 1)])
            right = b.conv(x, c, c2, 3)
            x = b.node("Concat", [left, right], axis=1)
            shape = (c1 + c2, h, w)
        elif kind == "pool" and h >= 4 and w >= 4:
            op = str(rng.choice(["MaxPool", "AveragePool"]))
            x = b.node(op, [x], kernel_shape=[2, 2], strides=[2, 2])
            shape = (c, h // 2, w // 2)
        elif kind == "resize" and h <= 32 and w <= 32:
            scales = b.const("scales", np.array([1, 1, 2, 2], np.float32))
            x = b.node("Resize", [x, "", scales], mode="nearest")
            shape = (c, h * 2, w * 2)
        elif kind == "branches":  # re-parameterizable block in training form: 3×3 + 1×1 (+ BN or identity)
            group = c if rng.random() < 0.4 else 1
            c_out = c if group > 1 or rng.random() < 0.6 else int(rng.integers(1, 17))
            stride = 2 if h >= 8 and w >= 8 and rng.random() < 0.25 else 1
            x_in, x = x, b.node("Add", [b.conv(x, c, c_out, 3, stride, group), b.conv(x, c, c_out, 1, stride, group)])
            if stride == 1 and c_out == c and rng.random() < 0.7:
                params = [np.abs(rng.standard_normal(c)).astype(np.float32) + 0.5, rng.standard_normal(c).astype(np.float32),
                          rng.standard_normal(c).astype(np.float32) * 0.1, np.abs(rng.standard_normal(c)).astype(np.float32) + 0.5]
                bn = b.node("BatchNormalization", [x_in] + [b.const(n, q) for n, q in zip(("g", "beta", "mean", "var"), params)])
                x = b.node("Add", [x, bn if rng.random() < 0.5 else x_in])
            shape = (c_out, (h - 1) // stride + 1, (w - 1) // stride + 1)
        elif kind == "tokens":
            x = _token_mlp(b, x, c, h, w)
        elif kind == "attention" and h * w <= 256:
            x = _attention(b, x, c, h, w)
        elif kind == "psa" and h * w <= 256:
            x, shape = _psa(b, x, c, h, w)
        elif kind == "patches" and h >= 6 and w >= 6:  # a patch embedding (kernel = stride 3 or 4; leftover rows)
            k, c_out = int(rng.choice([3, 4])), int(rng.integers(1, 17))
            x = b.node("Conv", [x, b.const("w", b.weights(c_out, c, k, k))], kernel_shape=[k, k], strides=[k, k])
            shape = (c_out, h // k, w // k)
        elif kind == "dilated":  # an RFB / ASPP branch, padded to keep the size (24 on a smaller map: taps on padding)
            d, c_out = int(rng.choice([2, 3, 4, 5, 8, 12, 24])), int(rng.integers(1, 17))
            x = b.node("Conv", [x, b.const("w", b.weights(c_out, c, 3, 3))], kernel_shape=[3, 3], dilations=[d, d],
                       pads=[d] * 4)
            shape = (c_out, h, w)
        elif kind == "padconv":
            pads = b.const("pads", np.array([0, 0, 1, 1, 0, 0, 1, 1], np.int64))
            padded = b.node("Pad", [x, pads], mode="constant")
            c_out = int(rng.integers(1, 17))
            x = b.conv(padded, c, c_out, 3, pad=False)
            shape = (c_out, h, w)
        same_shape.append((x, shape))
    c, h, w = shape
    if rng.random() < 0.5:
        if rng.random() < 0.5:
            if rng.random() < 0.3 and h * w * c <= 2048:  # Keras via tf2onnx: the NHWC feature map flattened
                nhwc = b.node("Transpose", [x], perm=[0, 2, 3, 1])
                pooled = b.node("Flatten", [nhwc], axis=1) if rng.random() < 0.5 else \
                    b.node("Reshape", [nhwc, b.const("shape", np.array([1, -1], np.int64))])
                c = h * w * c
            else:
                pooled = b.node("Flatten", [b.node("GlobalAveragePool", [x])], axis=1)
        else:  # x.mean([2, 3]) as the exporters write it (reduce-mean-to-pool turns it into the pool)
            axes = [int(a) for a in rng.choice([[2, 3], [-1, -2]])]
            pooled = (b.node("ReduceMean", [x, b.const("axes", np.array(axes, np.int64))], keepdims=0)
                      if opset >= 18 else b.node("ReduceMean", [x], axes=axes, keepdims=0))
        classes = int(rng.integers(2, 11))
        if rng.random() < 0.5:
            y = b.node("Gemm", [pooled, b.const("fc", b.weights(classes, c)), b.const("fcb", np.zeros(classes, np.float32))],
                       transB=1)
        else:
            y = b.node("Add", [b.node("MatMul", [pooled, b.const("fc", b.weights(classes, c).T.copy())]),
                               b.const("fcb", np.zeros(classes, np.float32))])
        out_shape = [1, classes]
    else:
        y, out_shape = x, [1, c, h, w]
    if y == "x":  # no block applied: keep the graph non-empty
        y = b.node("Relu", [x])
    b.nodes[-1].output[0] = "y"  # the last node writes the graph output (nothing else reads it)
    graph = helper.make_graph(b.nodes, "fuzz", [helper.make_tensor_value_info("x", TensorProto.FLOAT, input_shape)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, out_shape)], b.inits)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)])
    model.ir_version = 8
    return model


def _pre_norm(b: _Builder, t: str, c: int) -> str:
    """Maybe a LayerNorm over the last axis, with random scale and bias, as a pre-norm transformer or ConvNeXt
    block writes one before its first Linear: the LayerNormalization op (opset 17 and up), or written out with
    means (opset-13 exports) or with sums that drop the axis, times 1/C (jax2tf)."""
    form = b.rng.random()
    if form < 0.5:
        return t
    scale = b.const("ln_g", (1 + b.rng.standard_normal(c) * 0.3).astype(np.float32))
    shift = b.const("ln_b", (b.rng.standard_normal(c) * 0.1).astype(np.float32))
    if b.opset >= 17 and form < 0.7:
        return b.node("LayerNormalization", [t, scale, shift], axis=-1)
    last = b.const("axes", np.array([-1], np.int64))
    eps = b.const("eps", np.array(1e-5, np.float32))

    def reduce(op, x, keepdims):  # ReduceSum reads its axes as an input from opset 13, ReduceMean from 18
        if op == "ReduceSum" or b.opset >= 18:
            return b.node(op, [x, last], keepdims=keepdims)
        return b.node(op, [x], axes=[-1], keepdims=keepdims)

    if form < 0.85:
        mean = reduce("ReduceMean", t, 1)
        centered = b.node("Sub", [t, mean])
        var = reduce("ReduceMean", b.node("Mul", [centered, centered]), 1)
        z = b.node("Div", [centered, b.node("Sqrt", [b.node("Add", [var, eps])])])
        return b.node("Add", [b.node("Mul", [z, scale]), shift])
    inv = b.const("inv_c", np.array(1.0 / c, np.float32))
    mean = b.node("Mul", [reduce("ReduceSum", t, 0), inv])
    square = b.node("Mul", [reduce("ReduceSum", b.node("Mul", [t, t]), 0), inv])
    var = b.node("Max", [b.const("zero", np.array(0.0, np.float32)), b.node("Sub", [square, b.node("Mul", [mean, mean])])])
    gain = b.node("Mul", [b.node("Reciprocal", [b.node("Sqrt", [b.node("Add", [b.node("Unsqueeze", [var, last]), eps])])]),
                          scale])
    return b.node("Add", [b.node("Mul", [b.node("Sub", [t, b.node("Unsqueeze", [mean, last])]), gain]), shift])


def _token_mlp(b: _Builder, x: str, c: int, h: int, w: int) -> str:
    """A ConvNeXt/transformer MLP on channels-last features: Transpose to NHWC (and maybe Reshape to
    [1, H·W, C]), maybe a LayerNorm, Linear (MatMul + bias Add), ReLU or GELU in erf form, Linear (bias
    optional), maybe a layer scale, back to NCHW, maybe added to the block's input."""
    rng = b.rng
    hidden = int(rng.integers(1, 17))
    t = b.node("Transpose", [x], perm=[0, 2, 3, 1])
    flat = rng.random() < 0.4
    if flat:
        t = b.node("Reshape", [t, b.const("shape", np.array([1, h * w, c], np.int64))])
    t = _pre_norm(b, t, c)
    u = b.node("Add", [b.node("MatMul", [t, b.const("w", b.weights(hidden, c).T.copy())]),
                       b.const("b", (rng.standard_normal(hidden) * 0.1).astype(np.float32))])
    if rng.random() < 0.5:
        u = b.node("Relu", [u])
    else:  # 0.5 · u · (1 + erf(u / √2))
        erf = b.node("Erf", [b.node("Div", [u, b.const("sqrt2", np.array(np.sqrt(2.0), np.float32))])])
        u = b.node("Mul", [b.node("Mul", [u, b.node("Add", [erf, b.const("one", np.array(1.0, np.float32))])]),
                           b.const("half", np.array(0.5, np.float32))])
    v = b.node("MatMul", [u, b.const("w", b.weights(c, hidden).T.copy())])
    if rng.random() < 0.5:
        v = b.node("Add", [v, b.const("b", (rng.standard_normal(c) * 0.1).astype(np.float32))])
    if rng.random() < 0.5:
        v = b.node("Mul", [v, b.const("gamma", (rng.standard_normal(c) * 0.5).astype(np.float32))])
    if flat:
        v = b.node("Reshape", [v, b.const("shape", np.array([1, h, w, c], np.int64))])
    v = b.node("Transpose", [v], perm=[0, 3, 1, 2])
    return b.node("Add", [x, v]) if rng.random() < 0.6 else v


def _attention(b: _Builder, x: str, c: int, h: int, w: int) -> str:
    """Multi-head self-attention on the H·W tokens as timm writes it: Transpose + Reshape to [1, T, C], maybe a
    LayerNorm, a fused
    qkv Linear reshaped to [1, T, 3, heads, D] (Split + Squeeze or Gather into q, k, v) or three Linears
    reshaped to [1, T, heads, D]; q·kᵀ scaled, maybe plus a per-head bias [heads, T, T]; Softmax; ·v; heads
    merged by Transpose + Reshape; a proj Linear; back to NCHW, maybe added to the block's input."""
    rng, t = b.rng, h * w
    heads, d = int(rng.integers(1, 5)), int(rng.integers(1, 7))
    tokens = b.node("Reshape", [b.node("Transpose", [x], perm=[0, 2, 3, 1]), b.const("shape", np.array([1, t, c], np.int64))])
    tokens = _pre_norm(b, tokens, c)

    def linear(inp, fan_in, fan_out):
        return b.node("Add", [b.node("MatMul", [inp, b.const("w", b.weights(fan_out, fan_in).T.copy())]),
                              b.const("b", (rng.standard_normal(fan_out) * 0.1).astype(np.float32))])

    def squeeze(part):
        axes = b.const("axes", np.array([0], np.int64))
        return b.node("Squeeze", [part, axes]) if b.opset >= 13 else b.node("Squeeze", [part], axes=[0])

    if rng.random() < 0.6:
        qkv = b.node("Reshape", [linear(tokens, c, 3 * heads * d), b.const("shape", np.array([1, t, 3, heads, d], np.int64))])
        qkv = b.node("Transpose", [qkv], perm=[2, 0, 3, 1, 4])
        if rng.random() < 0.5:
            parts = [b.name("part") for _ in range(3)]
            sizes = b.const("split", np.array([1, 1, 1], np.int64))
            b.nodes.append(helper.make_node("Split", [qkv, sizes], parts, name=b.name("Split"), axis=0))
            q, k, v = (squeeze(p) for p in parts)
        else:
            q, k, v = (b.node("Gather", [qkv, b.const("index", np.array(i, np.int64))], axis=0) for i in range(3))
    else:
        q, k, v = (b.node("Transpose", [b.node("Reshape", [linear(tokens, c, heads * d),
                                                            b.const("shape", np.array([1, t, heads, d], np.int64))])],
                          perm=[0, 2, 1, 3]) for _ in range(3))
    logits = b.node("Mul", [b.node("MatMul", [q, b.node("Transpose", [k], perm=[0, 1, 3, 2])]),
                            b.const("scale", np.array(d ** -0.5, np.float32))])
    if rng.random() < 0.5:
        logits = b.node("Add", [logits, b.const("rel", (rng.standard_normal((heads, t, t)) * 0.5).astype(np.float32))])
    attn = b.node("MatMul", [b.node("Softmax", [logits], axis=-1), v])
    merged = b.node("Reshape", [b.node("Transpose", [attn], perm=[0, 2, 1, 3]),
                                b.const("shape", np.array([1, t, heads * d], np.int64))])
    out = b.node("Reshape", [linear(merged, heads * d, c), b.const("shape", np.array([1, h, w, c], np.int64))])
    out = b.node("Transpose", [out], perm=[0, 3, 1, 2])
    return b.node("Add", [x, out]) if rng.random() < 0.6 else out


def _psa(b: _Builder, x: str, c: int, h: int, w: int) -> tuple[str, tuple]:
    """YOLO11's position-sensitive attention on NCHW: a 1×1 Conv writes heads × (2·key + value) channels,
    Reshape [1, heads, 2·key + value, H·W], Split into q, k, v; qᵀ·k scaled, Softmax, v·attnᵀ reshaped to
    [1, heads·value, H, W], maybe plus a depthwise Conv of v reshaped the same way; a 1×1 proj Conv."""
    rng, t = b.rng, h * w
    heads, key, value = int(rng.integers(1, 5)), int(rng.integers(1, 5)), int(rng.integers(1, 9))
    per, c_out = 2 * key + value, int(rng.integers(1, 17))
    qkv = b.node("Reshape", [b.conv(x, c, heads * per, 1), b.const("shape", np.array([1, heads, per, t], np.int64))])
    q, k, v = b.name("q"), b.name("k"), b.name("v")
    b.nodes.append(helper.make_node("Split", [qkv, b.const("split", np.array([key, key, value], np.int64))], [q, k, v],
                                    name=b.name("Split"), axis=2))
    logits = b.node("Mul", [b.node("MatMul", [b.node("Transpose", [q], perm=[0, 1, 3, 2]), k]),
                            b.const("scale", np.array(key ** -0.5, np.float32))])
    attn = b.node("Transpose", [b.node("Softmax", [logits], axis=-1)], perm=[0, 1, 3, 2])
    image = b.const("shape", np.array([1, heads * value, h, w], np.int64))
    out = b.node("Reshape", [b.node("MatMul", [v, attn]), image])
    if rng.random() < 0.6:
        out = b.node("Add", [out, b.conv(b.node("Reshape", [v, image]), heads * value, heads * value, 3,
                                         group=heads * value)])
    return b.conv(out, heads * value, c_out, 1), (c_out, h, w)


def cnn_models():
    """Hypothesis strategy: random valid CNN models (shrinks over the generator seed)."""
    from hypothesis import strategies as st

    return st.integers(min_value=0, max_value=2**32 - 1).map(lambda seed: random_model(np.random.default_rng(seed)))
