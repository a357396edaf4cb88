"""Channel dependency analysis for structured pruning: which channels must be removed together.

Tensors whose channel axis is indexed the same way are joined in a networkx graph: an op's input and output
when the op keeps channels apart (activations, pooling, BatchNormalization, depthwise Conv, element-wise ops
with a per-channel or scalar constant, Transpose), and all channel-carrying operands of an element-wise op
(residual Add/Sub, SE Mul gates). The channel axis is 1 (NCHW), except where a MatMul with a constant weight
writes its features on the last axis (a transformer's Linear on [batch, tokens, features]); element-wise ops
keep it, and Transpose and the other layout ops that keep channels apart move it (see _moved_axis). Each connected component is a channel *space*. A space made of the outputs
of prunable layers (Conv with group=1, Gemm, MatMul) is a *base* space: removing channel c means removing
row c of every producer in it. Concat, Split, Slice on the channel axis and Flatten/Reshape
into features make *derived* tensors whose channels are pieces of base spaces (a view). Any other reader
of a channel tensor (an op the analysis does not understand, a graph output, a grouped Conv) blocks every
base space in that tensor's view, and a space with any other origin is blocked: nothing is guessed.
Multi-head attention found by attention_heads makes a base space of heads: each channel is one head, its
q/k/v rows a view with `block` features per head (repeated for q, k and v), the merged heads a derived view.
Statistics over the channels do not block them: a LayerNorm over the channel axis keeps them aligned (its
scale and bias are sliced) and a ReduceMean over it is read by broadcasting; both are the space's
`normalizers`, which prune_channel refits to the kept channels (normalizer_fit), as removing channels is not
exact for them.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import networkx as nx
import numpy as np
import onnx_graphsurgeon as gs

from compiler.rewrite import const_value, shape_entry

PASS_THROUGH = {"Relu", "Clip", "LeakyRelu", "HardSwish", "HardSigmoid", "Sigmoid", "Tanh", "Elu", "Selu", "Softplus",
                "PRelu", "Erf", "Gelu", "Mish", "MaxPool", "AveragePool", "LpPool", "GlobalAveragePool",
                "GlobalMaxPool", "Identity", "Dropout", "BatchNormalization", "InstanceNormalization",
                "Resize", "Upsample", "Pad", "Cast", "Neg", "Abs", "Sqrt", "Exp", "Reciprocal"}
NCHW_ONLY = {"MaxPool", "AveragePool", "LpPool", "GlobalAveragePool", "GlobalMaxPool", "BatchNormalization",
             "InstanceNormalization", "Resize", "Upsample", "Pad"}  # pass-through only with channels on axis 1
ELEMENTWISE = {"Add", "Sub", "Mul", "Div", "Pow", "Max", "Min", "Sum", "Mean"}
REDUCE = {"ReduceMean", "ReduceSum", "ReduceMax", "ReduceMin", "ReduceL1", "ReduceL2", "ReduceSumSquare", "ReduceProd",
          "ReduceLogSumExp"}
LAYOUT = {"Transpose", "Reshape", "Flatten", "Squeeze", "Unsqueeze", "Slice", "Gather", "Concat", "Expand"} | REDUCE  # _moved_axis
DERIVING = {"Concat", "Split", "Slice", "Flatten", "Reshape"}
# ops that carry a statistic over the channels on (a written-out LayerNorm's variance and 1/σ)
STATISTIC_OPS = ELEMENTWISE | {"Sqrt", "Reciprocal", "Neg", "Abs", "Exp", "Log", "Cast", "Identity", "Relu", "Clip",
                               "Unsqueeze", "Squeeze", "Reshape", "Expand", "Flatten"}
# inputs of these ops, past the first, that are per-channel constants to slice (or not channel-wise at all)
CHANNEL_PARAMS = {"BatchNormalization": (1, 2, 3, 4), "InstanceNormalization": (1, 2), "PRelu": (1,), "Clip": (),
                  "Resize": (), "Upsample": (), "Pad": (), "LayerNormalization": (1, 2)}


@dataclass(frozen=True)
class Piece:
    """Channels [start, start + length) of base space `space`, each repeated `block` times in a row."""

    space: int
    start: int
    length: int
    block: int = 1


@dataclass(eq=False)
class Space:
    """One channel space: tensors indexed alike, the layers producing its channels and ops sliced with it."""

    index: int
    channels: int
    tensors: list[str] = field(default_factory=list)
    producers: list[gs.Node] = field(default_factory=list)     # rows of these layers are the channels
    followers: list[gs.Node] = field(default_factory=list)     # depthwise Conv, BN, per-channel constants
    blocked: str = ""
    view: list[Piece] | None = None                           # set for a derived space
    block: int = 1                                            # features per channel: an attention head's width
    normalizers: list[gs.Node] = field(default_factory=list)  # statistics over these channels: is_normalizer, is_channel_mean


@dataclass
class ChannelAnalysis:
    spaces: list[Space]
    view: dict[str, list[Piece]]                       # tensor name -> its channels as pieces of base spaces
    consumers: list[tuple[gs.Node, str]]               # (layer, input tensor) whose input columns follow a view
    rewrites: list[gs.Node]                            # Split / Slice / Reshape whose constants follow a view
    axis: dict[str, int] = field(default_factory=dict)  # channel tensor -> its channel axis
    heads: list[tuple[gs.Node, int, int]] = field(default_factory=list)  # (split Reshape, head entry, space)

    def base(self) -> list[Space]:
        return [s for s in self.spaces if s.view is None]

    def head_spaces(self) -> set[int]:
        """The spaces whose channels are attention heads."""
        return {space for _, _, space in self.heads}


def channels_of(t: gs.Tensor, axis: int = 1) -> int | None:
    shape = t.shape
    if shape is None or len(shape) < 2 or len(shape) <= axis or not isinstance(shape[axis], int):
        return None
    return shape[axis]


def is_depthwise(node: gs.Node) -> bool:
    """A Conv with one constant filter per channel (group == input channels == output channels)."""
    w = const_value(node.inputs[1]) if len(node.inputs) > 1 else None
    g = node.attrs.get("group", 1)
    return w is not None and g > 1 and w.shape[0] == g and w.shape[1] == 1


def is_normalizer(node: gs.Node, axis: int | None) -> bool:
    """A LayerNormalization over channel axis `axis` alone, the last axis, with a per-channel constant scale
    (and bias) and no statistics output read. Its channels stay aligned, but each output depends on all of them
    through the mean and variance: removing channels changes the others' statistics, which prune_channel
    corrects (see normalizer_fit); it is not an exact removal even for a channel that is always 0."""
    shape = node.inputs[0].shape
    if node.op != "LayerNormalization" or shape is None or axis is None or axis != len(shape) - 1:
        return False
    if node.attrs.get("axis", -1) % len(shape) != axis or any(o.outputs for o in node.outputs[1:]):
        return False
    return all(isinstance(t, gs.Constant) and np.asarray(t.values).shape == (shape[axis],) for t in node.inputs[1:])


def is_channel_mean(node: gs.Node, axis: int | None) -> bool:
    """A ReduceMean or ReduceSum over channel axis `axis` alone, a statistic whose output no channel indexes:
    a LayerNorm written out (as a mean, or as jax2tf and TF write it, a sum times 1/C), ConvNeXt-V2's global
    response normalization; or the GlobalAveragePool that reduce-mean-to-pool makes of a mean over the last
    axis of [batch, tokens, features]. Like a LayerNorm, removing channels changes it; normalizer_fit
    corrects it."""
    shape = node.inputs[0].shape
    if node.op == "GlobalAveragePool":
        return shape is not None and len(shape) == 3 and axis == 2
    if node.op not in ("ReduceMean", "ReduceSum") or shape is None or axis is None:
        return False
    given = node.attrs.get("axes") if "axes" in node.attrs else (
        const_value(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1].name else None)
    return given is not None and {int(a) % len(shape) for a in np.asarray(given).reshape(-1)} == {axis}


def _aligned_channel(const: np.ndarray, rank: int, axis: int = 1) -> int:
    """The size of a broadcast constant along channel axis `axis` of a rank-`rank` tensor."""
    if const.ndim < rank - axis:
        return 1
    return const.shape[const.ndim - rank + axis]


def _linear_weight(node: gs.Node) -> np.ndarray | None:
    """The constant weight of a layer the analysis prunes and refits: Conv (group 1), Gemm (no transA), or a
    MatMul whose second input is a constant matrix."""
    if node.op not in ("Conv", "Gemm", "MatMul") or len(node.inputs) < 2 or not isinstance(node.inputs[1], gs.Constant):
        return None
    if node.attrs.get("group", 1) != 1 or node.attrs.get("transA", 0):
        return None
    w = const_value(node.inputs[1])
    return None if node.op == "MatMul" and w.ndim != 2 else w


def _output_axis(node: gs.Node, ins: list[gs.Tensor], axis_of: dict[str, int], rank: int | None,
                 moved: int | None) -> int:
    """The channel axis of the node's outputs: last for a constant-weight MatMul, `moved` by a layout op that
    keeps channels apart, kept by element-wise ops of equal rank, else 1."""
    if node.op == "MatMul" and rank is not None and _linear_weight(node) is not None:
        return rank - 1
    if moved is not None:
        return moved
    if node.op == "LayerNormalization" and ins and node.inputs[0] is ins[0]:
        return axis_of[ins[0].name]
    if not ins and node.op in ELEMENTWISE and rank is not None and (found := _constant_axis(node, rank)) is not None:
        return found
    if not ins or rank is None or node.op in LAYOUT:
        return 1
    if (node.op not in PASS_THROUGH and node.op not in ELEMENTWISE) or any(len(t.shape) != rank for t in ins):
        return 1
    wide = [axis_of[t.name] for t in ins if (channels_of(t, axis_of[t.name]) or 0) > 1]  # not a broadcast operand
    return wide[0] if wide else axis_of[ins[0].name]


def _constant_axis(node: gs.Node, rank: int) -> int | None:
    """The channel axis of an element-wise product of statistics and constants (1/σ times a LayerNorm's
    scale): the one axis besides the batch along which its constant inputs vary and its other inputs do not;
    else None."""
    constant, variable = set(), set()
    for t in node.inputs:
        shape = np.shape(t.values) if isinstance(t, gs.Constant) else t.shape
        if shape is None or len(shape) > rank:
            return None
        wide = {rank - len(shape) + i for i, d in enumerate(shape) if d != 1}
        (constant if isinstance(t, gs.Constant) else variable).update(wide)
    return constant.pop() if len(constant) == 1 and not constant & (variable | {0}) else None


def _axis(node: gs.Node, rank: int | None) -> int | None:
    axis = node.attrs.get("axis", 0 if node.op in ("Concat", "Split") else 1)
    if rank is None:
        return axis if axis >= 0 else None
    return axis % rank


def analyze(graph: gs.Graph, prunable: list[gs.Node], joining: list[gs.Node] = ()) -> ChannelAnalysis:
    """Channel spaces of `graph` for pruning the output channels of `prunable` layers. A `joining` layer (the
    stem) loses output channels only with a space some `prunable` layer produces too: a ViT's patch embedding
    or a ResNet's stem writing the residual stream."""
    chosen = {id(n) for n in prunable}
    joining = {id(n) for n in joining}
    links = nx.Graph()
    origin: dict[str, str] = {}         # tensor -> why it starts channels ("" for a prunable producer)
    producer_of: dict[str, gs.Node] = {}
    derived: dict[str, gs.Node] = {}    # tensor -> the Concat/Split/Slice/Flatten/Reshape that defines it
    followers: dict[str, list[gs.Node]] = {}
    normalizers: dict[str, list[gs.Node]] = {}
    blocks: list[tuple[str, str]] = []  # (tensor, reason): every base space in its view is blocked
    consumers: list[tuple[gs.Node, str]] = []
    rewrites: list[gs.Node] = []
    channel_tensors: dict[str, gs.Tensor] = {}
    axis_of: dict[str, int] = {}                 # channel tensor -> its channel axis
    statistic: set[str] = set()                  # tensors computed from channel means or sums alone (no channel index)
    broadcast: dict[str, gs.Node] = {}           # Expand of a constant to a run-time shape (torch's class token)
    from passes.attention_heads import head_regions  # builds on this module's axis rules
    regions = head_regions(graph)
    inside = {id(n) for r in regions for n in r.nodes + [s.node for s in r.splits]}
    merges = {id(m.node): (r, m) for r in regions for m in r.merges}
    split_inputs = {s.node.inputs[0].name for r in regions for s in r.splits}

    for t in graph.inputs:
        if channels_of(t):
            channel_tensors[t.name] = t
            axis_of[t.name] = 1
            origin[t.name] = f"graph input '{t.name}'"
            links.add_node(t.name)
    for node in graph.nodes:
        ins = [t for t in node.inputs if isinstance(t, gs.Variable) and t.name in channel_tensors]
        if id(node) in inside:  # an attention head region: its split reads the projection's channels as heads
            blocks.extend((t.name, f"'{node.name}' ({node.op}) reads the channels of '{t.name}'")
                          for t in ins if t.name not in split_inputs)
            continue
        if id(node) in merges:  # ... and its merge writes the heads as the output projection's input channels
            out = node.outputs[0]
            channel_tensors[out.name], axis_of[out.name], derived[out.name] = out, merges[id(node)][1].axis, node
            links.add_node(out.name)
            rewrites.append(node)
            continue
        if node.op == "Expand" and not ins and isinstance(node.inputs[0], gs.Constant):
            broadcast[node.outputs[0].name] = node  # its channels are the constant's: see the Concat below
            continue
        x_axis = axis_of.get(ins[0].name) if ins else None
        if ins and node.inputs[0] is ins[0] and is_channel_mean(node, x_axis):  # its output is not indexed by channels
            normalizers.setdefault(ins[0].name, []).append(node)
            statistic.update(t.name for t in node.outputs)
            continue
        rank = len(node.outputs[0].shape) if node.outputs and node.outputs[0].shape is not None else None
        read = [t for t in node.inputs if t.name in statistic]
        if read and not ins:  # computed from statistics: not indexed by channels either, unless scaled per channel
            per_channel = node.op in ELEMENTWISE and rank is not None and _constant_axis(node, rank) is not None
            if node.op in STATISTIC_OPS and not per_channel:
                statistic.update(t.name for t in node.outputs)
                continue
        if read and node.op not in ELEMENTWISE:  # read otherwise: channel tensors from their op, as any other
            for t in read:
                channel_tensors[t.name], axis_of[t.name], origin[t.name] = t, 1, f"'{t.inputs[0].name}' ({t.inputs[0].op})"
                links.add_node(t.name)
            ins = [t for t in node.inputs if isinstance(t, gs.Variable) and t.name in channel_tensors]
            x_axis = axis_of.get(ins[0].name) if ins else None
        constants = {t.name: np.asarray(broadcast[t.name].inputs[0].values) for t in node.inputs if t.name in broadcast}
        moved = _moved_axis(node, ins, axis_of, constants) if node.op in LAYOUT else None
        axis = _output_axis(node, ins, axis_of, rank, moved)
        outs = [t for t in node.outputs if channels_of(t, axis)]
        for t in outs:
            channel_tensors[t.name] = t
            axis_of[t.name] = axis
            links.add_node(t.name)
        op = node.op

        if _linear_weight(node) is not None:
            reads = 1 if op != "MatMul" else len(node.inputs[0].shape or ()) - 1
            if ins and node.inputs[0] is ins[0] and x_axis == reads:
                consumers.append((node, node.inputs[0].name))
            elif ins:
                blocks.append((ins[0].name, f"'{node.name}' ({op}) reads '{ins[0].name}' across its channel axis"))
            for t in outs:
                if id(node) in chosen or id(node) in joining:
                    origin[t.name] = ""
                    producer_of[t.name] = node
                else:
                    origin[t.name] = f"'{node.name}' ({op}) is not pruned (first layer or classifier)"
            continue
        if op == "Conv" and is_depthwise(node) and ins and outs and x_axis == 1 and channels_of(ins[0]) == channels_of(outs[0]):
            links.add_edge(ins[0].name, outs[0].name)
            followers.setdefault(outs[0].name, []).append(node)
            continue
        if op == "LayerNormalization" and ins and outs and node.inputs[0] is ins[0] and is_normalizer(node, x_axis):
            links.add_edge(ins[0].name, outs[0].name)
            followers.setdefault(outs[0].name, []).append(node)
            normalizers.setdefault(outs[0].name, []).append(node)
            continue
        if op in PASS_THROUGH and ins and outs and node.inputs[0] is ins[0] and (x_axis == 1 or op not in NCHW_ONLY) \
                and x_axis == axis and channels_of(ins[0], x_axis) == channels_of(outs[0], axis):
            params = [node.inputs[i] for i in CHANNEL_PARAMS.get(op, ()) if i < len(node.inputs)]
            if all(isinstance(p, gs.Constant) for p in params) and all(
                    t is ins[0] or isinstance(t, gs.Constant) or t.name == "" for t in node.inputs):
                links.add_edge(ins[0].name, outs[0].name)
                if params or resize_sizes(node) is not None:
                    followers.setdefault(outs[0].name, []).append(node)
                continue
        if op in ELEMENTWISE and outs and rank is not None:
            c = channels_of(outs[0], axis)
            ok, per_channel = True, False
            for t in node.inputs:
                if isinstance(t, gs.Constant):
                    ch = _aligned_channel(np.asarray(t.values), rank, axis)
                    per_channel |= ch == c and c > 1
                    ok &= ch in (1, c)
                elif t.name in channel_tensors and axis_of[t.name] == axis and channels_of(t, axis) == c:
                    links.add_edge(t.name, outs[0].name)
                elif t.shape is not None and len(t.shape) == rank and channels_of(t, axis) == 1:
                    continue  # broadcast over channels: not indexed by them
                else:
                    ok = False
            if ok:
                if per_channel:
                    followers.setdefault(outs[0].name, []).append(node)
                continue
            for t in ins:
                blocks.append((t.name, f"'{node.name}' ({op}) mixes its inputs' channels"))
            for t in outs:
                origin[t.name] = f"'{node.name}' ({op})"
            continue
        if op in ("Flatten", "Reshape") and ins and node.inputs[0] is ins[0] and _merged_positions(node, x_axis):
            out = node.outputs[0]  # channels last, positions merged into them: out[..., p·C + c] is channel c
            derived[out.name], channel_tensors[out.name], axis_of[out.name] = node, out, len(out.shape) - 1
            links.add_node(out.name)
            if op == "Reshape":
                rewrites.append(node)
            continue
        if op in DERIVING and ins and (op == "Concat" or node.inputs[0] is ins[0]) and _derives_channels(node) \
                and all(axis_of[t.name] == 1 for t in ins):
            for t in node.outputs:
                derived[t.name] = node
                channel_tensors.setdefault(t.name, t)
                axis_of.setdefault(t.name, 1)
                links.add_node(t.name)
            if op in ("Split", "Slice", "Reshape"):
                rewrites.append(node)
            continue
        if op == "Shape" and ins and _dims_read_apart(node, x_axis):
            continue
        if moved is not None and outs:
            for t in ins:
                links.add_edge(t.name, outs[0].name)
            if op in ("Reshape", "Expand"):
                rewrites.append(node)
            if op == "Concat" and channel_params(node, channels_of(outs[0], axis), axis):  # a class token
                followers.setdefault(outs[0].name, []).append(node)
            for name in constants:  # a class token expanded to the batch: its constant is sliced, its shape kept
                t = broadcast[name].outputs[0]
                channel_tensors[name], axis_of[name] = t, axis
                links.add_edge(name, outs[0].name)
                followers.setdefault(name, []).append(broadcast[name])
                rewrites.append(broadcast[name])
            continue
        for t in ins:
            blocks.append((t.name, f"'{node.name}' ({op}) reads the channels of '{t.name}'"))
        for t in outs:
            origin[t.name] = f"'{node.name}' ({op})"
    for t in graph.outputs:
        if t.name in channel_tensors:
            blocks.append((t.name, f"'{t.name}' is a graph output"))
    for node in graph.nodes:  # tensors a subgraph (If/Loop body) reads from this scope
        for name in _subgraph_reads(node):
            if name in channel_tensors:
                blocks.append((name, f"'{name}' is read inside the subgraph of '{node.name}' ({node.op})"))

    layout, conflict = _head_layouts(regions, links, axis_of)
    spaces: list[Space] = []
    space_of: dict[str, int] = {}
    for comp in sorted(nx.connected_components(links), key=min):
        names = sorted(comp)
        region = layout[names[0]][0] if names[0] in layout else None
        space = Space(len(spaces), channels_of(channel_tensors[names[0]], axis_of[names[0]]) or 0, names)
        if region is not None:
            space.channels, space.block = region.heads, _head_block(region)
            space.blocked = next((conflict[n] for n in names if n in conflict), "")
        for n in names:
            space_of[n] = space.index
            space.followers.extend(followers.get(n, []))
            space.normalizers.extend(normalizers.get(n, []))
            if n in producer_of:
                space.producers.append(producer_of[n])
            elif n in origin and origin[n] and not space.blocked:
                space.blocked = f"channels of '{n}' come from {origin[n]}"
        if space.producers and all(id(p) in joining for p in space.producers) and not space.blocked:
            p = space.producers[0]
            space.blocked = f"channels of '{p.outputs[0].name}' come from '{p.name}' ({p.op}), which is not pruned (first layer)"
        defs = [n for n in names if n in derived]
        if defs and space.producers:  # several definitions must agree (checked with their views below)
            space.blocked = space.blocked or f"'{derived[defs[0]].name}' ({derived[defs[0]].op}) output is mixed with other channels"
        spaces.append(space)

    view: dict[str, list[Piece]] = {}
    heads = [(node, entry, space_of[r.source]) for r in regions if r.source in space_of
             for node, entry in [(s.node, s.entry) for s in r.splits] + r.resized]
    for node in graph.nodes:  # topological: views of derived tensors from their inputs' views
        for t in node.outputs:
            if t.name in derived:
                if id(node) in merges:
                    region, merge = merges[id(node)]
                    sources = [r.node.inputs[0].name for r in region.splits]
                    v = [Piece(space_of[region.source], 0, region.heads, merge.block)] if region.source in space_of else None
                else:
                    sources = [i.name for i in node.inputs if i.name in space_of]
                    v = _derived_view(node, t, view, axis_of)
                s = spaces[space_of[t.name]]
                if v is not None and s.view is not None and v != s.view:  # another definition of these channels
                    s.blocked = s.blocked or f"'{node.name}' ({node.op}) output is mixed with other channels"
                    for p in s.view:
                        if p.space >= 0:
                            spaces[p.space].blocked = spaces[p.space].blocked or s.blocked
                if v is None or s.blocked:
                    reason = s.blocked or f"'{node.name}' ({node.op}) splits channels in a way the analysis does not follow"
                    blocks.extend((name, reason) for name in sources)
                    v = [Piece(-1, 0, channels_of(t, axis_of[t.name]) or 0)]  # blocked: every channel stays
                s.view = v
                for name in s.tensors:
                    view[name] = v
        for t in node.outputs:
            if t.name in space_of and t.name not in view and spaces[space_of[t.name]].view is None:
                s = spaces[space_of[t.name]]
                split = layout[t.name][1] if t.name in layout else None  # q, k and v: heads of `block` in a row
                view[t.name] = [Piece(s.index, 0, s.channels, split.block)] * split.repeats if split else \
                    [Piece(s.index, 0, s.channels)]
    for t in graph.inputs:
        if t.name in space_of:
            s = spaces[space_of[t.name]]
            view[t.name] = [Piece(s.index, 0, s.channels)]
    for name, reason in blocks:
        for piece in view.get(name, []):
            if piece.space >= 0 and not spaces[piece.space].blocked:
                spaces[piece.space].blocked = reason
        if name in space_of and not spaces[space_of[name]].blocked:
            spaces[space_of[name]].blocked = reason
    _block_what_blocked_views_hold(spaces)
    for r in regions:  # per-head constants inside a region (a relative position bias) follow the heads
        if r.source in space_of:
            s = spaces[space_of[r.source]]
            for f in r.followers:
                s.followers.append(f)
                view[f.outputs[0].name], axis_of[f.outputs[0].name] = [Piece(s.index, 0, s.channels)], r.axis[f.outputs[0].name]
    for s in spaces:
        if s.view is None and not s.producers and not s.blocked:
            s.blocked = "no prunable layer produces these channels"
    usable = [(n, t) for n, t in consumers if view.get(t) and all(p.space >= 0 for p in view[t])]
    return ChannelAnalysis(spaces, view, usable, rewrites, axis_of, heads)


