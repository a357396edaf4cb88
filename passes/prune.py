"""prune: post-training pruning of Conv/ConvTranspose/Gemm/MatMul weights, chosen with calibration data."""

from __future__ import annotations

import contextlib
import math

import numpy as np
import onnx_graphsurgeon as gs

from compiler.errors import UnsupportedModelError
from compiler.ir import batch_one_flags
from compiler.passmanager import Option, Pass, register_pass
from compiler.rewrite import add_to_bias
from compiler.sparsity import reduction_axis, skippable_zeros
from passes.channel_groups import analyze
from passes.float_layers import STEM_CHANNELS
from passes.prune_batch_one import batch_one_copy, check_any_batch, restore_batch
from passes.prune_channel import prune_channels
from passes.prune_common import bias_constant, bias_shift, layer_statistics, prunable_layers, shifted_inputs, weight_rows
from passes.prune_refit import refit_in_order
from passes.prune_sensitivity import Sensitivity, measured_prefix
from passes.prune_sparse import error_curve, sparse_prune_layer
from passes.unpack_projection import unpack_projections


SPREAD = 0.1  # estimated allocation keeps each layer within this of the ratio
# Below this many calibration samples the choice and refit overfit them (efficientnet_lite0, sparse 0.5: top-1
# agreement with fp32 on 800 unseen images 82.5% from 100 samples, 89.3% from 200; 400 add nothing).
FEW_SAMPLES = 200
# Sparse pruning goes to this ratio in one step, and above it in further steps of at most STEP_ABOVE
# (efficientnet_lite0 at 0.7, top-1 / agreement with fp32: one step 58.88 / 60.88%, 0.5 then 0.7 61.62 / 64.25%,
# 0.3, 0.5, 0.7 62.88 / 65.00%; at 0.5, 0.3 then 0.5 gains nothing: 81.50 vs 82.25%).
ONE_STEP_UP_TO = 0.5
STEP_ABOVE = 0.2


