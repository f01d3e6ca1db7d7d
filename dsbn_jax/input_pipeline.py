"""tf.data input pipelines: infinite source/target train streams and padded, masked eval batches.

Batch contract (numpy arrays, B = rows of this process = global batch // process_count):
  train: {'source': {'image': f32[B,H,W,3], 'label': i32[B]}, 'target': {...same...}}
  eval:  {'image': f32[B,H,W,3] (center) or f32[B,10,H,W,3] (10crop), 'label': i32[B],
          'mask': bool[B]}

Transforms mirror ALDA's `pre_process.py` (docs/reference.md §6): train = decode -> square resize
-> RandomResizedCrop -> random horizontal flip -> /255 -> mean/std; eval = square resize -> 10 crops
(5 on the flipped image, then the same 5 on the unflipped one) or the center crop. After each resize
pixels are rounded and clipped to [0, 255] because the reference works on uint8 PIL images.

Determinism and resume: the train stream is a pure function of (seed, step). Step s of a domain
draws the epoch's permutation `argsort(stateless_uniform(fold(seed, epoch)))` (epoch = s //
steps_per_epoch, remainder dropped as the reference's drop_last) and takes rows s*G .. s*G+G-1 of
it; every row's augmentation is seeded by its global position. `start_step=k` therefore yields
exactly what an uninterrupted stream yields from step k, and (with data.train_sharding='global')
the global batch is the same for any process count: process p returns rows [p*B, (p+1)*B) of it,
i.e. the rows its devices hold under a P('data') sharding with process-major device order.
"""

from __future__ import annotations

import ctypes
import dataclasses
import hashlib
import math
from collections.abc import Iterator

import ml_collections
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from dsbn_jax.datasets import catalog  # also registers the TFDS builders
from dsbn_jax.errors import UserError

# 10-crop order of the reference's image_test_10crop: origins (x, y) in units of "first" = 0,
# "last" = resize - crop - 1 and "center" = (resize - crop - 1) / 2, applied first to the flipped
# (ForceFlip) image, then to the unflipped one.
TEN_CROP_ORIGINS = (
  ('first', 'first'),
  ('last', 'last'),
  ('last', 'first'),
  ('first', 'last'),
  ('center', 'center'),
)
EVAL_MODES = ('10crop', 'center')  # data.eval_mode
TRAIN_SHARDINGS = ('global', 'process')  # data.train_sharding
# data.resize_method: tf.image.resize's methods (always with antialias=True, see resize_square)
RESIZE_METHODS = (
  'bicubic',
  'bilinear',
  'nearest',
  'area',
  'lanczos3',
  'lanczos5',
  'gaussian',
  'mitchellcubic',
)
_MAX_STEP = 2**62  # "infinite" train stream
_CROP_ATTEMPTS = 10  # torchvision RandomResizedCrop.get_params tries 10 boxes, then falls back


# ----------------------------------------------------------------------------------------------
# Per-image transforms (graph mode, no Python side effects)
# ----------------------------------------------------------------------------------------------


def decode_image(data: tf.Tensor) -> tf.Tensor:
  """Encoded JPEG/PNG bytes -> uint8[H,W,3]; gray/palette/alpha -> RGB as PIL's .convert('RGB')."""
  # INTEGER_ACCURATE makes TF's JPEG decode bit-identical to PIL's (the reference loader).
  image = tf.cond(
    tf.io.is_jpeg(data),
    lambda: tf.io.decode_jpeg(data, channels=3, dct_method='INTEGER_ACCURATE'),
    lambda: tf.io.decode_image(data, channels=3, expand_animations=False),
  )
  image.set_shape([None, None, 3])
  return image


def _to_uint8_range(image: tf.Tensor) -> tf.Tensor:
  """Round and clip like the reference's uint8 PIL images after each resize."""
  return tf.clip_by_value(tf.round(image), 0.0, 255.0)


