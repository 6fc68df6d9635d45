"""dcpp: PyTorch DCP checkpoints (and torch.save, safetensors files) from Python, without torch.

    ckpt = dcpp.open("/ckpt/step_1000")     # a DCP directory, torch.save file or safetensors
    ckpt.keys(); ckpt.info("model.w")       # dtype, global shape, chunks and their files
    w = ckpt["model.w"]                     # a numpy array
    rows = ckpt.read("model.w", (128, 0), (64, 1024))   # only that box is read from disk
    dcpp.save({"w": array, "step": 3}, "/ckpt/new")     # numpy or any DLPack array
    dcpp.convert("/ckpt/new", "/tmp/model.pt", to="torch")       # or to="dcp", "safetensors"

bfloat16 and the float8 kinds come back as ml_dtypes arrays when ml_dtypes is installed, else as
raw unsigned views (uint16 for bfloat16, uint8 for float8); complex32 as float16 pairs
(shape + (2,)). Errors are dcpp.Error subclasses carrying dcpp's message. `dcpp.torch` holds the
StorageWriter/StorageReader for torch.distributed.checkpoint.
"""

from __future__ import annotations

import os
from typing import Any, Iterable, Optional, Sequence

import numpy as np

from . import _dcpp
from ._dcpp import (  # noqa: F401  (re-exported)
    AbortedError,
    DataLossError,
    Error,
    FailedPreconditionError,
    InternalError,
    InvalidArgumentError,
    NotFoundError,
    UnavailableError,
    UnimplementedError,
)

__all__ = [
    "open", "save", "convert", "Checkpoint", "Opaque", "numpy_dtype", "Error",
    "InvalidArgumentError", "NotFoundError", "FailedPreconditionError", "AbortedError",
    "UnimplementedError", "InternalError", "UnavailableError", "DataLossError",
]

try:
    import ml_dtypes as _ml
except ImportError:  # optional: raw unsigned views without it
    _ml = None

_PLAIN = {
    "bool": np.bool_, "uint8": np.uint8, "int8": np.int8, "int16": np.int16,
    "int32": np.int32, "int64": np.int64, "uint16": np.uint16, "uint32": np.uint32,
    "uint64": np.uint64, "float16": np.float16, "float32": np.float32, "float64": np.float64,
    "complex64": np.complex64, "complex128": np.complex128,
}
# dcpp dtype name -> (ml_dtypes attribute, raw view dtype when ml_dtypes is absent)
_EXTENDED = {
    "bfloat16": ("bfloat16", np.uint16),
    "float8_e4m3fn": ("float8_e4m3fn", np.uint8),
    "float8_e5m2": ("float8_e5m2", np.uint8),
    "float8_e4m3fnuz": ("float8_e4m3fnuz", np.uint8),
    "float8_e5m2fnuz": ("float8_e5m2fnuz", np.uint8),
    "float8_e8m0fnu": ("float8_e8m0fnu", np.uint8),
    "float4_e2m1fn_x2": (None, np.uint8),
}


def numpy_dtype(name: str) -> np.dtype:
    """The numpy dtype dcpp returns for a stored dtype name ("float32", "bfloat16", ...)."""
    if name in _PLAIN:
        return np.dtype(_PLAIN[name])
    if name in _EXTENDED:
        attr, raw = _EXTENDED[name]
        if _ml is not None and attr is not None and hasattr(_ml, attr):
            return np.dtype(getattr(_ml, attr))
        return np.dtype(raw)
    if name == "complex32":
        return np.dtype(np.float16)
    raise UnimplementedError(f"no numpy dtype for {name}")


def _dcpp_name(dt: np.dtype) -> Optional[str]:
    """The dcpp dtype name of an ml_dtypes numpy dtype (None for numpy's own dtypes)."""
    if dt.kind == "V" or dt.type.__module__.startswith("ml_dtypes"):
        for name, (attr, _raw) in _EXTENDED.items():
            if _ml is not None and attr is not None and dt == np.dtype(getattr(_ml, attr, np.void)):
                return name
    return None


def _to_numpy(raw) -> np.ndarray:
    dt = numpy_dtype(raw.dtype)
    shape = tuple(raw.shape)
    if raw.dtype == "complex32":
        shape = shape + (2,)
    return raw.data.view(dt).reshape(shape)


class Opaque:
    """A stored Python object dcpp does not interpret: its class name and torch.save bytes."""

    def __init__(self, type_name: str, torch_save_bytes: bytes):
        self.type_name = type_name
        self.torch_save_bytes = torch_save_bytes

    def __repr__(self):
        return f"dcpp.Opaque({self.type_name})"


def _from_engine(v):
    if isinstance(v, _dcpp.RawTensor):
        return _to_numpy(v)
    if isinstance(v, dict):
        return {k: _from_engine(x) for k, x in v.items()}
    if isinstance(v, tuple) and len(v) == 3 and v[0] == "__dcpp_opaque__":
        return Opaque(v[1], v[2])
    if isinstance(v, list):
        return [_from_engine(x) for x in v]
    if isinstance(v, tuple):
        return tuple(_from_engine(x) for x in v)
    return v


