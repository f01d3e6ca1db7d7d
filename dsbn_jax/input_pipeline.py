"""tf.data input pipelines: infinite source/target train streams and padded, masked eval batches.

Batch contract (numpy arrays, R = rows of this process, ``batch_layout``):
  train: {'source': {'image': f32[R,H,W,3], 'label': i32[R], 'mask': bool[R]}, 'target': {...}}
  eval:  {'image': f32[R,H,W,3] (center) or f32[R,10,H,W,3] (10crop), 'label': i32[R],
          'mask': bool[R]}
'mask' is False on padding rows (zero images, label 0), which count nowhere. Any global batch runs
on any device count: a global batch of B rows over n devices takes ceil(B / n) * n rows, R per
process. Train: the B real rows come first (process p holds rows [p*R, (p+1)*R) of the padded
global batch, so real row i is the stream's row i whatever the device or process count), the
padding last. Eval: each batch is filled with real images up to its R rows per process; only the
end of the evaluation set is padded.

The per-image transforms (ALDA's `pre_process.py`) are in ``transforms`` (re-exported here).
Where the train augmentation runs is ``train_input`` (``make_train_dataset``): here on the host
('host'), or on the devices from the uint8 rows or their cache row numbers ('device', 'resident':
``device_augment``), with the same draws.

Determinism and resume: the train stream is a pure function of (seed, step). Step s of a domain
draws the epoch's permutation `argsort(stateless_uniform(fold(seed, epoch)))` (epoch = s //
steps_per_epoch, remainder dropped as the reference's drop_last) and takes rows s*G .. s*G+G-1 of
it, with the step's augmentation draws (``train_draws``: crop boxes and flips of its G rows, drawn
at once from fold(seed, step)). `start_step=k` therefore yields
exactly what an uninterrupted stream yields from step k, and (with data.train_sharding='global')
the global batch is the same for any process and device count: process p returns rows
[p*R, (p+1)*R) of it (real rows, then padding), i.e. the rows its devices hold under a P('data')
sharding with process-major device order.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import math
import os
from collections.abc import Iterator

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from dsbn_jax import image_cache
from dsbn_jax.datasets import catalog  # also registers the TFDS builders
from dsbn_jax.errors import UserError
from dsbn_jax.transforms import (  # noqa: F401  (re-exported: the pipeline's public transforms)
  EVAL_MODES,
  RESIZE_METHODS,
  TEN_CROP_ORIGINS,
  augment_train,
  center_crop,
  crop_offsets,
  decode_and_resize,
  decode_image,
  eval_crops,
  eval_image_shape,
  normalize,
  preprocess_eval,
  preprocess_train,
  crop_and_resize,
  random_resized_crop_boxes,
  resize_square,
  ten_crop,
  train_draws,
)

TRAIN_SHARDINGS = ('global', 'process')  # data.train_sharding
_MAX_STEP = 2**62  # "infinite" train stream


# ----------------------------------------------------------------------------------------------
# Datasets
# ----------------------------------------------------------------------------------------------


def _check_config(data: ml_collections.ConfigDict) -> None:
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
class _Layout:
  """This process and the devices the global batches are split over."""

  index: int  # this process
  count: int  # processes
  devices: int  # devices of the mesh, all processes (a multiple of count)


def _process_layout(
  process_index: int | None, process_count: int | None, device_count: int | None = None
) -> _Layout:
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
  return _Layout(process_index, process_count, device_count)


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


def _slice_bounds(num_examples: int, index: int, count: int) -> tuple[int, int]:
  """(start, size) of contiguous slice `index` of `count` (larger slices first)."""
  base, extra = divmod(num_examples, count)
  return index * base + min(index, extra), base + (index < extra)


def _process_slice(
  split: str, num_examples: int, index: int, count: int
) -> tuple[tfds.core.ReadInstruction, int]:
  """Contiguous slice `index` of `count` (sizes differ by at most one, larger ones first)."""
  start, size = _slice_bounds(num_examples, index, count)
  return tfds.core.ReadInstruction(split, from_=start, to=start + size, unit='abs'), size


def _read(builder: tfds.core.DatasetBuilder, split) -> tf.data.Dataset:
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


def _load_encoded(
  builder: tfds.core.DatasetBuilder, split, size: int, val_fraction: float = 0.0, val: bool = False
) -> tuple[tf.Tensor, tf.Tensor, tf.Tensor]:
  """All (bytes, label) of a split in memory in stored order, and the rows to read in file-name order.

  The stream reads row ``order[i]`` for example i (file-name order, independent of TFDS sharding),
  so the bytes are held once: sorting them with a gather would hold them twice (measured at full
  Office-Home scale: 2.4 GB more resident for Product + Real_World). With ``val_fraction``,
  ``order`` leaves out the held-out source validation rows (``source_val_mask``), or with ``val``
  lists only them.
  """
  ds = _read(builder, split).map(lambda ex: (ex['file_name'], ex['image'], ex['label']))
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
    ds = _read(builder, split).map(lambda ex: (ex['file_name'], ex['label']))
    names, labels = (x.numpy() for x in ds.batch(1 << 31).get_single_element())
    order = np.argsort(names, kind='stable')
    return names[order], labels[order].astype(np.int32), order.astype(np.int64)

  def fill(out: np.ndarray, stored: np.ndarray) -> None:  # streamed in stored order
    row = _cache_rows(stored)  # where each stored example goes: its file-name row
    ds = (
      _read(builder, split)
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


def _train_rows(
  cache: image_cache.Resized, val_fraction: float, data, num_train: int, layout
) -> np.ndarray:
  """The cache rows this process's train stream permutes, in file-name order: the split without
  its held-out source rows (``source_val_mask``), and with data.train_sharding='process' only the
  stored slice of this process (what ``_train_split`` loads uncached)."""
  keep = ~source_val_mask(cache.names, val_fraction)
  if data.train_sharding == 'process':
    start, size = _slice_bounds(num_train, layout.index, layout.count)
    keep &= (cache.stored >= start) & (cache.stored < start + size)
  return np.flatnonzero(keep)


def _fetch(cache: image_cache.Resized):
  """``fetch(row)``: row ``row`` of the cache as a uint8 [S, S, 3] tensor, read from its memory map
  (the pages every process of the host shares) inside the tf.data graph."""
  images, size = cache.images, cache.images.shape[1]

  def fetch(row):
    image = tf.numpy_function(lambda r: np.asarray(images[r]), [row], tf.uint8, stateful=False)
    return tf.ensure_shape(image, [size, size, 3])

  return fetch


def _fetch_rows(cache: image_cache.Resized):
  """``fetch(rows)``: rows ``rows`` (int64 [n]) of the cache, uint8 [n, S, S, 3], gathered from its
  memory map in one copy."""
  images, size = cache.images, cache.images.shape[1]

  def fetch(rows):
    image = tf.numpy_function(lambda r: images[r], [rows], tf.uint8, stateful=False)
    return tf.ensure_shape(image, [None, size, size, 3])

  return fetch


def _cache_rows(stored: np.ndarray) -> np.ndarray:
  """The inverse of a cache's ``stored`` order: the cache row of each stored example."""
  row = np.empty(len(stored), np.int64)
  row[stored] = np.arange(len(stored))
  return row


