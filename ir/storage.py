"""Where weights live: read lazily from external data, handed to ONNX Runtime without copies, written streaming.

A model over 2 GB cannot pass through one ``onnx.ModelProto`` (protobuf's limit), and a model of several GB
should never be in memory at once. So:

* **Reading.** A constant stored in an external-data file becomes :class:`ExternalValues`: its shape and type
  are known at once, its bytes are read only when a pass asks for ``Constant.values`` (and dropped with the
  constant when the pass replaces it). Nothing reads all the weights at load.
* **Running.** :func:`session_inputs` turns a graph into a weightless model plus the large constants as arrays
  (memory-mapped, read-only, where still on disk). A session maps the constants of one file folder itself
  (:func:`_map_from_files`: nothing read until used); it takes the rest through
  ``SessionOptions.add_external_initializers``, no serialized copy, though ONNX Runtime copies each array.
* **Writing.** :func:`write_model` streams every large constant, one at a time, into ``<model>.data`` beside the
  output (64 KiB-aligned when ≥ 1 MiB, as ``onnx`` aligns, so ONNX Runtime can map them) and writes a small
  proto; a model whose weights total under :data:`INLINE_LIMIT` is written as one file instead. The same graph
  gives the same bytes either way.
"""

from __future__ import annotations

import contextlib
import contextvars
import logging
import os

import numpy as np
import onnx
import onnx_graphsurgeon as gs
from onnx_graphsurgeon.ir.tensor import LazyValues
from onnx import external_data_helper as edh
from onnx import numpy_helper

__all__ = ["COLLECT_OVER", "ExternalValues", "bytes_read", "collecting", "INLINE_LIMIT", "attach_external", "detach", "release_memory", "spill", "spill_inline", "constant_nbytes", "fill_packed", "graph_arrays_session", "graph_session", "session_array", "weightless_export", "peek", "session_inputs", "session_threads",
           "weights_as_inputs", "write_model"]

logger = logging.getLogger(__name__)

# Weights of this many bytes in all or more are written as external data. Protobuf refuses messages over 2 GB,
# and reading a single file means parsing all of it into memory at once (ONNX Runtime, and llmq's own
# verification of what it wrote), where external data is memory-mapped: past 1 GiB the weights go beside the
# model. Tests lower it to exercise the external path on tiny models.
INLINE_LIMIT = 1 << 30
SMALL = 1024  # constants below this stay inside the proto (shapes, axes, scalars)
ALIGN_OVER, ALIGNMENT = 1 << 20, 1 << 16
INLINE_FILE = "llmq-inline-weights.data"  # where the loader moves weights a model file holds inline


_READ = [0]  # bytes of weights read from external data (files, or memory maps handed to a session)


def bytes_read() -> int:
    """Bytes of weights this process has read from external data so far (a memory map handed to an ONNX
    Runtime session counts its size)."""
    return _READ[0]


class ExternalValues(LazyValues):
    """The values of a tensor stored in an external-data file, read on first use."""

    def __init__(self, tensor: onnx.TensorProto, path: str, offset: int, length: int | None):
        super().__init__(tensor)
        self.path, self.offset, self.length = path, int(offset), length

    @classmethod
    def of(cls, tensor: onnx.TensorProto, base_dir: str) -> "ExternalValues":
        info = {e.key: e.value for e in tensor.external_data}
        length = int(info["length"]) if "length" in info else None
        own = onnx.TensorProto()  # a message of its own: holding a part of the model would keep all of it alive
        own.CopyFrom(tensor)
        return cls(own, os.path.join(base_dir, info["location"]), int(info.get("offset", 0)), length)

    def _raw(self) -> bytes:
        with open(self.path, "rb") as fh:
            fh.seek(self.offset)
            raw = fh.read(self.length if self.length is not None else -1)
        _READ[0] += len(raw)
        return raw

    def load(self) -> np.ndarray:
        proto = onnx.TensorProto()
        proto.CopyFrom(self.tensor)
        del proto.external_data[:]
        proto.data_location = onnx.TensorProto.DEFAULT
        proto.raw_data = self._raw()
        return numpy_helper.to_array(proto).copy()

    def mapped(self) -> np.ndarray | None:
        """A read-only memory map of the values (no copy), or None where the bytes are not plain elements
        (4-bit packing, strings) or not aligned for the element type."""
        dtype = onnx.helper.tensor_dtype_to_np_dtype(self.tensor.data_type)
        if dtype.kind not in "fiub" or self.tensor.data_type in _SUB_BYTE or self.offset % dtype.itemsize:
            return None
        shape = tuple(int(d) for d in self.tensor.dims)
        if int(np.prod(shape, dtype=np.int64)) == 0:
            return None
        return np.memmap(self.path, dtype=dtype, mode="r", offset=self.offset, shape=shape)


