"""drpc's IR: an onnx-graphsurgeon graph plus the model-level facts ONNX keeps outside the graph.

`Module` loads any ONNX file (external data included), keeps opset imports, IR version, producer and
metadata, runs onnx shape inference, saves back to a valid model (external data for models over the
protobuf limit) and prints a deterministic text form used by IR dumps and diffs.
"""

from __future__ import annotations

import copy
import os
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import shape_inference

from compiler.errors import ModelLoadError, UnsupportedModelError
from compiler.torch_names import torch_modules

gs.logger.G_LOGGER.severity = gs.logger.G_LOGGER.ERROR

# protobuf refuses to serialize a message of 2 GiB or more; stay well below it.
PROTOBUF_LIMIT = 2**31 - 2**26


@dataclass
class Module:
    """A model being compiled: `graph` is mutable onnx-graphsurgeon IR, the rest is model metadata."""

    graph: gs.Graph
    ir_version: int = onnx.IR_VERSION
    opset_imports: dict[str, int] = field(default_factory=dict)
    producer_name: str = ""
    producer_version: str = ""
    doc_string: str = ""
    metadata: dict[str, str] = field(default_factory=dict)
    source: str = ""
    torch_modules: dict[str, str] = field(default_factory=dict)  # node name → PyTorch module (torch.export)

    # ----------------------------------------------------------------- loading
    @classmethod
    def load(cls, path: str | os.PathLike) -> "Module":
        """Read an ONNX file (with its external data) and check it; typed errors name the file."""
        path = Path(path)
        if not path.exists():
            raise ModelLoadError(f"{path}: no such file")
        if path.is_dir():
            raise ModelLoadError(f"{path}: is a directory, not an ONNX file")
        if path.stat().st_size == 0:
            raise ModelLoadError(f"{path}: file is empty")
        try:
            proto = onnx.load_model(str(path), load_external_data=False)
        except Exception as exc:  # protobuf's decode errors have no common base class
            raise ModelLoadError(f"{path}: not a readable ONNX model ({_first_line(exc)})") from None
        if not proto.HasField("graph") or not proto.opset_import:
            raise ModelLoadError(f"{path}: not an ONNX model (no graph or no opset import)")
        _check_external_data_paths(proto, path)
        try:
            onnx.external_data_helper.load_external_data_for_model(proto, str(path.parent))
        except Exception as exc:
            raise ModelLoadError(f"{path}: cannot read external data ({_first_line(exc)})") from None
        return cls.from_proto(proto, source=str(path), check=True)

    @classmethod
    def from_proto(cls, proto: onnx.ModelProto, source: str = "<memory>", check: bool = False) -> "Module":
        """Wrap a ModelProto (not modified). With `check`, onnx's checker must accept it first."""
        if check:
            proto = _checked(proto, source)
        if len(proto.graph.output) == 0:
            raise ModelLoadError(f"{source}: model has no outputs")
        proto = _name_negative_dims(proto)
        try:
            graph = gs.import_onnx(proto)
        except Exception as exc:
            raise UnsupportedModelError(f"{source}: cannot import graph ({_first_line(exc)})") from None
        name_nodes(graph)
        opsets = {imp.domain or "": imp.version for imp in proto.opset_import}
        return cls(
            graph=graph,
            ir_version=proto.ir_version,
            opset_imports=opsets,
            producer_name=proto.producer_name,
            producer_version=proto.producer_version,
            doc_string=proto.doc_string,
            metadata={p.key: p.value for p in proto.metadata_props},
            source=source,
            torch_modules=torch_modules(proto.graph),
        )

    # ----------------------------------------------------------------- export
    @property
    def opset(self) -> int:
        """The default-domain (ai.onnx) opset version."""
        return self.opset_imports.get("", self.opset_imports.get("ai.onnx", 1))

    def to_proto(self, infer_shapes: bool = False) -> onnx.ModelProto:
        """Export a topologically sorted, cleaned-up ModelProto; with `infer_shapes`, run onnx shape inference."""
        graph = self.graph
        graph.cleanup(remove_unused_graph_inputs=False).toposort()
        graph.opset = self.opset
        imports = [onnx.helper.make_opsetid(d, v) for d, v in sorted(self.opset_imports.items())]
        for node in graph.nodes:  # custom domains used by new nodes
            if node.domain and node.domain not in self.opset_imports:
                imports.append(onnx.helper.make_opsetid(node.domain, 1))
                self.opset_imports[node.domain] = 1
        proto = gs.export_onnx(graph, do_type_check=False, opset_imports=imports)
        proto.ir_version = max(self.ir_version, _min_ir_version(self.opset))
        proto.producer_name = self.producer_name or "drpc"
        proto.producer_version = self.producer_version
        proto.doc_string = self.doc_string
        del proto.metadata_props[:]
        for key, value in sorted(self.metadata.items()):
            proto.metadata_props.add(key=key, value=value)
        if infer_shapes:
            proto = infer_shapes_proto(proto)
        return proto

    def infer_shapes(self) -> None:
        """Replace the graph by one whose tensors carry onnx-inferred shapes and dtypes."""
        proto = self.to_proto(infer_shapes=True)
        self.graph = gs.import_onnx(proto)

    def reinfer_shapes(self) -> None:
        """Forget the shapes of inner tensors (channel counts changed) and infer them again."""
        interface = {id(t) for t in self.graph.inputs + self.graph.outputs}
        for t in self.graph.tensors().values():
            if isinstance(t, gs.Variable) and id(t) not in interface:
                t.shape = None
        self.infer_shapes()

    def save(self, path: str | os.PathLike, infer_shapes: bool = True) -> onnx.ModelProto:
        """Write the model; weights go to `<name>.data` beside it when the protobuf limit would be hit."""
        proto = self.to_proto(infer_shapes=infer_shapes)
        save_proto(proto, path)
        return proto

    def copy(self) -> "Module":
        """An independent deep copy (graph and metadata)."""
        return Module.from_proto(self.to_proto(), source=self.source)

    def text(self) -> str:
        """Deterministic text form: one line per graph input, node (in topological order) and output."""
        return format_graph(self.graph, self.opset_imports)


