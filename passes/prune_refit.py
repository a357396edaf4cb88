"""Sequential least-squares refit of pruned layers on the pruned model's own activations.

Each layer is pruned on the float model's activations (see prune_sparse), but in the pruned model a layer
reads inputs already changed by the layers before it, and a branch that ends in a residual Add is summed
with a partner that carries its own error. This step walks the pruned layers in topological order and, for
each one, on the calibration data, takes

  X, the layer's input in the pruned model as refit so far, and
  T, the layer's output in the float model, plus, when the layer's output is read only by an Add, the float
     minus the pruned value of the Add's other input (so the sum matches the float model, not the branch),

(after channel pruning, the float output at the channels the layer still produces), then replaces every
output's kept weights and the bias by the ridge least-squares solution of
min ‖w·X + b − T‖² + λ‖w − w₀‖² over the kept weights: pruned weights stay zero, so the sparsity is unchanged
and the layer's error on the calibration rows never grows (w₀ itself is a candidate).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from functools import partial

import numpy as np
import onnx_graphsurgeon as gs

from compiler.activations import CheckpointedStream
from compiler.rewrite import add_to_bias, matmul_bias
from passes.prune_common import bias_constant, layer_inputs, rows_to_weight, weight_rows

RIDGE = 0.1  # λ as a fraction of the mean diagonal of XᵀX


@dataclass
class _Normal:
    """Normal equations of one layer, per group: [X 1]ᵀ[X 1], [X 1]ᵀT, Σ T², Σ T and the row count."""

    xx: np.ndarray
    xt: np.ndarray
    tt: np.ndarray
    ts: np.ndarray
    count: int = 0

    @classmethod
    def empty(cls, groups: int, d: int, outputs: int) -> "_Normal":
        return cls(np.zeros((groups, d, d)), np.zeros((groups, d, outputs)), np.zeros((groups, outputs)),
                   np.zeros((groups, outputs)))

    def add(self, x: np.ndarray, t: np.ndarray) -> None:
        """x: [n, groups, d], t: [n, groups, outputs per group]; one batch's products in float32, accumulated in
        float64 across batches."""
        xg = np.ascontiguousarray(x.transpose(1, 2, 0), dtype=np.float32)  # groups, d, n
        tg = t.transpose(1, 0, 2)                                            # groups, n, outputs
        self.xx += np.matmul(xg, xg.transpose(0, 2, 1))
        self.xt += np.matmul(xg, tg.astype(np.float32))
        self.tt += np.einsum("gno,gno->go", tg, tg)
        self.ts += tg.sum(axis=1)
        self.count += x.shape[0]


def _has_bias_input(node: gs.Node) -> bool:
    """Whether the layer's output can take a per-output constant: Conv, or a Gemm with beta = 1."""
    if node.op == "Gemm" and node.attrs.get("beta", 1.0) != 1.0:
        return False
    return node.op in ("Conv", "Gemm") and (len(node.inputs) < 3 or isinstance(node.inputs[2], gs.Constant))


def residual_partner(graph: gs.Graph, out: gs.Tensor) -> str | None:
    """The other input of the Add that is the only reader of a layer's output `out`, when it is a computed tensor."""
    if out in graph.outputs or len(out.outputs) != 1 or out.outputs[0].op != "Add":
        return None
    others = [t for t in out.outputs[0].inputs if t is not out]
    if len(others) != 1 or isinstance(others[0], gs.Constant):
        return None
    return others[0].name


def _output_rows(node: gs.Node, y: np.ndarray, positions: list, groups: int) -> np.ndarray:
    """The layer's output at the rows `layer_inputs` kept, shaped [n, groups, outputs per group]."""
    if node.op == "Conv":
        c = y.shape[1]
        rows = np.concatenate([y[i].reshape(c, -1)[:, pos].T for i, pos in enumerate(positions)])
    else:
        rows = y.reshape(-1, y.shape[-1])
    return rows.reshape(len(rows), groups, -1)


def _channels(node: gs.Node, y: np.ndarray, kept: np.ndarray | None) -> np.ndarray:
    """The float model's tensor `y` at the output channels the pruned layer kept (axis 1 for Conv, last else)."""
    return y if kept is None else np.take(y, kept, axis=1 if node.op == "Conv" else -1)


Activations = Callable[[list[str]], Iterator[dict[str, np.ndarray]]]


