"""Portable explicit-quantization ONNX (the ``qdq`` backend) and its TensorRT rule check.

The rules (TensorRT 10.x explicit quantization, strongly typed; ``../shared/REFERENCE.md`` §1):

* every zero point is zero (symmetric only);
* every scale is a positive, finite build-time constant;
* per-axis scales only on constant weights, along the output-channel axis as stored
  (MatMul B ``[K, N]`` → ``axis=1``; Gemm ``transB=1`` → ``axis=0``); activations per tensor;
* Q/DQ on the inputs of weighted ops, none on their outputs;
* no op TensorRT's parser rejects (``DynamicQuantizeLinear``, ``QLinearMatMul``, ``MatMulInteger``, any
  ``com.microsoft`` op).

:func:`check_tensorrt_rules` returns the violations as data; the report lists them.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from ..ir.graph import Graph

__all__ = ["check_tensorrt_rules", "REJECTED_BY_TENSORRT"]

logger = logging.getLogger(__name__)

REJECTED_BY_TENSORRT = {"DynamicQuantizeLinear", "QLinearMatMul", "MatMulInteger", "ConvInteger", "MatMulIntegerToFloat"}
WEIGHTED = {"MatMul", "Gemm", "Conv"}


def check_tensorrt_rules(graph: Graph) -> list:
    """Violations of TensorRT's explicit-quantization rules, each ``{node, rule}``."""
    problems = []
    for node in graph.gs.nodes:
        if node.op in REJECTED_BY_TENSORRT or (node.domain or "") not in ("", "ai.onnx", "trt", "trt_plugins"):
            problems.append({"node": node.name, "rule": f"op {node.domain + '.' if node.domain else ''}{node.op} is rejected by the TensorRT parser"})
            continue
        if node.op not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        scale = node.inputs[1]
        if not isinstance(scale, gs.Constant):
            problems.append({"node": node.name, "rule": "scale is not a build-time constant"})
            continue
        s = np.asarray(scale.values)
        if not np.all(np.isfinite(s)) or not np.all(s > 0):
            problems.append({"node": node.name, "rule": "scale must be positive and finite"})
        if len(node.inputs) > 2 and isinstance(node.inputs[2], gs.Constant) and np.any(np.asarray(node.inputs[2].values) != 0):
            problems.append({"node": node.name, "rule": "zero point must be 0 (symmetric only)"})
        if len(node.inputs) > 2 and isinstance(node.inputs[2], gs.Constant) and np.asarray(node.inputs[2].values).dtype == np.uint8:
            problems.append({"node": node.name, "rule": "UINT8 quantization is only allowed at network inputs/outputs"})
        if s.ndim > 0 and s.size > 1:
            if node.op == "QuantizeLinear" or not isinstance(node.inputs[0], gs.Constant):
                problems.append({"node": node.name, "rule": "per-channel scales are only allowed on constant weights"})
            else:
                problems.extend(_check_weight_axis(node))
        producer = Graph.producer(node.inputs[0]) if node.op == "QuantizeLinear" else None
        if producer is not None and _weighted(graph, producer) and all(c.op == "QuantizeLinear" for c in node.inputs[0].outputs):
            problems.append({"node": node.name, "rule": f"quantizes the output of weighted op {producer.name}; TensorRT wants Q/DQ on inputs"})
    return problems


def _weighted(graph: Graph, node: gs.Node) -> bool:
    """A MatMul/Gemm/Conv whose second input is a constant weight (possibly behind DequantizeLinear)."""
    return node.op in WEIGHTED and len(node.inputs) > 1 and graph.constant_through(node.inputs[1]) is not None


def _check_weight_axis(dq: gs.Node) -> list:
    axis = dq.attrs.get("axis", 1)
    block = dq.attrs.get("block_size", 0)
    out = []
    for consumer in dq.outputs[0].outputs:
        if consumer.op == "MatMul" and consumer.inputs[1] is dq.outputs[0]:
            want = 0 if block else 1
            if axis % 2 != want:
                out.append({"node": dq.name, "rule": f"MatMul weight scales must be on axis {want}, found {axis}"})
        elif consumer.op == "Gemm" and consumer.inputs[1] is dq.outputs[0]:
            want = 0 if consumer.attrs.get("transB", 0) else 1
            if not block and axis % 2 != want:
                out.append({"node": dq.name, "rule": f"Gemm weight scales must be on axis {want}, found {axis}"})
    return out