def _head_layouts(regions, links: nx.Graph, axis_of: dict[str, int]) -> tuple[dict[str, tuple], dict[str, str]]:
    """Per channel tensor indexed like the input of an attention region's split Reshape: (region, split); and
    the tensors whose heads two splits read differently, or a split reads off their channel axis, with why.
    Links the inputs of one region's splits (separate q, k and v projections), whose heads go together."""
    layout: dict[str, tuple] = {}
    conflict: dict[str, str] = {}
    for r in regions:
        names = [s.node.inputs[0].name for s in r.splits if s.node.inputs[0].name in links]
        for s in r.splits:
            x = s.node.inputs[0].name
            if x not in links:
                continue
            if axis_of[x] != s.channel_axis:
                conflict[x] = f"'{s.node.name}' splits axis {s.channel_axis} of '{x}' into heads, not its channel axis"
            for name in nx.node_connected_component(links, x):
                seen = layout.get(name)
                if seen is not None and (seen[0] is not r or (seen[1].repeats, seen[1].block) != (s.repeats, s.block)):
                    conflict[name] = f"'{seen[1].node.name}' and '{s.node.name}' split the heads of '{name}' differently"
                layout[name] = (r, s)
        links.add_edges_from(zip(names, names[1:]))
    return layout, conflict


