"""Bad input: one clear line, a non-zero exit, no traceback, nothing half-written."""

from __future__ import annotations

import os
import shutil

import numpy as np
import onnx
import pytest
from conftest import mlp_model

from llmq.cli import compile_main, eval_main, export_main


def _run(main, argv, capsys):
    code = main(argv)
    captured = capsys.readouterr()
    lines = [line for line in captured.err.splitlines() if line.strip()]
    return code, lines, captured.err


def _assert_clean_error(code, lines, err, *needles):
    assert code != 0
    assert "Traceback" not in err
    errors = [line for line in lines if ": error: " in line]
    assert len(errors) == 1, lines
    for needle in needles:
        assert needle in errors[0], errors[0]


@pytest.fixture()
def model_copy(tmp_path, tiny_llama_onnx):
    """The tiny llama export with its tokenizer, in a folder of its own."""
    folder = tmp_path / "m"
    folder.mkdir()
    shutil.copy(tiny_llama_onnx, folder / "model.onnx")
    shutil.copytree(tiny_llama_onnx[:-5] + ".tokenizer", folder / "model.tokenizer")
    return folder / "model.onnx"


def _no_output(tmp_path, name="out"):
    leftovers = [p.name for p in tmp_path.iterdir() if p.name.startswith(name) or p.name.startswith("." + name)]
    assert leftovers == [], leftovers


def test_missing_file(tmp_path, capsys):
    code, lines, err = _run(compile_main, [str(tmp_path / "nope.onnx"), "-o", str(tmp_path / "out")], capsys)
    _assert_clean_error(code, lines, err, "model file not found")
    _no_output(tmp_path)


def test_not_onnx(tmp_path, capsys):
    bad = tmp_path / "notes.onnx"
    bad.write_text("this is not a model\n" * 10)
    code, lines, err = _run(compile_main, [str(bad), "-o", str(tmp_path / "out")], capsys)
    _assert_clean_error(code, lines, err, "not a readable ONNX model")
    _no_output(tmp_path)