_SUB_BYTE = {onnx.TensorProto.INT4, onnx.TensorProto.UINT4}


def _append(fh, raw: bytes) -> int:
    """Append ``raw`` to the open data file ``fh`` (64 KiB-aligned when ≥ 1 MiB, so ONNX Runtime and
    :meth:`ExternalValues.mapped` can map it; else 16-byte aligned); returns its offset."""
    offset = fh.tell()
    align = ALIGNMENT if len(raw) >= ALIGN_OVER else 16
    if offset % align:
        fh.write(b"\0" * (align - offset % align))
        offset = fh.tell()
    fh.write(raw)
    return offset


def _external_proto(proto: onnx.TensorProto, location: str, offset: int, length: int) -> onnx.TensorProto:
    """``proto`` made a reference to ``location`` at ``offset``; returns a fresh copy of it to keep: protobuf
    (upb) keeps a cleared field's bytes in the message's arena, so holding ``proto`` would hold its data."""
    proto.ClearField("raw_data")
    proto.data_location = onnx.TensorProto.EXTERNAL
    del proto.external_data[:]
    for key, value in (("location", location), ("offset", str(offset)), ("length", str(length))):
        proto.external_data.add(key=key, value=value)
    fresh = onnx.TensorProto()
    fresh.CopyFrom(proto)
    return fresh


def spill(graph: gs.Graph, path: str) -> int:
    """Move every large constant of ``graph`` held in memory to the end of the scratch file ``path``, where it
    is read again lazily (:class:`ExternalValues`); returns the bytes moved. A block-by-block compile calls
    this as each block finishes, so memory holds one block's new weights, not the model's."""
    moved = 0
    with open(path, "ab") as fh:
        for name, t in _large(graph):
            if isinstance(t._values, LazyValues):
                continue
            proto = numpy_helper.from_array(np.asarray(t._values), name)
            raw = proto.raw_data
            offset = _append(fh, raw)
            t._values = ExternalValues(_external_proto(proto, os.path.basename(path), offset, len(raw)), path, offset,
                                       len(raw))
            t.data_location = None
            moved += len(raw)
    return moved


def spill_inline(model: onnx.ModelProto, folder: str) -> int:
    """Move every initializer of ``model`` stored inline (≥ 1 KB) into ``folder/``:data:`INLINE_FILE` and make it an
    external reference there; returns the bytes moved. With :func:`attach_external` and :func:`detach`, the
    parsed model can then be freed: a graph loaded from an inline file holds no copy of its weights."""
    path = os.path.join(folder, INLINE_FILE)
    moved = 0
    with open(path, "ab") as fh:
        for init in model.graph.initializer:
            if not init.HasField("raw_data") or len(init.raw_data) < SMALL:
                continue
            raw = init.raw_data
            _external_proto(init, INLINE_FILE, _append(fh, raw), len(raw))
            moved += len(raw)
    return moved


def detach(graph: gs.Graph) -> None:
    """Read every small constant still backed by the parsed model into an array (node attributes included), so
    nothing in ``graph`` refers to the model's memory any more."""
    for t in graph.tensors().values():
        values = getattr(t, "_values", None)
        if isinstance(values, LazyValues) and not isinstance(values, ExternalValues):
            t._values = values.load()
    for node in graph.nodes:
        for value in node.attrs.values():
            if isinstance(value, gs.Constant) and isinstance(value._values, LazyValues) \
                    and not isinstance(value._values, ExternalValues):
                value._values = value._values.load()


# a full garbage collection costs about 0.3 s in a process that imported torch and transformers: more than a
# pass over a small model takes. A compile of weights under this size runs its release_memory calls without one
COLLECT_OVER = 64 << 20
_collect = contextvars.ContextVar("llmq_collect", default=True)


@contextlib.contextmanager
def collecting(enabled: bool):
    """Within the block, :func:`release_memory` garbage-collects only if ``enabled`` (see ``COLLECT_OVER``)."""
    token = _collect.set(enabled)
    try:
        yield
    finally:
        _collect.reset(token)


