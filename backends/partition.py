"""Partitioning: which engine (DRP-AI or CPU) runs each node, grouped into subgraphs with few transfers."""

from __future__ import annotations

import heapq
from dataclasses import dataclass, field

import onnx

from backends.graph_view import GraphView

DATA_MOVEMENT = {"Reshape", "Flatten", "Transpose", "Squeeze", "Unsqueeze", "Concat", "Slice", "Split", "Identity"}
QDQ = {"QuantizeLinear", "DequantizeLinear"}
SHAPE_ONLY = {"Shape", "Size"}  # read a tensor's shape, never its values: no data crosses to them


@dataclass
class Subgraph:
    """A maximal run of nodes on one engine, with the tensors entering and leaving it."""

    id: int
    engine: str
    nodes: list[str]
    inputs: list[str] = field(default_factory=list)
    outputs: list[str] = field(default_factory=list)


@dataclass
class Partition:
    """Engine and reason per node, the subgraphs in execution order, and the transfers between engines."""

    engine_of: dict[str, str]
    reasons: dict[str, str]
    subgraphs: list[Subgraph]
    transfers: list[tuple[str, str, str]]
    isolated_cpu_ops: list[str]
    order: list[str]

    def to_dict(self) -> dict:
        """JSON-ready form."""
        return {
            "subgraphs": [vars(s) for s in self.subgraphs],
            "transfers": [{"tensor": t, "from": a, "to": b} for t, a, b in self.transfers],
            "isolated_cpu_ops": self.isolated_cpu_ops,
        }


def partition(model: onnx.ModelProto, target) -> Partition:
    """Assign every node of `model` (shape-inferred) to "drpai" or "cpu" by the target's rules."""
    view = GraphView(model)
    engine, reasons = {}, {}
    for node in view.nodes:
        if node.op_type in QDQ:
            continue
        reason = _cpu_reason(node, view, target)
        engine[node.name] = "cpu" if reason else "drpai"
        if reason:
            reasons[node.name] = reason
    _data_movement_to_cpu(view, engine, reasons)
    _assign_qdq(view, engine)
    order = _engine_aware_order(view, engine)
    subgraphs = _group(order, engine, view)
    transfers = []
    sub_of = {n: s.id for s in subgraphs for n in s.nodes}
    for s in subgraphs:
        for t in s.inputs:
            prod = view.producer.get(t)
            src = engine[prod.name] if prod is not None else "cpu"  # graph inputs arrive from the CPU side
            readers = [c for c in view.consumers.get(t, []) if sub_of.get(c.name) == s.id]
            if src != s.engine and not all(c.op_type in SHAPE_ONLY for c in readers):
                transfers.append((t, src, s.engine))
    isolated = []
    ops = {n.name: n.op_type for n in view.nodes}
    for s in subgraphs:
        real = [n for n in s.nodes if ops[n] not in QDQ]
        if s.engine == "cpu" and len(real) == 1:
            before = {sub_of[view.producer[t].name] for t in s.inputs if t in view.producer}
            after = {sub_of[c.name] for t in s.outputs for c in view.consumers.get(t, [])}
            if before and after and all(subgraphs[i].engine == "drpai" for i in before | after):
                isolated.append(real[0])
    return Partition(engine, reasons, subgraphs, transfers, isolated, order)


def _cpu_reason(node, view: GraphView, target) -> str | None:
    op = node.op_type
    if node.domain not in ("", "ai.onnx"):
        return f"custom domain {node.domain}"
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for a in node.attribute):
        return f"{op} with subgraphs runs on the CPU"
    if op in target.cpu_ops:
        return f"{op} runs on the CPU on {target.accelerator}"
    rules = target.accelerator_ops.get(op)
    if rules is None:
        return f"op {op} is not supported by {target.accelerator}"
    for out in node.output:
        shape = view.shape(out)
        if shape is None or any(not isinstance(d, int) for d in shape[1:]):
            return "dynamic or unknown shape"
    attrs = {a.name: onnx.helper.get_attribute_value(a) for a in node.attribute}
    x_shape = view.shape(node.input[0]) if node.input else None
    if "rank" in rules and x_shape is not None and len(x_shape) not in rules["rank"]:
        return f"rank-{len(x_shape)} {op} is not supported (needs rank {rules['rank']})"
    if rules.get("weights") == "constant" and (len(node.input) < 2 or not view.is_const(node.input[1])):
        return f"{op} between two activations"
    if op in ("Conv", "ConvTranspose", "MaxPool", "AveragePool"):
        kernel = attrs.get("kernel_shape") or (view.shape(node.input[1])[2:] if len(node.input) > 1 and view.shape(node.input[1]) else [])
        if "kernel_max" in rules and kernel and max(kernel) > rules["kernel_max"]:
            return f"kernel {'x'.join(map(str, kernel))} exceeds {target.accelerator}'s {rules['kernel_max']}"
        strides = attrs.get("strides", [1])
        if "strides" in rules and any(s not in rules["strides"] for s in strides):
            return f"stride {list(strides)} is not supported"
        dilations = attrs.get("dilations", [1])
        if "dilations" in rules and any(d not in rules["dilations"] for d in dilations):
            return f"dilation {list(dilations)} is not supported"
    if "modes" in rules:
        mode = attrs.get("mode", b"nearest" if op != "Pad" else b"constant")
        mode = mode.decode() if isinstance(mode, bytes) else mode
        if mode not in rules["modes"]:
            return f"{op} mode '{mode}' is not supported"
    if rules.get("divisor") == "constant" and not view.is_const(node.input[1]):
        return "division by an activation"
    return None


