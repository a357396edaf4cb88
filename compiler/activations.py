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


def producing(proto: onnx.ModelProto, names: list[str]) -> onnx.ModelProto:
    """A copy of `proto` whose outputs are the tensors `names`, keeping only the nodes they depend on (all
    nodes when one of those has a subgraph, whose outer-scope reads are not listed as inputs, or when no node
    is needed, as onnxruntime cannot run an empty graph)."""
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    del model.graph.output[:]
    model.graph.output.extend(onnx.ValueInfoProto(name=name) for name in dict.fromkeys(names))
    producer = {out: node for node in model.graph.node for out in node.output}
    needed, stack = set(), list(names)
    while stack:
        node = producer.get(stack.pop())
        if node is None or id(node) in needed:
            continue
        if _has_subgraph(node):
            return with_outputs(proto, names)
        needed.add(id(node))
        stack.extend(i for i in node.input if i)
    kept = [node for node in model.graph.node if id(node) in needed]
    if not kept:
        return with_outputs(proto, names)
    del model.graph.node[:]
    model.graph.node.extend(kept)
    used = {i for node in kept for i in node.input}
    inits = [t for t in model.graph.initializer if t.name in used]
    del model.graph.initializer[:]
    model.graph.initializer.extend(inits)
    return model


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
    types = {v.name: v for v in graph.value_info}
    if any(not types.get(name, onnx.ValueInfoProto()).type.tensor_type.elem_type for name in cut):
        return None
    model = onnx.ModelProto()
    model.CopyFrom(proto)
    read = {i for node in kept for i in node.input}
    for field, keep in ((model.graph.node, kept), (model.graph.output, outputs),
                        (model.graph.input, [i for i in graph.input if i.name in read] + [types[n] for n in cut]),
                        (model.graph.initializer, [t for t in graph.initializer if t.name in read]),
                        (model.graph.value_info, [v for v in graph.value_info if v.name in made])):
        del field[:]
        field.extend(keep)
    return model, cut


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
