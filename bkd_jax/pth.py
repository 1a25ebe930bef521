"""Reads PyTorch `.pth` checkpoints into numpy arrays, without importing torch.

Pretrained teachers for distillation come as PyTorch checkpoints (mdistiller's
`{"model": state_dict, ...}`, torchvision's plain state dicts). Requiring torch just to
read them would pull a second framework into a JAX install, so this module reads the
format directly. `torch.save` writes a zip archive:

    <prefix>/data.pkl      the pickled object; tensors are persistent references
    <prefix>/data/<key>    one raw little- or big-endian buffer per storage
    <prefix>/byteorder     "little" or "big" (absent in old files: little)

Unpickling runs under an allow-list of the few globals a state dict needs, so a
checkpoint cannot execute code on load. Tensors become numpy arrays (bfloat16 widened
to float32, which holds every bfloat16 value exactly).
"""

from __future__ import annotations

import collections
import io
import os
import pickle
import zipfile
from collections.abc import Mapping
from typing import Any

import numpy as np

# Storage classes `torch.save` names in persistent ids -> dtype of the stored elements.
_STORAGE_DTYPES = {
    "DoubleStorage": np.dtype(np.float64),
    "FloatStorage": np.dtype(np.float32),
    "HalfStorage": np.dtype(np.float16),
    "BFloat16Storage": np.dtype(np.uint16),  # widened to float32 by `_to_native`
    "LongStorage": np.dtype(np.int64),
    "IntStorage": np.dtype(np.int32),
    "ShortStorage": np.dtype(np.int16),
    "CharStorage": np.dtype(np.int8),
    "ByteStorage": np.dtype(np.uint8),
    "BoolStorage": np.dtype(np.bool_),
}


class _StorageType:
    """Stands in for a `torch.*Storage` class during unpickling."""

    def __init__(self, name: str):
        self.name = name
        self.dtype = _STORAGE_DTYPES[name]


class _Storage:
    """A storage read from the archive: its elements as a flat array, and its type."""

    def __init__(self, data: np.ndarray, storage_type: _StorageType):
        self.data = data
        self.storage_type = storage_type


def _to_native(array: np.ndarray, storage_type: _StorageType) -> np.ndarray:
    """A contiguous, native-endian copy; bfloat16 bits become float32 values."""
    array = array.astype(array.dtype.newbyteorder("="), order="C", copy=True)
    if storage_type.name == "BFloat16Storage":
        return (array.astype(np.uint32) << 16).view(np.float32)
    return array


def _rebuild_tensor_v2(
    storage: _Storage, storage_offset, size, stride, requires_grad, backward_hooks, metadata=None
) -> np.ndarray:
    """The array a tensor views: `size` elements at `stride` from `storage_offset`."""
    del requires_grad, backward_hooks, metadata
    size, stride = tuple(size), tuple(stride)
    if len(size) != len(stride) or any(n < 0 for n in size) or any(s < 0 for s in stride):
        raise pickle.UnpicklingError(f"invalid tensor size {size} / stride {stride}")
    flat = storage.data
    if 0 in size:
        return _to_native(np.zeros(size, flat.dtype), storage.storage_type)
    last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride))
    if storage_offset < 0 or last >= flat.size:
        raise pickle.UnpicklingError(
            f"tensor of size {size}, stride {stride}, offset {storage_offset} reads past its "
            f"storage of {flat.size} elements"
        )
    view = np.lib.stride_tricks.as_strided(
        flat[storage_offset:], size, tuple(s * flat.itemsize for s in stride), writeable=False
    )
    return _to_native(view, storage.storage_type)


def _rebuild_parameter(data: np.ndarray, requires_grad, backward_hooks) -> np.ndarray:
    del requires_grad, backward_hooks
    return data