def _data_movement_to_cpu(view: GraphView, engine, reasons) -> None:
    """Reshape/transpose chains that only feed CPU ops or graph outputs go to the CPU (detection heads); a Shape
    reading the chain does not count (it needs no data)."""
    for node in reversed(view.nodes):
        if node.op_type not in DATA_MOVEMENT or engine.get(node.name) != "drpai":
            continue
        readers = [c for o in node.output for c in view.consumers.get(o, []) if c.op_type not in QDQ | SHAPE_ONLY]
        feeds_output = any(o in view.outputs or _reaches_output_through_qdq(view, o) for o in node.output)
        if (feeds_output and not readers) or (readers and all(engine.get(c.name) == "cpu" for c in readers)):
            engine[node.name] = "cpu"
            reasons[node.name] = "reshape/transpose chain feeding the CPU or a graph output"


def _reaches_output_through_qdq(view: GraphView, name: str) -> bool:
    frontier = [name]
    while frontier:
        t = frontier.pop()
        if t in view.outputs:
            return True
        frontier += [o for c in view.consumers.get(t, []) if c.op_type in QDQ for o in c.output]
    return False


def _assign_qdq(view: GraphView, engine) -> None:
    """Q/DQ nodes go with the op they serve: a DQ with its reader, a Q with the op that produced its input; a DQ
    nothing reads (it gives a graph output) goes with the node that produced its input."""
    for node in view.nodes:  # Q after an op
        if node.op_type == "QuantizeLinear":
            prod = view.producer.get(node.input[0])
            if prod is not None and prod.name in engine:
                engine[node.name] = engine[prod.name]
    for node in reversed(view.nodes):  # DQ before an op; remaining Qs follow their DQ readers
        if node.name in engine:
            continue
        readers = [c for o in node.output for c in view.consumers.get(o, [])]
        engines = [engine.get(c.name) for c in readers if engine.get(c.name)]
        if not readers and node.input[0] in view.producer:
            engines = [engine.get(view.producer[node.input[0]].name, "cpu")]
        engine[node.name] = "drpai" if engines and all(e == "drpai" for e in engines) else (engines[0] if engines else "cpu")


def _engine_aware_order(view: GraphView, engine) -> list[str]:
    """A topological order that stays on the current engine as long as it can (fewer subgraphs)."""
    indeg = {n.name: 0 for n in view.nodes}
    index = {n.name: i for i, n in enumerate(view.nodes)}
    deps: dict[str, list[str]] = {n.name: [] for n in view.nodes}
    for n in view.nodes:
        preds = {view.producer[i].name for i in n.input if i in view.producer}
        indeg[n.name] = len(preds)
        for p in preds:
            deps[p].append(n.name)
    ready = {"drpai": [], "cpu": []}
    for name, d in indeg.items():
        if d == 0:
            heapq.heappush(ready[engine[name]], index[name])
    order, current = [], "drpai"
    names = [n.name for n in view.nodes]
    while ready["drpai"] or ready["cpu"]:
        if not ready[current]:
            current = "cpu" if current == "drpai" else "drpai"
        name = names[heapq.heappop(ready[current])]
        order.append(name)
        for nxt in deps[name]:
            indeg[nxt] -= 1
            if indeg[nxt] == 0:
                heapq.heappush(ready[engine[nxt]], index[nxt])
    return order


def _group(order: list[str], engine, view: GraphView) -> list[Subgraph]:
    by_name = {n.name: n for n in view.nodes}
    subgraphs: list[Subgraph] = []
    for name in order:
        if not subgraphs or subgraphs[-1].engine != engine[name]:
            subgraphs.append(Subgraph(len(subgraphs), engine[name], []))
        subgraphs[-1].nodes.append(name)
    for s in subgraphs:
        members = set(s.nodes)
        produced = {o for n in s.nodes for o in by_name[n].output}
        s.inputs = sorted({i for n in s.nodes for i in by_name[n].input
                           if i and i not in produced and not view.is_const(i) and i not in view.consts})
        s.outputs = sorted({o for o in produced if o in view.outputs or any(
            c.name not in members for c in view.consumers.get(o, []))})
    return subgraphs