@register_pass
class Prune(Pass):
    """Remove a fraction `ratio` of the prunable weights, after training, using calibration activations.

    sparse: zero individual weights (shapes unchanged) in the target's pattern and group size (whole groups of
    consecutive input channels, the unit its zero-skipping sees; see compiler.sparsity) with optimal-brain-surgeon
    updates of the remaining weights on H = XᵀX from calibration activations (see prune_sparse), the mean
    output shift moved into the bias; per-layer sparsity comes from the model's measured output error when
    each layer alone is pruned at several sparsities (allocation=measured, see prune_sensitivity); then every
    pruned layer is refit in order on the pruned model's own inputs (refit=true, see prune_refit). Above ratio
    0.5 this runs in steps (step_ratios: to 0.5, then steps of at most 0.2; or steps=N), each starting from the
    model the step before left; earlier zeros stay zero and count towards the ratio.
    channel: remove whole output channels as the dependency analysis allows (see prune_channel), then (refit=true)
    refit every prunable layer in order on the pruned model's own inputs to the float output at its kept channels;
    a model with a dynamic batch that blocks channel groups its batch-1 form does not (torch's attention heads
    folded into the batch) is pruned in that form and must then still run at other batches (see prune_batch_one).
    Guarantees: the achieved fraction of zero (sparse) or removed (channel) prunable weights equals `ratio`
    within rounding, or an UnsupportedModelError says which part cannot be pruned; per-layer facts go to
    the report.
    """

    name = "prune"
    OPTIONS = {
        "ratio": Option(float, 0.5, "fraction of prunable weights to remove", minimum=0.0, maximum=1.0, exclusive_max=True),
        "mode": Option(str, "", "sparse | channel (default: the target's)", choices=("", "sparse", "channel")),
        "first_layer": Option(bool, False, "also prune the stem (the first Conv when it reads at most "
                              f"{STEM_CHANNELS} channels; a wider first Conv is always prunable; channel mode: "
                              "without it the stem still loses the channels of a stream other pruned layers write)"),
        "classifier": Option(bool, False, "also prune the last Gemm/MatMul"),
        "pattern": Option(str, "", "sparse pattern: unstructured or N:M (default: the target's)"),
        "group_size": Option(int, 0, "sparse: zero whole groups of this many consecutive input channels at one kernel "
                             "position, the unit the accelerator skips (default: the target's)", minimum=0),
        "round_to": Option(int, 0, "keep channel counts a multiple of this (default: the target's)", minimum=0),
        "method": Option(str, "obs", "obs (data-driven choice and refit) or magnitude (the plain baseline)",
                         choices=("obs", "magnitude")),
        "allocation": Option(str, "measured", "obs: per-layer sparsity (per-space channel count) from the model's "
                             "measured output error (measured), or from each layer's own estimated error, within ±0.1 "
                             "of ratio (sparse) / from the channel ranks alone (channel) (estimated)",
                             choices=("measured", "estimated")),
        "refit": Option(bool, True, "obs: then refit each pruned layer in order on the pruned model's own inputs, "
                        "residual branches matching the float sum (sequential least squares)"),
        "steps": Option(int, 0, "sparse, obs, unstructured: prune in this many steps (above ratio "
                        f"{ONE_STEP_UP_TO}: the first to it, then equal ones), statistics, sensitivity and refit redone "
                        f"on the model the step before left (0: as many as keep each step above {ONE_STEP_UP_TO} "
                        f"under {STEP_ABOVE})",
                        minimum=0, maximum=10),
    }

    def run(self, module, ctx) -> bool:
        if self.ratio == 0:
            return False
        target = getattr(ctx, "target", None)
        mode = self.mode or getattr(target, "default_prune_mode", "sparse")
        if ctx is not None and (ctx.calib is None or ctx.calib.synthetic):
            ctx.warn("pruning chose and refit weights on synthetic inputs (no --calib): expect a large accuracy loss "
                     "(efficientnet_lite0, sparse 0.5: 8% top-1 this way, 82% with 200 real images); give --calib "
                     "a few hundred real inputs")
        elif ctx is not None and self.method == "obs" and ctx.calib.num_samples < FEW_SAMPLES:
            ctx.warn(f"pruning chose and refit weights on only {ctx.calib.num_samples} calibration samples: with fewer "
                     f"than {FEW_SAMPLES} the result fits them more closely than other inputs; check it on held-out "
                     "data (drpc simulate PACKAGE --data HELDOUT)")
        module.infer_shapes()
        if mode == "channel" and unpack_projections(module.graph):  # nn.MultiheadAttention's in_proj, per part
            module.reinfer_shapes()
        layers = prunable_layers(module.graph, self.first_layer, self.classifier)
        kept_dense = [n.name for n in prunable_layers(module.graph, True, True) if n not in layers]
        if not layers:
            raise UnsupportedModelError("nothing to prune: no Conv/ConvTranspose/Gemm/MatMul with constant weights "
                                        "(the stem conv and the classifier are kept unless first_layer/classifier=true)")
        if mode == "channel":
            facts = self._channel(module, ctx, target)
        else:
            facts = self._sparse(module, ctx, layers, target)
        if ctx is not None:
            ctx.log(mode=mode, kept_dense=kept_dense, **facts)
        return True

    def _channel(self, module, ctx, target) -> dict:
        """Channel pruning (and refit), on the model's batch-1 form when its dynamic batch blocks channel groups
        that batch 1 does not (torch's attention heads folded into the batch; see prune_batch_one)."""
        work, calib = module, (ctx.calib if ctx is not None else None)
        if batch_one_flags(module.graph) and not getattr(calib, "one_per_batch", False):  # (samples that are whole batches cannot feed it)
            one = batch_one_copy(module)
            if unpack_projections(one.graph):  # its sizes can now be static where the batch was not
                one.reinfer_shapes()
            if self._blocked_groups(one) < self._blocked_groups(module):
                work = one
        layers, stem = self._layers_and_stem(work.graph)
        round_to = self.round_to or getattr(target, "channel_round_to", 1)
        if work is not module and calib is not None:
            ctx.calib = calib.at_batch_one()
        try:
            dense = work.to_proto() if self.method == "obs" and self.refit and calib is not None else None
            facts, kept = prune_channels(work, ctx, layers, self.ratio, round_to, data_driven=self.method == "obs",
                                         measured=self.allocation == "measured", joining=stem)
            if dense is not None:
                nodes = {n.name: n for n in work.graph.nodes}  # the graph was rebuilt with the new shapes
                refit_in_order(work, ctx, [nodes[n.name] for n in layers], dense, kept)
        finally:
            if ctx is not None:
                ctx.calib = calib
        if work is not module:
            restore_batch(work, module)
            if calib is not None:
                check_any_batch(module, calib)
            facts["analysed_at_batch_one"] = True
        return facts

    def _layers_and_stem(self, graph) -> tuple[list[gs.Node], list[gs.Node]]:
        """The layers this pass prunes, and the stem it keeps (channel mode: it still loses a stream's channels)."""
        layers = prunable_layers(graph, self.first_layer, self.classifier)
        return layers, [n for n in prunable_layers(graph, True, self.classifier) if n not in layers]

    def _blocked_groups(self, module) -> int:
        """How many channel groups the dependency analysis blocks in `module` (shapes inferred)."""
        return sum(1 for s in analyze(module.graph, *self._layers_and_stem(module.graph)).base()
                   if s.producers and s.blocked)

    def _sparse(self, module, ctx, layers, target) -> dict:
        pattern = self.pattern or (target.sparsity.get("pattern", "unstructured") if target is not None else "unstructured")
        if pattern in ("none", ""):
            pattern = "unstructured"
        n_m = _parse_pattern(pattern)
        group = self.group_size or (int(target.sparsity.get("group_size", 1)) if target is not None else 1)
        schedule = step_ratios(self.ratio, self.steps) if self.method == "obs" and n_m is None else [self.ratio]
        for ratio in schedule:
            zeros = self._sparse_step(module, ctx, layers, ratio, n_m, group)
        total = sum(int(np.asarray(node.inputs[1].values).size) for node in layers)
        return {"method": self.method, "pattern": pattern, "group_size": group, "prunable_weights": total,
                "zero_weights": zeros, "achieved_ratio": round(zeros / max(total, 1), 4), "layers": len(layers),
                "steps": [round(r, 4) for r in schedule]}

    def _sparse_step(self, module, ctx, layers, ratio, n_m, group) -> int:
        """Prune `layers` to `ratio` overall (choice, compensation, refit); the number of skippable zeros."""
        stats = layer_statistics(module, ctx, layers) if self.method == "obs" else {}
        uniform = n_m is not None or self.method == "magnitude"
        ratios = ({n.name: ratio for n in layers} if uniform
                  else self._allocate(module, ctx, layers, stats, ratio, n_m, group))
        dense = module.to_proto() if stats and self.refit else None
        zeros = 0
        with _phase(ctx, "Pruning layers", len(layers)) as advance:
            for node in layers:
                weight = np.asarray(node.inputs[1].values, dtype=np.float32)
                new_w, info = sparse_prune_layer(node, weight, ratios[node.name], stats.get(node.name), n_m, group)
                node.inputs[1] = gs.Constant(node.inputs[1].name + "_pruned", new_w.astype(weight.dtype))
                if stats.get(node.name) is not None:
                    add_to_bias(module.graph, node, bias_shift(node, weight, new_w, stats[node.name]))
                skipped = _zeros(node, group)
                zeros += skipped
                if ctx is not None:
                    ctx.layer(node.name, sparsity=skipped / max(new_w.size, 1), prune_refit=info)
                advance(1)
        if dense is not None:
            refit_in_order(module, ctx, layers, dense)
        return zeros

    def _allocate(self, module, ctx, layers, stats, ratio, n_m, group) -> dict[str, float]:
        sizes = {n.name: int(np.asarray(n.inputs[1].values).size) for n in layers}
        floor = {n.name: _zeros(n, group) / sizes[n.name] for n in layers}
        if self.allocation == "measured" and stats:
            factors: dict[str, dict] = {}  # the layer being measured only: its ratios come one after another

            def prune(node, ratio):
                if node.name not in factors:
                    factors.clear()
                weight = np.asarray(node.inputs[1].values, dtype=np.float32)
                new_w = sparse_prune_layer(node, weight, ratio, stats.get(node.name), n_m, group,
                                           factors.setdefault(node.name, {}))[0]
                return shifted_inputs(module.graph, node, weight, new_w, stats.get(node.name))

            nodes = {n.name: n for n in layers}
            units = [(n.name, n.name, [t.name for t in (n.inputs[1], bias_constant(module.graph, n))
                                       if isinstance(t, gs.Constant)]) for n in layers]
            sensitivity = Sensitivity(module.to_proto(), units, ctx.calib, lambda name, r: prune(nodes[name], r),
                                      floors=floor)
            return measured_allocation(sensitivity, sizes, ratio, floor, ctx)
        grid = np.round(np.arange(0.0, min(0.95, ratio + SPREAD) + 1e-9, 0.025), 6)
        return allocate_sparsity(grid, estimated_curves(layers, stats, grid), sizes, ratio, floor=floor)


