"""Shared by the pruning modes: which layers are prunable, and second-order input statistics per layer.

For a layer y = W x, the statistic is H = Σ x xᵀ over calibration samples (for Conv, x is an im2col patch of
the layer input, per group), accumulated batch by batch with a bounded number of positions per sample, plus
the patch sum and count (for least-squares refits with an intercept).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import onnx_graphsurgeon as gs

from compiler.activations import stream_activations
from compiler.rewrite import const_value, matmul_bias
from passes.float_layers import STEM_CHANNELS

PRUNABLE = {"Conv", "ConvTranspose", "Gemm", "MatMul"}
POSITIONS_PER_SAMPLE = 256  # im2col rows kept per sample and layer (random subset of output positions)


def prunable_layers(graph: gs.Graph, first_layer: bool, classifier: bool) -> list[gs.Node]:
    """Conv/ConvTranspose/Gemm/MatMul nodes with a constant float weight (rank >= 2), in topological order,
    without the stem (the first Conv, when it reads at most STEM_CHANNELS channels) and the last Gemm/MatMul
    unless asked. A stem holds few weights and sees raw pixels; a wider first Conv (magika's, 84% of its
    weights, after an embedding) is an ordinary layer: keeping it would leave --prune nearly nothing to take."""
    layers = []
    for node in graph.nodes:
        if node.op not in PRUNABLE or len(node.inputs) < 2:
            continue
        w = const_value(node.inputs[1])
        if w is None or w.ndim < 2 or w.dtype.kind != "f" or not isinstance(node.inputs[1], gs.Constant):
            continue
        if node.op == "Gemm" and node.attrs.get("transA", 0):
            continue
        layers.append(node)
    convs = [n for n in layers if n.op in ("Conv", "ConvTranspose")]
    heads = [n for n in layers if n.op in ("Gemm", "MatMul")]
    if convs and not first_layer and _input_channels(convs[0]) <= STEM_CHANNELS:
        layers.remove(convs[0])
    if heads and not classifier:
        layers.remove(heads[-1])
    return layers


def _input_channels(node: gs.Node) -> int:
    """Input channels of a Conv ([Cout, Cin/group, ...] weight) or ConvTranspose ([Cin, Cout/group, ...])."""
    shape = np.asarray(node.inputs[1].values).shape
    return shape[0] if node.op == "ConvTranspose" else shape[1] * int(node.attrs.get("group", 1))


def weight_rows(node: gs.Node, weight: np.ndarray) -> np.ndarray:
    """The weight as [outputs, inputs] rows matching `layer_inputs` columns (Conv: [Cout, Cin/g*kh*kw])."""
    if node.op == "Conv":
        return weight.reshape(weight.shape[0], -1)
    if node.op == "Gemm":
        return weight if node.attrs.get("transB", 0) else weight.T
    if node.op == "MatMul":
        return weight.T
    return weight.reshape(weight.shape[0], -1)


def rows_to_weight(node: gs.Node, rows: np.ndarray, shape: tuple | None = None) -> np.ndarray:
    """Inverse of `weight_rows`. Without `shape`, the layer's current weight shape with the output and input
    counts of `rows` (for a weight that grew or shrank: pruned or padded channels)."""
    transposed = (node.op == "Gemm" and not node.attrs.get("transB", 0)) or node.op == "MatMul"
    if shape is None:
        if node.op in ("Conv", "ConvTranspose"):
            shape = (rows.shape[0], -1) + tuple(np.asarray(node.inputs[1].values).shape[2:])
        else:
            shape = rows.shape[::-1] if transposed else rows.shape
    return (rows.T if transposed else rows).reshape(shape)


@dataclass
class LayerStats:
    """Σ x xᵀ per group ([groups, d, d]), Σ x per group ([groups, d]) and the number of rows seen; with a
    holdout, the same sums again over the held-out half of the batches (`held`), for choosing a refit's ridge."""

    groups: int
    hessians: np.ndarray | None = None
    sums: np.ndarray | None = None
    count: int = 0
    held: "LayerStats | None" = None

    def add(self, rows: np.ndarray, held: bool = False) -> None:
        """Accumulate one batch of rows, shaped [n, groups, d]; `held` also counts it in the held-out half."""
        rows = np.ascontiguousarray(rows, dtype=np.float32)
        if held:
            self.held = self.held or LayerStats(self.groups)
            self.held.add(rows)
        if self.hessians is None:
            self.hessians = np.zeros((rows.shape[1], rows.shape[2], rows.shape[2]))
            self.sums = np.zeros((rows.shape[1], rows.shape[2]))
        if rows.shape[1] == 1:  # one BLAS product per batch; accumulate in float64 across batches
            flat = rows[:, 0, :]
            self.hessians[0] += flat.T @ flat
        else:
            g = rows.transpose(1, 2, 0)  # groups, d, n
            self.hessians += np.matmul(g, g.transpose(0, 2, 1))
        self.sums += rows.sum(axis=0, dtype=np.float64)
        self.count += rows.shape[0]


def bias_shift(node: gs.Node, old_w: np.ndarray, new_w: np.ndarray, st: LayerStats) -> np.ndarray:
    """The mean output change of replacing W by W' (pruned or quantized), (W - W') E[x], per output."""
    mean_x = st.sums / max(st.count, 1)                       # [groups, d]
    delta = weight_rows(node, old_w.astype(np.float64) - new_w.astype(np.float64))
    per_group = delta.shape[0] // st.groups
    return np.concatenate([delta[g * per_group:(g + 1) * per_group] @ mean_x[g] for g in range(st.groups)])


