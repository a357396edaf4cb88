"""Fit a LayerNorm's scale and bias after channel pruning removed some of the channels it normalizes.

A LayerNormalization computes each output from its channel's input and the mean and variance over all
channels. With channels removed, those statistics are taken over fewer: the kept outputs change by a factor
and shift that vary little from token to token (removing low-energy channels raises the variance by about
C/k). Per kept channel i, the normalized value over all channels z_i is regressed on the normalized value
over the kept channels z'_i on calibration inputs, z_i ≈ a_i z'_i + c_i, and the LayerNorm's scale and bias
absorb it: γ'_i = γ_i a_i, β'_i = β_i + γ_i c_i. The statistics are accumulated per batch (Σz', Σz'², Σz, Σzz'),
so no activation is held.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from compiler.activations import stream_activations
from compiler.rewrite import fresh_name, set_input

ROWS_PER_SAMPLE = 256  # token (or pixel) rows of one sample kept for the fit


class NormalizerFit:
    """Σ over calibration rows of the kept channels' normalized values, over all channels (z) and over the
    kept ones (z'), for the least-squares line z ≈ a z' + c per channel."""

    def __init__(self, node: gs.Node, kept: np.ndarray):
        self.node, self.kept = node, kept
        self.eps = float(node.attrs.get("epsilon", 1e-5))
        self.sums = np.zeros((5, len(kept)))  # Σz', Σz'², Σz, Σzz', n
        self.rng = np.random.default_rng(0)

    def add(self, x: np.ndarray) -> None:
        rows = x.reshape(x.shape[0], -1, x.shape[-1]).astype(np.float64)
        if rows.shape[1] > ROWS_PER_SAMPLE:
            rows = rows[:, np.sort(self.rng.choice(rows.shape[1], ROWS_PER_SAMPLE, replace=False))]
        rows = rows.reshape(-1, x.shape[-1])
        z = _normalized(rows, self.eps)[:, self.kept]
        zk = _normalized(rows[:, self.kept], self.eps)
        self.sums += [zk.sum(0), (zk * zk).sum(0), z.sum(0), (z * zk).sum(0), np.full(len(self.kept), len(rows))]

    def line(self) -> tuple[np.ndarray, np.ndarray]:
        """(a, c) per kept channel; a = 1, c = 0 where z' does not vary."""
        s1, s2, t1, st, n = self.sums
        var = s2 - s1 * s1 / np.maximum(n, 1)
        a = np.where(var > 1e-9 * np.maximum(n, 1), (st - s1 * t1 / np.maximum(n, 1)) / np.maximum(var, 1e-30), 1.0)
        return a, (t1 - a * s1) / np.maximum(n, 1)


def _normalized(rows: np.ndarray, eps: float) -> np.ndarray:
    mean = rows.mean(axis=1, keepdims=True)
    return (rows - mean) / np.sqrt(((rows - mean) ** 2).mean(axis=1, keepdims=True) + eps)


def fit_normalizers(proto, ctx, kept: dict[str, tuple[gs.Node, np.ndarray]]) -> list[NormalizerFit]:
    """The fits of LayerNorms that lose channels, on the calibration inputs `proto` (the model before pruning)
    gives them: `kept` maps each LayerNorm's name to (node, the channel positions it keeps)."""
    fits = [NormalizerFit(node, positions) for node, positions in kept.values()]
    inputs: dict[str, list[NormalizerFit]] = {}
    for fit in fits:
        inputs.setdefault(fit.node.inputs[0].name, []).append(fit)
    if not inputs or ctx is None or ctx.calib is None:
        return []
    with ctx.progress("Fitting LayerNorms to the kept channels", ctx.calib.num_samples) as advance:
        for values in stream_activations(proto, sorted(inputs), ctx.calib, batch_size=8, progress=advance):
            for name, x in values.items():
                for fit in inputs[name]:
                    fit.add(np.asarray(x))
    return fits


def apply_fit(graph: gs.Graph, fit: NormalizerFit) -> None:
    """Fold the fitted line into the (already sliced) LayerNorm's scale and bias."""
    node = fit.node
    a, c = fit.line()
    scale = np.asarray(node.inputs[1].values, np.float64)
    bias = np.asarray(node.inputs[2].values, np.float64) if len(node.inputs) > 2 and node.inputs[2].name else np.zeros_like(scale)
    dtype = node.inputs[1].values.dtype
    set_input(node, 1, gs.Constant(fresh_name(graph, node.name + "_scale_fit"), (scale * a).astype(dtype)))
    set_input(node, 2, gs.Constant(fresh_name(graph, node.name + "_bias_fit"), (bias + scale * c).astype(dtype)))