def release_memory() -> None:
    """Give freed memory back to the system (garbage-collect, then glibc's ``malloc_trim``): the weights a
    pass replaced are freed, but the allocator would otherwise keep the pages for later, and the next phase
    (a session over the whole model) would stack on top of them. Inside ``collecting(False)`` (a small
    model's compile) the collection is left to Python's own schedule."""
    import ctypes
    import gc

    if not _collect.get():
        return
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):  # not glibc: nothing to trim
        pass


def attach_external(graph: gs.Graph, base_dir: str, inline_dir: str | None = None) -> int:
    """Make every constant of ``graph`` (imported from a proto whose external data was not loaded) read its
    bytes from ``base_dir`` lazily (from ``inline_dir`` for the ones :func:`spill_inline` moved); returns how
    many constants are external."""
    count = 0
    for t in graph.tensors().values():
        values = getattr(t, "_values", None)
        if isinstance(values, LazyValues) and not isinstance(values, ExternalValues) \
                and edh.uses_external_data(values.tensor):
            location = next((e.value for e in values.tensor.external_data if e.key == "location"), "")
            spilled = inline_dir is not None and location == INLINE_FILE
            t._values = ExternalValues.of(values.tensor, inline_dir if spilled else base_dir)
            t.data_location = None  # gs would mark the values external again once a pass has read them
            count += 1
    return count


def peek(t: gs.Constant) -> np.ndarray:
    """A constant's values without keeping them: memory-mapped from disk where possible, else read (the
    constant stays lazy, so whole-model checks do not pull every weight into memory)."""
    values = t._values
    if isinstance(values, ExternalValues):
        mapped = values.mapped()
        return mapped if mapped is not None else values.load()
    if isinstance(values, LazyValues):
        return values.load()
    return values


def constant_nbytes(t: gs.Constant) -> int:
    values = t._values
    if isinstance(values, LazyValues):
        dtype = onnx.helper.tensor_dtype_to_np_dtype(values.tensor.data_type)
        return int(np.prod(values.shape, dtype=np.int64)) * dtype.itemsize
    return int(np.asarray(values).nbytes)


def _large(graph: gs.Graph):
    for name, t in sorted(graph.tensors().items()):
        if isinstance(t, gs.Constant) and constant_nbytes(t) >= SMALL:
            yield name, t


def session_inputs(to_model, graph: gs.Graph, upcast: bool = False) -> tuple:
    """``(weightless model, names, constants, packed)`` for an ONNX Runtime session over ``graph``: ``to_model()``
    exports it with every large constant replaced by an external stub; ``constants`` are those constants (in
    the order of ``names``), whose arrays :func:`session_array` gives once the model is cut to what a session
    needs (memory-mapped where still on disk, else the arrays the graph holds). 4-bit constants are stubbed too
    but ONNX Runtime takes packed bytes only from the proto: ``packed`` maps their names to their constants,
    for :func:`fill_packed` to put in once the model is cut. ``upcast``: bfloat16 stubs are typed float32 and
    :func:`session_array` gives their arrays as float32 (see :mod:`llmq.ir.precision`; the caller up-casts the
    rest of the model). Nothing is read into the graph: a constant still on disk stays there."""
    stubs, names, constants, packed = {}, [], [], {}
    for name, t in _large(graph):
        values = t._values
        if isinstance(values, LazyValues):
            dtype = onnx.helper.tensor_dtype_to_np_dtype(values.tensor.data_type)
            shape = tuple(int(d) for d in values.tensor.dims)
        else:
            dtype, shape = np.asarray(values).dtype, np.asarray(values).shape
        if str(dtype) in ("int4", "uint4"):
            packed[name] = t
        elif dtype.kind not in "fiubV":
            continue  # strings and the like stay in the proto
        else:
            names.append(name)
            constants.append(t)
        given = np.dtype(np.float32) if upcast and dtype.name == "bfloat16" else dtype
        stub = onnx.TensorProto(name=name, data_type=onnx.helper.np_dtype_to_tensor_dtype(given),
                                dims=list(shape), data_location=onnx.TensorProto.EXTERNAL)
        stub.external_data.add(key="location", value="__llmq_in_memory__")
        stubs[name] = (t, t._values)
        t._values = LazyValues(stub)
    try:
        model = to_model()
    finally:
        for t, values in stubs.values():
            t._values = values
    return model, names, constants, packed


def session_array(t: gs.Constant, upcast: bool = False) -> np.ndarray:
    """The array a session is handed for constant ``t`` (see :func:`session_inputs`)."""
    values = t._values
    array = values.mapped() if isinstance(values, ExternalValues) else None
    if array is None:
        array = values.load() if isinstance(values, LazyValues) else np.ascontiguousarray(values)
    if upcast and array.dtype.name == "bfloat16":
        array = array.astype(np.float32)
    return array