def resize_square(image: tf.Tensor, size: int, method: str) -> tf.Tensor:
  """The reference's ResizeImage: HxW -> size x size, aspect distorted; float32 in [0, 255]."""
  image = tf.cast(image, tf.float32)
  same = tf.reduce_all(tf.equal(tf.shape(image)[:2], size))
  resized = tf.cond(  # antialias=True matches PIL's resize filters (support scaled on downsampling)
    same,
    lambda: image,
    lambda: _to_uint8_range(tf.image.resize(image, [size, size], method=method, antialias=True)),
  )
  return tf.ensure_shape(resized, [size, size, 3])


def random_resized_crop_box(
  seed: tf.Tensor,
  height: tf.Tensor,
  width: tf.Tensor,
  scale: tuple[float, float],
  ratio: tuple[float, float],
):
  """torchvision RandomResizedCrop.get_params with stateless RNG: (top, left, h, w) int32."""
  s_area, s_ratio, s_pos = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
  hf, wf = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
  area = hf * wf * tf.random.stateless_uniform([_CROP_ATTEMPTS], s_area, scale[0], scale[1])
  aspect = tf.exp(
    tf.random.stateless_uniform([_CROP_ATTEMPTS], s_ratio, math.log(ratio[0]), math.log(ratio[1]))
  )
  w = tf.cast(tf.round(tf.sqrt(area * aspect)), tf.int32)  # round half to even, like Python's round
  h = tf.cast(tf.round(tf.sqrt(area / aspect)), tf.int32)
  ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
  first = tf.argmax(tf.cast(ok, tf.int32), output_type=tf.int32)  # the first accepted attempt
  # Fallback after 10 failures: the central crop with the ratio clamped into range (torchvision).
  in_ratio = wf / hf
  fb_w = tf.where(in_ratio > ratio[1], tf.cast(tf.round(hf * ratio[1]), tf.int32), width)
  fb_h = tf.where(in_ratio < ratio[0], tf.cast(tf.round(wf / ratio[0]), tf.int32), height)
  any_ok = tf.reduce_any(ok)
  h, w = tf.where(any_ok, h[first], fb_h), tf.where(any_ok, w[first], fb_w)
  u = tf.random.stateless_uniform([2], s_pos)  # torch.randint(0, H - h + 1) etc.
  top = tf.minimum(tf.cast(u[0] * tf.cast(height - h + 1, tf.float32), tf.int32), height - h)
  left = tf.minimum(tf.cast(u[1] * tf.cast(width - w + 1, tf.float32), tf.int32), width - w)
  top = tf.where(any_ok, top, (height - h) // 2)
  left = tf.where(any_ok, left, (width - w) // 2)
  return top, left, h, w


def random_resized_crop(
  image: tf.Tensor, seed: tf.Tensor, size: int, data: ml_collections.ConfigDict
) -> tf.Tensor:
  """RandomResizedCrop(size) (scale/ratio from the config), bilinear as torchvision's default."""
  shape = tf.shape(image)
  top, left, h, w = random_resized_crop_box(
    seed, shape[0], shape[1], tuple(data.crop_scale), tuple(data.crop_ratio)
  )
  crop = image[top : top + h, left : left + w]
  crop = _to_uint8_range(tf.image.resize(crop, [size, size], method='bilinear', antialias=True))
  return tf.ensure_shape(crop, [size, size, 3])


def normalize(image: tf.Tensor, data: ml_collections.ConfigDict) -> tf.Tensor:
  """ToTensor (/255) then Normalize(mean, std), channel last."""
  mean = tf.constant(data.mean, tf.float32)
  std = tf.constant(data.std, tf.float32)
  return (image / 255.0 - mean) / std


def decode_and_resize(data_bytes: tf.Tensor, data: ml_collections.ConfigDict) -> tf.Tensor:
  """Deterministic head of both transforms: decode, square resize; float32 [S, S, 3] in [0, 255]."""
  return resize_square(decode_image(data_bytes), data.resize_size, data.resize_method)


def augment_train(image: tf.Tensor, seed: tf.Tensor, data: ml_collections.ConfigDict) -> tf.Tensor:
  """The random tail of image_train on a resized image: RandomResizedCrop, flip, normalise."""
  s_crop, s_flip = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  if data.crop_size:  # crops the cached uint8 image directly; resize returns float32
    image = random_resized_crop(image, s_crop, data.crop_size, data)
  image = tf.cast(image, tf.float32)
  if data.random_flip:
    flip = tf.random.stateless_uniform([], s_flip) < 0.5
    image = tf.cond(flip, lambda: tf.reverse(image, axis=[1]), lambda: image)
  return normalize(image, data)


def preprocess_train(
  data_bytes: tf.Tensor, seed: tf.Tensor, data: ml_collections.ConfigDict
) -> tf.Tensor:
  """Reference image_train: decode -> resize -> RandomResizedCrop -> random flip -> normalise."""
  return augment_train(decode_and_resize(data_bytes, data), seed, data)


def crop_offsets(resize_size: int, crop_size: int) -> dict[str, int]:
  """PlaceCrop origins; PIL rounds the crop box (half to even), so 15.5 -> 16 for 256/224."""
  return {
    'first': 0,
    'last': resize_size - crop_size - 1,
    'center': round((resize_size - crop_size - 1) / 2),
  }


def ten_crop(image: tf.Tensor, crop_size: int) -> tf.Tensor:
  """The reference's image_test_10crop on a square-resized image: [10, crop, crop, 3]."""
  offsets = crop_offsets(image.shape[0], crop_size)
  crops = []
  for flipped in (tf.reverse(image, axis=[1]), image):  # ForceFlip crops first
    for x, y in TEN_CROP_ORIGINS:  # PlaceCrop(size, start_x, start_y): box (x, y, x + w, y + h)
      x0, y0 = offsets[x], offsets[y]
      crops.append(flipped[y0 : y0 + crop_size, x0 : x0 + crop_size])
  return tf.stack(crops)


def center_crop(image: tf.Tensor, crop_size: int) -> tf.Tensor:
  """The reference's image_test: PlaceCrop at the rounded center, [crop, crop, 3]."""
  c = crop_offsets(image.shape[0], crop_size)['center']
  return image[c : c + crop_size, c : c + crop_size]


def preprocess_eval(data_bytes: tf.Tensor, data: ml_collections.ConfigDict) -> tf.Tensor:
  """Square resize, then 10 crops or the center crop (no crop when data.crop_size is 0)."""
  image = decode_and_resize(data_bytes, data)
  if data.eval_mode == '10crop':
    image = ten_crop(image, data.crop_size)
  elif data.crop_size:
    image = center_crop(image, data.crop_size)
  return normalize(image, data)


def eval_image_shape(data: ml_collections.ConfigDict) -> tuple[int, ...]:
  """Shape of one eval example's 'image': (10, S, S, 3) for 10crop, else (S, S, 3)."""
  size = data.crop_size or data.resize_size
  return ((10,) if data.eval_mode == '10crop' else ()) + (size, size, 3)


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


def _process_layout(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # pylint: disable=g-import-not-at-top  (only here: keep jax off the hot path)

    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} not in [0, {process_count})')
  return process_index, process_count


def _rows_per_process(global_batch_size: int, process_count: int, what: str) -> int:
  if global_batch_size <= 0 or global_batch_size % process_count:
    raise UserError(
      f'{what} {global_batch_size} must be a positive multiple of the process count {process_count}'
    )
  return global_batch_size // process_count


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


def _resize_all(encoded: tf.Tensor, rows: tf.Tensor, data: ml_collections.ConfigDict) -> tf.Tensor:
  """uint8 [N, S, S, 3]: image ``rows[i]`` of ``encoded`` decoded and resized once, at i (exact:
  resize outputs uint8 values).

  The square resize is deterministic and the most expensive step (TF's antialiased bicubic), so
  caching it makes each later epoch cost only the crop. Memory: N * S * S * 3 bytes (196 kB per
  image at S=256; 0.9 GB for Office-Home Product), filled chunk by chunk into one array that the
  returned tensor shares (one ``batch(N)`` of the whole domain would hold it twice while copying).
  """
  n, s = int(rows.shape[0]), data.resize_size
  cache = np.empty((n, s, s, 3), np.uint8)
  ds = (
    tf.data.Dataset.from_tensor_slices(rows)
    .map(
      lambda r: tf.cast(decode_and_resize(tf.gather(encoded, r), data), tf.uint8),
      num_parallel_calls=data.num_parallel_calls,
      deterministic=True,
    )
    .batch(_CACHE_CHUNK)
  )
  filled = 0
  for chunk in ds.as_numpy_iterator():
    cache[filled : filled + len(chunk)] = chunk
    filled += len(chunk)
  return tf.convert_to_tensor(cache)


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
  data, domain: catalog.DomainInfo, role: int, seed: int, global_batch_size: int, index, count, n
) -> _Stream:
  """Where this process's rows sit in a stream of ``n`` loaded training examples."""
  rows = _rows_per_process(global_batch_size, count, 'global_batch_size')
  if data.train_sharding == 'global':
    stream = _Stream(n, global_batch_size, index * rows, rows, (seed, role))
  else:
    stream = _Stream(n, rows, 0, rows, (seed, role, index + 1))
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
) -> None:
  """What the train streams refuse when they start (a domain with fewer training images per stream
  than one batch), checked from the prepared datasets' sizes before a run writes anything.

  ``source_held_out``: the source images held out as its validation split (``make_source_val_data``
  counts them). Exact for data.train_sharding='global'; with 'process', the smallest process slice
  is checked without the held-out images (the stream checks its own slice again when it starts).
  """
  count = process_count or _process_layout(None, None)[1]
  rows = _rows_per_process(global_batch_size, count, 'global_batch_size')
  for role, domain in enumerate((info.source, info.target)):
    if data.train_sharding == 'global':
      n, step_rows = domain.num_train - (source_held_out if role == 0 else 0), global_batch_size
    else:
      n, step_rows = _slice_bounds(domain.num_train, count - 1, count)[1], rows
    _check_stream_size(data, domain.name, role, n, step_rows)


