"""A packed q/k/v projection as one Linear per part, so channel pruning sees the attention heads behind it.

torch's nn.MultiheadAttention computes q, k and v with one MatMul of S·E outputs (its in_proj, S = 3), unflattens
the features into [..., S, E], moves the S axis to the front through Unsqueeze/Transpose/Squeeze, and takes each
part with a Gather. The heads only appear after that, in one Reshape per part, so the channel analysis would
have to follow the parts through the unflatten. `unpack_projections` writes each part as its own MatMul on the
weight columns it reads (plus its slice of the bias), reshaped to the Gather's shape: the same products, in the
form whose heads attention_heads finds. Guarantees: outputs unchanged; other graphs are left as they are.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from compiler.rewrite import const_value, fresh_name, matmul_bias, producer, sole_consumer


def unpack_projections(graph: gs.Graph) -> int:
    """Rewrite every packed projection whose parts are taken as described above; the number of parts written."""
    written = 0
    for node in list(graph.nodes):
        found = _packed(graph, node) if node.op == "Reshape" else None
        if found is None:
            continue
        layer, bias, parts, width = found
        weight = np.asarray(layer.inputs[1].values)
        for index, gather in parts:
            cols = slice(index * width, (index + 1) * width)
            out = gather.outputs[0]
            at = next(k for k, n in enumerate(graph.nodes) if n is gather)
            shape = list(layer.inputs[0].shape[:-1]) + [width]
            value = gs.Variable(fresh_name(graph, out.name + "_part"), dtype=out.dtype, shape=shape)
            new = [gs.Node("MatMul", name=fresh_name(graph, f"{layer.name}_part{index}"),
                           inputs=[layer.inputs[0], gs.Constant(fresh_name(graph, f"{layer.inputs[1].name}_part{index}"),
                                                                np.ascontiguousarray(weight[:, cols]))],
                           outputs=[value])]
            if bias is not None:
                biased = gs.Variable(fresh_name(graph, out.name + "_biased"), dtype=out.dtype, shape=shape)
                new.append(gs.Node("Add", name=fresh_name(graph, f"{layer.name}_part{index}_bias"),
                                   inputs=[value, gs.Constant(fresh_name(graph, f"{layer.name}_bias_part{index}"),
                                                              np.ascontiguousarray(bias[..., cols]))],
                                   outputs=[biased]))
                value = biased
            if list(out.shape) == shape:
                new[-1].outputs = [out]
            else:
                target = gs.Constant(fresh_name(graph, out.name + "_shape"), np.array(out.shape, dtype=np.int64))
                new.append(gs.Node("Reshape", name=fresh_name(graph, gather.name + "_part"), inputs=[value, target],
                                   outputs=[out]))
            gather.outputs = []
            graph.nodes[at:at] = new
            written += 1
    if written:
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
    return written


def _packed(graph: gs.Graph, node: gs.Node):
    """(layer, its bias or None, [(part index, Gather)], part width) when `node` unflattens the output of a
    MatMul with a constant [K, S·E] weight (and bias Add) into [..., S, E] and only Gathers of single parts
    read the result, through ops that keep the other axes in order; else None."""
    x, y = node.inputs[0], node.outputs[0]
    if x.shape is None or y.shape is None or len(y.shape) != len(x.shape) + 1 or list(y.shape[:-2]) != list(x.shape[:-1]):
        return None
    parts, width = y.shape[-2], y.shape[-1]
    if not all(isinstance(d, int) for d in (parts, width, x.shape[-1])) or parts < 2 or parts * width != x.shape[-1]:
        return None
    layer, bias = producer(x), None
    if layer is not None and layer.op == "Add":
        matmul = next((p for p in map(producer, layer.inputs) if p is not None and p.op == "MatMul"), None)
        found = matmul_bias(graph, matmul) if matmul is not None else None
        if found is None or found[0] is not layer:
            return None
        layer, bias = matmul, np.asarray(found[0].inputs[found[1]].values)
    if layer is None or layer.op != "MatMul" or sole_consumer(graph, layer.outputs[0]) is None \
            or sole_consumer(graph, x) is not node:
        return None
    weight = const_value(layer.inputs[1])
    if weight is None or weight.ndim != 2 or not isinstance(layer.inputs[1], gs.Constant):
        return None
    rank = len(x.shape) - 1
    labels = first = [("axis", i) for i in range(rank)] + [("part", 0), ("feature", 0)]
    sizes = list(y.shape)
    t = y
    while True:
        reader = sole_consumer(graph, t)
        if reader is None or reader.op not in ("Unsqueeze", "Squeeze", "Transpose"):
            break
        moved = _move(reader, labels, sizes)
        if moved is None:
            return None
        labels, sizes = moved
        t = reader.outputs[0]
    readers = list(t.outputs)
    if not readers or any(r.op != "Gather" or r.inputs[0] is not t for r in readers) or t in graph.outputs:
        return None
    moved = [lab for lab, size in zip(labels, sizes) if lab[0] != "part" and size != 1]
    plain = [lab for lab, size in zip(first[:rank] + [("feature", 0)], list(x.shape[:-1]) + [width]) if size != 1]
    if moved != plain:
        return None  # the other axes end in another order: a part is not a plain reshape of its columns
    out = []
    for gather in readers:
        index = const_value(gather.inputs[1])
        shape = gather.outputs[0].shape
        if index is None or index.ndim != 0 or labels[gather.attrs.get("axis", 0) % len(labels)][0] != "part" \
                or shape is None or not all(isinstance(d, int) for d in shape):
            return None
        out.append((int(index) % parts, gather))
    return layer, bias, out, width


def _move(node: gs.Node, labels: list, sizes: list):
    """The axis labels and sizes after an Unsqueeze, Squeeze or Transpose, or None when it is not constant."""
    if node.op == "Transpose":
        perm = list(node.attrs.get("perm", range(len(labels) - 1, -1, -1)))
        return [labels[p] for p in perm], [sizes[p] for p in perm]
    given = node.attrs.get("axes") if "axes" in node.attrs else (
        const_value(node.inputs[1]) if len(node.inputs) > 1 and node.inputs[1].name else None)
    if given is None:
        return None
    if node.op == "Squeeze":
        gone = {int(a) % len(labels) for a in given}
        if any(sizes[a] != 1 for a in gone):
            return None
        return [l for k, l in enumerate(labels) if k not in gone], [s for k, s in enumerate(sizes) if k not in gone]
    rank = len(labels) + len(given)
    added = {int(a) % rank for a in given}
    labels, sizes = list(labels), list(sizes)
    for a in sorted(added):
        labels.insert(a, ("unit", a))
        sizes.insert(a, 1)
    return labels, sizes
