"""Unstructured (or N:M) sparsity for one layer with optimal-brain-surgeon updates (the SparseGPT scheme).

Columns are processed left to right; in each block of columns the weights with the smallest
w² / [H⁻¹]_jj of every row are zeroed and the error of each zeroed or kept weight is pushed onto the
columns not yet processed through the Cholesky factor of H⁻¹, so the layer output on the calibration
data changes as little as possible. With a target group size g > 1 (see compiler.sparsity) the columns are
reordered so each group's g weights sit side by side, and whole groups are chosen by their summed saliency.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from compiler.errors import UnsupportedModelError
from compiler.sparsity import group_order
from passes.prune_common import LayerStats, rows_to_weight, weight_rows
from passes.second_order import inverse_hessian_factor

BLOCK = 64
DAMP = 0.01


def sparse_prune_layer(node: gs.Node, weight: np.ndarray, ratio: float, stats: LayerStats | None,
                       n_m: tuple[int, int] | None, group_size: int = 1,
                       factors: dict | None = None) -> tuple[np.ndarray, str]:
    """The pruned weight (same shape, exactly round(ratio x groups) zeroed groups of `group_size` per row) and
    how it was chosen. `factors`: a dict kept by the caller across calls for the same layer and statistics
    (several ratios): each group's inverse-Hessian factor, which does not depend on the ratio, is computed once."""
    rows = weight_rows(node, weight).astype(np.float64)
    groups = stats.groups if stats is not None else 1
    per_group = rows.shape[0] // groups
    out = np.empty_like(rows)
    method = "obs" if stats is not None else "magnitude"
    if group_size > 1 and node.op == "ConvTranspose":
        raise UnsupportedModelError(f"ConvTranspose '{node.name}': grouped sparsity (group size {group_size}) groups "
                                    "its input channels, the rows this pass prunes one at a time")
    taps = int(np.prod(weight.shape[2:])) if node.op == "Conv" else 1
    group_size = min(group_size, rows.shape[1] // taps)  # fewer input channels (depthwise): one short group
    order = group_order(rows.shape[1] // taps, taps, group_size) if group_size > 1 else None
    factors = {} if factors is None else factors
    for g in range(groups):
        block = rows[g * per_group:(g + 1) * per_group]
        hessian = stats.hessians[g] if stats is not None else None
        if order is not None:  # columns in group order; padding columns are zero and never fire
            real = order >= 0
            block = np.zeros((per_group, order.size))
            block[:, real] = rows[g * per_group:(g + 1) * per_group, order[real]]
            if stats is not None:
                hessian = np.zeros((order.size, order.size))
                hessian[np.ix_(real, real)] = stats.hessians[g][np.ix_(order[real], order[real])]
        if stats is None:
            pruned = _magnitude(block, ratio, n_m, group_size)
        else:
            if g not in factors:
                factors[g] = inverse_hessian_factor(hessian, DAMP)
            pruned = obs_prune(block, hessian, ratio, n_m, group_size, factors[g])
        if order is not None:
            pruned = pruned[:, np.argsort(np.where(real, order, order.size))][:, :rows.shape[1]]
        out[g * per_group:(g + 1) * per_group] = pruned
    return rows_to_weight(node, out, weight.shape).astype(np.float32), method


def _unit_mask(score: np.ndarray, k: int, n_m, group: int) -> np.ndarray:
    """True where a weight goes: per row the k groups of `group` adjacent columns with the smallest summed
    score, or the N:M pattern over groups."""
    units = score.reshape(score.shape[0], -1, group).sum(axis=2)
    if n_m is not None:
        drop = _n_m_mask(units, units, n_m) == 0
    else:
        drop = np.zeros_like(units, dtype=bool)
        if k:
            np.put_along_axis(drop, np.argsort(units, axis=1)[:, :k], True, axis=1)
    return np.repeat(drop, group, axis=1)


def _magnitude(rows: np.ndarray, ratio: float, n_m, group: int = 1) -> np.ndarray:
    k = int(round(ratio * rows.shape[1] / group))
    return np.where(_unit_mask(rows**2, k, n_m, group), 0.0, rows)


def _n_m_mask(rows, score, n_m):
    n, m = n_m
    width = rows.shape[1] - rows.shape[1] % m
    mask = np.ones_like(rows)
    blocks = score[:, :width].reshape(rows.shape[0], -1, m)
    drop = np.argsort(blocks, axis=2)[:, :, : m - n]
    view = mask[:, :width].reshape(rows.shape[0], -1, m)
    np.put_along_axis(view, drop, 0.0, axis=2)
    return mask


def obs_prune(rows: np.ndarray, hessian: np.ndarray, ratio: float, n_m=None, group: int = 1,
              factor: tuple[np.ndarray, np.ndarray] | None = None) -> np.ndarray:
    """Prune `rows` ([outputs, d]) to `ratio` zeros per row, compensating with H = Σ x xᵀ ([d, d]); with
    `group` > 1, d is a multiple of it and whole runs of `group` adjacent columns are zeroed. `factor`:
    inverse_hessian_factor(hessian, DAMP) when the caller has it already."""
    w = rows.copy()
    d = w.shape[1]
    u, dead = factor if factor is not None else inverse_hessian_factor(hessian, DAMP)  # H⁻¹ = Uᵀ U
    w[:, dead] = 0.0
    k_total = int(round(ratio * d / group))
    step = max(group, BLOCK // group * group)
    mask = np.zeros_like(w, dtype=bool)  # True = pruned
    for start in range(0, d, step):
        end = min(start + step, d)
        wb = w[:, start:end].copy()
        ub = u[start:end, start:end]
        saliency = wb**2 / (np.diag(ub)[None, :] ** 2)
        k = int(round(k_total * end / d)) - int(round(k_total * start / d))  # exact total per row
        mb = _unit_mask(saliency, k, n_m, group)
        mask[:, start:end] = mb
        err = np.zeros_like(wb)
        for j in range(end - start):
            col = wb[:, j]
            q = np.where(mb[:, j], 0.0, col)
            e = (col - q) / ub[j, j]
            wb[:, j] = q
            wb[:, j + 1:] -= np.outer(e, ub[j, j + 1:])
            err[:, j] = e
        w[:, start:end] = wb
        w[:, end:] -= err @ u[start:end, end:]
    w[mask] = 0.0
    return w


def error_curve(rows: np.ndarray, hessian: np.ndarray | None, ratios: np.ndarray) -> np.ndarray:
    """Estimated relative output error of pruning `rows` to each ratio: the OBS saliency Σ w²/[H⁻¹]_jj of the
    weights that would go, over the output energy tr(W H Wᵀ) (plain magnitude² without statistics)."""
    if hessian is None:
        sal = rows**2
        energy = max(float(sal.sum()), 1e-30)
    else:
        h = hessian + DAMP * np.mean(np.diag(hessian)) * np.eye(hessian.shape[0]) + 1e-12 * np.eye(hessian.shape[0])
        try:
            hinv_diag = np.diag(np.linalg.inv(h))
        except np.linalg.LinAlgError:
            hinv_diag = 1.0 / np.maximum(np.diag(h), 1e-12)
        sal = rows**2 / hinv_diag[None, :]
        energy = max(float(np.einsum("ij,jk,ik->", rows, hessian, rows)), 1e-30)
    cum = np.cumsum(np.sort(sal, axis=1), axis=1).sum(axis=0)  # error of dropping the k smallest per row
    cum = np.concatenate([[0.0], cum])
    ks = np.round(ratios * rows.shape[1]).astype(int)
    return cum[ks] / energy
