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
        """name → (shape with ints or dim names/None, numpy dtype name)."""
        out = {}
        for vi in list(self.graph.input) + list(self.graph.value_info) + list(self.graph.output):
            tt = vi.type.tensor_type
            if not tt.HasField("shape"):
                shape = None
            else:
                shape = [d.dim_value if d.HasField("dim_value") and d.dim_value >= 0 else (d.dim_param or None)
                         for d in tt.shape.dim]
            dtype = onnx.helper.tensor_dtype_to_np_dtype(tt.elem_type).name if tt.elem_type else None
            out[vi.name] = (shape, dtype)
        for name, value in self.consts.items():
            out[name] = (list(value.shape), value.dtype.name)
        return out

    def shape(self, name: str) -> list | None:
        """The tensor's shape, or None when unknown."""
        return self.value_infos.get(name, (None, None))[0]

    @cached_property
    def batch_names(self) -> set[str]:
        """The names of the graph inputs' symbolic first dims: the batch, 1 on the accelerator wherever a tensor
        carries it (a Transpose can move it off the first axis: attention's [3, batch, heads, tokens, dim])."""
        return {d.dim_param for i in self.graph.input if i.name not in self.consts
                for d in i.type.tensor_type.shape.dim[:1] if d.dim_param}

    def static_but_batch(self, name: str) -> bool:
        """Whether the tensor's shape is known but for the batch (its first dim, or a dim named as the batch)."""
        shape = self.shape(name)
        return shape is not None and all(isinstance(d, int) or d in self.batch_names for d in shape[1:])

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

    def nbytes(self, name: str, batch: int = 1) -> int | None:
        """Bytes of a tensor with a static shape (a symbolic first dim, or a dim named as the batch, counts as
        `batch`), else None."""
        shape, dtype = self.value_infos.get(name, (None, None))
        if shape is None or dtype is None:
            return None
        dims = []
        for i, d in enumerate(shape):
            if isinstance(d, int) and d >= 0:
                dims.append(d)
            elif i == 0 or d in self.batch_names:
                dims.append(batch)
            else:
                return None
        return int(np.prod(dims, dtype=np.int64)) * np.dtype(dtype).itemsize