def _head_block(region) -> int:
    """Features per head common to every tensor of the region (what a channel-count alignment must divide)."""
    return int(np.gcd.reduce([s.block for s in region.splits] + [m.block for m in region.merges]))


def resize_sizes(node: gs.Node) -> np.ndarray | None:
    """A Resize's constant output `sizes` (torch.export writes them, channel count included), else None."""
    if node.op != "Resize" or len(node.inputs) < 4 or not isinstance(node.inputs[3], gs.Constant):
        return None
    return np.array(node.inputs[3].values, dtype=np.int64)


def channel_params(node: gs.Node, channels: int, axis: int = 1) -> list[tuple[int, int]]:
    """(input index, axis) of a follower's constant inputs that hold one entry per channel (on channel axis
    `axis` of its output): a depthwise Conv's weight and bias, a normalization's parameters, a PRelu slope or
    element-wise constant broadcast per channel."""
    rank = len(node.outputs[0].shape)
    out = []
    for i, t in enumerate(node.inputs):
        if not isinstance(t, gs.Constant):
            continue
        v = np.asarray(t.values)
        if node.op in ("Conv", "BatchNormalization", "InstanceNormalization"):  # 1-D along the channels
            if v.ndim and v.shape[0] == channels:
                out.append((i, 0))
        elif v.ndim >= rank - axis and v.shape[v.ndim - rank + axis] == channels:  # broadcast (PRelu, Mul, Add)
            out.append((i, v.ndim - rank + axis))
    return out


