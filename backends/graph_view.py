"""A read-only view of a ModelProto for the backend: producers, consumers, shapes, constants, device tensors.

On the device, a QDQ model's tensors are fewer than the ONNX graph's: a DequantizeLinear output is the
integer tensor it reads, and an op's float output that only feeds a QuantizeLinear is stored as that
QuantizeLinear's integer output. `storage_of` maps every tensor to the tensor that holds it in memory.
"""

from __future__ import annotations

from functools import cached_property

import numpy as np
import onnx

from backends.qdq_info import initializer_values
from compiler.ir import set_batch_one


class GraphView:
    """Indexes of a (shape-inferred) ModelProto's main graph."""

    def __init__(self, model: onnx.ModelProto):
        self.model = model
        self.graph = model.graph
        self.nodes = list(model.graph.node)
        self.consts = initializer_values(model)
        self.producer = {o: n for n in self.nodes for o in n.output if o}
        self.consumers: dict[str, list] = {}
        for n in self.nodes:
            for i in n.input:
                if i:
                    self.consumers.setdefault(i, []).append(n)
        self.inputs = [i.name for i in self.graph.input if i.name not in self.consts]
        self.outputs = [o.name for o in self.graph.output]

    @cached_property
    def value_infos(self) -> dict[str, tuple[list, str | None]]:
        """name → (shape with ints or dim names/None, numpy dtype name). With a dynamic batch (a graph input's
        symbolic first dim), an inner tensor's shape is the one it has at batch 1, the accelerator's, wherever
        shape inference knows it there: sizes that are products with the batch (attention heads folded into it)
        or that a Transpose moved off the first axis are known then."""
        out = {}
        for vi in list(self.graph.input) + list(self.graph.value_info) + list(self.graph.output):
            out[vi.name] = _shape_and_dtype(vi)
        interface = {vi.name for vi in list(self.graph.input) + list(self.graph.output)}
        for vi in _inner_value_infos_at_batch_one(self.model):
            shape, dtype = _shape_and_dtype(vi)
            if vi.name not in interface and shape is not None and all(isinstance(d, int) for d in shape):
                out[vi.name] = (shape, dtype)
        for name, value in self.consts.items():
            out[name] = (list(value.shape), value.dtype.name)
        return out

    def shape(self, name: str) -> list | None:
        """The tensor's shape, or None when unknown."""
        return self.value_infos.get(name, (None, None))[0]

    def dtype(self, name: str) -> str | None:
        """The tensor's numpy dtype name, or None."""
        return self.value_infos.get(name, (None, None))[1]

    def is_const(self, name: str) -> bool:
        """An initializer or Constant output, or a DequantizeLinear of one (a quantized weight)."""
        if name in self.consts:
            return True
        prod = self.producer.get(name)
        return prod is not None and prod.op_type == "DequantizeLinear" and prod.input[0] in self.consts

    def const_source(self, name: str) -> str:
        """The stored tensor behind a constant input (the integer weight behind a DequantizeLinear)."""
        prod = self.producer.get(name)
        if prod is not None and prod.op_type == "DequantizeLinear" and prod.input[0] in self.consts:
            return prod.input[0]
        return name

    def storage_of(self, name: str) -> str:
        """The tensor that holds `name` in device memory (see the module docstring)."""
        seen = set()
        while name not in seen:
            seen.add(name)
            prod = self.producer.get(name)
            if prod is not None and prod.op_type == "DequantizeLinear" and prod.input[0]:
                name = prod.input[0]
                continue
            cons = self.consumers.get(name, [])
            if cons and name not in self.outputs and all(c.op_type == "QuantizeLinear" for c in cons) and len(cons) == 1:
                name = cons[0].output[0]
                continue
            break
        return name

    def nbytes(self, name: str) -> int | None:
        """Bytes of a tensor with a static shape at batch 1 (a symbolic first dim counts as 1; see value_infos for
        the inner tensors), else None."""
        shape, dtype = self.value_infos.get(name, (None, None))
        if shape is None or dtype is None:
            return None
        dims = []
        for i, d in enumerate(shape):
            if isinstance(d, int) and d >= 0:
                dims.append(d)
            elif i == 0:
                dims.append(1)
            else:
                return None
        return int(np.prod(dims, dtype=np.int64)) * np.dtype(dtype).itemsize


def _shape_and_dtype(vi: onnx.ValueInfoProto) -> tuple[list | None, str | None]:
    tt = vi.type.tensor_type
    shape = ([d.dim_value if d.HasField("dim_value") and d.dim_value >= 0 else (d.dim_param or None) for d in tt.shape.dim]
             if tt.HasField("shape") else None)
    return shape, onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name if tt.elem_type else None


def _inner_value_infos_at_batch_one(model: onnx.ModelProto) -> list[onnx.ValueInfoProto]:
    """The value_info onnx shape inference (with data propagation) gives when every graph input's symbolic first
    dim is 1; none without such a dim. The copy inferred carries the float weights' dims only, not their data."""
    copy = onnx.ModelProto()
    copy.graph.input.extend(model.graph.input)
    if not set_batch_one(copy.graph):
        return []
    copy.ir_version = model.ir_version
    copy.opset_import.extend(model.opset_import)
    copy.functions.extend(model.functions)
    copy.graph.node.extend(model.graph.node)
    copy.graph.output.extend(model.graph.output)
    for init in model.graph.initializer:
        if init.data_type in (onnx.TensorProto.INT64, onnx.TensorProto.INT32) or np.prod(init.dims) <= 16:
            copy.graph.initializer.append(init)
        else:  # shape inference reads a weight's dims and type only
            copy.graph.initializer.append(onnx.TensorProto(name=init.name, data_type=init.data_type, dims=init.dims))
    try:
        return list(onnx.shape_inference.infer_shapes(copy, data_prop=True).graph.value_info)
    except Exception:  # noqa: BLE001 - a model that does not infer at batch 1 keeps its own shapes
        return []
