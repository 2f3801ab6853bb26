"""Frontends on tiny random-weight HF models of two families, and structure discovery on their exports."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from conftest import TINY_VOCAB

from llmq.frontends.onnx_loader import load_graph, upgrade_opset
from llmq.ir import discover


def _torch_logits(folder, ids):
    import torch
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(input_ids=torch.from_numpy(ids), use_cache=False).logits.numpy()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_export_matches_torch_with_dynamic_axes(family, request):
    import onnxruntime as ort

    folder = request.getfixturevalue(f"tiny_{family}_dir")
    path = request.getfixturevalue(f"tiny_{family}_onnx")
    model = onnx.load(path)
    dims = [d.dim_param or d.dim_value for d in model.graph.input[0].type.tensor_type.shape.dim]
    assert all(isinstance(d, str) for d in dims), dims  # batch and sequence are symbolic
    assert [i.version for i in model.opset_import if i.domain == ""] == [21]
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    for shape in [(1, 9), (3, 17)]:
        ids = np.random.default_rng(0).integers(0, TINY_VOCAB, shape, dtype=np.int64)
        (logits,) = session.run(None, {"input_ids": ids})
        np.testing.assert_allclose(logits, _torch_logits(folder, ids), rtol=1e-4, atol=1e-4)


def test_export_writes_rmsnorm_as_onnx_runtime_fuses_it(tiny_llama_onnx, tiny_llama_kv_onnx):
    """torch's rsqrt exports as Sqrt → Reciprocal → Mul, which ONNX Runtime does not fuse; the exporter writes
    ``x / Sqrt(v)`` instead, so every RMSNorm (2 layers × 2 + the final one) runs as one node."""
    from llmq.backends.onnxruntime import fused_ops

    for path in (tiny_llama_onnx, tiny_llama_kv_onnx):
        assert not any(n.op_type == "Reciprocal" for n in onnx.load(path).graph.node)
        assert fused_ops(path).get("SimplifiedLayerNormalization") == 5


def test_llama_structure(tiny_llama_onnx):
    st = discover(load_graph(tiny_llama_onnx))
    assert st.summary()["roles"] == {"q": 2, "k": 2, "v": 2, "o": 2, "gate": 2, "up": 2, "down": 2, "lm_head": 1}
    names = [lin.name for lin in st.linears]
    assert "layers.1.attn.k" in names and "layers.0.mlp.down" in names
    by = {lin.name: lin for lin in st.linears}
    assert by["layers.0.attn.q"].producer == "rmsnorm" and by["layers.0.mlp.gate"].producer == "rmsnorm"
    assert by["layers.0.attn.o"].producer == "attention" and by["layers.0.mlp.down"].producer == "activation"
    assert by["layers.0.attn.k"].out_features == 32  # GQA: 2 kv heads × 16
    assert by["lm_head"].tied_embedding and by["lm_head"].producer == "rmsnorm"
    assert st.vocab_size == TINY_VOCAB and len(st.attention) == 2 and len(st.residual_adds) == 4


def test_gpt2_structure(tiny_gpt2_onnx):
    st = discover(load_graph(tiny_gpt2_onnx))
    assert st.summary()["roles"] == {"qkv": 2, "o": 2, "fc1": 2, "fc2": 2, "lm_head": 1}
    by = {lin.name: lin for lin in st.linears}
    assert by["layers.0.attn.qkv"].producer == "layernorm" and by["layers.0.attn.qkv"].out_features == 192
    assert by["layers.1.mlp.fc1"].producer == "layernorm"
    assert by["layers.0.mlp.fc2"].in_features == 256


def test_unclassified_linear_is_reported_not_guessed():
    from conftest import mlp_model

    from llmq.ir import Graph

    st = discover(Graph.from_model(mlp_model()))
    roles = [lin.role for lin in st.linears]
    assert roles == ["unknown", "lm_head"]
    assert st.summary()["unclassified"][0]["reason"]


def test_opset_upgrade(tmp_path):
    from conftest import mlp_model, run_ort

    old = mlp_model(opset=17)
    old.ir_version = 8
    up = upgrade_opset(old, 21)
    assert [i.version for i in up.opset_import if i.domain == ""] == [21]
    x = np.ones((2, 16), np.float32)
    np.testing.assert_allclose(run_ort(up, {"x": x})[0], run_ort(old, {"x": x})[0], rtol=1e-6)
    # the large initializers survive the weightless conversion
    assert [len(i.raw_data) or len(i.float_data) for i in up.graph.initializer] == \
           [len(i.raw_data) or len(i.float_data) for i in old.graph.initializer]


def test_export_any_module(tmp_path):
    import torch

    from llmq.frontends.torch_export import export_module

    class Net(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.a = torch.nn.Linear(8, 16)
            self.b = torch.nn.Linear(16, 4)

        def forward(self, x):
            return self.b(torch.relu(self.a(x)))

    net = Net()
    path = export_module(net, (torch.randn(2, 8),), str(tmp_path / "net.onnx"), ["x"], ["y"],
                         {"x": {0: torch.export.Dim("batch", min=1, max=64)}})
    st = discover(load_graph(path))
    assert len(st.linears) == 2
    import onnxruntime as ort

    x = np.random.default_rng(0).standard_normal((5, 8)).astype(np.float32)
    (y,) = ort.InferenceSession(path, providers=["CPUExecutionProvider"]).run(None, {"x": x})
    np.testing.assert_allclose(y, net(torch.from_numpy(x)).detach().numpy(), rtol=1e-5, atol=1e-5)
    assert [f for f in tmp_path.iterdir() if f.name.startswith(".llmq")] == []  # no temporary left behind


def test_structure_is_stable_across_quantization(tiny_llama_onnx, calib_text):
    """Roles found on the float graph are found again on its Q/DQ form (later passes rediscover)."""
    from llmq.calib.collect import collect_stats
    from llmq.ir.passes import PassContext, PassManager
    from llmq.passes import QuantizeActivationsPass, QuantizeWeightsPass

    graph = load_graph(tiny_llama_onnx)
    before = {lin.node.name: lin.name for lin in discover(graph).linears}
    ids = np.random.default_rng(0).integers(0, TINY_VOCAB, (2, 1, 16), dtype=np.int64)
    ctx = PassContext(stats_provider=lambda g, names: collect_stats(g, names, list(ids)))
    PassManager([QuantizeActivationsPass(), QuantizeWeightsPass()]).run(graph, ctx)
    after = discover(graph)
    assert {lin.node.name: lin.name for lin in after.linears} == before
    assert sum(lin.weight.quantized for lin in after.linears) == 14


def test_networkx_view(tiny_llama_onnx):
    import networkx as nx

    graph = load_graph(tiny_llama_onnx)
    view = graph.nx()
    assert nx.is_directed_acyclic_graph(view) and view.number_of_nodes() == len(graph.gs.nodes)
    st = discover(graph)
    q, down = (next(lin for lin in st.linears if lin.name == n) for n in ("layers.0.attn.q", "layers.0.mlp.down"))
    assert nx.has_path(view, q.node.name, down.node.name) and not nx.has_path(view, down.node.name, q.node.name)
    assert graph.nx() is view  # cached until the graph changes
    graph.touch()
    assert graph.nx() is not view