def _subgraph_reads(node: gs.Node) -> set[str]:
    """Names of the tensors read by the nodes of `node`'s subgraphs, nested ones included."""
    names = set()
    for value in node.attrs.values():
        if isinstance(value, gs.Graph):
            for inner in value.nodes:
                names.update(t.name for t in inner.inputs)
                names |= _subgraph_reads(inner)
    return names


def _derives_channels(node: gs.Node) -> bool:
    """Whether a Concat/Split/Slice/Flatten/Reshape output is pieces of its inputs' channels the analysis follows."""
    out = node.outputs[0]
    x = node.inputs[0]
    rank = len(x.shape) if x.shape is not None else None
    if node.op == "Concat":
        return rank is not None and _axis(node, rank) == 1
    if node.op == "Split":
        return rank is not None and _axis(node, rank) == 1
    if node.op == "Slice":
        vals = [const_value(t) for t in node.inputs[1:]]
        if any(v is None for v in vals) or rank is None:
            return False
        axes = vals[2] if len(vals) > 2 else np.arange(len(vals[0]))
        steps = vals[3] if len(vals) > 3 else np.ones(len(vals[0]), dtype=np.int64)
        axes = [int(a) % rank for a in axes]
        return 1 in axes and all(int(s) == 1 for s in steps)
    if node.op in ("Flatten", "Reshape"):
        if out.shape is None or x.shape is None or len(out.shape) != 2 or not all(isinstance(d, int) for d in x.shape[1:]):
            return False
        if node.op == "Flatten" and node.attrs.get("axis", 1) != 1:
            return False
        if node.op == "Reshape" and const_value(node.inputs[1]) is None:
            return False
        return out.shape[1] == int(np.prod(x.shape[1:]))
    return False


