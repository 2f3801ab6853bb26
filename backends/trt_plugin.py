"""llmq's TensorRT plugin for QServe's W4A8 GEMM: INT4 weights widened to INT8, per-token INT8 activations.

TensorRT has no kernel for W4A8 with INT8 activations (its INT4 is weight-only, its activation scales are
build-time constants: no per-token scale), so the ``tensorrt`` backend replaces each ``w4a8`` linear — the
portable ``MatMul(per-token Q/DQ(x), Mul(DQ(uint4 codes, s2, z), s1))`` — by one plugin node::

    y = llmq.W4A8Gemm(x, codes, group_scales, zeros, channel_scales)   group_size=G, plugin_namespace="llmq",
                                                                       plugin_version="1"

* ``x``: the activation, the model's float type, ``[..., K]`` (no Q/DQ before it: the plugin quantizes per token);
* ``codes``: INT8 ``[N, K/2]``, the UINT4 codes of output channel ``n`` along K, two per byte, the first in the
  low nibble;
* ``group_scales``: INT8 ``[N, K/G]``, the integer level-2 scales ``s2`` (1…16);
* ``zeros``: INT8 ``[N, ⌈K/G/2⌉]``, the UINT4 zero points, packed as the codes;
* ``channel_scales``: the model's float type, ``[N]``, the level-1 scales ``s1``.

Bytes are stored as INT8 (their bits): TensorRT's ONNX parser widens a UINT8 constant to INT32. What the plugin
computes is what the Q/DQ graph computes (:func:`reference`): per token ``s_t = max|x_t| / 127``,
``q_t = round(x_t / s_t)`` (half to even), ``w8 = (code − zero)·s2`` (exact INT8), ``y = (q_t · w8ᵀ)·s_t·s1`` with
int32 accumulation. The node follows TensorRT's registry lookup (op type = plugin name, ``plugin_namespace``,
``plugin_version``; REFERENCE §1); its implementation (:func:`register`) is written against TensorRT's
``tensorrt.plugin`` API (10.6+) and runs the GEMM with torch on the GPU (``torch._int_mm``). **It has never run:
no GPU and no TensorRT where llmq is developed.** Its arithmetic, :func:`w4a8_gemm_torch`, is tested on the CPU
against the Q/DQ model; a model with plugin nodes is verified through :func:`llmq.expand.expand_plugins`, which
rebuilds each node's ONNX definition from the node's own packed inputs.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..ir.graph import Graph
from ..ir.passes import Pass, PassContext, PassResult
from ..ir.storage import peek
from .ort_lowering import (_per_token_qdq, _progressive_weight, _replace_with_contrib_op, lower_each_matmul, pack_nibbles,
                           unpack_nibbles, widen_progressive)

__all__ = ["OP", "DOMAIN", "pack", "unpack", "reference", "w4a8_gemm_torch", "LowerW4A8ToPluginPass",
           "has_plugins", "is_plugin", "register", "plugin_available"]

logger = logging.getLogger(__name__)

OP, DOMAIN, NAMESPACE, VERSION = "W4A8Gemm", "llmq", "llmq", "1"


def pack(q: np.ndarray, s2: np.ndarray, z: np.ndarray) -> tuple:
    """Progressive weight parts in MatMul's layout (``q`` uint4 ``[K, N]``, ``s2`` uint8 / ``z`` uint4 ``[K/G, N]``)
    → the plugin's ``(codes, group_scales, zeros)`` as INT8 bytes."""
    codes = pack_nibbles(q.astype(np.uint8).T).view(np.int8)
    scales = np.ascontiguousarray(s2.astype(np.uint8).T).view(np.int8)
    zeros = pack_nibbles(z.astype(np.uint8).T).view(np.int8)
    return codes, scales, zeros


