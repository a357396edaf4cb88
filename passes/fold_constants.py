"""fold-constants: evaluate every computation whose inputs are all known at compile time."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from compiler.ir import Module
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
    infer (-1) itself (see `_infer_reshape_entry`), and all-constant subcomputations by initializers. What
    those rules leave of Reshape targets, Expand shapes and Resize sizes is decided once by probing the dynamic
    sizes (see `_probed_shape_inputs`).

    Guarantees: outputs unchanged (values are computed by onnxruntime with optimizations off); Q/DQ and
    random nodes are never folded; a folded tensor larger than both `max_bytes` and the constants it was
    computed from is left as a computation (the size guard); nodes with subgraphs are left alone.
    """

    name = "fold-constants"
    lossless = True
    OPTIONS = {"max_bytes": Option(int, 1 << 20, "largest folded tensor that may grow the model", minimum=0)}

    def run(self, module, ctx) -> bool:
        changed = self._constant_nodes(module.graph)
        folded = self._to_fixed_point(module)
        probed = _probed_shape_inputs(module)  # what the rules leave, once
        if probed:  # sizes inferred before (fresh names for what the run-time arithmetic made) are forgotten
            module.reinfer_shapes()
            folded += probed + self._to_fixed_point(module)
        if ctx is not None:
            ctx.log(constant_nodes=changed, folded_tensors=folded)
        return bool(changed or folded)

    def _to_fixed_point(self, module) -> int:
        """Apply the folding rules until none applies (folding a Shape can make more nodes constant); the count
        of folds. The graph's shapes are inferred at the end."""
        folded = 0
        for _ in range(16):
            module.infer_shapes()
            n = (self._fold_shapes(module.graph) + _fold_static_dims(module.graph) + self._fold_computations(module)
                 + _infer_reshape_entry(module.graph))
            if n == 0:
                break
            folded += n
            module.graph.cleanup(remove_unused_graph_inputs=False)
        return folded

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
    run-time reads of its input's sizes at the same position (of the input itself, or of a tensor whose size
    there has the same symbolic name: the batch; written 0: copy) and at most one other entry
    (the batch size, or a product with it; written -1 when the target has none), gets that target as a
    constant. Reshape copies or infers the sizes the run-time arithmetic computed, for any input it accepts."""
    count, tensors = 0, graph.tensors()
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
            entries = [0 if isinstance(e, tuple) and _same_size(tensors, e, node.inputs[0], k)
                       else None if isinstance(e, tuple) else e for k, e in enumerate(entries)]
            if entries.count(None) > 1 or entries.count(None) == 1 and -1 in entries:
                continue
            target = np.array([-1 if e is None else e for e in entries], dtype=np.int64)
            node.inputs[1] = gs.Constant(fresh_name(graph, node.name + "_target"), target)
            count += 1
    return count


def _same_size(tensors: dict[str, gs.Tensor], read: tuple[str, int], source: gs.Tensor, axis: int) -> bool:
    """Whether the size `read` ((tensor name, axis)) is the size of `source` at `axis`: the same tensor and axis,
    or dims shape inference gave the same symbolic name (the batch, read from another tensor)."""
    if read == (source.name, axis):
        return True
    shape, other = source.shape, tensors.get(read[0])
    other_shape = other.shape if other is not None else None
    return (shape is not None and other_shape is not None and axis < len(shape) and read[1] < len(other_shape)
            and isinstance(shape[axis], str) and shape[axis] == other_shape[read[1]])


def _probed_shape_inputs(module) -> int:
    """Reshape targets and Expand shapes still computed at run time, decided by probing: the model with the
    graph inputs' dynamic sizes set to each of three probe values, folded and shape-inferred (`_probe_shapes`),
    gives each node's input and output sizes, and each output size is classed by how it varies across probes.

    - Reshape: a size the same in all probes is written as it is, one equal to the input's size at the same
      position is copied (0), and at most one other is inferred (-1); else the target stays. That covers
      targets built from another tensor's batch (LeViT's `view(B, N, heads, -1)` of its Linear's output) and
      from products with it (`B * heads`).
    - Expand: a size the same in all probes is written as it is, one equal to the input's (aligned) size is
      kept (1), any other must equal a graph input's dynamic size, read there by Shape → Gather; else the
      shape stays. That replaces torch's `expand(B, -1, -1)` (a Where over the sizes, which shape inference
      cannot see through) for a ViT's class token, so the tensors after it have known feature sizes.
    - Resize with computed sizes: constant scales where every axis keeps its size or has fixed sizes (see
      `_resize_scales`): a segmentation head's `interpolate(size=x.shape[-2:])` on a dynamic batch."""
    graph = module.graph
    pending = [n for n in graph.nodes if n.op in ("Reshape", "Expand") and not n.attrs.get("allowzero", 0)
               and const_value(n.inputs[1]) is None and not is_graph_output(graph, n.outputs[0])]
    pending += [n for n in graph.nodes if n.op == "Resize" and graph.opset >= 13 and len(n.inputs) > 3
                and n.inputs[3].name and const_value(n.inputs[3]) is None and not n.attrs.get("axes")
                and n.attrs.get("coordinate_transformation_mode") != "tf_crop_and_resize"  # its sizes depend on roi
                and n.attrs.get("keep_aspect_ratio_policy", "stretch") == "stretch"]
    if not pending:
        return 0
    proto = module.to_proto()
    dynamic = [(i.name, k, d.dim_param or f"?{i.name}:{k}") for i in proto.graph.input
               for k, d in enumerate(i.type.tensor_type.shape.dim) if not d.HasField("dim_value")]
    names = sorted({name for _, _, name in dynamic})
    if not names:
        return 0
    probes = [_probe_shapes(proto, names, j) for j in range(len(PROBE_STEPS))]
    if any(p is None for p in probes):
        return 0
    inputs = {t.name: t for t in graph.inputs}
    count = 0
    for node in pending:
        data = node.inputs[0]
        ins = [list(data.shape) if isinstance(data, gs.Constant) else p.get(data.name) for p in probes]
        outs = [p.get(node.outputs[0].name) for p in probes]
        if any(s is None for s in ins + outs) or len({len(s) for s in outs}) != 1:
            continue
        if node.op == "Resize":
            count += _resize_scales(graph, node, ins, outs)
            continue
        entries = []
        for k in range(len(outs[0])):
            sizes = [s[k] for s in outs]
            if len(set(sizes)) == 1 and sizes[0] != 0:
                entries.append(sizes[0])
                continue
            at = k if node.op == "Reshape" else k - len(outs[0]) + len(ins[0])  # Expand aligns from the right
            if at >= 0 and all(at < len(i) and i[at] == size for i, size in zip(ins, sizes)):
                entries.append(0 if node.op == "Reshape" else 1)
            elif node.op == "Reshape":
                entries.append(-1)
            else:
                entries.append(next(((name, axis) for name, axis, dim in dynamic
                                     if [_probe_size(names, dim, j, axis) for j in range(len(probes))] == sizes), None))
        if node.op == "Reshape" and entries.count(-1) > 1 or None in entries:
            continue
        node.inputs[1] = _shape_tensor(graph, node.name, entries, inputs)
        count += 1
    return count


