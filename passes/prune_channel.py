"""Structured channel pruning: remove whole output channels where the graph allows it, refit the consumers.

Which channels go together comes from the dependency analysis in channel_groups (residual Adds, SE gates,
Concat/Split/Slice offsets, depthwise convs, BatchNorm, per-channel constants, Flatten/Reshape into Gemm,
Linear layers on the last axis of token tensors and the layout ops around them, whole attention heads,
streams that LayerNorms normalize); a space that analysis blocks is left whole. Channels are ranked by their
activation-aware contribution to the layers that read them; how many each space loses follows the model's
measured output error when that space alone loses its lowest-ranked channels, per weight and MAC removed; a
space keeps a multiple of the target's alignment, and every consuming layer is refit by ridge least squares
(with an intercept, so the mean of the removed channels moves into its bias; the ridge chosen on held-out
calibration batches) on the calibration statistics of its input. LayerNorms and channel means or sums over a
space that lost channels are refit to the statistics of the kept ones (normalizer_fit).
"""

from __future__ import annotations

import heapq
from functools import partial

import numpy as np
import onnx_graphsurgeon as gs

from compiler.errors import UnsupportedModelError
from compiler.rewrite import add_to_bias, const_value, fresh_name, matmul_bias, set_input, set_shape_entry
from passes.channel_groups import (ChannelAnalysis, Space, analyze, channel_params, channel_slice, kept_positions,
                                   resize_sizes)
from passes.normalizer_fit import StatisticFit, fit_statistics
from passes.prune_common import bias_constant, layer_statistics, rows_to_weight, shifted_inputs, weight_rows
from passes.prune_sensitivity import measured_curves


def columns_per_position(node: gs.Node) -> int:
    """Weight columns per input feature position: kh*kw for Conv, 1 for Gemm."""
    w = np.asarray(node.inputs[1].values)
    return int(np.prod(w.shape[2:])) if node.op == "Conv" else 1


def consumer_columns(analysis: ChannelAnalysis, node: gs.Node, tensor: str, keep: dict[int, np.ndarray]) -> np.ndarray:
    """The consumer's weight columns that survive."""
    per = columns_per_position(node)
    pos = kept_positions(analysis.view[tensor], keep)
    return (pos[:, None] * per + np.arange(per)[None, :]).reshape(-1)