_ALLOWED_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class _Unpickler(pickle.Unpickler):
    """Resolves only allow-listed globals; storages come from the zip archive."""

    def __init__(self, data: bytes, archive: zipfile.ZipFile, prefix: str, byteorder: str):
        super().__init__(io.BytesIO(data))
        self._archive = archive
        self._prefix = prefix
        self._byteorder = "<" if byteorder == "little" else ">"
        self._storages: dict[str, _Storage] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[module, name]
        raise pickle.UnpicklingError(
            f"{module}.{name} is not allowed in a checkpoint read by bkd_jax.pth (only "
            "tensors, storages and ordered dicts are)"
        )

    def persistent_load(self, pid: Any) -> _Storage:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unsupported storage type {storage_type!r}")
        if key not in self._storages:
            dtype = storage_type.dtype.newbyteorder(self._byteorder)
            raw = self._archive.read(f"{self._prefix}data/{key}")
            if len(raw) != numel * dtype.itemsize:
                raise pickle.UnpicklingError(
                    f"storage {key}: {len(raw)} bytes for {numel} elements of {dtype}"
                )
            self._storages[key] = _Storage(np.frombuffer(raw, dtype), storage_type)
        return self._storages[key]


def _record_prefix(archive: zipfile.ZipFile) -> str:
    """The directory holding `data.pkl` ("archive/" in files from recent torch)."""
    prefixes = [n[: -len("data.pkl")] for n in archive.namelist() if n.endswith("/data.pkl")]
    prefixes = [p for p in prefixes if p.count("/") == 1]
    if len(prefixes) != 1:
        raise ValueError(f"{archive.filename}: not a torch.save archive (no single data.pkl)")
    return prefixes[0]


def load(path: str | os.PathLike) -> Any:
    """The object `torch.save` wrote to `path`, with every tensor as a numpy array."""
    with open(path, "rb") as f:
        if not zipfile.is_zipfile(f):
            raise ValueError(
                f"{path}: not a zip-format PyTorch checkpoint. Files written by torch < 1.6 "
                "(or with _use_new_zipfile_serialization=False) use the legacy format, which "
                "bkd_jax does not read; re-save with torch.save(torch.load(path), new_path)."
            )
        with zipfile.ZipFile(f) as archive:
            prefix = _record_prefix(archive)
            byteorder = "little"
            if f"{prefix}byteorder" in archive.namelist():
                byteorder = archive.read(f"{prefix}byteorder").decode()
            if byteorder not in ("little", "big"):
                raise ValueError(f"{path}: unknown byte order {byteorder!r}")
            data = archive.read(f"{prefix}data.pkl")
            return _Unpickler(data, archive, prefix, byteorder).load()


def _is_state_dict(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and len(obj) > 0
        and all(isinstance(k, str) and isinstance(v, np.ndarray) for k, v in obj.items())
    )


def _unwrap(obj: Any, path: str | os.PathLike) -> Mapping[str, np.ndarray]:
    """The state dict itself, or the one under "model" / "state_dict"."""
    if _is_state_dict(obj):
        return obj
    if isinstance(obj, Mapping):
        for wrapper_key in ("model", "state_dict"):
            if _is_state_dict(obj.get(wrapper_key)):
                return obj[wrapper_key]
    found = sorted(map(str, obj)) if isinstance(obj, Mapping) else type(obj).__name__
    raise ValueError(
        f"{path}: no state dict found (expected a dict of tensors, or one under 'model' or "
        f"'state_dict'); found {found}"
    )


def load_state_dict(path: str | os.PathLike) -> dict[str, np.ndarray]:
    """A model's state dict from a `.pth` file, as `{torch key: numpy array}`.

    Accepts a plain state dict and the `{"model": ...}` / `{"state_dict": ...}` wrappers
    training scripts save, and strips the `module.` prefix `nn.DataParallel` adds.
    """
    state_dict = _unwrap(load(path), path)
    prefix = "module."
    if all(k.startswith(prefix) for k in state_dict):
        return {k[len(prefix) :]: v for k, v in state_dict.items()}
    return dict(state_dict)
