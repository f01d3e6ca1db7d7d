"""Read a PyTorch ``.pth`` state_dict into numpy arrays without importing torch.

A ``.pth`` file is a pickle whose tensors point, through ``persistent_id`` records, at raw storages:
- zip format (torch >= 1.6): ``<root>/data.pkl`` plus one raw little-endian file per storage,
  ``<root>/data/<key>``;
- legacy format (torch < 1.6, e.g. torchvision's 2017 ``resnet50-19c8e357.pth``): five pickles in a row
  (magic number, protocol version, sys info, the object, the list of storage keys), followed by every
  storage as ``int64 numel`` + raw bytes, in the order of that list.

Every pickle in either format -- the legacy header pickles (magic number, protocol version, sys info),
the object and the storage-key list alike -- goes through one restricted unpickler (``_Unpickler``)
that resolves only the globals a state_dict needs, so a foreign or malicious pickle is refused
before any of its code can run. Tensor views are bounds-checked against their storage.
"""

import collections
import io
import os
import pickle
import struct
import zipfile

import ml_dtypes
import numpy as np

from dsbn_jax.errors import UserError

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_STORAGE_DTYPES = {
  "FloatStorage": np.float32,
  "DoubleStorage": np.float64,
  "HalfStorage": np.float16,
  "BFloat16Storage": ml_dtypes.bfloat16,
  "LongStorage": np.int64,
  "IntStorage": np.int32,
  "ShortStorage": np.int16,
  "CharStorage": np.int8,
  "ByteStorage": np.uint8,
  "BoolStorage": np.bool_,
}


class _StorageType:
  """Stands in for ``torch.FloatStorage`` & co. in the pickle: only its dtype matters."""

  def __init__(self, name):
    self.dtype = np.dtype(_STORAGE_DTYPES[name])


def _rebuild_tensor(storage, offset, size, stride, *unused):
  """``torch._utils._rebuild_tensor(_v2)``: a strided view of a flat storage, copied out."""
  if not isinstance(storage, np.ndarray):
    raise pickle.UnpicklingError("a tensor without a storage")
  offset = int(offset)
  size, stride = tuple(int(n) for n in size), tuple(int(s) for s in stride)
  if (
    len(size) != len(stride) or offset < 0 or any(n < 0 for n in size) or any(s < 0 for s in stride)
  ):
    raise pickle.UnpicklingError("a tensor with a malformed size/stride")
  if 0 in size:
    return np.zeros(size, storage.dtype)
  last = offset + sum((n - 1) * s for n, s in zip(size, stride))
  if last >= storage.size:  # a crafted view must not read past its storage
    raise pickle.UnpicklingError(
      f"a tensor view reaches element {last} of a storage of {storage.size}"
    )
  if not size:
    return np.array(storage[offset])
  itemsize = storage.dtype.itemsize
  view = np.lib.stride_tricks.as_strided(
    storage[offset:], shape=size, strides=tuple(s * itemsize for s in stride)
  )
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
  """The only unpickler of this module: refuses every global but a state_dict's few.

  Storages resolve through ``load_storage(dtype, key, numel)``; ``None`` (the legacy header pickles
  and the storage-key list, which hold plain ints, dicts and strings) refuses any storage.
  """

  def __init__(self, f, load_storage=None):
    super().__init__(f, encoding="latin1")  # latin1: py2-era pickles hold byte strings
    self._load_storage = load_storage

  def find_class(self, module, name):
    if module == "torch" and name in _STORAGE_DTYPES:
      return _StorageType(name)
    if (module, name) in _GLOBALS:
      return _GLOBALS[(module, name)]
    raise pickle.UnpicklingError(
      f"it names {module}.{name}, which a weights file never holds; refused, nothing was run"
    )

  def persistent_load(self, pid):
    kind, storage_type, key, _location, numel, *view = pid
    if (
      kind != "storage" or self._load_storage is None or not isinstance(storage_type, _StorageType)
    ):
      raise pickle.UnpicklingError(f"unsupported persistent id {kind!r}")
    storage = self._load_storage(storage_type.dtype, str(key), numel)
    if view and view[0] is not None:  # legacy storage view: (view_key, offset, size)
      _, offset, size = view[0]
      storage = storage[offset : offset + size]
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
    if _Unpickler(f).load() != _LEGACY_MAGIC:
      raise UserError(f"{path}: not a torch.save() file (bad magic number)")
    _Unpickler(f).load()  # protocol version
    sys_info = _Unpickler(f).load()  # endianness, type sizes
    if isinstance(sys_info, dict) and sys_info.get("little_endian") is False:
      raise UserError(f"{path}: big-endian .pth files are not supported; re-save it on x86/ARM")
    # The storages' bytes come after the object's pickle: unpickle once with placeholder storages
    # to get past it, read the storages, then unpickle again from the same position for real.
    obj_pos = f.tell()
    dtypes = {}
    file_size = os.fstat(f.fileno()).st_size

    def placeholder(dtype, key, numel):
      if not 0 <= int(numel) * dtype.itemsize <= file_size:  # a crafted size must not allocate
        raise pickle.UnpicklingError(f"storage {key} claims {numel} elements, more than the file")
      dtypes[key] = dtype
      return np.zeros(numel, dtype)

    _Unpickler(f, placeholder).load()
    storages = {}
    keys = _Unpickler(f).load()
    if not isinstance(keys, (list, tuple)):
      raise pickle.UnpicklingError("the storage-key list is not a list")
    for key in keys:
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
  except UserError:
    raise
  except OSError as e:
    raise UserError(
      f"{path}: cannot read ({e.strerror or e}); check the path and permissions"
    ) from e
  except Exception as e:  # pylint: disable=broad-except -- any malformed pickle is the user's file
    raise UserError(f"{path}: cannot read as a PyTorch state_dict ({e})") from e
  if isinstance(sd, dict) and "state_dict" in sd and isinstance(sd["state_dict"], dict):
    sd = sd["state_dict"]  # a training checkpoint that wraps the weights
  if not isinstance(sd, dict):
    raise UserError(f"{path}: holds a {type(sd).__name__}, not a state_dict")
  return collections.OrderedDict((k, np.asarray(v)) for k, v in sd.items())
