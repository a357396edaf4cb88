"""fold-constants: evaluate every computation whose inputs are all known at compile time."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from compiler.passmanager import Option, Pass, register_pass
from compiler.rewrite import const_value, fresh_name, is_graph_output, producer
from compiler.runtime import make_session

# Never folded: quantization nodes carry the deployment format, random ops must stay random.
NEVER_FOLD = {"QuantizeLinear", "DequantizeLinear", "DynamicQuantizeLinear", "RandomNormal", "RandomUniform",
              "RandomNormalLike", "RandomUniformLike", "Multinomial", "Bernoulli"}


@register_pass
class FoldConstants(Pass):
    """Replace Constant nodes, Shape of static tensors, the static entries a Gather or Slice takes from the Shape
    of a tensor with a dynamic batch, Reshape targets computed at run time from sizes Reshape can copy (0) or
    infer (-1) itself (see `_infer_reshape_entry`), and all-constant subcomputations by initializers.

    Guarantees: outputs unchanged (values are computed by onnxruntime with optimizations off); Q/DQ and
    random nodes are never folded; a folded tensor larger than both `max_bytes` and the constants it was
    computed from is left as a computation (the size guard); nodes with subgraphs are left alone.
    """

    name = "fold-constants"
    lossless = True
    OPTIONS = {"max_bytes": Option(int, 1 << 20, "largest folded tensor that may grow the model", minimum=0)}

    def run(self, module, ctx) -> bool:
        changed = self._constant_nodes(module.graph)
        folded = 0
        for _ in range(16):  # folding a Shape can make more nodes constant; iterate to a fixed point
            module.infer_shapes()
            n = (self._fold_shapes(module.graph) + _fold_static_dims(module.graph) + self._fold_computations(module)
                 + _infer_reshape_entry(module.graph))
            if n == 0:
                break
            folded += n
            module.graph.cleanup(remove_unused_graph_inputs=False)
        if ctx is not None:
            ctx.log(constant_nodes=changed, folded_tensors=folded)
        return bool(changed or folded)

    @staticmethod
    def _constant_nodes(graph: gs.Graph) -> int:
        count = 0
        for node in list(graph.nodes):
            if node.op != "Constant" or node.domain or is_graph_output(graph, node.outputs[0]):
                continue
            value = _constant_attr_value(node)
            if value is None:
                continue
            out = node.outputs[0]
            node.outputs.clear()
            out.to_constant(value)
            count += 1
        graph.cleanup(remove_unused_graph_inputs=False)
        return count

    @staticmethod
    def _fold_shapes(graph: gs.Graph) -> int:
        count = 0
        for node in list(graph.nodes):
            if node.op != "Shape" or node.domain or is_graph_output(graph, node.outputs[0]):
                continue
            shape = node.inputs[0].shape
            if shape is None or not all(isinstance(d, int) and d >= 0 for d in shape):
                continue
            dims = np.array(shape, dtype=np.int64)
            start = node.attrs.get("start", 0)
            end = node.attrs.get("end", None)
            out = node.outputs[0]
            node.outputs.clear()
            out.to_constant(dims[start:end] if end is not None else dims[start:])
            count += 1
        return count

    def _fold_computations(self, module) -> int:
        graph = module.graph
        produced: set[int] = set()
        nodes = []
        for node in graph.nodes:
            if (node.op in NEVER_FOLD or (node.domain or "") not in ("", "ai.onnx")
                    or any(isinstance(v, gs.Graph) for v in node.attrs.values())
                    or any(is_graph_output(graph, t) for t in node.outputs) or not node.outputs):
                continue
            if all(t.name == "" or isinstance(t, gs.Constant) or id(t) in produced for t in node.inputs):
                nodes.append(node)
                produced.update(id(t) for t in node.outputs)
        if not nodes:
            return 0
        outputs = [t for n in nodes for t in n.outputs if t.name]
        values = evaluate_nodes(nodes, outputs, module.opset_imports)
        count = 0
        for tensor, value in zip(outputs, values):
            producer = tensor.inputs[0] if tensor.inputs else None
            source_bytes = sum(t.values.nbytes for t in producer.inputs if isinstance(t, gs.Constant)) if producer else 0
            if value.nbytes > self.max_bytes and value.nbytes > source_bytes:
                continue
            tensor.inputs.clear()
            tensor.to_constant(np.asarray(value))
            count += 1
        return count


def _fold_static_dims(graph: gs.Graph) -> int:
    """Gather/Slice outputs that take only static dims from a Shape whose tensor has dynamic ones, as constants.

    torch's exporter reads a dynamic-batch tensor's sizes with Shape → Gather(i) → Unsqueeze → Concat, also for
    the feature sizes shape inference already knows; with those entries constant, the Concat that builds a
    Reshape target holds them as constants (channel pruning can rewrite them; the batch entry stays)."""
    count = 0
    for node in list(graph.nodes):
        if node.op not in ("Gather", "Slice") or not node.outputs or is_graph_output(graph, node.outputs[0]):
            continue
        sizes = _read_sizes(node.outputs[0])
        if sizes is None or not all(isinstance(size, int) for size in sizes):
            continue
        shape = const_value(node.inputs[1]).shape if node.op == "Gather" else (len(sizes),)
        out = node.outputs[0]
        node.outputs.clear()
        out.to_constant(np.array(sizes, dtype=np.int64).reshape(shape))
        count += 1
    return count


def _shape_dims(node: gs.Node) -> list[tuple[int, object]] | None:
    """For a Shape node whose input has a known rank: (axis, size) of each dim it reads, the size an int when
    static; else None."""
    if node.op != "Shape" or node.domain or not node.outputs or node.inputs[0].shape is None:
        return None
    shape = list(node.inputs[0].shape)
    axes = list(range(len(shape)))[node.attrs.get("start", 0):node.attrs.get("end", None)]
    return [(a, shape[a]) for a in axes]


def _picked(reader: gs.Node, length: int) -> np.ndarray | None:
    """The positions a Gather (axis 0) or a Slice (axis 0, constant bounds) of a 1-D tensor of `length` takes."""
    index = [const_value(t) for t in reader.inputs[1:]]
    if any(v is None for v in index):
        return None
    if reader.op == "Gather" and reader.attrs.get("axis", 0) == 0:
        at = index[0].astype(np.int64)
        if np.any(at >= length) or np.any(at < -length):
            return None
        return np.where(at < 0, at + length, at)
    if reader.op == "Slice" and len(index) >= 2 and (len(index) < 3 or index[2].reshape(-1).tolist() in ([0], [-1])):
        step = int(index[3].reshape(-1)[0]) if len(index) > 3 else 1
        start, end = (int(np.clip(v.reshape(-1)[0], -2**62, 2**62)) for v in index[:2])
        return np.arange(length)[start:end:step] if step else None
    return None


def _infer_reshape_entry(graph: gs.Graph) -> int:
    """A Reshape whose target (or each piece of the Concat building it) is known at compile time, but for
    run-time reads of its own input's sizes at the same position (written 0: copy) and at most one other entry
    (the batch size, or a product with it; written -1 when the target has none), gets that target as a
    constant. Reshape copies or infers the sizes the run-time arithmetic computed, for any input it accepts."""
    count = 0
    for node in list(graph.nodes):
        if node.op != "Reshape" or node.attrs.get("allowzero", 0) or const_value(node.inputs[1]) is not None:
            continue
        built = producer(node.inputs[1])
        if built is not None and built.op == "Cast":  # tf2onnx builds targets in int32
            built = producer(built.inputs[0])
        pieces = built.inputs if built is not None and built.op == "Concat" else [node.inputs[1]]
        entries = []
        for piece in pieces:
            known = _piece_entries(piece)
            if known is None:
                break
            entries += known
        else:
            source = node.inputs[0].name
            entries = [0 if isinstance(e, tuple) and e == (source, k) else None if isinstance(e, tuple) else e
                       for k, e in enumerate(entries)]
            if entries.count(None) > 1 or entries.count(None) == 1 and -1 in entries:
                continue
            target = np.array([-1 if e is None else e for e in entries], dtype=np.int64)
            node.inputs[1] = gs.Constant(fresh_name(graph, node.name + "_target"), target)
            count += 1
    return count


def _piece_entries(piece: gs.Tensor) -> list | None:
    """The entries of a 1-D shape piece: an int where known at compile time, (tensor name, axis) where it reads
    a dynamic size of a tensor through Shape (perhaps with Gather, Slice, Unsqueeze), None where only the run
    time knows it; None when even the piece's length is unknown."""
    value = const_value(piece)
    if value is not None:
        return [int(v) for v in value.reshape(-1)]
    node = producer(piece)
    if node is not None and node.op == "Unsqueeze" and node.inputs[0].shape == []:
        return _read_sizes(node.inputs[0]) or [None]
    if not piece.shape or len(piece.shape) != 1 or not isinstance(piece.shape[0], int):
        return None
    return _read_sizes(piece) or [None] * piece.shape[0]


