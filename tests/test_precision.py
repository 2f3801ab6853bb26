"""Float16 and bfloat16 models end to end: every recipe keeps the model's float type (Q/DQ scales and inserted
math in it), scales are rounded up to a value of that type before the codes are computed, and a bfloat16
model is evaluated on CPU through the documented float32 up-cast."""

from __future__ import annotations

import ml_dtypes
import numpy as np
import onnx
import pytest
from family_models import build_family

from llmq.driver import compile as llmq_compile
from llmq.frontends.torch_export import export_hf
from llmq.ir.precision import has_bfloat16, upcast_bfloat16
from llmq.passes.qdq_math import quantize_weight, representable_scale
from llmq.recipes import list_recipes

FP16, BF16 = onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16


@pytest.fixture(scope="module")
def half_models(tmp_path_factory, tiny_tokenizer):
    cache = {}

    def get(family, dtype):
        if (family, dtype) not in cache:
            root = tmp_path_factory.mktemp(f"{family}-{dtype}")
            folder = build_family(family, str(root / "hf"), tiny_tokenizer)
            cache[family, dtype] = export_hf(folder, str(root / "model.onnx"), dtype=dtype)["model"]
        return cache[family, dtype]

    return get


def _scale_types(path: str) -> set:
    model = onnx.load(path)
    inits = {i.name: i.data_type for i in model.graph.initializer}
    found = set()
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and node.input[1] in inits:
            found.add(inits[node.input[1]])
    return found


def _new_float32(path: str, source: str) -> list:
    """float32 initializers of the compiled model that the input did not have (inserted in the wrong type)."""
    before = {i.name for i in onnx.load(source).graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    return [i.name for i in onnx.load(path).graph.initializer
            if i.data_type == onnx.TensorProto.FLOAT and i.name not in before]


def _compile(path, recipe, out, calib_text, tokenizer, **kw):
    return llmq_compile(path, recipe, str(out), calib=calib_text, tokenizer=tokenizer, calib_samples=2,
                        calib_seq_len=64, quiet=True, overwrite=True, **kw)


def test_export_dtype(half_models):
    path = half_models("llama", "float16")
    model = onnx.load(path)
    assert model.graph.output[0].type.tensor_type.elem_type == FP16
    assert {p.key: p.value for p in model.metadata_props}["llmq.dtype"] == "float16"


@pytest.mark.parametrize("recipe", sorted(list_recipes()))
def test_float16_every_recipe(half_models, recipe, tmp_path, calib_text, tiny_tokenizer):
    """Each built-in recipe compiles a float16 Llama within its bound, with float16 scales and no float32 weight."""
    path = half_models("llama", "float16")
    result = _compile(path, recipe, tmp_path / "out", calib_text, tiny_tokenizer)
    v = result.report["verification"]
    assert v["within_bound"], v["problems"]
    out = result.paths["model"]
    assert onnx.load(out).graph.output[0].type.tensor_type.elem_type == FP16
    assert _scale_types(out) <= {FP16}
    assert bool(_scale_types(out)) == (recipe not in ("fp32", "w8a8-dynamic"))  # dynamic: MatMulInteger, no Q/DQ
    assert not any(r["stats"].get("rolled_back") for r in result.report["passes"])
    assert not _new_float32(out, path)


@pytest.mark.parametrize("recipe", ["w8a8", "w4a16", "w8a8-dynamic"])
def test_float16_gpt2_onnxruntime(half_models, recipe, tmp_path, calib_text, tiny_tokenizer):
    """GPT-2 (Conv1D weights, LayerNorm with biases) in float16, lowered for ONNX Runtime."""
    path = half_models("gpt2", "float16")
    result = _compile(path, recipe, tmp_path / "out", calib_text, tiny_tokenizer, backend="onnxruntime")
    assert result.report["verification"]["within_bound"], result.report["verification"]["problems"]
    assert result.report["totals"]["quantized_weights"] == result.report["totals"]["linears"] - 1  # all but the head


def test_float16_matches_float32_quality(half_models, tmp_path, calib_text, tiny_tokenizer):
    """The same recipe on the float16 and the float32 export lands equally close to its own input."""
    kls = {}
    for dtype in ("float32", "float16"):
        r = _compile(half_models("llama", dtype), "w4a16", tmp_path / dtype, calib_text, tiny_tokenizer)
        kls[dtype] = r.report["verification"]["outputs"]["logits"]["kl"]
    assert kls["float16"] <= 2 * kls["float32"] + 1e-5, kls


@pytest.mark.parametrize("recipe", ["w8a8", "w4a16"])
def test_bfloat16_compiles_and_stays_bfloat16(half_models, recipe, tmp_path, calib_text, tiny_tokenizer):
    path = half_models("llama", "bfloat16")
    result = _compile(path, recipe, tmp_path / "out", calib_text, tiny_tokenizer)
    assert result.report["verification"]["within_bound"], result.report["verification"]["problems"]
    assert _scale_types(result.paths["model"]) == {BF16}
    assert not _new_float32(result.paths["model"], path)
    assert onnx.load(result.paths["model"]).graph.output[0].type.tensor_type.elem_type == BF16


def test_bfloat16_evaluates_through_upcast(half_models, tiny_tokenizer):
    from llmq.evaluate import perplexity

    path = half_models("llama", "bfloat16")
    windows = np.random.default_rng(0).integers(0, 300, (2, 32), dtype=np.int64)
    result = perplexity(path, windows)
    assert np.isfinite(result["perplexity"]) and "float32" in result["upcast"]
    model = onnx.load(path)
    assert has_bfloat16(model)
    assert upcast_bfloat16(model) > 0 and not has_bfloat16(model)
    fp32 = perplexity(half_models("llama", "float32"), windows)
    assert fp32["upcast"] is None
    # bf16 weights with fp32 arithmetic: close to the fp32 model (bf16 keeps 8 mantissa bits)
    assert abs(np.log(result["perplexity"] / fp32["perplexity"])) < 0.05


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16])
def test_representable_scale_rounds_up(dtype):
    rng = np.random.default_rng(0)
    s = np.abs(rng.standard_normal(1000)).astype(np.float32) * 10.0 ** rng.uniform(-9, 2, 1000).astype(np.float32)
    r = representable_scale(s, dtype)
    assert np.all(r >= s) and np.all(r > 0)
    assert np.array_equal(r.astype(dtype).astype(np.float32), r)  # exactly representable
    # the next value of the type below r is below s: r is the smallest such value (where above the floor)
    normal = s > np.finfo(np.float32).tiny * 1e30
    below = r.astype(dtype).view(np.uint16) - 1
    assert np.all(below[normal].view(dtype).astype(np.float32) < s[normal])


@pytest.mark.parametrize("dtype", [np.float16, ml_dtypes.bfloat16])
def test_codes_use_the_stored_scale(dtype):
    """q · s with the scale as stored (in the model's type) is what the codes were rounded against: every
    dequantized weight is within half a step of the weight, and none saturates beyond the range."""
    rng = np.random.default_rng(1)
    w = rng.standard_normal((64, 48)).astype(np.float32) * 0.02
    for bits, gran in ((8, "per-channel"), (4, "per-group")):
        qw = quantize_weight(w, 1, bits, gran, 16, True, dtype)
        stored = qw.scale.astype(dtype).astype(np.float32)
        assert np.array_equal(stored, qw.scale)
        err = np.abs(qw.dequantize() - w)
        step = np.repeat(qw.scale, qw.block_size, axis=qw.axis) if qw.block_size else qw.scale[None, :]
        assert np.all(err <= step / 2 + 1e-9)
