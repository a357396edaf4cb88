"""Streaming range observers for calibration: min/max, then a fixed-range histogram merged batch by batch.

Memory per tensor is constant (a few numbers and `bins` counts), whatever the number of samples.
`choose_range` turns a histogram into a clipping range by one of the calibration methods.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

QMAX = 255  # uint8 activations: 256 levels


@dataclass
class TensorObserver:
    """Running min/max (pass 1) and a histogram over [lo, hi] (pass 2) of one tensor's values."""

    bins: int = 2048
    lo: float = np.inf
    hi: float = -np.inf
    count: int = 0
    hist: np.ndarray | None = field(default=None, repr=False)

    def observe_range(self, x: np.ndarray) -> None:
        """Pass 1: widen [lo, hi] by the finite values of `x`."""
        x = x[np.isfinite(x)] if x.dtype.kind == "f" and not np.isfinite(x).all() else x
        if x.size:
            self.lo = min(self.lo, float(x.min()))
            self.hi = max(self.hi, float(x.max()))
            self.count += x.size

    def observe_hist(self, x: np.ndarray) -> None:
        """Pass 2: add `x` to the histogram over the range found in pass 1 (range widened to include 0)."""
        lo, hi = self.edges_range()
        flat = x.reshape(-1)
        idx = ((flat - np.float32(lo)) * np.float32(self.bins / (hi - lo))).astype(np.int32)  # no float64 copy
        np.clip(idx, 0, self.bins - 1, out=idx)
        counts = np.bincount(idx, minlength=self.bins)
        self.hist = counts.astype(np.int64) if self.hist is None else self.hist + counts

    def edges_range(self) -> tuple[float, float]:
        """The histogram's range: [min(lo, 0), max(hi, 0)], never empty."""
        lo, hi = min(self.lo, 0.0), max(self.hi, 0.0)
        if not np.isfinite(lo) or not np.isfinite(hi):
            lo, hi = 0.0, 1.0
        return lo, (hi if hi > lo else lo + 1e-6)


def quant_params(lo: float, hi: float) -> tuple[float, int]:
    """uint8 asymmetric scale and zero point for the range [lo, hi] (widened to include 0)."""
    lo, hi = min(lo, 0.0), max(hi, 0.0)
    scale = (hi - lo) / QMAX
    if scale <= 0 or not np.isfinite(scale):
        return 1.0, 0
    zp = int(np.clip(round(-lo / scale), 0, QMAX))
    return float(scale), zp


def histogram_mse(obs: TensorObserver, lo: float, hi: float) -> float:
    """Expected squared error of uint8 quantization with range [lo, hi] over the histogram's values."""
    if obs.hist is None or obs.hist.sum() == 0:
        return 0.0
    h_lo, h_hi = obs.edges_range()
    edges = np.linspace(h_lo, h_hi, obs.bins + 1)
    centers = (edges[:-1] + edges[1:]) / 2
    scale, zp = quant_params(lo, hi)
    q = (np.clip(np.round(centers / scale) + zp, 0, QMAX) - zp) * scale
    p = obs.hist / obs.hist.sum()
    return float((p * (centers - q) ** 2).sum())


def sqnr_db(obs: TensorObserver, lo: float, hi: float) -> float:
    """Signal-to-quantization-noise ratio (dB) of the tensor under range [lo, hi], from its histogram."""
    if obs.hist is None or obs.hist.sum() == 0:
        return float("inf")
    h_lo, h_hi = obs.edges_range()
    edges = np.linspace(h_lo, h_hi, obs.bins + 1)
    centers = (edges[:-1] + edges[1:]) / 2
    p = obs.hist / obs.hist.sum()
    signal = float((p * centers**2).sum())
    noise = histogram_mse(obs, lo, hi)
    if noise <= 0:
        return float("inf")
    return 10.0 * np.log10(max(signal, 1e-30) / noise)


def choose_range(obs: TensorObserver, method: str) -> tuple[float, float]:
    """The clipping range of a tensor by `method`: minmax, percentile, entropy, mse, or auto (lowest MSE)."""
    full = obs.edges_range()
    if method == "minmax" or obs.hist is None or obs.hist.sum() == 0:
        return full
    if method == "percentile":
        return _percentile(obs, 0.01, 99.99)
    if method == "entropy":
        return _entropy(obs)
    if method == "mse":
        return _mse_search(obs)
    if method == "auto":
        candidates = [full, _percentile(obs, 0.01, 99.99), _entropy(obs), _mse_search(obs)]
        return min(candidates, key=lambda r: histogram_mse(obs, *r))
    raise ValueError(f"unknown calibration method {method}")


def _percentile(obs: TensorObserver, low_pct: float, high_pct: float) -> tuple[float, float]:
    lo, hi = obs.edges_range()
    edges = np.linspace(lo, hi, obs.bins + 1)
    cdf = np.cumsum(obs.hist) / obs.hist.sum()
    i_lo = int(np.searchsorted(cdf, low_pct / 100.0))
    i_hi = int(np.searchsorted(cdf, high_pct / 100.0))
    r_lo = min(edges[min(i_lo, obs.bins)], 0.0) if obs.lo < 0 else 0.0
    return r_lo, max(edges[min(i_hi + 1, obs.bins)], 1e-8)


def _mse_search(obs: TensorObserver, steps: int = 48) -> tuple[float, float]:
    lo, hi = obs.edges_range()
    best, best_err = (lo, hi), histogram_mse(obs, lo, hi)
    for a in np.geomspace(0.02, 1.0, steps):
        for b in (np.geomspace(0.05, 1.0, 12) if lo < 0 else (1.0,)):
            cand = (lo * b, hi * a)
            err = histogram_mse(obs, *cand)
            if err < best_err:
                best, best_err = cand, err
    return best


def _entropy(obs: TensorObserver, levels: int = QMAX + 1) -> tuple[float, float]:
    """KL-divergence threshold search on the upper side of the distribution (the lower side keeps min)."""
    lo, hi = obs.edges_range()
    edges = np.linspace(lo, hi, obs.bins + 1)
    zero_bin = int(np.clip(np.searchsorted(edges, 0.0) - 1, 0, obs.bins - 1))
    hist = obs.hist.astype(np.float64)
    upper = hist[zero_bin:]
    n = len(upper)
    if n <= levels:
        return lo, hi
    best_i, best_kl = n, np.inf
    for i in range(levels, n + 1, max(1, (n - levels) // 128)):
        ref = upper[:i].copy()
        ref[-1] += upper[i:].sum()
        if ref.sum() == 0:
            continue
        chunks = np.array_split(upper[:i], levels)
        quant = np.concatenate([np.full(len(c), c.sum() / max(np.count_nonzero(c), 1)) * (c > 0) for c in chunks])
        p = ref / ref.sum()
        q = quant / max(quant.sum(), 1e-30)
        mask = p > 0
        kl = float(np.sum(p[mask] * np.log(p[mask] / np.maximum(q[mask], 1e-12))))
        if kl < best_kl:
            best_kl, best_i = kl, i
    return lo, float(edges[zero_bin + best_i]) if zero_bin + best_i <= obs.bins else hi
