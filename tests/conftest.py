"""Shared fixtures: tiny random-weight HF models of two families, a tiny tokenizer, hand-built graphs."""

from __future__ import annotations

import os

_WORKERS = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1"))
if _WORKERS > 1:  # pytest-xdist: share the cores between the workers' BLAS, torch and ONNX Runtime threads
    # (set before numpy loads; without LLMQ_THREADS each worker's sessions would spin a thread per core)
    for _var in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "LLMQ_THREADS"):
        os.environ.setdefault(_var, str(max(1, (os.cpu_count() or 1) // _WORKERS)))

import numpy as np  # noqa: E402
import onnx  # noqa: E402
import pytest  # noqa: E402
from onnx import TensorProto, helper, numpy_helper  # noqa: E402

os.environ.setdefault("HF_HUB_OFFLINE", "1")

SHARED = os.path.abspath(os.path.join(os.path.dirname(__file__), "..", "..", "shared"))
WIKI = os.path.join(SHARED, "data", "wikitext2", "wiki.test.raw")
TINY_VOCAB = 384


def _train_tokenizer(folder: str, vocab: int) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    from transformers import PreTrainedTokenizerFast

    from llmq.calib.data import default_text

    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab, special_tokens=["<unk>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator([default_text()[:200_000]], trainer)
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", bos_token="<s>", eos_token="</s>").save_pretrained(folder)


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory) -> str:
    folder = str(tmp_path_factory.mktemp("tok") / "tokenizer")
    _train_tokenizer(folder, TINY_VOCAB)
    return folder


@pytest.fixture(scope="session")
def big_tokenizer(tmp_path_factory) -> str:
    """A tokenizer with more tokens than the tiny models' embeddings (a mismatch)."""
    folder = str(tmp_path_factory.mktemp("bigtok") / "tokenizer")
    _train_tokenizer(folder, TINY_VOCAB + 200)
    return folder


def _save_hf(config, tokenizer_dir: str, folder: str) -> str:
    import shutil

    import torch
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config)
    model.save_pretrained(folder)
    for name in os.listdir(tokenizer_dir):
        shutil.copy(os.path.join(tokenizer_dir, name), folder)
    return folder


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, tiny_tokenizer) -> str:
    from transformers import LlamaConfig

    config = LlamaConfig(vocab_size=TINY_VOCAB, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                         tie_word_embeddings=True)
    return _save_hf(config, tiny_tokenizer, str(tmp_path_factory.mktemp("llama") / "hf"))


@pytest.fixture(scope="session")
def tiny_gpt2_dir(tmp_path_factory, tiny_tokenizer) -> str:
    from transformers import GPT2Config

    config = GPT2Config(vocab_size=TINY_VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=256)
    return _save_hf(config, tiny_tokenizer, str(tmp_path_factory.mktemp("gpt2") / "hf"))


@pytest.fixture(scope="session")
def tiny_llama_onnx(tmp_path_factory, tiny_llama_dir) -> str:
    from llmq.frontends.torch_export import export_hf

    return export_hf(tiny_llama_dir, str(tmp_path_factory.mktemp("llama_onnx") / "model.onnx"))["model"]


@pytest.fixture(scope="session")
def tiny_gpt2_onnx(tmp_path_factory, tiny_gpt2_dir) -> str:
    from llmq.frontends.torch_export import export_hf

    return export_hf(tiny_gpt2_dir, str(tmp_path_factory.mktemp("gpt2_onnx") / "model.onnx"))["model"]


@pytest.fixture(scope="session")
def calib_text(tmp_path_factory) -> str:
    """Calibration text that is not the evaluation set."""
    from llmq.calib.data import default_text

    path = tmp_path_factory.mktemp("calib") / "calib.txt"
    path.write_text(default_text()[:60_000], encoding="utf-8")
    return str(path)


def mlp_model(k: int = 16, n: int = 24, m: int = 8, seed: int = 0, gemm: bool = False, opset: int = 21) -> onnx.ModelProto:
    """x[b, k] → linear W1 [k, n] → Relu → linear W2 [n, m] → y (W2 as Gemm transB=1 if ``gemm``)."""
    rng = np.random.default_rng(seed)
    w1 = rng.standard_normal((k, n)).astype(np.float32)
    w2 = rng.standard_normal((m, n) if gemm else (n, m)).astype(np.float32)
    nodes = [helper.make_node("MatMul", ["x", "w1"], ["h"], name="lin1"),
             helper.make_node("Relu", ["h"], ["r"], name="act")]
    if gemm:
        nodes.append(helper.make_node("Gemm", ["r", "w2"], ["y"], name="lin2", transB=1))
    else:
        nodes.append(helper.make_node("MatMul", ["r", "w2"], ["y"], name="lin2"))
    graph = helper.make_graph(nodes, "mlp", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["b", k])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", m])],
                              [numpy_helper.from_array(w1, "w1"), numpy_helper.from_array(w2, "w2")])
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", opset)], ir_version=10)


