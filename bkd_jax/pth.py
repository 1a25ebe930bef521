"""Reads PyTorch `.pth` checkpoints into numpy arrays, without importing torch.

Pretrained teachers for distillation come as PyTorch checkpoints (mdistiller's
`{"model": state_dict, ...}`, torchvision's plain state dicts, Hugging Face's
`pytorch_model.bin`). Requiring torch just to read them would pull a second framework
into a JAX install, so this module reads the formats directly. `torch.save` writes a zip
archive (torch >= 1.6):

    <prefix>/data.pkl      the pickled object; tensors are persistent references
    <prefix>/data/<key>    one raw little- or big-endian buffer per storage
    <prefix>/byteorder     "little" or "big" (absent in old files: little)

Older files (torch < 1.6, or `_use_new_zipfile_serialization=False`) are the legacy
format, a sequence of pickles and raw data (torch/serialization.py, `_legacy_save` and
`_legacy_load`):

    pickle: the magic number 0x1950A86A20F9469CFC6C    pickle: protocol version 1001
    pickle: system information (byte order, type sizes)
    pickle: the object; storages are persistent ids ("storage", type, key, location,
            numel, view), view = None or (view key, element offset, element count)
    pickle: the list of storage keys
    then per key, in that order: its element count (int64) and its raw elements, both
    little-endian (torch's storage writer swaps on big-endian hosts).

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
from collections.abc import Callable, Mapping
from typing import Any, BinaryIO

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

# (key, storage type, element count) -> the storage's elements, flat.
StorageReader = Callable[[str, _StorageType, int], np.ndarray]


def _skip_tensor(*args) -> None:
    """Stands in for the tensor rebuilders while storage types are only being collected."""
    del args


class _Unpickler(pickle.Unpickler):
    """Resolves only allow-listed globals; storages come from `read_storage`.

    With `rebuild=False`, tensors unpickle as None: a pass that only learns, through
    `read_storage`, which storages the object references.
    """

    def __init__(self, file: BinaryIO, read_storage: StorageReader, *, rebuild: bool = True):
        super().__init__(file)
        self._read_storage = read_storage
        self._rebuild = rebuild
        self._storages: dict[str, np.ndarray] = {}

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name)
        if (module, name) in _ALLOWED_GLOBALS:
            if not self._rebuild and module == "torch._utils":
                return _skip_tensor
            return _ALLOWED_GLOBALS[module, name]
        raise pickle.UnpicklingError(
            f"{module}.{name} is not allowed in a checkpoint read by bkd_jax.pth (only "
            "tensors, storages and ordered dicts are)"
        )

    def persistent_load(self, pid: Any) -> _Storage:
        """A storage from its persistent id: 5 fields (zip format) or 6 (legacy: a view)."""
        if not (isinstance(pid, tuple) and len(pid) in (5, 6) and pid[0] == "storage"):
            raise pickle.UnpicklingError(f"unsupported persistent id {pid!r}")
        _, storage_type, key, _location, numel, *view = pid
        if not isinstance(storage_type, _StorageType):
            raise pickle.UnpicklingError(f"unsupported storage type {storage_type!r}")
        if key not in self._storages:
            self._storages[key] = self._read_storage(key, storage_type, numel)
        data = self._storages[key]
        if view and view[0] is not None and self._rebuild:
            _view_key, offset, count = view[0]
            if offset < 0 or offset + count > data.size:
                raise pickle.UnpicklingError(
                    f"storage view of {count} elements at {offset} past storage {key}"
                )
            data = data[offset : offset + count]
        return _Storage(data, storage_type)


def _zip_reader(archive: zipfile.ZipFile, prefix: str, byteorder: str) -> StorageReader:
    order = "<" if byteorder == "little" else ">"

    def read(key: str, storage_type: _StorageType, numel: int) -> np.ndarray:
        dtype = storage_type.dtype.newbyteorder(order)
        raw = archive.read(f"{prefix}data/{key}")
        if len(raw) != numel * dtype.itemsize:
            raise pickle.UnpicklingError(
                f"storage {key}: {len(raw)} bytes for {numel} elements of {dtype}"
            )
        return np.frombuffer(raw, dtype)

    return read


def _record_prefix(archive: zipfile.ZipFile) -> str:
    """The directory holding `data.pkl` ("archive/" in files from recent torch)."""
    prefixes = [n[: -len("data.pkl")] for n in archive.namelist() if n.endswith("/data.pkl")]
    prefixes = [p for p in prefixes if p.count("/") == 1]
    if len(prefixes) != 1:
        raise ValueError(f"{archive.filename}: not a torch.save archive (no single data.pkl)")
    return prefixes[0]


def _load_zip(f: BinaryIO, path: str | os.PathLike) -> Any:
    with zipfile.ZipFile(f) as archive:
        prefix = _record_prefix(archive)
        byteorder = "little"
        if f"{prefix}byteorder" in archive.namelist():
            byteorder = archive.read(f"{prefix}byteorder").decode()
        if byteorder not in ("little", "big"):
            raise ValueError(f"{path}: unknown byte order {byteorder!r}")
        data = io.BytesIO(archive.read(f"{prefix}data.pkl"))
        return _Unpickler(data, _zip_reader(archive, prefix, byteorder)).load()


# torch/serialization.py MAGIC_NUMBER and PROTOCOL_VERSION of the legacy format.
LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001


def _read_legacy_storages(
    f: BinaryIO, keys: list[str], found: dict[str, tuple[_StorageType, int]], path
) -> dict[str, np.ndarray]:
    """Each storage after the key list: an int64 element count, then its elements."""
    storages = {}
    for key in keys:
        if key not in found:
            raise ValueError(f"{path}: storage {key!r} is listed but no tensor uses it")
        storage_type, numel = found[key]
        count = int.from_bytes(f.read(8), "little", signed=True)
        if count != numel:
            raise ValueError(f"{path}: storage {key!r} holds {count} elements, not {numel}")
        dtype = storage_type.dtype.newbyteorder("<")
        raw = f.read(numel * dtype.itemsize)
        if len(raw) != numel * dtype.itemsize:
            raise ValueError(f"{path}: the file ends inside storage {key!r}")
        storages[key] = np.frombuffer(raw, dtype)
    return storages


def _load_legacy(f: BinaryIO, path: str | os.PathLike) -> Any:
    """The legacy format: storage types are known only once the object is unpickled and
    storages follow it, so the object is unpickled twice, the second time with data."""
    header = _Unpickler(f, _no_storages)
    values = []  # magic number, protocol version, system information
    try:
        for _ in range(3):
            values.append(header.load())
    except Exception:  # any byte sequence may come here: no pickle, a truncated one
        pass
    if not values or values[0] != LEGACY_MAGIC:
        raise ValueError(
            f"{path}: not a PyTorch checkpoint (neither a zip archive nor the legacy "
            "format of torch < 1.6)"
        )
    if len(values) < 3:
        raise ValueError(f"{path}: a legacy format checkpoint that ends inside its header")
    if values[1] != LEGACY_PROTOCOL:
        raise ValueError(f"{path}: legacy protocol version {values[1]}, not {LEGACY_PROTOCOL}")
    start = f.tell()
    found: dict[str, tuple[_StorageType, int]] = {}

    def record(key: str, storage_type: _StorageType, numel: int) -> np.ndarray:
        found[key] = (storage_type, numel)
        return np.zeros(0, storage_type.dtype)

    _Unpickler(f, record, rebuild=False).load()
    keys = _Unpickler(f, _no_storages).load()
    storages = _read_legacy_storages(f, keys, found, path)
    f.seek(start)
    return _Unpickler(f, lambda key, storage_type, numel: storages[key]).load()


def _no_storages(key: str, storage_type: _StorageType, numel: int) -> np.ndarray:
    raise pickle.UnpicklingError(f"storage {key} referenced outside the checkpoint's object")


def load(path: str | os.PathLike) -> Any:
    """The object `torch.save` wrote to `path` (zip or legacy format), with every tensor
    as a numpy array."""
    with open(path, "rb") as f:
        if zipfile.is_zipfile(f):
            f.seek(0)
            return _load_zip(f, path)
        f.seek(0)
        return _load_legacy(f, path)


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
