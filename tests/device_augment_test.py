"""The device augmentation (dsbn_jax/device_augment.py) against the host path's TensorFlow ops, on
the same boxes: RandomResizedCrop's crop and antialiased bilinear resize, the flip, the
normalisation."""

import jax
import numpy as np
import pytest
import tensorflow as tf

from dsbn_jax import device_augment, input_pipeline
from tests import data_fixtures


def _data(resize, crop):
  data = data_fixtures.get_data_config('office_home')
  data.resize_size, data.crop_size = resize, crop
  return data


def _images(n, size, seed=0):
  """Smooth random colour images with fine detail (what a resize filter can get wrong)."""
  rng = np.random.default_rng(seed)
  smooth = np.stack([data_fixtures.random_image(seed * 100 + i, (size, size)) for i in range(n)])
  grain = rng.integers(-40, 41, smooth.shape)
  return np.clip(smooth.astype(int) + grain, 0, 255).astype(np.uint8)


@pytest.mark.parametrize('resize,crop,n', [(40, 32, 48), (256, 224, 4)])
def test_crop_resize_equals_the_host_path_on_the_same_boxes(resize, crop, n):
  data = _data(resize, crop)
  images = _images(n, resize)
  seed = tf.constant([7, 0], tf.int64)
  boxes = input_pipeline.random_resized_crop_boxes(
    seed, n, resize, resize, tuple(data.crop_scale), tuple(data.crop_ratio)
  ).numpy()
  host, unrounded = [], []
  for image, (top, left, h, w) in zip(images, boxes):
    host.append(input_pipeline.crop_and_resize(tf.constant(image), boxes[len(host)], crop).numpy())
    region = tf.constant(image[top : top + h, left : left + w], tf.float32)
    unrounded.append(tf.image.resize(region, [crop, crop], 'bilinear', antialias=True).numpy())
  host, unrounded = np.stack(host), np.stack(unrounded)
  assert len({tuple(b[2:]) for b in boxes}) > 1  # crops of several sizes in one batch
  device = np.asarray(jax.jit(device_augment.crop_resize, static_argnums=2)(images, boxes, crop))
  diff = np.abs(device - host)
  # The same integers, except where the exact value is (nearly) a half (two pixels weighted 1/2
  # each, say): TF's sum lands on .5 and rounds to even, XLA's sums in another order (blocked
  # dots over up to 256 terms), a few float steps off, and rounds the other way: one level, only
  # there. Measured: 163 of 147,456 values (40 -> 32) and 118 of 602,112 (256 -> 224) differ,
  # their exact values within 0.0011 of a half.
  assert diff.max() <= 1.0, diff.max()
  off_half = np.abs(unrounded - np.floor(unrounded) - 0.5)
  assert np.all(off_half[diff > 0] < 5e-3), unrounded[(diff > 0) & (off_half >= 5e-3)][:5]
  assert np.mean(diff > 0) < 0.01, np.mean(diff > 0)


def test_augment_flips_and_normalises_as_the_host_path():
  data = _data(40, 32)
  images = _images(6, 40, seed=3)
  boxes = np.array([[0, 0, 40, 40], [3, 5, 20, 30], [10, 2, 30, 12]] * 2, np.int32)
  flips = np.array([False, True, False, True, True, False])
  got = np.asarray(
    device_augment.augment(
      images, boxes, flips, crop_size=32, mean=data.mean, std=data.std, dtype=np.float32
    )
  )
  crops = np.asarray(device_augment.crop_resize(images, boxes, 32))
  want = np.where(flips[:, None, None, None], crops[:, :, ::-1], crops)
  want = input_pipeline.normalize(tf.constant(want, tf.float32), data).numpy()
  np.testing.assert_allclose(got, want, atol=1e-6)
  # the whole image as its box: the resize is the identity
  np.testing.assert_array_equal(
    np.asarray(device_augment.crop_resize(images[:1], boxes[:1], 40)), images[:1].astype(np.float32)
  )