def _merged_positions(node: gs.Node, axis: int | None) -> int:
    """For a Flatten/Reshape of a channels-last tensor whose last output axis holds k ≥ 2 positions' worth of
    channels ([N, H, W, C] → [N, H·W·C] into a Dense layer; magika's [batch, 2048, 64] → [batch, 512, 256]), k:
    feature f of the output is channel f mod C. 0 otherwise, or when the Reshape's last target entry is not a
    constant (or -1) that can follow a change of C."""
    x, out = node.inputs[0], node.outputs[0]
    if x.shape is None or out.shape is None or axis is None or axis != len(x.shape) - 1 or len(out.shape) < 2:
        return 0
    c, last = x.shape[-1], out.shape[-1]
    if not isinstance(c, int) or not isinstance(last, int) or c < 1 or last % c or last // c < 2:
        return 0
    if node.op == "Reshape":
        entry = shape_entry(node, len(out.shape) - 1)
        if entry is None or entry == 0:
            return 0
    return last // c


def _moved_axis(node: gs.Node, ins: list[gs.Tensor], axis_of: dict[str, int],
                constants: dict[str, np.ndarray] | None = None) -> int | None:
    """The channel axis of the output of a layout op that keeps every channel apart, or None: a Transpose; a
    Reshape/Flatten that only regroups the other axes; a Squeeze/Unsqueeze, Reduce, Slice or Gather (constant
    indices) over other axes; a Concat of tensors with the same channels (or constants holding one entry per channel, such
    as a class token, given or expanded from `constants`: tensor name -> the constant) along another axis."""
    if not ins or (ins[0] is not node.inputs[0] and node.op != "Concat") or ins[0].shape is None:
        return None
    axis, rank = axis_of[ins[0].name], len(ins[0].shape)
    if node.op == "Transpose":
        return list(node.attrs.get("perm", range(rank - 1, -1, -1))).index(axis)
    if node.op in ("Reshape", "Flatten"):
        return _regrouped_axis(node, axis)
    if node.op == "Expand":  # to a shape of the same rank that keeps the channel count (a constant entry, or 1)
        out = node.outputs[0]
        if ins[0] is not node.inputs[0] or out.shape is None or len(out.shape) != rank or out.shape[axis] != ins[0].shape[axis]:
            return None
        entry = shape_entry(node, axis)
        return axis if entry is not None and entry in (1, out.shape[axis]) else None
    if len(ins) > 1 and node.op != "Concat":
        return None
    if node.op in REDUCE:
        given = node.attrs.get("axes") if "axes" in node.attrs else (
            const_value(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1].name else None)
        reduced = {int(a) % rank for a in given} if given is not None and len(given) else set()
        if not reduced or axis in reduced:
            return None
        return axis if node.attrs.get("keepdims", 1) else axis - sum(a < axis for a in reduced)
    if node.op == "Slice":
        starts = const_value(node.inputs[1])
        given = node.inputs[3] if len(node.inputs) > 3 and node.inputs[3].name else None
        axes = const_value(given) if given is not None else None if starts is None else np.arange(len(starts))
        if starts is None or axes is None or any(const_value(t) is None for t in node.inputs[2:] if t.name):
            return None
        axes = [int(a) % rank for a in axes]
        if axis not in axes:
            return axis
        i, c = axes.index(axis), ins[0].shape[axis]  # all channels: bounds past them still take all once pruned
        ends = const_value(node.inputs[2])
        steps = const_value(node.inputs[4]) if len(node.inputs) > 4 and node.inputs[4].name else None
        whole = isinstance(c, int) and (int(starts[i]) == 0 or int(starts[i]) <= -c) and int(ends[i]) >= c
        return axis if whole and (steps is None or int(steps[i]) == 1) else None
    if node.op in ("Squeeze", "Unsqueeze"):
        given = node.attrs.get("axes") if "axes" in node.attrs else (
            const_value(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1].name else None)
        if given is None:
            return None
        if node.op == "Squeeze":
            gone = {int(a) % rank for a in given}
            return None if axis in gone else axis - sum(a < axis for a in gone)
        added = {int(a) % (rank + len(given)) for a in given}
        return [p for p in range(rank + len(given)) if p not in added][axis]
    if node.op == "Gather":
        indices, at = const_value(node.inputs[1]), node.attrs.get("axis", 0) % rank
        if indices is None or at == axis:
            return None
        return axis if at > axis else axis - 1 + indices.ndim
    if node.op == "Concat":
        at = node.attrs.get("axis", 0) % rank
        c = channels_of(ins[0], axis)
        if at == axis or any(t.shape is None or len(t.shape) != rank for t in node.inputs):
            return None
        for t in node.inputs:
            if isinstance(t, gs.Constant) or t.name not in axis_of:
                value = t.values if isinstance(t, gs.Constant) else (constants or {}).get(t.name)
                if value is None or value.ndim != rank or value.shape[axis] != c:
                    return None
            elif axis_of[t.name] != axis or channels_of(t, axis) != c:
                return None
        return axis
    return None