def _resize_scales(graph: gs.Graph, node: gs.Node, ins: list, outs: list) -> int:
    """Give a Resize whose output sizes are computed at run time constant scales instead, when the probes show
    each axis either keeps the input's size (scale 1: the batch and channels torch reads with
    `x.shape[:2]`) or has the same input and output size in every probe, with onnxruntime's float32 scale
    giving that output size back. onnxruntime derives the scale from sizes the same way, so the result is the
    same. 1 when rewritten."""
    scales = []
    for k in range(len(outs[0])):
        pairs = {(i[k], o[k]) for i, o in zip(ins, outs)}
        if all(i == o for i, o in pairs):
            scales.append(np.float32(1.0))
        elif len(pairs) == 1:
            size_in, size_out = next(iter(pairs))
            scale = np.float32(size_out) / np.float32(size_in)
            if int(np.float32(size_in) * scale) != size_out:
                return 0
            scales.append(scale)
        else:
            return 0
    scales_tensor = gs.Constant(fresh_name(graph, node.name + "_scales"), np.array(scales, dtype=np.float32))
    roi = node.inputs[1] if len(node.inputs) > 1 else gs.Variable.empty()
    node.inputs = [node.inputs[0], roi, scales_tensor]
    return 1


def _shape_tensor(graph: gs.Graph, name: str, entries: list, inputs: dict[str, gs.Tensor]) -> gs.Tensor:
    """A 1-D int64 shape: a constant when every entry is an int, else a Concat of constant runs and, for each
    (graph input, axis) entry, that input's size read by Shape → Gather."""
    if all(isinstance(e, int) for e in entries):
        return gs.Constant(fresh_name(graph, name + "_target"), np.array(entries, dtype=np.int64))
    pieces, run = [], []
    for entry in entries + [None]:
        if isinstance(entry, int):
            run.append(entry)
            continue
        if run:
            pieces.append(gs.Constant(fresh_name(graph, name + "_sizes"), np.array(run, dtype=np.int64)))
            run = []
        if entry is not None:
            shape = graph.layer(op="Shape", name=fresh_name(graph, name + "_read_shape"), inputs=[inputs[entry[0]]],
                                outputs=[gs.Variable(fresh_name(graph, name + "_input_shape"), np.int64)])[0]
            axis = gs.Constant(fresh_name(graph, name + "_axis"), np.array([entry[1]], dtype=np.int64))
            pieces += graph.layer(op="Gather", name=fresh_name(graph, name + "_read_size"), inputs=[shape, axis],
                                  outputs=[gs.Variable(fresh_name(graph, name + "_size"), np.int64)], attrs={"axis": 0})
    return graph.layer(op="Concat", name=fresh_name(graph, name + "_shape"), inputs=pieces,
                       outputs=[gs.Variable(fresh_name(graph, name + "_shape_out"), np.int64)], attrs={"axis": 0})[0]


