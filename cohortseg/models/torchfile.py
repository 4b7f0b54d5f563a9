"""PyTorch ``state_dict`` files read without PyTorch: name -> numpy array.

Two on-disk formats exist, and the deep-T1-WMH weights use both:

* **zip** (``torch.save`` since 1.6): a zip archive ``<prefix>/data.pkl`` (the pickled dict) plus one
  raw little-endian storage per tensor in ``<prefix>/data/<key>``;
* **legacy** (before 1.6): five pickles back to back - magic number, protocol version (1001), a
  system-info dict (endianness, type sizes), the dict itself, the list of storage keys - followed by
  every storage as an int64 element count and its raw bytes, in that key order.

In both, tensors are pickled as ``torch._utils._rebuild_tensor_v2(storage, offset, size, stride, ...)``
with the storage a *persistent id* ``('storage', torch.FloatStorage, key, location, numel[, view])``.
These files come from the internet and a pickle can run any callable it names, so the unpickler here
resolves only the handful of globals a state dict needs (``collections.OrderedDict``, the tensor
rebuild functions, the ``torch.*Storage`` types - all replaced by local stand-ins) and refuses any
other global with a :class:`~cohortseg.errors.ModelError` naming it.
"""
from __future__ import annotations

import collections
import io
import pickle
import struct
import zipfile
from pathlib import Path

import numpy as np

from cohortseg.errors import ModelError

LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
LEGACY_PROTOCOL = 1001

#: torch storage type name -> numpy dtype (little endian)
STORAGE_DTYPES = {
    "FloatStorage": np.dtype("<f4"), "DoubleStorage": np.dtype("<f8"), "HalfStorage": np.dtype("<f2"),
    "LongStorage": np.dtype("<i8"), "IntStorage": np.dtype("<i4"), "ShortStorage": np.dtype("<i2"),
    "CharStorage": np.dtype("i1"), "ByteStorage": np.dtype("u1"), "BoolStorage": np.dtype("?"),
}


class _StorageType:
    def __init__(self, name: str):
        self.name = name
        self.dtype = STORAGE_DTYPES[name]


class _Storage:
    """A storage named by a persistent id; its bytes arrive later (legacy) or on demand (zip)."""

    def __init__(self, stype: _StorageType, key: str, numel: int):
        self.dtype, self.key, self.numel = stype.dtype, str(key), int(numel)
        self.array: np.ndarray | None = None


class _TensorRef:
    def __init__(self, storage: _Storage, offset: int, size, stride):
        self.storage, self.offset, self.size, self.stride = storage, int(offset), tuple(size), tuple(stride)

    def materialize(self, source) -> np.ndarray:
        a = self.storage.array
        if a is None:
            raise ModelError(f"{source}: tensor storage {self.storage.key} has no data")
        if any(s < 0 for s in self.size) or any(s < 0 for s in self.stride):
            raise ModelError(f"{source}: tensor with negative size or stride")
        last = self.offset + sum((n - 1) * s for n, s in zip(self.size, self.stride) if n > 0)
        if self.offset < 0 or (all(n > 0 for n in self.size) and last >= a.size):
            raise ModelError(f"{source}: tensor runs past its storage {self.storage.key} ({a.size} elements)")
        if 0 in self.size:
            return np.zeros(self.size, a.dtype)
        view = np.lib.stride_tricks.as_strided(a[self.offset:], shape=self.size,
                                               strides=[s * a.itemsize for s in self.stride], writeable=False)
        return np.array(view, dtype=a.dtype.newbyteorder("="), copy=True)


def _rebuild_tensor_v2(storage, offset, size, stride, requires_grad=False, hooks=None, metadata=None):
    return _TensorRef(storage, offset, size, stride)


def _rebuild_tensor(storage, offset, size, stride):
    return _TensorRef(storage, offset, size, stride)


def _rebuild_parameter(data, requires_grad=False, hooks=None):
    return data


_ALLOWED = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class _Unpickler(pickle.Unpickler):
    """Resolves only the globals of a state dict; `storage_ids` collects the persistent storages."""

    def __init__(self, f, source, allow_tensors: bool = True):
        super().__init__(f)
        self.source = source
        self.allow_tensors = allow_tensors
        self.storages: dict[str, _Storage] = {}

    def find_class(self, module, name):
        if self.allow_tensors:
            if (module, name) in _ALLOWED:
                return _ALLOWED[(module, name)]
            if module == "torch" and name in STORAGE_DTYPES:
                return _StorageType(name)
        raise ModelError(f"{self.source}: refusing to unpickle global '{module}.{name}': a PyTorch state_dict "
                         "holds only tensors (this file is not a plain weights file, or is malicious)")

    def persistent_load(self, pid):
        if not self.allow_tensors or not isinstance(pid, tuple) or len(pid) < 5 or pid[0] != "storage":
            raise ModelError(f"{self.source}: unexpected persistent id {pid!r:.80} (not a tensor storage)")
        stype, key, numel = pid[1], pid[2], pid[4]
        if not isinstance(stype, _StorageType):
            raise ModelError(f"{self.source}: storage of unknown type {stype!r:.60}")
        if len(pid) > 5 and pid[5] is not None:
            raise ModelError(f"{self.source}: storage views (PyTorch < 0.4 files) are not supported")
        key = str(key)
        if key not in self.storages:
            self.storages[key] = _Storage(stype, key, numel)
        return self.storages[key]


