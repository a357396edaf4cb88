"""The PyTorch module each node of a torch.export ONNX model came from.

torch.export (the default of `torch.onnx.export` since torch 2.9) names nodes by op and counter
('node_Conv_124'), which says nothing to the model's author, but it stores where each node came from in the
node's metadata: `pkg.torch.onnx.name_scopes` lists the module path from the root down to the aten op,
for example ['', 'res1', 'res1.a', 'res1.a.1', '_native_batch_norm_legit_no_training_1'].
"""

from __future__ import annotations

import ast

import onnx

SCOPES = "pkg.torch.onnx.name_scopes"
WEIGHTED = {"Conv", "ConvTranspose", "Gemm", "MatMul"}


def torch_modules(graph: onnx.GraphProto) -> dict[str, str]:
    """{node name: PyTorch module path} for the nodes that carry torch.export's name scopes.

    A layer with a parameter named '<module>.weight' is named by that module (exporters fold a BatchNorm into
    the Conv before it and give the Conv the BatchNorm's scope); other nodes by the innermost module of their
    scope. Nodes computed in the root module's own forward (a functional relu, say) have no module path.
    """
    parameters = {t.name for t in graph.initializer}
    modules = {}
    for node in graph.node:
        meta = {p.key: p.value for p in node.metadata_props}
        if SCOPES not in meta:
            continue
        weight = node.input[1] if node.op_type in WEIGHTED and len(node.input) > 1 else ""
        if weight in parameters and weight.endswith(".weight"):
            modules[node.name] = weight[: -len(".weight")]
            continue
        try:
            scopes = ast.literal_eval(meta[SCOPES])
        except (ValueError, SyntaxError):
            continue
        path = [s for s in scopes[1:-1] if s]  # the root's '' first, the aten op last
        if path:
            modules[node.name] = path[-1]
    return modules
