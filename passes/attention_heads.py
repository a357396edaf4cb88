"""Attention heads as channels: the part of a multi-head attention block where every op keeps the heads apart.

An attention block reshapes its q/k/v projection's features [..., C] into [..., (3,) H, D] (a *split*
Reshape), works per head (MatMuls batched over the head axis, scaling, per-head biases, softmax over tokens),
and reshapes [..., H, D'] back into features [..., H·D'] (a *merge* Reshape) that the output projection reads.
When slice h of every op's output there depends only on slice h of its inputs, removing head h (its rows of
the projections before, its columns of the projection after, its entries of per-head constants) leaves every
other head's values exactly as they were. `head_regions` finds such regions: tensors each with a head axis,
closed under every op that reads or writes them, bounded by split and merge Reshapes whose head count can be
rewritten. One op it cannot prove head-separable (a Shape, a Reshape mixing heads with tokens, a reduction over
heads) and the region is not returned, so the projections' channels stay blocked as before.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import onnx_graphsurgeon as gs

from compiler.rewrite import const_value, producer, shape_entry
from passes.channel_groups import ELEMENTWISE, NCHW_ONLY, PASS_THROUGH, REDUCE, _moved_axis

UNARY = (PASS_THROUGH - NCHW_ONLY) | REDUCE | {"Softmax", "LogSoftmax", "Split", "Transpose", "Squeeze", "Unsqueeze",
                                              "Slice", "Gather", "Expand"}


@dataclass
class HeadSplit:
    """A Reshape [..., C, ...] → [..., d1, .., dk, ...] whose output axis `entry` is the heads: channel c of its
    input (on `channel_axis`: last for tokens, 1 for NCHW) is
    head (c // block) % heads, each head's `block` channels in a row, the pattern repeated `repeats` times
    (q, k and v of a fused projection)."""

    node: gs.Node
    entry: int
    repeats: int
    block: int
    channel_axis: int  # of its input


@dataclass
class HeadMerge:
    """A Reshape [..., H, d.., ...] → [..., H·block, ...] (its input's head axis is its output's channel axis):
    channel f of its output belongs to head f // block."""

    node: gs.Node
    block: int
    axis: int  # the head axis of its input, the channel axis of its output


@dataclass
class HeadRegion:
    heads: int
    splits: list[HeadSplit] = field(default_factory=list)
    merges: list[HeadMerge] = field(default_factory=list)
    axis: dict[str, int] = field(default_factory=dict)          # tensor inside the region -> its head axis
    nodes: list[gs.Node] = field(default_factory=list)          # the ops inside (not the splits and merges)
    resized: list[tuple[gs.Node, int]] = field(default_factory=list)  # Reshapes inside stating the head count
    followers: list[gs.Node] = field(default_factory=list)      # ops inside with a per-head constant

    @property
    def source(self) -> str:
        """The tensor the first split reads: the channel space its heads come from."""
        return self.splits[0].node.inputs[0].name


def _attends(region: HeadRegion) -> bool:
    """Whether the region multiplies two activations per head (attention's scores or their use), as opposed to
    a channel shuffle's split, Transpose and merge, which has the same shape of region but no heads."""
    return any(n.op in ("MatMul", "Einsum") and not any(isinstance(i, gs.Constant) for i in n.inputs)
               for n in region.nodes)


def head_regions(graph: gs.Graph) -> list[HeadRegion]:
    """Every head-separable attention region of `graph`, found from its merge Reshapes."""
    outputs = {t.name for t in graph.outputs}
    regions, merged = [], set()
    for node in graph.nodes:
        if node.op != "Reshape" or id(node) in merged:
            continue
        merge = _merge(node)
        region = None if merge is None else _grow(node.inputs[0], merge[0], outputs)
        if region is not None and _attends(region):
            regions.append(region)
            merged |= {id(m.node) for m in region.merges}
    return regions


def _same(a, b) -> bool:
    return a == b and a is not None


def _regrouping(x, y, start: int, merged: bool):
    """For a Reshape from shape x to shape y that keeps the axes before `start` and turns one axis at `start` into
    several (or, `merged`, several into one) with the axes after it only regrouped: how many axes that group
    spans (at least two of them longer than 1), else None. Row-major order then indexes the group's axes as
    digits of the one axis."""
    one, many = (y, x) if merged else (x, y)
    if len(one) <= start or not all(_same(a, b) for a, b in zip(x[:start], y[:start])):
        return None
    if not all(isinstance(d, int) for d in list(one[start:]) + list(many[start:])):
        return None
    for k in range(2, len(many) - start + 1):
        if int(np.prod(many[start:start + k])) == one[start] \
                and int(np.prod(many[start + k:])) == int(np.prod(one[start + 1:])):
            return k if sum(d > 1 for d in many[start:start + k]) >= 2 else None  # not just a unit axis added
    return None


def _units_dropped(shape) -> tuple[list, list[int]]:
    """The axes of `shape` longer than 1 (unknown ones count as longer), and their indices in `shape`."""
    index = [i for i, d in enumerate(shape) if d != 1]
    return [shape[i] for i in index], index


def _merge(node: gs.Node) -> tuple[int, int, int] | None:
    """(head axis of its input, channel axis of its output, head width) when a Reshape merges the head axis with
    the axes after it up to some later one into one channel axis (`_regrouping`, unit axes aside: torch's
    [tokens, 1, heads, D] → [tokens, features]), and the output's channel count there is a rewritable constant
    or -1; the head axis is the group's first axis. Else None."""
    x, y = node.inputs[0].shape, node.outputs[0].shape
    if x is None or y is None or len(y) < 2 or np.dtype(node.inputs[0].dtype or np.int64).kind != "f":
        return None
    (xs, xi), (ys, yi) = _units_dropped(x), _units_dropped(y)
    for p in range(len(ys)):
        k = _regrouping(xs, ys, p, merged=True)
        if k is not None:
            if shape_entry(node, yi[p]) is None:
                return None
            return xi[p], yi[p], int(np.prod(xs[p + 1:p + k]))
    return None


def _split(node: gs.Node, axis: int, heads: int) -> HeadSplit | None:
    """The split Reshape writing a tensor whose head axis is `axis` (unit axes aside), or None when it is not one."""
    x, y = node.inputs[0].shape, node.outputs[0].shape
    if x is None or y is None or y[axis] != heads or shape_entry(node, axis) is None:
        return None
    (xs, xi), (ys, yi) = _units_dropped(x), _units_dropped(y)
    at = yi.index(axis)
    for c in range(min(at + 1, len(xs))):
        k = _regrouping(xs, ys, c, merged=False)
        if k is not None and at < c + k:
            return HeadSplit(node, axis, int(np.prod(ys[c:at])), int(np.prod(ys[at + 1:c + k])), xi[c])
    return None


def _unit_reshape(node: gs.Node, t: gs.Tensor, a: int) -> list[tuple[gs.Tensor, int]] | None:
    """For a Reshape that only adds or drops unit axes, reading or writing `t` with head axis `a`: its other
    tensor and that tensor's head axis; else None."""
    x, y = node.inputs[0], node.outputs[0]
    if x.shape is None or y.shape is None:
        return None
    (xs, xi), (ys, yi) = _units_dropped(x.shape), _units_dropped(y.shape)
    if len(xs) != len(ys) or not all(_same(p, q) for p, q in zip(xs, ys)):
        return None
    return [(y, yi[xi.index(a)])] if t is x else [(x, xi[yi.index(a)])]


def _grow(start: gs.Tensor, axis: int, outputs: set[str]) -> HeadRegion | None:
    """The region around `start` (head axis `axis`): every tensor reached through head-separable ops, with its
    head axis; None as soon as one op is not head-separable or a region tensor leaves the region."""
    heads = start.shape[axis]
    region = HeadRegion(heads)
    region.axis[start.name] = axis
    queue, seen = [start], set()
    while queue:
        t = queue.pop()
        if t.name in outputs:
            return None
        for node in [producer(t)] + list(t.outputs):  # readers inside subgraphs too: they are not head-separable
            if node is None:
                return None  # a graph input
            if id(node) in seen:
                continue
            seen.add(id(node))
            a = region.axis[t.name]
            unit = _unit_reshape(node, t, a) if node.op == "Reshape" else None
            if unit is not None:  # [heads, tokens, D] → [1, heads, tokens, D]: its head count is rewritten too
                entry = unit[0][1] if t is node.inputs[0] else a
                if shape_entry(node, entry) is None:
                    return None
                region.resized.append((node, entry))
                linked = (unit, False)
            elif node.op == "Reshape" and node.inputs[0] is t:
                merge = _merge(node)
                if merge is None or merge[0] != a:
                    return None
                region.merges.append(HeadMerge(node, merge[2], merge[1]))
                continue
            elif node.op == "Reshape":
                split = _split(node, a, heads)
                if split is None:
                    return None
                region.splits.append(split)
                continue
            else:
                linked = _head_axes(node, t, a, heads)
            if linked is None:
                return None
            axes, per_head = linked
            for other, b in axes:
                if other.name in region.axis:
                    if region.axis[other.name] != b:
                        return None
                    continue
                if other.shape is None or other.shape[b] != heads:
                    return None
                region.axis[other.name] = b
                queue.append(other)
            region.nodes.append(node)
            if per_head:
                region.followers.append(node)
    return region if region.splits and region.merges else None


def _head_axes(node: gs.Node, t: gs.Tensor, a: int, heads: int) -> tuple[list[tuple[gs.Tensor, int]], bool] | None:
    """For a node reading or writing `t` (head axis `a`): the head axis of each of its other tensors that
    carries heads, and whether it has a per-head constant; None when the op is not head-separable."""
    if node.domain or any(isinstance(v, gs.Graph) for v in node.attrs.values()):
        return None
    if node.op in UNARY:
        x = node.inputs[0]
        if x.shape is None or any(i is not x and i.name and const_value(i) is None for i in node.inputs):
            return None
        if t is x:
            b = _forward(node, a)
            return None if b is None else ([(o, b) for o in node.outputs if o.name], False)
        candidates = [i for i in range(len(x.shape)) if _forward(node, i) == a]
        if len(candidates) != 1:
            return None
        return [(x, candidates[0])] + [(o, a) for o in node.outputs if o.name and o is not t], False
    if node.op == "MatMul":
        xs = node.inputs + node.outputs
        ranks = {len(i.shape) if i.shape is not None else None for i in xs}
        if any(not isinstance(i, gs.Variable) for i in node.inputs) or len(ranks) != 1 or None in ranks \
                or a >= len(t.shape) - 2:
            return None
        return [(i, a) for i in xs if i is not t], False
    if node.op in ELEMENTWISE:
        out = node.outputs[0]
        if out.shape is None or t.shape is None:
            return None
        rank = len(out.shape)
        at = a + rank - len(t.shape)  # the head axis in the output's frame (numpy broadcasting aligns the last axes)
        axes, per_head = [], False
        for i in list(node.inputs) + [out]:
            if i is t:
                continue
            value = const_value(i)
            shape = value.shape if value is not None else i.shape
            if shape is None:
                return None
            k = at - (rank - len(shape))
            size = shape[k] if k >= 0 else 1
            if size == 1:
                continue
            if size != heads or (value is not None and not isinstance(i, gs.Constant)):  # only initializers are sliced
                return None
            if value is not None:
                per_head = True
            else:
                axes.append((i, k))
        return axes, per_head
    return None


def _forward(node: gs.Node, a: int) -> int | None:
    """The head axis of a one-input op's outputs when its input's is `a`, or None when the op mixes heads."""
    x = node.inputs[0]
    rank = len(x.shape)
    if node.op in ("Softmax", "LogSoftmax"):
        return a if node.attrs.get("axis", -1) % rank != a else None
    if node.op == "Split":
        return a if node.attrs.get("axis", 0) % rank != a else None
    if node.op in PASS_THROUGH:
        return a
    if node.op == "Expand":  # broadcast to a constant shape: new leading axes shift the others
        out = node.outputs[0].shape
        return None if out is None else a + len(out) - rank
    return _moved_axis(node, [x], {x.name: a})
