"""Safetensors files mapped into memory: zero-copy views, page release, aligned writing.

Why not `safetensors.safe_open`: its numpy backend copies every tensor out of the file (and reads
bf16 only when `ml_dtypes` happens to be imported). Here a file is mapped copy-on-write
(`mmap.ACCESS_COPY`: private, never written back), each tensor is a numpy view of the mapping,
and on the CPU backend a 64-byte-aligned view becomes a JAX array without a copy (through DLPack;
bfloat16, which DLPack has no type for, through `device_put`, which aliases such memory too)
(JAX aliases host buffers only at 64-byte alignment and only from writable arrays, which a
copy-on-write mapping gives without touching the file). A tensor that has to be transformed
(transposed, fused, quantized, or copied for alignment) gets its own buffer and its source
pages are released with `madvise(MADV_DONTNEED)`, so a load holds one resident copy of each
weight: peak RSS stays near the size of the weights, not twice it.

`save_aligned` writes standard safetensors files whose tensors start at 64-byte offsets
(tensors whose size is a multiple of 64 bytes first, the header padded), so our own files
(engine-layout weights, the synthetic benchmark checkpoint) always load without copies.
"""

from __future__ import annotations

import atexit
import ctypes
import functools
import json
import logging
import math
import mmap
import os
import time
import weakref

import jax
import ml_dtypes
import numpy as np

from powerinfer_jax.errors import TensorFileError  # importable from here, its old home

log = logging.getLogger(__name__)

ALIGN = 64  # bytes: what JAX's CPU client needs to alias a host buffer
DTYPES = {"F32": np.dtype(np.float32), "F16": np.dtype(np.float16), "BF16": np.dtype(ml_dtypes.bfloat16),
          "F64": np.dtype(np.float64), "I8": np.dtype(np.int8), "U8": np.dtype(np.uint8),
          "I16": np.dtype(np.int16), "U16": np.dtype(np.uint16), "I32": np.dtype(np.int32),
          "I64": np.dtype(np.int64), "BOOL": np.dtype(np.bool_)}
_NAMES = {v: k for k, v in DTYPES.items()}
_PAGE = mmap.PAGESIZE
_MAX_HEADER = 100 << 20  # the safetensors format's own limit on the JSON header

# A zero-copy array frees its host memory through numpy's DLPack deleter, which takes the GIL. That
# deleter runs on the thread that drops the buffer's last reference: an XLA CPU worker thread when
# an execution still holds the buffer after Python let the array go (a step's arguments are
# released just after its results are ready). If the interpreter is finalizing by then, Python
# ends that thread when it asks for the GIL, and unwinding its C++ frames aborts the process
# ("terminate called without an active exception": about one `bin/generate` exit in twenty on 2
# cores, right after the engine is freed). So at exit, before finalization: the zero-copy arrays
# still alive are kept alive for good (the OS takes the memory back), and those already let go
# but still held by an execution are waited for, while their deleters can still take the GIL.
_ZERO_COPY: dict[int, tuple[weakref.ref, weakref.ref]] = {}  # id(host view) -> (array, host view)
EXIT_WAIT_S = 10.0


def _track_zero_copy(array: jax.Array, view: np.ndarray) -> None:
    key = id(view)  # the view lives exactly as long as JAX holds the memory (its deleter frees it)
    _ZERO_COPY[key] = (weakref.ref(array), weakref.ref(view, lambda _ref: _ZERO_COPY.pop(key, None)))


@atexit.register  # registered after jax's own handlers, so it runs first, while the backend is up
def _settle_zero_copy_arrays() -> None:
    let_go = []
    for array_ref, view_ref in list(_ZERO_COPY.values()):
        array = array_ref()
        if array is not None:
            ctypes.pythonapi.Py_IncRef(ctypes.py_object(array))
        else:
            let_go.append(view_ref)
    deadline = time.monotonic() + EXIT_WAIT_S
    while any(r() is not None for r in let_go) and time.monotonic() < deadline:
        time.sleep(0.001)  # lets the worker thread take the GIL and run the deleter


