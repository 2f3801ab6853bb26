"""Running a bfloat16 model on CPU: ONNX Runtime's CPU provider has no bfloat16 kernels for most ops (``Mul``,
``MatMul``, ``Softmax`` …), so a bfloat16 model is *evaluated* through a documented up-cast: every bfloat16
initializer, ``Constant``, ``Cast`` target and declared tensor type becomes float32. The weights keep their
bfloat16 values exactly (bf16 → fp32 is exact); only the arithmetic is wider than a bfloat16 runtime's, so a
perplexity measured this way is that of the bf16 weights with fp32 arithmetic. Float16 models run as they are
(ONNX Runtime's CPU provider has float16 kernels for the ops LLM exports use).

The up-cast is for running only: the compiled model written to disk keeps its bfloat16 types.

INT8 GEMMs on x86: ONNX Runtime's fast u8 × s8 kernel sums pairs of products in 16 bits with saturation on CPUs
without VNNI (AVX2, AVX-512 without VNNI; measured on AVX2: 17 % relative error on a 576 × 256 layer with
full-range weights). :func:`int8_dot_saturates` tells whether this CPU is one; llmq's sessions then set
``session.x64quantprecision=1`` (:func:`quant_precision_entries`), with which ONNX Runtime converts constant
int8 weights to uint8 (u8 × u8, exact). On a VNNI CPU that option would only slow the GEMMs (measured on an
AVX-512 VNNI CPU: u8 × s8 743 GOP/s, u8 × u8 314), so it is left unset there.
"""

from __future__ import annotations

import contextlib
import functools
import os
import platform
import tempfile

import numpy as np
import onnx
from onnx import numpy_helper

__all__ = ["has_bfloat16", "upcast_bfloat16", "upcast_for_cpu", "cpu_session", "int8_dot_saturates",
           "quant_precision_entries"]

BF16, FP32 = onnx.TensorProto.BFLOAT16, onnx.TensorProto.FLOAT


def has_bfloat16(model: onnx.ModelProto) -> bool:
    """Whether any initializer, graph input or output of ``model`` is bfloat16 (its data need not be loaded)."""
    g = model.graph
    return (any(t.data_type == BF16 for t in g.initializer)
            or any(v.type.tensor_type.elem_type == BF16 for v in list(g.input) + list(g.output)))


def _tensor(t: onnx.TensorProto) -> onnx.TensorProto:
    out = numpy_helper.from_array(numpy_helper.to_array(t).astype(np.float32), t.name)
    return out


def _graph(g: onnx.GraphProto) -> int:
    changed = 0
    for i, t in enumerate(g.initializer):
        if t.data_type == BF16:
            g.initializer[i].CopyFrom(_tensor(t))
            changed += 1
    for v in list(g.input) + list(g.output) + list(g.value_info):
        if v.type.tensor_type.elem_type == BF16:
            v.type.tensor_type.elem_type = FP32
            changed += 1
    for node in g.node:
        for attr in node.attribute:
            if attr.name == "to" and node.op_type == "Cast" and attr.i == BF16:
                attr.i = FP32
                changed += 1
            elif attr.type == onnx.AttributeProto.TENSOR and attr.t.data_type == BF16:
                attr.t.CopyFrom(_tensor(attr.t))
                changed += 1
            elif attr.type == onnx.AttributeProto.GRAPH:
                changed += _graph(attr.g)
            elif attr.type == onnx.AttributeProto.GRAPHS:
                changed += sum(_graph(sub) for sub in attr.graphs)
    return changed


def upcast_bfloat16(model: onnx.ModelProto) -> int:
    """Rewrite ``model`` (weights loaded) in place so every bfloat16 tensor is float32; returns how many
    tensors, types and attributes changed (0: the model had no bfloat16)."""
    return _graph(model.graph)


@contextlib.contextmanager
def upcast_for_cpu(source):
    """``source`` (a path, serialized bytes or a ModelProto) as something ONNX Runtime can load after the
    bfloat16 up-cast: yields serialized bytes, or a temporary path (external data) for a model over 2 GB,
    valid inside the ``with``; yields None when the model has no bfloat16."""
    if isinstance(source, (str, os.PathLike)):
        model = onnx.load(str(source), load_external_data=False)
        if not has_bfloat16(model):
            yield None
            return
        from onnx import external_data_helper

        external_data_helper.load_external_data_for_model(model, os.path.dirname(os.path.abspath(str(source))))
    elif isinstance(source, (bytes, bytearray)):
        model = onnx.load_from_string(bytes(source))
    else:
        model = onnx.ModelProto()
        model.CopyFrom(source)
    if not upcast_bfloat16(model):
        yield None
        return
    try:
        yield model.SerializeToString()
        return
    except ValueError:  # over protobuf's 2 GB: through a file with external data
        pass
    with tempfile.TemporaryDirectory(prefix="llmq-upcast-") as tmp:
        path = os.path.join(tmp, "model.onnx")
        onnx.save_model(model, path, save_as_external_data=True, location="model.onnx.data", size_threshold=1024)
        del model
        yield path


VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})  # /proc/cpuinfo names of the int8 dot products


@functools.lru_cache(maxsize=None)
def int8_dot_saturates(cpuinfo: str = "/proc/cpuinfo") -> bool:
    """True on an x86 CPU without VNNI (ONNX Runtime's u8 × s8 GEMM saturates there), and on an x86 CPU whose
    flags cannot be read (the exact choice); False elsewhere (ARM's dot products are exact)."""
    if platform.machine().lower() not in ("x86_64", "amd64", "i386", "i686", "x86"):
        return False
    try:
        with open(cpuinfo) as fh:
            for line in fh:
                if line.startswith("flags"):
                    return not VNNI_FLAGS & set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return True


def quant_precision_entries() -> list:
    """The session config entries that keep INT8 GEMMs exact on this CPU (see the module's docstring)."""
    return [("session.x64quantprecision", "1")] if int8_dot_saturates() else []


def cpu_session(source, options, providers=("CPUExecutionProvider",)):
    """An ONNX Runtime session for ``source`` (path or bytes); a model ONNX Runtime cannot run because it lacks
    bfloat16 kernels is run through :func:`upcast_for_cpu` instead (the caller can tell from
    ``session.llmq_upcast``)."""
    import onnxruntime as ort

    try:
        session = ort.InferenceSession(source, options, providers=list(providers))
        session.llmq_upcast = False
        return session
    except Exception as first:
        with upcast_for_cpu(source) as runnable:
            if runnable is None:
                raise first
            session = ort.InferenceSession(runnable, options, providers=list(providers))
    session.llmq_upcast = True
    return session