def prune_channels(module, ctx, layers: list[gs.Node], ratio: float, round_to: int, data_driven: bool = True,
                   measured: bool = True, joining: list[gs.Node] = ()) -> tuple[dict, dict[str, np.ndarray]]:
    """Remove output channels so that `ratio` of the prunable weights go; returns the facts for the report and,
    per layer whose output lost channels, the original indices of those it still produces.

    data_driven: rank by activation x consumer weight and refit the consumers; otherwise the magnitude
    baseline (L1 norm of the producers' filters, no refit). measured (data-driven only): how many channels each
    space loses follows the model's measured output error when that space alone loses its lowest-ranked
    channels (see `_measured_curves`); otherwise the ranks alone decide across spaces. joining: layers that are
    not pruned but lose output channels with a space the `layers` produce too (see channel_groups.analyze)."""
    graph = module.graph
    analysis = analyze(graph, layers, joining)
    base = [s for s in analysis.base() if s.producers]
    if not base:
        kinds = ", ".join(sorted({n.op for n in layers}))
        raise UnsupportedModelError(f"channel pruning removes output channels of Conv (group 1), Gemm and MatMul "
                                    f"layers, and none of this model's prunable layers ({kinds}) is one; use "
                                    f"--prune-mode sparse")
    usable = [s for s in base if not s.blocked and s.channels > _step(s, round_to)]
    total = sum(int(n.inputs[1].values.size) for n in layers)
    consumers = analysis.consumers
    stats = layer_statistics(module, ctx, [n for n, _ in consumers], holdout=True) if data_driven else {}
    cost = {s.index: _channel_cost(analysis, s) for s in usable}
    scores = {s.index: _scores(analysis, s, stats, data_driven) for s in usable}
    removed_by = partial(_removed_weights, analysis, layers)
    most = removed_by({s.index: np.concatenate(_units(s, scores[s.index], round_to) or [np.zeros(0, int)])
                       for s in usable})
    if most < ratio * total * 0.98:
        blocked = [s for s in base if s.blocked]
        why = f"; blocked: {blocked[0].blocked}" + (f" and {len(blocked) - 1} more" if len(blocked) > 1 else "") if blocked else ""
        small = sum(1 for s in base if not s.blocked and s.channels <= _step(s, round_to))
        aligned = f", {small} already have no more than the target's {round_to}-channel alignment" if small else ""
        fits = np.floor(100 * most / max(total, 1)) / 100
        raise UnsupportedModelError(f"channel pruning can remove at most {fits:.0%} of the prunable "
                                    f"weights here, not {ratio:.0%}: {len(blocked)} of {len(base)} channel groups "
                                    f"are blocked{aligned}{why}; --prune {fits:.2f} fits, or --prune-mode "
                                    f"sparse prunes every layer")
    worth = None
    proto = module.to_proto() if stats else None  # the model before the cut, for measurements and statistics fits
    curves = _measured_curves(module, proto, ctx, analysis, usable, scores, stats, round_to) if measured and stats else None
    if curves is not None:  # what removing a channel gains: its fraction of the weights plus its fraction of the MACs
        total_macs = max(sum(int(np.asarray(n.inputs[1].values).size) * _positions(n) for n in layers), 1)
        worth = {s.index: cost[s.index] / total + _channel_cost(analysis, s, macs=True) / total_macs for s in usable}
    removal = _allocate(usable, cost, scores, ratio * total, round_to, removed_by, curves, worth)
    removed = removed_by(removal)
    keep = {i: np.setdiff1d(np.arange(analysis.spaces[i].channels), d) for i, d in removal.items() if d}
    fits = [StatisticFit(n, kept_positions(analysis.view[n.inputs[0].name], keep), analysis.axis[n.inputs[0].name])
            for s in analysis.spaces for n in s.normalizers
            if any(p.space in keep for p in analysis.view[n.inputs[0].name])]
    fits = fit_statistics(proto, ctx, fits) if proto is not None else []
    widths = [int(fit.node.inputs[0].shape[fit.axis]) for fit in fits]
    _apply(graph, analysis, keep, stats, ctx)
    for fit, width in zip(fits, widths):
        fit.apply(graph)
        if ctx is not None:
            ctx.layer(fit.node.name, channels_before=width, channels_after=len(fit.kept),
                      refit="statistics over the kept channels")
    graph.cleanup(remove_unused_graph_inputs=False)
    module.reinfer_shapes()
    kept = {}
    for n in layers:
        view = analysis.view.get(n.outputs[0].name)
        if view is not None and any(p.space in keep for p in view):
            kept[n.name] = kept_positions(view, keep)
    facts = {"prunable_weights": total, "removed_weights": int(removed),
            "achieved_ratio": round(removed / max(total, 1), 4), "groups": len(base),
            "blocked_groups": {(s.producers[0].name if s.producers else s.tensors[0]): s.blocked for s in base if s.blocked}}
    if fits:
        facts["statistics_refit"] = len(fits)
    heads = analysis.head_spaces()
    if heads:  # attention heads over every head-separable region: before, after
        facts["attention_heads"] = [sum(analysis.spaces[i].channels for i in heads),
                                    sum(len(keep.get(i, range(analysis.spaces[i].channels))) for i in heads)]
    return facts, kept


def _positions(node: gs.Node) -> int:
    """Output positions a weight is used at: a Conv's output height x width, a MatMul's tokens, else 1."""
    shape = node.outputs[0].shape
    if shape is None:
        return 1
    spatial = shape[2:] if node.op == "Conv" else shape[1:-1] if node.op == "MatMul" else ()
    if not all(isinstance(d, int) for d in spatial):
        return 1
    return int(np.prod(spatial))


def _channel_cost(analysis: ChannelAnalysis, space: Space, macs: bool = False) -> int:
    """Weights (or, with `macs`, multiply-accumulates) removed with one channel of `space`: producer rows,
    follower slices, consumer columns."""
    scale = _positions if macs else (lambda node: 1)
    cost = sum(int(weight_rows(p, np.asarray(p.inputs[1].values)).shape[1]) * _rows_per_channel(analysis, space, p)
               * scale(p) for p in space.producers)
    cost += sum(int(np.asarray(f.inputs[1].values)[0].size) * scale(f) for f in space.followers if f.op == "Conv")
    for node, tensor in analysis.consumers:
        rows = int(weight_rows(node, np.asarray(node.inputs[1].values)).shape[0])
        for p in analysis.view[tensor]:
            if p.space == space.index:
                cost += rows * p.block * columns_per_position(node) * scale(node)
    return cost