# --------------------------------------------------------------------- helpers
def name_nodes(graph: gs.Graph) -> None:
    """Give every node a unique, deterministic name (`<op>_<index>` for unnamed or repeated ones)."""
    seen: set[str] = set()
    for index, node in enumerate(graph.nodes):
        if not node.name or node.name in seen:
            base = f"{node.op}_{index}"
            node.name = base if base not in seen else f"{base}_{len(seen)}"
        seen.add(node.name)
        for value in node.attrs.values():
            if isinstance(value, gs.Graph):
                name_nodes(value)


def batch_one_flags(graph: gs.Graph) -> list[str]:
    """`--input-shape NAME=1,...` for each graph input whose batch (first) dim is dynamic: what compiles it for
    batch 1, as DRP-AI runs (its other dynamic dims, if any, also 1)."""
    return [f"--input-shape {t.name}={','.join(str(d) if isinstance(d, int) and d >= 0 else '1' for d in t.shape)}"
            for t in graph.inputs if t.shape and not (isinstance(t.shape[0], int) and t.shape[0] >= 0)]


def set_batch_one(graph: onnx.GraphProto) -> bool:
    """Set each graph input's dynamic first dim (the batch) to 1, in place; whether there was one. Inner tensors
    and outputs keep what they declare (shape inference then refines them)."""
    changed = False
    for graph_input in graph.input:
        dim = graph_input.type.tensor_type.shape.dim
        if dim and not (dim[0].HasField("dim_value") and dim[0].dim_value >= 0):
            dim[0].Clear()
            dim[0].dim_value = 1
            changed = True
    return changed


