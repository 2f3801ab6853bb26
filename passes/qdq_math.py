"""Symmetric integer quantization and the Q/DQ node builders the quantize passes share.

Symmetric, zero point 0 (TensorRT accepts no other): ``scale = amax / qmax``, ``q = clip(round(x / scale),
-qmax, qmax)`` with round-half-to-even, as ONNX ``QuantizeLinear`` rounds. Weights use the narrow range
``±(2^(b-1) − 1)``; activations saturate to ``[-2^(b-1), 2^(b-1) − 1]`` like ``QuantizeLinear``.
"""

from __future__ import annotations

import numpy as np
import onnx_graphsurgeon as gs

from ..ir.graph import Graph

__all__ = ["qmax", "weight_scales", "quantize", "fake_quant", "sqnr_db", "add_dequantize", "add_qdq_pair"]

TINY = np.float32(1e-12)


def qmax(bits: int) -> int:
    return 2 ** (bits - 1) - 1


def weight_scales(w: np.ndarray, axis: int | None, bits: int) -> np.ndarray:
    """Per-channel (``axis`` = the output-channel axis) or per-tensor (``axis`` None) positive scales."""
    a = np.abs(w.astype(np.float32))
    if axis is None:
        amax = np.asarray(a.max(), dtype=np.float32)
    else:
        amax = a.max(axis=tuple(i for i in range(w.ndim) if i != axis))
    amax = np.where(amax > 0, amax, np.float32(1.0))  # an all-zero channel: any positive scale is exact
    return (amax / np.float32(qmax(bits))).astype(np.float32)


def _broadcast(scale: np.ndarray, ndim: int, axis: int | None) -> np.ndarray:
    if axis is None or scale.ndim == 0:
        return scale
    shape = [1] * ndim
    shape[axis] = -1
    return scale.reshape(shape)


def quantize(x: np.ndarray, scale: np.ndarray, axis: int | None, bits: int, narrow: bool = True) -> np.ndarray:
    lo = -qmax(bits) if narrow else -qmax(bits) - 1
    q = np.rint(x.astype(np.float32) / _broadcast(scale, x.ndim, axis))
    return np.clip(q, lo, qmax(bits)).astype(np.int8 if bits <= 8 else np.int32)


def fake_quant(x: np.ndarray, scale, axis: int | None, bits: int, narrow: bool = True) -> np.ndarray:
    scale = np.asarray(scale, dtype=np.float32)
    return quantize(x, scale, axis, bits, narrow).astype(np.float32) * _broadcast(scale, x.ndim, axis)


def sqnr_db(reference: np.ndarray, approx: np.ndarray) -> float:
    """Signal-to-quantization-noise ratio in dB: ``10·log10(Σ y² / Σ (y − ŷ)²)``."""
    ref = reference.astype(np.float64)
    noise = float(np.sum((ref - approx.astype(np.float64)) ** 2))
    signal = float(np.sum(ref ** 2))
    if noise == 0.0:
        return float("inf")
    return 10.0 * np.log10(max(signal, 1e-300) / noise)


def add_dequantize(graph: Graph, q_const: gs.Constant, scale: np.ndarray, axis: int | None,
                   pass_name: str, base: str) -> gs.Variable:
    """``DequantizeLinear(q, scale, 0)`` of a constant; returns the float output."""
    zp = np.zeros(scale.shape, dtype=q_const.values.dtype)
    inputs = [q_const, graph.make_constant(f"{base}_scale", scale.astype(np.float32), pass_name),
              graph.make_constant(f"{base}_zero_point", zp, pass_name)]
    attrs = {"axis": int(axis)} if axis is not None and scale.ndim > 0 else {}
    return graph.make_node("DequantizeLinear", inputs, f"{base}_dq", pass_name, attrs,
                           out_dtype=np.float32, out_shape=list(q_const.shape))


def add_qdq_pair(graph: Graph, x: gs.Tensor, scale: float, pass_name: str, base: str, consumers: int = 1) -> list:
    """One ``QuantizeLinear(x, scale, int8 0)`` and ``consumers`` DequantizeLinear nodes reading it.

    Each consumer gets its own DQ: ONNX Runtime fuses a DQ into an integer kernel only when the DQ
    feeds a single node (TensorRT accepts either form). Returns the DQ outputs.
    """
    s = graph.make_constant(f"{base}_scale", np.asarray(scale, dtype=np.float32), pass_name)
    z = graph.make_constant(f"{base}_zero_point", np.asarray(0, dtype=np.int8), pass_name)
    q = graph.make_node("QuantizeLinear", [x, s, z], f"{base}_q", pass_name, out_dtype=np.int8, out_shape=x.shape)
    return [graph.make_node("DequantizeLinear", [q, s, z], f"{base}_dq", pass_name, out_dtype=np.float32,
                            out_shape=x.shape) for _ in range(consumers)]
