"""prune: post-training pruning of Conv/ConvTranspose/Gemm/MatMul weights, chosen with calibration data."""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from compiler.errors import UnsupportedModelError
from compiler.passmanager import Option, Pass, register_pass
from compiler.rewrite import fresh_name, set_input
from passes.prune_channel import prune_channels
from passes.prune_common import layer_statistics, prunable_layers, weight_rows
from passes.prune_sparse import error_curve, sparse_prune_layer


@register_pass
class Prune(Pass):
    """Remove a fraction `ratio` of the prunable weights, after training, using calibration activations.

    sparse: zero individual weights (shapes unchanged) in the target's pattern, scored by |w| x the norm
    of the input channel it multiplies, and refit the remaining weights of each output row by least squares
    on the calibration statistics (H = XᵀX), so layer outputs stay close. channel: remove whole output
    channels where the dependency analysis proves it safe (see prune_channel). Guarantees: the achieved
    fraction of zero (sparse) or removed (channel) prunable weights equals `ratio` within rounding, or an
    UnsupportedModelError says which part cannot be pruned; per-layer facts go to the report.
    """

    name = "prune"
    OPTIONS = {
        "ratio": Option(float, 0.5, "fraction of prunable weights to remove", minimum=0.0, maximum=1.0, exclusive_max=True),
        "mode": Option(str, "", "sparse | channel (default: the target's)", choices=("", "sparse", "channel")),
        "first_layer": Option(bool, False, "also prune the first Conv"),
        "classifier": Option(bool, False, "also prune the last Gemm/MatMul"),
        "pattern": Option(str, "", "sparse pattern: unstructured or N:M (default: the target's)"),
        "round_to": Option(int, 0, "keep channel counts a multiple of this (default: the target's)", minimum=0),
        "method": Option(str, "obs", "obs (data-driven choice and refit) or magnitude (the plain baseline)",
                         choices=("obs", "magnitude")),
    }

    def run(self, module, ctx) -> bool:
        if self.ratio == 0:
            return False
        target = getattr(ctx, "target", None)
        mode = self.mode or getattr(target, "default_prune_mode", "sparse")
        if ctx is not None and (ctx.calib is None or ctx.calib.synthetic):
            ctx.warn("pruning chose weights with synthetic inputs: accuracy after pruning is unmeasured")
        module.infer_shapes()
        layers = prunable_layers(module.graph, self.first_layer, self.classifier)
        if not layers:
            raise UnsupportedModelError("nothing to prune: no Conv/ConvTranspose/Gemm/MatMul with constant weights "
                                        "(first layer and classifier are kept unless first_layer/classifier=true)")
        if mode == "channel":
            round_to = self.round_to or getattr(target, "channel_round_to", 1)
            facts = prune_channels(module, ctx, layers, self.ratio, round_to, data_driven=self.method == "obs")
        else:
            facts = self._sparse(module, ctx, layers, target)
        if ctx is not None:
            ctx.log(mode=mode, **facts)
        return True

    def _sparse(self, module, ctx, layers, target) -> dict:
        pattern = self.pattern or (target.sparsity.get("pattern", "unstructured") if target is not None else "unstructured")
        if pattern in ("none", ""):
            pattern = "unstructured"
        n_m = _parse_pattern(pattern)
        stats = layer_statistics(module, ctx, layers) if self.method == "obs" else {}
        total = sum(int(np.asarray(node.inputs[1].values).size) for node in layers)
        uniform = n_m is not None or self.method == "magnitude"
        ratios = {n.name: self.ratio for n in layers} if uniform else allocate_sparsity(layers, stats, self.ratio)
        zeros = 0
        for node in layers:
            weight = np.asarray(node.inputs[1].values, dtype=np.float32)
            new_w, info = sparse_prune_layer(node, weight, ratios[node.name], stats.get(node.name), n_m)
            node.inputs[1] = gs.Constant(node.inputs[1].name + "_pruned", new_w.astype(weight.dtype))
            if stats.get(node.name) is not None:
                _correct_bias(module.graph, node, weight, new_w, stats[node.name])
            zeros += int(np.count_nonzero(new_w == 0))
            if ctx is not None:
                ctx.layer(node.name, sparsity=float(np.mean(new_w == 0)), params_before=int(weight.size),
                          params_after=int(np.count_nonzero(new_w)), prune_refit=info)
        return {"method": self.method, "pattern": pattern, "prunable_weights": total, "zero_weights": zeros,
                "achieved_ratio": round(zeros / max(total, 1), 4), "layers": len(layers)}


