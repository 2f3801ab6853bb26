"""Low-rank error branch: the exact weighted optimum, a lower output error than the quantizer alone on every
linear, branches that structure discovery does not take for linears, and the MatMulNBits lowering intact."""

from __future__ import annotations

import numpy as np
import pytest
from test_matmulnbits import _session
from test_smooth_attention import _ids
from test_smooth_quant import _ctx, _logits

from llmq.backends.ort_lowering import DropBranchPadPass, LowerBlockInt4ToMatMulNBitsPass
from llmq.frontends.onnx_loader import load_graph
from llmq.ir.passes import PassManager
from llmq.ir.structure import discover
from llmq.passes import QuantizeWeightsLowRankPass, QuantizeWeightsPass
from llmq.passes.low_rank import low_rank_error
from llmq.passes.qdq_math import output_error


def _activations(seed=0, n=400, k=48):
    rng = np.random.default_rng(seed)
    return rng.standard_normal((n, k)) * np.where(np.arange(k) % 11 == 3, 30.0, 1.0)  # a few massive channels


def test_low_rank_error_is_the_weighted_optimum():
    """With no damping the error left is exactly the discarded singular values of Lᵀ·E (Eckart–Young in the
    output norm), it beats the plain SVD of E at the same rank, and full rank recovers E."""
    x = _activations()
    gram = x.T @ x / len(x)
    e = np.random.default_rng(2).standard_normal((48, 20)) * 1e-2
    for r in (1, 4, 8):
        a, b = low_rank_error(gram, e, r, damp=0.0)
        assert a.shape == (48, r) and b.shape == (r, 20)
        left = output_error(gram, e - a.astype(np.float64) @ b)
        sv = np.linalg.svd(np.linalg.cholesky(gram).T @ e, compute_uv=False)
        np.testing.assert_allclose(left, np.sum(sv[r:] ** 2), rtol=1e-4)
        u, s, vt = np.linalg.svd(e, full_matrices=False)
        plain = output_error(gram, e - (u[:, :r] * s[:r]) @ vt[:r])
        assert left < plain
    a, b = low_rank_error(gram, e, 20, damp=0.0)
    np.testing.assert_allclose(a.astype(np.float64) @ b, e, atol=1e-5)


def test_branch_lowers_every_linear_error_and_the_logit_error(planted):
    graph = load_graph(planted)
    ctx = _ctx()
    records = PassManager([QuantizeWeightsLowRankPass(bits=4, granularity="per-group", group_size=32, rank=4)],
                          verify=True).run(graph, ctx)
    stats = records[0]["stats"]
    assert stats["quantized"] == 14 and stats["mean_out_err_lowrank"] < 0.5 * stats["mean_out_err_quantized"]
    rows = [row for row in ctx.layers.values() if "lowrank_rank" in row]
    assert len(rows) == 14
    for row in rows:
        assert row["weight_out_err_lowrank"] < row["weight_out_err_quantized"], row
    # discovery still sees the same 15 linears (the branches carry the float-branch role)
    assert len(discover(load_graph(planted)).linears) == len(discover(graph).linears) == 15
    rtn = load_graph(planted)
    PassManager([QuantizeWeightsPass(bits=4, granularity="per-group", group_size=32)]).run(rtn, _ctx())
    held_out = np.random.default_rng(7).integers(0, 256, (2, 40), dtype=np.int64)
    ref = _logits(planted, held_out)
    err_lr = np.abs(_logits(graph.to_model(), held_out) - ref).mean()
    err_rtn = np.abs(_logits(rtn.to_model(), held_out) - ref).mean()
    assert err_lr < 0.7 * err_rtn, (err_lr, err_rtn)