def _fold(key: tf.Tensor, value) -> tf.Tensor:
  return tf.random.experimental.stateless_fold_in(key, tf.cast(value, tf.int64))


def _index_stream(stream: _Stream, start_step: int) -> tuple[tf.data.Dataset, tf.Tensor]:
  """(example index, stream position) of this process's rows from `start_step`, and the aug key."""
  key = tf.constant([0, 0], tf.int64)
  for k in stream.key:
    key = _fold(key, k)
  steps_per_epoch = stream.num_examples // stream.step_rows  # drop_last, as the reference

  def rows_of_step(step):
    epoch_key = _fold(_fold(key, 0), step // steps_per_epoch)
    perm = tf.argsort(tf.random.stateless_uniform([stream.num_examples], epoch_key), stable=True)
    first = (step % steps_per_epoch) * stream.step_rows + stream.row_offset
    position = step * stream.step_rows + stream.row_offset + tf.range(stream.rows, dtype=tf.int64)
    return tf.gather(perm, first + tf.range(stream.rows, dtype=tf.int64)), position

  steps = tf.data.Dataset.range(start_step, _MAX_STEP)
  return steps.map(rows_of_step).unbatch(), _fold(key, 1)


def _domain_train_dataset(
  data,
  domain: catalog.DomainInfo,
  role: int,
  *,
  seed: int,
  global_batch_size: int,
  start_step: int,
  index: int,
  count: int,
):
  """One domain's infinite, shuffled, augmented batches of this process's rows."""
  split, size = _train_split(data, domain, index, count)
  val_fraction = data.source_val_fraction if role == 0 else 0.0  # held out of the source only
  images, labels, order = _load_encoded(domain.builder, split, size, val_fraction)
  if data.cache_resized:  # cached in file-name order: example i is cache row i
    images, labels = _resize_all(images, order, data), tf.gather(labels, order)
    order = tf.range(tf.shape(order)[0], dtype=tf.int32)
    release_freed_memory()  # the encoded bytes, now dropped
  stream = _train_stream(
    data, domain, role, seed, global_batch_size, index, count, int(order.shape[0])
  )
  indices, aug_key = _index_stream(stream, start_step)

  def load(i, position):
    row = tf.gather(order, i)  # example i in file-name order
    image = tf.gather(images, row)
    if not data.cache_resized:
      image = decode_and_resize(image, data)
    return {
      'image': augment_train(image, _fold(aug_key, position), data),
      'label': tf.gather(labels, row),
    }

  ds = indices.map(load, num_parallel_calls=data.num_parallel_calls, deterministic=True)
  return ds.batch(stream.rows, drop_remainder=True)


def make_train_dataset(
  data: ml_collections.ConfigDict,
  *,
  global_batch_size: int,
  seed: int,
  start_step: int = 0,
  process_index: int | None = None,
  process_count: int | None = None,
) -> tf.data.Dataset:
  """Zipped source/target train batches of this process (see the module docstring).

  Args:
    data: the data config (config_defaults.get_data_config).
    global_batch_size: images per domain per step over all processes (the reference's 36).
    seed: stream seed; the batches are a pure function of (seed, step).
    start_step: first step to produce; resuming at k gives what an uninterrupted stream gives at k.
    process_index, process_count: this process and how many there are (default: from jax).

  Returns:
    An infinite dataset of {'source': {'image', 'label'}, 'target': {...}} with
    global_batch_size // process_count rows per domain.
  """
  catalog.hide_accelerators_from_tf()
  _check_config(data)
  index, count = _process_layout(process_index, process_count)
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
      index=index,
      count=count,
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
) -> Iterator[dict]:
  """`make_train_dataset` as an iterator of numpy batches (the train step's input)."""
  return make_train_dataset(
    data,
    global_batch_size=global_batch_size,
    seed=seed,
    start_step=start_step,
    process_index=process_index,
    process_count=process_count,
  ).as_numpy_iterator()


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
) -> EvalData:
  """Eval batches of `domain` (default: the target) for this process.

  Process p reads the contiguous slice p of the eval split; every process pads its last batches with
  zero images (mask False) up to the same batch count, so all images count exactly once overall.
  global_batch_size defaults to data.eval_batch_size (images per step over all processes).
  """
  catalog.hide_accelerators_from_tf()
  _check_config(data)
  index, count = _process_layout(process_index, process_count)
  info = catalog.resolve_domain(data, domain or data.target)
  rows = _rows_per_process(global_batch_size or data.eval_batch_size, count, 'eval batch size')
  split, size = _process_slice(info.eval_split, info.num_eval, index, count)
  real = None
  if size:  # a process can be left without images when there are fewer images than processes
    real = _read(info.builder, split).map(
      lambda ex: _eval_example(data, ex['image'], ex['label']),
      num_parallel_calls=data.num_parallel_calls,
      deterministic=True,
    )
  return _padded_eval_data(data, real, size, info.num_eval, rows, count)


def make_source_val_data(
  data: ml_collections.ConfigDict,
  *,
  global_batch_size: int | None = None,
  process_index: int | None = None,
  process_count: int | None = None,
) -> EvalData:
  """Eval batches (the eval transform) of the held-out source validation split for this process.

  The split is the part of the source's training images that ``source_val_mask`` holds out of the
  train stream (data.source_val_fraction > 0), in file-name order; its encoded bytes stay in memory
  (a small part of the domain), process p evaluating the contiguous slice p of it.
  """
  catalog.hide_accelerators_from_tf()
  _check_config(data)
  index, count = _process_layout(process_index, process_count)
  info = catalog.resolve_domain(data, data.source)
  rows = _rows_per_process(global_batch_size or data.eval_batch_size, count, 'eval batch size')
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
