"""The resized-image cache of a prepared dataset: decoded and square-resized once, then shared.

Decoding and square-resizing every image of a domain (TF's antialiased bicubic, the costliest part
of the input pipeline) gives the same uint8 pixels every time, so it is done once per prepared
dataset version, split and resize settings, and stored beside the prepared records:

  ``<version folder>/dsbn_jax_resized/<split>-<size>-<method>.npy``  uint8 [N, S, S, 3]
  ``<version folder>/dsbn_jax_resized/<split>-<size>-<method>.npz``  file names, labels

in file-name order (the order the train stream permutes and the source split is held out in). Every
later run, every process of a host and every run of a sweep memory-maps the same file (the page
cache holds it once); it goes with the prepared version it belongs to (a custom tree's outdated copy
is deleted whole, `datasets/custom.py`), and is rebuilt only when that version is. One process
builds it (under an exclusive ``fcntl`` lock, into a temporary file renamed when complete); others
wait and reuse it. A data_dir that cannot be written (a shared, read-only dataset folder) gets no
file: the cache is then computed in this process's memory, as before.
"""

from __future__ import annotations

import dataclasses
import fcntl
import os
import sys
from collections.abc import Callable

import numpy as np
from absl import logging

FOLDER = 'dsbn_jax_resized'
FORMAT = 1  # bumped when what a cache file holds changes: older files are ignored


@dataclasses.dataclass(frozen=True)
class Resized:
  """One split's images, decoded and resized, in file-name order."""

  images: np.ndarray  # uint8 [N, S, S, 3]; a read-only memory map when stored on disk
  labels: np.ndarray  # int32 [N]
  names: np.ndarray  # object [N] of bytes: file names, sorted
  stored: np.ndarray  # int64 [N]: each row's index in the split's stored (TFDS) order
  path: str | None  # the .npy file, None when computed in memory only


def cache_path(version_dir: str, split: str, size: int, method: str) -> str:
  return os.path.join(version_dir, FOLDER, f'{split}-{size}-{method}-v{FORMAT}.npy')


def _open(path: str) -> Resized | None:
  meta = path[: -len('.npy')] + '.npz'
  try:
    images = np.load(path, mmap_mode='r')
    with np.load(meta, allow_pickle=False) as m:
      labels, names, stored = m['labels'], m['names'], m['stored']
  except (OSError, ValueError, KeyError):
    return None
  if images.ndim != 4 or not len(images) == len(labels) == len(names) == len(stored):
    return None
  return Resized(images, labels, names.astype(object), stored, path)


def load_or_build(
  version_dir: str,
  split: str,
  size: int,
  method: str,
  *,
  names_and_labels: Callable[[], tuple[np.ndarray, np.ndarray, np.ndarray]],
  fill: Callable[[np.ndarray, np.ndarray], None],
) -> Resized:
  """The split's cache, built first when no process has built it.

  ``names_and_labels()``: the split's file names (bytes), labels and stored indices, in file-name
  order.
  ``fill(out, stored)``: writes image i (in that order), decoded and resized, into ``out[i]``
  (uint8 [N, size, size, 3]); ``stored``: the stored indices ``names_and_labels`` gave (the split
  is listed once).
  """
  path = cache_path(version_dir, split, size, method)
  found = _open(path)
  if found is not None:
    return found
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    lock = open(path + '.lock', 'a+b')  # pylint: disable=consider-using-with
  except OSError as e:  # a read-only data_dir: this process's memory only
    logging.info('no resized-image cache file in %s (%s): computed in memory', version_dir, e)
    names, labels, stored = names_and_labels()
    images = np.empty((len(names), size, size, 3), np.uint8)
    fill(images, stored)
    return Resized(images, labels, names, stored, None)
  with lock:
    try:
      fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      print(f'waiting for another process resizing {split} into {path} ...', file=sys.stderr)
      fcntl.flock(lock, fcntl.LOCK_EX)
    found = _open(path)  # built meanwhile by the process we waited for
    if found is not None:
      return found
    names, labels, stored = names_and_labels()
    print(
      f'resizing the {len(names)} images of {split} to {size}x{size} once, into {path}',
      file=sys.stderr,
      flush=True,
    )
    tmp = f'{path}.{os.getpid()}.tmp'
    try:
      out = np.lib.format.open_memmap(
        tmp, mode='w+', dtype=np.uint8, shape=(len(names), size, size, 3)
      )
      with open(tmp, 'r+b') as f:  # the blocks now: a full disk is an OSError here, not a SIGBUS
        os.posix_fallocate(f.fileno(), 0, os.fstat(f.fileno()).st_size)  # while filling the map
      fill(out, stored)
      out.flush()
      del out
      with open(tmp + '.npz', 'wb') as f:
        np.savez(
          f,
          labels=np.asarray(labels, np.int32),
          names=np.asarray(names, dtype=bytes),
          stored=np.asarray(stored, np.int64),
        )
      os.replace(tmp + '.npz', path[: -len('.npy')] + '.npz')
      os.replace(tmp, path)  # last: a complete .npy means a complete cache
    except BaseException:
      for p in (tmp, tmp + '.npz'):
        try:
          os.remove(p)
        except OSError:
          pass
      raise
  found = _open(path)
  if found is None:
    raise RuntimeError(f'the resized-image cache {path} was written but cannot be read')
  return found
