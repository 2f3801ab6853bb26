"""The graph handle every pass works on: an onnx-graphsurgeon graph plus what gs drops.

onnx-graphsurgeon keeps nodes, tensors and attributes but not node ``metadata_props`` nor model-level
metadata; :class:`Graph` keeps them beside the gs graph, knows the model's float type (``float_dtype``:
float32, float16 or bfloat16 — the type most weight elements are stored in), records which pass created each node and
initializer (provenance), and offers a networkx view for analysis. Conversion to and from
``onnx.ModelProto`` is called only by ``frontends/`` and ``backends/``.
"""

from __future__ import annotations

import itertools
import logging
from dataclasses import dataclass, field

import ml_dtypes
import networkx as nx
import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx import numpy_helper

from .storage import ExternalValues, attach_external

__all__ = ["Graph", "ConstantView", "dtype_name", "FLOAT_TYPES", "float_dtype_of", "TRANSPARENT_OPS", "ROLE_KEY", "FLOAT_BRANCH", "FUSED_INPUT", "RANGE_SPLIT", "SUB_BYTE_DTYPES"]

logger = logging.getLogger(__name__)

# Ops that move or re-type a tensor without changing its values' meaning for quantization.
TRANSPARENT_OPS = frozenset({"Identity", "Reshape", "Transpose", "Cast", "Squeeze", "Unsqueeze", "Flatten"})

PROVENANCE_KEY = "llmq.pass"
ROLE_KEY = "llmq.role"  # set by a pass on a node it created for a purpose structure discovery must respect
FLOAT_BRANCH = "float-branch"  # a MatMul that deliberately stays float (e.g. split outlier channels)
FUSED_INPUT = "fused-input"  # a Concat whose first input is the linears' own input, the rest a side branch's
RANGE_SPLIT = "range-split"  # the nodes around a linear whose input is split by range (clipped part and residual)

# 4-bit constants (numpy dtypes from ml_dtypes, as onnx and onnx-graphsurgeon use) → their 8-bit carrier
SUB_BYTE_DTYPES = {np.dtype(ml_dtypes.int4): np.int8, np.dtype(ml_dtypes.uint4): np.uint8}

# the float types a model's weights and activations may be in: ONNX element type -> numpy dtype
FLOAT_TYPES = {onnx.TensorProto.FLOAT: np.dtype(np.float32), onnx.TensorProto.FLOAT16: np.dtype(np.float16),
               onnx.TensorProto.BFLOAT16: np.dtype(ml_dtypes.bfloat16)}
_PASS_FLOATS = (np.dtype(np.float32), np.dtype(np.float64))


def dtype_name(tensor: gs.Tensor) -> str | None:
    """numpy name of a tensor's element type ('int8', 'uint4', 'float8_e4m3fn', …); onnx-graphsurgeon gives the
    ONNX enum instead of a numpy type for the types it cannot map (float8, bfloat16)."""
    dtype = tensor.dtype
    if dtype is None:
        return None
    if isinstance(dtype, int):
        dtype = onnx.helper.tensor_dtype_to_np_dtype(dtype)
    return np.dtype(dtype).name


def float_dtype_of(model: onnx.ModelProto) -> np.dtype:
    """The model's float type: the one most float initializer elements are stored in (float32 if none)."""
    counts: dict = {}
    for init in model.graph.initializer:
        if init.data_type in FLOAT_TYPES:
            counts[init.data_type] = counts.get(init.data_type, 0) + int(np.prod(init.dims, dtype=np.int64))
    return FLOAT_TYPES[max(counts, key=counts.get)] if counts else np.dtype(np.float32)


@dataclass(frozen=True)
class ConstantView:
    """A constant reached through value-preserving ops: the stored tensor and the ops applied to it."""

    tensor: gs.Constant
    chain: tuple  # the gs nodes between the stored constant and the consumer, nearest-to-constant first

    @property
    def transposed(self) -> bool:
        return any(n.op == "Transpose" for n in self.chain)

    @property
    def quantized(self) -> bool:
        return any(n.op == "DequantizeLinear" for n in self.chain)


