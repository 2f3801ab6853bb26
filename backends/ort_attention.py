"""Fusing each decoder layer's attention into ONNX Runtime's ``com.microsoft.GroupQueryAttention``.

An exported Llama-family layer spells attention out in about 50 nodes: reshapes and transposes to heads, RoPE
(two ``Mul``, two ``Slice``, a ``Neg``, a ``Concat`` and an ``Add`` per tensor), the cache ``Concat``, the
GQA head repeat (``Unsqueeze → Expand → Reshape``), the scaled scores, the causal mask, ``Softmax`` and the
context product. At batch-1 decode each node costs ONNX Runtime a few microseconds of dispatch for a few
hundred bytes of work, so on a small model attention costs more than the 4-bit linears. This pass writes it
as three nodes per layer::

    q' = RotaryEmbedding(q, position_ids, cos_cache, sin_cache)      (com.microsoft, num_heads = H)
    k' = RotaryEmbedding(k, position_ids, cos_cache, sin_cache)      (num_heads = KV)
    out, present_k, present_v = GroupQueryAttention(q', k', v, past_k, past_v, seqlens_k, total_length)

with ``do_rotary = 0``: ONNX Runtime's in-kernel rotary ignores ``position_ids`` for some batch shapes
(measured on 1.32), the separate ``RotaryEmbedding`` honours them for every shape. ``cos_cache`` and
``sin_cache`` ``[max(position_ids) + 1, D/2]`` are computed in the graph, once per run, by a copy of the
model's own position → angle subgraph fed ``0 … max(position_ids)``, so any RoPE scaling the export baked in
is kept.

What is matched (anything else is declined, with the reason, and stays as it was):

- scores ``MatMul(q_rot · c_q, K · c_k) · c``, plus a mask that depends on input *shapes* only (a padding
  mask read from an input is not what ``seqlens_k`` expresses) and is, evaluated on its own at 3 new tokens
  after 20 000, exactly causal (a sliding window is not), ``Softmax`` on the last axis,
  ``IsNaN``/``Where`` guards, the context ``MatMul`` with V, then ``Transpose(0, 2, 1, 3) → Reshape``;
- RoPE of the half-rotation form ``x · cos + concat(−x[D/2:], x[:D/2]) · sin`` with ``cos = Cos(concat(f, f))``
  (times a constant, if the export scales it), ``f`` a function of ``position_ids`` and constants only;
- the KV-cache form (keys and values concatenated to ``past_key_values.*`` on the sequence axis, the results
  graph outputs), and the cache-less form when the graph takes ``position_ids`` (llmq's own plain export
  computes its positions inside and is left as it is);
- keys and values reaching the MatMuls through layout ops only: a quantized KV cache (Q/DQ on them) is
  declined, as GroupQueryAttention would drop the rounding.

ONNX Runtime's kernel runs a prompt with a past cache (``sequence > 1`` and ``past > 0``) for batch 1 only; it
refuses other batches with its own error. The fused model is checked on the spot: the pass runs random probe
inputs (prefill with an empty cache, a chunk after a cache, batch-2 decode) with the fused nodes beside the
original blocks, reading the same inputs, and keeps the fusion only if every block's output and cache agree
to fp32 tolerance (see :func:`_probe`; graphs over 2 GB skip the probe).
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np
import onnx
import onnx_graphsurgeon as gs

from ..ir.feeds import prompt_feeds, session_specs
from ..ir.graph import Graph
from ..ir.passes import Pass, PassContext, PassResult
from ..ir.storage import graph_session
from .onnxruntime import make_session, session_options

__all__ = ["FuseAttentionPass"]

logger = logging.getLogger(__name__)

LAYOUT_OPS = {"Reshape", "Transpose", "Expand", "Unsqueeze", "Squeeze"}
PROBE_RTOL = 1e-4  # max |Δ| ≤ PROBE_RTOL · max|reference| + PROBE_ATOL, per output
PROBE_ATOL = 1e-5


class _NoMatch(Exception):
    pass


def _producer(t: gs.Tensor) -> gs.Node | None:
    return t.inputs[0] if isinstance(t, gs.Variable) and t.inputs else None


def _scalar(t: gs.Tensor) -> float | None:
    if isinstance(t, gs.Constant) and np.asarray(t.values).size == 1:
        return float(np.asarray(t.values).reshape(-1)[0])
    return None


def _ints(t: gs.Tensor) -> list | None:
    return [int(v) for v in np.asarray(t.values).reshape(-1)] if isinstance(t, gs.Constant) else None


def _scale_step(node: gs.Node):
    """(other input, factor) if ``node`` multiplies or divides by a scalar constant, else None."""
    if node.op == "Mul":
        for i in (0, 1):
            c = _scalar(node.inputs[i])
            if c is not None:
                return node.inputs[1 - i], c
    if node.op == "Div":
        c = _scalar(node.inputs[1])
        if c:
            return node.inputs[0], 1.0 / c
    return None


def _back_through_scale(t: gs.Tensor) -> tuple:
    factor = 1.0
    while (p := _producer(t)) is not None and (step := _scale_step(p)) is not None:
        t, factor = step[0], factor * step[1]
    return t, factor


def _transpose_0213(node: gs.Node | None) -> bool:
    return node is not None and node.op == "Transpose" and list(node.attrs.get("perm", [])) == [0, 2, 1, 3]


def _heads_source(t: gs.Tensor) -> gs.Tensor:
    """``proj`` for ``t = Transpose(0, 2, 1, 3)(Reshape(proj))`` (``[B, S, N·D] → [B, N, S, D]``)."""
    tr = _producer(t)
    rs = _producer(tr.inputs[0]) if _transpose_0213(tr) else None
    if rs is None or rs.op != "Reshape":
        raise _NoMatch("a projection does not reach attention as Reshape → Transpose(0, 2, 1, 3)")
    return rs.inputs[0]


def _axis_last(node: gs.Node, axes: gs.Tensor | None, rank: int = 4) -> bool:
    a = node.attrs.get("axis") if axes is None else (_ints(axes) or [None])[0]
    return a in (-1, rank - 1)


def _shape_only(t: gs.Tensor) -> bool:
    """Whether ``t`` depends on graph inputs through their shapes alone."""
    seen, stack = set(), [t]
    while stack:
        x = stack.pop()
        if id(x) in seen or isinstance(x, gs.Constant):
            continue
        seen.add(id(x))
        p = _producer(x)
        if p is None:
            return False  # a graph input read by value
        if p.op in ("Shape", "Size"):
            continue
        stack.extend(p.inputs)
    return True


MASK_PROBE = (3, 20000)  # (new tokens, past tokens) the mask is evaluated at: sliding windows up to 20k show
MASK_PROBE_NO_CACHE = (2048, 0)  # a cache-less graph: one 2048-token prompt


def _mask_is_causal(mask: gs.Tensor, graph: Graph) -> str | None:
    """None if ``mask`` (a function of input shapes) is exactly the causal mask with the cache offset at
    ``MASK_PROBE`` — 0 where key ``j ≤ past + i``, a large negative elsewhere — else what differs. Evaluated by
    running the mask's own subgraph: a sliding window, a prefix-LM or a bidirectional mask all fail here, at a
    shape the block probe (a few tokens) would not reach."""
    nodes, reads = _ancestors_inputs(mask)
    seq, past = MASK_PROBE if any(n.startswith("past_key_values.") for n in reads) else MASK_PROBE_NO_CACHE
    specs = {t.name: t for t in graph.gs.inputs}
    feeds = {}
    for name in reads:
        t = specs[name]
        if name.startswith("past_key_values."):
            dims = [1, t.shape[1], past, t.shape[3]]
        elif name in ("input_ids", "position_ids"):
            dims = [1, seq]
        elif name == "attention_mask":
            dims = [1, past + seq]
        else:
            return f"the mask reads the shape of input {name}"
        if not all(isinstance(d, int) for d in dims):
            return f"input {name} has no static head sizes"
        feeds[name] = np.zeros(dims, dtype=t.dtype if t.dtype is not None else np.float32)
    sub = gs.Graph(nodes=nodes, inputs=[specs[n] for n in sorted(reads)], outputs=[mask], opset=graph.opset)
    try:
        model = gs.export_onnx(sub, do_type_check=False)
        model.graph.output[0].type.tensor_type.elem_type = onnx.TensorProto.FLOAT if mask.dtype is None else \
            onnx.helper.np_dtype_to_tensor_dtype(np.dtype(mask.dtype))
        value = make_session(model.SerializeToString()).run(None, feeds)[0]
    except Exception as exc:  # noqa: BLE001 - a mask that cannot be evaluated alone is not fused
        return f"the mask could not be evaluated on its own ({type(exc).__name__}: {str(exc)[:120]})"
    value = np.asarray(value, np.float32)
    if value.ndim < 2 or value.shape[-2:] not in ((seq, past + seq), (1, past + seq)):
        return f"the mask has shape {list(value.shape)}, not [..., {seq}, {past + seq}]"
    allowed = np.arange(past + seq)[None, :] <= past + np.arange(seq)[:, None]
    m = np.broadcast_to(value, value.shape[:-2] + (seq, past + seq))
    if np.any(m[..., allowed] != 0) or np.any(m[..., ~allowed] > -1e4):
        return f"the mask is not causal at {seq} new tokens after {past} (a sliding window or another pattern)"
    return None


def _ancestors_inputs(t: gs.Tensor) -> tuple:
    """(nodes computing ``t`` in topological order, the graph inputs they read)."""
    order, inputs, seen, placed = [], set(), set(), set()

    def visit(x):
        if isinstance(x, gs.Constant) or id(x) in seen:
            return
        seen.add(id(x))
        p = _producer(x)
        if p is None:
            inputs.add(x.name)
            return
        for i in p.inputs:
            visit(i)
        if id(p) not in placed:
            placed.add(id(p))
            order.append(p)

    visit(t)
    return order, inputs


@dataclass
class _Rope:
    x: gs.Tensor  # [B, N, S, D] before rotation
    cos: gs.Tensor  # [B, S, D]
    sin: gs.Tensor
    half: int


def _rope(t: gs.Tensor) -> _Rope:
    add = _producer(t)
    if add is None or add.op != "Add":
        raise _NoMatch("no RoPE Add before the scores")
    muls = [_producer(i) for i in add.inputs]
    if any(m is None or m.op != "Mul" for m in muls):
        raise _NoMatch("RoPE is not x·cos + rotate_half(x)·sin")
    rot = None
    for m in muls:
        for i in (0, 1):
            p = _producer(m.inputs[i])
            if p is not None and p.op == "Concat" and len(p.inputs) == 2 and _producer(p.inputs[0]) is not None \
                    and _producer(p.inputs[0]).op == "Neg":
                rot = (m, i, p)
    if rot is None:
        raise _NoMatch("no rotate_half (Concat(Neg(x2), x1)) in RoPE")
    mul_sin, i_rot, cat = rot
    mul_cos = muls[0] if muls[1] is mul_sin else muls[1]
    if not _axis_last(cat, None):
        raise _NoMatch("rotate_half concatenates on another axis than the last")
    hi = _producer(_producer(cat.inputs[0]).inputs[0])
    lo = _producer(cat.inputs[1])
    if hi is None or lo is None or hi.op != "Slice" or lo.op != "Slice" or hi.inputs[0] is not lo.inputs[0]:
        raise _NoMatch("rotate_half does not slice one tensor in two")
    x = lo.inputs[0]

    def bounds(s):
        starts, ends = _ints(s.inputs[1]), _ints(s.inputs[2])
        axes = s.inputs[3] if len(s.inputs) > 3 else None
        steps = _ints(s.inputs[4]) if len(s.inputs) > 4 else [1]
        if starts is None or ends is None or len(starts) != 1 or steps != [1] or axes is None \
                or not _axis_last(s, axes):
            raise _NoMatch("rotate_half slices are not constant last-axis halves")
        return starts[0], ends[0]

    (lo_s, lo_e), (hi_s, hi_e) = bounds(lo), bounds(hi)
    half = lo_e
    if lo_s != 0 or hi_s != half or hi_e < 2 * half:
        raise _NoMatch("rotate_half slices are not the two halves")
    if x not in mul_cos.inputs:
        raise _NoMatch("RoPE multiplies cos with another tensor than it rotates")
    cos_u = mul_cos.inputs[1] if mul_cos.inputs[0] is x else mul_cos.inputs[0]
    sin_u = mul_sin.inputs[1 - i_rot]

    def unsq(u):
        p = _producer(u)
        while p is not None and p.op == "Unsqueeze":
            u, p = p.inputs[0], _producer(p.inputs[0])
        return u

    return _Rope(x=x, cos=unsq(cos_u), sin=unsq(sin_u), half=half)


def _angle(t: gs.Tensor, func: str) -> tuple:
    """(f, factor) for ``t = Cos(Concat(f, f)) · factor`` (Sin for ``func='Sin'``)."""
    factor = 1.0
    p = _producer(t)
    if p is not None and (step := _scale_step(p)) is not None:
        t, factor = step
        p = _producer(t)
    if p is None or p.op != func:
        raise _NoMatch(f"RoPE's {func.lower()} is not {func}(angles)")
    cat = _producer(p.inputs[0])
    if cat is None or cat.op != "Concat" or len(cat.inputs) != 2 or cat.inputs[0] is not cat.inputs[1] \
            or not _axis_last(cat, None, rank=3):
        raise _NoMatch("RoPE's angles are not concat(f, f) on the last axis (a rotary form not handled)")
    return cat.inputs[0], factor


def _width(t: gs.Tensor) -> int | None:
    """Static size of the last axis of a projection's output."""
    if t.shape is not None and len(t.shape) and isinstance(t.shape[-1], int) and t.shape[-1] > 0:
        return int(t.shape[-1])
    p = _producer(t)
    if p is None:
        return None
    if p.op == "MatMulNBits":
        return int(p.attrs["N"])
    if p.op == "MatMul":
        w = p.inputs[1]
        while _producer(w) is not None and _producer(w).op in ("DequantizeLinear", "Transpose", "Cast"):
            w = _producer(w).inputs[0] if _producer(w).op != "Transpose" else None
            if w is None:
                return None
        return int(w.shape[-1]) if isinstance(w, gs.Constant) else None
    if p.op == "Add":
        return next((v for v in (_width(i) for i in p.inputs if not isinstance(i, gs.Constant)) if v), None)
    if p.op == "Split" and len(p.inputs) > 1 and _ints(p.inputs[1]) is not None:
        return _ints(p.inputs[1])[p.outputs.index(t)]
    return None


