"""Structured channel pruning: remove whole output channels where the graph allows it, refit the consumer.

A channel group starts at a Conv (group=1) and follows its output through ops that keep channels apart
(Relu, Clip, LeakyRelu, HardSwish, Sigmoid, pooling, depthwise Conv, GlobalAveragePool, Flatten) to one
consumer (Conv with group=1, or Gemm). Anything else on the way (a second reader such as a residual Add,
Concat, Reshape, an unknown op) blocks the group instead of being guessed through. The consumer is refit
by least squares (with an intercept, so the mean of the removed channels moves into its bias) on the
calibration statistics of its input.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from compiler.errors import UnsupportedModelError
from compiler.rewrite import fresh_name, is_graph_output, set_input
from passes.prune_common import layer_statistics, rows_to_weight, weight_rows

CHANNEL_WISE = {"Relu", "Clip", "LeakyRelu", "HardSwish", "HardSigmoid", "Sigmoid", "MaxPool", "AveragePool",
                "GlobalAveragePool", "GlobalMaxPool", "Identity"}


@dataclass(eq=False)
class ChannelGroup:
    """Producer rows, depthwise convs and consumer columns that share one channel index."""

    producer: gs.Node
    depthwise: list[gs.Node] = field(default_factory=list)
    consumer: gs.Node | None = None
    columns_per_channel: int = 1   # consumer input columns per channel (kh*kw for Conv, H*W after Flatten)
    blocked: str = ""


def find_groups(graph: gs.Graph, layers: list[gs.Node]) -> list[ChannelGroup]:
    """One ChannelGroup per prunable Conv producer (blocked ones carry the reason)."""
    groups = []
    for node in layers:
        if node.op != "Conv" or node.attrs.get("group", 1) != 1:
            continue
        group = ChannelGroup(node)
        t = node.outputs[0]
        flatten_block = 1
        while True:
            if is_graph_output(graph, t) or len(t.outputs) != 1:
                group.blocked = f"output of '{node.name}' has {len(t.outputs)} readers" + (
                    " (a graph output)" if is_graph_output(graph, t) else "")
                break
            r = t.outputs[0]
            channels = node.inputs[1].values.shape[0]
            if r.op in CHANNEL_WISE and r.inputs[0] is t:
                t = r.outputs[0]
            elif r.op == "Conv" and r.inputs[0] is t and r.attrs.get("group", 1) == channels \
                    and r.inputs[1].values.shape[0] == channels and isinstance(r.inputs[1], gs.Constant):
                group.depthwise.append(r)
                t = r.outputs[0]
            elif r.op == "Flatten" and r.attrs.get("axis", 1) == 1 and t.shape and all(isinstance(d, int) for d in t.shape[1:]):
                flatten_block = int(np.prod(t.shape[2:])) if len(t.shape) > 2 else 1
                t = r.outputs[0]
            elif r.op == "Conv" and r.inputs[0] is t and r.attrs.get("group", 1) == 1 and isinstance(r.inputs[1], gs.Constant):
                group.consumer = r
                group.columns_per_channel = int(np.prod(r.inputs[1].values.shape[2:]))
                break
            elif r.op == "Gemm" and r.inputs[0] is t and not r.attrs.get("transA", 0) and isinstance(r.inputs[1], gs.Constant):
                group.consumer = r
                group.columns_per_channel = flatten_block
                break
            else:
                group.blocked = f"'{r.name}' ({r.op}) reads the channels of '{node.name}'"
                break
        groups.append(group)
    return groups


def prune_channels(module, ctx, layers: list[gs.Node], ratio: float, round_to: int, data_driven: bool = True) -> dict:
    """Remove output channels so that `ratio` of the prunable weights go; returns the facts for the report.

    data_driven: rank by activation x consumer weight and refit the consumer; otherwise the magnitude
    baseline (L1 norm of the producer's filters, no refit)."""
    graph = module.graph
    groups = find_groups(graph, layers)
    usable = [g for g in groups if not g.blocked]
    total = sum(int(n.inputs[1].values.size) for n in layers)
    stats = layer_statistics(module, ctx, [g.consumer for g in usable]) if data_driven else {}
    cost, scores = {}, {}
    for g in usable:
        c = g.producer.inputs[1].values.shape[0]
        per_channel = g.producer.inputs[1].values[0].size + sum(d.inputs[1].values[0].size for d in g.depthwise)
        cons_rows = weight_rows(g.consumer, np.asarray(g.consumer.inputs[1].values))
        per_channel += cons_rows.shape[0] * g.columns_per_channel
        cost[id(g)] = per_channel
        if data_driven:
            col_norm = np.linalg.norm(cons_rows.reshape(cons_rows.shape[0], c, g.columns_per_channel), axis=(0, 2))
            st = stats.get(g.consumer.name)
            act = np.sqrt(np.diag(st.hessians[0]).reshape(c, -1).sum(axis=1) / max(st.count, 1)) if st else np.ones(c)
            s = col_norm * act
        else:
            s = np.abs(np.asarray(g.producer.inputs[1].values)).reshape(c, -1).sum(axis=1)
        scores[id(g)] = s / max(s.mean(), 1e-12)
    removal = _allocate(usable, cost, scores, ratio * total, round_to)
    if sum(len(r) * cost[id(g)] for g, r in removal.items()) < ratio * total * 0.98:
        most = sum((g.producer.inputs[1].values.shape[0] - max(round_to, 1)) * cost[id(g)] for g in usable)
        blocked = [g for g in groups if g.blocked]
        why = f"; blocked: {blocked[0].blocked}" + (f" and {len(blocked) - 1} more" if len(blocked) > 1 else "") if blocked else ""
        raise UnsupportedModelError(f"channel pruning can remove at most {most / max(total, 1):.0%} of the prunable "
                                    f"weights here, not {ratio:.0%}: {len(blocked)} of {len(groups)} channel groups "
                                    f"are blocked{why}")
    removed_weights = 0
    for g, drop in removal.items():
        if drop:
            removed_weights += len(drop) * cost[id(g)]
            _apply(graph, g, np.array(sorted(drop)), stats.get(g.consumer.name), ctx)
    graph.cleanup(remove_unused_graph_inputs=False)
    interface = {id(t) for t in graph.inputs + graph.outputs}
    for t in graph.tensors().values():  # channel counts changed downstream: let shape inference redo them
        if isinstance(t, gs.Variable) and id(t) not in interface:
            t.shape = None
    module.infer_shapes()
    return {"prunable_weights": total, "removed_weights": int(removed_weights),
            "achieved_ratio": round(removed_weights / max(total, 1), 4),
            "groups": len(groups), "blocked_groups": {g.producer.name: g.blocked for g in groups if g.blocked}}


def _allocate(groups, cost, scores, target: float, round_to: int) -> dict:
    """Lowest normalized scores first, keeping at least `round_to` channels and counts multiple of it."""
    step = max(round_to, 1)
    goal = target
    for _ in range(8):
        order = sorted(((scores[id(g)][c], id(g), c) for g in groups for c in range(len(scores[id(g)]))))
        by_id = {id(g): g for g in groups}
        drop = {id(g): [] for g in groups}
        removed = 0.0
        for _, gid, c in order:
            if removed >= goal:
                break
            n = len(scores[gid])
            if n - len(drop[gid]) - 1 < step:
                continue
            drop[gid].append(c)
            removed += cost[gid]
        for gid, d in drop.items():  # keep counts a multiple of round_to: put back the best of the dropped
            keep = len(scores[gid]) - len(d)
            extra = (-keep) % step
            if extra:
                d.sort(key=lambda c: scores[gid][c])
                del d[len(d) - extra:]
        achieved = sum(len(d) * cost[gid] for gid, d in drop.items())
        if achieved >= target * 0.98:
            break
        goal += target - achieved
    return {by_id[gid]: d for gid, d in drop.items()}


def _apply(graph: gs.Graph, g: ChannelGroup, drop: np.ndarray, stats, ctx) -> None:
    prod = g.producer
    c = prod.inputs[1].values.shape[0]
    keep = np.setdiff1d(np.arange(c), drop)
    _slice_conv_outputs(graph, prod, keep)
    for dw in g.depthwise:
        _slice_conv_outputs(graph, dw, keep)
        dw.attrs["group"] = len(keep)
    cons = g.consumer
    w = np.asarray(cons.inputs[1].values, dtype=np.float64)
    rows = weight_rows(cons, w)
    cols = (keep[:, None] * g.columns_per_channel + np.arange(g.columns_per_channel)[None, :]).reshape(-1)
    new_rows, bias_delta = _refit(rows, cols, stats)
    if cons.op == "Conv":
        new_w = new_rows.reshape((w.shape[0], len(keep)) + w.shape[2:])
    else:
        shape = (new_rows.shape[1], new_rows.shape[0]) if not cons.attrs.get("transB", 0) else new_rows.shape
        new_w = rows_to_weight(cons, new_rows, shape)
    cons.inputs[1] = gs.Constant(fresh_name(graph, cons.inputs[1].name + "_pruned"), new_w.astype(np.float32))
    if bias_delta is not None:
        old = np.asarray(cons.inputs[2].values, np.float64) if len(cons.inputs) > 2 else np.zeros(rows.shape[0])
        set_input(cons, 2, gs.Constant(fresh_name(graph, cons.name + "_bias_refit"), (old + bias_delta).astype(np.float32)))
    if ctx is not None:
        ctx.layer(prod.name, channels_before=int(c), channels_after=int(len(keep)))
        ctx.layer(cons.name, refit="least-squares" if stats is not None else "none")


def _slice_conv_outputs(graph, node, keep):
    w = np.asarray(node.inputs[1].values)
    node.inputs[1] = gs.Constant(fresh_name(graph, node.inputs[1].name + "_pruned"), w[keep])
    if len(node.inputs) > 2 and isinstance(node.inputs[2], gs.Constant):
        node.inputs[2] = gs.Constant(fresh_name(graph, node.inputs[2].name + "_pruned"), np.asarray(node.inputs[2].values)[keep])
    for out in node.outputs:
        out.shape = None


def _refit(rows: np.ndarray, cols: np.ndarray, stats) -> tuple[np.ndarray, np.ndarray | None]:
    """Least-squares weights on the kept columns (and a bias change) reproducing the full layer output."""
    if stats is None or len(stats.hessians) != 1:
        return rows[:, cols], None
    h, s, n = stats.hessians[0], stats.sums[0], float(stats.count)
    k = len(cols)
    a = np.zeros((k + 1, k + 1))
    a[:k, :k] = h[np.ix_(cols, cols)]
    a[:k, k] = a[k, :k] = s[cols]
    a[k, k] = n
    a += 1e-3 * np.mean(np.diag(a[:k, :k])) * np.eye(k + 1) if k else 0
    rhs = np.vstack([h[cols] @ rows.T, (s @ rows.T)[None, :]])  # (k+1, outputs)
    try:
        sol = np.linalg.solve(a, rhs)
    except np.linalg.LinAlgError:
        return rows[:, cols], None
    return sol[:k].T, sol[k]
