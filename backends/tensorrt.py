"""TensorRT backend: build a strongly typed engine from the portable Q/DQ ONNX.

Explicit quantization: the network is created with ``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` and
no INT8/FP16 builder flags (weak typing is deprecated in 10.12, gone in 11); the Q/DQ scales decide the
precision. ``import tensorrt`` happens inside :func:`build_engine`, so llmq imports without it.
"""

from __future__ import annotations

import logging
import os

from ..ir.errors import LlmqError

__all__ = ["build_engine", "tensorrt_available"]

logger = logging.getLogger(__name__)


def tensorrt_available() -> str | None:
    """None when TensorRT can build here, else the reason it cannot."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "the tensorrt Python package is not installed (pip install 'llmq[tensorrt]' on a machine with an NVIDIA GPU)"
    return None


def build_engine(onnx_path: str, engine_path: str, workspace_gb: float = 4.0) -> dict:
    """Parse ``onnx_path`` and serialize a strongly typed engine to ``engine_path``."""
    reason = tensorrt_available()
    if reason:
        raise LlmqError(f"cannot build a TensorRT engine: {reason}",
                        "use --backend qdq to write the portable ONNX and build it with trtexec --stronglyTyped where TensorRT is")
    import tensorrt as trt

    trt_logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(trt_logger)
    network = builder.create_network(1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED))
    parser = trt.OnnxParser(network, trt_logger)
    if not parser.parse_from_file(os.path.abspath(onnx_path)):
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise LlmqError(f"TensorRT's ONNX parser refused {onnx_path}: {errors[0] if errors else 'unknown error'}")
    config = builder.create_builder_config()
    config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, int(workspace_gb * (1 << 30)))
    profile = builder.create_optimization_profile()
    for i in range(network.num_inputs):
        tensor = network.get_input(i)
        profile.set_shape(tensor.name, (1, 1), (1, 512), (8, 4096))
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise LlmqError(f"TensorRT could not build an engine from {onnx_path}", "see the TensorRT log above")
    tmp = engine_path + ".tmp"
    with open(tmp, "wb") as fh:
        fh.write(serialized)
    os.replace(tmp, engine_path)
    return {"engine": engine_path, "bytes": os.path.getsize(engine_path)}