@pytest.mark.parametrize("layout", ["fused", "fused-padded", "separate"])
def test_branch_survives_matmulnbits_lowering(tiny_llama_onnx, layout):
    graph = load_graph(tiny_llama_onnx)
    ctx = _ctx()
    casts_before = sum(n.op == "Cast" for n in graph.gs.nodes)
    fuse, fill = layout != "separate", layout == "fused"
    records = PassManager([QuantizeWeightsLowRankPass(bits=4, granularity="per-group", group_size=32, rank=2,
                                                      branch_dtype="float16", fuse=fuse, fill_block=fill)],
                          verify=True).run(graph, ctx)
    assert records[0]["stats"]["fused"] == (14 if fuse else 0)
    qdq = graph.to_model()
    casts = sum(n.op_type == "Cast" for n in qdq.graph.node) - casts_before
    concats = [n for n in qdq.graph.node if n.op_type == "Concat" and "lowrank" in n.output[0]]
    pads = sum(n.op_type == "Pad" for n in qdq.graph.node)
    ranks = {name: row["lowrank_rank"] for name, row in ctx.layers.items() if "lowrank_rank" in row}
    if fuse:  # one x·A (float16 behind a Cast) and one Concat per shared input: q/k/v, o, gate/up, down × 2 layers
        assert casts == len(concats) == 8
    else:  # A and B of each of the 14 branches
        assert casts == 28 and not concats
    if fill:  # the ranks of an input's linears fill one block of 32: no padding
        assert pads == 0
        assert [ranks[f"layers.0.attn.{r}"] for r in "qkv"] == [11, 11, 10] and ranks["layers.0.attn.o"] == 32
        assert ranks["layers.0.mlp.gate"] == ranks["layers.0.mlp.up"] == 16
    else:  # rank 2 each, t padded to a whole block of 32
        assert pads == (8 if fuse else 0) and set(ranks.values()) == {2}
    # structure discovery still sees the same 15 linears with the same roles, and nothing else (a later pass
    # such as quantize-weights on the down projections finds them)
    before, after = discover(load_graph(tiny_llama_onnx)), discover(graph)
    assert len(before.linears) == len(after.linears) == 15
    assert sorted(lin.name for lin in before.linears) == sorted(lin.name for lin in after.linears)
    assert sorted((lin.name, lin.producer) for lin in before.linears) == sorted((lin.name, lin.producer) for lin in after.linears)
    records = PassManager([LowerBlockInt4ToMatMulNBitsPass(), DropBranchPadPass()], verify=True).run(graph, ctx)
    assert records[0]["stats"]["lowered"] == 14
    # the padded layout's Pads go (MatMulNBits takes the ragged last block); the others have none to drop
    assert records[1]["stats"]["dropped"] == (8 if fuse and not fill else 0)
    lowered = graph.to_model()
    assert sum(n.op_type == "MatMulNBits" for n in lowered.graph.node) == 14
    assert not any(n.op_type == "Pad" for n in lowered.graph.node)
    ids = _ids()
    # the Q/DQ reference unoptimized: ONNX Runtime's own DQ→MatMulNBits fusion defaults to int8 activations
    ref = _session(qdq, optimize=False).run(None, {"input_ids": ids})[0]
    for optimize in (False, True):
        got = _session(lowered, optimize).run(None, {"input_ids": ids})[0]
        np.testing.assert_allclose(got, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_fused_layout_keeps_the_branch_gain(planted):
    """B quantized to INT4 inside the weight (A refitted to it) keeps nearly all of the float branch's gain:
    on every linear at least 97 % of the output-error reduction the separate float branch achieves."""
    errors = {}
    for fuse in (True, False):
        ctx = _ctx()
        graph = load_graph(planted)
        PassManager([QuantizeWeightsLowRankPass(bits=4, granularity="per-group", group_size=32, rank=4,
                                                fuse=fuse, fill_block=False)], verify=True).run(graph, ctx)
        errors[fuse] = {name: row for name, row in ctx.layers.items() if "lowrank_rank" in row}
        assert {row["lowrank_layout"] for row in errors[fuse].values()} == {"fused" if fuse else "separate"}
    for name, row in errors[True].items():
        separate = errors[False][name]
        assert row["weight_out_err_quantized"] == separate["weight_out_err_quantized"]
        before = row["weight_out_err_quantized"]
        kept = (before - row["weight_out_err_lowrank"]) / (before - separate["weight_out_err_lowrank"])
        assert kept >= 0.97, (name, row, separate)  # measured: 0.997 or more on every linear


def test_a_later_pass_finds_the_linears_a_fused_branch_left(tiny_llama_onnx):
    """Branches on the norm-fed linears only, then plain INT4 for the rest: the second pass still finds o and
    down (structure discovery looks through the fused input and the float branches)."""
    graph = load_graph(tiny_llama_onnx)
    records = PassManager([QuantizeWeightsLowRankPass(bits=4, granularity="per-group", group_size=32, rank=2,
                                                      roles=("q", "k", "v", "gate", "up")),
                           QuantizeWeightsPass(bits=4, granularity="per-group", group_size=32)], verify=True).run(graph, _ctx())
    assert records[0]["stats"]["quantized"] == 10 and records[1]["stats"]["quantized"] == 4