def read_header(path: str) -> tuple[int, dict]:
    """(data start offset, header dict) of a safetensors file; fails clearly on truncation."""
    size = os.path.getsize(path)
    with open(path, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise TensorFileError(f"{path} is truncated or not a safetensors file ({size} bytes)")
        header_len = int.from_bytes(head, "little")
        if header_len > min(size - 8, _MAX_HEADER):
            raise TensorFileError(f"{path} is truncated or not a safetensors file (bad header length)")
        try:
            header = json.loads(f.read(header_len))
        except (ValueError, RecursionError) as err:  # JSONDecodeError, UnicodeDecodeError, deep nesting
            raise TensorFileError(f"{path} is truncated or corrupt: unreadable header "
                                  f"({str(err).splitlines()[0][:100] if str(err) else type(err).__name__})") from None
    _check_header(path, header)
    end = max((v["data_offsets"][1] for k, v in header.items() if k != "__metadata__"), default=0)
    if 8 + header_len + end > size:
        raise TensorFileError(f"{path} is truncated: its header needs {8 + header_len + end} bytes, the file has {size}")
    return 8 + header_len, header


def _check_header(path: str, header) -> None:
    """Every entry well-formed: a known dtype, a shape of non-negative ints, offsets that fit the shape."""
    if not isinstance(header, dict):
        raise TensorFileError(f"{path} is corrupt: its header is not a JSON object")
    meta = header.get("__metadata__")
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise TensorFileError(f"{path} is corrupt: __metadata__ must map names to strings")
    for name, e in header.items():
        if name == "__metadata__":
            continue
        bad = None
        if not isinstance(e, dict):
            bad = "an entry that is not an object"
        elif e.get("dtype") not in DTYPES:
            bad = f"unsupported dtype {e.get('dtype')!r:.30}"
        elif not (isinstance(e.get("shape"), list) and all(type(d) is int and 0 <= d < 2**48 for d in e["shape"])):
            bad = f"bad shape {e.get('shape')!r:.60}"
        elif not (isinstance(e.get("data_offsets"), list) and len(e["data_offsets"]) == 2
                  and all(type(o) is int for o in e["data_offsets"]) and 0 <= e["data_offsets"][0] <= e["data_offsets"][1]):
            bad = f"bad data_offsets {e.get('data_offsets')!r:.60}"
        else:
            need = math.prod(e["shape"]) * DTYPES[e["dtype"]].itemsize
            if e["data_offsets"][1] - e["data_offsets"][0] != need:
                bad = f"{e['data_offsets'][1] - e['data_offsets'][0]} bytes where its shape needs {need}"
        if bad is not None:
            raise TensorFileError(f"{path} is corrupt: tensor {name!r:.80} has {bad}; re-download or re-export it")


class MappedSafetensors:
    """One safetensors file mapped copy-on-write; tensors are numpy views of the mapping."""

    def __init__(self, path: str):
        self.path = path
        self.data_start, header = read_header(path)
        self.metadata = header.pop("__metadata__", None) or {}
        self.entries = header
        self._file = open(path, "rb")
        size = os.path.getsize(path)
        # An empty mapping is not allowed; a file with no tensors needs none.
        self._map = mmap.mmap(self._file.fileno(), 0, access=mmap.ACCESS_COPY) if size else None

    def keys(self) -> list[str]:
        """Tensor names in file order."""
        return list(self.entries)

    def shape(self, name: str) -> tuple[int, ...]:
        """Shape from the header (no data read)."""
        return tuple(self.entries[name]["shape"])

    def dtype(self, name: str) -> np.dtype:
        """numpy dtype from the header (no data read)."""
        code = self.entries[name]["dtype"]
        if code not in DTYPES:
            raise TensorFileError(f"{self.path}: tensor {name} has unsupported dtype {code}")
        return DTYPES[code]

    def view(self, name: str) -> np.ndarray:
        """The tensor as a writable numpy view of the copy-on-write mapping (no copy)."""
        e = self.entries[name]
        start, end = e["data_offsets"]
        dt = self.dtype(name)
        shape = tuple(e["shape"])
        count = int(np.prod(shape, dtype=np.int64))
        if (end - start) != count * dt.itemsize:
            raise TensorFileError(f"{self.path}: tensor {name} has {end - start} bytes, its shape needs "
                                  f"{count * dt.itemsize}")
        return np.frombuffer(self._map, dtype=dt, count=count, offset=self.data_start + start).reshape(shape)

    def release(self, name: str) -> None:
        """Drops the tensor's pages from memory (re-read from the file if touched again)."""
        if self._map is None:
            return
        start, end = self.entries[name]["data_offsets"]
        lo = -(-(self.data_start + start) // _PAGE) * _PAGE  # whole pages inside the tensor only
        hi = (self.data_start + end) // _PAGE * _PAGE
        if hi > lo:
            self._map.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    def release_view(self, view: np.ndarray) -> None:
        """Drops the pages of a view of this mapping (e.g. one layer of a stacked tensor) once copied."""
        if self._map is None:
            return
        import ctypes

        base = ctypes.addressof(ctypes.c_char.from_buffer(self._map))
        start = view.ctypes.data - base
        lo = -(-start // _PAGE) * _PAGE
        hi = (start + view.nbytes) // _PAGE * _PAGE
        if 0 <= lo < hi <= len(self._map):
            self._map.madvise(mmap.MADV_DONTNEED, lo, hi - lo)

    def close(self) -> None:
        """Closes the file; views handed out keep the mapping alive until they are freed."""
        self._file.close()


def aligned_empty(shape, dtype) -> np.ndarray:
    """An uninitialised C-contiguous array whose data starts at a 64-byte boundary."""
    dtype = np.dtype(dtype)
    n = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    raw = np.empty(n + ALIGN, np.uint8)
    off = (-raw.ctypes.data) % ALIGN
    return raw[off:off + n].view(dtype).reshape(shape)


def is_aligned(a: np.ndarray) -> bool:
    """Whether JAX's CPU client can alias `a` (64-byte aligned, C-contiguous, writable)."""
    return a.flags.c_contiguous and a.flags.writeable and a.ctypes.data % ALIGN == 0


def aligned(a: np.ndarray) -> np.ndarray:
    """`a` itself when JAX can alias it, else an aligned copy."""
    if is_aligned(a):
        return a
    out = aligned_empty(a.shape, a.dtype)
    out[...] = a
    return out


def to_jax(a, device=None) -> jax.Array:
    """A host array as a JAX array: zero-copy on the CPU backend (aligned; through DLPack, or for
    bfloat16, which DLPack cannot carry, through `device_put`, which aliases aligned host memory on
    that backend), a transfer elsewhere."""
    if isinstance(a, jax.Array) or a is None:
        return a
    a = np.asarray(a)
    if (device or jax.devices()[0]).platform != "cpu" or a.size == 0:
        return jax.device_put(a, device)
    view = aligned(a).view()  # its own object, referenced only by JAX from here on
    if view.dtype == DTYPES["BF16"]:
        # device_put holds the array that owns the memory, which a view shares with every tensor of its
        # file: an owner of this tensor's bytes alone (over a memoryview) is what _track_zero_copy follows.
        owner = np.frombuffer(memoryview(view.view(np.uint16).reshape(-1)).cast("B"), DTYPES["BF16"])
        out = jax.device_put(owner.reshape(view.shape), device)
        if out.unsafe_buffer_pointer() != owner.ctypes.data:  # this jax copied: nothing to track
            _warn_copied_bf16()
            return out
        view = owner
    else:
        out = jax.dlpack.from_dlpack(view)
    _track_zero_copy(out, view)
    return out


@functools.lru_cache(maxsize=1)
def _warn_copied_bf16() -> None:
    log.warning("this jax (%s) copies bfloat16 host arrays into device_put: weights are held twice", jax.__version__)


def to_global(a, sharding) -> jax.Array:
    """An array (host, or a local device's) as a global array of `sharding`, built shard by shard:
    each process makes only its own devices' shards (a mesh may span several processes), and no
    device receives more than its shard."""
    host = np.asarray(a)
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


def save_aligned(tensors: dict[str, np.ndarray], path: str, metadata: dict[str, str] | None = None) -> None:
    """Writes a safetensors file whose tensors start at 64-byte offsets where their sizes allow
    (those whose size is a multiple of 64 bytes go first), streaming each array (no concatenated copy)."""
    arrays = {k: np.asarray(v) for k, v in tensors.items()}
    names = sorted(arrays, key=lambda k: (arrays[k].nbytes % ALIGN != 0, k))
    for k in names:
        if arrays[k].dtype not in _NAMES:
            raise TensorFileError(f"cannot store dtype {arrays[k].dtype} (tensor {k})")
    write_streaming(path, [(k, arrays[k].dtype, arrays[k].shape) for k in names], arrays.__getitem__, metadata)


def write_streaming(path: str, specs: list[tuple[str, np.dtype, tuple[int, ...]]], produce,
                    metadata: dict[str, str] | None = None, progress=None) -> None:
    """Writes a safetensors file tensor by tensor without holding them all: `specs` lists
    (name, dtype, shape) in file order and `produce(name)` returns each array when its turn comes
    (the file can be larger than memory). Tensors start at 64-byte offsets where sizes allow."""
    header: dict = {"__metadata__": dict(metadata)} if metadata else {}
    offset = 0
    for name, dt, shape in specs:
        n = int(np.prod(shape, dtype=np.int64)) * np.dtype(dt).itemsize
        header[name] = {"dtype": _NAMES[np.dtype(dt)], "shape": list(shape), "data_offsets": [offset, offset + n]}
        offset += n
    raw = json.dumps(header, separators=(",", ":")).encode()
    raw += b" " * ((-(8 + len(raw))) % ALIGN)
    tmp = path + ".partial"
    with open(tmp, "wb") as f:
        f.write(len(raw).to_bytes(8, "little"))
        f.write(raw)
        for name, dt, shape in specs:
            a = np.ascontiguousarray(produce(name))
            if a.dtype != np.dtype(dt) or a.shape != tuple(shape):
                raise TensorFileError(f"{name}: produced {a.dtype}{a.shape}, declared {np.dtype(dt)}{tuple(shape)}")
            f.write(memoryview(a.reshape(-1).view(np.uint8)))
            if progress is not None:
                progress(name, a.nbytes)
    os.replace(tmp, path)
