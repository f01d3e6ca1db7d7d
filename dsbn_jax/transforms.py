"""Per-image transforms of the input pipeline (TensorFlow graph ops, no Python side effects).

They mirror ALDA's `pre_process.py` (docs/reference.md §6): train = decode -> square resize ->
RandomResizedCrop -> random horizontal flip -> /255 -> mean/std; eval = square resize -> 10 crops
(5 on the flipped image, then the same 5 on the unflipped one) or the center crop. After each resize
pixels are rounded and clipped to [0, 255] because the reference works on uint8 PIL images. The
streams that apply them are in ``input_pipeline``; the train half's device form in
``device_augment``.
"""

from __future__ import annotations

import math

import ml_collections
import tensorflow as tf

from dsbn_jax.crops import TEN_CROP_ORIGINS, crop_offsets, ten_crop_boxes  # noqa: F401

EVAL_MODES = ('10crop', 'center')  # data.eval_mode
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
_CROP_ATTEMPTS = 10  # torchvision RandomResizedCrop.get_params tries 10 boxes, then falls back


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


def random_resized_crop_boxes(
  seed: tf.Tensor,
  n: int | tf.Tensor,
  height,
  width,
  scale: tuple[float, float],
  ratio: tuple[float, float],
) -> tf.Tensor:
  """torchvision RandomResizedCrop.get_params for ``n`` images of ``height`` x ``width`` at once,
  with stateless RNG: int32 [n, 4] of (top, left, h, w), each row drawn as get_params draws."""
  s_area, s_ratio, s_pos = tf.unstack(tf.random.experimental.stateless_split(seed, 3))
  hf, wf = tf.cast(height, tf.float32), tf.cast(width, tf.float32)
  area = hf * wf * tf.random.stateless_uniform([n, _CROP_ATTEMPTS], s_area, scale[0], scale[1])
  log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
  aspect = tf.exp(tf.random.stateless_uniform([n, _CROP_ATTEMPTS], s_ratio, *log_ratio))
  w = tf.cast(tf.round(tf.sqrt(area * aspect)), tf.int32)  # round half to even, like Python's round
  h = tf.cast(tf.round(tf.sqrt(area / aspect)), tf.int32)
  ok = (w > 0) & (w <= width) & (h > 0) & (h <= height)
  first = tf.argmax(tf.cast(ok, tf.int32), axis=1, output_type=tf.int32)  # first accepted attempt
  # Fallback after 10 failures: the central crop with the ratio clamped into range (torchvision).
  in_ratio = wf / hf
  fb_w = tf.where(in_ratio > ratio[1], tf.cast(tf.round(hf * ratio[1]), tf.int32), width)
  fb_h = tf.where(in_ratio < ratio[0], tf.cast(tf.round(wf / ratio[0]), tf.int32), height)
  any_ok = tf.reduce_any(ok, axis=1)
  h = tf.where(any_ok, tf.gather(h, first, batch_dims=1), fb_h)
  w = tf.where(any_ok, tf.gather(w, first, batch_dims=1), fb_w)
  u = tf.random.stateless_uniform([n, 2], s_pos)  # torch.randint(0, H - h + 1) etc.
  top = tf.minimum(tf.cast(u[:, 0] * tf.cast(height - h + 1, tf.float32), tf.int32), height - h)
  left = tf.minimum(tf.cast(u[:, 1] * tf.cast(width - w + 1, tf.float32), tf.int32), width - w)
  top = tf.where(any_ok, top, (height - h) // 2)
  left = tf.where(any_ok, left, (width - w) // 2)
  return tf.stack([top, left, h, w], axis=1)


def crop_and_resize(image: tf.Tensor, box: tf.Tensor, size: int) -> tf.Tensor:
  """The crop ``box`` (top, left, h, w) of ``image`` resized to ``size`` x ``size``, bilinear as
  torchvision's RandomResizedCrop, rounded and clipped to [0, 255] (its uint8 PIL image)."""
  top, left, h, w = tf.unstack(box)
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


def train_draws(seed: tf.Tensor, n, size: int, data: ml_collections.ConfigDict):
  """The random draws of the train augmentation for ``n`` square images of ``size`` pixels, all at
  once: RandomResizedCrop boxes (int32 [n, 4], top, left, h, w; the whole image when
  data.crop_size is 0) and flips (bool [n]; False without data.random_flip). The host path
  (``augment_train``) and the device path (``device_augment``) apply the same draws."""
  s_crop, s_flip = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
  if data.crop_size:
    scale, ratio = tuple(data.crop_scale), tuple(data.crop_ratio)
    box = random_resized_crop_boxes(s_crop, n, size, size, scale, ratio)
  else:
    box = tf.tile(tf.constant([[0, 0, size, size]], tf.int32), [n, 1])
  if data.random_flip:
    flip = tf.random.stateless_uniform([n], s_flip) < 0.5
  else:
    flip = tf.zeros([n], tf.bool)
  return box, flip


def augment_train(
  image: tf.Tensor, box: tf.Tensor, flip: tf.Tensor, data: ml_collections.ConfigDict
) -> tf.Tensor:
  """The random tail of image_train on a resized image, with its draws (``train_draws``):
  RandomResizedCrop to ``box``, flip if ``flip``, normalise."""
  if data.crop_size:  # crops the cached uint8 image directly; resize returns float32
    image = crop_and_resize(image, box, data.crop_size)
  image = tf.cast(image, tf.float32)
  image = tf.cond(flip, lambda: tf.reverse(image, axis=[1]), lambda: image)
  return normalize(image, data)


def preprocess_train(
  data_bytes: tf.Tensor, seed: tf.Tensor, data: ml_collections.ConfigDict
) -> tf.Tensor:
  """Reference image_train of one image: decode -> resize -> RandomResizedCrop -> random flip ->
  normalise, its draws from ``seed``."""
  box, flip = train_draws(seed, 1, data.resize_size, data)
  return augment_train(decode_and_resize(data_bytes, data), box[0], flip[0], data)


def ten_crop(image: tf.Tensor, crop_size: int) -> tf.Tensor:
  """The reference's image_test_10crop on a square-resized image: [10, crop, crop, 3]."""
  crops, mirrored = [], tf.reverse(image, axis=[1])
  for flipped, top, left in ten_crop_boxes(image.shape[0], crop_size):  # ForceFlip crops first
    source = mirrored if flipped else image
    crops.append(source[top : top + crop_size, left : left + crop_size])
  return tf.stack(crops)


def center_crop(image: tf.Tensor, crop_size: int) -> tf.Tensor:
  """The reference's image_test: PlaceCrop at the rounded center, [crop, crop, 3]."""
  c = crop_offsets(image.shape[0], crop_size)['center']  # PlaceCrop at the rounded centre
  return image[c : c + crop_size, c : c + crop_size]


def preprocess_eval(data_bytes: tf.Tensor, data: ml_collections.ConfigDict) -> tf.Tensor:
  """Square resize, then 10 crops or the center crop (no crop when data.crop_size is 0)."""
  return eval_crops(decode_and_resize(data_bytes, data), data)


def eval_crops(image: tf.Tensor, data: ml_collections.ConfigDict) -> tf.Tensor:
  """The tail of preprocess_eval on a square-resized image (uint8 from the resized-image cache, or
  float32 [0, 255]): 10 crops or the center crop, normalised."""
  image = tf.cast(image, tf.float32)
  if data.eval_mode == '10crop':
    image = ten_crop(image, data.crop_size)
  elif data.crop_size:
    image = center_crop(image, data.crop_size)
  return normalize(image, data)


def eval_image_shape(data: ml_collections.ConfigDict) -> tuple[int, ...]:
  """Shape of one eval example's 'image': (10, S, S, 3) for 10crop, else (S, S, 3)."""
  size = data.crop_size or data.resize_size
  return ((10,) if data.eval_mode == '10crop' else ()) + (size, size, 3)