def weightless_export(graph) -> tuple:
    """:func:`session_inputs` of ``graph`` as :func:`graph_arrays_session` makes them, for a caller that opens
    several sessions on a graph it does not change in between (its ``prepared``): one export of the whole
    graph instead of one per session (about 0.2 s each on SmolLM2-135M). Holds no arrays."""
    return session_inputs(graph.to_model, graph.gs, graph.float_dtype.name == "bfloat16")


def fill_packed(model: onnx.ModelProto, packed: dict) -> None:
    """Put the packed bytes of the 4-bit constants ``model`` keeps (stubs from :func:`session_inputs`) inline."""
    for init in model.graph.initializer:
        t = packed.get(init.name)
        if t is None:
            continue
        values = t._values
        raw = values._raw() if isinstance(values, ExternalValues) else numpy_helper.from_array(
            values.load() if isinstance(values, LazyValues) else np.asarray(values)).raw_data
        del init.external_data[:]
        init.data_location = onnx.TensorProto.DEFAULT
        init.raw_data = raw


def weights_as_inputs(model: onnx.ModelProto) -> onnx.ModelProto:
    """``model`` (from :func:`session_inputs`) with each stubbed weight turned into a graph input of the same
    type and shape, so the checker and strict shape inference accept it without the bytes."""
    keep, moved = [], []
    for init in model.graph.initializer:
        if edh.uses_external_data(init):
            moved.append(onnx.helper.make_tensor_value_info(init.name, init.data_type, list(init.dims)))
        else:
            keep.append(init)
    del model.graph.initializer[:]
    model.graph.initializer.extend(keep)
    model.graph.input.extend(moved)
    return model


THREADS_ENV = "LLMQ_THREADS"


def session_threads() -> int | None:
    """The intra-op threads of every ONNX Runtime session llmq opens: ``$LLMQ_THREADS`` when set (a build
    machine shared with other jobs; each test worker of ``make test``), else ONNX Runtime's own choice (a
    thread per physical core, spinning while idle)."""
    value = os.environ.get(THREADS_ENV, "").strip()
    if not value:
        return None
    if not value.isdigit() or int(value) < 1:
        from .errors import LlmqError

        raise LlmqError(f"{THREADS_ENV}={value!r} is not a thread count", "set it to a positive integer or unset it")
    return int(value)


def graph_session(graph, extra_outputs=(), options=None, prepack: bool = False):
    """An ONNX Runtime CPU session over an llmq :class:`~llmq.ir.graph.Graph` as it stands, with
    ``extra_outputs`` (tensor names) exposed as outputs. No serialized copy of the weights is made: they are
    handed over as arrays (see :func:`session_inputs`); a bfloat16 graph runs up-cast to float32."""
    tensors = graph.tensors()
    saved = list(graph.gs.outputs)
    present = {t.name for t in saved}
    extras = [tensors[n] for n in dict.fromkeys(extra_outputs) if n in tensors and n not in present]
    untyped = [t for t in extras if t.dtype is None]
    for t in untyped:  # the exporter wants a type on every output; the proto's entry is made untyped again
        t.dtype = np.float32
    graph.gs.outputs = saved + extras  # outputs before the export, so nodes only they read survive its cleanup

    def expose(model):
        names = {t.name for t in untyped}
        for i, o in enumerate(model.graph.output):
            if o.name in names:
                model.graph.output[i].CopyFrom(onnx.helper.make_empty_tensor_value_info(o.name))
        return model

    try:
        return graph_arrays_session(graph, expose, options, prepack)
    finally:
        graph.gs.outputs = saved
        for t in untyped:
            t.dtype = None