def measured_allocation(sensitivity: Sensitivity, sizes: dict[str, int], ratio: float, floor: dict[str, float],
                        ctx=None) -> dict[str, float]:
    """`allocate_sparsity` on measured curves, measuring only the points it can use: every layer up to the first
    point above `ratio`, then one point more for each layer the allocation pushed to the last point measured,
    until none is there. The greedy allocation takes the same steps as on fully measured curves (a layer's next
    step costs the same until it reaches its last measured point), so the result is the same."""
    points = sensitivity.points
    top = {name: next((p for p in points if p > max(ratio, floor.get(name, 0.0)) + 1e-9), points[-1]) for name in sizes}
    while True:
        with _phase(ctx, "Measuring layer sensitivity", len(top)) as advance:
            sensitivity.measure(top, advance)
        out = allocate_sparsity(sensitivity.grid, sensitivity.curves(), sizes, ratio, floor=floor)
        top = {name: points[points.index(top[name]) + 1] for name in top
               if out[name] >= top[name] - 1e-9 and top[name] < points[-1]}
        if not top:
            return out


def step_ratios(ratio: float, steps: int = 0) -> list[float]:
    """The overall ratio after each step: above ONE_STEP_UP_TO, a first step to it and then equal steps to
    `ratio` (by default as many as keep each under STEP_ABOVE); at or below it, equal steps from 0."""
    if not steps:
        steps = 1 + max(0, math.ceil(round((ratio - ONE_STEP_UP_TO) / STEP_ABOVE, 9)))
    if steps == 1:
        return [ratio]
    start = ONE_STEP_UP_TO if ratio > ONE_STEP_UP_TO else ratio / steps
    return [start + (ratio - start) * k / (steps - 1) for k in range(steps - 1)] + [ratio]


