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
        _check(model, path)
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


def _check(model: onnx.ModelProto, path: str) -> None:
    """``onnx.checker`` on ``model`` without a second copy of its weights: by path when they are external
    (checked in place, never loaded); else on a weightless copy (the checker given the file would parse the
    weights again, doubling the load's peak)."""
    if any(edh.uses_external_data(t) for t in edh._get_all_tensors(model)):
        onnx.checker.check_model(path)
        return
    with tempfile.TemporaryDirectory(prefix="llmq-check-") as folder:
        open(os.path.join(folder, DETACHED), "wb").close()  # the checker wants the detached tensors' file to exist
        light = os.path.join(folder, "model.onnx")
        onnx.save(_weightless(model), light)
        onnx.checker.check_model(light)


def _weightless(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` whose initializers over 1 KB hold no bytes (marked external): small enough for the
    checker, the version converter and shape inference at any model size. Built field by field: ``model`` is
    not touched (clearing and restoring its bytes would leave a second copy of them in its protobuf arena,
    which is freed only with the model)."""
    light = onnx.ModelProto()
    for name in ("ir_version", "producer_name", "producer_version", "domain", "model_version", "doc_string"):
        setattr(light, name, getattr(model, name))
    light.opset_import.extend(model.opset_import)
    light.metadata_props.extend(model.metadata_props)
    light.functions.extend(model.functions)
    light.training_info.extend(model.training_info)
    light.configuration.extend(model.configuration)
    src, dst = model.graph, light.graph
    dst.name, dst.doc_string = src.name, src.doc_string
    for name in ("node", "input", "output", "value_info", "sparse_initializer", "quantization_annotation",
                 "metadata_props"):
        getattr(dst, name).extend(getattr(src, name))
    for init in src.initializer:
        if init.HasField("raw_data") and init.ByteSize() > 1024:
            t = dst.initializer.add(name=init.name, data_type=init.data_type, dims=init.dims,
                                    data_location=onnx.TensorProto.EXTERNAL)
            t.external_data.add(key="location", value=DETACHED)
        else:
            dst.initializer.add().CopyFrom(init)
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


class Origin:
    """The scratch folder a loaded graph reads its formerly inline weights from, removed when the last holder
    of this object goes; ``reference``: the input model as given, with those weights referenced from the
    folder instead of inline (for running the input again without parsing its weights: verification), or
    None when the input had no inline weights or also external ones."""

    def __init__(self):
        self.folder = tempfile.mkdtemp(prefix="llmq-weights-")
        self.reference: str | None = None
        self._finalizer = weakref.finalize(self, shutil.rmtree, self.folder, True)

    def remove(self) -> None:
        self._finalizer()


def load_graph(path: str, opset: int = 21) -> Graph:
    """Load ``path`` as an llmq graph at ``opset`` or above, with shapes inferred where possible, weights
    checked finite, mixture-of-experts refused, and Gemm linears in canonical MatMul + Add form. The graph's
    ``origin`` is an :class:`Origin`: hold it to keep the weights' folder (and ``reference``) beyond the graph."""
    model = load_onnx(path, external_data=False)
    # weights stored inside the file move to a scratch file beside nothing (read lazily, like external data),
    # so the parsed model can be freed: no weight is held twice, and none until a pass reads it
    origin = Origin()
    try:
        external = any(edh.uses_external_data(t) for t in edh._get_all_tensors(model))
        moved = spill_inline(model, origin.folder)
        # the moved bytes stay in the parsed model's protobuf arena, which anything the graph keeps of it would
        # keep alive: the graph is made from a copy (a few MB now), and the parsed model is freed
        light = onnx.ModelProto()
        light.CopyFrom(model)
        del model
        if moved and not external:
            origin.reference = os.path.join(origin.folder, "input.onnx")
            onnx.save(light, origin.reference)
        light = upgrade_opset(light, opset)
        _infer_shapes(light)
        graph = Graph.from_model(light, base_dir=os.path.dirname(os.path.abspath(path)),
                                 inline_dir=origin.folder if moved else None)  # else all is the file's own
    except BaseException:
        origin.remove()
        raise
    graph.origin = origin
    detach(graph.gs)
    del light
    if not graph.gs.inputs or not graph.gs.outputs:
        raise LlmqError(f"{path} has no graph inputs or outputs", "re-export the model")
    check_finite_weights(graph, path)
    refuse_mixture_of_experts(graph, path)
    gemm_to_matmul(graph)
    return graph
