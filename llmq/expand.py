"""Models with llmq's TensorRT plugin nodes, made runnable by ONNX Runtime for verification: each
``llmq.W4A8Gemm`` node is replaced by its definition in standard ONNX, decoded from the node's own inputs."""

from __future__ import annotations

import os

import ml_dtypes
import numpy as np
import onnx
import onnx_graphsurgeon as gs

from .backends.trt_plugin import DOMAIN, OP, has_plugins, unpack
from .frontends.onnx_loader import load_graph
from .ir.graph import Graph
from .ir.storage import peek, write_model
from .passes.qdq_math import add_per_token_qdq

__all__ = ["expand_plugins", "expanded_copy"]


def expand_plugins(graph: Graph) -> int:
    """Replace every ``llmq.W4A8Gemm`` node of ``graph`` by its definition in standard ONNX, decoded from the
    node's own inputs: the per-token INT8 Q/DQ of ``x`` and ``MatMul`` with ``Mul(DQ(uint4 codes, s2, z), s1)`` —
    the portable form the plugin was lowered from, which ONNX Runtime runs (how a TensorRT artifact is verified
    here). Returns the number of nodes expanded."""
    done = 0
    for node in [n for n in graph.gs.nodes if n.op == OP and (n.domain or "") == DOMAIN]:
        x, codes, scales, zeros, s1 = node.inputs
        group = int(node.attrs["group_size"])
        k = int(x.shape[-1]) if x.shape and isinstance(x.shape[-1], int) else int(codes.shape[1]) * 2
        q, s2, z = unpack(peek(codes), peek(scales), peek(zeros), k, group)
        base = f"{node.name}_expanded"
        qc = graph.make_constant(f"{base}_uint4", q.astype(ml_dtypes.uint4), "expand-plugins")
        sc = graph.make_constant(f"{base}_group_scale", s2.astype(np.float32), "expand-plugins")
        zc = graph.make_constant(f"{base}_zero_point", z.astype(ml_dtypes.uint4), "expand-plugins")
        w8 = graph.make_node("DequantizeLinear", [qc, sc, zc], f"{base}_int8", "expand-plugins",
                             {"axis": 0, "block_size": group}, out_dtype=np.float32, out_shape=list(q.shape))
        w = graph.make_node("Mul", [w8, s1], f"{base}_weight", "expand-plugins", out_dtype=np.float32)
        (xq,) = add_per_token_qdq(graph, x, k, "expand-plugins", f"{base}_x")
        out = node.outputs[0]
        node.outputs.clear()
        node.inputs.clear()
        mm = gs.Node("MatMul", name=graph.unique_name(f"{base}/MatMul"), inputs=[xq, w], outputs=[out])
        graph.gs.nodes.append(mm)
        done += 1
    if done:
        graph.gs.cleanup()
        graph.touch()
    return done


def expanded_copy(model_path: str, folder: str, opset: int, plugins: bool | None = None) -> tuple:
    """``(path, files)``: ``model_path`` with its plugin nodes expanded, written in ``folder`` (the files to remove
    after use); ``(model_path, [])`` if it has none. ``plugins``: whether it has any, when the caller knows (else
    the file's header is read to find out)."""
    if plugins is None:
        plugins = has_plugins(onnx.load(model_path, load_external_data=False))
    if not plugins:
        return model_path, []
    graph = load_graph(model_path, opset)
    expand_plugins(graph)
    path = os.path.join(folder, "verify-expanded.onnx")
    return path, write_model(graph.to_model, graph.gs, path)
