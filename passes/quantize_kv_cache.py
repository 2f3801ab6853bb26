"""KV-cache quantization: Q/DQ on the keys and values where they enter attention.

``Q/DQ`` is placed on the second input of the score MatMul (``Q·Kᵀ``: the keys after RoPE) and of the context
MatMul (``P·V``: the values) — the tensors a KV cache stores, and where TensorRT's fused attention takes its
quantized inputs. Whatever layout ops (repeat-kv for GQA, transposes) sit between the cache and the MatMul
copy values without changing them, so quantizing here is quantizing the cache; under GQA the repeated heads
carry identical values, so per-head scales stay shared by the query heads of a group.

Granularity: ``per-tensor`` (INT8, symmetric — TensorRT-deployable) or ``per-head`` (one scale per head on
axis 1 of the ``[batch, heads, ·, ·]`` tensor; INT8 or INT4, for ONNX Runtime: TensorRT takes per-tensor
activation scales only). Scales come from calibration statistics (the observer's range for per-tensor, the
per-head max for per-head). Run after ``smooth-attention``, which shrinks the keys' outlier channels first.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import ml_dtypes
import numpy as np
import onnx_graphsurgeon as gs

from ..calib.observers import OBSERVERS, amax
from ..ir.graph import Graph
from ..ir.passes import Pass, PassContext, PassResult
from .qdq_math import qmax, representable_scale

__all__ = ["QuantizeKVCachePass"]

logger = logging.getLogger(__name__)


class QuantizeKVCachePass(Pass):
    """Fake-quantize (explicit Q/DQ) the key and value inputs of every attention block found.

    Declines: blocks whose key/value input is already quantized, excluded layers (``layers.N.attn``),
    tensors with a zero calibrated range, per-head on a tensor that is not 4-D.
    """

    name = "quantize-kv-cache"
    phase = "quantize"
    changes_activations = True
    requires_stats = True

    @dataclass(frozen=True)
    class Options:
        bits: int = 8
        granularity: str = "per-tensor"
        observer: str = "minmax"  # per-tensor only; per-head uses each head's max
        tensors: tuple = ("k", "v")

        def __post_init__(self):
            object.__setattr__(self, "tensors", tuple(self.tensors))
            if self.bits not in (4, 8):
                raise ValueError("KV-cache bits must be 8 or 4")
            if self.granularity not in ("per-tensor", "per-head"):
                raise ValueError("KV-cache granularity must be per-tensor or per-head")
            if self.bits == 4 and self.granularity != "per-head":
                raise ValueError("4-bit KV cache needs granularity: per-head")
            if self.observer not in OBSERVERS:
                raise ValueError(f"observer must be one of {', '.join(OBSERVERS)}")
            if not self.tensors or set(self.tensors) - {"k", "v"}:
                raise ValueError("tensors must be a subset of [k, v]")

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        o = self.options
        nodes = graph.node_by_name()
        targets = []  # (where, which, MatMul node)
        for block in ctx.structure(graph).attention:
            where = f"layers.{block['layer']}.attn"
            if ctx.exclude(where, block["scores"]):
                ctx.decline(self.name, where, "excluded by --exclude")
                continue
            for which, key in (("k", "scores"), ("v", "context")):
                if which not in o.tensors:
                    continue
                mm = nodes[block[key]]
                producer = Graph.producer(mm.inputs[1])
                if producer is not None and producer.op == "DequantizeLinear":
                    ctx.decline(self.name, f"{where}.{which}", "already quantized")
                    continue
                targets.append((where, which, mm))
        if not targets:
            return PassResult(False, {"quantized_tensors": 0})
        stats = ctx.activation_stats(graph, sorted({mm.inputs[1].name for _, _, mm in targets}))
        done = 0
        for where, which, mm in targets:
            x = mm.inputs[1]
            st = stats[x.name]
            if o.granularity == "per-head":
                if st.head_absmax is None:
                    ctx.decline(self.name, f"{where}.{which}", "per-head needs a 4-D [batch, heads, ., .] tensor")
                    continue
                scale = (np.where(st.head_absmax > 0, st.head_absmax, 1.0) / qmax(o.bits)).astype(np.float32)
                rng = float(st.head_absmax.max())
            else:
                rng = amax(st, o.observer, qmax(o.bits))
                scale = np.asarray(rng / qmax(o.bits), np.float32)
            if rng <= 0.0:
                ctx.decline(self.name, f"{where}.{which}", "calibrated range is zero")
                continue
            mm.inputs[1] = self._qdq(graph, x, scale, f"{where}.{which}_cache")
            ctx.record(where, **{f"kv_{which}_bits": o.bits, f"kv_{which}_granularity": o.granularity,
                                 f"kv_{which}_amax": rng,
                                 f"kv_{which}_head_amax": [float(v) for v in np.atleast_1d(st.head_absmax)]
                                 if st.head_absmax is not None else None})
            done += 1
        return PassResult(done > 0, {"quantized_tensors": done, "bits": o.bits, "granularity": o.granularity})

    def _qdq(self, graph: Graph, x: gs.Tensor, scale: np.ndarray, base: str) -> gs.Variable:
        bits = self.options.bits
        if bits == 4:  # the zero point's type names the quantized type
            zp = graph.make_constant(f"{base}_zero_point", np.zeros(scale.shape, ml_dtypes.int4), self.name)
            qtype = None  # INT4: left to shape inference (onnx-graphsurgeon has no 4-bit numpy type)
        else:
            zp = graph.make_constant(f"{base}_zero_point", np.zeros(scale.shape, np.int8), self.name)
            qtype = np.int8
        s = graph.make_constant(f"{base}_scale", representable_scale(scale, graph.float_dtype), self.name)
        attrs = {"axis": 1} if scale.ndim else {}
        q = graph.make_node("QuantizeLinear", [x, s, zp], f"{base}_q", self.name, attrs, out_dtype=qtype,
                            out_shape=x.shape if qtype is not None else None)
        return graph.make_node("DequantizeLinear", [q, s, zp], f"{base}_dq", self.name, attrs,
                               out_dtype=np.float32, out_shape=x.shape)
