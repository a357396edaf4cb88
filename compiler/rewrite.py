"""Small graph-rewriting helpers shared by passes: constants, consumers, rewiring, fresh names."""

from __future__ import annotations

import itertools

import numpy as np
import onnx_graphsurgeon as gs


def const_value(tensor: gs.Tensor) -> np.ndarray | None:
    """The value of a constant tensor (initializer or Constant-node output), else None."""
    if isinstance(tensor, gs.Constant):
        return np.asarray(tensor.values)
    if len(tensor.inputs) == 1 and tensor.inputs[0].op == "Constant":
        value = tensor.inputs[0].attrs.get("value")
        if isinstance(value, gs.Constant):
            return np.asarray(value.values)
    return None


def is_graph_output(graph: gs.Graph, tensor: gs.Tensor) -> bool:
    """True when `tensor` is one of the graph's outputs."""
    return any(t is tensor for t in graph.outputs)


def sole_consumer(graph: gs.Graph, tensor: gs.Tensor) -> gs.Node | None:
    """The only node reading `tensor`, when it has exactly one reader and is not a graph output."""
    if len(tensor.outputs) != 1 or is_graph_output(graph, tensor):
        return None
    return tensor.outputs[0]


def producer(tensor: gs.Tensor) -> gs.Node | None:
    """The node that writes `tensor`, or None for graph inputs and constants."""
    return tensor.inputs[0] if len(tensor.inputs) == 1 else None


def bypass(graph: gs.Graph, node: gs.Node, keep: gs.Tensor, drop: gs.Tensor) -> bool:
    """Remove `node` by making readers of its output `drop` read `keep` instead; False if impossible.

    When `drop` is a graph output, `keep` takes its place and its name (only if `keep` is an
    intermediate tensor that nothing else exposes), so the model's interface is unchanged.
    """
    if is_graph_output(graph, drop):
        if isinstance(keep, gs.Constant) or keep in graph.inputs or is_graph_output(graph, keep):
            return False
        if len(keep.outputs) > 1:
            return False
        idx = [i for i, t in enumerate(graph.outputs) if t is drop][0]
        keep.dtype = keep.dtype if keep.dtype is not None else drop.dtype
        keep.shape = keep.shape if keep.shape is not None else drop.shape
        name = drop.name
        drop.name = drop.name + "__bypassed"
        keep.name = name
        graph.outputs[idx] = keep
    replace_uses(drop, keep)
    node.outputs.clear()
    node.inputs.clear()
    return True


def set_input(node: gs.Node, index: int, tensor: gs.Tensor) -> None:
    """Set input `index` of `node` (appending it when it is the next one, e.g. a Conv's missing bias)."""
    if index < len(node.inputs):
        node.inputs[index] = tensor
    elif index == len(node.inputs):
        node.inputs.append(tensor)
    else:
        raise IndexError(f"{node.name}: cannot set input {index} of {len(node.inputs)}")


def replace_uses(old: gs.Tensor, new: gs.Tensor, readers: list[gs.Node] | None = None) -> None:
    """Make `readers` (default: every reader of `old`) read `new` wherever they read `old`."""
    for reader in list(old.outputs) if readers is None else readers:
        for i, t in enumerate(reader.inputs):
            if t is old:
                reader.inputs[i] = new


_counter = itertools.count()


def fresh_name(graph: gs.Graph, base: str) -> str:
    """A tensor/node name not used in `graph`, derived from `base`."""
    used = set(graph.tensors().keys()) | {n.name for n in graph.nodes}
    if base not in used:
        return base
    while True:
        name = f"{base}_{next(_counter)}"
        if name not in used:
            return name


class NodeChain:
    """Appends nodes named `base`_<part> to `graph` (toposort afterwards), for a pass that writes one node as several."""

    def __init__(self, graph: gs.Graph, base: str, dtype):
        self.graph, self.base, self.dtype = graph, base, dtype

    def ints(self, part: str, values) -> gs.Constant:
        return gs.Constant(fresh_name(self.graph, f"{self.base}_{part}"), np.asarray(values, dtype=np.int64))

    def add(self, op: str, part: str, inputs: list, attrs: dict | None = None, out: gs.Variable | None = None) -> gs.Variable:
        """Append `op` reading `inputs`; its output (`out`, or a new tensor)."""
        out = out if out is not None else gs.Variable(fresh_name(self.graph, f"{self.base}_{part}_output"), dtype=self.dtype)
        self.graph.nodes.append(gs.Node(op, fresh_name(self.graph, f"{self.base}_{part}"), attrs or {}, inputs, [out]))
        return out


def matmul_bias(graph: gs.Graph, node: gs.Node) -> tuple[gs.Node, int] | None:
    """The bias of a MatMul with a constant [K, N] weight: the Add that alone reads its output and adds a
    constant holding one value per output feature ([N], or [1, .., 1, N]); (that Add, the constant's input
    index), else None."""
    w = const_value(node.inputs[1]) if node.op == "MatMul" and len(node.inputs) == 2 else None
    add = sole_consumer(graph, node.outputs[0]) if w is not None and w.ndim == 2 else None
    if add is None or add.op != "Add" or len(add.inputs) != 2 or add.domain:
        return None
    index = 1 if add.inputs[0] is node.outputs[0] else 0
    bias = add.inputs[index]
    if not isinstance(bias, gs.Constant) or bias.values.size != w.shape[1] or bias.values.shape[-1] != w.shape[1]:
        return None
    rank = len(node.outputs[0].shape) if node.outputs[0].shape is not None else None
    return (add, index) if rank is not None and bias.values.ndim <= rank else None


