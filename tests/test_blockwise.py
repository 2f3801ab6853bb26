"""Block partitioning and block-wise calibration: the graph cut at its residual stream into prefix, one part per
decoder block and head; calibration batches propagated part by part give the statistics the whole-graph
collection gives."""

from __future__ import annotations

import os

import numpy as np
import pytest
from family_models import build_family, export_family

from llmq.calib.blockwise import BlockwiseRunner
from llmq.calib.collect import collect_stats
from llmq.frontends.onnx_loader import load_graph
from llmq.ir.partition import partition
from llmq.ir.structure import discover


@pytest.fixture(scope="module")
def models(tmp_path_factory, tiny_tokenizer, tiny_llama_onnx, tiny_gpt2_onnx, tiny_llama_kv_onnx):
    out = {"llama": tiny_llama_onnx, "gpt2": tiny_gpt2_onnx, "llama-kv": tiny_llama_kv_onnx}
    for family in ("gpt-neox", "gemma2"):
        root = tmp_path_factory.mktemp(family)
        out[family] = export_family(family, build_family(family, str(root / "hf"), tiny_tokenizer), str(root / "m.onnx"))
    return out


def _batches(n=3, seq=24):
    return [np.random.default_rng(i).integers(0, 300, (1, seq), dtype=np.int64) for i in range(n)]


@pytest.mark.parametrize("name", ["llama", "gpt2", "llama-kv", "gpt-neox", "gemma2"])
def test_partition_covers_the_graph(models, name):
    graph = load_graph(models[name])
    structure = discover(graph)
    parts = partition(graph, structure)
    layers = sorted({lin.layer for lin in structure.linears if lin.layer is not None})
    assert [p.name for p in parts.parts] == ["prefix"] + [f"layers.{i}" for i in layers] + ["head"]
    owner = parts.of_node()
    for lin in structure.linears:  # every linear sits in the part of its own layer, the LM head in the head
        assert owner[lin.node.name] == (f"layers.{lin.layer}" if lin.layer is not None else "head"), lin.name
    outputs = {t.name for t in graph.gs.outputs}
    assert outputs <= {o for p in parts.parts for o in p.outputs}
    for p in parts.parts[1:-1]:  # blocks hold their weights: no part reads another part's weights
        assert not any(i.startswith("inner.") and i.endswith("weight") for i in p.inputs)


@pytest.mark.parametrize("name", ["llama", "gpt2", "llama-kv", "gpt-neox", "gemma2"])
def test_blockwise_statistics_match_the_whole_graph(models, name, tmp_path):
    graph = load_graph(models[name])
    structure = discover(graph)
    parts = partition(graph, structure)
    batches = _batches()
    names = sorted({lin.act.name for lin in structure.linears})
    whole = collect_stats(graph, names, batches)
    owner = parts.of_node()
    runner = BlockwiseRunner(graph, parts, batches, workdir=str(tmp_path / "work"))
    os.makedirs(runner.workdir, exist_ok=True)
    seen = set()
    for index, part in enumerate(parts.parts):
        mine = sorted({n for n in names if graph.producer(graph.tensors()[n]) is not None
                       and owner.get(graph.producer(graph.tensors()[n]).name) == part.name})
        if mine:
            stats = runner.stats(index, mine)
            for n in mine:
                a, b = whole[n], stats[n]
                np.testing.assert_allclose(b.channel_absmax, a.channel_absmax, rtol=1e-5, atol=1e-6, err_msg=n)
                np.testing.assert_allclose([b.min, b.max], [a.min, a.max], rtol=1e-5, atol=1e-6, err_msg=n)
                assert b.count == a.count and b.hist_range == pytest.approx(a.hist_range, rel=1e-5)
                # a value on a bin edge may move (a part fuses as the whole model does, its sums in another order)
                assert np.abs(b.hist - a.hist).sum() <= max(2, 1e-4 * a.count)
            seen.update(mine)
        runner.advance(index)
        # nothing stays on disk that neither this part nor a later one reads
        assert len(os.listdir(runner.workdir)) == len(batches) * len(
            [t for t, last in parts.saved().items() if last >= index and t in runner._saved])
    assert seen == set(names)
    assert runner.bytes_written > 0


