"""The pass contract and manager: ordering checked at build, timing, dump, verify, reproducer, stale stats."""

from __future__ import annotations

import os

import numpy as np
import pytest
from conftest import mlp_model

from llmq.ir import Graph
from llmq.ir.errors import PassError, UsageError
from llmq.ir.passes import Pass, PassContext, PassManager, PassResult
from llmq.passes import QuantizeActivationsPass, QuantizeWeightsPass

ALL = ("q", "k", "v", "qkv", "o", "gate", "up", "down", "fc1", "fc2", "lm_head", "unknown")


class _Lower(Pass):
    name = "fake-lower"
    phase = "lower"

    def run(self, graph, ctx):
        return PassResult(False)


class _Broken(Pass):
    name = "broken"
    phase = "transform"

    def run(self, graph, ctx):
        raise RuntimeError("boom")


class _Transform(Pass):
    name = "fake-transform"
    phase = "transform"

    def run(self, graph, ctx):
        return PassResult(False)


def test_order_is_checked_when_the_pipeline_is_built():
    with pytest.raises(UsageError, match="cannot run after"):
        PassManager([_Lower(), _Transform()])
    PassManager([_Transform(), QuantizeWeightsPass(), _Lower()])  # fine


def test_records_dump_and_verify(tmp_path):
    graph = Graph.from_model(mlp_model())
    pm = PassManager([_Transform(), QuantizeWeightsPass(roles=ALL)], verify=True, dump_dir=str(tmp_path))
    records = pm.run(graph, PassContext())
    assert [r["modified"] for r in records] == [False, True]
    assert all(r["seconds"] >= 0 for r in records)
    assert os.listdir(tmp_path) == ["02-quantize-weights.onnx"]  # only passes that changed the graph
    assert "quantize-weights(bits=8" in pm.describe()
    # provenance: every created node/initializer names its pass
    model = graph.to_model()
    created = [n for n in model.graph.node if n.op_type == "DequantizeLinear"]
    assert created and all({p.key: p.value for p in n.metadata_props}.get("llmq.pass") == "quantize-weights" for n in created)


def test_failure_names_the_pass_and_leaves_a_reproducer(tmp_path):
    graph = Graph.from_model(mlp_model())
    with pytest.raises(PassError, match="pass 'broken'.*boom"):
        PassManager([_Broken()], dump_dir=str(tmp_path)).run(graph, PassContext())
    assert os.listdir(tmp_path) == ["failed-in-01-broken.onnx"]


def test_statistics_are_recollected_after_a_pass_changes_activations():
    calls = []

    def provide(graph, names):
        from llmq.calib.collect import collect_stats

        calls.append(sorted(names))
        return collect_stats(graph, names, [np.ones((2, 16), np.float32)])

    graph = Graph.from_model(mlp_model())
    ctx = PassContext(stats_provider=provide)
    # weights first changes activations, so the activation pass must collect on the new graph
    PassManager([QuantizeWeightsPass(roles=ALL), QuantizeActivationsPass(roles=ALL)]).run(graph, ctx)
    assert len(calls) == 1 and ctx.stats_collections == 1
    # the activation pass itself changed activations: what was collected before it is stale now
    ctx.activation_stats(graph, calls[0])
    assert len(calls) == 2
    ctx.activation_stats(graph, calls[0])  # nothing changed since: served from the cache
    assert len(calls) == 2
    ctx.invalidate(activations=False)  # a pass that changed structure but not values keeps them
    ctx.activation_stats(graph, calls[0])
    assert len(calls) == 2