def estimated_curves(layers, stats, grid: np.ndarray) -> dict[str, np.ndarray]:
    """Per layer, the relative output error of the layer itself at each sparsity of `grid`, estimated from the
    OBS saliency on the calibration statistics (plain magnitude² without statistics)."""
    curves = {}
    for node in layers:
        rows = weight_rows(node, np.asarray(node.inputs[1].values, dtype=np.float64))
        st = stats.get(node.name)
        curves[node.name] = error_curve(rows, st.hessians[0] if st is not None and st.groups == 1 else None, grid)
    return curves


def allocate_sparsity(grid: np.ndarray, curves: dict[str, np.ndarray], sizes: dict[str, int], ratio: float,
                      cap: float = 0.95, step: float = 0.025, floor: dict[str, float] | None = None) -> dict[str, float]:
    """Per-layer sparsity meeting `ratio` of all weights overall: greedily raise the layer whose error (its curve,
    interpolated between the `grid` points) grows least per weight removed, never past `cap`. `floor`: each
    layer's sparsity already (an earlier step's zeros stay zero and count towards `ratio`). A curve may end in
    NaN (not measured there): the layer does not go past its last known point."""
    floor = floor or {}
    fine = np.round(np.arange(0.0, min(cap, grid[-1]) + 1e-9, step), 6)
    cost = {n: _interpolated(fine, grid, c) for n, c in curves.items()}

    def zeros(name, i):
        return max(fine[i], floor.get(name, 0.0)) * sizes[name]

    level = {n: max(int(np.searchsorted(fine, floor.get(n, 0.0), side="right")) - 1, 0) for n in curves}
    goal = ratio * sum(sizes[n] for n in curves)
    removed, best = sum(zeros(n, i) for n, i in level.items()), None
    while removed < goal:
        best, best_cost = None, np.inf
        for name, i in level.items():
            if i + 1 < len(fine):
                c = (cost[name][i + 1] - cost[name][i]) / sizes[name]
                if c < best_cost:
                    best, best_cost = name, c
        if best is None:
            break
        removed += zeros(best, level[best] + 1) - zeros(best, level[best])
        level[best] += 1
    out = {n: max(float(fine[i]), floor.get(n, 0.0)) for n, i in level.items()}
    # the last step overshoots by < one grid step of one layer: trim it so the total matches `ratio`
    excess = removed - goal
    if excess > 0 and best is not None:
        out[best] = max(floor.get(best, 0.0), out[best] - excess / sizes[best])
    return out


def _interpolated(fine: np.ndarray, grid: np.ndarray, curve: np.ndarray) -> np.ndarray:
    """The curve at the `fine` ratios, linear between grid points; infinite past its last non-NaN point."""
    known = measured_prefix(curve)
    values = np.interp(fine, grid[:known], curve[:known])
    values[fine > grid[known - 1] + 1e-9] = np.inf
    return values


def _phase(ctx, description: str, total: int):
    """ctx.progress, or a no-op without a context (the pass run on its own, as in tests)."""
    return ctx.progress(description, total) if ctx is not None else contextlib.nullcontext(lambda n=1: None)


def _zeros(node: gs.Node, group: int) -> int:
    """The layer's weights in all-zero groups of `group` (the zeros the target skips)."""
    weight = np.asarray(node.inputs[1].values)
    return skippable_zeros(weight, reduction_axis(node.op, weight.ndim, node.attrs.get("transB", 0)), group)


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