def infer_shapes_proto(proto: onnx.ModelProto) -> onnx.ModelProto:
    """onnx shape inference with data propagation; through a file for models past the protobuf limit."""
    try:
        if proto.ByteSize() < PROTOBUF_LIMIT:
            return shape_inference.infer_shapes(proto, data_prop=True)
        with tempfile.TemporaryDirectory(prefix="drpc-shape-") as tmp:
            src, dst = Path(tmp) / "in.onnx", Path(tmp) / "out.onnx"
            save_proto(proto, src)
            shape_inference.infer_shapes_path(str(src), str(dst), data_prop=True)
            out = onnx.load_model(str(dst), load_external_data=True)
            return out
    except Exception as exc:
        raise UnsupportedModelError(f"onnx shape inference failed: {_first_line(exc)}") from None


def save_proto(proto: onnx.ModelProto, path: str | os.PathLike) -> None:
    """Save a ModelProto; large models keep their weights in one external data file beside the model."""
    path = Path(path)
    if proto.ByteSize() >= PROTOBUF_LIMIT:
        proto = copy.copy(proto)
        onnx.save_model(proto, str(path), save_as_external_data=True, all_tensors_to_one_file=True,
                        location=path.name + ".data", size_threshold=1024)
    else:
        onnx.save_model(proto, str(path))


def format_graph(graph: gs.Graph, opsets: dict[str, int] | None = None, indent: str = "") -> str:
    """Text form of a graph: stable across runs so that two dumps diff line by line."""
    lines = []
    if opsets is not None:
        lines.append(indent + "opset " + ", ".join(f"{d or 'ai.onnx'}={v}" for d, v in sorted(opsets.items())))
    for t in graph.inputs:
        lines.append(f"{indent}input {_tensor_sig(t)}")
    for node in graph.nodes:
        ins = ", ".join(_operand(t) for t in node.inputs)
        outs = ", ".join(_tensor_sig(t) for t in node.outputs)
        attrs = "".join(f" {k}={_attr(v)}" for k, v in sorted(node.attrs.items()) if not isinstance(v, gs.Graph))
        domain = f"{node.domain}." if node.domain else ""
        lines.append(f"{indent}{outs} = {domain}{node.op}({ins}){attrs}  # {node.name}")
        for key, value in sorted(node.attrs.items()):
            if isinstance(value, gs.Graph):
                lines.append(f"{indent}  {key}:")
                lines.append(format_graph(value, None, indent + "    "))
    for t in graph.outputs:
        lines.append(f"{indent}output {_tensor_sig(t)}")
    return "\n".join(lines)


def _tensor_sig(t: gs.Tensor) -> str:
    dtype = getattr(t, "dtype", None)
    dtype_name = np.dtype(dtype).name if dtype is not None and not isinstance(dtype, int) else str(dtype)
    shape = "?" if t.shape is None else "x".join(str(d) for d in t.shape) or "scalar"
    return f"%{t.name}:{dtype_name}[{shape}]"


def _operand(t: gs.Tensor) -> str:
    if t.name == "":
        return "<none>"
    if isinstance(t, gs.Constant):
        values = t.values
        if values.size <= 4:
            return f"const{list(np.asarray(values).reshape(-1).tolist())}:{values.dtype.name}"
        return f"%{t.name}:const {values.dtype.name}[{'x'.join(map(str, values.shape))}]"
    return f"%{t.name}"


def _attr(value) -> str:
    if isinstance(value, gs.Constant):
        return f"tensor<{value.values.dtype.name}[{'x'.join(map(str, value.values.shape))}]>"
    if isinstance(value, np.ndarray):
        return f"tensor<{value.dtype.name}[{'x'.join(map(str, value.shape))}]>"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, (list, tuple)):
        return "[" + ",".join(_attr(v) for v in value) + "]"
    if isinstance(value, bytes):
        return repr(value.decode(errors="replace"))
    return repr(value) if isinstance(value, str) else str(value)