def _is_heads(t: gs.Tensor) -> bool:
    tr = _producer(t)
    return _transpose_0213(tr) and _producer(tr.inputs[0]) is not None and _producer(tr.inputs[0]).op == "Reshape"


def _cache_concat(t: gs.Tensor, graph_inputs: set, graph_outputs: set, what: str, scaled: bool):
    """Walk back from a score/context operand through layout ops (and scalar factors if ``scaled``) to
    ``Concat(past, new)`` → (past, new, concat output). Without a cache the walk stops where the tensor is
    a projection split into heads or where a non-layout op (RoPE's Add) produced it → (None, that tensor, None)."""
    x = t
    while (p := _producer(x)) is not None:
        if p.op in ("QuantizeLinear", "DequantizeLinear"):
            raise _NoMatch(f"the {what} are quantized (Q/DQ): GroupQueryAttention would drop the rounding")
        if p.op == "Concat":
            if len(p.inputs) == 2 and p.inputs[0].name in graph_inputs and p.outputs[0].name in graph_outputs:
                if p.attrs.get("axis") not in (-2, 2):
                    raise _NoMatch(f"the {what} cache is concatenated on axis {p.attrs.get('axis')}, not the sequence axis")
                return p.inputs[0], p.inputs[1], p.outputs[0]
            return None, x, None
        if _is_heads(x):
            return None, x, None
        step = _scale_step(p) if scaled else None
        if p.op not in LAYOUT_OPS and step is None:
            return None, x, None
        x = step[0] if step is not None else p.inputs[0]
    return None, x, None