def _regrouped_axis(node: gs.Node, axis: int) -> int | None:
    """For a Reshape/Flatten that only merges or splits the axes before and after channel axis `axis` (LeViT's
    [batch, tokens, C] → [batch·tokens, C] around a BatchNorm, [N, C, H, W] → [N, C, H·W]), the channel axis of
    its output; None when it splits or merges the channels themselves, or its shape constant would not follow
    a change of the channel count."""
    x, out = node.inputs[0], node.outputs[0]
    if node.op == "Reshape" and (_copied_prefix(node) or 0) > axis:
        return axis
    if x.shape is None or out.shape is None or not isinstance(x.shape[axis], int):
        return None
    target = None
    if node.op == "Reshape":  # its constant entries; a target built at run time may hold a dynamic batch size
        target = [shape_entry(node, j) for j in range(len(out.shape))]
    before = _extent(x.shape[:axis])
    for b in range(len(out.shape)):
        extent = _extent(out.shape[:b])
        if extent == before and out.shape[b] == x.shape[axis]:
            if target is not None and target[b] is None:
                return None  # the channel count is computed at run time: it would not follow the pruning
            copies = set() if target is None or node.attrs.get("allowzero", 0) else {j for j, v in enumerate(target) if v == 0}
            return None if b != axis and copies & {axis, b} else b  # a 0 copies the input's dim at its index (allowzero: a 0 is a 0)
        if extent[1] == before[1] and extent[0] > before[0]:
            return None
    return None


