"""widen-float16: compute a half-precision model in float32, keeping its interface types."""

from __future__ import annotations

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from compiler.passmanager import Pass, register_pass
from compiler.rewrite import replace_uses

HALF = {onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16}
FLOAT = onnx.TensorProto.FLOAT
# Attributes that name the element type a node creates.
DTYPE_ATTRS = {"Cast": "to", "EyeLike": "dtype", "RandomNormal": "dtype", "RandomUniform": "dtype",
               "RandomNormalLike": "dtype", "RandomUniformLike": "dtype", "Bernoulli": "dtype"}


@register_pass
class WidenFloat16(Pass):
    """Turn float16 and bfloat16 weights, constants, casts and tensors into float32.

    Quantization, pruning statistics and the fusions all work on float32 numbers; a model exported in half
    precision (weights, activations or both) goes through them after this pass. Guarantees: graph inputs and
    outputs keep their element types (a Cast joins each half-precision input to the float32 body and
    the body to each half-precision output); no half-precision value is left inside; outputs equal the
    original model's within half-precision rounding (`lossless_rtol`), because the float32 body rounds
    less than the half one did. A model without half-precision values is untouched.
    """

    name = "widen-float16"
    lossless = True
    lossless_rtol = 2e-2  # half precision has 11 (fp16) or 8 (bf16) significant bits; the body now has 24

    def run(self, module, ctx) -> bool:
        graph = module.graph
        if not _has_half_body(graph):
            return False
        outputs = {id(t) for t in graph.outputs}
        widened = {"weights": 0, "casts": 0, "inputs": 0, "outputs": 0}
        for g in _graphs(graph):
            for tensor in g.tensors().values():
                if isinstance(tensor, gs.Constant) and _is_half(tensor.dtype):
                    tensor.values = np.asarray(tensor.values, dtype=np.float32)
                    widened["weights"] += 1
            for node in g.nodes:
                if not _is_output_cast(node, outputs):
                    widened["casts"] += _widen_attributes(node)
        for tensor in list(graph.inputs):
            if _is_half(tensor.dtype) and any(n.op != "Cast" for n in tensor.outputs):
                _cast_after_input(graph, tensor)
                widened["inputs"] += 1
        for tensor in list(graph.outputs):
            if _is_half(tensor.dtype) and tensor.inputs and not _is_output_cast(tensor.inputs[0], outputs):
                _cast_before_output(graph, tensor)
                widened["outputs"] += 1
        interface = {id(t) for t in graph.inputs + graph.outputs}
        for g in _graphs(graph):  # inner types are inferred again from the float32 weights
            signature = {id(t) for t in g.inputs + g.outputs}  # a Loop body's declared types: widened in place
            for tensor in g.tensors().values():
                if not isinstance(tensor, gs.Variable) or id(tensor) in interface:
                    continue
                if id(tensor) not in signature:
                    tensor.dtype, tensor.shape = None, None
                elif _is_half(tensor.dtype):
                    tensor.dtype = np.float32
        module.infer_shapes()
        if ctx is not None:
            ctx.log(**widened)
            casts = widened["inputs"] + widened["outputs"]
            ctx.warn(f"half-precision model computed in float32 ({widened['weights']} weights widened; "
                     f"{casts} half inputs and outputs keep their type through a Cast)")
        return True


def _is_half(dtype) -> bool:
    if dtype is None:
        return False
    try:
        return onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype)) in HALF
    except (TypeError, KeyError, ValueError):
        return dtype in HALF or str(dtype) == "bfloat16"


def _graphs(graph: gs.Graph):
    """The graph and every subgraph (If/Loop/Scan bodies) inside it."""
    yield graph
    for node in graph.nodes:
        for value in node.attrs.values():
            for body in (value if isinstance(value, list) else [value]):
                if isinstance(body, gs.Graph):
                    yield from _graphs(body)


def _has_half_body(graph: gs.Graph) -> bool:
    """Whether anything but the interface (half inputs read only by Casts, half outputs written by Casts)
    holds or makes half-precision values."""
    outputs = {id(t) for t in graph.outputs}
    interface = {id(t) for t in graph.inputs} | outputs
    for g in _graphs(graph):
        for tensor in g.tensors().values():
            if _is_half(tensor.dtype) and id(tensor) not in interface:
                return True
            if id(tensor) in interface and _is_half(tensor.dtype) and any(n.op != "Cast" for n in tensor.outputs):
                return True
        if any(_half_attribute(n) and not _is_output_cast(n, outputs) for n in g.nodes):
            return True
    return False


def _is_output_cast(node: gs.Node, outputs: set[int]) -> bool:
    """A Cast writing a graph output: it gives the output its interface type and stays as it is."""
    return node.op == "Cast" and any(id(t) in outputs for t in node.outputs)


def _half_attribute(node: gs.Node) -> bool:
    key = DTYPE_ATTRS.get(node.op)
    if key is not None and node.attrs.get(key) in HALF:
        return True
    return any(isinstance(v, gs.Constant) and _is_half(v.dtype) for v in node.attrs.values())


def _widen_attributes(node: gs.Node) -> int:
    """Widen a node's type attribute (Cast's `to`, a generator's `dtype`) and tensor attributes; returns 1
    when the node was a cast to half precision."""
    key = DTYPE_ATTRS.get(node.op)
    changed = 0
    if key is not None and node.attrs.get(key) in HALF:
        node.attrs[key] = FLOAT
        changed = int(node.op == "Cast")
    for name, value in node.attrs.items():
        if isinstance(value, gs.Constant) and _is_half(value.dtype):  # Constant's value, ConstantOfShape's value
            node.attrs[name] = gs.Constant(value.name, np.asarray(value.values, dtype=np.float32))
    return changed


def _cast_after_input(graph: gs.Graph, tensor: gs.Variable) -> None:
    wide = gs.Variable(f"{tensor.name}_float32", dtype=np.float32, shape=tensor.shape)
    replace_uses(tensor, wide)
    graph.nodes.insert(0, gs.Node("Cast", f"{tensor.name}_to_float32", {"to": FLOAT}, [tensor], [wide]))


def _cast_before_output(graph: gs.Graph, tensor: gs.Variable) -> None:
    wide = gs.Variable(f"{tensor.name}_float32", dtype=np.float32, shape=tensor.shape)
    producer = tensor.inputs[0]
    producer.outputs[producer.outputs.index(tensor)] = wide
    replace_uses(tensor, wide)
    half = onnx.helper.np_dtype_to_tensor_dtype(np.dtype(tensor.dtype))
    graph.nodes.append(gs.Node("Cast", f"{tensor.name}_to_half", {"to": half}, [wide], [tensor]))

