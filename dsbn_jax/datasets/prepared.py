"""Prepared datasets shared by concurrent processes: one prepares, the others wait and reuse it, and
a prepared version is never deleted while a process reads it.

Every prepared version (``<data_dir>/<builder>/<config>/<version>``) has a lock file in
``<data_dir>/.dsbn_jax/locks/``, taken with ``fcntl.flock``:

- ``ensure_prepared`` holds it shared to read, and takes it exclusively to prepare: a second
  process asking for a version being prepared waits, then finds it prepared and reuses it (TFDS
  alone does not: both would write a temporary folder, and the second rename fails with
  ``FileExistsError``). Inside ``reading()`` -- a whole training run, whose evaluations read the
  records again -- the shared lock is kept until the context ends.
- ``delete_unread`` (an outdated copy of a custom tree) takes it exclusively *without waiting*:
  a version some process reads is left alone (a later start deletes it).

The kernel drops a process's locks when it exits, however it exits (a crash, ``kill -9``). A
data_dir where no lock file can be created (a read-only, shared dataset folder) is used without
locks: nothing can prepare or delete anything there either.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import sys
import time
from collections.abc import Callable, Iterator

from absl import logging

STATE_DIR = '.dsbn_jax'  # in a data_dir: locks/, trees/ (tree.py's digest caches), trash/

_held: list | None = None  # the shared locks kept by the open reading() context


def state_dir(data_root: str, *parts: str) -> str:
  return os.path.join(data_root, STATE_DIR, *parts)


def lock_path(data_root, version_dir) -> str:
  """The lock file of the prepared version ``version_dir`` (``<data_root>/<builder>/<config>/
  <version>``)."""
  data_root = os.fspath(data_root)
  rel = os.path.relpath(os.fspath(version_dir), data_root)
  return state_dir(data_root, 'locks', rel.replace(os.sep, '__') + '.lock')


def _open(path: str):
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    return open(path, 'a+b')  # pylint: disable=consider-using-with
  except OSError as e:
    logging.info('no lock file %s (%s): the dataset is used without locks', path, e)
    return None


def _flock(f, mode: int, what: str) -> None:
  """``flock(f, mode)``, saying once on stderr when it has to wait for another process."""
  try:
    fcntl.flock(f, mode | fcntl.LOCK_NB)
  except BlockingIOError:
    print(f'waiting for another process {what} ...', file=sys.stderr, flush=True)
    fcntl.flock(f, mode)


@contextlib.contextmanager
def reading() -> Iterator[None]:
  """Within: the versions ``ensure_prepared`` returns stay locked shared (never deleted) until the
  context ends. Re-entrant: an inner context leaves them to the outer one."""
  global _held
  if _held is not None:
    yield
    return
  _held = []
  try:
    yield
  finally:
    held, _held = _held, None
    for f in held:
      f.close()  # closing drops the lock


def ensure_prepared(make: Callable[[], object], prepare: Callable[[object], None]):
  """``make()``'s builder, prepared: by ``prepare(builder)`` under the exclusive lock when no
  process has prepared it yet, else as it is (after waiting for a process preparing it)."""
  builder = make()
  for _ in range(100):  # each round ends prepared, unless a deletion came in between
    path = lock_path(builder.data_dir_root, builder.data_dir)
    where = f'preparing {builder.name} in {builder.data_dir}'
    f = _open(path)
    if f is None:
      if not builder.is_prepared():
        prepare(builder)
      return builder
    was_prepared = builder.is_prepared()
    _flock(f, fcntl.LOCK_SH, where)
    if not was_prepared:  # TFDS reads a builder's splits when it is made: made again if prepared
      builder = make()  # by another process meanwhile
    if builder.is_prepared():
      if _held is not None:
        _held.append(f)
      else:
        f.close()
      return builder
    f.close()
    with open(path, 'a+b') as f:
      _flock(f, fcntl.LOCK_EX, where)
      builder = make()  # another process may have prepared it meanwhile: read it afresh
      if not builder.is_prepared():
        prepare(builder)
    builder = make()
  raise RuntimeError(f'{builder.data_dir} was deleted each time it was prepared')


def delete_unread(builder_dir: str, lock: str, data_root: str) -> bool:
  """Deletes ``builder_dir`` (a config folder ``<data_dir>/<builder>/<config>``, holding the
  version whose lock file is ``lock``) unless a process reads it; True when deleted. The folder is
  first renamed into ``<data_dir>/.dsbn_jax/trash/`` (atomic: a process never finds half of it)."""
  f = _open(lock)
  if f is None:
    return False
  try:
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      return False
    trash = state_dir(data_root, 'trash', f'{os.path.basename(builder_dir)}-{os.getpid()}')
    trash += f'-{time.time_ns()}'
    try:
      os.makedirs(os.path.dirname(trash), exist_ok=True)
      os.replace(builder_dir, trash)
    except OSError as e:
      logging.warning('could not delete the outdated prepared dataset %s: %s', builder_dir, e)
      return False
  finally:
    f.close()
  shutil.rmtree(trash, ignore_errors=True)
  return True