def _extent(dims) -> tuple[int, tuple]:
    """The size of a run of dims: the product of the known ones and the named ones (a dynamic batch 'N')."""
    return int(np.prod([d for d in dims if isinstance(d, int)])), tuple(sorted(str(d) for d in dims if not isinstance(d, int)))


def _dims_read_apart(shape: gs.Node, axis: int) -> bool:
    """Whether every use of a Shape(x) leaves channel axis `axis` alone: Gathers of other dims (batch, tokens),
    or the copied prefix of a target reshaping x itself (`_copied_prefix`), which follows the channel count."""
    rank = len(shape.inputs[0].shape) if shape.inputs[0].shape is not None else None
    if rank is None or shape.attrs.get("start", 0) != 0 or shape.attrs.get("end") is not None:
        return False
    for use in shape.outputs[0].outputs:
        if use.op == "Gather":
            index = const_value(use.inputs[1])
            if index is None or use.attrs.get("axis", 0) != 0 or axis in {int(i) % rank for i in index.reshape(-1)}:
                return False
        elif use.op == "Slice" and len(use.outputs[0].outputs) == 1 and use.outputs[0].outputs[0].op == "Concat":
            concat = use.outputs[0].outputs[0]
            readers = [r for o in concat.outputs for r in o.outputs]
            if concat.inputs[0] is not use.outputs[0] or not readers or any(
                    r.op != "Reshape" or r.inputs[1] is not concat.outputs[0] or r.inputs[0] is not shape.inputs[0]
                    or _copied_prefix(r) is None for r in readers):
                return False
        else:
            return False
    return True


