"""ONNX frontend: load a model file (with external data) safely, check it, upgrade its opset.

External-data locations are resolved against the model's folder and refused if they escape it
(absolute paths, ``..``, symlinks pointing out). The default-domain opset is raised to what the recipe
needs with ONNX's version converter, run on a weightless copy so large models stay under protobuf's 2 GB
limit; shapes are then inferred.
"""

from __future__ import annotations

import logging
import os

import onnx
from onnx import external_data_helper as edh

from ..ir.errors import LlmqError
from ..ir.graph import Graph
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


def load_onnx(path: str) -> onnx.ModelProto:
    """Load and check ``path``; every problem becomes one clear :class:`LlmqError`."""
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
        edh.load_external_data_for_model(model, base)
    except Exception as exc:
        raise LlmqError(f"{path}: cannot read its external data ({exc})", "copy the .data file next to the model") from exc
    try:
        onnx.checker.check_model(model) if model.ByteSize() < 2**31 - 1 else onnx.checker.check_model(path)
    except Exception as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise LlmqError(f"{path} is not a valid ONNX model: {first}", "re-export the model") from exc
    return model


def upgrade_opset(model: onnx.ModelProto, opset: int) -> onnx.ModelProto:
    current = next((i.version for i in model.opset_import if i.domain in ("", "ai.onnx")), 0)
    if current >= opset:
        return model
    logger.info("upgrading opset %d -> %d", current, opset)
    # run the converter on a weightless copy: large initializers are detached and put back by name
    stash = {}
    for init in model.graph.initializer:
        if init.ByteSize() > 1024:
            stash[init.name] = init.raw_data if init.HasField("raw_data") else None
    light = onnx.ModelProto()
    light.CopyFrom(model)
    for init in light.graph.initializer:
        if init.name in stash and stash[init.name] is not None:
            init.ClearField("raw_data")
            init.data_location = onnx.TensorProto.EXTERNAL
            init.external_data.add(key="location", value="__llmq_detached__")
    try:
        upgraded = onnx.version_converter.convert_version(light, opset)
    except Exception as exc:
        raise LlmqError(f"cannot upgrade the model from opset {current} to {opset}: {exc}",
                        "export the model at opset ≥ {opset} (llmq-export does)") from exc
    for init in upgraded.graph.initializer:
        if stash.get(init.name) is not None:
            del init.external_data[:]
            init.data_location = onnx.TensorProto.DEFAULT
            init.raw_data = stash[init.name]
    return upgraded


def load_graph(path: str, opset: int = 21) -> Graph:
    """Load ``path`` as an llmq graph at ``opset`` or above, with shapes inferred where possible, weights
    checked finite, mixture-of-experts refused, and Gemm linears in canonical MatMul + Add form."""
    model = upgrade_opset(load_onnx(path), opset)
    if model.ByteSize() < 2**31 - 1:
        try:
            model = onnx.shape_inference.infer_shapes(model, data_prop=True)
        except Exception as exc:  # shapes help reports, they are not required
            logger.warning("shape inference failed: %s", exc)
    graph = Graph.from_model(model)
    if not graph.gs.inputs or not graph.gs.outputs:
        raise LlmqError(f"{path} has no graph inputs or outputs", "re-export the model")
    check_finite_weights(graph, path)
    refuse_mixture_of_experts(graph, path)
    gemm_to_matmul(graph)
    return graph
