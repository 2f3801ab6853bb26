"""The backends, defined once: each is an object owning its lowering passes and its build step.

* ``qdq`` — the portable explicit-quantization ONNX (Q/DQ) file: no lowering, no build. TensorRT builds
  engines from it; ONNX Runtime runs it as it is.
* ``onnxruntime`` — the Q/DQ graph lowered to ONNX Runtime's integer kernels (``MatMulIntegerToFloat``,
  ``MatMulNBits``) and, optionally, fused attention (``GroupQueryAttention``); built by opening a session and
  reporting what it fused. With ``--w4a8-kernel hybrid`` it also lowers the graph a second time for prompts
  (:meth:`Backend.prefill_lowering_passes`; the driver joins both, see ``backends.ort_hybrid``).
* ``tensorrt`` — the portable graph, built into an engine with TensorRT when it is installed (never on the
  machines llmq is developed on; see the README).

The driver asks :data:`BACKENDS` by name and iterates; it never branches on a backend's name.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import ClassVar

__all__ = ["Backend", "BACKENDS", "backend_named"]


@dataclass(frozen=True)
class Backend:
    """A target: ``lowering_passes(options)`` then ``build(model_path, folder, options)``."""

    name: ClassVar[str] = ""
    description: ClassVar[str] = ""
    symmetric_weights_only: ClassVar[bool] = True  # TensorRT takes zero-point-free weights only

    def lowering_passes(self, options) -> list:
        return []

    def build(self, model_path: str, folder: str, options, pieces=None) -> dict:
        """Build or check the written model; returns facts for the report. ``pieces``: the model as parts
        (``[(name, open(session options) -> ONNX Runtime session)]``), given for a model too large to check
        in one piece; a backend whose build needs the whole model ignores them."""
        return {}

    def accuracy_level(self, options) -> int:
        """The ``MatMulNBits`` accuracy level the written model runs with (0: float activations)."""
        return 0

    def prefill_lowering_passes(self, options) -> list | None:
        """The passes of a second lowering of the same graph that the written model runs for prompts while
        :meth:`lowering_passes`' runs each decode step (see :mod:`llmq.backends.ort_hybrid`), or None."""
        return None


@dataclass(frozen=True)
class QDQBackend(Backend):
    name: ClassVar[str] = "qdq"
    description: ClassVar[str] = "portable Q/DQ ONNX (what TensorRT builds from; ONNX Runtime runs it as is)"

    def build(self, model_path: str, folder: str, options, pieces=None) -> dict:
        from .tensorrt import write_trtexec

        return write_trtexec(model_path, folder)


@dataclass(frozen=True)
class OnnxRuntimeBackend(Backend):
    name: ClassVar[str] = "onnxruntime"
    description: ClassVar[str] = "ONNX Runtime integer kernels (MatMulIntegerToFloat, MatMulNBits), fused attention"
    symmetric_weights_only: ClassVar[bool] = False

    def lowering_passes(self, options) -> list:  # options as the driver resolved them (accuracy levels set)
        from .ort_attention import FuseAttentionPass
        from .ort_lowering import (DropBranchPadPass, LowerBlockInt4ToMatMulNBitsPass, LowerInt8WeightOnlyPass,
                                   LowerProgressiveW4A8Pass, LowerToIntegerMatMulPass, MergeIntegerMatMulPass,
                                   MergeMatMulNBitsPass)

        kernel = "nbits" if options.w4a8_kernel == "hybrid" else options.w4a8_kernel  # hybrid: nbits decodes
        passes = [LowerToIntegerMatMulPass(), LowerProgressiveW4A8Pass(kernel=kernel),
                  LowerBlockInt4ToMatMulNBitsPass(accuracy_level=options.accuracy_level),
                  LowerInt8WeightOnlyPass(accuracy_level=options.int8_weight_only_level), MergeMatMulNBitsPass(),
                  MergeIntegerMatMulPass(), DropBranchPadPass()]
        return passes + ([FuseAttentionPass()] if options.fuse_attention else [])

    def prefill_lowering_passes(self, options) -> list | None:
        return self.lowering_passes(replace(options, w4a8_kernel="int8")) if options.w4a8_kernel == "hybrid" else None

    def build(self, model_path: str, folder: str, options, pieces=None) -> dict:
        from .onnxruntime import check_with_onnxruntime

        return check_with_onnxruntime(model_path, options.accuracy_level, pieces)

    def accuracy_level(self, options) -> int:
        return options.accuracy_level


@dataclass(frozen=True)
class TensorRTBackend(Backend):
    name: ClassVar[str] = "tensorrt"
    description: ClassVar[str] = ("TensorRT engine built from the portable Q/DQ graph, W4A8 linears as llmq's "
                                  "W4A8Gemm plugin (needs tensorrt installed)")

    def lowering_passes(self, options) -> list:
        from .trt_plugin import LowerW4A8ToPluginPass

        return [LowerW4A8ToPluginPass()]

    def build(self, model_path: str, folder: str, options, pieces=None) -> dict:
        from .tensorrt import build_engine, write_trtexec

        facts = write_trtexec(model_path, folder)
        return {**facts, **build_engine(model_path, os.path.join(folder, "model.engine"))}


BACKENDS = {b.name: b for b in (QDQBackend(), OnnxRuntimeBackend(), TensorRTBackend())}


def backend_named(name: str) -> Backend:
    from ..ir.errors import LlmqError

    if name not in BACKENDS:
        raise LlmqError(f"unknown backend '{name}'", f"choose one of {', '.join(BACKENDS)}")
    return BACKENDS[name]
