"""Portable explicit-quantization ONNX (the ``qdq`` backend) and its TensorRT rule check.

The rules (TensorRT 10.x explicit quantization, strongly typed; ``../shared/REFERENCE.md`` §1):

* every zero point is zero (symmetric only);
* every scale is a positive, finite build-time constant;
* per-axis scales only on constant weights, along the output-channel axis as stored
  (MatMul B ``[K, N]`` → ``axis=1``; Gemm ``transB=1`` → ``axis=0``); activations per tensor;
* Q/DQ on the inputs of weighted ops, none on their outputs;
* no op TensorRT's parser rejects (``DynamicQuantizeLinear``, ``QLinearMatMul``, ``MatMulInteger``, any
  ``com.microsoft`` op);
* FP8 is E4M3 only (FLOAT8E4M3FN; no E5M2 or the other float8 variants), per tensor on activations;
* INT4 is weight-only (no 4-bit activation or KV-cache Q/DQ), in blocks along K of 64 or 128 that divide K
  exactly (the parser infers the block from the scale's shape), with an even element count; never UINT4;
* a custom op is a TensorRT plugin: llmq's own (:data:`PLUGINS`) with the namespace, version, attributes and
  input types its creator expects; any other domain is rejected.

:func:`check_tensorrt_rules` returns the violations as data; the report lists them.
"""

from __future__ import annotations

import logging

import numpy as np
import onnx_graphsurgeon as gs

from ..ir.graph import Graph, dtype_name

__all__ = ["check_tensorrt_rules", "REJECTED_BY_TENSORRT", "PLUGINS"]

logger = logging.getLogger(__name__)

REJECTED_BY_TENSORRT = {"DynamicQuantizeLinear", "QLinearMatMul", "MatMulInteger", "ConvInteger", "MatMulIntegerToFloat"}
WEIGHTED = {"MatMul", "Gemm", "Conv"}
INT4_BLOCKS = (64, 128)  # the block sizes TensorRT's INT4 weight quantization supports
# llmq's TensorRT plugins by op type: the plugin_namespace / plugin_version attributes TensorRT's registry lookup
# takes, the integer attributes its creator reads, and the element types of its inputs (see backends.trt_plugin)
PLUGINS = {"W4A8Gemm": {"domain": "llmq", "namespace": "llmq", "version": "1", "int_attrs": ("group_size",),
                        "inputs": (None, "int8", "int8", "int8", None)}}


def check_tensorrt_rules(graph: Graph) -> list:
    """Violations of TensorRT's explicit-quantization rules, each ``{node, rule}``."""
    problems = []
    for node in graph.gs.nodes:
        if node.op in PLUGINS and (node.domain or "") == PLUGINS[node.op]["domain"]:
            problems.extend(_check_plugin(node))
            continue
        if node.op in REJECTED_BY_TENSORRT or (node.domain or "") not in ("", "ai.onnx", "trt", "trt_plugins"):
            problems.append({"node": node.name, "rule": f"op {node.domain + '.' if node.domain else ''}{node.op} is rejected by the TensorRT parser"})
            continue
        if node.op not in ("QuantizeLinear", "DequantizeLinear"):
            continue
        problems.extend(_check_types(node))
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


def _qtype(node: gs.Node) -> str | None:
    """The quantized element type of a Q/DQ node (its zero point's, or ``output_dtype``'s; INT8/UINT8 default)."""
    if len(node.inputs) > 2 and node.inputs[2].name:
        return dtype_name(node.inputs[2])
    if node.op == "DequantizeLinear" and isinstance(node.inputs[0], gs.Constant):
        return dtype_name(node.inputs[0])
    to = node.attrs.get("output_dtype")
    if to:
        import onnx

        return np.dtype(onnx.helper.tensor_dtype_to_np_dtype(to)).name
    return "uint8"


def _check_types(node: gs.Node) -> list:
    """FP8 E4M3 only; INT4 weight-only, signed, in blocks of 64 or 128 dividing K, an even element count."""
    kind = _qtype(node)
    out = []
    if kind and kind.startswith("float8") and kind != "float8_e4m3fn":
        out.append({"node": node.name, "rule": f"FP8 must be E4M3 (FLOAT8E4M3FN); {kind} is not a TensorRT type"})
    if kind in ("int4", "uint4"):
        data = node.inputs[0]
        if kind == "uint4":
            out.append({"node": node.name, "rule": "UINT4 is not a TensorRT type (INT4 weights are signed, zero point 0)"})
        if node.op == "QuantizeLinear" or not isinstance(data, gs.Constant):
            out.append({"node": node.name, "rule": "INT4 is weight-only in TensorRT (no 4-bit activation or KV-cache Q/DQ)"})
            return out
        shape = [int(d) for d in data.shape]
        block = int(node.attrs.get("block_size", 0))
        axis = int(node.attrs.get("axis", 1)) % max(len(shape), 1)
        if not block:
            out.append({"node": node.name, "rule": "INT4 weights need block (per-group) scales in TensorRT"})
        elif block not in INT4_BLOCKS or shape[axis] % block:
            out.append({"node": node.name, "rule": f"INT4 blocks must be {' or '.join(map(str, INT4_BLOCKS))} and divide "
                                                   f"K = {shape[axis]} exactly; found {block}"})
        if int(np.prod(shape)) % 2:
            out.append({"node": node.name, "rule": "INT4 weights need an even element count (two per byte)"})
    return out


def _check_plugin(node: gs.Node) -> list:
    """A llmq plugin node as TensorRT's registry lookup takes it: namespace and version attributes, the integer
    attributes its creator reads, and its weight inputs constant, of the types the plugin declares."""
    spec = PLUGINS[node.op]
    out = []
    for key, want in (("plugin_namespace", spec["namespace"]), ("plugin_version", spec["version"])):
        got = node.attrs.get(key)
        if isinstance(got, bytes):
            got = got.decode()
        if got != want:
            out.append({"node": node.name, "rule": f"plugin {node.op} needs attribute {key}={want!r}, found {got!r}"})
    for key in spec["int_attrs"]:
        if not isinstance(node.attrs.get(key), int) or node.attrs[key] <= 0:
            out.append({"node": node.name, "rule": f"plugin {node.op} needs a positive integer attribute {key}"})
    if len(node.inputs) != len(spec["inputs"]):
        return out + [{"node": node.name, "rule": f"plugin {node.op} takes {len(spec['inputs'])} inputs, found {len(node.inputs)}"}]
    for i, (tensor, want) in enumerate(zip(node.inputs, spec["inputs"])):
        if i and not isinstance(tensor, gs.Constant):
            out.append({"node": node.name, "rule": f"plugin {node.op} input {i} must be a build-time constant"})
        elif want and dtype_name(tensor) != want:
            out.append({"node": node.name, "rule": f"plugin {node.op} input {i} must be {want.upper()} "
                                                   f"(TensorRT widens UINT8 constants to INT32), found {dtype_name(tensor)}"})
    return out