def unpack(codes: np.ndarray, scales: np.ndarray, zeros: np.ndarray, k: int, group: int) -> tuple:
    """Inverse of :func:`pack`: uint8 ``(q [K, N], s2 [K/G, N], z [K/G, N])``."""
    q = unpack_nibbles(codes, k).T
    s2 = np.ascontiguousarray(scales).view(np.uint8).T
    z = unpack_nibbles(zeros, k // group).T
    return np.ascontiguousarray(q), np.ascontiguousarray(s2), np.ascontiguousarray(z)


def _int8_weight(codes, scales, zeros, k: int, group: int) -> np.ndarray:
    """``(code − zero)·s2`` as int16 ``[K, N]``."""
    q, s2, z = unpack(codes, scales, zeros, k, group)
    return widen_progressive(q, z, s2, group)


def reference(x: np.ndarray, codes, scales, zeros, s1: np.ndarray, group: int) -> np.ndarray:
    """The plugin's output in numpy (float64 sums of integers: exact), float32."""
    k = x.shape[-1]
    x2 = x.reshape(-1, k).astype(np.float32)
    s_t = np.abs(x2).max(axis=1, keepdims=True) / np.float32(127)
    s_t = np.where(s_t > 0, s_t, np.float32(1))
    q_t = np.clip(np.rint(x2 / s_t), -128, 127)
    acc = q_t.astype(np.float64) @ _int8_weight(codes, scales, zeros, k, group).astype(np.float64)
    y = (acc * s_t).astype(np.float32) * np.asarray(s1, np.float32).reshape(1, -1)
    return y.reshape(*x.shape[:-1], -1)


def w4a8_gemm_torch(x, codes, scales, zeros, s1, group: int):
    """The plugin's arithmetic in torch, on the tensors' device: the codes widened to the INT8 weight, per-token
    INT8 activations, an int32 GEMM (``torch._int_mm`` on CUDA, int64 matmul elsewhere), the float epilogue.
    Returns the output in ``x``'s dtype."""
    import torch

    k = x.shape[-1]
    n = codes.shape[0]
    u = codes.view(torch.uint8) if codes.dtype == torch.int8 else codes
    q = torch.stack([u & 0x0F, u >> 4], dim=-1).reshape(n, -1)[:, :k].to(torch.int16)
    zu = zeros.view(torch.uint8) if zeros.dtype == torch.int8 else zeros
    z = torch.stack([zu & 0x0F, zu >> 4], dim=-1).reshape(n, -1)[:, :k // group].to(torch.int16)
    s2 = (scales.view(torch.uint8) if scales.dtype == torch.int8 else scales).to(torch.int16)
    w8 = ((q - z.repeat_interleave(group, dim=1)) * s2.repeat_interleave(group, dim=1)).to(torch.int8)  # [N, K]
    x2 = x.reshape(-1, k).float()
    s_t = x2.abs().amax(dim=1, keepdim=True) / 127.0
    s_t = torch.where(s_t > 0, s_t, torch.ones_like(s_t))
    q_t = torch.clamp(torch.round(x2 / s_t), -128, 127).to(torch.int8)
    m = q_t.shape[0]
    if q_t.is_cuda:  # cuBLAS int8 GEMM: rows padded past 16, as torch._int_mm requires
        pad = max(0, 17 - m)
        acc = torch._int_mm(torch.nn.functional.pad(q_t, (0, 0, 0, pad)), w8.t().contiguous())[:m]
    else:
        acc = q_t.to(torch.int64) @ w8.t().to(torch.int64)
    y = acc.double() * s_t.double()
    y = y.float() * s1.reshape(1, -1).float()
    return y.reshape(*x.shape[:-1], n).to(x.dtype)


class LowerW4A8ToPluginPass(Pass):
    """Replace each ``w4a8`` linear (per-token INT8 Q/DQ activation, progressive INT4 weight in MatMul's layout)
    by one ``llmq.W4A8Gemm`` plugin node (exact repacking; see the module). Declines nothing silently: linears of
    any other form stay as they are (Q/DQ that TensorRT builds natively, or float)."""

    name = "lower-w4a8-plugin"
    phase = "lower"
    changes_activations = False

    @dataclass(frozen=True)
    class Options:
        pass

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        def lower(node: gs.Node):
            act, weight = _per_token_qdq(node.inputs[0]), _progressive_weight(node.inputs[1])
            if act is None or weight is None:
                return None
            (x, _), (w, s2, z, s1, block) = act, weight
            codes, scales, zeros = pack(peek(w), np.asarray(peek(s2), np.float32).astype(np.uint8), peek(z))
            inputs = [x] + [graph.make_constant(f"{node.name}_w4a8_{what}", v, self.name)
                            for what, v in (("codes", codes), ("group_scales", scales), ("zeros", zeros))] + [s1]
            _replace_with_contrib_op(graph, node, OP, inputs, {"group_size": int(block), "plugin_namespace": NAMESPACE,
                                                               "plugin_version": VERSION}, self.name, domain=DOMAIN)
            return codes.nbytes + scales.nbytes + zeros.nbytes

        stats = lower_each_matmul(graph, ctx, lower)
        return PassResult(stats["lowered"] > 0, {**stats, "plugin": f"{NAMESPACE}::{OP} v{VERSION}"})


def is_plugin(op: str, domain: str) -> bool:
    """Whether a node of this op type and domain is llmq's W4A8 plugin node (a proto's ``op_type`` or a
    graph-surgeon node's ``op``)."""
    return op == OP and domain == DOMAIN


def has_plugins(model: onnx.ModelProto) -> bool:
    return any(is_plugin(n.op_type, n.domain) for n in model.graph.node)


def plugin_available() -> str | None:
    """None when ``tensorrt.plugin`` can register llmq's plugin here, else the reason it cannot."""
    try:
        import tensorrt  # noqa: F401
        import tensorrt.plugin  # noqa: F401
    except ImportError as e:
        return f"TensorRT's Python plugin API is not available ({e}; needs tensorrt >= 10.6 with a GPU)"
    return None


_REGISTERED: list = []


def register() -> None:
    """Register ``llmq::W4A8Gemm`` with TensorRT's plugin registry (before parsing a model that uses it).
    Written against the documented ``tensorrt.plugin`` API (10.6+): a shape/type descriptor and a JIT
    implementation that runs :func:`w4a8_gemm_torch` on the plugin's CUDA stream. Never run here."""
    if _REGISTERED:
        return
    reason = plugin_available()
    if reason:
        from ..ir.errors import LlmqError

        raise LlmqError(f"cannot register the llmq::W4A8Gemm TensorRT plugin: {reason}")
    import tensorrt as trt
    import tensorrt.plugin as trtp

    @trtp.register(f"{NAMESPACE}::{OP}")
    def _desc(x: trtp.TensorDesc, codes: trtp.TensorDesc, group_scales: trtp.TensorDesc, zeros: trtp.TensorDesc,
              channel_scales: trtp.TensorDesc, group_size: int) -> trtp.TensorDesc:
        n = codes.shape_expr[0]
        dims = tuple(x.shape_expr[i] for i in range(x.ndim - 1)) + (n,)
        return trtp.from_shape_expr(dims, dtype=x.dtype)

    @trtp.impl(f"{NAMESPACE}::{OP}")
    def _impl(x: trtp.Tensor, codes: trtp.Tensor, group_scales: trtp.Tensor, zeros: trtp.Tensor,
              channel_scales: trtp.Tensor, group_size: int, outputs, stream: int) -> None:
        import torch

        with torch.cuda.stream(torch.cuda.ExternalStream(stream)):
            args = [torch.as_tensor(t, device="cuda") for t in (x, codes, group_scales, zeros, channel_scales)]
            y = torch.as_tensor(outputs[0], device="cuda")
            y.copy_(w4a8_gemm_torch(*args, group=group_size))

    _REGISTERED.append((trt, _desc, _impl))
