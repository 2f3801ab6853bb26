"""TensorRT backend: build a strongly typed engine from the portable Q/DQ ONNX.

Explicit quantization: the network is created with ``NetworkDefinitionCreationFlag.STRONGLY_TYPED`` and
no INT8/FP16 builder flags (weak typing is deprecated in 10.12, gone in 11); the Q/DQ scales decide the
precision. ``import tensorrt`` happens inside :func:`build_engine`, so llmq imports without it.

Optimization profiles come from the inputs' shapes and names (:func:`input_profiles`): static dimensions stay
as they are; the batch axis runs 1 … 8; token axes (``input_ids``, ``position_ids``) 1 … 4096; a KV cache's past
axis (the third of a 4-D ``past_key_values.*`` input) 0 … 4095 (an empty cache is the prefill); an attention
mask spans past + new tokens, 1 … 4096. The ``opt`` point is one consistent call: for a KV-cache decoder the
decode step (1 new token after 511), else a 512-token prompt. :func:`trtexec_command` writes the same profile
as ``--minShapes/--optShapes/--maxShapes``; every compile for TensorRT leaves that command line in its output
folder (``trtexec.txt``). None of this has run here: no GPU, no TensorRT (see the README).
"""

from __future__ import annotations

import logging
import os

from ..ir.errors import LlmqError

__all__ = ["build_engine", "tensorrt_available", "input_profiles", "trtexec_command", "write_trtexec"]

MAX_BATCH, MAX_TOKENS, OPT_TOKENS = 8, 4096, 512

logger = logging.getLogger(__name__)


def tensorrt_available() -> str | None:
    """None when TensorRT can build here, else the reason it cannot."""
    try:
        import tensorrt  # noqa: F401
    except ImportError:
        return "the tensorrt Python package is not installed (pip install 'llmq[tensorrt]' on a machine with an NVIDIA GPU)"
    return None


def _axis_role(name: str, rank: int, axis: int, dim) -> str:
    """What a dynamic axis counts: batch, past (a KV cache's length), total (past + new: an attention mask) or
    tokens (new tokens)."""
    lname, dname = name.lower(), str(dim or "").lower()
    if axis == 0 or "batch" in dname:
        return "batch"
    if "past" in dname or ("past" in lname or "cache" in lname) and rank == 4 and axis == 2:
        return "past"
    if "mask" in lname or "total" in dname:
        return "total"
    return "tokens"


def input_profiles(inputs: list, max_batch: int = MAX_BATCH, max_tokens: int = MAX_TOKENS,
                   opt_tokens: int = OPT_TOKENS) -> dict:
    """``{name: (min, opt, max)}`` for ``inputs`` (``[(name, dims)]``, a dim an int or a symbolic name/None).
    ``opt`` is one consistent call: with a KV cache, decoding 1 token after ``opt_tokens − 1``; without, an
    ``opt_tokens`` prompt."""
    has_past = any(_axis_role(n, len(d), i, x) == "past" for n, d in inputs for i, x in enumerate(d)
                   if not isinstance(x, int))
    opt = {"batch": 1, "tokens": 1 if has_past else opt_tokens, "past": opt_tokens - 1 if has_past else 0,
           "total": opt_tokens}
    low = {"batch": 1, "tokens": 1, "past": 0, "total": 1}
    high = {"batch": max_batch, "tokens": max_tokens, "past": max_tokens - 1, "total": max_tokens}
    out = {}
    for name, dims in inputs:
        shapes = ([], [], [])
        for axis, d in enumerate(dims):
            if isinstance(d, int) and d >= 0:
                for s in shapes:
                    s.append(d)
                continue
            role = _axis_role(name, len(dims), axis, d)
            for s, table in zip(shapes, (low, opt, high)):
                s.append(table[role])
        out[name] = tuple(tuple(s) for s in shapes)
    return out


