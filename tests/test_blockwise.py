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
                assert np.abs(b.hist - a.hist).sum() <= 1e-4 * a.count  # a value on a bin edge may move
            seen.update(mine)
        runner.advance(index)
        # nothing stays on disk that no later part reads
        assert len(os.listdir(runner.workdir)) == len(batches) * len(
            [t for t, last in parts.saved().items() if last > index and t in runner._saved])
    assert seen == set(names)
    assert runner.bytes_written > 0