def _scores(analysis: ChannelAnalysis, space: Space, stats, data_driven: bool) -> np.ndarray:
    """Per channel of `space`: the output energy it carries into its consumers (data-driven), or the L1
    norm of its producers' filters (the magnitude baseline); normalized to mean 1 within the space."""
    c = space.channels
    if not data_driven:
        s = sum(_per_channel(analysis.view[p.outputs[0].name], space, np.abs(
            weight_rows(p, np.asarray(p.inputs[1].values))).sum(axis=1)) for p in space.producers)
        return s / max(float(np.mean(s)), 1e-12)
    energy = np.zeros(c)
    for node, tensor in analysis.consumers:
        rows = weight_rows(node, np.asarray(node.inputs[1].values, dtype=np.float64))
        st = stats.get(node.name)
        power = np.diag(st.hessians[0]) / max(st.count, 1) if st is not None and st.groups == 1 else np.ones(rows.shape[1])
        col_energy = ((rows**2).sum(axis=0) * power).reshape(-1, columns_per_position(node)).sum(axis=1)
        energy += _per_channel(analysis.view[tensor], space, col_energy)
    s = np.sqrt(energy)
    return s / max(float(np.mean(s)), 1e-12)


def _per_channel(view, space: Space, values: np.ndarray) -> np.ndarray:
    """Sum per channel of `space` of per-position `values` of a tensor with channels `view`."""
    out, pos = np.zeros(space.channels), 0
    for p in view:
        if p.space == space.index:
            out[p.start:p.start + p.length] += values[pos:pos + p.length * p.block].reshape(p.length, -1).sum(axis=1)
        pos += p.length * p.block
    return out


def _rows_per_channel(analysis: ChannelAnalysis, space: Space, node: gs.Node) -> int:
    """Output rows of a producer that one channel of `space` stands for: 1, or q, k and v of an attention head."""
    return sum(p.block for p in analysis.view[node.outputs[0].name] if p.space == space.index)


def _step(space: Space, round_to: int) -> int:
    """Channels of `space` removed (and at least kept) together so every count stays a multiple of `round_to`:
    for attention heads of `block` features, round_to / gcd(round_to, block) heads."""
    step = max(round_to, 1)
    return step // int(np.gcd(step, space.block))


def _removed_weights(analysis: ChannelAnalysis, layers: list[gs.Node], drop: dict[int, list[int]]) -> int:
    """How many of the `layers`' weights go when each base space s loses the channels `drop[s]`: a layer keeps
    the kept fraction of its output channels times that of its input channels (output only for a grouped
    Conv, whose input channels are its output channels)."""
    dropped = {i: np.asarray(d, dtype=np.int64) for i, d in drop.items() if len(d)}

    def kept(tensor: str) -> float:
        view = analysis.view.get(tensor)
        if not view or any(p.space < 0 for p in view):  # none, or blocked: nothing goes
            return 1.0
        total = sum(p.length * p.block for p in view)
        gone = sum(int(np.count_nonzero((dropped[p.space] >= p.start) & (dropped[p.space] < p.start + p.length)))
                   * p.block for p in view if p.space in dropped)
        return (total - gone) / max(total, 1)

    removed = 0.0
    for node in layers:
        size = int(np.asarray(node.inputs[1].values).size)
        grouped = node.op == "Conv" and node.attrs.get("group", 1) > 1
        left = kept(node.outputs[0].name) * (1.0 if grouped else kept(node.inputs[0].name))
        removed += size * (1.0 - left)
    return int(round(removed))


def _units(space: Space, scores: np.ndarray, round_to: int) -> list[np.ndarray]:
    """The space's removable channels, lowest score first, in units of `round_to` (a first, smaller unit brings
    the count to a multiple of it); at least `round_to` channels are never removable (see `_step`)."""
    step = _step(space, round_to)
    removable = np.argsort(scores, kind="stable")[:space.channels - step]
    first = len(removable) % step or step
    return [u for u in [removable[:first]] + [removable[k:k + step] for k in range(first, len(removable), step)]
            if len(u)]


