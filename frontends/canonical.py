"""Canonical form of a loaded graph, and the checks a model must pass before any pass sees it.

* ``Gemm(A, B, C)`` with a constant weight becomes ``MatMul(A, B') + C'``: ``B' = alpha·B`` (transposed to
  ``[K, N]`` when ``transB=1``) and ``C' = beta·C``. ``Y = alpha·A·B + beta·C`` is the same function, so
  every pass treats a GPT-2 or OPT linear (exported as ``Gemm``) exactly as a Llama one (``MatMul``); the
  MatMul keeps the Gemm's node name and the Add writes the Gemm's output tensor. Declined (left as they
  are): ``transA=1``, a weight that is not a constant, ``beta ≠ 1`` on a bias that is not a constant.
* Weights must be finite: a NaN anywhere, or an infinity in a weight matrix (a constant of rank ≥ 2), is
  an error naming the tensor — quantizing it would write a model that computes NaN without a word.
  (Scalar or 1-D infinities are legitimate: attention masks use them.)
* Mixture-of-experts graphs (expert weights stacked in one 3-D constant read by MatMul) are refused with
  one line: llmq does not quantize experts yet, and leaving them float while reporting the rest would
  misstate the model's INT8 share.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from ..ir.errors import LlmqError
from ..ir.graph import TRANSPARENT_OPS, Graph
from ..ir.storage import peek

__all__ = ["gemm_to_matmul", "check_finite_weights", "refuse_mixture_of_experts"]

logger = logging.getLogger(__name__)

PASS_NAME = "canonicalize"


def gemm_to_matmul(graph: Graph) -> int:
    """Rewrite every Gemm linear as MatMul + Add (in place); returns how many."""
    count = 0
    for node in list(graph.gs.nodes):
        if node.op != "Gemm" or node.attrs.get("transA", 0) or len(node.inputs) < 2:
            continue
        weight = node.inputs[1]
        if not isinstance(weight, gs.Constant):
            continue
        alpha, beta = float(node.attrs.get("alpha", 1.0)), float(node.attrs.get("beta", 1.0))
        bias = node.inputs[2] if len(node.inputs) > 2 and node.inputs[2].name else None
        if bias is not None and beta != 1.0 and not isinstance(bias, gs.Constant):
            continue
        w = np.asarray(weight.values)
        if node.attrs.get("transB", 0):
            w = w.T
        if alpha != 1.0:
            w = (w * alpha).astype(w.dtype)
        new_w = graph.make_constant(f"{weight.name}_kn", np.ascontiguousarray(w), PASS_NAME)
        if bias is not None and beta != 1.0:
            bias = graph.make_constant(f"{bias.name}_beta", (np.asarray(bias.values) * beta).astype(bias.dtype), PASS_NAME)
        out = node.outputs[0]
        node.op, node.attrs = "MatMul", {}
        x = node.inputs[0]
        node.inputs.clear()
        node.inputs.extend([x, new_w])
        if bias is not None:
            product = gs.Variable(graph.unique_name(f"{out.name}_matmul"), dtype=out.dtype)
            node.outputs.clear()
            node.outputs.append(product)
            add = gs.Node("Add", name=graph.unique_name(f"{node.name}/bias"), inputs=[product, bias], outputs=[out])
            graph.gs.nodes.append(add)
            graph.tag(add.name, PASS_NAME)
        count += 1
    if count:
        graph.gs.cleanup().toposort()
        graph.touch()
        logger.info("canonical form: %d Gemm linears as MatMul + Add", count)
    return count


def check_finite_weights(graph: Graph, path: str) -> None:
    """Refuse a model whose weights hold NaN, or infinities in a matrix, naming the tensor."""
    for tensor in graph.gs.tensors().values():
        if not isinstance(tensor, gs.Constant):
            continue
        values = peek(tensor)  # read (or mapped) without being kept: a large model is never all in memory
        if not isinstance(values, np.ndarray) or values.dtype.kind != "f" and values.dtype.name not in ("bfloat16",):
            continue
        flat = values.reshape(-1)
        bad = nan = 0
        for start in range(0, max(flat.size, 1), 1 << 22):  # 16 MB temporaries, whatever the tensor's shape
            chunk = np.asarray(flat[start:start + (1 << 22)], np.float32)
            finite = np.isfinite(chunk)
            if not finite.all():
                bad += int((~finite).sum())
                nan += int(np.isnan(chunk).sum())
        if not bad or (not nan and values.ndim < 2):
            continue
        nan = bool(nan)
        readers = ", ".join(sorted({n.name for n in tensor.outputs})[:3]) or "no node"
        raise LlmqError(f"{path}: weight '{tensor.name}' {list(values.shape)} holds {bad} "
                        f"{'NaN' if nan else 'infinite'} value(s) (read by {readers})",
                        "the checkpoint is damaged or was saved after a diverged step; export a healthy one")


def refuse_mixture_of_experts(graph: Graph, path: str) -> None:
    """One clear line for a graph whose MatMuls read stacked expert weights (a 3-D constant)."""
    for node in graph.gs.nodes:
        if node.op != "MatMul" or len(node.inputs) != 2:
            continue
        tensor, hops = node.inputs[1], 0
        while not isinstance(tensor, gs.Constant) and hops < 4:
            producer = Graph.producer(tensor)
            if producer is None or producer.op not in TRANSPARENT_OPS | {"Gather", "Slice", "DequantizeLinear"}:
                break
            tensor, hops = producer.inputs[0], hops + 1
        if isinstance(tensor, gs.Constant) and len(tensor.shape) >= 3:
            raise LlmqError(f"{path} is a mixture-of-experts model (MatMul '{node.name}' reads stacked expert weights "
                            f"{list(tensor.shape)}), which llmq does not quantize yet",
                            "compile a dense model; MoE support (experts quantized, router float) is planned")