def _stored_rows(cache: image_cache.Resized, start: int, size: int) -> np.ndarray:
  """The cache rows of stored examples ``start .. start + size - 1``, in stored order."""
  return _cache_rows(cache.stored)[start : start + size]


def release_freed_memory() -> None:
  """Hands the C heap's freed pages back to the OS (glibc ``malloc_trim``; a no-op elsewhere).

  Loading a domain allocates every encoded image separately; once the resized cache replaces them
  their pages stay resident unless trimmed (measured at full Office-Home scale: GBs per process).
  """
  try:
    ctypes.CDLL('libc.so.6').malloc_trim(0)
  except (OSError, AttributeError):
    pass


@dataclasses.dataclass(frozen=True)
class _Stream:
  """Where one process's rows sit in a domain's train stream."""

  num_examples: int  # examples the stream permutes (the whole domain, or this process's shard)
  step_rows: int  # rows per step of the permuted stream (global batch, or the process's batch)
  row_offset: int  # first row of this process within a step
  rows: int  # rows of this process per step
  key: tuple[int, ...]  # seed key of this stream


def _train_split(data, domain: catalog.DomainInfo, index: int, count: int):
  """(split this process loads, its size) for data.train_sharding 'global' or 'process'."""
  if data.train_sharding == 'global':
    return domain.train_split, domain.num_train
  return _process_slice(domain.train_split, domain.num_train, index, count)


