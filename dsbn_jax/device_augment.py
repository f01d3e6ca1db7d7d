"""The train augmentation as device computation: RandomResizedCrop's resize, flip, normalisation.

The host path (``transforms.augment_train``, TensorFlow) crops each resized uint8 image to its
box, resizes the crop to ``crop_size`` with TF's antialiased bilinear filter, rounds and clips to
[0, 255] (the reference's uint8 PIL images), flips and normalises, one image at a time on the host's
cores. Here the same maths runs batched inside a jitted computation, so that the host only sends
the uint8 rows, the boxes and the flips (``crop_resize``, ``augment``).

The resize is separable: for each axis a weight matrix ``W[out, in]`` over the *whole* resized
image, the triangle kernel of TF's ``scale_and_translate`` (what ``tf.image.resize(...,
antialias=True)`` calls for 'bilinear', and what ``jax.image.scale_and_translate`` ports) evaluated
on the crop's coordinates, zero outside the box and normalised over it -- the weights TF computes
for the cropped image, placed at the box. Cropping then resizing is ``W_y @ image @ W_x^T`` per
channel. A box is data, not a shape, so every image of a batch has its own and nothing recompiles.

Boxes and flips come from the train stream's draws (``transforms.train_draws``: torchvision's
RandomResizedCrop parameters from the stateless TF stream), so the device path crops exactly the
boxes the host path crops, with TF's weights exactly (equal to the last bit when summed by numpy);
XLA sums them in another order, so a value within about 0.001 of a half rounds the other way: one
level (1/255) in about 0.02-0.1 % of the values, never more (``tests/device_augment_test.py``).
The normalisation is a table of the host path's float32 values per level (``normalization_table``),
so without a crop (digits) the device path's pixels are the host path's to the bit.

Where it runs (``data.train_input``, ``resolve_train_input``): 'host' keeps the tf.data path;
'device' sends each step's uint8 rows with their boxes and flips; 'resident' holds both domains'
resized caches on every device and sends only the rows' numbers, boxes and flips; 'auto' takes
'resident' on an accelerator when both caches fit ``data.resident_max_gb``, else 'device', and the
host path on a CPU (whose "device" is the host itself). ``train_batch`` turns either form into the
host path's batch inside the jitted step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from dsbn_jax import crops
from dsbn_jax.errors import UserError

TRAIN_INPUTS = ('auto', 'host', 'device', 'resident')  # data.train_input


def _triangle(x):
  return jnp.maximum(0.0, 1.0 - jnp.abs(x))


def resize_weights(start, length, in_size: int, out_size: int) -> jax.Array:
  """float32 [out_size, in_size]: the antialiased bilinear weights that resize pixels
  ``start .. start + length - 1`` of an axis of ``in_size`` pixels to ``out_size`` pixels (``start``
  and ``length`` traced int scalars)."""
  length_f = jnp.asarray(length, jnp.float32)
  scale = out_size / length_f
  inv_scale = 1.0 / scale
  kernel_scale = jnp.maximum(inv_scale, 1.0)  # antialias: a wider kernel when downsampling
  sample = (jnp.arange(out_size, dtype=jnp.float32) + 0.5) * inv_scale - 0.5  # crop coordinates
  pos = jnp.arange(in_size, dtype=jnp.float32) - jnp.asarray(start, jnp.float32)
  inside = (pos >= 0) & (pos < length_f)
  w = _triangle((sample[:, None] - pos[None, :]) / kernel_scale) * inside[None, :]
  total = jnp.sum(w, axis=1, keepdims=True)
  eps = 1000.0 * float(jnp.finfo(jnp.float32).eps)
  w = jnp.where(jnp.abs(total) > eps, w / jnp.where(total != 0, total, 1.0), 0.0)
  in_range = (sample >= -0.5) & (sample <= length_f - 0.5)
  return jnp.where(in_range[:, None], w, 0.0)


def crop_resize(images_u8: jax.Array, boxes: jax.Array, crop_size: int) -> jax.Array:
  """float32 [B, crop, crop, 3] in [0, 255], rounded and clipped: each uint8 [S, S, 3] image
  cropped to its box (``boxes``: int32 [B, 4], top, left, height, width) and resized to
  ``crop_size`` (what ``transforms.crop_and_resize`` computes for that box)."""
  _, height, width, _ = images_u8.shape

  def one(image, box):
    top, left, h, w = box[0], box[1], box[2], box[3]
    wy = resize_weights(top, h, height, crop_size)
    wx = resize_weights(left, w, width, crop_size)
    x = image.astype(jnp.float32)
    out = jnp.einsum('iy,yxc->ixc', wy, x, precision=jax.lax.Precision.HIGHEST)
    out = jnp.einsum('jx,ixc->ijc', wx, out, precision=jax.lax.Precision.HIGHEST)
    return jnp.clip(jnp.round(out), 0.0, 255.0)

  return jax.vmap(one)(images_u8, boxes)


def normalization_table(mean, std) -> np.ndarray:
  """float32 [256, 3]: ``(level / 255 - mean) / std`` of every uint8 level and channel, rounded as
  the host path's float32 ops round it (numpy's and TF's divisions are correctly rounded; XLA may
  divide by a reciprocal instead, one float step off in most values)."""
  levels = np.arange(256, dtype=np.float32)[:, None]
  return (levels / np.float32(255.0) - np.asarray(mean, np.float32)) / np.asarray(std, np.float32)


def augment(
  images_u8: jax.Array,
  boxes: jax.Array | None,
  flips: jax.Array,
  *,
  crop_size: int,
  mean,
  std,
  dtype=jnp.float32,
) -> jax.Array:
  """The device half of the train augmentation: crop and resize (``boxes`` None with crop_size 0:
  no crop), horizontal flip where ``flips`` (bool [B]), ``/255`` then ``(x - mean) / std`` (as a
  lookup of ``normalization_table``: the host path's values to the bit), cast once to the compute
  ``dtype``."""
  if boxes is None:
    levels = images_u8.astype(jnp.int32)
  else:
    levels = crop_resize(images_u8, boxes, crop_size).astype(jnp.int32)
  levels = jnp.where(flips[:, None, None, None], levels[:, :, ::-1, :], levels)
  return normalize(levels, mean, std).astype(dtype)


def normalize(levels: jax.Array, mean, std) -> jax.Array:
  """float32 ``(levels / 255 - mean) / std`` of integer pixel levels [..., 3], the host path's
  values to the bit (``normalization_table``)."""
  table = jnp.asarray(normalization_table(mean, std))
  return table[levels.astype(jnp.int32), jnp.arange(3)]


def eval_images(images_u8: jax.Array, data) -> jax.Array:
  """The eval transform's tail on the devices: the square-resized uint8 images [B, S, S, 3] ->
  their 10 crops [B, 10, c, c, 3] (data.eval_mode '10crop', the reference's order), centre crops
  [B, c, c, 3], or the images themselves (data.crop_size 0), normalised: what
  ``transforms.eval_crops`` gives on the host, to the bit (slices, flips and a table lookup)."""
  size, c = images_u8.shape[1], data.crop_size
  if data.eval_mode == '10crop':
    mirrored = images_u8[:, :, ::-1]
    images_u8 = jnp.stack(
      [
        (mirrored if flipped else images_u8)[:, top : top + c, left : left + c]
        for flipped, top, left in crops.ten_crop_boxes(size, c)
      ],
      axis=1,
    )
  elif c:
    top = crops.crop_offsets(size, c)['center']
    images_u8 = images_u8[:, top : top + c, top : top + c]
  return normalize(images_u8, data.mean, data.std)


# The columns of a device-input batch's 'draws' (``pack``): one int32 array per domain crosses to
# the devices instead of five (each transfer costs the host about 25 us).
DRAWS = ('label', 'top', 'left', 'height', 'width', 'flip', 'mask', 'row')


def pack(batch: dict) -> dict:
  """A device-input host batch (``input_pipeline.make_train_dataset``, train_input 'device' or
  'resident') with each domain's labels, boxes, flips, mask and cache rows in one int32 [R, 8]
  array, 'draws' (columns ``DRAWS``; 'row' 0 where the rows travel as 'image'); host-path
  batches as they are. ``train_batch`` reads either form."""
  out = {}
  for name, part in batch.items():
    if 'box' not in part:
      out[name] = part
      continue
    rows = part.get('row', np.zeros_like(part['label']))
    columns = (part['label'], *np.moveaxis(part['box'], 1, 0), part['flip'], part['mask'], rows)
    out[name] = {'draws': np.stack(columns, axis=1).astype(np.int32)}
    if 'image' in part:
      out[name]['image'] = part['image']
  return out


def _unpack(part: dict) -> dict:
  """``pack``'s inverse for one domain (a part without 'draws' as it is)."""
  if 'draws' not in part:
    return part
  col = {name: part['draws'][:, i] for i, name in enumerate(DRAWS)}
  out = {
    'label': col['label'],
    'box': part['draws'][:, DRAWS.index('top') : DRAWS.index('width') + 1],
    'flip': col['flip'].astype(bool),
    'mask': col['mask'].astype(bool),
  }
  if 'image' in part:
    out['image'] = part['image']
  else:
    out['row'] = col['row']
  return out


def train_batch(batch: dict, data, images: dict | None = None) -> dict:
  """The host path's train batch from a device-input one (``input_pipeline.make_train_dataset``
  with train_input 'device' or 'resident'): per domain, the uint8 rows (its 'image', or rows 'row'
  of ``images[domain]``, the resident cache) cropped to 'box', flipped where 'flip' and normalised,
  float32; padding rows zero, as the host path pads. A ``pack``-ed batch is unpacked first; a
  host-path batch (no 'box') is returned as it is."""
  out = {}
  for name, part in batch.items():
    part = _unpack(part)
    if 'box' not in part:
      out[name] = part
      continue
    rows = part['image'] if 'row' not in part else jnp.take(images[name], part['row'], axis=0)
    image = augment(
      rows,
      part['box'] if data.crop_size else None,
      part['flip'],
      crop_size=data.crop_size,
      mean=data.mean,
      std=data.std,
    )
    if 'mask' in part:
      image = jnp.where(part['mask'][:, None, None, None], image, 0.0)
    out[name] = {'image': image, 'label': part['label'], 'mask': part['mask']}
  return out


def resident_bytes(num_images: int, data) -> int:
  """Device bytes of ``num_images`` resized uint8 images."""
  return num_images * data.resize_size**2 * 3


def resolve_train_input(data, platform: str, num_images: int) -> str:
  """'host', 'device' or 'resident': ``data.train_input`` with 'auto' resolved for ``platform``
  (a mesh's platform: 'cpu', 'gpu', 'tpu') and the ``num_images`` of both domains' train splits.
  A forced device input that cannot run here is a one-line error."""
  mode = data.train_input
  if mode == 'auto':
    if platform == 'cpu' or not data.cache_resized:
      return 'host'
    fits = resident_bytes(num_images, data) <= data.resident_max_gb * 2**30
    return 'resident' if fits and data.train_sharding == 'global' else 'device'
  if mode != 'host' and not data.cache_resized:
    raise UserError(
      f"data.train_input={mode!r} reads the resized-image cache: set data.cache_resized=True, or "
      "data.train_input='host'"
    )
  if mode == 'resident' and data.train_sharding != 'global':
    raise UserError(
      "data.train_input='resident' holds whole domains on every device, which needs "
      "data.train_sharding='global'; or set data.train_input='device'"
    )
  return mode
