"""Eval batches: a domain's evaluation split, or the held-out source split, padded and masked.

Batch contract (numpy arrays, R = rows of this process, ``data_source.batch_layout``):
  {'image': f32[R,H,W,3] (center) or f32[R,10,H,W,3] (10crop), or the resized u8[R,S,S,3] that
   the eval step crops (``crops_on_device``), 'label': i32[R], 'mask': bool[R]}
Each batch is filled with real images up to its R rows per process; only the end of the
evaluation set is padded (zero images, label 0, mask False), every image counted exactly once.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterator

import ml_collections
import numpy as np
import tensorflow as tf

from dsbn_jax import image_cache
from dsbn_jax.data_source import (
  Layout,
  batch_layout,
  check_config,
  fetch_row,
  fetch_rows,
  load_encoded,
  process_layout,
  process_slice,
  read_split,
  release_freed_memory,
  resized_split,
  slice_bounds,
  source_val_mask,
  stored_rows,
)
from dsbn_jax.datasets import catalog
from dsbn_jax.errors import UserError
from dsbn_jax.transforms import eval_crops, eval_image_shape, preprocess_eval


@dataclasses.dataclass(frozen=True)
class EvalData:
  """A re-iterable eval set: every process yields `num_batches` batches; masks mark real images."""

  dataset: tf.data.Dataset
  num_examples: int  # real images over all processes (each counted once)
  num_batches: int  # batches per process, the same on every process

  def __iter__(self) -> Iterator[dict]:
    return self.dataset.as_numpy_iterator()

  def __len__(self) -> int:
    return self.num_batches


def _eval_example(data, image_bytes, label) -> dict:
  return {
    'image': preprocess_eval(image_bytes, data),
    'label': tf.cast(label, tf.int32),
    'mask': tf.constant(True),
  }


def _eval_rows(global_batch_size: int, layout: Layout) -> int:
  """Rows per process of an eval batch: the global batch rounded up to the device count, every
  row available to real images (only the end of the set is padding)."""
  return batch_layout(global_batch_size, layout.index, layout.count, layout.devices)[2]


def _batch_count(num_examples: int, rows: int, count: int) -> int:
  """Eval batches every process yields: its share of the examples (the larger one), in batches of
  ``rows``."""
  return math.ceil(math.ceil(num_examples / count) / rows)


def _padded_eval_data(
  data, real: tf.data.Dataset | None, size: int, num_examples: int, rows, count, resized=False
):
  """EvalData of this process's ``size`` real examples (None: none) padded with zero images (mask
  False) to the batch count every process shares (``resized``: uint8 resized images)."""
  num_batches = _batch_count(num_examples, rows, count)
  if resized:
    zeros = tf.zeros((data.resize_size, data.resize_size, 3), tf.uint8)
  else:
    zeros = tf.zeros(eval_image_shape(data), tf.float32)
  ds = tf.data.Dataset.from_tensors(
    {'image': zeros, 'label': tf.constant(0, tf.int32), 'mask': tf.constant(False)}
  ).repeat(num_batches * rows - size)  # padding, mask False
  if real is not None:
    ds = real.concatenate(ds)
  ds = ds.batch(rows, drop_remainder=True).prefetch(data.prefetch_batches)
  return EvalData(dataset=ds, num_examples=num_examples, num_batches=num_batches)


def _resized_eval_data(
  data, cache: image_cache.Resized, mine: np.ndarray, num_examples: int, rows: int, count: int
) -> EvalData:
  """EvalData of cache rows ``mine`` as the cached uint8 resized images, for the eval step to crop:
  each batch's rows gathered from the memory map in one copy (``fetch_rows``), padded (mask
  False; their pixels, row 0's, are zeroed by the eval step) to the batch count every process
  shares."""
  num_batches = _batch_count(num_examples, rows, count)
  row = np.zeros(num_batches * rows, np.int64)
  row[: len(mine)] = mine
  mask = np.arange(len(row)) < len(mine)
  label = np.where(mask, cache.labels[row], 0).astype(np.int32)
  fetch = fetch_rows(cache)

  def load(batch):  # padding rows hold row 0's pixels: the eval step zeroes them (mask False)
    return {'image': fetch(batch['row']), 'label': batch['label'], 'mask': batch['mask']}

  ds = tf.data.Dataset.from_tensor_slices({'row': row, 'label': label, 'mask': mask})
  ds = ds.batch(rows).map(load, num_parallel_calls=data.num_parallel_calls, deterministic=True)
  return EvalData(ds.prefetch(data.prefetch_batches), num_examples, num_batches)


def make_eval_data(
  data: ml_collections.ConfigDict,
  *,
  domain: str | None = None,
  global_batch_size: int | None = None,
  process_index: int | None = None,
  process_count: int | None = None,
  device_count: int | None = None,
  crops_on_device: bool = False,
) -> EvalData:
  """Eval batches of `domain` (default: the target) for this process.

  Process p reads the contiguous slice p of the eval split; every process pads its last batches with
  zero images (mask False) up to the same batch count, so all images count exactly once overall.
  global_batch_size defaults to data.eval_batch_size (images per step over all processes), rounded
  up to a multiple of the device count (``batch_layout``; layout arguments as
  ``make_train_dataset``'s). ``crops_on_device`` (with data.cache_resized): the batches hold the
  cached uint8 resized images, which the eval step crops and normalises
  (``device_augment.eval_images``): a tenth of 10-crop's pixels cross to the devices, as uint8.
  """
  catalog.hide_accelerators_from_tf()
  check_config(data)
  layout = process_layout(process_index, process_count, device_count)
  index, count = layout.index, layout.count
  info = catalog.resolve_domain(data, domain or data.target)
  resized = crops_on_device and data.cache_resized
  rows = _eval_rows(global_batch_size or data.eval_batch_size, layout)
  split, size = process_slice(info.eval_split, info.num_eval, index, count)
  real = None
  if size and data.cache_resized:  # crops of the shared resized cache: no decode, no resize
    cache = resized_split(info.builder, info.eval_split, data)
    start, _ = slice_bounds(info.num_eval, index, count)
    mine = stored_rows(cache, start, size)
    if resized:
      return _resized_eval_data(data, cache, mine, info.num_eval, rows, count)
    real = _cached_eval_examples(data, cache, mine)
  elif size:  # a process can be left without images when there are fewer images than processes
    real = read_split(info.builder, split).map(
      lambda ex: _eval_example(data, ex['image'], ex['label']),
      num_parallel_calls=data.num_parallel_calls,
      deterministic=True,
    )
  return _padded_eval_data(data, real, size, info.num_eval, rows, count, resized)


def _cached_eval_examples(data, cache: image_cache.Resized, rows: np.ndarray) -> tf.data.Dataset:
  """Eval examples of cache ``rows`` (in that order): the eval transform's crops of the cached
  resize, the pixels ``preprocess_eval`` gives from the encoded image."""
  fetch = fetch_row(cache)
  return tf.data.Dataset.from_tensor_slices((rows, cache.labels[rows])).map(
    lambda r, y: {'image': eval_crops(fetch(r), data), 'label': y, 'mask': tf.constant(True)},
    num_parallel_calls=data.num_parallel_calls,
    deterministic=True,
  )


def make_source_val_data(
  data: ml_collections.ConfigDict,
  *,
  global_batch_size: int | None = None,
  process_index: int | None = None,
  process_count: int | None = None,
  device_count: int | None = None,
  crops_on_device: bool = False,
) -> EvalData:
  """Eval batches (the eval transform) of the held-out source validation split for this process.

  The split is the part of the source's training images that ``source_val_mask`` holds out of the
  train stream (data.source_val_fraction > 0), in file-name order; its encoded bytes stay in memory
  (a small part of the domain), process p evaluating the contiguous slice p of it. Batches (and
  ``crops_on_device``) as ``make_eval_data``'s.
  """
  catalog.hide_accelerators_from_tf()
  check_config(data)
  layout = process_layout(process_index, process_count, device_count)
  index, count = layout.index, layout.count
  info = catalog.resolve_domain(data, data.source)
  rows = _eval_rows(global_batch_size or data.eval_batch_size, layout)
  if data.cache_resized:
    cache = resized_split(info.builder, info.train_split, data)
    held_out = np.flatnonzero(source_val_mask(cache.names, data.source_val_fraction))
  else:
    images, labels, held_out = load_encoded(
      info.builder, info.train_split, info.num_train, data.source_val_fraction, val=True
    )
  num_examples = int(held_out.shape[0])
  if not num_examples:
    raise UserError(
      f'data.source_val_fraction={data.source_val_fraction} holds out none of the '
      f'{info.num_train} training images of source domain {info.name}; raise it'
    )
  start, size = slice_bounds(num_examples, index, count)
  mine = held_out[start : start + size]
  if data.cache_resized and crops_on_device:
    return _resized_eval_data(data, cache, mine, num_examples, rows, count)
  if data.cache_resized:
    real = _cached_eval_examples(data, cache, mine) if size else None
    return _padded_eval_data(data, real, size, num_examples, rows, count)
  images, labels = tf.gather(images, mine), tf.gather(labels, mine)  # only the held-out bytes kept
  release_freed_memory()
  real = None
  if size:
    real = tf.data.Dataset.from_tensor_slices((images, labels)).map(
      lambda b, y: _eval_example(data, b, y),
      num_parallel_calls=data.num_parallel_calls,
      deterministic=True,
    )
  return _padded_eval_data(data, real, size, num_examples, rows, count)