def _train_stream(
  data, domain: catalog.DomainInfo, role: int, seed: int, global_batch_size: int, layout, n
) -> _Stream:
  """Where this process's real rows sit in a stream of ``n`` loaded training examples."""
  first, real, _ = batch_layout(global_batch_size, layout.index, layout.count, layout.devices)
  if data.train_sharding == 'global':
    stream = _Stream(n, global_batch_size, first, real, (seed, role))
  else:
    stream = _Stream(n, real, 0, real, (seed, role, layout.index + 1))
  _check_stream_size(data, domain.name, role, stream.num_examples, stream.step_rows)
  return stream


def _check_stream_size(data, domain: str, role: int, num_examples: int, step_rows: int) -> None:
  if num_examples < step_rows:
    raise UserError(
      f'domain {domain} has {num_examples} training images per stream, fewer than one batch '
      f'({step_rows}); lower the batch size'
      + (' or data.source_val_fraction' if role == 0 and data.source_val_fraction else '')
    )


def check_train_batches(
  data: ml_collections.ConfigDict,
  info: catalog.DataInfo,
  global_batch_size: int,
  *,
  source_held_out: int = 0,
  process_count: int | None = None,
  device_count: int | None = None,
) -> None:
  """What the train streams refuse when they start (a domain with fewer training images per stream
  than one batch), checked from the prepared datasets' sizes before a run writes anything.

  ``source_held_out``: the source images held out as its validation split (``make_source_val_data``
  counts them). Exact for data.train_sharding='global'; with 'process', every process slice is
  checked against its rows without the held-out images (the stream checks its own slice again when
  it starts). ``process_count``, ``device_count``: as ``make_train_dataset``'s.
  """
  layout = _process_layout(0 if process_count else None, process_count, device_count)
  for role, domain in enumerate((info.source, info.target)):
    if data.train_sharding == 'global':
      n = domain.num_train - (source_held_out if role == 0 else 0)
      _check_stream_size(data, domain.name, role, n, global_batch_size)
      continue
    for p in range(layout.count):
      real = batch_layout(global_batch_size, p, layout.count, layout.devices)[1]
      n = _slice_bounds(domain.num_train, p, layout.count)[1]
      if real:
        _check_stream_size(data, domain.name, role, n, real)


def _fold(key: tf.Tensor, value) -> tf.Tensor:
  return tf.random.experimental.stateless_fold_in(key, tf.cast(value, tf.int64))