def _copied_prefix(node: gs.Node) -> int | None:
    """How many leading entries of a Reshape's target are its input's own dims, read at run time: a target
    Concat(Slice(Shape(x), 0, k), ...) or Concat(Shape(x, end=k), ...), as torch writes x.flatten(k)."""
    concat = node.inputs[1].inputs[0] if len(node.inputs[1].inputs) == 1 else None
    if concat is None or concat.op != "Concat" or not concat.inputs or len(concat.inputs[0].inputs) != 1:
        return None
    first = concat.inputs[0].inputs[0]
    if first.op == "Slice" and len(first.inputs[0].inputs) == 1:
        bounds = [const_value(t) for t in first.inputs[1:]]
        if any(b is None for b in bounds) or any(int(v) != 0 for v in bounds[0]) or \
                any(int(v) != 1 for v in (bounds[3] if len(bounds) > 3 else [1])) or \
                any(int(v) != 0 for v in (bounds[2] if len(bounds) > 2 else [0])):
            return None
        shape, end = first.inputs[0].inputs[0], int(bounds[1][0])
    elif first.op == "Shape":
        shape, end = first, first.attrs.get("end")
    else:
        return None
    if shape.op != "Shape" or shape.inputs[0] is not node.inputs[0] or shape.attrs.get("start", 0) != 0 or end is None:
        return None
    return end if end > 0 else None


def _block_what_blocked_views_hold(spaces: list[Space]) -> None:
    """A blocked derived space keeps every channel it is made of: the base spaces in its view are blocked for
    the same reason (a channel shuffle's Slice blocks the branches the shuffled tensor interleaves)."""
    todo = [s for s in spaces if s.blocked and s.view]
    while todo:
        s = todo.pop()
        for p in s.view:
            if p.space >= 0 and not spaces[p.space].blocked:
                spaces[p.space].blocked = s.blocked
                if spaces[p.space].view:
                    todo.append(spaces[p.space])


def _derived_view(node, t, view, axis_of) -> list[Piece] | None:
    src = view.get(node.inputs[0].name)
    if node.op == "Concat":
        pieces = []
        for i in node.inputs:
            if i.name not in view:
                return None
            pieces.extend(view[i.name])
        return pieces
    if src is None:
        return None
    if node.op in ("Flatten", "Reshape") and (k := _merged_positions(node, axis_of.get(node.inputs[0].name))):
        return src * k
    if node.op in ("Flatten", "Reshape"):
        block = int(np.prod(node.inputs[0].shape[2:])) if len(node.inputs[0].shape) > 2 else 1
        return [Piece(p.space, p.start, p.length, p.block * block) for p in src]
    if node.op == "Split":
        sizes = _split_sizes(node)
        if sizes is None:
            return None
        k = node.outputs.index(t)
        start = int(sum(sizes[:k]))
        return _sub_view(src, start, start + int(sizes[k]))
    if node.op == "Slice":
        return _sub_view(src, *channel_slice(node, src)[1:])
    return None


def channel_slice(node: gs.Node, src: list[Piece]) -> tuple[int, int, int]:
    """For a Slice of channel axis 1 of a tensor whose channels are the view `src`: which of its starts/ends
    entries is that axis, and the positions [start, end) it keeps, negative bounds resolved and clamped to the
    view's width (a piece spans length x block positions)."""
    vals = [const_value(x) for x in node.inputs[1:]]
    rank = len(node.inputs[0].shape)
    axes = [int(a) % rank for a in (vals[2] if len(vals) > 2 else range(len(vals[0])))]
    i = axes.index(1)
    c = sum(p.length * p.block for p in src)
    start, end = int(vals[0][i]), int(vals[1][i])
    start, end = (start + c if start < 0 else start), (end + c if end < 0 else end)
    return i, max(0, min(start, c)), max(0, min(end, c))


def _split_sizes(node) -> list[int] | None:
    c = channels_of(node.inputs[0])
    if c is None:
        return None
    if len(node.inputs) > 1 and node.inputs[1].name:
        v = const_value(node.inputs[1])
        return None if v is None else [int(x) for x in v]
    if "split" in node.attrs:
        return [int(x) for x in node.attrs["split"]]
    n = len(node.outputs)
    return [c // n] * n if c % n == 0 else None


def _sub_view(src: list[Piece], start: int, end: int) -> list[Piece] | None:
    """Positions [start, end) of a view, where a piece spans length x block positions (the pieces cut must have
    blocks of 1: part of a channel's block is not a channel)."""
    out, pos = [], 0
    for p in src:
        lo, hi = max(start, pos), min(end, pos + p.length * p.block)
        if lo < hi:
            if p.block != 1:
                return None
            out.append(Piece(p.space, p.start + lo - pos, hi - lo))
        pos += p.length * p.block
    return out


def kept_positions(view: list[Piece], keep: dict[int, np.ndarray]) -> np.ndarray:
    """Indices (in the tensor's own channel x block order) that survive when base space s keeps `keep[s]`."""
    out, pos = [], 0
    for p in view:
        idx = np.arange(p.start, p.start + p.length)
        kept = idx if p.space not in keep else idx[np.isin(idx, keep[p.space])]
        for ch in kept:
            base = pos + (ch - p.start) * p.block
            out.extend(range(base, base + p.block))
        pos += p.length * p.block
    return np.asarray(out, dtype=np.int64)