def bias_constant(graph: gs.Graph, node: gs.Node) -> gs.Tensor | None:
    """The layer's bias input: a Conv's or Gemm's third input, or the constant of a MatMul's bias Add."""
    if node.op == "MatMul":
        found = matmul_bias(graph, node)
        return found[0].inputs[found[1]] if found is not None else None
    return node.inputs[2] if len(node.inputs) > 2 else None


def shifted_inputs(graph: gs.Graph, node: gs.Node, weight: np.ndarray, new_w: np.ndarray,
                   st: LayerStats | None) -> dict[str, np.ndarray]:
    """The layer's new constant inputs by tensor name when W becomes `new_w`: the weight, and a constant
    per-output bias plus the mean output change (`bias_shift`) when there are statistics."""
    out = {node.inputs[1].name: new_w}
    bias = bias_constant(graph, node)
    if isinstance(bias, gs.Constant) and st is not None and bias.values.size == weight_rows(node, new_w).shape[0]:
        shifted = np.asarray(bias.values, np.float64).reshape(-1) + bias_shift(node, weight, new_w, st)
        out[bias.name] = shifted.reshape(bias.values.shape).astype(bias.values.dtype)
    return out


def layer_inputs(node: gs.Node, x: np.ndarray, rng: np.random.Generator,
                 positions: list | None = None) -> np.ndarray | None:
    """Rows of the layer's input matching `weight_rows` columns, shaped [n, groups, d]; None when unsupported.

    A Conv keeps at most POSITIONS_PER_SAMPLE random output positions per sample; with `positions` given, the
    flat output positions kept for each sample are appended to it (so outputs can be read at the same places).
    """
    if node.op in ("Gemm", "MatMul"):
        return x.reshape(-1, 1, x.shape[-1])
    if node.op != "Conv" or x.ndim != 4:
        return None
    w = node.inputs[1].values
    kh, kw = w.shape[2], w.shape[3]
    group = node.attrs.get("group", 1)
    sh, sw = (list(node.attrs.get("strides", [1, 1])) + [1, 1])[:2]
    dh, dw = (list(node.attrs.get("dilations", [1, 1])) + [1, 1])[:2]
    pads = list(node.attrs.get("pads", [0, 0, 0, 0]))
    auto = node.attrs.get("auto_pad", "NOTSET")
    auto = auto.decode() if isinstance(auto, bytes) else auto
    if auto in ("SAME_UPPER", "SAME_LOWER"):  # output = ceil(input / stride): split the padding as ONNX does
        pads = [0, 0, 0, 0]
        for axis, (size, k, s, d) in enumerate(zip(x.shape[2:], (kh, kw), (sh, sw), (dh, dw))):
            total = max((-(-size // s) - 1) * s + (k - 1) * d + 1 - size, 0)
            small, big = total // 2, total - total // 2
            pads[axis], pads[axis + 2] = (small, big) if auto == "SAME_UPPER" else (big, small)
    elif auto == "VALID":
        pads = [0, 0, 0, 0]
    xp = np.pad(x, ((0, 0), (0, 0), (pads[0], pads[2]), (pads[1], pads[3])))
    win = np.lib.stride_tricks.sliding_window_view(xp, ((kh - 1) * dh + 1, (kw - 1) * dw + 1), axis=(2, 3))
    win = win[:, :, ::sh, ::sw, ::dh, ::dw]  # N, C, Ho, Wo, kh, kw
    n, _, ho, wo = win.shape[:4]
    take = min(POSITIONS_PER_SAMPLE, ho * wo)
    pos = np.stack([np.sort(rng.choice(ho * wo, size=take, replace=False)) if take < ho * wo
                    else np.arange(ho * wo) for _ in range(n)])        # N, P
    if positions is not None:
        positions.extend(pos)
    sample = np.repeat(np.arange(n), pos.shape[1])
    flat = pos.reshape(-1)
    patches = win[sample, :, flat // wo, flat % wo]                    # N*P, C, kh, kw
    return patches.reshape(len(patches), group, -1)


def layer_statistics(module, ctx, layers: list[gs.Node], max_samples: int | None = None,
                     holdout: bool = False) -> dict[str, LayerStats]:
    """LayerStats for every layer, from one streaming pass over (at most `max_samples` of) the calibration data;
    with `holdout`, every other batch of samples is also summed apart (a sample's rows stay in one half)."""
    if ctx is None or ctx.calib is None:
        return {}
    proto = module.to_proto()
    names = sorted({n.inputs[0].name for n in layers})
    stats = {n.name: LayerStats(groups=n.attrs.get("group", 1) if n.op == "Conv" else 1) for n in layers}
    rng = np.random.default_rng(ctx.options.get("seed", 0) if ctx.options else 0)
    by_input: dict[str, list[gs.Node]] = {}
    for n in layers:
        by_input.setdefault(n.inputs[0].name, []).append(n)
    with ctx.progress("Collecting layer statistics", ctx.calib.num_samples) as advance:
        for batch, values in enumerate(stream_activations(proto, names, ctx.calib, batch_size=2,
                                                          max_samples=max_samples, progress=advance)):
            for name, x in values.items():
                for node in by_input[name]:
                    rows = layer_inputs(node, np.asarray(x, np.float32), rng)
                    if rows is not None:
                        stats[node.name].add(rows, held=holdout and batch % 2 == 1)
    return {k: v for k, v in stats.items() if v.count}
