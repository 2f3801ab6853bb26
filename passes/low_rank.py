"""Weight quantization with a low-rank error branch: ``X·W ≈ X·Q(W) + (X·A)·B``.

After the per-group quantizer of ``quantize-weights`` (same options), the error ``E = W − Q(W)`` (``[K, N]``)
is approximated by the rank-r ``A·B`` (``A`` ``[K, r]``, ``B`` ``[r, N]``) that minimises the linear's output
error over the calibration tokens,

    min ‖X·(E − A·B)‖²  =  min ‖Lᵀ·(E − A·B)‖_F²,   XᵀX/n + λ·I = L·Lᵀ (Cholesky),

solved exactly by the truncated SVD ``Lᵀ·E ≈ U_r Σ_r V_rᵀ``: ``A = L⁻ᵀ U_r Σ_r^½``, ``B = Σ_r^½ V_rᵀ`` (the
activation-weighted error reconstruction of QERA, Zhang et al. 2024; LQER approximates the same with a
diagonal scaling; SVDQuant splits the low-rank part off ``W`` before quantizing instead of off the error).
LLM activations put most of their energy in a few directions (massive-activation channels), so a small r
removes most of the output error: on SmolLM2-135M, plain RTN g128 with r = 8 keeps 24 % of the layers'
output error and moves WikiText perplexity from 52.1 to 43.1 (16 windows, a torch simulation).

Layouts. *Fused* (the default, for MatMul weights quantized per group): the linears that read the same
``x`` (q/k/v, gate/up) share one float ``t = x·[A_1 … A_m]`` (padded with zeros to a whole number of
blocks), and each reads ``Concat(x, t)`` with the weight ``[Q(W_i); Q(B_i) in its own rows, zeros elsewhere]``
— ``B_i`` becomes extra INT4 blocks of the weight (orthonormal rows ``Vᵀ``, so one scale per block and column
suits them, with ``A_i`` refitted to the quantized ``B̂_i``), and the branch costs one MatMul and one Concat
per input instead of two MatMuls and an Add per linear. ONNX Runtime then runs the whole thing as one
MatMulNBits per linear (on SmolLM2-135M: 360 extra nodes instead of 630 with a branch on every linear, and the
B factors in 4 bits instead of 32). With ``fill_block`` the ranks of an input's linears are raised until
they fill whole blocks, so no ``Pad`` is needed (better output error, more float16 bytes for ``A``).
*Separate* (``fuse: false``, and Gemm or non-blocked weights): two plain float MatMuls and an Add beside
the quantized MatMul. Either way TensorRT and ONNX Runtime both run it; the float factors are stored
in ``branch_dtype`` (float16 by default: a ``Cast`` to float32 that ONNX Runtime folds at load). The report
gives per linear the layout, the float MACs per token (``r·K`` fused, ``r·(K + N)`` separate) and the output
error before and after the branch. The branch MatMuls carry the float-branch role, so structure discovery,
the MAC accounting and later passes do not take them for linears.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import numpy as np

from ..ir.graph import FLOAT_BRANCH, FUSED_INPUT, ROLE_KEY, Graph
from ..ir.passes import PassContext, PassResult
from ..ir.structure import weight_matrix
from .awq import stream_inputs
from .qdq_math import block_size_for, quantize_weight, relative_output_error
from .quantize_weights import QuantizeWeightsPass
from .select import selected_linears

__all__ = ["QuantizeWeightsLowRankPass", "low_rank_error", "whitening"]

logger = logging.getLogger(__name__)

BRANCH_DTYPES = {"float16": np.float16, "float32": np.float32}


def whitening(gram: np.ndarray, damp: float = 0.01) -> np.ndarray:
    """Lower Cholesky factor ``L`` of ``gram + damp·mean(diag)·I`` (float64): ``‖X·Δ‖² = ‖Lᵀ·Δ‖_F²`` per token."""
    g = gram.astype(np.float64)
    return np.linalg.cholesky(g + damp * max(float(np.mean(np.diag(g))), 1e-12) * np.eye(len(g)))


def low_rank_error(gram: np.ndarray, error_kn: np.ndarray, rank: int, damp: float = 0.01,
                   lower: np.ndarray | None = None) -> tuple:
    """``(A [K, r], B [r, N])`` minimising ``‖Lᵀ(E − A·B)‖_F`` with ``L·Lᵀ = gram + damp·mean(diag)·I``:
    the rank-r correction with the least output error over the tokens whose Gram matrix is ``gram``.
    The top singular pairs of ``T = Lᵀ·E`` come from the eigenvectors of the smaller of ``T·Tᵀ`` and ``Tᵀ·T``."""
    lower = whitening(gram, damp) if lower is None else lower
    t = lower.T @ error_kn.astype(np.float64)
    k, n = t.shape
    r = min(rank, k, n)
    small = t @ t.T if k <= n else t.T @ t
    values, vectors = np.linalg.eigh(small)  # ascending
    top = vectors[:, ::-1][:, :r]
    sv = np.sqrt(np.maximum(values[::-1][:r], 0.0))
    root = np.sqrt(sv)
    inv_root = np.where(sv > 0, 1.0 / np.maximum(root, 1e-30), 0.0)
    if k <= n:  # top = U_r:  A = L⁻ᵀ U_r Σ^½,  B = Σ^-½ U_rᵀ T  (= Σ^½ V_rᵀ)
        a, b = np.linalg.solve(lower.T, top * root), inv_root[:, None] * (top.T @ t)
    else:  # top = V_r:  A = L⁻ᵀ T V_r Σ^-½  (= L⁻ᵀ U_r Σ^½),  B = Σ^½ V_rᵀ
        a, b = np.linalg.solve(lower.T, (t @ top) * inv_root), root[:, None] * top.T
    return a.astype(np.float32), b.astype(np.float32)


class QuantizeWeightsLowRankPass(QuantizeWeightsPass):
    """``quantize-weights`` plus, per quantized linear, a rank-r float branch that cancels the output error
    the quantizer leaves (calibrated). Handles MatMul and Gemm linears; declines as ``quantize-weights``."""

    name = "quantize-weights-lowrank"
    phase = "quantize"
    changes_activations = True
    requires_stats = True

    @dataclass(frozen=True)
    class Options(QuantizeWeightsPass.Options):
        rank: int = 16
        damp: float = 0.01  # λ = damp × the mean of the Gram matrix's diagonal
        branch_dtype: str = "float16"
        iterations: int = 1  # > 1: alternate W_q = Q(W − A·B) and A·B = the branch of W − W_q
        fuse: bool = True  # per-group MatMul weights: B as extra INT4 rows of the weight, one x·A per input
        fill_block: bool = False  # fused: raise the ranks of an input's linears until they fill whole blocks

        def __post_init__(self):
            super().__post_init__()
            if self.rank < 1:
                raise ValueError("rank must be ≥ 1")
            if self.iterations < 1:
                raise ValueError("iterations must be ≥ 1")
            if self.damp < 0:
                raise ValueError("damp must be ≥ 0")
            if self.branch_dtype not in BRANCH_DTYPES:
                raise ValueError(f"branch_dtype is one of {', '.join(BRANCH_DTYPES)}")

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        o = self.options
        linears = selected_linears(ctx.structure(graph), ctx, self.name, o.roles, "weight")
        if not linears:
            return PassResult(False, self._stats(0, 0, None))
        inputs = stream_inputs(graph, ctx, sorted({lin.act.name for lin in linears}))
        groups: dict = {}  # q/k/v (gate/up) share their input: one factor, one fused branch input
        for lin in linears:
            groups.setdefault(lin.act.name, []).append(lin)
        totals = dict(done=0, worst=None, reduced=0, branch_macs=0, before=0.0, after=0.0, fused=0)
        steps = ctx.progress(list(groups.values()), "low-rank branches") if ctx.progress else groups.values()
        for members in steps:
            gram = inputs[members[0].act.name].gram
            lower = whitening(gram, o.damp)
            ranks = self._ranks(members)
            fitted = [self._fit(lin, gram, lower, ranks[i], graph.float_dtype) for i, lin in enumerate(members)]
            fused = [f for f in fitted if self._fusable(f)]
            if fused:
                self._fuse(graph, ctx, fused)
            for f in fitted:
                if not self._fusable(f):
                    wsqnr, was_reduced, _ = self._quantize(graph, ctx, f["lin"], f["target"], qw=f["qw"])
                    f.update(wsqnr=wsqnr, reduced=was_reduced, branch=self._cast(f["a"]) @ self._cast(f["b"]))
                    self._branch(graph, f["lin"], *(x.astype(BRANCH_DTYPES[o.branch_dtype]) for x in (f["a"], f["b"])))
                self._account(ctx, f, gram, totals)
        stats = self._stats(totals["done"], totals["reduced"], totals["worst"])
        stats.update(rank=o.rank, branch_dtype=o.branch_dtype, fused=totals["fused"],
                     branch_float_macs_per_token=totals["branch_macs"],
                     mean_out_err_quantized=round(totals["before"] / totals["done"], 6),
                     mean_out_err_lowrank=round(totals["after"] / totals["done"], 6))
        return PassResult(True, stats)

    def _ranks(self, members: list) -> list:
        """Each linear's rank: ``rank``, or with ``fill_block`` in the fused layout the linears that share an input
        split the whole blocks ``rank × their number`` rounds up to (q/k/v at rank 20, blocks of 64: 22, 21,
        21) — the rows would be zero padding otherwise."""
        o = self.options
        ranks = [o.rank] * len(members)
        fusable = [i for i, lin in enumerate(members) if self._fusable_linear(lin)]
        if o.fill_block and fusable:
            block = block_size_for(members[fusable[0]].in_features, o.group_size)
            total = -(-o.rank * len(fusable) // block) * block
            for j, i in enumerate(fusable):
                ranks[i] = total // len(fusable) + (j < total % len(fusable))
        return ranks

    def _fit(self, lin, gram: np.ndarray, lower: np.ndarray, rank: int, scale_dtype) -> dict:
        """The quantized weight and its branch for one linear (alternated ``iterations`` times), not yet
        written to the graph. Everything in ``[K, N]`` except ``target`` (the op's layout)."""
        o = self.options
        w = weight_matrix(lin).astype(np.float32)
        kn = (lambda m: m) if lin.weight_axis == 1 else (lambda m: m.T)  # the op's layout ↔ [K, N]
        target = w
        for step in range(o.iterations):
            qw = quantize_weight(target, lin.weight_axis, o.bits, o.granularity, o.group_size, o.symmetric,
                                 scale_dtype)
            dq = qw.dequantize()
            a, b = low_rank_error(gram, kn(w) - kn(dq), rank, o.damp, lower)
            if step < o.iterations - 1:
                target = w - kn(a @ b)
        return dict(lin=lin, w=kn(w), target=target, qw=qw, dq=kn(dq), a=a, b=b)

    def _fusable_linear(self, lin) -> bool:
        """Fused layout: a MatMul whose weight is blocked along K (``[K, N]``, per group)."""
        return self.options.fuse and lin.node.op == "MatMul" and self.options.granularity == "per-group"

    def _fusable(self, f: dict) -> bool:
        return self._fusable_linear(f["lin"]) and f["qw"].block_size > 0

    def _cast(self, m: np.ndarray) -> np.ndarray:
        """``m`` as the graph computes with it: rounded to ``branch_dtype``, in float32."""
        return m.astype(BRANCH_DTYPES[self.options.branch_dtype]).astype(np.float32)

    def _fuse(self, graph: Graph, ctx: PassContext, fitted: list) -> None:
        """One branch input for the linears that share ``x``: ``t = x·[A_1 … A_m]`` (float, padded with zeros to a
        whole number of the weights' blocks), and each linear reads ``[x, t]`` with ``[Q(W_i); Q(B_i) in its rows]``.

        ``B_i`` is taken with orthonormal rows (``Vᵀ``: one INT4 scale per block and column then suits every
        row), quantized in its own blocks, and ``A_i = E_i·B̂_iᵀ(B̂_i·B̂_iᵀ)⁻¹`` refitted to the quantized
        ``B̂_i`` (the least-squares optimum for a fixed ``B``, whitened or not)."""
        o = self.options
        lin0 = fitted[0]["lin"]
        k, block = lin0.in_features, fitted[0]["qw"].block_size
        total = sum(f["b"].shape[0] for f in fitted)
        width = -(-total // block) * block
        a_cat = np.zeros((k, total), np.float32)
        row = 0
        for f in fitted:
            r, n = f["b"].shape
            norms = np.linalg.norm(f["b"], axis=1)
            unit = f["b"] / np.where(norms > 0, norms, 1.0)[:, None]
            ext = np.zeros((width, n), np.float32)
            ext[row:row + r] = unit
            qb = quantize_weight(ext, 1, o.bits, "per-group", block, o.symmetric, graph.float_dtype)
            b_hat = qb.dequantize()[row:row + r]
            error = f["w"] - f["dq"]
            a = np.linalg.lstsq(b_hat.T.astype(np.float64), error.T.astype(np.float64), rcond=None)[0].T
            a_cat[:, row:row + r] = a
            f.update(qb=qb, a=a.astype(np.float32), b=b_hat, branch=self._cast(a) @ b_hat)
            row += r
        stored = a_cat.astype(BRANCH_DTYPES[o.branch_dtype])
        const = graph.make_constant(f"{lin0.name}.lowrank_a", stored, self.name)
        if stored.dtype != graph.float_dtype:
            const = graph.make_node("Cast", [const], f"{lin0.name}.lowrank_a_f32", self.name, {"to": graph.float_onnx_type},
                                    out_dtype=np.float32, out_shape=[k, total])
        x = lin0.act
        t = graph.make_node("MatMul", [x, const], f"{lin0.name}.lowrank_xa", self.name, out_dtype=np.float32)
        graph.node_metadata.setdefault(Graph.producer(t).name, {})[ROLE_KEY] = FLOAT_BRANCH
        if width > total:  # zeros up to a whole block, on the small t (zero columns of A would be read per token)
            pads = graph.make_constant(f"{lin0.name}.lowrank_pads", np.array([0, width - total], np.int64), self.name)
            axes = graph.make_constant(f"{lin0.name}.lowrank_pad_axes", np.array([-1], np.int64), self.name)
            zero = graph.make_constant(f"{lin0.name}.lowrank_pad_value", np.array(0.0, np.float32), self.name)
            t = graph.make_node("Pad", [t, pads, zero, axes],
                                f"{lin0.name}.lowrank_xa_padded", self.name, out_dtype=np.float32)
        xt = graph.make_node("Concat", [x, t], f"{lin0.name}.lowrank_in", self.name, {"axis": -1}, out_dtype=np.float32)
        graph.node_metadata.setdefault(Graph.producer(xt).name, {})[ROLE_KEY] = FUSED_INPUT
        for f in fitted:
            wsqnr, was_reduced, _ = self._quantize(graph, ctx, f["lin"], f["target"], append=f["qb"], qw=f["qw"])
            f["lin"].node.inputs[0] = xt
            f.update(wsqnr=wsqnr, reduced=was_reduced, fused=True)
        graph.touch()

    def _account(self, ctx: PassContext, f: dict, gram: np.ndarray, totals: dict) -> None:
        lin, a, b = f["lin"], f["a"], f["b"]
        before = relative_output_error(gram, f["w"], f["dq"])
        after = relative_output_error(gram, f["w"], f["dq"] + f["branch"])
        fused = f.get("fused", False)
        macs = a.shape[0] * a.shape[1] + (0 if fused else b.size)  # fused: B runs inside the INT4 MatMul
        ctx.record(lin.name, lowrank_rank=int(a.shape[1]), lowrank_layout="fused" if fused else "separate",
                   lowrank_float_macs_per_token=int(macs),
                   weight_out_err_quantized=round(before, 6), weight_out_err_lowrank=round(after, 6))
        totals["worst"] = f["wsqnr"] if totals["worst"] is None else min(totals["worst"], f["wsqnr"])
        totals["reduced"] += f["reduced"]
        totals["branch_macs"] += macs
        totals["before"] += before
        totals["after"] += after
        totals["fused"] += fused
        totals["done"] += 1

    def _branch(self, graph: Graph, lin, a: np.ndarray, b: np.ndarray) -> None:
        """``y = lin(x) + (x·A)·B`` with A and B cast to float32 when stored narrower."""
        def weight(base, values):
            const = graph.make_constant(f"{lin.name}.{base}", values, self.name)
            if const.values.dtype == graph.float_dtype:
                return const
            return graph.make_node("Cast", [const], f"{lin.name}.{base}_f32", self.name, {"to": graph.float_onnx_type},
                                   out_dtype=np.float32, out_shape=list(values.shape))

        down = graph.make_node("MatMul", [lin.act, weight("lowrank_a", a)], f"{lin.name}.lowrank_xa", self.name,
                               out_dtype=np.float32)
        up = graph.make_node("MatMul", [down, weight("lowrank_b", b)], f"{lin.name}.lowrank_out", self.name,
                             out_dtype=np.float32)
        for t in (down, up):
            graph.node_metadata.setdefault(Graph.producer(t).name, {})[ROLE_KEY] = FLOAT_BRANCH
        graph.add_to_output(lin.node, up, f"{lin.name}.quantized_out", self.name)