HEAD_RECIPE = """name: head-{granularity}
opset: 21
verify: {{max_kl: 1.0, max_rel_error: 1.0}}
passes:
  - quantize-weights: {{bits: 8, granularity: {granularity}, group_size: 16, roles: [q, k, v, o, gate, up, down, lm_head]}}
"""


@pytest.mark.parametrize("granularity", [None, "per-channel", "per-group"])
def test_a_wide_head_runs_in_column_slices_with_the_same_outputs(models, granularity, tmp_path, calib_text,
                                                                 monkeypatch):
    """The LM head over a threshold runs a slice of its columns at a time (Llama-3-8B's would need a 2 GB
    float32 copy): the same logits as one session, on the float head and on a quantized one (its
    dequantization's per-channel or per-group scales sliced with the weight)."""
    import llmq.calib.blockwise as blockwise
    from llmq.backends.onnxruntime import fused_ops

    path = models["llama"]
    if granularity is not None:
        recipe = tmp_path / "head.yaml"
        recipe.write_text(HEAD_RECIPE.format(granularity=granularity))
        path = _compile(path, str(recipe), tmp_path / "c", calib_text).paths["model"]
    graph = load_graph(path)
    parts = partition(graph, discover(graph))
    head = len(parts.parts) - 1
    batches = _batches(2)

    def head_outputs(workdir):
        runner = BlockwiseRunner(graph, parts, batches, workdir=str(tmp_path / workdir))
        os.makedirs(runner.workdir)
        for i in range(head):
            runner.advance(i)
        got: list = []
        names = list(parts.parts[head].inputs[:1]) + ["logits"]
        runner.run(head, names, lambda n, v: got.append((n, v)))
        assert os.listdir(runner.workdir) and not any(f.startswith("slices-") for f in os.listdir(runner.workdir))
        return got

    assert blockwise.wide_matmul(graph, ["logits"]) is None
    whole = head_outputs("whole")
    monkeypatch.setattr(blockwise, "SLICE_BYTES", 1)
    size = blockwise.wide_matmul(graph, ["logits"]).slices  # 4 bytes a weight element
    monkeypatch.setattr(blockwise, "SLICE_BYTES", size // 3 + 1)
    wide = blockwise.wide_matmul(graph, ["logits"])
    assert wide.slices == 3 and wide.columns == whole[-1][1].shape[-1]
    assert len(wide.axes) == (3 if granularity else 1)  # the weight, and a dequantization's scale and zero point
    sliced = head_outputs("sliced")
    assert [name for name, _ in sliced] == [name for name, _ in whole]  # the same order, batch by batch
    for (name, a), (_, b) in zip(whole, sliced):
        assert a.shape == b.shape and a.dtype == b.dtype, name
        np.testing.assert_allclose(b, a, rtol=1e-5, atol=1e-5, err_msg=name)
    # the onnxruntime backend's build check by parts opens the head's first slice: what it fuses is the whole's
    assert fused_ops(path, pieces=blockwise.part_openers(graph, parts)) == fused_ops(path)


def test_a_sweep_runs_a_wide_head_in_column_slices(models, monkeypatch):
    """The sensitivity budget's sweep (one sample carried through the parts in memory) also runs a wide LM
    head a slice at a time, with the same logits."""
    import llmq.calib.blockwise as blockwise

    graph = load_graph(models["llama"])
    parts = partition(graph, discover(graph))

    def logits():
        sweep = blockwise.PartSweep(graph, parts, _batches(1)[0], list(graph.gs.inputs))
        state: dict = {}
        for index, _, run in sweep:
            out = run(state)
            state = sweep.carry(index, state, out)
        return out["logits"]

    whole = logits()
    monkeypatch.setattr(blockwise, "SLICE_BYTES", 1)
    monkeypatch.setattr(blockwise, "SLICE_BYTES", blockwise.wide_matmul(graph, ["logits"]).slices // 4 + 1)
    assert blockwise.wide_matmul(graph, ["logits"]).slices == 4
    opened, session = [], blockwise._slice_session
    monkeypatch.setattr(blockwise, "_slice_session", lambda *a, **k: opened.append(a[5:7]) or session(*a, **k))
    np.testing.assert_allclose(logits(), whole, rtol=1e-5, atol=1e-5)
    n = whole.shape[-1]
    assert opened == [(n * k // 4, n * (k + 1) // 4) for k in range(4)]


# ---------------------------------------------------------------- the block-by-block compile

def _compile(model, recipe, out, calib_text, **kw):
    from llmq.driver import compile as llmq_compile

    return llmq_compile(model, recipe, str(out), calib=calib_text, calib_samples=3, calib_seq_len=48, quiet=True, **kw)


def _act_scales(path: str) -> list:
    """The per-tensor activation scales of a compiled model, sorted (initializer names depend on the order
    constants were made in, so values are compared)."""
    import onnx

    model = onnx.load(path)
    inits = {i.name: onnx.numpy_helper.to_array(i) for i in model.graph.initializer}
    return sorted(float(inits[n.input[1]]) for n in model.graph.node
                  if n.op_type == "QuantizeLinear" and n.input[1] in inits and inits[n.input[1]].ndim == 0)


def test_float_propagation_equals_the_whole_graph_compile(models, tmp_path, calib_text):
    """Block by block with float propagation, every block is calibrated on exactly what the whole-graph
    compile calibrates it on: the same activation scales and weights, and the report says how it ran."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: plain-float\ncalibration: {propagate: float}\n"
                      "passes:\n  - smooth-quant: {alpha: 0.5}\n  - quantize-activations\n  - quantize-weights\n")
    blocks = _compile(models["llama"], str(recipe), tmp_path / "blocks", calib_text)
    whole = _compile(models["llama"], str(recipe), tmp_path / "whole", calib_text, blocks=False)
    mode = blocks.report["compile_mode"]
    assert mode["mode"] == "blocks" and mode["propagate"] == "float"
    assert [b["name"] for b in mode["blocks"]] == ["prefix", "layers.0", "layers.1", "head"]
    assert whole.report["compile_mode"] == {"mode": "whole", "why": "block-by-block compile turned off (--no-blocks)"}
    a, b = _act_scales(whole.paths["model"]), _act_scales(blocks.paths["model"])
    assert len(a) == len(b) > 0
    np.testing.assert_allclose(b, a, rtol=1e-4)
    va = whole.report["verification"]["outputs"]["logits"]
    vb = blocks.report["verification"]["outputs"]["logits"]
    assert vb["kl"] == pytest.approx(va["kl"], rel=0.05, abs=1e-7)
    # the smoothing proved itself on each block's outputs
    smooth = next(p for p in blocks.report["passes"] if p["pass"] == "smooth-quant")
    assert smooth["modified"] and 0 <= smooth["stats"]["exactness_error"] < 1e-4


@pytest.mark.parametrize("name", ["llama", "gpt2", "gemma2"])
def test_block_compile_with_quantized_propagation(models, name, tmp_path, calib_text):
    """The default order (each block calibrated on its quantized predecessors' outputs: GPTQ's) compiles within
    the recipe's bound; the report gives time per block and the bytes moved; a recipe with a sensitivity budget
    compiles in two sweeps of the blocks, the budget decided between them."""
    result = _compile(models[name], "w4a16-gptq", tmp_path / "o", calib_text)
    mode, io = result.report["compile_mode"], result.report["io"]
    assert mode["mode"] == "blocks" and mode["propagate"] == "quantized"
    assert all(b["seconds"] >= 0 for b in mode["blocks"]) and mode["seconds_per_block"] > 0
    assert io["activation_bytes_written"] > 0 and io["weight_bytes_spilled"] > 0 and io["output_bytes"] > 0
    assert result.report["verification"]["within_bound"]
    assert result.report["totals"]["quantized_weights"] == sum(b["linears"] for b in mode["blocks"]) - 1  # LM head
    ranked = _compile(models[name], "w8a8", tmp_path / "w8a8", calib_text, allow_loss=True)
    mode = ranked.report["compile_mode"]
    assert mode["mode"] == "blocks" and mode["sweeps"] == 2
    assert {b["sweep"] for b in mode["blocks"]} == {1, 2} and len(mode["blocks"]) == 2 * mode["parts"]
    assert ranked.report["verification"]["within_bound"]
    sens = next(p for p in ranked.report["passes"] if p["pass"] == "sensitivity")["stats"]
    assert sens["measure"].startswith("block output noise") and sens["kl_joint_all"] > 0


def test_sensitivity_by_parts_measures_the_whole_models_kl(models, tmp_path, calib_text):
    """Block by block, the sensitivity budget ranks groups by the noise each adds at its block's output, but
    the joint output KLs it decides on are measured exactly, carried through the parts: with every group
    quantized it is the whole-model measurement's KL; the budget it picks meets max_kl measured that way."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: budget\npasses:\n  - smooth-quant: {alpha: 0.5}\n"
                      "  - sensitivity: {max_kl: 3.0e-7, min_int8_macs: 0.3, ranking: marginal}\n"
                      "  - quantize-activations\n  - quantize-weights\n")
    blocks = _compile(models["llama"], str(recipe), tmp_path / "blocks", calib_text)
    whole = _compile(models["llama"], str(recipe), tmp_path / "whole", calib_text, blocks=False)
    sb = next(p for p in blocks.report["passes"] if p["pass"] == "sensitivity")["stats"]
    sw = next(p for p in whole.report["passes"] if p["pass"] == "sensitivity")["stats"]
    assert blocks.report["compile_mode"]["mode"] == "blocks" and whole.report["compile_mode"]["mode"] == "whole"
    assert sw["kl_joint_all"] > 3e-7  # the budget has work to do on this model
    assert sb["kl_joint_all"] == pytest.approx(sw["kl_joint_all"], rel=1e-3)
    assert sb["kl_joint_after_budget"] <= 3e-7 or sb["limited_by_min_int8_macs"]
    assert sb["kept_float"] and sb["budgets_measured"] >= 2
    rows = [r for r in blocks.report["layers"] if "sensitivity_rank" in r]
    assert rows and all(r["sensitivity_block_noise"] >= 0 for r in rows)
    kept = {r["name"] for r in blocks.report["layers"] if "sensitivity_rank" in r and "act_bits" not in r}
    assert set(sb["kept_float"]) <= kept


def test_sensitivity_by_parts_keeps_the_asked_count_when_it_meets_the_budget(models, tmp_path, calib_text):
    """``keep_float`` groups float already meet a loose ``max_kl``: block by block the budget keeps exactly that
    many (no bracketing past it), and the declines its selection makes are recorded once, not once per sweep."""
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: budget\npasses:\n  - smooth-quant: {alpha: 0.5}\n"
                      "  - sensitivity: {keep_float: 2, max_kl: 10.0}\n"
                      "  - quantize-activations\n  - quantize-weights\n")
    blocks = _compile(models["llama"], str(recipe), tmp_path / "blocks", calib_text, exclude=("*down*",))
    assert blocks.report["compile_mode"]["mode"] == "blocks"
    sb = next(p for p in blocks.report["passes"] if p["pass"] == "sensitivity")["stats"]
    assert len(sb["kept_float"]) == 2 and sb["kl_joint_after_budget"] <= 10.0
    mine = [(d["where"], d["reason"]) for d in blocks.report["declined"] if d["pass"] == "sensitivity"]
    assert mine and len(mine) == len(set(mine))  # the excluded down projections: declined once each


def test_awq_prefetches_only_what_it_uses(models, tmp_path, calib_text, monkeypatch):
    """With ``--exclude`` naming a group's only linear, the block loop does not collect that group's Gram sums
    in the advancing run (at 8B a down-proj's is 0.8 GB): every tensor prefetched is one AWQ smooths."""
    import llmq.passes.awq as awq

    asked, used = set(), set()
    prefetch, stream = awq.ActivationAwareScalesPass.prefetch_inputs, awq.stream_inputs

    def recorded(self, structure, ctx):
        fetch = prefetch(self, structure, ctx)
        asked.update(fetch[0] if fetch else ())
        return fetch

    def consumed(graph, ctx, names):
        used.update(names)
        return stream(graph, ctx, names)

    monkeypatch.setattr(awq.ActivationAwareScalesPass, "prefetch_inputs", recorded)
    monkeypatch.setattr(awq, "stream_inputs", consumed)
    result = _compile(models["llama"], "w4a16", tmp_path / "x", calib_text, exclude=("*mlp.down",))
    assert result.report["compile_mode"]["propagate"] == "float"
    downs = {d["where"] for d in result.report["declined"] if d["pass"] == "awq"}
    assert downs and all(w.endswith("mlp.down") for w in downs)
    assert asked and asked == used, (asked - used, used - asked)


@pytest.mark.parametrize("recipe,backend", [("w8a16", "qdq"), ("w4a16", "onnxruntime")])
def test_verification_by_parts_equals_whole(models, recipe, backend, tmp_path, calib_text, monkeypatch):
    """Verifying one part at a time (large models) measures what the whole-model check measures, also on a
    model whose attention the onnxruntime backend fused."""
    import llmq.driver as driver

    whole = _compile(models["llama"], recipe, tmp_path / "a", calib_text, backend=backend)
    monkeypatch.setattr(driver, "VERIFY_BY_PARTS_OVER", 0)
    parts = _compile(models["llama"], recipe, tmp_path / "b", calib_text, backend=backend)
    va, vb = whole.report["verification"], parts.report["verification"]
    assert vb.get("by_parts") and not va.get("by_parts")
    for key, value in va["outputs"]["logits"].items():
        assert vb["outputs"]["logits"][key] == pytest.approx(value, rel=1e-4, abs=1e-9), key
    assert [b["rel_error"] for b in vb["blocks"]] == pytest.approx([b["rel_error"] for b in va["blocks"]], rel=1e-4)
    ba, bb = whole.report["backend"], parts.report["backend"]
    if backend == "onnxruntime":  # the build check by parts finds what one session over the whole model fuses
        assert bb["checked_by_parts"] == 4 and "checked_by_parts" not in ba  # prefix, 2 blocks, head
        assert bb["fused_ops"] == ba["fused_ops"] and any("NBits" in k for k in ba["fused_ops"])


def test_post_ln_and_parallel_layouts_compile_whole(tmp_path, tiny_tokenizer):
    """A post-LN block's input norm sits in the block before (a fold into it would change outputs already
    propagated) and Falcon's layer-0 cut lands after its shared LayerNorm (not a chain): both compile whole,
    saying why; a pre-LN model runs by blocks."""
    from llmq.blocks import plan_blocks
    from llmq.ir.passes import PassManager
    from llmq.recipes import load_recipe

    reasons = {}
    for family in ("opt-postln", "falcon", "opt"):
        path = export_family(family, build_family(family, str(tmp_path / family), tiny_tokenizer),
                             str(tmp_path / f"{family}.onnx"))
        graph = load_graph(path)
        plan = plan_blocks(graph, discover(graph), PassManager(load_recipe("w4a16").build()), "quantized")
        reasons[family] = plan.why_whole if plan.parts is None else None
    assert "post-LN" in reasons["opt-postln"]
    assert "chain" in reasons["falcon"]
    assert reasons["opt"] is None


def test_a_part_keeps_what_a_subgraph_reads_from_outside():
    """A part cut back from its outputs keeps the nodes whose outputs only an If branch reads (from the outer
    scope), and the tensors a nested branch reads: the cut part computes what the whole graph does."""
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    from llmq.calib.blockwise import _subgraph_reads, part_model
    from llmq.ir.partition import Part

    one = numpy_helper.from_array(np.ones(4, np.float32), "one")
    inner = helper.make_graph([helper.make_node("Add", ["neg", "one"], ["deep"])], "inner", [],
                              [helper.make_tensor_value_info("deep", TensorProto.FLOAT, [4])])
    then_branch = helper.make_graph(
        [helper.make_node("If", ["cond"], ["t"], then_branch=inner, else_branch=inner)], "then", [],
        [helper.make_tensor_value_info("t", TensorProto.FLOAT, [4])])
    else_branch = helper.make_graph([helper.make_node("Sub", ["neg", "one"], ["e"])], "else", [],
                                    [helper.make_tensor_value_info("e", TensorProto.FLOAT, [4])])
    graph = helper.make_graph(
        [helper.make_node("Relu", ["x"], ["relu"]), helper.make_node("Neg", ["x"], ["neg"]),
         helper.make_node("If", ["cond"], ["branch"], then_branch=then_branch, else_branch=else_branch),
         helper.make_node("Mul", ["relu", "branch"], ["z"])], "g",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, [4]), helper.make_tensor_value_info("cond", TensorProto.BOOL, [])],
        [helper.make_tensor_value_info("z", TensorProto.FLOAT, [4])], [one])
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    assert _subgraph_reads(then_branch) == {"cond", "neg", "one"} and _subgraph_reads(else_branch) == {"neg", "one"}
    cut = part_model(model, Part("head", ("x", "cond"), ("z",), ()), ["z"], {"x": [4], "cond": []})
    assert sorted(n.op_type for n in cut.graph.node) == ["If", "Mul", "Neg", "Relu"]
    assert [i.name for i in cut.graph.initializer] == ["one"]
    x = np.array([-2.0, -0.5, 0.5, 2.0], np.float32)
    for cond in (True, False):
        feeds = {"x": x, "cond": np.array(cond)}
        want = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
        got = ort.InferenceSession(cut.SerializeToString(), providers=["CPUExecutionProvider"]).run(None, feeds)[0]
        np.testing.assert_array_equal(got, want)


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_awq_gram_sums_come_from_the_run_that_advances_the_block(models, name, tmp_path, calib_text, monkeypatch):
    """With float propagation a block's forward serves both its advance and AWQ's Gram sums: one run of each
    decoder block fewer, the same Gram sums (to float32 rounding: ONNX Runtime may fuse a block differently when
    it returns the block's outputs too; measured: the same bits on Llama, one byte of the model apart on GPT-2)
    and the same compile."""
    import llmq.calib.blockwise as blockwise
    import llmq.passes.awq as awq

    runs: list = []
    grams: dict = {"once": {}, "twice": {}}
    mode = ["once"]
    run, stream = blockwise.BlockwiseRunner.run, awq.stream_inputs

    def counted(self, index, names, each, batches=None):
        runs.append(index)
        return run(self, index, names, each, batches)

    def captured(graph, ctx, names):
        out = stream(graph, ctx, names)
        grams[mode[0]].update({n: v.gram.copy() for n, v in out.items()})
        return out

    monkeypatch.setattr(blockwise.BlockwiseRunner, "run", counted)
    monkeypatch.setattr(awq, "stream_inputs", captured)
    once = _compile(models[name], "w4a16", tmp_path / "once", calib_text)
    runs_once, runs[:] = list(runs), []
    mode[0] = "twice"
    monkeypatch.setattr(awq.ActivationAwareScalesPass, "prefetch_inputs", lambda self, structure, ctx: None)
    twice = _compile(models[name], "w4a16", tmp_path / "twice", calib_text)
    assert once.report["compile_mode"]["propagate"] == "float"
    decoder = [i for i, b in enumerate(once.report["compile_mode"]["blocks"]) if b["linears"] and b["name"] != "head"]
    assert decoder and all(runs.count(i) == runs_once.count(i) + 1 for i in decoder), (runs_once, runs)
    assert set(grams["once"]) == set(grams["twice"]) and len(grams["once"]) >= 2 * len(decoder)
    for tensor, g in grams["once"].items():
        np.testing.assert_allclose(g, grams["twice"][tensor], rtol=1e-5, atol=1e-6 * np.abs(g).max())
    kl = [r.report["verification"]["outputs"]["logits"]["kl"] for r in (once, twice)]
    assert kl[0] == pytest.approx(kl[1], rel=0.05, abs=1e-7)