def graph_arrays_session(graph, cut, options=None, prepack: bool = False, views: dict | None = None,
                         prepared: tuple | None = None):
    """A session over ``cut(weightless model)`` (e.g. one part of the graph, or the graph with outputs
    added); only the arrays of the initializers the cut model keeps are read and handed over. ``prepack``: let
    ONNX Runtime repack the weights for its MatMul kernels (a copy of them: worth it only for a session run
    many times, such as the sensitivity probe's). ``views``: ``{name: (source, fn)}`` for stubbed initializers
    the cut adds (it may fill the dict as it cuts): their array is ``fn(array of source)``, e.g. a slice.
    ``prepared``: :func:`weightless_export` of ``graph`` made earlier, valid only while the graph is unchanged
    (``cut`` must build a new model, not edit the one it is given)."""
    import onnxruntime as ort

    from .precision import quant_precision_entries, upcast_bfloat16

    upcast = graph.float_dtype.name == "bfloat16"
    model, names, constants, packed = prepared if prepared is not None else weightless_export(graph)
    model = cut(model)
    fill_packed(model, packed)
    kept = {i.name for i in model.graph.initializer}
    pairs = [(n, session_array(t, upcast)) for n, t in zip(names, constants) if n in kept]
    _READ[0] += sum(a.nbytes for _, a in pairs if isinstance(a, np.memmap))
    if views:
        source = dict(zip(names, constants))
        for n, (src, fn) in views.items():
            if n in kept and src in source:
                array = session_array(source[src], upcast)
                pairs.append((n, fn(array)))
                _READ[0] += pairs[-1][1].nbytes if isinstance(array, np.memmap) else 0
                del array
    if options is None:
        options = ort.SessionOptions()
        options.log_severity_level = 3
        options.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", "0")
        for entry in quant_precision_entries():  # exact INT8 GEMMs on x86 CPUs without VNNI
            options.add_session_config_entry(*entry)
        if session_threads():
            options.intra_op_num_threads = session_threads()
    pairs = _map_from_files(model, pairs, options, len(pairs) - len(views or ()))
    names, arrays = [n for n, _ in pairs], [a for _, a in pairs]
    if upcast:
        upcast_bfloat16(model)
    if not prepack:
        options.add_session_config_entry("session.disable_prepacking", "1")  # prepacked weights would be copies
    values = [_ort_value(a) for a in arrays]
    if names:
        options.add_external_initializers(names, values)
    session = ort.InferenceSession(model.SerializeToString(), options, providers=["CPUExecutionProvider"])
    session.llmq_keep = (values, arrays)  # the session reads these buffers: they live as long as it does
    return session


def _ort_value(array: np.ndarray):
    """An ONNX Runtime value over ``array``'s buffer; the float8 types (ml_dtypes, which ONNX Runtime's numpy
    bridge does not know) are handed over as their bytes with the ONNX element type named."""
    import onnxruntime as ort

    if array.dtype.kind == "V" and array.dtype.itemsize == 1:
        return ort.OrtValue.ortvalue_from_numpy_with_onnx_type(array.view(np.uint8), onnx.helper.np_dtype_to_tensor_dtype(array.dtype))
    return ort.OrtValue.ortvalue_from_numpy(array)


def _map_from_files(model: onnx.ModelProto, pairs: list, options, direct: int) -> list:
    """Let ONNX Runtime map the weights of ``pairs`` that are memory maps of a file itself: ``model``'s stubs
    of those in the folder holding most of their bytes are pointed at their file (ONNX Runtime takes one
    folder for a model given as bytes: ``session.model_external_initializers_file_folder_path``), and the
    remaining ``pairs`` are returned, for ``add_external_initializers``, which copies them (ONNX Runtime 1.32
    copies every array it is handed: the float16 embedding of Llama-3-8B, 1 GB, twice in memory where a
    mapped file reads only the rows a Gather touches). Only the first ``direct`` pairs are candidates (views
    such as column slices are not plain file ranges)."""
    files = {}
    for n, a in pairs[:direct]:
        if isinstance(a, np.memmap) and isinstance(getattr(a, "filename", None), str) and a.flags.c_contiguous:
            files[n] = (os.path.dirname(a.filename), os.path.basename(a.filename), int(a.offset), int(a.nbytes))
    if not files:
        return pairs
    by_folder: dict = {}
    for folder, _, _, nbytes in files.values():
        by_folder[folder] = by_folder.get(folder, 0) + nbytes
    folder = max(sorted(by_folder), key=by_folder.get)
    mapped = {n: f for n, f in files.items() if f[0] == folder}
    dtypes = {n: a.dtype for n, a in pairs[:direct]}
    for init in model.graph.initializer:
        f = mapped.get(init.name)
        if f is not None and init.data_type == onnx.helper.np_dtype_to_tensor_dtype(dtypes[init.name]):
            del init.external_data[:]
            for key, value in (("location", f[1]), ("offset", str(f[2])), ("length", str(f[3]))):
                init.external_data.add(key=key, value=value)
        else:
            mapped.pop(init.name, None)
    if not mapped:
        return pairs
    options.add_session_config_entry("session.model_external_initializers_file_folder_path", folder)
    return [(n, a) for n, a in pairs if n not in mapped]