def _key_scale(t: gs.Tensor) -> float:
    """Product of the scalar factors on the keys between the score MatMul and the cache (or RoPE)."""
    factor, x = 1.0, t
    while (p := _producer(x)) is not None and (p.op in LAYOUT_OPS or _scale_step(p) is not None):
        step = _scale_step(p)
        if step is not None:
            x, factor = step[0], factor * step[1]
        else:
            x = p.inputs[0]
    return factor


@dataclass
class _Plan:
    q: gs.Tensor
    k: gs.Tensor
    v: gs.Tensor
    past_k: gs.Tensor | None
    past_v: gs.Tensor | None
    present_k: gs.Tensor | None
    present_v: gs.Tensor | None
    out: gs.Tensor
    heads: int
    kv_heads: int
    head_dim: int
    scale: float
    cos: gs.Tensor
    sin: gs.Tensor
    softmax: str
    mask: gs.Tensor


def _match(sm: gs.Node, graph_inputs: set, graph_outputs: set) -> _Plan:
    if sm.attrs.get("axis", -1) not in (-1, 3):
        raise _NoMatch("Softmax is not over the last axis")
    # scores = MatMul(...) · c  (+ mask)
    scale, mask, t = 1.0, None, sm.inputs[0]
    while True:
        p = _producer(t)
        if p is None:
            raise _NoMatch("Softmax input is not a score MatMul")
        if p.op == "MatMul":
            scores = p
            break
        if (step := _scale_step(p)) is not None:
            t, scale = step[0], scale * step[1]
        elif p.op == "Add" and mask is None:
            side = [i for i in p.inputs if _producer(i) is not None and _producer(i).op in ("MatMul", "Mul", "Div")]
            if len(side) != 1 and _producer(p.inputs[0]) is not None and _producer(p.inputs[0]).op == "MatMul":
                side = [p.inputs[0]]
            if len(side) != 1:
                raise _NoMatch("cannot tell the scores from the mask")
            mask = p.inputs[1] if side[0] is p.inputs[0] else p.inputs[0]
            t = side[0]
        else:
            raise _NoMatch(f"{p.op} between the scores and Softmax")
    if mask is None:
        raise _NoMatch("no causal mask (bidirectional attention is not what the decoder kernel computes)")
    if not _shape_only(mask):
        raise _NoMatch("the attention mask reads an input's values (padding mask): seqlens_k cannot express it")
    # probabilities → context MatMul
    frontier, context = [sm.outputs[0]], None
    for _ in range(4):
        nxt = []
        for x in frontier:
            for c in x.outputs:
                if c.op == "MatMul" and c.inputs[0] is x:
                    if context is not None and context is not c:
                        raise _NoMatch("the probabilities feed two MatMuls")
                    context = c
                elif c.op in ("IsNaN", "Where", "Cast"):
                    nxt.extend(c.outputs)
                else:
                    raise _NoMatch(f"the probabilities feed a {c.op}")
        frontier = nxt
    if context is None:
        raise _NoMatch("no context MatMul after Softmax")
    tr = context.outputs[0].outputs[0] if len(context.outputs[0].outputs) == 1 else None
    rs = tr.outputs[0].outputs[0] if _transpose_0213(tr) and len(tr.outputs[0].outputs) == 1 else None
    if rs is None or rs.op != "Reshape":
        raise _NoMatch("the context does not leave as Transpose(0, 2, 1, 3) → Reshape")
    # queries
    q_rot, c_q = _back_through_scale(scores.inputs[0])
    rq = _rope(q_rot)
    q = _heads_source(rq.x)
    # keys and values
    past_k, k_rot, present_k = _cache_concat(scores.inputs[1], graph_inputs, graph_outputs, "keys", scaled=True)
    past_v, v_heads, present_v = _cache_concat(context.inputs[1], graph_inputs, graph_outputs, "values", scaled=False)
    if (past_k is None) != (past_v is None):
        raise _NoMatch("only one of keys and values has a cache")
    c_k = _key_scale(scores.inputs[1])
    if past_k is not None and _producer(k_rot) is not None and _scale_step(_producer(k_rot)) is not None:
        raise _NoMatch("the keys are scaled before the cache: the cache would hold other values")
    rk = _rope(k_rot)
    if rk.cos is not rq.cos or rk.sin is not rq.sin or rk.half != rq.half:
        raise _NoMatch("queries and keys are rotated with different angles")
    k = _heads_source(rk.x)
    v = _heads_source(v_heads)
    d = 2 * rq.half
    head = past_k.shape[3] if past_k is not None and past_k.shape is not None and len(past_k.shape) == 4 else None
    if isinstance(head, int) and head != d:
        raise _NoMatch(f"RoPE rotates {d} dimensions of heads of {head} (partial rotary is not handled)")
    qw, kw, vw = _width(q), _width(k), _width(v)
    if not (qw and kw and vw) or qw % d or kw % d or kw != vw or (qw // d) % (kw // d):
        raise _NoMatch(f"projection widths {qw}/{kw}/{vw} do not split into heads of {d}")
    return _Plan(q=q, k=k, v=v, past_k=past_k, past_v=past_v, present_k=present_k, present_v=present_v,
                 out=rs.outputs[0], heads=qw // d, kv_heads=kw // d, head_dim=d, scale=scale * c_q * c_k,
                 cos=rq.cos, sin=rq.sin, softmax=sm.name, mask=mask)


class FuseAttentionPass(Pass):
    """Rewrite each matched attention block into RotaryEmbedding ×2 + GroupQueryAttention (see the module)."""

    name = "fuse-attention-gqa"
    phase = "lower"
    changes_activations = False

    @dataclass(frozen=True)
    class Options:
        probe: bool = True  # run fused beside original on random inputs; keep the fusion only if they agree

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        # the probe's token ids: the vocabulary the driver recorded from structure discovery, else discover it
        vocab = int(graph.model_metadata.get("llmq.vocab_size") or ctx.structure(graph).vocab_size or 2)
        inputs = {t.name for t in graph.gs.inputs}
        outputs = {t.name for t in graph.gs.outputs}
        plans = []
        for sm in [n for n in graph.gs.nodes if n.op == "Softmax"]:
            try:
                plans.append(_match(sm, inputs, outputs))
            except _NoMatch as exc:
                ctx.decline(self.name, sm.name, str(exc))
        verdicts: dict = {}  # one evaluation per distinct mask tensor (the layers usually share one)
        for p in plans:
            if p.mask.name not in verdicts:
                verdicts[p.mask.name] = _mask_is_causal(p.mask, graph)
            if verdicts[p.mask.name] is not None:
                ctx.decline(self.name, p.softmax, verdicts[p.mask.name])
        plans = [p for p in plans if verdicts[p.mask.name] is None]
        position = next((t for t in graph.gs.inputs if t.name == "position_ids"), None)
        if plans and position is None:
            for p in plans:
                ctx.decline(self.name, p.softmax, "the graph has no position_ids input")
            plans = []
        if plans and len({(id(p.cos), id(p.sin)) for p in plans}) != 1:
            for p in plans:
                ctx.decline(self.name, p.softmax, "layers use different RoPE angles")
            plans = []
        if plans and len({p.past_k is None for p in plans}) != 1:
            for p in plans:
                ctx.decline(self.name, p.softmax, "some layers have a KV cache and some not")
            plans = []
        if not plans:
            return PassResult(False, {"fused": 0})
        try:
            caches = self._rope_caches(graph, plans[0], position)
        except _NoMatch as exc:
            for p in plans:
                ctx.decline(self.name, p.softmax, str(exc))
            graph.gs.cleanup(remove_unused_graph_inputs=False)
            return PassResult(False, {"fused": 0})
        lengths = self._lengths(graph, plans[0], position)
        fused = [self._build(graph, p, position, caches, lengths) for p in plans]
        graph.other_opsets.setdefault("com.microsoft", 1)
        stats = {"fused": len(plans), "kv_cache": plans[0].past_k is not None, "heads": plans[0].heads,
                 "kv_heads": plans[0].kv_heads, "head_dim": plans[0].head_dim}
        if self.options.probe:
            try:
                err = _probe(graph, plans, fused, vocab)
                unprobed = None
            except _NoMatch as exc:
                err, unprobed = None, str(exc)
            stats["probe_max_error"] = err  # in units of the tolerance
            if err is None or err > 1.0:
                for node in fused:
                    node.inputs.clear()
                    node.outputs.clear()
                graph.gs.cleanup(remove_unused_graph_inputs=False)
                graph.touch()
                how = "fails to run" if err is None else f"is off by {err:.3g} × the fp32 tolerance"
                reason = unprobed or f"the fused attention {how} on probe inputs; left unfused"
                for p in plans:
                    ctx.decline(self.name, p.softmax, reason)
                logger.warning("%s: %s", self.name, reason)
                return PassResult(False, {"fused": 0, "probe_max_error": err})
        for p, node in zip(plans, fused):  # commit: the fused nodes take over the block's outputs
            for i, t in enumerate((p.out, p.present_k, p.present_v)):
                if t is not None:
                    _producer(t).outputs.clear()  # the old producers die; cleanup drops what fed only them
                    node.outputs[i] = t
        graph.gs.cleanup(remove_unused_graph_inputs=False).toposort()
        graph.touch()
        return PassResult(True, stats)

    # ---- pieces ----
    def _rope_caches(self, graph: Graph, plan: _Plan, position: gs.Tensor) -> tuple:
        f_cos, s_cos = _angle(plan.cos, "Cos")
        f_sin, s_sin = _angle(plan.sin, "Sin")
        if f_cos is not f_sin or s_cos != s_sin:
            raise _NoMatch("RoPE's cos and sin use different angles or scales")
        nodes, reads = _ancestors_inputs(f_cos)
        if reads != {position.name}:
            raise _NoMatch(f"RoPE's angles read {sorted(reads)}, not position_ids alone")
        n = self.name
        pmax = graph.make_node("ReduceMax", [position], "rope_max_position", n, {"keepdims": 0}, out_dtype=np.int64)
        count = graph.make_node("Add", [pmax, graph.make_constant("one", np.asarray(1, np.int64), n)], "rope_positions", n,
                                out_dtype=np.int64)
        rng = graph.make_node("Range", [graph.make_constant("zero", np.asarray(0, np.int64), n), count,
                                        graph.make_constant("one", np.asarray(1, np.int64), n)], "rope_range", n,
                              out_dtype=np.int64)
        all_pos = graph.make_node("Unsqueeze", [rng, graph.make_constant("axis0", np.asarray([0], np.int64), n)],
                                  "rope_all_positions", n, out_dtype=np.int64)
        mapping = {position.name: all_pos}
        for node in nodes:  # a copy of the position → angle subgraph, fed 0 … max(position_ids)
            outs = [gs.Variable(graph.unique_name(f"{o.name}_all"), dtype=o.dtype) for o in node.outputs]
            ins = [mapping.get(i.name, i) if not isinstance(i, gs.Constant) else i for i in node.inputs]
            clone = gs.Node(node.op, name=graph.unique_name(f"{n}/{node.name}"), attrs=dict(node.attrs), inputs=ins,
                            outputs=outs, domain=node.domain)
            graph.gs.nodes.append(clone)
            graph.tag(clone.name, n)
            mapping.update({o.name: c for o, c in zip(node.outputs, outs)})
        angles = mapping[f_cos.name]
        shape = graph.make_constant("rope_cache_shape", np.asarray([-1, plan.head_dim // 2], np.int64), n)
        caches = []
        for func in ("Cos", "Sin"):
            y = graph.make_node(func, [angles], f"rope_{func.lower()}_all", n, out_dtype=np.float32)
            if s_cos != 1.0:
                y = graph.make_node("Mul", [y, graph.make_constant("rope_scale", np.asarray(s_cos, np.float32), n)],
                                    f"rope_{func.lower()}_scaled", n, out_dtype=np.float32)
            caches.append(graph.make_node("Reshape", [y, shape], f"rope_{func.lower()}_cache", n, out_dtype=np.float32))
        return tuple(caches)

    def _lengths(self, graph: Graph, plan: _Plan, position: gs.Tensor) -> tuple:
        """(seqlens_k [B] int32 = past + seq − 1, total_sequence_length scalar int32 = past + seq)."""
        n = self.name
        seq = graph.make_node("Shape", [position], "seq_len", n, {"start": 1, "end": 2}, out_dtype=np.int64)
        batch = graph.make_node("Shape", [position], "batch", n, {"start": 0, "end": 1}, out_dtype=np.int64)
        total = seq
        if plan.past_k is not None:
            past = graph.make_node("Shape", [plan.past_k], "past_len", n, {"start": 2, "end": 3}, out_dtype=np.int64)
            total = graph.make_node("Add", [past, seq], "total_len", n, out_dtype=np.int64)
        last = graph.make_node("Sub", [total, graph.make_constant("one", np.asarray([1], np.int64), n)], "last_pos", n,
                               out_dtype=np.int64)
        per_row = graph.make_node("Expand", [last, batch], "seqlens", n, out_dtype=np.int64)
        seqlens = graph.make_node("Cast", [per_row], "seqlens_k", n, {"to": onnx.TensorProto.INT32}, out_dtype=np.int32)
        scalar = graph.make_node("Reshape", [total, graph.make_constant("scalar", np.zeros(0, np.int64), n)],
                                 "total_scalar", n, out_dtype=np.int64)
        total32 = graph.make_node("Cast", [scalar], "total_sequence_length", n, {"to": onnx.TensorProto.INT32},
                                  out_dtype=np.int32)
        return seqlens, total32

    def _build(self, graph: Graph, p: _Plan, position: gs.Tensor, caches: tuple, lengths: tuple) -> gs.Node:
        """RotaryEmbedding ×2 + GroupQueryAttention beside the block, reading its q, k, v and cache, writing
        new tensors (the probe compares them with the block's own before they take its place)."""
        n = self.name
        cos, sin = caches
        q = graph.make_node("RotaryEmbedding", [p.q, position, cos, sin], f"{p.q.name}_rope", n,
                            {"num_heads": p.heads, "interleaved": 0}, out_dtype=np.float32, domain="com.microsoft")
        k = graph.make_node("RotaryEmbedding", [p.k, position, cos, sin], f"{p.k.name}_rope", n,
                            {"num_heads": p.kv_heads, "interleaved": 0}, out_dtype=np.float32, domain="com.microsoft")
        past = [p.past_k, p.past_v] if p.past_k is not None else [gs.Variable.empty(), gs.Variable.empty()]
        outs = [gs.Variable(graph.unique_name(f"{p.softmax}_{w}"), dtype=np.float32) for w in ("gqa", "present_k", "present_v")]
        node = gs.Node("GroupQueryAttention", name=graph.unique_name(f"{n}/{p.softmax}"), domain="com.microsoft",
                       attrs={"num_heads": p.heads, "kv_num_heads": p.kv_heads, "scale": float(p.scale), "do_rotary": 0},
                       inputs=[q, k, p.v] + past + list(lengths), outputs=outs)
        graph.gs.nodes.append(node)
        graph.tag(node.name, n)
        return node


def _probe(graph: Graph, plans: list, fused: list, vocab: int) -> float | None:
    """Largest error of the fused blocks against the blocks they replace, in units of the tolerance (≤ 1
    passes); None if the fused nodes fail to run or the graph is too large to probe.

    Both run in one session — the fused nodes sit beside the original blocks and read the same q, k, v and
    cache — so each layer is compared on identical inputs. (Comparing the final logits instead would measure
    the model's own sensitivity: on random tokens SmolLM2-135M's outputs move by 0.76 of 28 when ONNX Runtime's
    optimizations are merely switched off, while each block's output agrees to 1e-6.)"""
    pairs = []
    for p, node in zip(plans, fused):
        pairs.append((p.out, node.outputs[0]))
        if p.present_k is not None:
            pairs += [(p.present_k, node.outputs[1]), (p.present_v, node.outputs[2])]
    try:  # the weights are handed to the session as they are (no serialized copy), at any model size
        sess = graph_session(graph, [t.name for pair in pairs for t in pair], session_options())
    except Exception as exc:  # noqa: BLE001 - any refusal means the fusion is not usable
        logger.warning("fused attention does not load: %s", exc)
        return None
    inputs = session_specs(sess)
    for name, *_ in inputs:
        if name not in ("input_ids", "position_ids", "attention_mask") and not name.startswith("past_key_values."):
            raise _NoMatch(f"the graph has an input ({name}) the probe cannot fill; left unfused")
    names = [o.name for o in sess.get_outputs()]
    rng = np.random.default_rng(0)
    kv = plans[0].past_k is not None
    cases = [(1, 5, 0), (1, 3, 4), (2, 1, 6)] if kv else [(1, 7, 0), (2, 4, 0)]
    worst = 0.0
    for batch, seq, past in cases:
        ids = rng.integers(0, vocab, (batch, seq), dtype=np.int64)
        cache = {name: rng.standard_normal((batch, shape[1], past, shape[3])).astype(dtype or np.float32)
                 for name, shape, dtype in inputs if name.startswith("past_key_values.")} if past else None
        feeds = prompt_feeds(inputs, ids, cache)
        try:
            got = dict(zip(names, sess.run(None, feeds)))
        except Exception as exc:  # noqa: BLE001
            logger.warning("fused attention fails on a probe: %s", exc)
            return None
        for ref, new in pairs:
            a, b = got[ref.name], got[new.name]
            if a.shape != b.shape:
                return float("inf")
            tol = PROBE_RTOL * float(np.abs(a).max(initial=0.0)) + PROBE_ATOL
            worst = max(worst, float(np.abs(a - b).max(initial=0.0)) / tol)
    return worst