def _allocate(spaces: list[Space], cost, scores, target: float, round_to: int, removed_by,
              curves: dict[int, tuple[np.ndarray, np.ndarray]] | None = None,
              worth: dict[int, float] | None = None) -> dict[int, list[int]]:
    """Channels to drop per space, whole `_units` in rank order, until `removed_by(drop)` reaches `target` weights:
    next the unit whose measured output error grows least per `worth` of one of its channels (`curves`: per
    space, channel fractions and the error at each), or without curves the unit of lowest mean normalized score
    across all spaces. Worth counts MACs as well as weights: by weights alone the late, large-but-cheap layers
    would take nearly all the pruning (on efficientnet_lite0, half the MAC reduction). The sum of `cost` over the
    dropped channels, which counts a weight twice when its row and its column both go, only saves calls to
    `removed_by` until it passes `target`. Then units taken are given back, costliest first, while the rest
    still reach `target`, so a wide last unit does not overshoot the ratio."""
    units = {s.index: _units(s, scores[s.index], round_to) for s in spaces}
    channels = {s.index: s.channels for s in spaces}

    def key(i: int, k: int) -> float:
        if curves is None:
            return float(np.mean(scores[i][units[i][k]]))
        grid, err = curves[i]
        done = sum(len(u) for u in units[i][:k])
        before, after = np.interp([done / channels[i], (done + len(units[i][k])) / channels[i]], grid, err)
        return float(after - before) / (len(units[i][k]) * worth[i])

    heap = [(key(i, 0), i, 0) for i, u in units.items() if u]
    heapq.heapify(heap)
    drop: dict[int, list[int]] = {i: [] for i in units}
    removed = 0.0
    taken: list[tuple[float, int, int]] = []
    while heap and (removed < target or removed_by(drop) < target):
        entry = heapq.heappop(heap)
        _, i, k = entry
        drop[i].extend(int(c) for c in units[i][k])
        taken.append(entry)
        removed += len(units[i][k]) * cost[i]
        if k + 1 < len(units[i]):
            heapq.heappush(heap, (key(i, k + 1), i, k + 1))
    # a wide unit (a residual stream's channels reach most layers) can overshoot the target: give back the
    # costliest units taken last in their space while what stays removed still reaches it
    for _, i, k in sorted(taken, reverse=True):
        if len(drop[i]) == sum(len(u) for u in units[i][:k + 1]):
            trial = {**drop, i: drop[i][:len(drop[i]) - len(units[i][k])]}
            if removed_by(trial) >= target:
                drop = trial
    return drop


POINTS = (0.125, 0.25, 0.375, 0.5, 0.625, 0.75, 0.875)


def _measured_curves(module, proto, ctx, analysis: ChannelAnalysis, spaces: list[Space], scores, stats,
                     round_to: int) -> dict[int, tuple[np.ndarray, np.ndarray]]:
    """Per space: the model's output error (see prune_sensitivity) when that space alone loses each fraction of
    POINTS of its channels, lowest-ranked first, as pruning removes them: every layer reading the space loses
    those input columns and takes their mean contribution into its bias (`round_to` channels always stay). A
    space no layer with constant weights reads is measured as unboundedly costly."""
    readers = {s.index: [(n, t) for n, t in analysis.consumers if any(p.space == s.index for p in analysis.view[t])]
               for s in spaces}
    position = {n.name: i for i, n in enumerate(module.graph.nodes)}
    units = []
    for s in spaces:
        tensors = [t.name for n, _ in readers[s.index] for t in (n.inputs[1], bias_constant(module.graph, n))
                   if isinstance(t, gs.Constant)]
        first = min(s.producers, key=lambda n: position.get(n.name, 0))
        if tensors:
            units.append((str(s.index), first.name, tensors))

    def prune(key: str, fraction: float) -> dict[str, np.ndarray]:
        space = analysis.spaces[int(key)]
        order = np.argsort(scores[space.index], kind="stable")
        count = min(int(round(fraction * space.channels)), max(space.channels - _step(space, round_to), 0))
        keep = {space.index: np.sort(order[count:])}
        out = {}
        for node, tensor in readers[space.index]:
            weight = np.asarray(node.inputs[1].values, dtype=np.float32)
            rows = weight_rows(node, weight).copy()
            rows[:, np.setdiff1d(np.arange(rows.shape[1]), consumer_columns(analysis, node, tensor, keep))] = 0.0
            new_w = rows_to_weight(node, rows, weight.shape)
            out.update(shifted_inputs(module.graph, node, weight, new_w, stats.get(node.name)))
        return out

    with ctx.progress("Measuring channel-space sensitivity", len(units)) as advance:
        grid, errors = measured_curves(proto, units, ctx.calib, prune, points=POINTS, progress=advance)
    return {s.index: (grid, errors.get(str(s.index), grid * 1e30)) for s in spaces}