def _read_sizes(piece: gs.Tensor) -> list | None:
    """The sizes a Shape, or a Gather or Slice of one, reads: ints where static, else (tensor name, axis)."""
    node = producer(piece)
    shape = node if node is not None and node.op == "Shape" else \
        producer(node.inputs[0]) if node is not None and node.op in ("Gather", "Slice") else None
    dims = _shape_dims(shape) if shape is not None else None
    if dims is None:
        return None
    at = np.arange(len(dims)) if shape is node else _picked(node, len(dims))
    if at is None:
        return None
    source = shape.inputs[0].name
    return [size if isinstance(size, int) and size >= 0 else (source, axis)
            for axis, size in (dims[i] for i in at.reshape(-1))]


def evaluate_nodes(nodes, outputs, opsets) -> list[np.ndarray]:
    """Run `nodes` (all inputs constant) in onnxruntime without graph optimizations; one value per output."""
    sub = gs.Graph(nodes=nodes, inputs=[], outputs=outputs, opset=opsets.get("", 13))
    proto = gs.export_onnx(sub, do_type_check=False,
                           opset_imports=[onnx.helper.make_opsetid(d, v) for d, v in opsets.items()])
    inferred = onnx.shape_inference.infer_shapes(proto)
    types = {vi.name: vi.type for vi in list(inferred.graph.value_info) + list(inferred.graph.output)}
    for out in proto.graph.output:
        if out.name in types and types[out.name].tensor_type.elem_type:
            out.type.CopyFrom(types[out.name])
    return make_session(proto, threads=1, optimize=False).run([t.name for t in outputs], {})


def _constant_attr_value(node: gs.Node) -> np.ndarray | None:
    attrs = node.attrs
    if isinstance(attrs.get("value"), gs.Constant):
        return np.asarray(attrs["value"].values)
    scalar_kinds = {"value_float": np.float32, "value_int": np.int64}
    list_kinds = {"value_floats": np.float32, "value_ints": np.int64}
    for key, dtype in scalar_kinds.items():
        if key in attrs:
            return np.array(attrs[key], dtype=dtype)
    for key, dtype in list_kinds.items():
        if key in attrs:
            return np.array(attrs[key], dtype=dtype)
    return None
