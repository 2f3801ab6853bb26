"""ONNX frontend: load a model file (with external data) safely, check it, upgrade its opset.

External-data locations are resolved against the model's folder and refused if they escape it
(absolute paths, ``..``, symlinks pointing out). External data is not read at load: each such weight is
read when a pass first uses it (:mod:`llmq.ir.storage`), so a model of any size loads in the memory of its
graph. The default-domain opset is raised to what the recipe needs with ONNX's version converter, and
shapes are inferred, both on a weightless copy (protobuf cannot hold a message over 2 GB, and the weights
are not needed for either).
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import weakref

import onnx
from onnx import external_data_helper as edh

from ..ir.errors import LlmqError
from ..ir.graph import Graph
from ..ir.storage import detach, spill_inline
from .canonical import check_finite_weights, gemm_to_matmul, refuse_mixture_of_experts

__all__ = ["load_onnx", "load_graph", "upgrade_opset"]

logger = logging.getLogger(__name__)


def _check_external(model: onnx.ModelProto, base: str, path: str) -> None:
    root = os.path.realpath(base)
    for tensor in edh._get_all_tensors(model):
        if not edh.uses_external_data(tensor):
            continue
        info = {e.key: e.value for e in tensor.external_data}
        location = info.get("location", "")
        target = os.path.realpath(os.path.join(root, location))
        if os.path.isabs(location) or os.path.commonpath([root, target]) != root:
            raise LlmqError(f"{path}: external data of tensor '{tensor.name}' points outside the model's folder ({location!r})",
                            "external data must live in the model's folder; move the file there and fix the location")
        if not os.path.isfile(target):
            raise LlmqError(f"{path}: external data file {location!r} for tensor '{tensor.name}' is missing",
                            f"copy it next to the model (expected {target})")
        need = int(info.get("offset", 0)) + int(info.get("length", 0))
        if need > os.path.getsize(target):
            raise LlmqError(f"{path}: external data file {location!r} is shorter than tensor '{tensor.name}' needs "
                            f"({os.path.getsize(target)} < {need} bytes)", "the file is truncated; copy it again")


def load_onnx(path: str, external_data: bool = True) -> onnx.ModelProto:
    """Load and check ``path``; every problem becomes one clear :class:`LlmqError`. ``external_data=False``
    checks the external-data files (present, inside the folder, long enough) without reading them."""
    if not os.path.exists(path):
        raise LlmqError(f"model file not found: {path}", "check the path")
    if os.path.isdir(path):
        raise LlmqError(f"{path} is a folder, not an ONNX file",
                        "give the .onnx file, or export a HF folder first with llmq-export")
    try:
        model = onnx.load(path, load_external_data=False)
    except Exception as exc:
        raise LlmqError(f"{path} is not a readable ONNX model ({type(exc).__name__})",
                        "the file is not ONNX or is truncated; export or copy it again") from exc
    if not model.graph.node:
        raise LlmqError(f"{path} is not a readable ONNX model (it holds no graph nodes)",
                        "the file is not ONNX or is truncated; export or copy it again")
    base = os.path.dirname(os.path.abspath(path))
    _check_external(model, base, path)
    try:
        onnx.checker.check_model(path)  # by path: external data is checked in place, never loaded
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LlmqError(f"{path} is not a valid ONNX model: {first}", "re-export the model") from exc
    if external_data:
        try:
            edh.load_external_data_for_model(model, base)
        except Exception as exc:
            raise LlmqError(f"{path}: cannot read its external data ({exc})", "copy the .data file next to the model") from exc
    return model


DETACHED = "__llmq_detached__"


def _weightless(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose initializers over 1 KB hold no bytes (marked external): small enough for the
    checker, the version converter and shape inference at any model size. The model's own bytes are moved
    aside while copying, never duplicated."""
    stash = {}
    for init in model.graph.initializer:
        if init.HasField("raw_data") and len(init.raw_data) > 1024:
            stash[init.name] = init.raw_data
            init.ClearField("raw_data")
    try:
        light = onnx.ModelProto()
        light.CopyFrom(model)
    finally:
        for init in model.graph.initializer:
            if init.name in stash:
                init.raw_data = stash[init.name]
    for init in light.graph.initializer:
        if init.name in stash:
            init.data_location = onnx.TensorProto.EXTERNAL
            del init.external_data[:]
            init.external_data.add(key="location", value=DETACHED)
    return light


def upgrade_opset(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    current = next((i.version for i in model.opset_import if i.domain in ("", "ai.onnx")), 0)
    if current >= opset:
        return model
    logger.info("upgrading opset %d -> %d", current, opset)
    # run the converter on a weightless copy: large initializers are detached and put back by name
    originals = {init.name: init for init in model.graph.initializer}
    try:
        upgraded = onnx.version_converter.convert_version(_weightless(model), opset)
    except Exception as exc:
        raise LlmqError(f"cannot upgrade the model from opset {current} to {opset}: {exc}",
                        f"export the model at opset ≥ {opset} (llmq-export does)") from exc
    _reattach(upgraded, originals)
    return upgraded


def _reattach(light: onnx.ModelProto, originals: dict) -> None:
    """Put the detached initializers of ``light`` back from ``originals`` (by name)."""
    for i, init in enumerate(light.graph.initializer):
        if any(e.key == "location" and e.value == DETACHED for e in init.external_data):
            light.graph.initializer[i].CopyFrom(originals[init.name])


def _infer_shapes(model: onnx.ModelProto) -> None:
    """Shape inference on a weightless copy; the inferred value infos are copied into ``model``."""
    try:
        inferred = onnx.shape_inference.infer_shapes(_weightless(model), data_prop=True)
    except Exception as exc:  # shapes help reports, they are not required
        logger.warning("shape inference failed: %s", exc)
        return
    del model.graph.value_info[:]
    model.graph.value_info.extend(inferred.graph.value_info)


def load_graph(path: str, opset: int = 21) -> Graph:
    """Load ``path`` as an llmq graph at ``opset`` or above, with shapes inferred where possible, weights
    checked finite, mixture-of-experts refused, and Gemm linears in canonical MatMul + Add form."""
    model = upgrade_opset(load_onnx(path, external_data=False), opset)
    _infer_shapes(model)
    # weights stored inside the file move to a scratch file beside nothing (read lazily, like external data),
    # so the parsed model can be freed: no weight is held twice, and none until a pass reads it
    scratch = tempfile.mkdtemp(prefix="llmq-weights-")
    try:
        spill_inline(model, scratch)
        graph = Graph.from_model(model, base_dir=os.path.dirname(os.path.abspath(path)), inline_dir=scratch)
    except BaseException:
        shutil.rmtree(scratch, ignore_errors=True)
        raise
    weakref.finalize(graph, shutil.rmtree, scratch, True)
    detach(graph.gs)
    del model
    if not graph.gs.inputs or not graph.gs.outputs:
        raise LlmqError(f"{path} has no graph inputs or outputs", "re-export the model")
    check_finite_weights(graph, path)
    refuse_mixture_of_experts(graph, path)
    gemm_to_matmul(graph)
    return graph