def _varint(value: int) -> bytes:
    out = bytearray()
    while True:
        byte, value = value & 0x7F, value >> 7
        out.append(byte | (0x80 if value else 0))
        if not value:
            return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited protobuf field."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


MODEL_GRAPH, GRAPH_INITIALIZER = 7, 5  # ModelProto.graph, GraphProto.initializer (onnx.proto field numbers)


def _write_inline(to_model, large: list, path: str) -> None:
    """One self-contained file, written a tensor at a time: the model without its large constants, then each
    one as another ``graph { initializer }`` field, which protobuf parsers merge into the one graph (the
    wire format's rule for a message field that appears twice). No proto of the whole model is ever built,
    so writing costs one tensor of memory, not two copies of the model."""
    stubs = {}
    for name, t in large:
        values = t._values
        if isinstance(values, ExternalValues):
            stubs[name] = (t, values, None)  # exported as a reference, read when its turn comes
            continue
        if isinstance(values, LazyValues):
            continue  # a proto still holds it: exported as it is
        array = np.asarray(values)
        if str(array.dtype) in ("int4", "uint4"):
            continue  # packed by the graph's exporter
        stub = onnx.TensorProto(name=name, data_type=onnx.helper.np_dtype_to_tensor_dtype(array.dtype),
                                dims=list(array.shape), data_location=onnx.TensorProto.EXTERNAL)
        stub.external_data.add(key="location", value="__llmq_streamed__")
        stubs[name] = (t, values, array)
        t._values = LazyValues(stub)
    try:
        model = to_model(keep_external=True)
    finally:
        for t, values, _ in stubs.values():
            t._values = values
    inits = list(model.graph.initializer)
    streamed = [i for i in inits if edh.uses_external_data(i)]
    del model.graph.initializer[:]
    model.graph.initializer.extend(i for i in inits if not edh.uses_external_data(i))
    with open(path, "wb") as fh:
        fh.write(model.SerializeToString())
        del model
        for init in streamed:
            t, values, array = stubs[init.name]
            raw = values._raw() if array is None else numpy_helper.from_array(array).raw_data
            del init.external_data[:]
            init.data_location = onnx.TensorProto.DEFAULT
            init.raw_data = raw
            fh.write(_field(MODEL_GRAPH, _field(GRAPH_INITIALIZER, init.SerializeToString())))
            del raw
            init.ClearField("raw_data")


def write_model(to_model, graph: gs.Graph, path: str, external: bool | None = None,
                inline_limit: int | None = None, adopt: bool = False) -> list:
    """Write the graph (``to_model`` exports it) to ``path``; returns the files written. ``external``: force
    external data on or off (default: on when the large constants total ``inline_limit`` bytes or more).
    ``adopt``: with external data, the written constants now read from the written file (their arrays are
    dropped: memory is freed as each is written); otherwise the graph is left as it was. Either way a constant
    is read or serialized one at a time (see :func:`_write_inline`)."""
    large = list(_large(graph))
    total = sum(constant_nbytes(t) for _, t in large)
    limit = INLINE_LIMIT if inline_limit is None else inline_limit
    if external is None:
        external = total >= limit
    if not external:
        _write_inline(to_model, large, path)
        return [path]
    location = os.path.basename(path) + ".data"
    data_path = os.path.join(os.path.dirname(os.path.abspath(path)), location)
    before = {name: t._values for name, t in large}
    with open(data_path, "wb") as fh:
        for name, t in large:
            values = t._values
            if isinstance(values, ExternalValues) and values.path == data_path:
                continue  # already written here
            if isinstance(values, ExternalValues):
                raw = values._raw()
                proto = onnx.TensorProto()
                proto.CopyFrom(values.tensor)
                del proto.external_data[:]
                proto.data_location = onnx.TensorProto.DEFAULT
            else:
                proto = numpy_helper.from_array(values.load() if isinstance(values, LazyValues) else np.asarray(values), name)
                raw = proto.raw_data
                proto.ClearField("raw_data")
            offset, length = _append(fh, raw), len(raw)
            proto.name = name
            proto = _external_proto(proto, location, offset, length)
            del raw
            t._values = ExternalValues(proto, data_path, offset, length)
    try:
        onnx.save_model(to_model(keep_external=True), path)
    finally:
        if not adopt:
            for name, t in large:
                t._values = before[name]
    return [path, data_path]

