"""Loading weights never executes code: every pickle of both .pth formats is refused if it names
anything but a state_dict's few globals, and the payload's marker file never appears."""

import collections
import io
import pickle
import zipfile

import pytest

from dsbn_jax.errors import UserError
from dsbn_jax.models import pth_reader

_MAGIC = 0x1950A86A20F9469CFC6C
_SYS_INFO = {
  "protocol_version": 1001,
  "little_endian": True,
  "type_sizes": {"short": 2, "int": 4, "long": 4},
}


class _Payload:
  """What an attacker pickles: unpickling it with plain ``pickle`` creates ``marker``."""

  def __init__(self, marker):
    self.marker = str(marker)

  def __reduce__(self):
    return (exec, (f"open({self.marker!r}, 'w').close()",))


def _legacy(parts):
  """A legacy-format file: the five pickles in a row (no storages: the state_dict is empty)."""
  buf = io.BytesIO()
  for part in parts:
    pickle.dump(part, buf, protocol=2)
  return buf.getvalue()


def _zip(obj):
  buf = io.BytesIO()
  with zipfile.ZipFile(buf, "w") as zf:
    zf.writestr("archive/data.pkl", pickle.dumps(obj, protocol=2))
    zf.writestr("archive/byteorder", b"little")
  return buf.getvalue()


def _crafted(where, marker):
  payload = _Payload(marker)
  parts = {
    "magic": payload,
    "protocol": 1001,
    "sys_info": _SYS_INFO,
    "state_dict": collections.OrderedDict(),
    "storage_keys": [],
  }
  if where == "zip":
    return _zip(collections.OrderedDict(w=payload))
  if where == "state_dict":
    parts[where] = collections.OrderedDict(w=payload)
  else:
    parts[where] = payload
  if where != "magic":
    parts["magic"] = _MAGIC
  return _legacy(parts.values())


WHERE = ["magic", "protocol", "sys_info", "storage_keys", "state_dict", "zip"]


@pytest.mark.parametrize("where", WHERE)
def test_crafted_file_is_refused_and_runs_nothing(where, tmp_path):
  marker = tmp_path / "pwned"
  path = tmp_path / "weights.pth"
  path.write_bytes(_crafted(where, marker))
  with pytest.raises(UserError) as err:
    pth_reader.read_state_dict(path)
  msg = str(err.value)
  assert "\n" not in msg and str(path) in msg and "exec, which a weights file never holds" in msg, (
    msg
  )
  assert not marker.exists()


@pytest.mark.parametrize("where", ["magic", "state_dict"])
def test_the_payload_is_live(where, tmp_path):
  """The crafted files do run code under a plain unpickler, so the test above can fail."""
  marker = tmp_path / "pwned"
  data = _crafted(where, marker)
  f = io.BytesIO(data)
  for _ in range(5):
    pickle.load(f)
    if marker.exists():
      break
  assert marker.exists()


def test_clean_legacy_and_zip_files_without_tensors_still_load(tmp_path):
  legacy = tmp_path / "legacy.pth"
  legacy.write_bytes(_legacy([_MAGIC, 1001, _SYS_INFO, collections.OrderedDict(), []]))
  assert pth_reader.read_state_dict(legacy) == {}
  zipped = tmp_path / "zip.pth"
  zipped.write_bytes(_zip(collections.OrderedDict()))
  assert pth_reader.read_state_dict(zipped) == {}


def test_out_of_bounds_view_and_huge_storage_are_refused(tmp_path):
  """A tensor view past its storage (a memory read) and a storage larger than the file."""
  for numel, size, what in [(4, 8, "reaches element"), (10**12, 1, "more than the file")]:
    path = tmp_path / f"view_{numel}.pth"
    raw = (
      b"".join(pickle.dumps(x, protocol=2) for x in (_MAGIC, 1001, _SYS_INFO))
      + _state_dict_pickle(numel, size)
      + pickle.dumps(["0"], protocol=2)
      + (4).to_bytes(8, "little")
      + b"\0" * 16
    )
    path.write_bytes(raw)
    with pytest.raises(UserError, match=what):
      pth_reader.read_state_dict(path)
  # The same opcodes with a consistent view load: the test above fails on the bounds, nothing else.
  path = tmp_path / "ok.pth"
  path.write_bytes(
    b"".join(pickle.dumps(x, protocol=2) for x in (_MAGIC, 1001, _SYS_INFO))
    + _state_dict_pickle(4, 4)
    + pickle.dumps(["0"], protocol=2)
    + (4).to_bytes(8, "little")
    + b"\0" * 16
  )
  assert pth_reader.read_state_dict(path)["w"].shape == (4,)


def _state_dict_pickle(numel, size):
  """``OrderedDict(w=_rebuild_tensor_v2(storage('0', numel), 0, (size,), (1,)))`` in opcodes."""
  p = pickle
  out = [
    p.PROTO + b"\x02",
    p.GLOBAL + b"collections\nOrderedDict\n",
    p.EMPTY_TUPLE,
    p.REDUCE,
    p.MARK,
    p.BINUNICODE + len(b"w").to_bytes(4, "little") + b"w",
    p.GLOBAL + b"torch._utils\n_rebuild_tensor_v2\n",
    p.MARK,
    # persistent id: ("storage", torch.FloatStorage, "0", "cpu", numel, None)
    p.MARK,
    p.BINUNICODE + (7).to_bytes(4, "little") + b"storage",
    p.GLOBAL + b"torch\nFloatStorage\n",
    p.BINUNICODE + (1).to_bytes(4, "little") + b"0",
    p.BINUNICODE + (3).to_bytes(4, "little") + b"cpu",
    p.LONG1 + bytes([8]) + int(numel).to_bytes(8, "little", signed=True),
    p.NONE,
    p.TUPLE,
    p.BINPERSID,
    p.BININT1 + b"\x00",
    p.BININT1 + bytes([size]),
    p.TUPLE1,
    p.BININT1 + b"\x01",
    p.TUPLE1,
    p.NEWFALSE,
    p.TUPLE,
    p.REDUCE,
    p.SETITEMS,
    p.STOP,
  ]
  return b"".join(out)