def _name_negative_dims(proto: onnx.ModelProto) -> onnx.ModelProto:
    """Some exporters write -1 for unknown dims; give those dims names (a copy is made only when needed)."""
    ios = list(proto.graph.input) + list(proto.graph.output) + list(proto.graph.value_info)
    if not any(d.HasField("dim_value") and d.dim_value < 0 for vi in ios for d in vi.type.tensor_type.shape.dim):
        return proto
    fixed = onnx.ModelProto()
    fixed.CopyFrom(proto)
    for vi in list(fixed.graph.input) + list(fixed.graph.output) + list(fixed.graph.value_info):
        for i, d in enumerate(vi.type.tensor_type.shape.dim):
            if d.HasField("dim_value") and d.dim_value < 0:
                d.dim_param = "batch" if i == 0 else f"{vi.name}_dim{i}"
    return fixed


def _min_ir_version(opset: int) -> int:
    """The lowest IR version that onnxruntime accepts together with `opset` (per onnx's version table)."""
    table = [(21, 10), (19, 9), (15, 8), (13, 7), (12, 7), (11, 6), (10, 5), (9, 4), (7, 3), (1, 3)]
    for min_opset, ir in table:
        if opset >= min_opset:
            return ir
    return 3


def _check_external_data_paths(proto: onnx.ModelProto, path: Path) -> None:
    """Refuse external data locations that escape the model's folder (absolute or with '..')."""
    base = path.parent.resolve()
    for tensor in onnx.external_data_helper._get_all_tensors(proto):
        if not onnx.external_data_helper.uses_external_data(tensor):
            continue
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        target = (base / location).resolve()
        if os.path.isabs(location) or not target.is_relative_to(base):
            raise ModelLoadError(
                f"{path}: external data of tensor '{tensor.name}' points outside the model's folder ({location})")
        if not target.exists():
            raise ModelLoadError(f"{path}: external data file '{location}' of tensor '{tensor.name}' is missing")


def _checked(proto: onnx.ModelProto, source: str) -> onnx.ModelProto:
    """The model onnx's checker accepts: `proto` itself, or a copy with its nodes put in topological order
    (some converters append nodes out of order), marked IR 4 (weights not listed as inputs) or with each
    tensor's values in raw_data only (a tool rewrote raw_data and left the typed field) when that is all the
    checker objects to."""
    if proto.ByteSize() >= PROTOBUF_LIMIT:
        return proto
    try:
        onnx.checker.check_model(proto)
        return proto
    except Exception as exc:
        error = exc
    if "in initializer but not in graph input" in str(error) and proto.ir_version < 4:
        # IR 3 lists weights as graph inputs; some tools write IR-3 models that do not (onnxruntime's quantizer
        # on an old model). IR 4, which needs no such list, describes the same model.
        retyped = copy.deepcopy(proto)
        retyped.ir_version = 4
        return _checked(retyped, source)
    if "one and only one value field" in str(error):
        # Tools that rewrite weights in place (AIMET on mnist_cntk) set raw_data and leave float_data as it was.
        # onnxruntime and onnx's numpy_helper both read raw_data first, so that is the model users run.
        single = copy.deepcopy(proto)
        if _drop_typed_fields_beside_raw_data(single):
            return _checked(single, source)
    if "topologically sorted" in str(error):
        try:
            ordered = copy.deepcopy(proto)
            graph = gs.import_onnx(ordered)
            graph.toposort()
            del ordered.graph.node[:]
            ordered.graph.node.extend(gs.export_onnx(graph, do_type_check=False).graph.node)
            onnx.checker.check_model(ordered)
            return ordered
        except Exception:
            pass
    raise ModelLoadError(f"{source}: rejected by onnx checker: {_first_line(error)}") from None


_TYPED_FIELDS = ("float_data", "int32_data", "string_data", "int64_data", "double_data", "uint64_data")


def _drop_typed_fields_beside_raw_data(proto: onnx.ModelProto) -> bool:
    """Clear the typed value fields of every tensor that also holds raw_data; True when any was cleared."""
    changed = False
    for tensor in onnx.external_data_helper._get_all_tensors(proto):
        if tensor.HasField("raw_data"):
            for name in _TYPED_FIELDS:
                if len(getattr(tensor, name)):
                    tensor.ClearField(name)
                    changed = True
    return changed


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__