def refit_layer(node: gs.Node, graph: gs.Graph, dense: Activations, pruned: Activations, seed: int = 0,
                ridge: float = RIDGE, kept: np.ndarray | None = None) -> dict | None:
    """Refit one pruned layer in place (see the module docstring), `dense(names)` and `pruned(names)` streaming
    those tensors of the float and the current pruned model per calibration batch (the same batches); `kept`:
    the float model's output channels the layer still produces after channel pruning (None: all of them). The
    layer's output error on the calibration rows before and after, relative to the variance of its target, or
    None (layer unchanged) when its input layout is not supported or the Add's other input would broadcast it."""
    if node.op == "Gemm" and node.attrs.get("alpha", 1.0) != 1.0:
        return None
    weight = np.asarray(node.inputs[1].values)
    rows = weight_rows(node, weight.astype(np.float64))
    groups = node.attrs.get("group", 1) if node.op == "Conv" else 1
    found = matmul_bias(graph, node)  # a MatMul's bias is the Add after it: refit the sum
    output = found[0].outputs[0] if found is not None else node.outputs[0]
    intercept = _has_bias_input(node) or found is not None
    bias = np.zeros(rows.shape[0])
    given = bias_constant(graph, node) if intercept else None
    if isinstance(given, gs.Constant):
        given = np.asarray(given.values, np.float64).reshape(-1)
        intercept = given.size == bias.size  # a broadcast scalar bias stays as it is
        bias = given if intercept else bias
    partner = residual_partner(graph, output)
    inp, out = node.inputs[0].name, output.name
    extra = [partner] if partner else []
    rng = np.random.default_rng(seed)
    normal = None
    for want, have in zip(dense([out] + extra), pruned([inp] + extra)):
        positions: list = []
        x = layer_inputs(node, np.asarray(have[inp], np.float32), rng, positions)
        if x is None:
            return None
        target = _channels(node, want[out], kept).astype(np.float64)
        if partner:
            shifted = target + (_channels(node, want[partner], kept) - have[partner])
            if shifted.shape != target.shape:  # the partner broadcasts the branch: leave the sum alone
                return None
            target = shifted
        t = _output_rows(node, target, positions, groups)
        if intercept:
            x = np.concatenate([x, np.ones(x.shape[:2] + (1,), x.dtype)], axis=2)
        if normal is None:
            normal = _Normal.empty(groups, x.shape[2], t.shape[2])
        normal.add(x, t)
    if normal is None:
        return None
    d = rows.shape[1]
    per_group = rows.shape[0] // groups
    start = np.concatenate([rows, bias[:, None]], axis=1) if intercept else rows  # [outputs, d (+ 1)]
    new = np.zeros_like(start)
    before = after = 0.0
    for g in range(groups):
        xx, xt = normal.xx[g], normal.xt[g]
        lam = ridge * max(float(np.mean(np.diag(xx)[:d])), 1e-12)
        w0 = start[g * per_group:(g + 1) * per_group]
        keep = w0 != 0
        if intercept:
            keep[:, d] = True  # the bias is always refit
        w = _masked_ridge(xx + lam * np.eye(xx.shape[0]), xt.T + lam * w0, keep)
        new[g * per_group:(g + 1) * per_group] = w
        before += float(np.sum((w0 @ xx) * w0) - 2 * np.sum(w0 * xt.T))
        after += float(np.sum((w @ xx) * w) - 2 * np.sum(w * xt.T))
    new_rows, new_bias = (new[:, :d], new[:, d]) if intercept else (new, bias)
    tt = float(normal.tt.sum())
    variance = max(tt - float(np.sum(normal.ts**2)) / max(normal.count, 1), 1e-30)
    node.inputs[1] = gs.Constant(node.inputs[1].name + "_refit", rows_to_weight(node, new_rows, weight.shape)
                                 .astype(weight.dtype))
    if intercept:
        add_to_bias(graph, node, new_bias - bias)
    return {"error_before": (before + tt) / variance, "error_after": (after + tt) / variance,
            "residual": bool(partner)}


def _masked_ridge(matrix: np.ndarray, rhs: np.ndarray, keep: np.ndarray) -> np.ndarray:
    """Per row r, argmin over w with zeros where keep[r] is False of ½ wᵀ·matrix·w − rhs[r]ᵀw, for rows sharing
    `matrix` (XᵀX + λI). A row keeping few inputs is solved on them; rows keeping most (a lightly pruned or
    channel-pruned layer) are solved together through the inverse of the whole matrix, formed once, and a solve
    on the inputs each drops (zeroing them with Lagrange multipliers): the same minimum, at a fraction of the
    cost for wide layers."""
    n = matrix.shape[0]
    w = np.zeros_like(rhs)
    kept = keep.sum(axis=1)
    through_inverse = n - kept <= kept // 2
    for r in np.flatnonzero(~through_inverse & (kept > 0)):
        on = np.flatnonzero(keep[r])
        w[r, on] = np.linalg.solve(matrix[np.ix_(on, on)], rhs[r, on])
    rows = np.flatnonzero(through_inverse)
    if rows.size:
        inverse = np.linalg.inv(matrix)
        full = rhs[rows] @ inverse  # the unconstrained minima (the matrix is symmetric)
        for i, r in enumerate(rows):
            drop = np.flatnonzero(~keep[r])
            if drop.size:
                full[i] -= inverse[:, drop] @ np.linalg.solve(inverse[np.ix_(drop, drop)], full[i, drop])
            w[r] = np.where(keep[r], full[i], 0.0)
    return w


def refit_in_order(module, ctx, layers: list[gs.Node], dense, kept: dict[str, np.ndarray] | None = None) -> None:
    """Refit `layers` one by one in the order they run (`refit_layer`), `dense` being the float model before
    pruning and `kept` each channel-pruned layer's surviving output channels; facts go to the report."""
    seed = ctx.options.get("seed", 0) if ctx.options else 0
    kept = kept or {}
    dense_acts, pruned_acts = CheckpointedStream(ctx.calib), CheckpointedStream(ctx.calib)
    pruned = module.to_proto()
    position = {n.name: i for i, n in enumerate(pruned.graph.node)}  # the order the checkpoints move in
    with ctx.progress("Refitting pruned layers in order", len(layers)) as advance:
        for node in sorted(layers, key=lambda n: position.get(n.name, -1)):
            facts = refit_layer(node, module.graph, partial(dense_acts.stream, dense),
                                partial(pruned_acts.stream, pruned), seed, kept=kept.get(node.name))
            if facts is not None:
                ctx.layer(node.name, sequential_refit={k: round(v, 5) if isinstance(v, float) else v
                                                       for k, v in facts.items()})
                pruned = module.to_proto()
            dense_acts.advance(dense, node.name)  # later layers' tensors are computed from here on
            pruned_acts.advance(pruned, node.name)
            advance(1)
