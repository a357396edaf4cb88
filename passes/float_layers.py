"""Which layers of an int8 model stay float because int8 would only make them slower (used by insert-qdq).

Two places where quantizing costs time and buys nothing, measured in onnxruntime on CPU:

- the stem: a Conv reading a model input with at most STEM_CHANNELS channels. Its int8 kernel walks an
  indirection buffer per output pixel and kernel tap, so with 1-3 input channels it runs 2-3x slower
  than the float kernel (1x28x28 5x5 conv: 24 us int8, 8 us float; 3x224x224 3x3 stride 2: 323 vs 133 us),
  and the model input has no calibrated range to exploit anyway. When the stem's activation is followed by
  a MaxPool, the two are swapped (exact for a non-decreasing activation), so that the float part ends
  after the pool and the tensor handed to the int8 layers is quantized once, at a quarter of the size.
  A patch embedding that strided-conv-to-depth cut into space-to-depth and a stride-1 Conv counts as a
  stem too: int8 there was measured to cost accuracy (models/mnist_vit_dynamo.onnx at channel 0.7: 3.2 points of
  test top-1 against 2.4 with it float);
- a pooling tail after HardSwish: onnxruntime has no int8 HardSwish, so it computes it in float, and a
  quantized MaxPool after it becomes a uint8 NCHW MaxPool that runs ~10x slower than the float one
  (ppocr: 100 us vs 9 us). The MaxPool and the pooling ops reading it stay float.
"""

from __future__ import annotations

import onnx_graphsurgeon as gs

from compiler.rewrite import const_value, fresh_name, is_graph_output, sole_consumer

STEM_CHANNELS = 4
POOLS = {"MaxPool", "AveragePool", "GlobalAveragePool", "GlobalMaxPool"}
STEM_ACTIVATIONS = {"HardSwish", "Elu", "Selu", "Softplus", "Mish", "Gelu"}  # besides the non-decreasing ones


def float_layers(graph: gs.Graph, stem: bool = True, tail: bool = True) -> tuple[dict[str, str], set[str]]:
    """The nodes to keep float, with the reason, and the last node of each float stem (its output is
    quantized like any int8 layer's, so element-wise ops reading it can run in int8). Reorders a stem's
    activation and pool in place."""
    reasons: dict[str, str] = {}
    stem_ends: set[str] = set()
    if stem:
        inputs = {t.name for t in graph.inputs}
        for node in list(graph.nodes):
            source = _pixels(node)
            if node.op != "Conv" or source is None or source.name not in inputs:
                continue
            shape = source.shape
            channels = shape[1] if shape is not None and len(shape) > 1 else None
            if not isinstance(channels, int) or channels > STEM_CHANNELS:
                continue
            reasons[node.name] = (f"stem conv on the {channels}-channel model input stays float: onnxruntime's int8 "
                                  f"kernel is slower there (insert-qdq{{stem=int8}} quantizes it)"
                                  if source is node.inputs[0] else
                                  f"patch embedding of the {channels}-channel model input stays float like a stem conv: "
                                  "int8 costs accuracy there (insert-qdq{stem=int8} quantizes it)")
            end = node
            act = sole_consumer(graph, node.outputs[0])
            if act is not None and act.op == "MaxPool" and len(act.outputs) == 1:
                end = act
            elif act is not None and (act.op in STEM_ACTIVATIONS and len(act.inputs) == 1 or _non_decreasing(act)):
                end = act  # quantizing after the activation, not between conv and activation
                pool = sole_consumer(graph, act.outputs[0])
                if pool is not None and _non_decreasing(act) and _pool_before(graph, act, pool):
                    reasons[pool.name] = "pooled in float after the float stem conv"
            if end is not node:
                reasons[end.name] = "part of the float stem"
            stem_ends.add(end.name)
    if tail:
        for node in graph.nodes:
            src = node.inputs[0].inputs[0] if node.op == "MaxPool" and node.inputs and node.inputs[0].inputs else None
            if src is None or src.op != "HardSwish":
                continue
            while node is not None and node.op in POOLS and node.name not in reasons:
                reasons[node.name] = ("pooling after a HardSwish stays float: onnxruntime computes HardSwish in float "
                                      "and its uint8 MaxPool is slower than the float one")
                node = sole_consumer(graph, node.outputs[0])
    return reasons, stem_ends


def _pixels(conv: gs.Node) -> gs.Tensor | None:
    """The tensor a Conv reads or, for a Conv strided-conv-to-depth rewrote (Reshape of a block-major Transpose
    of a 6-D Reshape, after an optional Pad and Slice), the tensor it cut into blocks: the pixels it sees."""
    if not conv.inputs:
        return None
    chain, t = [], conv.inputs[0]
    while t.inputs and len(chain) < 5:
        chain.append(t.inputs[0])
        t = t.inputs[0].inputs[0]
    ops = [n.op for n in chain]
    if (ops[:3] == ["Reshape", "Transpose", "Reshape"] and list(chain[1].attrs.get("perm", [])) == [0, 1, 3, 5, 2, 4]
            and set(ops[3:]) <= {"Pad", "Slice"}):
        return t
    return conv.inputs[0]


def _non_decreasing(node: gs.Node) -> bool:
    """An element-wise activation f with a <= b implying f(a) <= f(b), so max and f commute."""
    if node.op in ("Relu", "Sigmoid", "Tanh"):
        return True
    if node.op == "LeakyRelu":
        return float(node.attrs.get("alpha", 0.01)) >= 0
    if node.op == "HardSigmoid":
        return float(node.attrs.get("alpha", 0.2)) >= 0
    if node.op == "Clip":
        return all(i >= len(node.inputs) or not node.inputs[i].name or const_value(node.inputs[i]) is not None
                   for i in (1, 2))
    return False


def _pool_before(graph: gs.Graph, act: gs.Node, pool: gs.Node) -> bool:
    """Rewrite act -> MaxPool into MaxPool -> act when every pooling window holds at least one element."""
    if pool.op != "MaxPool" or len([o for o in pool.outputs if o.name]) != 1 or pool.inputs[0] is not act.outputs[0]:
        return False
    if is_graph_output(graph, act.outputs[0]):
        return False
    kernel = list(pool.attrs.get("kernel_shape", []))
    pads = list(pool.attrs.get("pads", [0] * 2 * len(kernel)))
    auto_pad = pool.attrs.get("auto_pad", "NOTSET")
    auto_pad = auto_pad.decode() if isinstance(auto_pad, bytes) else auto_pad
    if (not kernel or pool.attrs.get("ceil_mode", 0) or any(d != 1 for d in pool.attrs.get("dilations", [1]))
            or auto_pad not in ("NOTSET", "VALID") or any(p >= k for p, k in zip(pads, kernel + kernel))):
        return False  # a window made only of padding would give -inf from the pool but f(-inf) after the swap
    x, between, y = act.inputs[0], act.outputs[0], pool.outputs[0]
    pooled = gs.Variable(fresh_name(graph, between.name + "_pooled"), dtype=between.dtype, shape=y.shape)
    pool.inputs[0] = x
    pool.outputs[0] = pooled
    act.inputs[0] = pooled
    act.outputs[0] = y
    graph.toposort()
    return True