@dataclass
class Graph:
    """A gs graph with model-level facts, node metadata and provenance."""

    gs: gs.Graph
    opset: int
    ir_version: int
    model_metadata: dict = field(default_factory=dict)
    node_metadata: dict = field(default_factory=dict)  # node name -> {key: value}
    other_opsets: dict = field(default_factory=dict)  # domain -> version (non-default domains)
    float_dtype: np.dtype = np.dtype(np.float32)  # the model's float type (see make_constant / make_node)
    _names: itertools.count = field(default_factory=itertools.count, repr=False)
    _taken: set | None = field(default=None, repr=False)
    _nx: nx.DiGraph | None = field(default=None, repr=False)
    # what must live as long as the graph, set by the loader (the scratch folder its weights are read from)
    origin: object = field(default=None, repr=False)

    # ---- conversion (called by frontends/ and backends/ only) ----
    @classmethod
    def from_model(cls, model: onnx.ModelProto, base_dir: str | None = None, inline_dir: str | None = None) -> "Graph":
        """The graph of ``model``; constants in external data (not loaded) are read lazily from ``base_dir``
        (those the loader moved out of an inline file, from ``inline_dir``)."""
        opset, others = 0, {}
        for imp in model.opset_import:
            if imp.domain in ("", "ai.onnx"):
                opset = imp.version
            else:
                others[imp.domain] = imp.version
        node_md = {n.name: {p.key: p.value for p in n.metadata_props}
                   for n in model.graph.node if n.name and len(n.metadata_props)}
        graph = gs.import_onnx(model)
        taken = {n.name for n in graph.nodes}
        for i, node in enumerate(graph.nodes):  # every node has a name (parts and reports refer to them)
            if not node.name:
                node.name = next(f"node_{i}{suffix}" for suffix in ("", *(f"_{k}" for k in range(1, 1000)))
                                 if f"node_{i}{suffix}" not in taken)
                taken.add(node.name)
        if base_dir is not None:
            attach_external(graph, base_dir, inline_dir)
        return cls(gs=graph, opset=opset, ir_version=model.ir_version,
                   model_metadata={p.key: p.value for p in model.metadata_props},
                   node_metadata=node_md, other_opsets=others, float_dtype=float_dtype_of(model))

    @property
    def float_onnx_type(self) -> int:
        """The ONNX element type of :attr:`float_dtype` (for ``Cast`` nodes a pass inserts)."""
        return next(k for k, v in FLOAT_TYPES.items() if v == self.float_dtype)

    def to_model(self, keep_external: bool = False) -> onnx.ModelProto:
        """The graph as a self-contained ``ModelProto``: constants still on disk are read into it (without
        being kept in the graph), unless ``keep_external`` (the streaming writer: they stay references)."""
        self.gs.cleanup(remove_unused_graph_inputs=False).toposort()
        self.gs.opset = self.opset
        on_disk = [] if keep_external else [
            (t, t._values) for t in self.gs.tensors().values()
            if isinstance(t, gs.Constant) and isinstance(getattr(t, "_values", None), ExternalValues)]
        for t, values in on_disk:
            t._values = values.load()
        try:
            return self._export()
        finally:
            for t, values in on_disk:
                t._values = values

    def _export(self) -> onnx.ModelProto:
        # onnx-graphsurgeon writes one byte per element; 4-bit constants are exported as 8-bit and repacked
        # (constants still backed by a proto or a file are exported from it as they are: already packed)
        packed = {name: t for name, t in self.gs.tensors().items()
                  if isinstance(t, gs.Constant) and not isinstance(t._values, gs.ir.tensor.LazyValues)
                  and t.dtype in SUB_BYTE_DTYPES}
        originals = {name: (t.values, t._export_dtype) for name, t in packed.items()}
        try:
            for name, t in packed.items():
                t.values, t._export_dtype = originals[name][0].astype(SUB_BYTE_DTYPES[t.dtype]), None
            model = gs.export_onnx(self.gs, do_type_check=True)
        finally:
            for name, t in packed.items():
                t.values, t._export_dtype = originals[name]
        for i, init in enumerate(model.graph.initializer):
            if init.name in originals:
                model.graph.initializer[i].CopyFrom(numpy_helper.from_array(np.asarray(originals[init.name][0]),
                                                                            init.name))
        del model.opset_import[:]
        model.opset_import.append(onnx.helper.make_opsetid("", self.opset))
        for domain, version in sorted(self.other_opsets.items()):
            model.opset_import.append(onnx.helper.make_opsetid(domain, version))
        model.ir_version = max(self.ir_version, 10 if self.opset >= 21 else self.ir_version)
        for node in model.graph.node:
            for key, value in sorted(self.node_metadata.get(node.name, {}).items()):
                node.metadata_props.add(key=key, value=value)
        for init in model.graph.initializer:
            for key, value in sorted(self.node_metadata.get(init.name, {}).items()):
                init.metadata_props.add(key=key, value=value)
        for key, value in sorted(self.model_metadata.items()):
            model.metadata_props.add(key=key, value=value)
        return model

    # ---- rollback ----
    def snapshot(self) -> "Graph":
        """A copy to roll back to: nodes and tensors are copied, constant arrays shared (passes make new
        constants; none writes into an existing array)."""
        copy = self.gs.copy()
        # onnx-graphsurgeon's Constant.copy pins the export type to the values' type; keep it unset where it
        # was, or a 4-bit constant (exported through its 8-bit carrier, see _export) would no longer export
        originals = self.gs.tensors()
        for name, t in copy.tensors().items():
            if isinstance(t, gs.Constant):
                t._export_dtype = getattr(originals.get(name), "_export_dtype", None)
        return Graph(gs=copy, opset=self.opset, ir_version=self.ir_version,
                     model_metadata=dict(self.model_metadata),
                     node_metadata={k: dict(v) for k, v in self.node_metadata.items()},
                     other_opsets=dict(self.other_opsets), float_dtype=self.float_dtype)

    def restore(self, snapshot: "Graph") -> None:
        """Become ``snapshot`` again (taken by :meth:`snapshot`); names handed out since stay taken."""
        self.gs, self.opset, self.ir_version = snapshot.gs, snapshot.opset, snapshot.ir_version
        self.model_metadata, self.node_metadata = snapshot.model_metadata, snapshot.node_metadata
        self.other_opsets = snapshot.other_opsets
        self.touch()

    # ---- navigation ----
    def touch(self) -> None:
        """Forget cached analyses after a structural change."""
        self._nx = None

    def tensors(self) -> dict:
        return self.gs.tensors()

    @staticmethod
    def producer(tensor: gs.Tensor):
        return tensor.inputs[0] if tensor.inputs else None

    def nx(self) -> nx.DiGraph:
        """Node-level DiGraph (nodes are gs node names), cached until :meth:`touch`."""
        if self._nx is None:
            g = nx.DiGraph()
            for node in self.gs.nodes:
                g.add_node(node.name, op=node.op)
            for node in self.gs.nodes:
                for out in node.outputs:
                    for consumer in out.outputs:
                        g.add_edge(node.name, consumer.name, tensor=out.name)
            self._nx = g
        return self._nx

    def node_by_name(self) -> dict:
        return {n.name: n for n in self.gs.nodes}

    def constant_through(self, tensor: gs.Tensor, max_hops: int = 4) -> ConstantView | None:
        """The constant behind ``tensor`` if it is a constant seen through TRANSPARENT_OPS and dequantization:
        ``DequantizeLinear``, and a ``Mul`` by a constant after one (the per-channel level of a progressive,
        two-level quantized weight: ``DQ(codes, group scales, zero points) · channel scales``)."""
        chain = []
        for _ in range(max_hops + 1):
            if isinstance(tensor, gs.Constant):
                if any(n.op == "Mul" for n in chain) and not any(n.op == "DequantizeLinear" for n in chain):
                    return None  # a float product of constants is not a weight view
                return ConstantView(tensor, tuple(reversed(chain)))
            node = self.producer(tensor)
            if node is None or node.op not in TRANSPARENT_OPS | {"DequantizeLinear", "Mul"}:
                return None
            if node.op in ("Reshape", "DequantizeLinear") and not all(isinstance(t, gs.Constant) for t in node.inputs[1:]):
                return None
            if node.op == "Mul":
                if len(node.inputs) != 2 or not isinstance(node.inputs[1], gs.Constant) or isinstance(node.inputs[0], gs.Constant):
                    return None
            chain.append(node)
            tensor = node.inputs[0]
        return None

    @staticmethod
    def materialize(view: ConstantView) -> np.ndarray:
        """Apply the view's chain to the stored constant, giving the value the consumer sees."""
        value = np.asarray(view.tensor.values)
        for node in view.chain:
            if node.op == "Transpose":
                perm = node.attrs.get("perm")
                value = np.transpose(value, perm) if perm is not None else value.T
            elif node.op == "Reshape":
                value = value.reshape(np.asarray(node.inputs[1].values))
            elif node.op == "DequantizeLinear":
                value = _dequantize(value, node)
            elif node.op == "Cast":
                value = value.astype(onnx.helper.tensor_dtype_to_np_dtype(node.attrs["to"]))
            elif node.op == "Mul":
                value = value * np.asarray(node.inputs[1].values, np.float32)
            elif node.op in ("Squeeze", "Unsqueeze", "Flatten"):
                raise NotImplementedError(f"materialize through {node.op}")
        return value

    # ---- building (every creation is tagged with the pass that made it) ----
    def unique_name(self, base: str) -> str:
        """``base_<n>`` with a counter no other name in the graph uses. The graph's own names are read once
        (walking the graph per call made a pass over 2000 new tensors spend 20 s here); every name handed
        out is remembered, and passes create tensors and nodes only through this."""
        if self._taken is None:
            self._taken = set(self.tensors()) | {n.name for n in self.gs.nodes}
        while True:
            candidate = f"{base}_{next(self._names)}"
            if candidate not in self._taken:
                self._taken.add(candidate)
                return candidate

    def tag(self, name: str, pass_name: str) -> None:
        self.node_metadata.setdefault(name, {})[PROVENANCE_KEY] = pass_name

    def make_constant(self, base: str, values: np.ndarray, pass_name: str, export_dtype=None) -> gs.Constant:
        """A new constant. Float values a pass computes (float32/float64) are stored in the model's float type,
        so inserted math and Q/DQ scales keep the graph's precision (TensorRT's strongly typed mode takes the
        precision from them); a pass rounds what must be exact (scales) to that type itself first."""
        name = self.unique_name(base)
        values = np.asarray(values)
        if values.dtype in _PASS_FLOATS and values.dtype != self.float_dtype:
            values = values.astype(self.float_dtype)
        if not values.flags.c_contiguous:
            values = np.ascontiguousarray(values)  # (this alone would turn a 0-d scalar into shape [1])
        const = gs.Constant(name, values, export_dtype=export_dtype)
        self.tag(name, pass_name)
        return const

    def make_node(self, op: str, inputs: list, out_base: str, pass_name: str, attrs: dict | None = None,
                  out_dtype=None, out_shape=None, domain: str | None = None) -> gs.Variable:
        """Append a node with one output; returns that output. ``out_dtype`` float32 means the model's float
        type (passes compute in it; see :meth:`make_constant`)."""
        if out_dtype is not None and np.dtype(out_dtype) == np.float32:
            out_dtype = self.float_dtype
        out = gs.Variable(self.unique_name(out_base), dtype=out_dtype, shape=out_shape)
        node = gs.Node(op=op, name=self.unique_name(f"{pass_name}/{op}"), attrs=attrs or {},
                       inputs=list(inputs), outputs=[out], domain=domain)
        self.gs.nodes.append(node)
        self.tag(node.name, pass_name)
        self.touch()
        return out


    def add_to_output(self, node: gs.Node, extra: gs.Tensor, base: str, pass_name: str) -> gs.Variable:
        """Make ``node``'s first output ``node(...) + extra``: the node writes a new tensor (returned) and an
        ``Add`` writes the old one, so every consumer now reads the sum (side branches beside a linear)."""
        y = node.outputs[0]
        own = gs.Variable(self.unique_name(base), dtype=y.dtype)
        node.outputs[0] = own
        add = gs.Node("Add", name=self.unique_name(f"{pass_name}/Add"), inputs=[own, extra], outputs=[y])
        self.gs.nodes.append(add)
        self.tag(add.name, pass_name)
        self.touch()
        return own


def _dequantize(q: np.ndarray, node: gs.Node) -> np.ndarray:
    scale = np.asarray(node.inputs[1].values, dtype=np.float32)
    zp = np.asarray(node.inputs[2].values).astype(np.float32) if len(node.inputs) > 2 else np.zeros_like(scale)
    axis = node.attrs.get("axis", 1)
    block = node.attrs.get("block_size", 0)
    x = q.astype(np.float32)
    if scale.ndim == 0:
        return (x - zp) * scale
    axis = axis % q.ndim
    if block:
        scale = np.repeat(scale, block, axis=axis)[tuple(slice(0, d) for d in q.shape)]
        zp = np.repeat(zp, block, axis=axis)[tuple(slice(0, d) for d in q.shape)]
        return (x - zp) * scale
    shape = [1] * q.ndim
    shape[axis] = -1
    return (x - zp.reshape(shape)) * scale.reshape(shape)