def test_truncated_onnx(tmp_path, capsys, tiny_llama_onnx):
    data = open(tiny_llama_onnx, "rb").read()
    cut = tmp_path / "cut.onnx"
    cut.write_bytes(data[: len(data) // 2])
    code, lines, err = _run(compile_main, [str(cut), "-o", str(tmp_path / "out")], capsys)
    _assert_clean_error(code, lines, err, "cut.onnx")
    _no_output(tmp_path)


def _external(tmp_path, location=None):
    from llmq.ir.passes import save_model

    folder = tmp_path / "ext"
    folder.mkdir()
    save_model(mlp_model(k=64, n=64, m=64), str(folder / "model.onnx"), external=True)
    if location is not None:
        model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
        for init in model.graph.initializer:
            for entry in init.external_data:
                if entry.key == "location":
                    entry.value = location
        onnx.save(model, str(folder / "model.onnx"))
    return folder


def test_missing_external_data(tmp_path, capsys):
    folder = _external(tmp_path)
    os.remove(folder / "model.onnx.data")
    code, lines, err = _run(compile_main, [str(folder / "model.onnx"), "--recipe", "w8a16", "-o", str(tmp_path / "out")], capsys)
    _assert_clean_error(code, lines, err, "external data", "missing")
    _no_output(tmp_path)


def test_external_data_outside_the_model_folder(tmp_path, capsys):
    folder = _external(tmp_path, location="../secret.data")
    shutil.copy(folder / "model.onnx.data", tmp_path / "secret.data")
    code, lines, err = _run(compile_main, [str(folder / "model.onnx"), "--recipe", "w8a16", "-o", str(tmp_path / "out")], capsys)
    _assert_clean_error(code, lines, err, "outside the model's folder")
    _no_output(tmp_path)


def test_unknown_recipe(tmp_path, capsys, model_copy):
    code, lines, err = _run(compile_main, [str(model_copy), "--recipe", "w3a2", "-o", str(tmp_path / "out")], capsys)
    _assert_clean_error(code, lines, err, "unknown recipe 'w3a2'", "w8a8")
    _no_output(tmp_path)


def test_recipe_with_unknown_key(tmp_path, capsys, model_copy):
    recipe = tmp_path / "mine.yaml"
    recipe.write_text("name: mine\nopset: 21\nsmoothing: true\npasses:\n  - quantize-weights\n")
    code, lines, err = _run(compile_main, [str(model_copy), "--recipe", str(recipe), "-o", str(tmp_path / "out")], capsys)
    _assert_clean_error(code, lines, err, "unknown recipe key(s) smoothing")
    recipe.write_text("name: mine\npasses:\n  - quantize-weights: {bitz: 8}\n")
    code, lines, err = _run(compile_main, [str(model_copy), "--recipe", str(recipe), "-o", str(tmp_path / "out")], capsys)
    _assert_clean_error(code, lines, err, "no option(s) bitz")
    _no_output(tmp_path)


def test_calibration_text_shorter_than_one_window(tmp_path, capsys, model_copy):
    short = tmp_path / "short.txt"
    short.write_text("Too short to calibrate anything.")
    code, lines, err = _run(compile_main, [str(model_copy), "--calib-data", str(short), "--calib-seq-len", "128",
                                           "-o", str(tmp_path / "out")], capsys)
    _assert_clean_error(code, lines, err, "fewer than one window of 128")
    _no_output(tmp_path)


def test_unusable_calibration_files(tmp_path, capsys, model_copy):
    binary = tmp_path / "blob.txt"
    binary.write_bytes(bytes(range(256)) * 10)
    code, lines, err = _run(compile_main, [str(model_copy), "--calib-data", str(binary), "-o", str(tmp_path / "out")], capsys)
    _assert_clean_error(code, lines, err, "not UTF-8")
    npz = tmp_path / "ids.npz"
    np.savez(npz, tokens=np.zeros((2, 8), np.int64))
    code, lines, err = _run(compile_main, [str(model_copy), "--calib-data", str(npz), "-o", str(tmp_path / "out")], capsys)
    _assert_clean_error(code, lines, err, "no 'input_ids'")
    _no_output(tmp_path)


def test_tokenizer_that_does_not_fit_the_model(tmp_path, capsys, model_copy, big_tokenizer):
    code, lines, err = _run(compile_main, [str(model_copy), "--tokenizer", big_tokenizer, "-o", str(tmp_path / "out")], capsys)
    _assert_clean_error(code, lines, err, "tokenizer", "embedding has 384 rows")
    _no_output(tmp_path)
    code, lines, err = _run(eval_main, [str(model_copy), "--tokenizer", big_tokenizer, "--text", __file__], capsys)
    _assert_clean_error(code, lines, err, "does not match the model")


def test_model_with_no_quantizable_linear(tmp_path, capsys):
    x = onnx.helper.make_tensor_value_info("x", onnx.TensorProto.FLOAT, [2, 3])
    y = onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [2, 3])
    model = onnx.helper.make_model(onnx.helper.make_graph([onnx.helper.make_node("Relu", ["x"], ["y"])], "g", [x], [y]),
                                   opset_imports=[onnx.helper.make_opsetid("", 21)])
    onnx.save(model, str(tmp_path / "relu.onnx"))
    code, lines, err = _run(compile_main, [str(tmp_path / "relu.onnx"), "--recipe", "w8a16", "-o", str(tmp_path / "out")], capsys)
    _assert_clean_error(code, lines, err, "no quantizable linear")
    _no_output(tmp_path)


def test_existing_output_is_refused_without_overwrite(tmp_path, capsys, model_copy, calib_text):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("mine")
    code, lines, err = _run(compile_main, [str(model_copy), "-o", str(out)], capsys)
    _assert_clean_error(code, lines, err, "already exists", "--overwrite")
    assert os.listdir(out) == ["keep.txt"]
    code, _, err = _run(compile_main, [str(model_copy), "--recipe", "w8a16", "-o", str(out), "--overwrite", "--quiet",
                                       "--calib-data", calib_text, "--calib-seq-len", "64", "--calib-samples", "2"], capsys)
    assert code == 0, err
    assert "keep.txt" not in os.listdir(out) and "model.onnx" in os.listdir(out)


def test_debug_shows_the_traceback(tmp_path, capsys):
    code, _, err = _run(compile_main, [str(tmp_path / "nope.onnx"), "--debug"], capsys)
    assert code != 0 and "Traceback" in err


def test_export_errors(tmp_path, capsys):
    code, lines, err = _run(export_main, [str(tmp_path / "missing"), "-o", str(tmp_path / "m.onnx")], capsys)
    _assert_clean_error(code, lines, err, "model not found")
    (tmp_path / "empty").mkdir()
    code, lines, err = _run(export_main, [str(tmp_path / "empty"), "-o", str(tmp_path / "m.onnx")], capsys)
    _assert_clean_error(code, lines, err, "no config.json")
    assert not (tmp_path / "m.onnx").exists()


def test_list_recipes(capsys):
    assert compile_main(["--list-recipes"]) == 0
    out = capsys.readouterr().out
    assert "w8a8" in out and "w8a16" in out


def test_onnxruntime_only_recipe_refuses_tensorrt(tmp_path, capsys, model_copy):
    code, lines, err = _run(compile_main, [str(model_copy), "--recipe", "w8a8-dynamic", "--backend", "tensorrt",
                                           "-o", str(tmp_path / "out")], capsys)
    _assert_clean_error(code, lines, err, "cannot target the tensorrt backend", "ONNX Runtime only", "--backend onnxruntime")
    _no_output(tmp_path)


def test_max_loss_needs_a_sensitivity_pass_and_a_positive_budget(tmp_path, capsys, model_copy):
    code, lines, err = _run(compile_main, [str(model_copy), "--recipe", "w8a16", "--max-loss", "2%",
                                           "-o", str(tmp_path / "out")], capsys)
    _assert_clean_error(code, lines, err, "recipe 'w8a16' has no sensitivity pass", "w8a8")
    for bad in ("-1", "two", "0%"):
        with pytest.raises(SystemExit) as exc:
            compile_main([str(model_copy), "--max-loss", bad, "-o", str(tmp_path / "out")])
        assert exc.value.code != 0
        err = capsys.readouterr().err
        assert "--max-loss" in err and "Traceback" not in err
    _no_output(tmp_path)


def test_empty_tokenizer_folder(tmp_path, capsys, model_copy, calib_text):
    empty = tmp_path / "tok"
    empty.mkdir()
    code, lines, err = _run(compile_main, [str(model_copy), "--tokenizer", str(empty), "--calib-data", calib_text,
                                           "-o", str(tmp_path / "out")], capsys)
    _assert_clean_error(code, lines, err, "tok", "tokenizer")
    _no_output(tmp_path)


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_weights_with_nan_or_inf_are_refused_by_name(tmp_path, capsys, bad):
    """A NaN anywhere in a weight, or an infinity in a matrix, is one error naming the tensor; the check reads the
    tensor in chunks whatever its shape (a wide [k, vocab] head), so a bad value past the first chunk counts."""
    model = mlp_model(k=16, n=300_000)  # w1 [16, 300000]: 4.8M elements, more than one chunk in one row block
    w1 = onnx.numpy_helper.to_array(model.graph.initializer[0]).copy()
    w1[15, 299_999] = np.nan if bad == "nan" else np.inf
    model.graph.initializer[0].CopyFrom(onnx.numpy_helper.from_array(w1, "w1"))
    path = tmp_path / "m.onnx"
    onnx.save(model, path)
    code, lines, err = _run(compile_main, [str(path), "--recipe", "w8a16", "-o", str(tmp_path / "out")], capsys)
    _assert_clean_error(code, lines, err, "'w1'", "NaN" if bad == "nan" else "infinite", "[16, 300000]")
    _no_output(tmp_path)
