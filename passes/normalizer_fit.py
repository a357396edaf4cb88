"""Refit what reads statistics over the channels after channel pruning removed some of those channels.

A LayerNormalization computes each output from its channel's input and the mean and variance over all
channels; a ReduceMean over the channel axis (a LayerNorm written out, ConvNeXt-V2's global response
normalization) is such a statistic itself, as is a ReduceSum over them (jax2tf writes a LayerNorm's mean as
a sum times 1/C). With channels removed, the statistics are taken over fewer: the kept outputs change by a
factor and shift that vary little from token to token (removing low-energy channels raises the variance by
about C/k). Both are fit by least squares on calibration inputs of the model before
pruning, accumulated batch by batch (no activation is held):

- LayerNorm: per kept channel i, the value normalized over all channels z_i is regressed on the value
  normalized over the kept ones z'_i, z_i ≈ a_i z'_i + c_i, and the scale and bias absorb the line:
  γ'_i = γ_i a_i, β'_i = β_i + γ_i c_i.
- ReduceMean (ReduceSum): the mean (sum) over all channels m is regressed on the mean (sum) over the kept
  ones m', m ≈ a m' + c, and a Mul and an Add after the reduction apply the line (nothing is added when it
  is the identity).
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from compiler.activations import stream_activations
from compiler.rewrite import fresh_name, set_input

ROWS_PER_SAMPLE = 256  # token (or pixel) rows of one sample kept for the fit


class _Line:
    """Least-squares lines y ≈ a x + c, one per column, from batches of (x, y) rows."""

    def __init__(self, columns: int):
        self.sums = np.zeros((5, columns))  # Σx, Σx², Σy, Σxy, n

    def add(self, x: np.ndarray, y: np.ndarray) -> None:
        self.sums += [x.sum(0), (x * x).sum(0), y.sum(0), (x * y).sum(0), np.full(x.shape[1], len(x))]

    def fit(self) -> tuple[np.ndarray, np.ndarray]:
        """(a, c) per column; a = 1, c = 0 where x does not vary."""
        s1, s2, t1, st, n = self.sums
        n = np.maximum(n, 1)
        var = s2 - s1 * s1 / n
        a = np.where(var > 1e-9 * n, (st - s1 * t1 / n) / np.maximum(var, 1e-30), 1.0)
        return a, (t1 - a * s1) / n


class StatisticFit:
    """The fit of one LayerNorm (see `is_normalizer`) or channel mean or sum (`is_channel_mean`) that loses
    channels: `kept` are the positions it keeps on channel axis `axis` of its input."""

    def __init__(self, node: gs.Node, kept: np.ndarray, axis: int):
        self.node, self.kept, self.axis = node, np.asarray(kept), axis
        self.line = _Line(len(kept) if node.op == "LayerNormalization" else 1)
        self.rng = np.random.default_rng(0)

    def add(self, x: np.ndarray) -> None:
        """Accumulate one batch of the node's input (from the model before pruning)."""
        x = np.moveaxis(np.asarray(x, np.float64), self.axis, -1)
        rows = x.reshape(x.shape[0], -1, x.shape[-1])
        if rows.shape[1] > ROWS_PER_SAMPLE:
            rows = rows[:, np.sort(self.rng.choice(rows.shape[1], ROWS_PER_SAMPLE, replace=False))]
        rows = rows.reshape(-1, x.shape[-1])
        if self.node.op == "LayerNormalization":
            eps = float(self.node.attrs.get("epsilon", 1e-5))
            self.line.add(_normalized(rows[:, self.kept], eps), _normalized(rows, eps)[:, self.kept])
        else:
            reduce = np.sum if self.node.op == "ReduceSum" else np.mean
            self.line.add(reduce(rows[:, self.kept], 1, keepdims=True), reduce(rows, 1, keepdims=True))

    def apply(self, graph: gs.Graph) -> None:
        """Fold the fitted line into the (already sliced) LayerNorm's scale and bias, or after the reduction."""
        node = self.node
        a, c = self.line.fit()
        if node.op != "LayerNormalization":
            if abs(a[0] - 1) > 1e-6 or abs(c[0]) > 1e-9:
                _affine_after(graph, node, float(a[0]), float(c[0]))
            return
        scale = np.asarray(node.inputs[1].values, np.float64)
        bias = np.asarray(node.inputs[2].values, np.float64) if len(node.inputs) > 2 and node.inputs[2].name else np.zeros_like(scale)
        dtype = node.inputs[1].values.dtype
        set_input(node, 1, gs.Constant(fresh_name(graph, node.name + "_scale_fit"), (scale * a).astype(dtype)))
        set_input(node, 2, gs.Constant(fresh_name(graph, node.name + "_bias_fit"), (bias + scale * c).astype(dtype)))


def _normalized(rows: np.ndarray, eps: float) -> np.ndarray:
    mean = rows.mean(axis=1, keepdims=True)
    return (rows - mean) / np.sqrt(((rows - mean) ** 2).mean(axis=1, keepdims=True) + eps)


def _affine_after(graph: gs.Graph, node: gs.Node, a: float, c: float) -> None:
    """Make `node`'s readers see a · output + c: a Mul and an Add take over its output tensor."""
    out = node.outputs[0]
    raw = gs.Variable(fresh_name(graph, out.name + "_over_kept"), dtype=out.dtype, shape=out.shape)
    scaled = gs.Variable(fresh_name(graph, out.name + "_scaled"), dtype=out.dtype, shape=out.shape)
    node.outputs[0] = raw
    dtype = out.dtype or np.float32
    mul = gs.Node("Mul", name=fresh_name(graph, node.name + "_fit_scale"), outputs=[scaled],
                  inputs=[raw, gs.Constant(fresh_name(graph, node.name + "_a"), np.array(a, dtype=dtype))])
    add = gs.Node("Add", name=fresh_name(graph, node.name + "_fit_shift"), outputs=[out],
                  inputs=[scaled, gs.Constant(fresh_name(graph, node.name + "_c"), np.array(c, dtype=dtype))])
    at = next(i for i, n in enumerate(graph.nodes) if n is node) + 1
    graph.nodes[at:at] = [mul, add]


def fit_statistics(proto, ctx, fits: list[StatisticFit]) -> list[StatisticFit]:
    """`fits`, accumulated over the calibration inputs `proto` (the model before pruning) gives their nodes;
    none without calibration data."""
    inputs: dict[str, list[StatisticFit]] = {}
    for fit in fits:
        inputs.setdefault(fit.node.inputs[0].name, []).append(fit)
    if not inputs or ctx is None or ctx.calib is None:
        return []
    with ctx.progress("Fitting channel statistics to the kept channels", ctx.calib.num_samples) as advance:
        for values in stream_activations(proto, sorted(inputs), ctx.calib, batch_size=8, progress=advance):
            for name, x in values.items():
                for fit in inputs[name]:
                    fit.add(x)
    return fits