def _onnx_inputs(model) -> list:
    """(name, dims) of a ModelProto's graph inputs that are not initializers (a dim is an int, a name or None)."""
    inits = {i.name for i in model.graph.initializer}
    return [(i.name, [d.dim_value if d.HasField("dim_value") else (d.dim_param or None)
                      for d in i.type.tensor_type.shape.dim]) for i in model.graph.input if i.name not in inits]


def trtexec_command(model_file: str, profiles: dict, engine_file: str = "model.engine") -> str:
    """The ``trtexec`` line that builds ``model_file`` as llmq's :func:`build_engine` does: strongly typed (no
    precision flags: the Q/DQ scales decide), with ``profiles`` as ``--minShapes/--optShapes/--maxShapes``."""
    def spec(k):
        return ",".join(f"'{name}':{'x'.join(str(d) for d in shapes[k])}" if shapes[k] else f"'{name}':scalar"
                        for name, shapes in profiles.items())
    parts = [f"trtexec --onnx={model_file} --stronglyTyped --saveEngine={engine_file} --skipInference"]
    if profiles:
        parts += [f'--minShapes="{spec(0)}"', f'--optShapes="{spec(1)}"', f'--maxShapes="{spec(2)}"']
    return " \\\n  ".join(parts)


def write_trtexec(model_path: str, folder: str) -> dict:
    """Write ``trtexec.txt`` (the command line that builds the model in ``folder``) and return it with its
    profiles, for the report."""
    import onnx

    from .trt_plugin import NAMESPACE, OP, has_plugins

    header = onnx.load(model_path, load_external_data=False)  # read once: for a model written inline, all of it
    profiles = input_profiles(_onnx_inputs(header))
    command = trtexec_command(os.path.basename(model_path), profiles)
    plugins = has_plugins(header)
    del header
    with open(os.path.join(folder, "trtexec.txt"), "w", encoding="utf-8") as fh:
        fh.write("# builds the TensorRT engine of this folder's model.onnx (TensorRT 10.x, run from this folder)\n")
        if plugins:
            fh.write(f"# the model has {NAMESPACE}::{OP} plugin nodes, a tensorrt.plugin (Python) plugin that trtexec cannot\n"
                     "# load: build in Python with the same profiles, where llmq and TensorRT >= 10.6 are installed:\n"
                     "#   python -c \"from llmq.backends.tensorrt import build_engine; build_engine('model.onnx', 'model.engine')\"\n"
                     "# the trtexec line below builds it once a compiled plugin of that name is loaded (--staticPlugins=...)\n")
        fh.write(command + "\n")
    return {"trtexec": command, "profiles": {k: [list(v) for v in p] for k, p in profiles.items()},
            **({"plugins": f"{NAMESPACE}::{OP}"} if plugins else {})}


def build_engine(onnx_path: str, engine_path: str, workspace_gb: float = 4.0) -> dict:
    """Parse ``onnx_path`` and serialize a strongly typed engine to ``engine_path``."""
    reason = tensorrt_available()
    if reason:
        raise LlmqError(f"cannot build a TensorRT engine: {reason}",
                        "use --backend qdq to write the portable ONNX and build it with trtexec --stronglyTyped where TensorRT is")
    import onnx
    import tensorrt as trt

    from .trt_plugin import has_plugins, register

    if has_plugins(onnx.load(onnx_path, load_external_data=False)):
        register()  # the registry must know llmq::W4A8Gemm before the parser meets it
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
    profiles = input_profiles([(network.get_input(i).name, [d if d >= 0 else None for d in network.get_input(i).shape])
                               for i in range(network.num_inputs)])
    for name, (low, opt, high) in profiles.items():
        profile.set_shape(name, low, opt, high)
    config.add_optimization_profile(profile)
    serialized = builder.build_serialized_network(network, config)
    if serialized is None:
        raise LlmqError(f"TensorRT could not build an engine from {onnx_path}", "see the TensorRT log above")
    tmp = engine_path + ".tmp"
    with open(tmp, "wb") as fh:
        fh.write(serialized)
    os.replace(tmp, engine_path)
    return {"engine": engine_path, "bytes": os.path.getsize(engine_path)}
