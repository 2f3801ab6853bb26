"""Lowering INT8 Q/DQ linears to ONNX Runtime's ``com.microsoft.MatMulIntegerToFloat``.

The portable graph computes ``Y = DQ(Q(X, s_a)) · DQ(W_q, s_w)``. ONNX Runtime fuses that pattern by itself
only when every DequantizeLinear feeds a single node; its common-subexpression elimination merges the
per-consumer DQs of a tensor read by several linears (q/k/v, gate/up), so those stay unfused float MatMuls
(measured on SmolLM2-135M: 60 of 210 linears fused). This pass writes the fused form explicitly:

    Y = MatMulIntegerToFloat(Q(X, s_a, 128 as uint8), W_q, s_a, s_w, 128)

which is exact: ``clip(round(X/s_a), −128, 127) + 128 = clip(round(X/s_a) + 128, 0, 255)`` and the kernel
subtracts the zero point before its int32 accumulation. The uint8 activation is what ONNX Runtime's CPU
kernels prefer (its own S8→U8 rewrite does the same). The weights stay int8: u8 × s8 is ONNX Runtime's fast
integer GEMM (VNNI dot products on x86, measured 2.4× the u8 × u8 GEMM on an AVX-512 VNNI CPU). On x86 CPUs
without VNNI that kernel sums pairs of products in 16 bits with saturation: there a session needs
``session.x64quantprecision=1`` (llmq's sessions set it on such CPUs, see ``ir.precision``), or the model is
compiled with ``--int8-weights unsigned`` (:class:`UnsignedInt8WeightsPass`: weights + 128 as uint8, u8 × u8,
exact everywhere without any option, at the u8 × u8 speed). One uint8 Quantize is shared by all linears that
read the same tensor with the same scale.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..ir.graph import Graph, dtype_name
from ..ir.passes import Pass, PassContext, PassResult
from ..ir.storage import peek, spill

__all__ = ["LowerToIntegerMatMulPass", "LowerBlockInt4ToMatMulNBitsPass", "LowerProgressiveW4A8Pass", "MergeMatMulNBitsPass", "DropBranchPadPass",
           "UnsignedInt8WeightsPass", "MergeIntegerMatMulPass", "LowerInt8WeightOnlyPass", "pack_int8_matmulnbits",
           "pack_matmulnbits", "unpack_matmulnbits", "unsigned_int8", "pack_nibbles", "unpack_nibbles",
           "widen_progressive", "lower_each_matmul", "merge_siblings"]

logger = logging.getLogger(__name__)


SPILL_EVERY = 256 << 20  # bytes of packed weights made before they move to the compile's scratch file


def _per_tensor_int8_qdq(tensor: gs.Tensor):
    """(x, scale constant) if ``tensor`` is DQ(Q(x)) per tensor with int8 zero point 0, else None."""
    dq = Graph.producer(tensor)
    if dq is None or dq.op != "DequantizeLinear":
        return None
    q = Graph.producer(dq.inputs[0])
    if q is None or q.op != "QuantizeLinear" or len(q.inputs) < 3:
        return None
    scale, zp = q.inputs[1], q.inputs[2]
    if not (isinstance(scale, gs.Constant) and isinstance(zp, gs.Constant)) or scale.values.size != 1:
        return None
    if zp.values.dtype != np.int8 or np.any(zp.values != 0) or dq.inputs[1] is not scale:
        return None
    return q.inputs[0], scale


def _int8_weight(tensor: gs.Tensor):
    """(int8 constant [K, N], scale constant [N] or scalar) if ``tensor`` is DQ of one along axis 1."""
    dq = Graph.producer(tensor)
    if dq is None or dq.op != "DequantizeLinear" or dq.attrs.get("block_size", 0):
        return None
    w, scale = dq.inputs[0], dq.inputs[1]
    # types and shapes only, and a peek at the zero point: the weight's values stay where they are (on disk)
    if not (isinstance(w, gs.Constant) and isinstance(scale, gs.Constant)) or dtype_name(w) != "int8" or len(w.shape) != 2:
        return None
    if len(dq.inputs) > 2 and np.any(np.asarray(peek(dq.inputs[2])) != 0):
        return None
    if int(np.prod(scale.shape)) > 1 and dq.attrs.get("axis", 1) % 2 != 1:
        return None
    return w, scale


def _replace_with_contrib_op(graph: Graph, node: gs.Node, op: str, inputs: list, attrs: dict, pass_name: str,
                             domain: str = "com.microsoft") -> None:
    """Put ``domain``'s ``op`` in place of ``node`` (it takes over the node's output)."""
    out = node.outputs[0]
    node.outputs.clear()
    fused = gs.Node(op, name=graph.unique_name(f"{pass_name}/{node.name}"), domain=domain, attrs=attrs,
                    inputs=inputs, outputs=[out])
    graph.gs.nodes.append(fused)
    graph.tag(fused.name, pass_name)
    graph.other_opsets.setdefault(domain, 1)
    graph.touch()


def lower_each_matmul(graph: Graph, ctx: PassContext, lower) -> dict:
    """Call ``lower(node)`` on each two-input MatMul; it rewrites the node and returns the bytes of new weights it
    made, or None to leave the node as it is. The new weights move to the compile's scratch file every
    ``SPILL_EVERY`` bytes (memory holds a slice of them, not the model's), and the replaced MatMuls, left without
    outputs, are removed (a later ``discover()`` must not see them). Returns the stats ``lowered`` and
    ``spilled_bytes`` (when any)."""
    lowered = made = spilled = 0
    for node in list(graph.gs.nodes):
        if node.op != "MatMul" or len(node.inputs) != 2:
            continue
        nbytes = lower(node)
        if nbytes is None:
            continue
        lowered += 1
        made += nbytes
        if ctx.spill_to and made >= SPILL_EVERY:
            spilled += spill(graph.gs, ctx.spill_to)
            made = 0
    if lowered:
        graph.gs.cleanup()
    return {"lowered": lowered, **({"spilled_bytes": spilled} if spilled else {})}


def pack_nibbles(u: np.ndarray) -> np.ndarray:
    """uint8 values 0…15 ``[N, L]`` → ``[N, ⌈L/2⌉]`` bytes, the first of each pair in the low nibble (the layout
    of MatMulNBits and of llmq's TensorRT plugin)."""
    u = np.asarray(u, np.uint8)
    if u.shape[1] % 2:
        u = np.concatenate([u, np.zeros((u.shape[0], 1), np.uint8)], axis=1)
    return np.ascontiguousarray(u[:, 0::2] | (u[:, 1::2] << 4))


def unpack_nibbles(b: np.ndarray, length: int) -> np.ndarray:
    """Inverse of :func:`pack_nibbles`: ``[N, ⌈L/2⌉]`` bytes (any 8-bit type) → uint8 ``[N, length]``."""
    b = np.asarray(b).view(np.uint8)
    return np.stack([b & 0x0F, b >> 4], axis=-1).reshape(b.shape[0], -1)[:, :length]


def widen_progressive(q: np.ndarray, z: np.ndarray, s2: np.ndarray, block: int) -> np.ndarray:
    """A progressive (QoQ) weight's level-1 integers ``(q − z)·s2`` ``[K, N]`` as int16 (inside ±127 by the
    protective range), from codes ``[K, N]`` and group zero points / scales ``[K/B, N]``."""
    return (np.asarray(q).astype(np.int16) - np.repeat(np.asarray(z).astype(np.int16), block, axis=0)) \
        * np.repeat(np.asarray(s2).astype(np.int16), block, axis=0)


class UnsignedInt8WeightsPass(Pass):
    """Store the int8 weights of ``MatMulInteger`` / ``MatMulIntegerToFloat`` + 128 as uint8 with zero point 128
    (``--int8-weights unsigned``): the same products, computed u8 × u8, which ONNX Runtime gets exactly right on
    every CPU with any session options — for a deployment on x86 CPUs without VNNI that cannot set
    ``session.x64quantprecision=1`` (ONNX Runtime's own rewrite to the same form). On VNNI CPUs the u8 × u8 GEMM
    is slower (measured 314 against 743 GOP/s). Declines a weight with a zero point of its own or an activation
    that is not uint8 with an explicit zero point (u8 × u8 needs both)."""

    name = "unsigned-int8-weights"
    phase = "lower"
    changes_activations = False

    SLOTS = {"MatMulInteger": (2, 3), "MatMulIntegerToFloat": (4, 5)}  # (a_zero_point, b_zero_point) inputs

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        done = {}
        for node in graph.gs.nodes:
            if node.op not in self.SLOTS or (node.domain or "") not in ("", "ai.onnx", "com.microsoft"):
                continue
            a_zp, b_zp = self.SLOTS[node.op]
            w = node.inputs[1]
            if not isinstance(w, gs.Constant) or dtype_name(w) != "int8":
                continue
            has = lambda i: len(node.inputs) > i and bool(node.inputs[i].name)  # noqa: E731
            if has(b_zp) or not has(a_zp) or not isinstance(node.inputs[a_zp], gs.Constant) \
                    or dtype_name(node.inputs[a_zp]) != "uint8":
                ctx.decline(self.name, node.name, "the weight has a zero point, or the activation is not uint8 with a zero point")
                continue
            if w.name not in done:
                done[w.name] = graph.make_constant(f"{w.name}_u8", unsigned_int8(peek(w)), self.name)
            columns = node.inputs[3].shape if node.op == "MatMulIntegerToFloat" and node.inputs[3].shape else ()
            zp = graph.make_constant("b_zero_point_u8", np.full(tuple(columns), 128, np.uint8), self.name)
            while len(node.inputs) <= b_zp:
                node.inputs.append(gs.Variable.empty())
            node.inputs[1], node.inputs[b_zp] = done[w.name], zp
            graph.touch()
        if done:
            graph.gs.cleanup()
        return PassResult(bool(done), {"weights": len(done)})


class LowerToIntegerMatMulPass(Pass):
    """Rewrite ``MatMul(DQ(Q(x)), DQ(W_int8))`` into ``com.microsoft.MatMulIntegerToFloat``.

    Handles: MatMul with a per-tensor int8 Q/DQ activation and an int8 weight quantized per tensor or per
    output channel (axis 1). Declines: Gemm, block-quantized (4-bit) weights, asymmetric or non-constant
    scales — those stay as Q/DQ for ONNX Runtime's own fusions.
    """

    name = "lower-int8-matmul"
    phase = "lower"
    changes_activations = False

    @dataclass(frozen=True)
    class Options:
        pass

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        shared: dict = {}

        def lower(node: gs.Node):
            act, weight = _per_tensor_int8_qdq(node.inputs[0]), _int8_weight(node.inputs[1])
            if act is None or weight is None:
                return None
            x, a_scale = act
            w, w_scale = weight  # the int8 weight as it is (no zero point: u8 × s8)
            key = (x.name, float(a_scale.values.reshape(-1)[0]))
            if key not in shared:
                zp = graph.make_constant("a_zero_point_u8", np.asarray(128, np.uint8), self.name)
                q = graph.make_node("QuantizeLinear", [x, a_scale, zp], f"{x.name}_u8", self.name, out_dtype=np.uint8)
                shared[key] = (q, zp)
            q, zp = shared[key]
            _replace_with_contrib_op(graph, node, "MatMulIntegerToFloat", [q, w, a_scale, w_scale, zp], {}, self.name)
            return 0  # no new weights

        stats = lower_each_matmul(graph, ctx, lower)
        return PassResult(stats["lowered"] > 0, {**stats, "weights": "int8"})


def unsigned_int8(w: np.ndarray) -> np.ndarray:
    """INT8 codes stored + 128 as uint8 (against zero point 128): the same values, in the u8 × u8 form ONNX Runtime
    computes exactly on every CPU."""
    return (np.asarray(w).astype(np.int16) + 128).astype(np.uint8)


def pack_matmulnbits(q: np.ndarray, zero_point: np.ndarray | None, block: int, signed: bool) -> tuple:
    """4-bit weight ``q [K, N]`` (int4 or uint4 values) → MatMulNBits' ``B [N, K/block, block/2]`` uint8 and
    packed zero points (``[N · ceil(K/block / 2)]`` uint8; None for symmetric, whose default zero point 8
    is what ``q + 8`` is stored against). Two values per byte, the first in the low nibble."""
    k, n = q.shape
    u = (q.astype(np.int16) + (8 if signed else 0)).astype(np.uint8)  # to the unsigned storage range 0..15
    packed = pack_nibbles(u.T).reshape(n, k // block, block // 2)
    zp = None
    if zero_point is not None and not signed:
        zp = pack_nibbles(zero_point.astype(np.uint8).T).reshape(-1)  # [N, K/block] a row each
    return packed, zp


def unpack_matmulnbits(packed: np.ndarray, zp: np.ndarray | None, k: int, n: int, block: int) -> tuple:
    """Inverse of :func:`pack_matmulnbits` to unsigned values ``[K, N]`` and zero points ``[K/block, N]``."""
    u = unpack_nibbles(packed.reshape(n, -1), k).T
    z = np.full((k // block, n), 8, np.uint8) if zp is None else unpack_nibbles(zp.reshape(n, -1), k // block).T
    return u, z


class LowerBlockInt4ToMatMulNBitsPass(Pass):
    """Rewrite ``MatMul(X, DQ(W_int4 [K, N], s [K/B, N], axis 0, block_size B))`` into
    ``com.microsoft.MatMulNBits`` (exact repacking; signed INT4 → the default zero point 8, UINT4 keeps its
    zero points). Declines: blocks below 16 or not a power of two (the kernel's limits), Gemm."""

    name = "lower-int4-matmulnbits"
    phase = "lower"
    changes_activations = False

    @dataclass(frozen=True)
    class Options:
        accuracy_level: int = 0  # 0/1: float activations; 4: int8 activations (faster, approximate)

        def __post_init__(self):
            if self.accuracy_level not in (0, 1, 2, 3, 4):
                raise ValueError("accuracy_level is 0-4")

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        def lower(node: gs.Node):
            dq = Graph.producer(node.inputs[1])
            if dq is None or dq.op != "DequantizeLinear" or not dq.attrs.get("block_size"):
                return None
            w, scale = dq.inputs[0], dq.inputs[1]
            zp = dq.inputs[2] if len(dq.inputs) > 2 else None
            if not all(isinstance(t, gs.Constant) for t in (w, scale) + ((zp,) if zp is not None else ())):
                return None
            kind = dtype_name(w)  # read from the constant's type: its values stay where they are
            block = int(dq.attrs["block_size"])
            if kind not in ("int4", "uint4") or dq.attrs.get("axis", 0) % 2 != 0 or len(w.shape) != 2:
                return None
            if block < 16 or block & (block - 1):
                ctx.decline(self.name, node.name, f"block {block} is below 16 or not a power of two")
                return None
            signed = kind == "int4"
            zpv = None if zp is None else peek(zp)
            if signed and zpv is not None and np.any(zpv.astype(np.int8) != 0):
                return None
            k, n = w.shape
            packed, zp_packed = pack_matmulnbits(peek(w), zpv, block, signed)  # peek: not kept in the graph
            s = np.ascontiguousarray(np.asarray(peek(scale), np.float32).T.reshape(-1))  # [N · K/B]
            inputs = [node.inputs[0], graph.make_constant(f"{node.name}_nbits_b", packed, self.name),
                      graph.make_constant(f"{node.name}_nbits_scales", s, self.name)]
            if zp_packed is not None:
                inputs.append(graph.make_constant(f"{node.name}_nbits_zero_points", zp_packed, self.name))
            _replace_with_contrib_op(graph, node, "MatMulNBits", inputs, {"K": k, "N": n, "bits": 4, "block_size": block,
                                                                    "accuracy_level": self.options.accuracy_level}, self.name)
            return packed.nbytes + s.nbytes

        stats = lower_each_matmul(graph, ctx, lower)
        return PassResult(stats["lowered"] > 0, {**stats, "accuracy_level": self.options.accuracy_level})


def pack_int8_matmulnbits(w: np.ndarray, zero_point, scale: np.ndarray, block: int) -> tuple:
    """An 8-bit weight ``w [K, N]`` (int8 or uint8) with per-column (or scalar) zero point and scale → MatMulNBits'
    ``B [N, ⌈K/block⌉, block]`` uint8, scales ``[N · ⌈K/block⌉]`` (each column's scale repeated per block) and zero
    points ``[N · ⌈K/block⌉]`` uint8 (None when all are 128, the kernel's default for 8 bits). int8 values and zero
    points are stored + 128: the same differences ``w − z``. A ragged last block is padded with the column's zero
    point (zero weight)."""
    w = np.asarray(w)
    k, n = w.shape
    shift = 128 if w.dtype == np.int8 else 0
    zp = np.zeros(n, np.int16) if zero_point is None else np.broadcast_to(np.asarray(zero_point).astype(np.int16).reshape(-1), (n,))
    zp = (zp + shift).astype(np.uint8)
    blocks = -(-k // block)
    u = np.empty((n, blocks * block), np.uint8)
    u[:, :k] = (w.astype(np.int16) + shift).astype(np.uint8).T
    u[:, k:] = zp[:, None]
    s = np.repeat(np.broadcast_to(np.asarray(scale, np.float32).reshape(-1), (n,)), blocks)
    z = None if np.all(zp == 128) else np.ascontiguousarray(np.repeat(zp, blocks))
    return np.ascontiguousarray(u.reshape(n, blocks, block)), np.ascontiguousarray(s), z


class LowerInt8WeightOnlyPass(Pass):
    """Rewrite ``MatMul(X, DQ(W_8bit [K, N], s [N], z))`` — an INT8 weight-only linear (``w8a16``, and the linears
    whose activations a budget keeps float) — into ``com.microsoft.MatMulNBits`` with ``bits`` 8 and the
    accuracy level of the compile. Exact repacking: the column's scale repeated per block of ``block_size``.

    Left as ``DequantizeLinear → MatMul``, ONNX Runtime fuses such a linear into the same kernel by itself, at the
    accuracy level of the *session* (``session.qdq_matmulnbits_accuracy_level``, default 4): the artifact's
    arithmetic then depends on how the deployment opens it. Written out, it is fixed in the file. Level 0/1 is
    the Q/DQ graph's arithmetic (float activations); level 4 quantizes the activations to INT8 per block of
    ``block_size`` input channels of each token (its perplexity is measured, not assumed). ONNX Runtime 1.2x/1.3x
    has no float-compute 8-bit kernel on x86: level 0 dequantizes the whole weight on every call (one token
    through SmolLM2's 576 × 576 … 576 × 1536 on 2 cores: 0.3–1.3 ms; a float MatMul 0.035 ms, level 4 0.018 ms).

    Declines: activations that are themselves dequantized (integer kernels lower those), weights that are not 2-D
    8-bit constants quantized per column or per tensor, Gemm."""

    name = "lower-int8-weight-only"
    phase = "lower"
    changes_activations = False

    @dataclass(frozen=True)
    class Options:
        accuracy_level: int = 0  # 0/1: float activations (the Q/DQ arithmetic); 4: INT8 activations per block
        block_size: int = 32  # the activation blocks of level 4 (16, 32, 64 or 128); no effect on the weights

        def __post_init__(self):
            if self.accuracy_level not in (0, 1, 2, 3, 4):
                raise ValueError("accuracy_level is 0-4")
            if self.block_size not in (16, 32, 64, 128):
                raise ValueError("block_size is 16, 32, 64 or 128")

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        block, level = self.options.block_size, self.options.accuracy_level
        packs: dict = {}

        def lower(node: gs.Node):
            dq = Graph.producer(node.inputs[1])
            if dq is None or dq.op != "DequantizeLinear" or dq.attrs.get("block_size", 0):
                return None
            source = Graph.producer(node.inputs[0])
            if source is not None and source.op == "DequantizeLinear":
                return None  # quantized activations: the integer lowerings' (or ONNX Runtime's) business
            w, scale = dq.inputs[0], dq.inputs[1]
            zp = dq.inputs[2] if len(dq.inputs) > 2 and dq.inputs[2].name else None
            if not all(isinstance(t, gs.Constant) for t in (w, scale) + ((zp,) if zp is not None else ())):
                return None
            if dtype_name(w) not in ("int8", "uint8") or len(w.shape) != 2:
                return None
            k, n = w.shape
            if int(np.prod(scale.shape)) not in (1, n) or (int(np.prod(scale.shape)) > 1 and dq.attrs.get("axis", 1) % 2 != 1):
                return None
            key = (w.name, scale.name, None if zp is None else zp.name)
            made = 0
            if key not in packs:  # a weight read by several linears (tied) is packed once
                packed, s, z = pack_int8_matmulnbits(peek(w), None if zp is None else peek(zp), peek(scale), block)
                packs[key] = [graph.make_constant(f"{node.name}_nbits8_b", packed, self.name),
                              graph.make_constant(f"{node.name}_nbits8_scales", s, self.name)]
                if z is not None:
                    packs[key].append(graph.make_constant(f"{node.name}_nbits8_zero_points", z, self.name))
                made = packed.nbytes + s.nbytes
            _replace_with_contrib_op(graph, node, "MatMulNBits", [node.inputs[0], *packs[key]],
                                     {"K": k, "N": n, "bits": 8, "block_size": block, "accuracy_level": level}, self.name)
            return made

        stats = lower_each_matmul(graph, ctx, lower)
        return PassResult(stats["lowered"] > 0, {**stats, "accuracy_level": level, "block_size": block})


def merge_siblings(graph: Graph, ctx: PassContext, siblings: dict, merge, pass_name: str) -> dict:
    """For each group of two or more sibling nodes (``{key: [nodes]}``), ``merge(key, nodes)`` makes the wide node
    and returns ``(its output, the nodes' widths, the tensors the Split writes, bytes of new weights)``; a
    ``Split`` along the last axis then writes those tensors and the siblings go. New weights move to the
    compile's scratch file every ``SPILL_EVERY`` bytes, as :func:`lower_each_matmul` does. Returns the stats."""
    merged = groups = made = spilled = 0
    for key, nodes in siblings.items():
        if len(nodes) < 2:
            continue
        out, widths, targets, nbytes = merge(key, nodes)
        split = gs.Node("Split", name=graph.unique_name(f"{pass_name}/Split"), attrs={"axis": -1},
                        inputs=[out, graph.make_constant(f"{nodes[0].name}_merged_split", np.asarray(widths, np.int64), pass_name)],
                        outputs=targets)
        for n in nodes:
            n.outputs.clear()
            n.inputs.clear()
        graph.gs.nodes.append(split)
        graph.tag(split.name, pass_name)
        merged += len(nodes)
        groups += 1
        made += nbytes
        if ctx.spill_to and made >= SPILL_EVERY:  # a slice of the new weights in memory, not the model's
            spilled += spill(graph.gs, ctx.spill_to)
            made = 0
    if groups:
        graph.gs.cleanup()
        graph.touch()
    return {"merged": merged, "into": groups, **({"spilled_bytes": spilled} if spilled else {})}


class MergeMatMulNBitsPass(Pass):
    """Merge the MatMulNBits nodes that read the same tensor (q/k/v, gate/up) into one whose columns are
    theirs side by side, followed by a ``Split`` — exact: each output column is computed on its own, from the
    same packed bytes, scales and zero points. Fewer, wider kernels: at batch-1 decode on 2 cores the small
    k/v projections cost more in dispatch than in arithmetic. Merges only nodes with equal K, bits, block size
    and accuracy level, no bias, and zero points on all or none."""

    name = "merge-matmulnbits"
    phase = "lower"
    changes_activations = False

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        siblings: dict = {}
        for node in graph.gs.nodes:
            if node.op != "MatMulNBits" or node.domain != "com.microsoft" or not 3 <= len(node.inputs) <= 4:
                continue
            if not all(isinstance(t, gs.Constant) for t in node.inputs[1:]):
                continue
            a = node.attrs
            key = (node.inputs[0].name, a["K"], a.get("bits", 4), a["block_size"], a.get("accuracy_level", 0),
                   len(node.inputs))
            siblings.setdefault(key, []).append(node)
        def merge(key, nodes):
            _, k, bits, block, level, _ = key
            widths = [int(n.attrs["N"]) for n in nodes]
            first = nodes[0]
            cat = [np.concatenate([np.asarray(peek(n.inputs[i])) for n in nodes], axis=0)  # peek: not kept in the graph
                   for i in range(1, len(first.inputs))]
            inputs = [first.inputs[0]] + [graph.make_constant(f"{first.name}_merged_{i}", v, self.name)
                                          for i, v in enumerate(cat)]
            out = graph.make_node("MatMulNBits", inputs, f"{first.name}_merged_out", self.name,
                                  {"K": k, "N": sum(widths), "bits": bits, "block_size": block, "accuracy_level": level},
                                  out_dtype=np.float32, domain="com.microsoft")
            return out, widths, [n.outputs[0] for n in nodes], sum(v.nbytes for v in cat)

        stats = merge_siblings(graph, ctx, siblings, merge, self.name)
        return PassResult(stats["into"] > 0, stats)


class MergeIntegerMatMulPass(Pass):
    """Merge the ``MatMulIntegerToFloat`` nodes that read the same codes with the same activation scale and zero
    point (q/k/v, gate/up) into one whose weight columns and weight scales are theirs side by side, then a
    ``Split`` — exact: each output column is its own int32 sum times its own scales. When each of them feeds
    only a ``Mul`` by one and the same tensor (the W4A8 kernel's per-token scale), that ``Mul`` is applied once,
    before the split. At batch-1 decode the small k/v GEMMs and their ``Mul`` cost more in dispatch than in
    arithmetic (as for MatMulNBits, :class:`MergeMatMulNBitsPass`). Merges only int8 weights without zero points
    or bias, with per-column or scalar weight scales."""

    name = "merge-integer-matmul"
    phase = "lower"
    changes_activations = False

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        siblings: dict = {}
        for node in graph.gs.nodes:
            if node.op != "MatMulIntegerToFloat" or node.domain != "com.microsoft" or len(node.inputs) != 5:
                continue
            a, w, a_scale, w_scale, a_zp = node.inputs
            if not all(isinstance(t, gs.Constant) for t in (w, a_scale, w_scale, a_zp)) or dtype_name(w) != "int8" \
                    or len(w.shape) != 2 or int(np.prod(w_scale.shape)) not in (1, w.shape[1]):
                continue
            if a_scale.values.size != 1 or a_zp.values.size != 1:
                continue
            key = (a.name, int(a_zp.values.reshape(-1)[0]), float(a_scale.values.reshape(-1)[0]), w.shape[0], dtype_name(w_scale))
            siblings.setdefault(key, []).append(node)
        def merge(key, nodes):
            first = nodes[0]
            widths = [int(n.inputs[1].shape[1]) for n in nodes]
            w = np.concatenate([np.asarray(peek(n.inputs[1])) for n in nodes], axis=1)  # peek: not kept in the graph
            scales = np.concatenate([np.broadcast_to(np.asarray(peek(n.inputs[3])).reshape(-1), (c,))
                                     for n, c in zip(nodes, widths)])
            out = graph.make_node("MatMulIntegerToFloat", [first.inputs[0], graph.make_constant(f"{first.name}_merged_w", w, self.name),
                                                           first.inputs[2], graph.make_constant(f"{first.name}_merged_scale", scales, self.name),
                                                           first.inputs[4]], f"{first.name}_merged_out", self.name,
                                  out_dtype=first.outputs[0].dtype, domain="com.microsoft")
            muls = [self._sole_scaling(graph, n) for n in nodes]
            targets = [n.outputs[0] for n in nodes]
            if all(muls) and len({m[1].name for m in muls}) == 1:  # one Mul by the per-token scale, before the split
                out = graph.make_node("Mul", [out, muls[0][1]], f"{first.name}_merged_scaled", self.name, out_dtype=out.dtype)
                targets = [m[0].outputs[0] for m in muls]
                for m, _ in muls:
                    m.outputs.clear()
                    m.inputs.clear()
            return out, widths, targets, w.nbytes

        stats = merge_siblings(graph, ctx, siblings, merge, self.name)
        return PassResult(stats["into"] > 0, stats)

    @staticmethod
    def _sole_scaling(graph: Graph, node: gs.Node):
        """(the Mul, its other input) if ``node``'s output feeds exactly one node, a Mul by a computed tensor."""
        y = node.outputs[0]
        if len(y.outputs) != 1 or any(o is y for o in graph.gs.outputs):
            return None
        mul = y.outputs[0]
        if mul.op != "Mul" or len(mul.inputs) != 2:
            return None
        other = mul.inputs[1] if mul.inputs[0] is y else mul.inputs[0]
        return None if isinstance(other, gs.Constant) else (mul, other)


class DropBranchPadPass(Pass):
    """Drop the zero ``Pad`` of a fused low-rank input: ``MatMulNBits(Concat(x, Pad(t, 0 … 0)), K)`` becomes
    ``MatMulNBits(Concat(x, t), K − padding)``. The portable graph pads ``t = x·A`` to a whole block because
    TensorRT infers the block from whole blocks along K; MatMulNBits takes a ragged last block (``K`` need not
    divide into blocks), and its packed weights, scales and zero points keep their shape (the block count
    ``⌈K/B⌉`` is unchanged, as the padding is less than a block). Exact: the dropped rows multiplied zeros.
    At batch-1 decode the Pad node cost more than the zeros it carried (about 7 µs each, 120 per token on
    SmolLM2-135M's ``w4a16-lr``). Only when every reader of the Concat is such a MatMulNBits."""

    name = "drop-branch-pad"
    phase = "lower"
    changes_activations = False

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        dropped = 0
        for cat in [n for n in graph.gs.nodes if n.op == "Concat" and len(n.inputs) == 2]:
            pad = Graph.producer(cat.inputs[1])
            if pad is None or pad.op != "Pad" or pad.attrs.get("mode", "constant") != "constant" \
                    or cat.attrs.get("axis") != -1:
                continue
            amount = _end_padding(pad)
            readers = list(cat.outputs[0].outputs)
            if not amount or not readers or any(r.op != "MatMulNBits" or r.inputs[0] is not cat.outputs[0]
                                                for r in readers):
                continue

            def blocks(k, r):
                return -(-k // int(r.attrs["block_size"]))

            if any(blocks(int(r.attrs["K"]) - amount, r) != blocks(int(r.attrs["K"]), r) for r in readers):
                continue
            for r in readers:
                r.attrs["K"] = int(r.attrs["K"]) - amount
            cat.inputs[1] = pad.inputs[0]
            dropped += 1
        if dropped:
            graph.gs.cleanup()
            graph.touch()
        return PassResult(dropped > 0, {"dropped": dropped})


def _end_padding(pad: gs.Node) -> int:
    """How many zeros ``pad`` appends at the end of the last axis, if that is all it does (else 0)."""
    pads = pad.inputs[1] if len(pad.inputs) > 1 else None
    value = pad.inputs[2] if len(pad.inputs) > 2 else None
    axes = pad.inputs[3] if len(pad.inputs) > 3 else None
    if not isinstance(pads, gs.Constant):
        return 0
    if value is not None and value.name and (not isinstance(value, gs.Constant) or np.any(np.asarray(value.values) != 0)):
        return 0
    p = np.asarray(pads.values).reshape(-1)
    if axes is not None and axes.name:
        if not isinstance(axes, gs.Constant) or list(np.asarray(axes.values).reshape(-1)) != [-1] or len(p) != 2:
            return 0
        return int(p[1]) if p[0] == 0 else 0
    return 0


def _per_token_qdq(tensor: gs.Tensor):
    """(x, per-token scale tensor) if ``tensor`` is ``DQ(Q(x, s, block_size=K), s)`` with a scale computed at
    run time (the per-token INT8 activations of ``quantize-activations granularity: per-token``), else None."""
    dq = Graph.producer(tensor)
    if dq is None or dq.op != "DequantizeLinear" or not dq.attrs.get("block_size"):
        return None
    q = Graph.producer(dq.inputs[0])
    if q is None or q.op != "QuantizeLinear" or isinstance(q.inputs[1], gs.Constant) or dq.inputs[1] is not q.inputs[1]:
        return None
    if len(q.inputs) > 2 and q.inputs[2].name or q.attrs.get("output_dtype") != onnx.TensorProto.INT8:
        return None
    return q.inputs[0], q.inputs[1]


def _progressive_weight(tensor: gs.Tensor):
    """(codes uint4 [K, N], group scales [K/B, N], zero points uint4 [K/B, N], channel scales [N], B) if
    ``tensor`` is ``Mul(DQ(uint4 [K, N], s2, z, axis 0, block_size B), s1)`` — a progressive (QoQ) weight in
    MatMul's layout — else None."""
    mul = Graph.producer(tensor)
    if mul is None or mul.op != "Mul" or not isinstance(mul.inputs[1], gs.Constant):
        return None
    dq = Graph.producer(mul.inputs[0])
    if dq is None or dq.op != "DequantizeLinear" or not dq.attrs.get("block_size") or dq.attrs.get("axis", 0) % 2 != 0:
        return None
    if len(dq.inputs) < 3 or not all(isinstance(t, gs.Constant) for t in dq.inputs):
        return None
    w, s2, z = dq.inputs
    if dtype_name(w) != "uint4" or len(w.shape) != 2 or int(np.prod(mul.inputs[1].shape)) != w.shape[1]:
        return None
    return w, s2, z, mul.inputs[1], int(dq.attrs["block_size"])


class LowerProgressiveW4A8Pass(Pass):
    """Lower ``MatMul(per-token INT8 Q/DQ(x), Mul(DQ(uint4, s2, z), s1))`` — the ``w4a8`` recipe's linears —
    to ONNX Runtime kernels. Two kernels:

    * ``int8`` (exact): the INT8 weight ``(q − z)·s2`` and ``MatMulIntegerToFloat`` of the per-token activation
      codes (uint8, zero point 128) with int32 accumulation, times ``s1``, then ``· s_token``: the Q/DQ graph's
      arithmetic, in integers. u8 × s8: ONNX Runtime's fast integer GEMM (see the module's docstring for CPUs
      without VNNI). Weights take 8 bits (the widening done ahead of time, as QServe's kernel does in
      registers).
    * ``nbits``: ONNX Runtime's own W4A8, ``MatMulNBits`` (4-bit codes, zero points, scales ``s2·s1``) with
      ``accuracy_level`` 4: the kernel quantizes the activations to INT8 itself, per block of ``block_size``
      input channels of each token (finer than the recipe's one scale per token, so it is not the Q/DQ
      graph's rounding: its perplexity is measured, not assumed). Weights stay 4-bit.

    Declines: anything not of that form (such linears stay as Q/DQ, which ONNX Runtime runs as written)."""

    name = "lower-w4a8"
    phase = "lower"
    changes_activations = False

    @dataclass(frozen=True)
    class Options:
        kernel: str = "nbits"  # nbits (MatMulNBits, accuracy level 4; 4-bit weights) | int8 (MatMulIntegerToFloat, exact)

        def __post_init__(self):
            if self.kernel not in ("nbits", "int8"):
                raise ValueError("kernel is nbits or int8")

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        shared: dict = {}

        def lower(node: gs.Node):
            act, weight = _per_token_qdq(node.inputs[0]), _progressive_weight(node.inputs[1])
            if act is None or weight is None:
                return None
            (x, s_token), (w, s2, z, s1, block) = act, weight
            q, s2v, zv, s1v = peek(w), np.asarray(peek(s2), np.float32), peek(z), np.asarray(peek(s1), np.float32).reshape(-1)
            k, n = w.shape
            if self.options.kernel == "nbits":
                if block < 16 or block & (block - 1):
                    ctx.decline(self.name, node.name, f"block {block} is below 16 or not a power of two")
                    return None
                packed, zp = pack_matmulnbits(q, zv, block, signed=False)
                scales = np.ascontiguousarray((s2v * s1v[None, :]).T.reshape(-1))  # [N · K/B], computed in float32
                inputs = [x, graph.make_constant(f"{node.name}_nbits_b", packed, self.name),
                          graph.make_constant(f"{node.name}_nbits_scales", scales, self.name),
                          graph.make_constant(f"{node.name}_nbits_zero_points", zp, self.name)]
                _replace_with_contrib_op(graph, node, "MatMulNBits", inputs, {"K": k, "N": n, "bits": 4, "block_size": block,
                                                                        "accuracy_level": 4}, self.name)
                return packed.nbytes + scales.nbytes
            # the INT8 weight (q − z)·s2, int8 against the per-token uint8 codes: u8 × s8, ONNX Runtime's fast GEMM
            w16 = widen_progressive(q, zv, s2v, block)
            if np.abs(w16).max(initial=0) > 127:
                ctx.decline(self.name, node.name, "its INT8 weight leaves ±127 (not the progressive quantizer's protective range)")
                return None
            w8 = w16.astype(np.int8)
            if x.name not in shared:
                shared[x.name] = self._token_codes(graph, Graph.producer(node.inputs[0]).inputs[0])
            zp = graph.make_constant("zero_point_u8", np.asarray(128, np.uint8), self.name)
            s1_dtype = np.asarray(peek(s1)).dtype
            one = graph.make_constant("unit_scale", np.asarray(1, s1_dtype), self.name)
            channel = graph.make_constant(f"{node.name}_channel_scale", s1v.astype(s1_dtype), self.name)  # [N]
            out = node.outputs[0]
            node.outputs.clear()
            graph.other_opsets.setdefault("com.microsoft", 1)
            acc = graph.make_node("MatMulIntegerToFloat", [shared[x.name], graph.make_constant(f"{node.name}_int8", w8, self.name),
                                                           one, channel, zp], f"{node.name}_acc", self.name,
                                  out_dtype=s1_dtype, domain="com.microsoft")
            last = Graph.producer(graph.make_node("Mul", [acc, s_token], f"{node.name}_out", self.name, out_dtype=s1_dtype))
            last.outputs[0] = out
            return w8.nbytes

        stats = lower_each_matmul(graph, ctx, lower)
        return PassResult(stats["lowered"] > 0, {**stats, "kernel": self.options.kernel})

    def _token_codes(self, graph: Graph, codes: gs.Tensor) -> gs.Variable:
        """The Q/DQ graph's own int8 per-token codes + 128, as uint8 (integer ops: the same codes, no second
        rounding of ``x / s_t`` that could fall differently on a tie)."""
        p = self.name
        wide = graph.make_node("Cast", [codes], f"{codes.name}_i32", p, {"to": onnx.TensorProto.INT32}, out_dtype=np.int32)
        shifted = graph.make_node("Add", [wide, graph.make_constant("u8_shift", np.asarray(128, np.int32), p)],
                                  f"{codes.name}_shift", p, out_dtype=np.int32)
        return graph.make_node("Cast", [shifted], f"{codes.name}_u8", p, {"to": onnx.TensorProto.UINT8}, out_dtype=np.uint8)