def _apply(graph: gs.Graph, analysis: ChannelAnalysis, keep: dict[int, np.ndarray], stats, ctx) -> None:
    """Slice producers, followers and consumers to the kept channels; refit consumers; fix Split/Slice/Reshape."""
    rows_kept = {id(p): (p, kept_positions(analysis.view[p.outputs[0].name], keep))
                 for s in analysis.base() if s.index in keep for p in s.producers}
    cols_kept = {}
    for node, tensor in analysis.consumers:
        if any(p.space in keep for p in analysis.view[tensor]):
            cols_kept[id(node)] = (node, consumer_columns(analysis, node, tensor, keep))
    for key in set(rows_kept) | set(cols_kept):
        node = (rows_kept.get(key) or cols_kept.get(key))[0]
        w = np.asarray(node.inputs[1].values, dtype=np.float64)
        rows = weight_rows(node, w)
        has_bias = node.op != "MatMul" and len(node.inputs) > 2 and isinstance(node.inputs[2], gs.Constant) \
            and node.inputs[2].values.size == rows.shape[0]
        bias = np.asarray(node.inputs[2].values, np.float64).reshape(-1) if has_bias else np.zeros(rows.shape[0])
        delta = None
        if key in cols_kept:
            rows, delta, ridge = _refit(rows, cols_kept[key][1], stats.get(node.name))
            if ctx is not None:
                ctx.layer(node.name, **({"refit": "least-squares", "refit_ridge": ridge} if delta is not None
                                        else {"refit": "none"}))
        if delta is not None and node.op != "MatMul":
            bias = bias + delta
        kept = rows_kept[key][1] if key in rows_kept else np.arange(rows.shape[0])
        if key in rows_kept and ctx is not None:
            ctx.layer(node.name, channels_before=int(rows.shape[0]), channels_after=int(len(kept)))
        rows, bias = rows[kept], bias[kept]
        node.inputs[1] = gs.Constant(fresh_name(graph, node.inputs[1].name + "_pruned"),
                                     rows_to_weight(node, rows).astype(np.float32))
        if has_bias or (delta is not None and node.op != "MatMul"):
            set_input(node, 2, gs.Constant(fresh_name(graph, node.name + "_bias_pruned"), bias.astype(np.float32)))
        elif delta is not None:  # a MatMul's bias Add follows its output space (sliced below); a new one is not
            add_to_bias(graph, node, delta if matmul_bias(graph, node) is not None else delta[kept])
    for space in analysis.spaces:
        for f in space.followers:
            view = analysis.view[f.outputs[0].name]
            if any(p.space in keep for p in view):  # a blocked view (space -1) has no channel to follow
                _slice_follower(graph, f, kept_positions(view, keep), analysis.axis[f.outputs[0].name])
    shapes = {id(n): (analysis.axis[n.outputs[0].name], len(kept_positions(analysis.view[n.outputs[0].name], keep)))
              for n in analysis.rewrites if n.op in ("Reshape", "Expand")}
    for node in analysis.rewrites:
        if id(node) in shapes:  # a shape every reader of which takes the same change is changed in place
            shared = all(shapes.get(id(r)) == shapes[id(node)] for r in node.inputs[1].outputs)
            set_shape_entry(graph, node, *shapes[id(node)], shared=shared)
        else:
            _rewrite_offsets(graph, analysis, node, keep)
    for node, entry, space in analysis.heads:
        if space in keep:
            set_shape_entry(graph, node, entry, len(keep[space]))
    for space in analysis.head_spaces() & set(keep) if ctx is not None else ():
        for p in analysis.spaces[space].producers:
            ctx.layer(p.name, heads_before=analysis.spaces[space].channels, heads_after=len(keep[space]))


def _slice_follower(graph, node: gs.Node, kept: np.ndarray, axis: int) -> None:
    """Slice a depthwise Conv, a BatchNorm-like op's parameters or a per-channel constant to `kept` channels (on
    channel axis `axis` of its output), or set a Resize's output sizes to that many channels."""
    c = node.outputs[0].shape[axis]
    if len(kept) == c:
        return
    sizes = resize_sizes(node)
    if sizes is not None:
        sizes[1] = len(kept)
        set_input(node, 3, gs.Constant(fresh_name(graph, node.inputs[3].name + "_pruned"), sizes))
    for i, along in channel_params(node, c, axis):
        t = node.inputs[i]
        set_input(node, i, gs.Constant(fresh_name(graph, t.name + "_pruned"), np.take(np.asarray(t.values), kept, axis=along)))
    if node.op == "Conv":
        node.attrs["group"] = int(len(kept))