class Checkpoint:
    """A checkpoint opened for reading: a DCP directory, a torch.save file, or a safetensors
    file or directory of them (Hugging Face, with or without model.safetensors.index.json)."""

    def __init__(self, path: str, thread_count: int = 4):
        self._c = _dcpp.Checkpoint(os.fspath(path), thread_count)

    @property
    def format(self) -> str:
        """"dcp", "torch" or "safetensors"."""
        return self._c.format

    @property
    def path(self) -> str:
        return self._c.path

    @property
    def bytes_read(self) -> int:
        """Bytes read from the checkpoint's files since open (or reset_bytes_read())."""
        return sum(self._c.bytes_read.values())

    @property
    def bytes_read_by_file(self) -> dict:
        """{file name: bytes read} since open (or reset_bytes_read()); `.metadata` included."""
        return dict(self._c.bytes_read)

    def reset_bytes_read(self) -> None:
        self._c.reset_bytes_read()

    def keys(self) -> list:
        return self._c.keys()

    def __iter__(self):
        return iter(self.keys())

    def __len__(self):
        return len(self.keys())

    def __contains__(self, key) -> bool:
        return self._c.__contains__(key)

    def info(self, key: str) -> dict:
        """{"is_tensor", "dtype", "shape", "nbytes", "chunks": [{"offsets", "sizes", "file",
        "offset", "length"}]} for a key."""
        return self._c.info(key)

    def is_tensor(self, key: str) -> bool:
        return self._c.info(key)["is_tensor"]

    def __getitem__(self, key: str):
        """A tensor as a numpy array, or a plain value (int, str, list, dict, ...)."""
        if self.is_tensor(key):
            return _to_numpy(self._c.read(key))
        return _from_engine(self._c.value(key))

    def read(self, key: str, offsets: Optional[Sequence[int]] = None,
             sizes: Optional[Sequence[int]] = None) -> np.ndarray:
        """The box [offsets, offsets + sizes) of tensor `key`. From a DCP checkpoint or a
        safetensors file only the bytes of the stored chunks it overlaps are read (a torch.save
        file is read whole)."""
        return _to_numpy(self._c.read(key, None if offsets is None else list(offsets),
                                      None if sizes is None else list(sizes)))

    def value(self, key: str) -> Any:
        return self[key]

    def verify(self, thread_count: int = 4) -> dict:
        """Reads every byte of the checkpoint and checks it: each blob segment against the
        manifest's xxHash3 checksums (a checkpoint dcpp wrote), every zip record's CRC-32, the
        metadata's structure and each tensor's dtype and shape. Returns the report (a dict with
        "ok", "items", "has_manifest", "segments_checked", "records_checked", "problems", ...);
        raises DataLossError naming each bad item by key, file and offset."""
        return self._c.verify(thread_count)

    def to_dict(self) -> dict:
        """Every key -> value (flat fully-qualified names)."""
        return {k: self[k] for k in self.keys()}


def open(path, thread_count: int = 4) -> Checkpoint:  # noqa: A001  (like builtins.open)
    """Opens a DCP checkpoint directory, a torch.save file, or safetensors (one file or a
    directory of them) for reading."""
    return Checkpoint(path, thread_count)


def _engine_leaf(x):
    """Arrays become what the engine takes: numpy/DLPack arrays as they are, ml_dtypes arrays as
    same-size unsigned views with their dtype named, other arrays via DLPack or numpy."""
    if isinstance(x, np.ndarray):
        name = _dcpp_name(x.dtype)
        if name is not None:
            raw = _EXTENDED[name][1]
            return _dcpp.TensorIn(x.view(raw), name)
        return x
    if isinstance(x, (dict, list, tuple, str, bytes, int, float, bool, type(None))):
        return x
    return x  # any object with __dlpack__ or the buffer protocol


def _prepare(tree):
    if isinstance(tree, dict):
        return {k: _prepare(v) for k, v in tree.items()}
    if isinstance(tree, list):
        return [_prepare(v) for v in tree]
    if isinstance(tree, tuple):
        return tuple(_prepare(v) for v in tree)
    return _engine_leaf(tree)


def save(state_dict: dict, path, thread_count: int = 4, overwrite: bool = True) -> None:
    """Saves a nested dict of arrays (numpy, or any DLPack producer: torch, jax, cupy on CPU)
    and plain values as a DCP checkpoint in directory `path`, which PyTorch's dcp.load reads.
    Arrays are written from their own memory, without copies."""
    _dcpp.save(_prepare(state_dict), os.fspath(path), thread_count, overwrite)


def convert(src, dst, to: str, max_shard_size: int = 5_000_000_000) -> list:
    """Converts between formats; the source's format is detected. to="torch" (one torch.save
    file), to="dcp" (a DCP directory) or to="safetensors" (a directory of
    model-XXXXX-of-NNNNN.safetensors files plus model.safetensors.index.json, a new file when
    `max_shard_size` bytes would be exceeded). Returns the keys left out: safetensors holds only
    tensors, so plain values are skipped and named here."""
    return _dcpp.convert(os.fspath(src), os.fspath(dst), to, max_shard_size)