def run_ort(model: onnx.ModelProto, feeds: dict) -> list:
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(model.SerializeToString(), opts, providers=["CPUExecutionProvider"]).run(None, feeds)


OUTLIERS = [3, 17, 40]


def plant_outliers(graph, layer: int = 0, factor: float = 30.0):
    """Scale a few channels of layer ``layer``'s attention norm by ``factor`` and the matching q/k/v weight rows
    by 1/factor: the same function, with outlier channels in the q/k/v input (as trained LLMs have)."""
    import onnx_graphsurgeon as gs

    from llmq.ir import discover

    st = discover(graph)
    members = [lin for lin in st.linears if lin.layer == layer and lin.role in ("q", "k", "v")]
    norm = members[0].norm
    gamma = np.asarray(norm.weight.values, np.float32).copy()
    gamma[OUTLIERS] *= factor
    new_gamma = gs.Constant(f"planted_gamma_{layer}", gamma)
    for i, t in enumerate(norm.node.inputs):
        if t is norm.weight:
            norm.node.inputs[i] = new_gamma
    for lin in members:
        w = np.asarray(lin.weight.tensor.values, np.float32).copy()
        assert not lin.weight.chain and lin.weight_axis == 1
        w[OUTLIERS] /= factor
        lin.node.inputs[1] = gs.Constant(f"planted_{lin.name}", w)
    return graph


@pytest.fixture()
def planted(tiny_llama_onnx, tmp_path):
    """The tiny llama with planted outlier channels in layer 0's q/k/v input, same logits."""
    from test_smooth_attention import _ids
    from test_smooth_quant import _logits

    from llmq.frontends.onnx_loader import load_graph

    graph = plant_outliers(load_graph(tiny_llama_onnx))
    path = str(tmp_path / "planted.onnx")
    onnx.save(graph.to_model(), path)
    np.testing.assert_allclose(_logits(path, _ids()), _logits(tiny_llama_onnx, _ids()), rtol=1e-4, atol=1e-5)
    return path


@pytest.fixture(scope="session")
def tiny_llama_kv_onnx(tmp_path_factory, tiny_llama_dir) -> str:
    from llmq.frontends.torch_export import export_hf

    return export_hf(tiny_llama_dir, str(tmp_path_factory.mktemp("llama_kv") / "model.onnx"), kv_cache=True)["model"]


@pytest.fixture(scope="session")
def tiny_gpt2_kv_onnx(tmp_path_factory, tiny_gpt2_dir) -> str:
    from llmq.frontends.torch_export import export_hf

    return export_hf(tiny_gpt2_dir, str(tmp_path_factory.mktemp("gpt2_kv") / "model.onnx"), kv_cache=True)["model"]


def decode_logits(model_path: str, prompt: np.ndarray, tokens: list) -> list:
    """Logits of a KV-cache decoder at the prefill of ``prompt`` and at one step per entry of ``tokens`` (each
    step fed that token, not the model's own choice, so two models can be compared step by step)."""
    from llmq.backends.onnxruntime import make_session
    from llmq.ir.feeds import prompt_feeds

    sess = make_session(model_path)
    names, inputs = [o.name for o in sess.get_outputs()], [(i.name, i.shape) for i in sess.get_inputs()]
    out = dict(zip(names, sess.run(None, prompt_feeds(inputs, prompt))))
    seen = [out["logits"]]
    for token in tokens:
        past = {f"past_key_values.{n[len('present.'):]}": out[n] for n in names if n.startswith("present.")}
        out = dict(zip(names, sess.run(None, prompt_feeds(inputs, np.asarray([[token]]), past))))
        seen.append(out["logits"])
    return seen


def pytest_collection_modifyitems(config, items):
    """The real-model tests first (a stable sort): they are the longest, so under pytest-xdist the workers start
    them at once and the short tests fill in around them, rather than trailing the run."""
    items.sort(key=lambda item: item.get_closest_marker("real_model") is None)


def pytest_sessionstart(session):
    """What ``llmq-compile`` does before it loads a model (``cli._freeze_imports``): the libraries' objects are
    exempted from garbage collection, so each compile's full collections walk the test's objects only, not
    torch's and transformers' (0.27 s a collection otherwise, several per compile)."""
    import torch  # noqa: F401

    import llmq.driver  # noqa: F401
    from llmq.cli import _freeze_imports

    _freeze_imports(tokenizer=True)