def _rewrite_offsets(graph, analysis: ChannelAnalysis, node: gs.Node, keep) -> None:
    """Split sizes and Slice bounds that count channels, recomputed for the kept channels."""
    if node.op == "Split":
        sizes = np.array([len(kept_positions(analysis.view[o.name], keep)) for o in node.outputs], dtype=np.int64)
        if graph.opset >= 13:  # sizes are an input; opset 18's num_outputs must then go
            node.attrs.pop("num_outputs", None)
            set_input(node, 1, gs.Constant(fresh_name(graph, node.name + "_split"), sizes))
        else:
            node.attrs["split"] = [int(v) for v in sizes]
    elif node.op == "Slice":
        src = analysis.view[node.inputs[0].name]
        kept = kept_positions(src, keep)
        starts, ends = (np.array(const_value(t)) for t in node.inputs[1:3])  # int32 or int64, kept as given
        i, start, end = channel_slice(node, src)
        starts[i], ends[i] = np.count_nonzero(kept < start), np.count_nonzero(kept < end)
        set_input(node, 1, gs.Constant(fresh_name(graph, node.name + "_starts"), starts))
        set_input(node, 2, gs.Constant(fresh_name(graph, node.name + "_ends"), ends))


RIDGES = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 1e3)  # λ as a fraction of the kept inputs' mean Σx²: the candidates


def _refit(rows: np.ndarray, cols: np.ndarray, stats) -> tuple[np.ndarray, np.ndarray | None, float]:
    """Weights on the kept columns, a bias change reproducing the full layer output in least squares, and the
    ridge chosen.

    Minimizes Σ‖W x − W' x_kept − δ‖² + λ‖W' − W_kept‖², a ridge towards the kept weights (so removing columns
    whose inputs are always zero changes nothing). λ is the candidate of RIDGES whose fits on one half of the
    calibration batches reproduce the other half best, both ways round: with few samples for the columns
    kept (a classifier reading one vector per sample), a light ridge fits the calibration set and nothing
    else. Without a held-out half, the lightest candidate."""
    if stats is None or len(stats.hessians) != 1:
        return rows[:, cols], None, 0.0
    held = stats.held
    sums = (stats.hessians[0], stats.sums[0], float(stats.count))
    ridge = RIDGES[0]
    if held is not None and 0 < held.count < stats.count and len(cols):
        halves = [(held.hessians[0], held.sums[0], float(held.count))]
        halves.append(tuple(a - b for a, b in zip(sums, halves[0])))
        error = [sum(_held_error(rows, cols, test, *_ridge_fit(rows, cols, fit, r))
                     for fit, test in (halves, halves[::-1])) for r in RIDGES]
        ridge = RIDGES[int(np.argmin(error))]
    return *_ridge_fit(rows, cols, sums, ridge), ridge


def _ridge_fit(rows: np.ndarray, cols: np.ndarray, sums, ridge: float) -> tuple[np.ndarray, np.ndarray | None]:
    """The minimizer of `_refit`'s objective on sums (Σxxᵀ, Σx, n) at λ = `ridge` · mean Σx² of the kept inputs."""
    h, s, n = sums
    k = len(cols)
    lam = ridge * max(float(np.mean(np.diag(h)[cols])), 1e-12) if k else 0.0
    a = np.zeros((k + 1, k + 1))
    a[:k, :k] = h[np.ix_(cols, cols)] + lam * np.eye(k)
    a[:k, k] = a[k, :k] = s[cols]
    a[k, k] = n
    rhs = np.vstack([h[cols] @ rows.T + lam * rows[:, cols].T, (s @ rows.T)[None, :]])  # (k+1, outputs)
    try:
        sol = np.linalg.solve(a, rhs)
    except np.linalg.LinAlgError:
        return rows[:, cols], None
    return sol[:k].T, sol[k]


def _held_error(rows: np.ndarray, cols: np.ndarray, sums, kept_rows: np.ndarray, delta: np.ndarray | None) -> float:
    """Σ‖W x − W' x_kept − δ‖² over the rows summed in `sums`."""
    h, s, n = sums
    v = rows.astype(np.float64)
    v[:, cols] -= kept_rows
    d = np.zeros(len(v)) if delta is None else delta
    return float(np.sum((v @ h) * v) - 2 * d @ (v @ s) + n * d @ d)
