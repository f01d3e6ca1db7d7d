"""Read a PyTorch ``.pth`` state_dict into numpy arrays without importing torch.

A ``.pth`` file is a pickle whose tensors point, through ``persistent_id`` records, at raw storages:
- zip format (torch >= 1.6): ``<root>/data.pkl`` plus one raw little-endian file per storage,
  ``<root>/data/<key>``;
- legacy format (torch < 1.6, e.g. torchvision's 2017 ``resnet50-19c8e357.pth``): five pickles in a row
  (magic number, protocol version, sys info, the object, the list of storage keys), followed by every
  storage as ``int64 numel`` + raw bytes, in the order of that list.

Only the globals a state_dict needs are resolved (a restricted unpickler), so a foreign or malicious
pickle is refused instead of executed.
"""

import collections
import io
import pickle
import struct
import zipfile

import ml_dtypes
import numpy as np

from dsbn_jax.errors import UserError

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_STORAGE_DTYPES = {
    "FloatStorage": np.float32, "DoubleStorage": np.float64, "HalfStorage": np.float16,
    "BFloat16Storage": ml_dtypes.bfloat16, "LongStorage": np.int64, "IntStorage": np.int32,
    "ShortStorage": np.int16, "CharStorage": np.int8, "ByteStorage": np.uint8,
    "BoolStorage": np.bool_,
}


class _StorageType:
  """Stands in for ``torch.FloatStorage`` & co. in the pickle: only its dtype matters."""

  def __init__(self, name):
    self.dtype = np.dtype(_STORAGE_DTYPES[name])


def _rebuild_tensor(storage, offset, size, stride, *unused):
  """``torch._utils._rebuild_tensor(_v2)``: a strided view of a flat storage, copied out."""
  size, stride = tuple(size), tuple(stride)
  if not size:
    return np.array(storage[offset])
  itemsize = storage.dtype.itemsize
  view = np.lib.stride_tricks.as_strided(
      storage[offset:], shape=size, strides=tuple(s * itemsize for s in stride))
  return np.array(view)


def _rebuild_parameter(data, *unused):
  return data


_GLOBALS = {
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch._utils", "_rebuild_tensor"): _rebuild_tensor,
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
}


class _Unpickler(pickle.Unpickler):
  """Resolves storages through ``load_storage(dtype, key, numel)``; refuses unknown globals."""

  def __init__(self, f, load_storage):
    super().__init__(f, encoding="latin1")  # latin1: py2-era pickles hold byte strings
    self._load_storage = load_storage

  def find_class(self, module, name):
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(name)
    if (module, name) in _GLOBALS:
      return _GLOBALS[(module, name)]
    raise pickle.UnpicklingError(f"unsupported object {module}.{name} in a .pth state_dict")

  def persistent_load(self, pid):
    kind, storage_type, key, _location, numel, *view = pid
    if kind != "storage":
      raise pickle.UnpicklingError(f"unsupported persistent id {kind!r}")
    storage = self._load_storage(storage_type.dtype, str(key), numel)
    if view and view[0] is not None:  # legacy storage view: (view_key, offset, size)
      _, offset, size = view[0]
      storage = storage[offset:offset + size]
    return storage


def _read_zip(path):
  with zipfile.ZipFile(path) as zf:
    names = zf.namelist()
    pkl = next((n for n in names if n.endswith("data.pkl")), None)
    if pkl is None:
      raise UserError(f"{path}: zip file without data.pkl, not a torch.save() file")
    root = pkl[: -len("data.pkl")]
    if f"{root}byteorder" in names and zf.read(f"{root}byteorder") != b"little":
      raise UserError(f"{path}: big-endian .pth files are not supported; re-save it on x86/ARM")

    def load_storage(dtype, key, numel):
      return np.frombuffer(zf.read(f"{root}data/{key}"), dtype=dtype, count=numel)

    return _Unpickler(io.BytesIO(zf.read(pkl)), load_storage).load()


def _read_legacy(path):
  with open(path, "rb") as f:
    if pickle.load(f) != _LEGACY_MAGIC:
      raise UserError(f"{path}: not a torch.save() file (bad magic number)")
    pickle.load(f)  # protocol version
    pickle.load(f)  # sys info (endianness, type sizes)
    # The storages' bytes come after the object's pickle: unpickle once with placeholder storages
    # to get past it, read the storages, then unpickle again from the same position for real.
    obj_pos = f.tell()
    dtypes = {}

    def placeholder(dtype, key, numel):
      dtypes[key] = dtype
      return np.zeros(numel, dtype)

    _Unpickler(f, placeholder).load()
    storages = {}
    for key in pickle.load(f, encoding="latin1"):
      key = str(key)
      (numel,) = struct.unpack("<q", f.read(8))
      storages[key] = np.frombuffer(f.read(numel * dtypes[key].itemsize), dtypes[key], numel)
    f.seek(obj_pos)
    return _Unpickler(f, lambda dtype, key, numel: storages[key]).load()


def read_state_dict(path) -> "collections.OrderedDict[str, np.ndarray]":
  """Returns ``{name: numpy array}`` of a ``.pth`` state_dict (zip or legacy format), torch-free."""
  path = str(path)
  try:
    if zipfile.is_zipfile(path):
      sd = _read_zip(path)
    else:
      sd = _read_legacy(path)
  except (pickle.UnpicklingError, EOFError, struct.error, KeyError, ValueError) as e:
    if isinstance(e, UserError):
      raise
    raise UserError(f"{path}: cannot read as a PyTorch state_dict ({e})") from e
  if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
    sd = sd["state_dict"]  # a training checkpoint that wraps the weights
  if not isinstance(sd, dict):
    raise UserError(f"{path}: holds a {type(sd).__name__}, not a state_dict")
  return collections.OrderedDict((k, np.asarray(v)) for k, v in sd.items())