def _correct_bias(graph, node, old_w: np.ndarray, new_w: np.ndarray, st) -> None:
    """Move the mean output change of pruning, (W - W') E[x], into the layer's bias."""
    mean_x = st.sums / max(st.count, 1)                       # [groups, d]
    delta = weight_rows(node, old_w.astype(np.float64) - new_w.astype(np.float64))
    per_group = delta.shape[0] // st.groups
    shift = np.concatenate([delta[g * per_group:(g + 1) * per_group] @ mean_x[g] for g in range(st.groups)])
    if not (node.op == "Conv" or (node.op == "Gemm" and node.attrs.get("beta", 1.0) == 1.0)):
        return  # MatMul has no bias input
    index = 2
    if len(node.inputs) > index and not isinstance(node.inputs[index], gs.Constant):
        return
    bias = np.asarray(node.inputs[index].values, np.float64) if len(node.inputs) > index else np.zeros_like(shift)
    if bias.shape == shift.shape:
        set_input(node, index, gs.Constant(fresh_name(graph, node.name + "_bias_corrected"), (bias + shift).astype(np.float32)))


def allocate_sparsity(layers, stats, ratio: float, step: float = 0.025, spread: float = 0.1) -> dict[str, float]:
    """Per-layer sparsity meeting `ratio` overall: greedily raise the layer whose estimated relative output
    error grows least per weight removed (error curves from the OBS saliency on calibration statistics),
    keeping every layer within `spread` of `ratio` so that no single layer is gutted."""
    cap = min(0.95, ratio + spread)
    grid = np.round(np.arange(0.0, cap + 1e-9, step), 6)
    curves, sizes = {}, {}
    for node in layers:
        weight = np.asarray(node.inputs[1].values, dtype=np.float64)
        st = stats.get(node.name)
        rows = weight_rows(node, weight)
        if st is not None and st.groups == 1:
            curves[node.name] = error_curve(rows, st.hessians[0], grid)
        else:
            curves[node.name] = error_curve(rows, None, grid)
        sizes[node.name] = weight.size
    level = {n: 0 for n in curves}
    goal = ratio * sum(sizes.values())
    removed, best = 0.0, None
    while removed < goal:
        best, best_cost = None, np.inf
        for name, i in level.items():
            if i + 1 < len(grid):
                cost = (curves[name][i + 1] - curves[name][i]) / (step * sizes[name])
                if cost < best_cost:
                    best, best_cost = name, cost
        if best is None:
            break
        level[best] += 1
        removed += step * sizes[best]
    out = {n: float(grid[i]) for n, i in level.items()}
    # the last step overshoots by < one grid step of one layer: trim it so the total matches `ratio`
    excess = removed - goal
    if excess > 0 and best is not None:
        out[best] = max(0.0, out[best] - excess / sizes[best])
    return out


def _parse_pattern(pattern: str) -> tuple[int, int] | None:
    if pattern == "unstructured":
        return None
    try:
        n, m = (int(v) for v in pattern.split(":"))
    except ValueError:
        raise UnsupportedModelError(f"sparse pattern '{pattern}' is not 'unstructured' or N:M") from None
    if not 0 < n < m:
        raise UnsupportedModelError(f"sparse pattern '{pattern}' needs 0 < N < M")
    return n, m
