"""Large-model storage: external data is read lazily, sessions take the graph's weights without a serialized
copy, and a compile written through external data (the inline limit lowered) is the same model as the
in-memory path, weight for weight."""

from __future__ import annotations

import os

import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from llmq.calib.collect import collect_stats
from llmq.driver import compile as llmq_compile
from llmq.frontends.onnx_loader import load_graph
from llmq.ir import storage
from llmq.ir.storage import ExternalValues, write_model


@pytest.fixture(scope="module")
def external_llama(tmp_path_factory, tiny_llama_onnx):
    """The tiny Llama re-saved with every weight in ``model.onnx.data``, its tokenizer beside it."""
    import shutil

    folder = tmp_path_factory.mktemp("external")
    path = str(folder / "model.onnx")
    onnx.save_model(onnx.load(tiny_llama_onnx), path, save_as_external_data=True, location="model.onnx.data",
                    size_threshold=1024)
    shutil.copytree(os.path.splitext(tiny_llama_onnx)[0] + ".tokenizer", str(folder / "model.tokenizer"))
    return path


def _lazy(graph) -> tuple:
    consts = [t for t in graph.gs.tensors().values() if hasattr(t, "_values")]
    return sum(isinstance(t._values, ExternalValues) for t in consts), len(consts)


def test_external_weights_are_not_read_at_load(external_llama):
    graph = load_graph(external_llama)
    lazy, _ = _lazy(graph)
    assert lazy >= 10  # every matrix stays on disk through load, the finite-weights check and Gemm canonicalization


def test_statistics_through_lazy_weights_match_inline(external_llama, tiny_llama_onnx):
    """A session over a lazily loaded graph (weights memory-mapped into ONNX Runtime) computes what the inline
    graph computes, to the bit."""
    batches = [np.random.default_rng(0).integers(0, 300, (1, 24), dtype=np.int64)]
    inline, lazy = load_graph(tiny_llama_onnx), load_graph(external_llama)
    names = sorted(n.outputs[0].name for n in inline.gs.nodes if n.op == "MatMul")[:6]
    a, b = collect_stats(inline, names, batches), collect_stats(lazy, names, batches)
    for name in names:
        assert np.array_equal(a[name].channel_absmax, b[name].channel_absmax)
    assert _lazy(lazy)[0] >= 10  # running it did not pull the weights into the graph


def _initializers(path: str) -> dict:
    model = onnx.load(path)
    return {i.name: numpy_helper.to_array(i) for i in model.graph.initializer}, model


@pytest.mark.parametrize("recipe", ["w8a8", "w4a16"])
def test_external_output_is_the_same_model(recipe, external_llama, tiny_llama_onnx, tmp_path, calib_text,
                                           tiny_tokenizer, monkeypatch):
    kw = dict(calib=calib_text, tokenizer=tiny_tokenizer, calib_samples=2, calib_seq_len=64, quiet=True)
    inline = llmq_compile(tiny_llama_onnx, recipe, str(tmp_path / "inline"), **kw)
    monkeypatch.setattr(storage, "INLINE_LIMIT", 0)
    external = llmq_compile(external_llama, recipe, str(tmp_path / "external"), **kw)
    assert "external_data" not in inline.paths
    assert os.path.basename(external.paths["external_data"]) == "model.onnx.data"
    (wa, ma), (wb, mb) = _initializers(inline.paths["model"]), _initializers(external.paths["model"])
    assert sorted(wa) == sorted(wb)
    for name in wa:
        assert wa[name].dtype == wb[name].dtype and np.array_equal(wa[name], wb[name]), name
    strip = lambda m: [(n.op_type, list(n.input), list(n.output)) for n in m.graph.node]  # noqa: E731
    assert strip(ma) == strip(mb)
    assert external.report["verification"]["within_bound"]
    # weights in the external file are aligned so ONNX Runtime can map them
    for init in mb.graph.initializer:
        info = {e.key: e.value for e in init.external_data}
        if info and int(info["length"]) >= storage.ALIGN_OVER:
            assert int(info["offset"]) % storage.ALIGNMENT == 0


@pytest.mark.parametrize("recipe", ["w4a16-lr", "w8a8"])
def test_lowering_that_spills_as_it_goes_writes_the_same_model(recipe, tiny_llama_onnx, tmp_path, calib_text,
                                                                tiny_tokenizer, monkeypatch):
    """The onnxruntime backend's repacking (MatMulNBits, merged q/k/v and gate/up, MatMulIntegerToFloat) in a
    block compile moves its new weights to the scratch file as it goes (here after every one): the same
    files, byte for byte, as keeping them in memory."""
    import llmq.backends.ort_lowering as lowering

    kw = dict(calib=calib_text, tokenizer=tiny_tokenizer, calib_samples=2, calib_seq_len=64, quiet=True,
              backend="onnxruntime")
    kept = llmq_compile(tiny_llama_onnx, recipe, str(tmp_path / "kept"), **kw)
    monkeypatch.setattr(lowering, "SPILL_EVERY", 1)
    spilled = llmq_compile(tiny_llama_onnx, recipe, str(tmp_path / "spilled"), **kw)
    stats = {r["pass"]: r["stats"] for r in spilled.report["backend"]["lowering"]}
    if recipe == "w4a16-lr":
        assert stats["lower-int4-matmulnbits"]["spilled_bytes"] > 0 and stats["merge-matmulnbits"]["spilled_bytes"] > 0
    else:
        assert stats["lower-int8-matmul"]["lowered"] > 0
    for name in sorted(os.listdir(kept.output_dir)):
        if name.endswith((".onnx", ".data")):
            with open(os.path.join(kept.output_dir, name), "rb") as a, open(os.path.join(spilled.output_dir, name), "rb") as b:
                assert a.read() == b.read(), name


