"""Streaming access to intermediate tensors: run the model once per calibration batch, one session.

Used by calibration (ranges, histograms) and pruning (layer input statistics). Memory stays bounded by
one batch of the requested tensors: callers reduce each batch before the next is computed.
"""

from __future__ import annotations

from typing import Iterator

import numpy as np
import onnx

from compiler.runtime import make_session


def with_outputs(proto: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of `proto` that also exposes the tensors `names` as graph outputs (types left open)."""
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    existing = {o.name for o in model.graph.output}
    for name in names:
        if name not in existing:
            model.graph.output.append(onnx.ValueInfoProto(name=name))
            existing.add(name)
    return model


def _has_subgraph(node: onnx.NodeProto) -> bool:
    """Whether the node holds a subgraph (If/Loop/Scan bodies), whose outer-scope reads are not node inputs."""
    return any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute)


def _needed(proto: onnx.ModelProto, names: list[str], given=frozenset()) -> list[onnx.NodeProto] | None:
    """The nodes of `proto` the tensors `names` depend on, not looking past the tensors `given`, in graph
    order; None when one of them has a subgraph (its outer-scope reads are not listed as inputs)."""
    producer = {out: node for node in proto.graph.node for out in node.output}
    needed, stack = set(), [n for n in names if n not in given]
    while stack:
        node = producer.get(stack.pop())
        if node is None or id(node) in needed:
            continue
        if _has_subgraph(node):
            return None
        needed.add(id(node))
        stack.extend(i for i in node.input if i and i not in given)
    return [node for node in proto.graph.node if id(node) in needed]


def _part(proto: onnx.ModelProto, kept: list[onnx.NodeProto], outputs: list[onnx.ValueInfoProto],
          inputs: list[onnx.ValueInfoProto]) -> onnx.ModelProto:
    """A copy of `proto` with only the nodes `kept`, the initializers and value_info that concern them, and
    the given graph outputs and inputs."""
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    read = {i for node in kept for i in node.input}
    made = {o for node in kept for o in node.output}
    for field, keep in ((model.graph.node, kept), (model.graph.output, outputs), (model.graph.input, inputs),
                        (model.graph.initializer, [t for t in proto.graph.initializer if t.name in read]),
                        (model.graph.value_info, [v for v in proto.graph.value_info if v.name in made])):
        del field[:]
        field.extend(keep)
    return model


def _declared(proto: onnx.ModelProto) -> dict[str, onnx.ValueInfoProto]:
    """The declared type of every tensor that has one (value_info, graph inputs and outputs)."""
    graph = proto.graph
    return {v.name: v for v in list(graph.value_info) + list(graph.input) + list(graph.output)}


def _typed(types: dict[str, onnx.ValueInfoProto], names) -> bool:
    """Whether every tensor of `names` has a declared element type (needed to make it a graph input)."""
    return all(types.get(n, onnx.ValueInfoProto()).type.tensor_type.elem_type for n in names)


def producing(proto: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of `proto` whose outputs are the tensors `names`, keeping only the nodes they depend on (all
    nodes when one of those has a subgraph, whose outer-scope reads are not listed as inputs, or when no node
    is needed, as onnxruntime cannot run an empty graph)."""
    names = list(dict.fromkeys(names))
    kept = _needed(proto, names)
    if not kept:
        return with_outputs(proto, names)
    return _part(proto, kept, [onnx.ValueInfoProto(name=n) for n in names], list(proto.graph.input))


def between(proto: onnx.ModelProto, given: list[str], names: list[str]) -> onnx.ModelProto | None:
    """A model computing the tensors `names` of `proto` from the tensors `given` (which become graph inputs,
    beside the graph inputs still read), with only the nodes in between; None when a node there has a
    subgraph, a given tensor has no declared type, or no node is needed."""
    names = list(dict.fromkeys(names))
    kept = _needed(proto, names, set(given))
    types = _declared(proto)
    if not kept or not _typed(types, given):
        return None
    read = {i for node in kept for i in node.input}
    inputs = [i for i in proto.graph.input if i.name in read and i.name not in given]
    return _part(proto, kept, [onnx.ValueInfoProto(name=n) for n in names],
                 inputs + [types[n] for n in given if n in read])


def downstream(proto: onnx.ModelProto, node_name: str) -> tuple[onnx.ModelProto, list[str]] | None:
    """The part of `proto` that node `node_name` influences: that node and every node reading its results,
    directly or not, as a model computing the graph outputs among them from the tensors they read from outside
    (graph inputs and initializers kept as they are); with the names of those outside tensors that are computed
    in `proto`, which become graph inputs. None when a node there holds a subgraph (its outer-scope reads are
    not listed as inputs) or an outside tensor has no declared type."""
    graph = proto.graph
    readers: dict[str, list[onnx.NodeProto]] = {}
    for node in graph.node:
        for name in node.input:
            readers.setdefault(name, []).append(node)
    part, stack = set(), [node for node in graph.node if node.name == node_name][:1]
    while stack:
        node = stack.pop()
        if id(node) in part:
            continue
        if _has_subgraph(node):
            return None
        part.add(id(node))
        stack.extend(r for out in node.output for r in readers.get(out, []))
    kept = [node for node in graph.node if id(node) in part]
    made = {out for node in kept for out in node.output}
    outputs = [o for o in graph.output if o.name in made]
    if not outputs:
        return None
    given = {t.name for t in graph.initializer} | {i.name for i in graph.input}
    cut = list(dict.fromkeys(i for node in kept for i in node.input if i and i not in made and i not in given))
    types = _declared(proto)
    if not _typed(types, cut):
        return None
    read = {i for node in kept for i in node.input}
    return _part(proto, kept, outputs, [i for i in graph.input if i.name in read] + [types[n] for n in cut]), cut


def stream_activations(proto: onnx.ModelProto, names: list[str], calib, batch_size: int = 16,
                       max_samples: int | None = None, progress=None) -> Iterator[dict[str, np.ndarray]]:
    """Yield, per calibration batch, {tensor name: value} for the requested tensors.

    One onnxruntime session serves every batch; it runs only the nodes the requested tensors depend on (they
    are its outputs, so onnxruntime's optimizations keep them; its memory arena is off so memory is returned
    after each batch).
    `progress(n)` is called with each batch size.
    """
    sess = make_session(producing(proto, names), arena=False)
    inputs = {i.name for i in sess.get_inputs()}
    seen = 0
    for batch in calib.batches(batch_size):
        feed = {k: v for k, v in batch.items() if k in inputs}
        n = len(next(iter(feed.values()))) if feed and next(iter(feed.values())).ndim else 1
        if max_samples is not None and seen >= max_samples:
            break
        values = sess.run(names, feed)
        seen += n
        if progress is not None:
            progress(n)
        yield dict(zip(names, values))


class CheckpointedStream:
    """Intermediate tensors of a model over the whole calibration set, for a caller that walks the graph in
    order: the values of the tensors live at a point of the graph (a checkpoint) are held in memory for every
    batch, so a tensor further on costs only the nodes between that point and it. The checkpoint starts at the
    model's inputs (read from the calibration set) and moves forward when the tensors live there fit `budget`
    bytes (and no model input is read past it); the caller must not change nodes before it.
    """

    def __init__(self, calib, batch_size: int = 8, budget: int = 128 << 20):
        self.calib, self.batch_size, self.budget = calib, batch_size, budget
        self.names: list[str] = []
        self.values: list[dict[str, np.ndarray]] = []

    def stream(self, proto: onnx.ModelProto, names: list[str]) -> Iterator[dict[str, np.ndarray]]:
        """Yield, per calibration batch, {tensor name: value} for `names` (see `stream_activations`)."""
        wanted = [n for n in names if n not in self.names]
        if self.names and not wanted:
            yield from ({n: cached[n] for n in names} for cached in self.values)
            return
        model = between(proto, self.names, wanted) if self.names else None
        if model is None or {i.name for i in proto.graph.input} & set(wanted):  # from the model inputs
            yield from stream_activations(proto, names, self.calib, self.batch_size)
            return
        sess = make_session(model, arena=False)
        inputs = {i.name for i in sess.get_inputs()}
        feeds = self.calib.batches(self.batch_size) if inputs - set(self.names) else ({} for _ in self.values)
        for batch, cached in zip(feeds, self.values):
            feed = {k: v for k, v in {**batch, **cached}.items() if k in inputs}
            values = {**cached, **dict(zip(wanted, sess.run(wanted, feed)))}
            yield {n: values[n] for n in names}

    def advance(self, proto: onnx.ModelProto, last_node: str) -> bool:
        """Move the checkpoint to just after node `last_node` of `proto` when the tensors live there fit the
        budget; whether it moved."""
        nodes = list(proto.graph.node)
        done = next((i for i, n in enumerate(nodes) if n.name == last_node), None)
        if done is None:
            return False
        inits = {t.name for t in proto.graph.initializer}
        made = {o for n in nodes[:done + 1] for o in n.output}
        later = {i for n in nodes[done + 1:] for i in n.input} | {o.name for o in proto.graph.output}
        if {i.name for i in proto.graph.input} & later - inits:  # a model input read later: not cached
            return False
        live = sorted((made & later) - inits)
        size = _bytes_per_sample(proto, live)
        if not live or size is None or size * self.calib.num_samples > self.budget:
            return False
        self.values = list(self.stream(proto, live))
        self.names = live
        return True


def _bytes_per_sample(proto: onnx.ModelProto, names: list[str]) -> int | None:
    """Bytes of one sample of the tensors `names` (leading axis = batch), None when a shape is not known."""
    types = _declared(proto)
    total = 0
    for name in names:
        t = types[name].type.tensor_type if name in types else None
        if t is None or not t.elem_type or not t.HasField("shape"):
            return None
        dims = [d.dim_value if d.HasField("dim_value") else None for d in t.shape.dim[1:]]
        if any(d is None for d in dims):
            return None
        total += int(np.prod(dims, dtype=np.int64)) * onnx.helper.tensor_dtype_to_np_dtype(t.elem_type).itemsize
    return total