PROBE_STEPS = (3, 5, 7)


def _probe_size(names: list[str], name: str, j: int, axis: int) -> int:
    """Probe j's value for the dynamic input size `name` (the i-th of `names`) on `axis`: PROBE_STEPS[j] + 8 i
    on a first axis (a batch), 32 times that on others (image sizes that survive a network's strides)."""
    size = PROBE_STEPS[j] + 8 * names.index(name)
    return size if axis == 0 else 32 * size


def _probe_shapes(proto: onnx.ModelProto, names: list[str], j: int) -> dict[str, list[int]] | None:
    """Fully known tensor shapes by name when the dynamic input sizes take probe j's values: the model with
    those sizes, folded (so sizes computed by ops shape inference does not follow, such as Where, become
    constants) and shape-inferred; None when that fails at those sizes."""
    probe = onnx.ModelProto()
    probe.CopyFrom(proto)
    del probe.graph.value_info[:]
    for graph_input in probe.graph.input:
        for k, dim in enumerate(graph_input.type.tensor_type.shape.dim):
            if not dim.HasField("dim_value"):
                size = _probe_size(names, dim.dim_param or f"?{graph_input.name}:{k}", j, k)
                dim.Clear()
                dim.dim_value = size
    try:
        module = Module.from_proto(probe)
        FoldConstants()._to_fixed_point(module)
    except Exception:  # noqa: BLE001 - any failure at the probe sizes (a model that runs only at its export size)
        return None
    return {name: list(t.shape) for name, t in module.graph.tensors().items()
            if t.shape is not None and all(isinstance(d, int) and d >= 0 for d in t.shape)}


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
