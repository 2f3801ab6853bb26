"""One ONNX Runtime model with a prefill kernel and a decode kernel (``--w4a8-kernel hybrid``).

On CPU no single ONNX Runtime kernel is fast at both phases of a W4A8 decoder (measured on an AVX-512 VNNI
CPU, SmolLM2-135M): ``MatMulIntegerToFloat`` on INT8 weights runs a 128-token prompt 1.6× faster than
``MatMulNBits`` at accuracy level 4, while at one token per step its per-token quantization ops (seven nodes
a linear instead of one) make decoding 30 % slower than ``MatMulNBits``, which reads 4-bit weights and
quantizes the activations inside the kernel. The hybrid model holds both lowerings of the same compiled graph
and an ``If`` on the number of new tokens: more than one (a prompt, or a chunk of one) runs the prefill
lowering, one runs the decode lowering. Weights the two share (embedding, head, norms) are stored once; the
linears are stored twice (4-bit and 8-bit), so the file is larger than either lowering alone. Each branch is a
lowering llmq verifies on its own.

The two lowerings are combined as ONNX protos in memory, so the hybrid is written for models whose combined
weights stay under 2 GB (protobuf's limit); larger models are refused with that reason.
"""

from __future__ import annotations

import hashlib

import numpy as np
import onnx
from onnx import helper, numpy_helper

__all__ = ["combine_prefill_decode", "HYBRID_LIMIT", "DECODE_PREFIX"]

HYBRID_LIMIT = (2 << 30) - (64 << 20)  # bytes of weights one in-memory ONNX proto can hold, with room for the graph
DECODE_PREFIX = "decode/"


def _content(t: onnx.TensorProto) -> tuple:
    body = t.raw_data if t.raw_data else t.SerializeToString()
    return t.data_type, tuple(t.dims), hashlib.sha256(body).hexdigest()


def _branch(model: onnx.ModelProto, rename: dict, name: str) -> onnx.GraphProto:
    nodes = []
    for n in model.graph.node:
        m = onnx.NodeProto()
        m.CopyFrom(n)
        m.name = name + "/" + n.name
        for i, x in enumerate(m.input):
            m.input[i] = rename.get(x, x)
        for i, x in enumerate(m.output):
            m.output[i] = rename.get(x, x)
        nodes.append(m)
    outputs = []
    for o in model.graph.output:
        v = onnx.ValueInfoProto()
        v.CopyFrom(o)
        v.name = rename.get(o.name, o.name)
        outputs.append(v)
    return helper.make_graph(nodes, name, [], outputs)


def combine_prefill_decode(prefill: onnx.ModelProto, decode: onnx.ModelProto, tokens_input: str = "input_ids") -> onnx.ModelProto:
    """``If(new tokens > 1, prefill's graph, decode's graph)`` as one model (both with their weights in memory,
    the same inputs and outputs). Initializers with equal contents are kept once (the prefill's name); the
    decode graph's other initializers and all its intermediate values get :data:`DECODE_PREFIX`, so nothing of
    one branch shadows the other. The outer graph holds every initializer (the branches read them from the
    enclosing scope). Deterministic: the same two models give the same bytes."""
    names = [i.name for i in prefill.graph.input]
    if names != [i.name for i in decode.graph.input] or [o.name for o in prefill.graph.output] != [o.name for o in decode.graph.output]:
        raise ValueError("the prefill and decode lowerings must have the same inputs and outputs")
    if tokens_input not in names:
        raise ValueError(f"no '{tokens_input}' input to count the new tokens of")
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for m in (prefill, decode)
           for n in m.graph.node for a in n.attribute):
        raise ValueError("a lowering has nodes with subgraphs of their own")
    graph_inputs = set(names)
    kept = {_content(t): t.name for t in prefill.graph.initializer}
    initializers = list(prefill.graph.initializer)
    rename = {}
    for t in decode.graph.initializer:
        same = kept.get(_content(t))
        if same is not None:
            rename[t.name] = same
            continue
        rename[t.name] = DECODE_PREFIX + t.name
        copy = onnx.TensorProto()
        copy.CopyFrom(t)
        copy.name = rename[t.name]
        initializers.append(copy)
    for n in decode.graph.node:
        for o in n.output:
            if o and o not in graph_inputs:
                rename[o] = DECODE_PREFIX + o
    then_branch = _branch(prefill, {}, "prefill")
    else_branch = _branch(decode, rename, "decode")
    count, one, cond = "hybrid/new_tokens", "hybrid/one", "hybrid/prompt"
    nodes = [helper.make_node("Shape", [tokens_input], [count + "_shape"], name="hybrid/Shape", start=1, end=2),
             helper.make_node("Greater", [count + "_shape", one], [cond + "_1d"], name="hybrid/Greater"),
             helper.make_node("Squeeze", [cond + "_1d"], [cond], name="hybrid/Squeeze"),
             helper.make_node("If", [cond], [o.name for o in prefill.graph.output], name="hybrid/If",
                              then_branch=then_branch, else_branch=else_branch)]
    initializers.append(numpy_helper.from_array(np.asarray([1], np.int64), one))
    graph = helper.make_graph(nodes, prefill.graph.name, list(prefill.graph.input), list(prefill.graph.output), initializers)
    opsets = {}
    for o in list(prefill.opset_import) + list(decode.opset_import):
        opsets[o.domain] = max(opsets.get(o.domain, 0), o.version)
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid(d, v) for d, v in sorted(opsets.items())],
                              ir_version=max(prefill.ir_version, decode.ir_version))
    model.producer_name, model.producer_version = decode.producer_name, decode.producer_version
    for p in decode.metadata_props:
        model.metadata_props.add(key=p.key, value=p.value)
    return model