def add_to_bias(graph: gs.Graph, node: gs.Node, shift: np.ndarray) -> None:
    """Add `shift` (one value per output) to the layer's constant bias, creating it for a Conv/Gemm without one.
    A MatMul's bias is the Add after it (`matmul_bias`); one is inserted when there is none."""
    if node.op == "MatMul":
        _add_to_matmul_bias(graph, node, shift)
        return
    if not (node.op == "Conv" or (node.op == "Gemm" and node.attrs.get("beta", 1.0) == 1.0)):
        return
    index = 2
    if len(node.inputs) > index and not isinstance(node.inputs[index], gs.Constant):
        return
    bias = np.asarray(node.inputs[index].values, np.float64) if len(node.inputs) > index else np.zeros_like(shift)
    if bias.size == shift.size:  # a Gemm bias may be [1, N]
        new = (bias + shift.reshape(bias.shape)).astype(np.float32)
        set_input(node, index, gs.Constant(fresh_name(graph, node.name + "_bias_corrected"), new))


def _add_to_matmul_bias(graph: gs.Graph, node: gs.Node, shift: np.ndarray) -> None:
    found = matmul_bias(graph, node)
    if found is not None:
        add, index = found
        bias = np.asarray(add.inputs[index].values)
        new = (bias.astype(np.float64) + shift.reshape(bias.shape)).astype(bias.dtype)
        set_input(add, index, gs.Constant(fresh_name(graph, node.name + "_bias_corrected"), new))
        return
    out = node.outputs[0]
    if out.shape is None or len(out.shape) < 1 or out.shape[-1] != shift.size:
        return
    product = gs.Variable(fresh_name(graph, out.name + "_product"), dtype=out.dtype, shape=out.shape)
    node.outputs[0] = product  # the Add takes over `out`: its name, its readers, its place among the outputs
    bias = gs.Constant(fresh_name(graph, node.name + "_bias_corrected"), shift.astype(np.float32))
    add = gs.Node("Add", name=fresh_name(graph, node.name + "_bias"), inputs=[product, bias], outputs=[out])
    graph.nodes.insert(next(i for i, n in enumerate(graph.nodes) if n is node) + 1, add)


def _shape_piece(node: gs.Node, index: int) -> tuple[gs.Node, int, int] | None:
    """Where entry `index` of the shape input of a Reshape or Expand is a constant: (node whose input it is,
    input index, position in that constant); the node itself for a constant shape, else the Concat that builds
    the shape from 1-D pieces (a dynamic batch size beside constant feature counts), perhaps through a Cast
    (tf2onnx concatenates int32 pieces)."""
    target = node.inputs[1]
    if const_value(target) is not None:
        return node, 1, index
    concat = producer(target)
    if concat is not None and concat.op == "Cast":
        concat = producer(concat.inputs[0])
    if concat is None or concat.op != "Concat":
        return None
    start = 0
    for i, piece in enumerate(concat.inputs):
        length = piece.shape[0] if piece.shape is not None and len(piece.shape) == 1 else None
        if not isinstance(length, int):
            return None
        if start <= index < start + length:
            return (concat, i, index - start) if const_value(piece) is not None else None
        start += length
    return None


def shape_entry(node: gs.Node, index: int) -> int | None:
    """Entry `index` of the shape input of a Reshape or Expand when it is a constant, else None (see
    `_shape_piece`)."""
    found = _shape_piece(node, index)
    return None if found is None else int(const_value(found[0].inputs[found[1]]).reshape(-1)[found[2]])


def set_shape_entry(graph: gs.Graph, node: gs.Node, index: int, value: int, shared: bool = False) -> bool:
    """Set entry `index` of the shape input of a Reshape or Expand to `value` where it is a constant (see
    `_shape_piece`); an entry of -1 (inferred) or 0 (copied) is left as it is. False when the entry is not a
    constant. A shape other nodes read too is copied for this one first, unless `shared` says they all take
    the same change."""
    found = _shape_piece(node, index)
    if found is None:
        return False
    owner, i, at = found
    values = np.array(const_value(owner.inputs[i]))  # a Concat's pieces keep their integer type
    flat = values.reshape(-1)
    if flat[at] <= 0 or flat[at] == value:
        return True
    flat[at] = value
    read_apart = producer(node.inputs[1]) is not owner and len(owner.outputs[0].outputs) > 1  # a Concat others read past its Cast
    if owner is not node and (read_apart or not shared and len(node.inputs[1].outputs) > 1):
        owner = _own_shape(graph, node, owner)
    set_input(owner, i, gs.Constant(fresh_name(graph, node.name + "_shape"), values))
    return True


def _own_shape(graph: gs.Graph, node: gs.Node, concat: gs.Node) -> gs.Node:
    """Give `node` its own copy of the Concat (and the Cast after it) that builds its shape input."""
    at = next(k for k, n in enumerate(graph.nodes) if n is node)
    cast = producer(node.inputs[1]) if producer(node.inputs[1]) is not concat else None
    built = gs.Variable(fresh_name(graph, concat.outputs[0].name), dtype=concat.outputs[0].dtype,
                        shape=concat.outputs[0].shape)
    copy = gs.Node("Concat", name=fresh_name(graph, concat.name), attrs=dict(concat.attrs), inputs=list(concat.inputs),
                   outputs=[built])
    graph.nodes.insert(at, copy)
    if cast is not None:
        cast_out = gs.Variable(fresh_name(graph, node.inputs[1].name), dtype=node.inputs[1].dtype,
                               shape=node.inputs[1].shape)
        graph.nodes.insert(at + 1, gs.Node("Cast", name=fresh_name(graph, cast.name), attrs=dict(cast.attrs),
                                           inputs=[built], outputs=[cast_out]))
        built = cast_out
    node.inputs[1] = built
    return copy