def test_write_model_leaves_the_graph_unless_adopting(tiny_llama_onnx, tmp_path):
    graph = load_graph(tiny_llama_onnx)  # an inline file: its weights are read lazily all the same
    assert _lazy(graph)[0] >= 10

    def pointing_at(name):
        return sum(1 for t in graph.gs.tensors().values()
                   if isinstance(getattr(t, "_values", None), ExternalValues) and t._values.path.endswith(name))

    files = write_model(graph.to_model, graph.gs, str(tmp_path / "a.onnx"), external=True)
    assert len(files) == 2 and pointing_at("a.onnx.data") == 0  # the graph is left as it was
    write_model(graph.to_model, graph.gs, str(tmp_path / "b.onnx"), external=True, adopt=True)
    assert pointing_at("b.onnx.data") >= 10
    a, _ = _initializers(str(tmp_path / "a.onnx"))
    b, _ = _initializers(str(tmp_path / "b.onnx"))
    assert all(np.array_equal(a[k], b[k]) for k in a)


def test_large_valid_model_is_not_called_invalid(external_llama, tmp_path, capsys, monkeypatch):
    """A model whose weights are over the limit (lowered here) compiles through external data; its file
    sizes are reported as what is on disk, data file included."""
    from llmq.cli import compile_main

    monkeypatch.setattr(storage, "INLINE_LIMIT", 1 << 16)
    code = compile_main([external_llama, "--recipe", "w8a16", "-o", str(tmp_path / "out"), "-q", "--json"])
    assert code == 0
    assert os.path.isfile(tmp_path / "out" / "model.onnx.data")


def test_inline_input_kept_beside_its_moved_weights_for_verification(tiny_llama_onnx, external_llama):
    """A model holding its weights inline is loaded with them moved to a scratch file, and the input itself is
    kept there referencing them (verification runs it without parsing its weights again): it is the same model,
    output for output; the folder goes with the last holder of the graph's origin."""
    import gc

    import onnxruntime as ort

    graph = load_graph(tiny_llama_onnx)
    origin = graph.origin
    kept = onnx.load(origin.reference, load_external_data=False)
    given = onnx.load(tiny_llama_onnx)
    assert [(n.op_type, list(n.input)) for n in kept.graph.node] == [(n.op_type, list(n.input)) for n in given.graph.node]
    assert any(i.data_location == onnx.TensorProto.EXTERNAL for i in kept.graph.initializer)
    ids = np.random.default_rng(0).integers(0, 100, (1, 12))
    outs = []
    for path in (tiny_llama_onnx, origin.reference):
        session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
        feeds = {i.name: ids if i.name == "input_ids" else np.ones_like(ids) for i in session.get_inputs()}
        outs.append(session.run(None, feeds)[0])
        del session
    np.testing.assert_array_equal(outs[0], outs[1])
    folder = origin.folder
    del graph
    gc.collect()
    assert os.path.isdir(folder)
    del origin
    gc.collect()
    assert not os.path.exists(folder)
    assert load_graph(external_llama).origin.reference is None  # its weights are the user's external data


def test_llmq_threads_sets_every_sessions_threads(tiny_llama_onnx, tmp_path, monkeypatch, capsys):
    """``LLMQ_THREADS`` bounds the intra-op threads of the sessions llmq opens (over a graph, over a file); a
    value that is not a count is one clear line and exit code 2, before any output is written."""
    from llmq.backends.onnxruntime import make_session
    from llmq.cli import compile_main

    graph = load_graph(tiny_llama_onnx)
    monkeypatch.setenv("LLMQ_THREADS", "1")
    assert storage.graph_session(graph).get_session_options().intra_op_num_threads == 1
    assert make_session(tiny_llama_onnx).get_session_options().intra_op_num_threads == 1
    monkeypatch.setenv("LLMQ_THREADS", "two")
    code = compile_main([tiny_llama_onnx, "--recipe", "w8a16", "-o", str(tmp_path / "out"), "-q"])
    err = capsys.readouterr().err
    assert code == 2 and "LLMQ_THREADS='two' is not a thread count" in err and "Traceback" not in err
    assert not os.path.exists(tmp_path / "out" / "model.onnx")