def _as_arrays(obj, source) -> dict[str, np.ndarray]:
    if not isinstance(obj, dict):
        raise ModelError(f"{source}: not a state_dict (the pickled object is a {type(obj).__name__})")
    out = {}
    for k, v in obj.items():
        if not isinstance(k, str) or not isinstance(v, _TensorRef):
            raise ModelError(f"{source}: not a state_dict (entry {k!r:.60} is not a named tensor)")
        out[k] = v.materialize(source)
    return out


def _load_zip(path: Path) -> dict[str, np.ndarray]:
    with zipfile.ZipFile(path) as z:
        names = z.namelist()
        pkl = [n for n in names if n.endswith("/data.pkl") or n == "data.pkl"]
        if len(pkl) != 1:
            raise ModelError(f"{path}: zip file without exactly one data.pkl: not a PyTorch file")
        prefix = pkl[0][: -len("data.pkl")]
        order = prefix + "byteorder"
        if order in names and z.read(order).strip() not in (b"little", b""):
            raise ModelError(f"{path}: big-endian PyTorch file is not supported")
        up = _Unpickler(io.BytesIO(z.read(pkl[0])), path)
        obj = up.load()
        for key, st in up.storages.items():
            member = f"{prefix}data/{key}"
            if member not in names:
                raise ModelError(f"{path}: storage {member} is missing (truncated file?)")
            raw = z.read(member)
            if len(raw) < st.numel * st.dtype.itemsize:
                raise ModelError(f"{path}: storage {member} holds {len(raw)} bytes, expected "
                                 f"{st.numel * st.dtype.itemsize} (truncated file?)")
            st.array = np.frombuffer(raw, dtype=st.dtype, count=st.numel)
    return _as_arrays(obj, path)


def _load_legacy(path: Path) -> dict[str, np.ndarray]:
    with open(path, "rb") as f:
        try:
            plain = lambda: _Unpickler(f, path, allow_tensors=False).load()  # noqa: E731
            magic = plain()
            if magic != LEGACY_MAGIC:
                raise ModelError(f"{path}: not a PyTorch file (bad magic number)")
            protocol = plain()
            if protocol != LEGACY_PROTOCOL:
                raise ModelError(f"{path}: unsupported legacy PyTorch protocol {protocol!r:.40}")
            info = plain()
            if not isinstance(info, dict) or not info.get("little_endian", False):
                raise ModelError(f"{path}: big-endian or malformed legacy PyTorch file")
            up = _Unpickler(f, path)
            obj = up.load()
            keys = plain()
        except ModelError:
            raise
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, IndexError, struct.error) as e:
            raise ModelError(f"{path}: not a readable PyTorch file ({type(e).__name__}: {e})") from None
        if not isinstance(keys, list) or set(map(str, keys)) != set(up.storages):
            raise ModelError(f"{path}: storage key list does not match the tensors (corrupt file)")
        for key in map(str, keys):
            st = up.storages[key]
            head = f.read(8)
            if len(head) != 8:
                raise ModelError(f"{path}: file ends before storage {key} (truncated file?)")
            (count,) = struct.unpack("<q", head)
            if count != st.numel:
                raise ModelError(f"{path}: storage {key} holds {count} elements, its tensors say {st.numel}")
            raw = f.read(count * st.dtype.itemsize)
            if len(raw) != count * st.dtype.itemsize:
                raise ModelError(f"{path}: file ends inside storage {key} (truncated file?)")
            st.array = np.frombuffer(raw, dtype=st.dtype)
    return _as_arrays(obj, path)


def load_state_dict(path) -> dict[str, np.ndarray]:
    """All tensors of a PyTorch ``state_dict`` file (zip or legacy format) as numpy arrays, by name.
    Raises ModelError for anything else (including pickles naming other globals)."""
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"PyTorch weights file {path} does not exist")
    try:
        if zipfile.is_zipfile(path):
            return _load_zip(path)
        return _load_legacy(path)
    except ModelError:
        raise
    except (OSError, zipfile.BadZipFile, pickle.UnpicklingError, EOFError, ValueError, KeyError) as e:
        raise ModelError(f"{path}: not a readable PyTorch file ({type(e).__name__}: {e})") from None


__all__ = ["load_state_dict"]