def _index_stream(stream: _Stream, start_step: int, data) -> tf.data.Dataset:
  """Per step from ``start_step``, this process's real rows: their example indices ('i', int64
  [rows]) and augmentation draws ('box', 'flip': ``train_draws``). A step's draws are made for all
  its ``step_rows`` rows at once from the step's key, and each process takes its own: a row's
  draws depend on its place in the stream, not on the process or device count."""
  key = tf.constant([0, 0], tf.int64)
  for k in stream.key:
    key = _fold(key, k)
  steps_per_epoch = stream.num_examples // stream.step_rows  # drop_last, as the reference
  mine = slice(stream.row_offset, stream.row_offset + stream.rows)

  def rows_of_step(step):
    epoch_key = _fold(_fold(key, 0), step // steps_per_epoch)
    perm = tf.argsort(tf.random.stateless_uniform([stream.num_examples], epoch_key), stable=True)
    first = (step % steps_per_epoch) * stream.step_rows + stream.row_offset
    box, flip = train_draws(_fold(_fold(key, 1), step), stream.step_rows, data.resize_size, data)
    i = tf.gather(perm, first + tf.range(stream.rows, dtype=tf.int64))
    return {'i': i, 'box': box[mine], 'flip': flip[mine]}

  return tf.data.Dataset.range(start_step, _MAX_STEP).map(rows_of_step)


def _domain_train_dataset(
  data,
  domain: catalog.DomainInfo,
  role: int,
  *,
  seed: int,
  global_batch_size: int,
  start_step: int,
  layout: _Layout,
  train_input: str = 'host',
):
  """One domain's infinite, shuffled batches of this process's rows (real, then padding:
  ``_pad_train_batch``): augmented ('host'), or the rows' draws with their uint8 images
  ('device') or cache row numbers ('resident'), for ``device_augment`` to augment."""
  _, real, rows = batch_layout(global_batch_size, layout.index, layout.count, layout.devices)
  on_host = train_input == 'host'
  if not real:  # a process whose rows are all padding (fewer rows than processes x devices)
    return tf.data.Dataset.from_tensors(
      _pad_train_batch(_empty_batch(data, train_input), 0, rows)
    ).repeat()
  split, size = _train_split(data, domain, layout.index, layout.count)
  val_fraction = data.source_val_fraction if role == 0 else 0.0  # held out of the source only
  if data.cache_resized:  # the shared resized cache, in file-name order: example i is row order[i]
    cache = resized_split(domain.builder, domain.train_split, data)
    cache_rows = _train_rows(cache, val_fraction, data, domain.num_train, layout)
    fetch, labels = _fetch(cache), tf.constant(cache.labels)
    order = tf.constant(cache_rows, tf.int64)
  else:
    images, labels, order = _load_encoded(domain.builder, split, size, val_fraction)
  stream = _train_stream(data, domain, role, seed, global_batch_size, layout, int(order.shape[0]))
  steps = _index_stream(stream, start_step, data)
  if not on_host:  # per step: the rows with their draws; the device crops, flips, normalises

    def load_step(step):
      row = tf.gather(order, step['i'])
      batch = {'label': tf.gather(labels, row), 'box': step['box'], 'flip': step['flip']}
      if train_input == 'device':
        batch['image'] = _fetch_rows(cache)(row)
      else:  # 'resident': the devices hold the cache; only its row numbers travel
        batch['row'] = tf.cast(row, tf.int32)
      return _pad_train_batch(batch, real, rows)

    return steps.map(load_step, num_parallel_calls=data.num_parallel_calls, deterministic=True)

  def load(row_draws):
    row = tf.gather(order, row_draws['i'])  # example i in file-name order
    if data.cache_resized:
      image = fetch(row)
    else:
      image = decode_and_resize(tf.gather(images, row), data)
    return {
      'image': augment_train(image, row_draws['box'], row_draws['flip'], data),
      'label': tf.gather(labels, row),
    }

  ds = steps.unbatch().map(load, num_parallel_calls=data.num_parallel_calls, deterministic=True)
  ds = ds.batch(stream.rows, drop_remainder=True)
  return ds.map(lambda batch: _pad_train_batch(batch, real, rows))


def _empty_batch(data, train_input: str) -> dict:
  """A batch of no rows, in the form of ``train_input``'s batches."""
  if train_input == 'host':
    size = data.crop_size or data.resize_size
    return {'image': tf.zeros((0, size, size, 3)), 'label': tf.zeros((0,), tf.int32)}
  batch = {
    'label': tf.zeros((0,), tf.int32),
    'box': tf.zeros((0, 4), tf.int32),
    'flip': tf.zeros((0,), tf.bool),
  }
  if train_input == 'device':
    size = data.resize_size
    batch['image'] = tf.zeros((0, size, size, 3), tf.uint8)
  else:
    batch['row'] = tf.zeros((0,), tf.int32)
  return batch


def _pad_train_batch(batch: dict, real: int, rows: int) -> dict:
  """A batch of ``real`` rows -> ``rows`` rows with 'mask': zeros (images, labels, boxes, flips,
  cache rows) after the real rows (mask True)."""
  pad = rows - real
  mask = tf.concat([tf.ones((real,), tf.bool), tf.zeros((pad,), tf.bool)], 0)
  if not pad:  # no copy of the images
    return {**batch, 'mask': mask}

  def padded(x):
    return tf.concat([x, tf.zeros(tf.concat([[pad], tf.shape(x)[1:]], 0), x.dtype)], 0)

  return {**{k: padded(v) for k, v in batch.items()}, 'mask': mask}


def make_train_dataset(
  data: ml_collections.ConfigDict,
  *,
  global_batch_size: int,
  seed: int,
  start_step: int = 0,
  process_index: int | None = None,
  process_count: int | None = None,
  device_count: int | None = None,
  train_input: str = 'host',
) -> tf.data.Dataset:
  """Zipped source/target train batches of this process (see the module docstring).

  Args:
    data: the data config (config_defaults.get_data_config).
    global_batch_size: images per domain per step over all processes (the reference's 36).
    seed: stream seed; the batches are a pure function of (seed, step).
    start_step: first step to produce; resuming at k gives what an uninterrupted stream gives at k.
    process_index, process_count: this process and how many there are (default: from jax).
    device_count: the devices the global batch is split over (default: the mesh a run builds,
      ``sharding.make_mesh``; with an explicit process layout, one device per process).
    train_input: where the train augmentation runs (``device_augment.resolve_train_input``):
      'host' yields augmented float32 images; 'device' the uint8 resized rows with their crop boxes
      and flips ('image' uint8 [R, S, S, 3], 'box' int32 [R, 4], 'flip' bool [R]); 'resident'
      the same draws with the rows' numbers in the resized cache ('row' int32 [R]).

  Returns:
    An infinite dataset of {'source': {'image', 'label', 'mask'}, 'target': {...}} with the
    rows of ``batch_layout`` per domain: real rows (mask True), then padding (mask False).
  """
  catalog.hide_accelerators_from_tf()
  _check_config(data)
  layout = _process_layout(process_index, process_count, device_count)
  streams = {}
  for role, name in enumerate(('source', 'target')):
    domain = catalog.resolve_domain(data, data[name])
    streams[name] = _domain_train_dataset(
      data,
      domain,
      role,
      seed=seed,
      start_step=start_step,
      global_batch_size=global_batch_size,
      layout=layout,
      train_input=train_input,
    )
  return tf.data.Dataset.zip(streams).prefetch(data.prefetch_batches)


def make_train_iterator(
  data: ml_collections.ConfigDict,
  *,
  global_batch_size: int,
  seed: int,
  start_step: int = 0,
  process_index: int | None = None,
  process_count: int | None = None,
  device_count: int | None = None,
  train_input: str = 'host',
) -> Iterator[dict]:
  """`make_train_dataset` as an iterator of numpy batches (the train step's input)."""
  return make_train_dataset(
    data,
    global_batch_size=global_batch_size,
    seed=seed,
    start_step=start_step,
    process_index=process_index,
    process_count=process_count,
    device_count=device_count,
    train_input=train_input,
  ).as_numpy_iterator()


def resident_images(data: ml_collections.ConfigDict) -> dict[str, np.ndarray]:
  """Both domains' resized train caches (uint8 [N, S, S, 3], memory-mapped), which the 'resident'
  train input holds on every device: its batches' 'row' numbers index them."""
  catalog.hide_accelerators_from_tf()
  images = {}
  for name in ('source', 'target'):
    domain = catalog.resolve_domain(data, data[name])
    images[name] = resized_split(domain.builder, domain.train_split, data).images
  return images


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


def _eval_rows(global_batch_size: int, layout: _Layout) -> int:
  """Rows per process of an eval batch: the global batch rounded up to the device count, every
  row available to real images (only the end of the set is padding)."""
  return batch_layout(global_batch_size, layout.index, layout.count, layout.devices)[2]


def _padded_eval_data(
  data, real: tf.data.Dataset | None, size: int, num_examples: int, rows, count
):
  """EvalData of this process's ``size`` real examples (None: none) padded with zero images (mask
  False) to the batch count every process shares."""
  num_batches = math.ceil(math.ceil(num_examples / count) / rows)
  ds = tf.data.Dataset.from_tensors(
    {
      'image': tf.zeros(eval_image_shape(data), tf.float32),
      'label': tf.constant(0, tf.int32),
      'mask': tf.constant(False),
    }
  ).repeat(num_batches * rows - size)  # padding, mask False
  if real is not None:
    ds = real.concatenate(ds)
  ds = ds.batch(rows, drop_remainder=True).prefetch(data.prefetch_batches)
  return EvalData(dataset=ds, num_examples=num_examples, num_batches=num_batches)


def make_eval_data(
  data: ml_collections.ConfigDict,
  *,
  domain: str | None = None,
  global_batch_size: int | None = None,
  process_index: int | None = None,
  process_count: int | None = None,
  device_count: int | None = None,
) -> EvalData:
  """Eval batches of `domain` (default: the target) for this process.

  Process p reads the contiguous slice p of the eval split; every process pads its last batches with
  zero images (mask False) up to the same batch count, so all images count exactly once overall.
  global_batch_size defaults to data.eval_batch_size (images per step over all processes), rounded
  up to a multiple of the device count (``batch_layout``; layout arguments as
  ``make_train_dataset``'s).
  """
  catalog.hide_accelerators_from_tf()
  _check_config(data)
  layout = _process_layout(process_index, process_count, device_count)
  index, count = layout.index, layout.count
  info = catalog.resolve_domain(data, domain or data.target)
  rows = _eval_rows(global_batch_size or data.eval_batch_size, layout)
  split, size = _process_slice(info.eval_split, info.num_eval, index, count)
  real = None
  if size and data.cache_resized:  # crops of the shared resized cache: no decode, no resize
    cache = resized_split(info.builder, info.eval_split, data)
    start, _ = _slice_bounds(info.num_eval, index, count)
    real = _cached_eval_examples(data, cache, _stored_rows(cache, start, size))
  elif size:  # a process can be left without images when there are fewer images than processes
    real = _read(info.builder, split).map(
      lambda ex: _eval_example(data, ex['image'], ex['label']),
      num_parallel_calls=data.num_parallel_calls,
      deterministic=True,
    )
  return _padded_eval_data(data, real, size, info.num_eval, rows, count)


def _cached_eval_examples(data, cache: image_cache.Resized, rows: np.ndarray) -> tf.data.Dataset:
  """Eval examples of cache ``rows`` (in that order): the eval transform's crops of the cached
  resize, the pixels ``preprocess_eval`` gives from the encoded image."""
  fetch = _fetch(cache)
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
) -> EvalData:
  """Eval batches (the eval transform) of the held-out source validation split for this process.

  The split is the part of the source's training images that ``source_val_mask`` holds out of the
  train stream (data.source_val_fraction > 0), in file-name order; its encoded bytes stay in memory
  (a small part of the domain), process p evaluating the contiguous slice p of it. Batches as
  ``make_eval_data``'s.
  """
  catalog.hide_accelerators_from_tf()
  _check_config(data)
  layout = _process_layout(process_index, process_count, device_count)
  index, count = layout.index, layout.count
  info = catalog.resolve_domain(data, data.source)
  rows = _eval_rows(global_batch_size or data.eval_batch_size, layout)
  if data.cache_resized:
    cache = resized_split(info.builder, info.train_split, data)
    held_out = np.flatnonzero(source_val_mask(cache.names, data.source_val_fraction))
  else:
    images, labels, held_out = _load_encoded(
      info.builder, info.train_split, info.num_train, data.source_val_fraction, val=True
    )
  num_examples = int(held_out.shape[0])
  if not num_examples:
    raise UserError(
      f'data.source_val_fraction={data.source_val_fraction} holds out none of the '
      f'{info.num_train} training images of source domain {info.name}; raise it'
    )
  start, size = _slice_bounds(num_examples, index, count)
  mine = held_out[start : start + size]
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
