"""What the train streams (``input_pipeline``) and the eval batches (``eval_data``) read, and which
rows each process takes.

- The process layout: this process, the process count and the devices a global batch is split
  over (``process_layout``), and where a process's rows sit in a padded global batch
  (``batch_layout``: real rows first, then padding, so any batch runs on any device count).
- A split's examples: encoded, in file-name order (``load_encoded``), or decoded and resized once
  into the prepared dataset's shared uint8 cache (``resized_split``, ``image_cache``), read row by
  row or a step's rows at once from its memory map (``fetch_row``, ``fetch_rows``).
- The held-out source rows (``source_val_mask``): a hash of the file name, the same on every run.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import os

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from dsbn_jax import image_cache
from dsbn_jax.errors import UserError
from dsbn_jax.transforms import EVAL_MODES, decode_and_resize

TRAIN_SHARDINGS = ('global', 'process')  # data.train_sharding


# ----------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------


def check_config(data: ml_collections.ConfigDict) -> None:
  if data.eval_mode not in EVAL_MODES:
    raise UserError(f'data.eval_mode={data.eval_mode!r}; valid: {", ".join(EVAL_MODES)}')
  if data.eval_mode == '10crop' and not 0 < data.crop_size <= data.resize_size - 1:
    raise UserError(
      f'data.eval_mode=10crop needs 0 < data.crop_size < data.resize_size, got '
      f'{data.crop_size} and {data.resize_size}'
    )
  if data.train_sharding not in TRAIN_SHARDINGS:
    raise UserError(
      f'data.train_sharding={data.train_sharding!r}; valid: {", ".join(TRAIN_SHARDINGS)}'
    )


@dataclasses.dataclass(frozen=True)
class Layout:
  """This process and the devices the global batches are split over."""

  index: int  # this process
  count: int  # processes
  devices: int  # devices of the mesh, all processes (a multiple of count)


def process_layout(
  process_index: int | None, process_count: int | None, device_count: int | None = None
) -> Layout:
  """Defaults: the process layout from jax, with the devices of the mesh a run builds
  (``sharding.make_mesh``); a process layout given without ``device_count``: one device each."""
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top  (only here: keep jax off the hot path)

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
    if device_count is None:
      from dsbn_jax import sharding  # pylint: disable=g-import-not-at-top

      device_count = sharding.make_mesh().devices.size
  device_count = process_count if device_count is None else device_count
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} not in [0, {process_count})')
  if device_count <= 0 or device_count % process_count:
    raise ValueError(f'{device_count} devices cannot be shared by {process_count} processes')
  return Layout(process_index, process_count, device_count)


def batch_layout(
  global_batch_size: int, process_index: int, process_count: int, device_count: int
) -> tuple[int, int, int]:
  """``(first, real, rows)`` of process ``process_index``'s part of a global batch.

  A global batch of B rows over ``device_count`` devices is padded to ceil(B / devices) * devices
  rows (``sharding.padded_batch_size``), real rows first. Each process holds ``rows`` of them,
  process p rows [p * rows, (p + 1) * rows) (process-major, as a P('data') sharding): its first
  ``real`` rows are the global batch's rows ``first`` .. ``first + real - 1``, the rest padding.
  """
  if global_batch_size <= 0:
    raise UserError(f'batch size {global_batch_size} must be positive')
  padded = -(-global_batch_size // device_count) * device_count
  rows = padded // process_count
  first = process_index * rows
  return first, min(max(global_batch_size - first, 0), rows), rows


def slice_bounds(num_examples: int, index: int, count: int) -> tuple[int, int]:
  """(start, size) of contiguous slice `index` of `count` (larger slices first)."""
  base, extra = divmod(num_examples, count)
  return index * base + min(index, extra), base + (index < extra)


def process_slice(
  split: str, num_examples: int, index: int, count: int
) -> tuple[tfds.core.ReadInstruction, int]:
  """Contiguous slice `index` of `count` (sizes differ by at most one, larger ones first)."""
  start, size = slice_bounds(num_examples, index, count)
  return tfds.core.ReadInstruction(split, from_=start, to=start + size, unit='abs'), size


def read_split(builder: tfds.core.DatasetBuilder, split) -> tf.data.Dataset:
  """Examples in stored order with the image left encoded (decoded later, in parallel)."""
  return builder.as_dataset(
    split=split, shuffle_files=False, decoders={'image': tfds.decode.SkipDecoding()}
  )


def source_val_mask(names: np.ndarray, fraction: float) -> np.ndarray:
  """bool[N]: which of these file names belong to the held-out source validation split.

  An image is held out when a hash of its file name falls below ``fraction`` (about that fraction
  of every class): the same images whatever the process count, the train sharding or the storage
  order, and the same on every run (data.source_val_fraction; 0 holds out nothing).
  """
  if fraction <= 0:
    return np.zeros(len(names), bool)
  cut = int(fraction * 2**64)
  return np.array(
    [
      int.from_bytes(hashlib.blake2b(bytes(n), digest_size=8).digest(), 'little') < cut
      for n in names
    ],
    bool,
  )


def load_encoded(
  builder: tfds.core.DatasetBuilder, split, size: int, val_fraction: float = 0.0, val: bool = False
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
  """All (bytes, label) of a split in memory in stored order, and the rows to read in file-name order.

  The stream reads row ``order[i]`` for example i (file-name order, independent of TFDS sharding),
  so the bytes are held once: sorting them with a gather would hold them twice (measured at full
  Office-Home scale: 2.4 GB more resident for Product + Real_World). With ``val_fraction``,
  ``order`` leaves out the held-out source validation rows (``source_val_mask``), or with ``val``
  lists only them.
  """
  ds = read_split(builder, split).map(lambda ex: (ex['file_name'], ex['image'], ex['label']))
  names, images, labels = ds.batch(size).get_single_element()
  names = names.numpy()
  order = np.argsort(names, kind='stable')
  held_out = source_val_mask(names[order], val_fraction)
  order = order[held_out] if val else order[~held_out]
  return images, tf.cast(labels, tf.int32), tf.constant(order, tf.int32)


_CACHE_CHUNK = 64  # images decoded and resized per tf.data batch while filling the cache


def resized_split(
  builder: tfds.core.DatasetBuilder, split: str, data: ml_collections.ConfigDict
) -> image_cache.Resized:
  """Every image of ``split`` decoded and square-resized once, in file-name order: the prepared
  dataset's shared cache file (``image_cache``), built by the first run that needs it and
  memory-mapped by every later run and process."""

  def names_and_labels():
    ds = read_split(builder, split).map(lambda ex: (ex['file_name'], ex['label']))
    names, labels = (x.numpy() for x in ds.batch(1 << 31).get_single_element())
    order = np.argsort(names, kind='stable')
    return names[order], labels[order].astype(np.int32), order.astype(np.int64)

  def fill(out: np.ndarray, stored: np.ndarray) -> None:  # streamed in stored order
    row = cache_rows(stored)  # where each stored example goes: its file-name row
    ds = (
      read_split(builder, split)
      .map(
        lambda ex: tf.cast(decode_and_resize(ex['image'], data), tf.uint8),
        num_parallel_calls=data.num_parallel_calls,
        deterministic=True,
      )
      .batch(_CACHE_CHUNK)
    )
    start = 0
    for chunk in ds.as_numpy_iterator():
      out[row[start : start + len(chunk)]] = chunk
      start += len(chunk)

  return image_cache.load_or_build(
    os.fspath(builder.data_dir),
    split,
    data.resize_size,
    data.resize_method,
    names_and_labels=names_and_labels,
    fill=fill,
  )


def fetch_row(cache: image_cache.Resized):
  """``fetch(row)``: row ``row`` of the cache as a uint8 [S, S, 3] tensor, read from its memory map
  (the pages every process of the host shares) inside the tf.data graph."""
  images, size = cache.images, cache.images.shape[1]

  def fetch(row):
    image = tf.numpy_function(lambda r: np.asarray(images[r]), [row], tf.uint8, stateful=False)
    return tf.ensure_shape(image, [size, size, 3])

  return fetch


def fetch_rows(cache: image_cache.Resized):
  """``fetch(rows)``: rows ``rows`` (int64 [n]) of the cache, uint8 [n, S, S, 3], gathered from its
  memory map in one copy."""
  images, size = cache.images, cache.images.shape[1]

  def fetch(rows):
    image = tf.numpy_function(lambda r: images[r], [rows], tf.uint8, stateful=False)
    return tf.ensure_shape(image, [None, size, size, 3])

  return fetch


def cache_rows(stored: np.ndarray) -> np.ndarray:
  """The inverse of a cache's ``stored`` order: the cache row of each stored example."""
  row = np.empty(len(stored), np.int64)
  row[stored] = np.arange(len(stored))
  return row


def stored_rows(cache: image_cache.Resized, start: int, size: int) -> np.ndarray:
  """The cache rows of stored examples ``start .. start + size - 1``, in stored order."""
  return cache_rows(cache.stored)[start : start + size]


def release_freed_memory() -> None:
  """Hands the C heap's freed pages back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

  Loading a domain allocates every encoded image separately; once the resized cache replaces them
  their pages stay resident unless trimmed (measured at full Office-Home scale: GBs per process).
  """
  try:
    ctypes.CDLL('libc.so.6').malloc_trim(0)
  except (OSError, AttributeError):
    pass
