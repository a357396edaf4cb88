"""equalize-layers: cross-layer equalization of weight ranges between consecutive layers.

For a layer pair P → f → C where f is positively homogeneous per channel (nothing, Relu, LeakyRelu, PRelu,
MaxPool, AveragePool, GlobalAveragePool: f(x / s) = f(x) / s for s > 0), output channel i of P can be
divided by s_i and input channel i of C multiplied by s_i without changing the model. Choosing
s_i = sqrt(r_P,i / r_C,i) (r: the largest |weight| of that channel in each layer) gives both layers the same
per-channel range sqrt(r_P,i r_C,i), which evens out channels whose weights or activations would otherwise
waste int8 levels (depthwise convs especially). Chains (pointwise → depthwise → pointwise) are swept a few
times until the scales settle.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from compiler.passmanager import Option, Pass, register_pass
from compiler.rewrite import const_value, fresh_name, is_graph_output, set_input
from passes.channel_groups import is_depthwise

HOMOGENEOUS = {"Relu", "LeakyRelu", "PRelu", "MaxPool", "AveragePool", "GlobalAveragePool"}


def _conv_like(node: gs.Node) -> bool:
    return (node.op == "Conv" and len(node.inputs) > 1 and isinstance(node.inputs[1], gs.Constant)
            and (len(node.inputs) < 3 or isinstance(node.inputs[2], gs.Constant)))


def find_pairs(graph: gs.Graph) -> list[tuple[gs.Node, gs.Node]]:
    """(producer, consumer) Conv pairs joined through positively homogeneous ops only, the producer's
    output read by nothing else."""
    pairs = []
    for prod in graph.nodes:
        if not _conv_like(prod) or (prod.attrs.get("group", 1) != 1 and not is_depthwise(prod)):
            continue
        t = prod.outputs[0]
        while True:
            if is_graph_output(graph, t) or len(t.outputs) != 1:
                break
            reader = t.outputs[0]
            if reader.op in HOMOGENEOUS and reader.inputs[0] is t and all(isinstance(x, gs.Constant)
                                                                          for x in reader.inputs[1:]):
                t = reader.outputs[0]
                continue
            if _conv_like(reader) and reader.inputs[0] is t and (reader.attrs.get("group", 1) == 1 or is_depthwise(reader)):
                cin = reader.inputs[1].values.shape[0 if is_depthwise(reader) else 1]
                if cin == prod.inputs[1].values.shape[0]:
                    pairs.append((prod, reader))
            break
    return pairs


@register_pass
class EqualizeLayers(Pass):
    """Rescale channels between consecutive Conv layers so their per-channel weight ranges match.

    Guarantees: outputs unchanged up to float rounding (only positively homogeneous ops sit between the
    rescaled layers, scales are positive); each pair's per-channel ranges become equal.
    """

    name = "equalize-layers"
    lossless = True
    OPTIONS = {"iterations": Option(int, 4, "sweeps over the layer pairs", minimum=1)}

    def run(self, module, ctx) -> bool:
        graph = module.graph
        pairs = find_pairs(graph)
        for _ in range(self.iterations):
            for prod, cons in pairs:
                _equalize(graph, prod, cons)
        if ctx is not None:
            ctx.log(pairs=len(pairs))
        return bool(pairs)


def _equalize(graph: gs.Graph, prod: gs.Node, cons: gs.Node) -> None:
    w1 = np.asarray(prod.inputs[1].values, np.float64)
    w2 = np.asarray(cons.inputs[1].values, np.float64)
    dw = is_depthwise(cons)
    r1 = np.abs(w1).reshape(w1.shape[0], -1).max(axis=1)
    r2 = np.abs(w2).reshape(w2.shape[0], -1).max(axis=1) if dw else np.abs(w2).max(axis=(0, *range(2, w2.ndim)))
    ok = (r1 > 0) & (r2 > 0)
    s = np.ones_like(r1)
    s[ok] = np.sqrt(r1[ok] / r2[ok])
    shape1 = (-1,) + (1,) * (w1.ndim - 1)
    prod.inputs[1] = gs.Constant(fresh_name(graph, prod.name + "_W_eq"), (w1 / s.reshape(shape1)).astype(np.float32))
    if len(prod.inputs) > 2:
        b = const_value(prod.inputs[2]).astype(np.float64)
        set_input(prod, 2, gs.Constant(fresh_name(graph, prod.name + "_B_eq"), (b / s).astype(np.float32)))
    shape2 = shape1 if dw else (1, -1) + (1,) * (w2.ndim - 2)
    cons.inputs[1] = gs.Constant(fresh_name(graph, cons.name + "_W_eq"), (w2 * s.reshape(shape2)).astype(np.float32))
