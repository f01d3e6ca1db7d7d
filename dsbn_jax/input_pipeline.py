"""tf.data train streams: infinite, shuffled source/target batches of this process.

Batch contract (numpy arrays, R = rows of this process, ``batch_layout``):
  {'source': {'image': f32[R,H,W,3], 'label': i32[R], 'mask': bool[R]}, 'target': {...}}
(with train_input 'device' or 'resident', uint8 rows or cache row numbers with their draws:
``make_train_dataset``). 'mask' is False on padding rows (zero images, label 0), which count
nowhere. Any global batch runs on any device count: a global batch of B rows over n devices takes
ceil(B / n) * n rows, R per process; the B real rows come first (process p holds rows
[p*R, (p+1)*R) of the padded global batch, so real row i is the stream's row i whatever the device
or process count), the padding last.

What the streams read and the process layout are in ``data_source``, the eval batches in
``eval_data`` (both re-exported here, as the pipeline's public names).
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

import dataclasses
from collections.abc import Iterator

import ml_collections
import numpy as np
import tensorflow as tf

from dsbn_jax import image_cache
from dsbn_jax.data_source import (  # noqa: F401  (re-exported: the layout the streams share)
  TRAIN_SHARDINGS,
  Layout,
  batch_layout,
  cache_rows,
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
from dsbn_jax.datasets import catalog  # also registers the TFDS builders
from dsbn_jax.errors import UserError
from dsbn_jax.eval_data import EvalData, make_eval_data, make_source_val_data  # noqa: F401
from dsbn_jax.transforms import (  # noqa: F401  (re-exported: the pipeline's public transforms)
  EVAL_MODES,
  RESIZE_METHODS,
  TEN_CROP_ORIGINS,
  augment_train,
  center_crop,
  crop_and_resize,
  crop_offsets,
  decode_and_resize,
  decode_image,
  eval_crops,
  eval_image_shape,
  normalize,
  preprocess_eval,
  preprocess_train,
  random_resized_crop_boxes,
  resize_square,
  ten_crop,
  train_draws,
)

_MAX_STEP = 2**62  # "infinite" train stream


def _train_rows(
  cache: image_cache.Resized, val_fraction: float, data, num_train: int, layout
) -> np.ndarray:
  """The cache rows this process's train stream permutes, in file-name order: the split without
  its held-out source rows (``source_val_mask``), and with data.train_sharding='process' only the
  stored slice of this process (what ``_train_split`` loads uncached)."""
  keep = ~source_val_mask(cache.names, val_fraction)
  if data.train_sharding == 'process':
    start, size = slice_bounds(num_train, layout.index, layout.count)
    keep &= (cache.stored >= start) & (cache.stored < start + size)
  return np.flatnonzero(keep)


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
  return process_slice(domain.train_split, domain.num_train, index, count)


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
  layout = process_layout(0 if process_count else None, process_count, device_count)
  for role, domain in enumerate((info.source, info.target)):
    if data.train_sharding == 'global':
      n = domain.num_train - (source_held_out if role == 0 else 0)
      _check_stream_size(data, domain.name, role, n, global_batch_size)
      continue
    for p in range(layout.count):
      real = batch_layout(global_batch_size, p, layout.count, layout.devices)[1]
      n = slice_bounds(domain.num_train, p, layout.count)[1]
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
  layout: Layout,
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
    fetch, labels = fetch_row(cache), tf.constant(cache.labels)
    order = tf.constant(cache_rows, tf.int64)
  else:
    images, labels, order = load_encoded(domain.builder, split, size, val_fraction)
  stream = _train_stream(data, domain, role, seed, global_batch_size, layout, int(order.shape[0]))
  steps = _index_stream(stream, start_step, data)
  if not on_host:  # per step: the rows with their draws; the device crops, flips, normalises

    def load_step(step):
      row = tf.gather(order, step['i'])
      batch = {'label': tf.gather(labels, row), 'box': step['box'], 'flip': step['flip']}
      if train_input == 'device':
        batch['image'] = fetch_rows(cache)(row)
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
  check_config(data)
  layout = process_layout(process_index, process_count, device_count)
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
