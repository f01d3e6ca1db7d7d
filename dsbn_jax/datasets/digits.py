"""The embedded Digits -> Digits-M benchmark: TFDS builders `digits` and `digits_m`, no download.

- `digits` (source): the 1797 UCI handwritten digits bundled with scikit-learn (8x8, values 0..16),
  scaled to 0..255 and upscaled to 32x32 (bilinear), gray replicated to RGB.
- `digits_m` (target): the MNIST-M construction (Ganin et al. 2016) on the same kind of digits:
  ``|patch - digit|`` per channel, where `patch` is a random 32x32 window of one of the colour
  photographs bundled with scikit-image (`PHOTOS`, files inside the package, no download).

Both are deterministic functions of `DigitsConfig.seed` (and of the installed sklearn/skimage/Pillow
data and code). Each has a `train` and a held-out `test` split. The 1797 digits are partitioned,
per class, into four **disjoint** sets, so every test image comes from a digit that appears in no
training split of either domain (also for the reverse direction Digits-M -> Digits):

  =============  =====  ================================
  split          size   share of each class
  =============  =====  ================================
  digits/train    632   the rest after the three below
  digits/test     269   round(0.15 n)
  digits_m/train  627   (n - 2 round(0.15 n)) // 2
  digits_m/test   269   round(0.15 n)
  =============  =====  ================================

The sizes depend only on the class counts (not on the seed); `partition(seed)` is the source of
truth and the tests check the table against it. Images are stored as PNG bytes.
"""

from __future__ import annotations

import dataclasses
import io
import os
from collections.abc import Iterator, Mapping

import numpy as np
import PIL.Image
import tensorflow_datasets as tfds

from dsbn_jax.datasets import folder
from dsbn_jax.errors import UserError

IMAGE_SIZE = 32  # px, both domains
TEST_FRACTION = 0.15  # per class, for each domain's test split
# Colour photographs shipped inside scikit-image's package data (no pooch download needed).
PHOTOS = (
  'astronaut.png',
  'chelsea.png',
  'coffee.png',
  'hubble_deep_field.jpg',
  'ihc.png',
  'motorcycle_left.png',
  'retina.jpg',
  'rocket.jpg',
)
SPLITS = ('digits/train', 'digits/test', 'digits_m/train', 'digits_m/test')


def partition(seed: int) -> dict[str, np.ndarray]:
  """Disjoint sorted index sets into sklearn's digits for the four splits, stratified per class."""
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top

  labels = load_digits().target
  rng = np.random.default_rng([seed, 0])
  parts = {k: [] for k in SPLITS}
  for c in range(10):
    idx = rng.permutation(np.flatnonzero(labels == c))
    n_test = round(TEST_FRACTION * len(idx))
    n_target = (len(idx) - 2 * n_test) // 2
    cuts = np.cumsum([n_test, n_test, n_target])
    s_test, t_test, t_train, s_train = np.split(idx, cuts)
    for k, v in zip(SPLITS, (s_train, s_test, t_train, t_test)):
      parts[k].append(v)
  return {k: np.sort(np.concatenate(v)) for k, v in parts.items()}


def digit_images(indices: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """(uint8[n,32,32] gray digits, int labels) for sklearn digit `indices`."""
  from sklearn.datasets import load_digits  # pylint: disable=g-import-not-at-top

  data = load_digits()
  small = np.round(data.images[indices] * (255.0 / 16.0)).astype(np.uint8)  # 0..16 -> 0..255
  size = (IMAGE_SIZE, IMAGE_SIZE)
  big = [np.asarray(PIL.Image.fromarray(x).resize(size, PIL.Image.BILINEAR)) for x in small]
  return np.stack(big), data.target[indices]


def load_photos() -> list[np.ndarray]:
  """The bundled colour photographs as uint8 RGB arrays (those present in this skimage install)."""
  import skimage.data  # pylint: disable=g-import-not-at-top

  paths = [os.path.join(skimage.data.data_dir, p) for p in PHOTOS]
  photos = [np.asarray(PIL.Image.open(p).convert('RGB')) for p in paths if os.path.exists(p)]
  if not photos:
    raise UserError(
      f'none of the scikit-image photographs {PHOTOS} is installed in '
      f'{skimage.data.data_dir}; reinstall scikit-image (bash run.sh installs it)'
    )
  return photos


def blend_with_photos(digits: np.ndarray, seed: int, stream: int = 0) -> np.ndarray:
  """MNIST-M: |random photo patch - digit| per channel; uint8[n,32,32] -> uint8[n,32,32,3]."""
  photos = load_photos()
  rng = np.random.default_rng([seed, 1, stream])  # one independent stream per split
  out = np.empty(digits.shape + (3,), np.uint8)
  for n, digit in enumerate(digits):
    photo = photos[rng.integers(len(photos))]
    y = rng.integers(photo.shape[0] - IMAGE_SIZE + 1)
    x = rng.integers(photo.shape[1] - IMAGE_SIZE + 1)
    patch = photo[y : y + IMAGE_SIZE, x : x + IMAGE_SIZE].astype(np.int16)
    out[n] = np.abs(patch - digit[..., None].astype(np.int16)).astype(np.uint8)
  return out


def png_bytes(image: np.ndarray) -> bytes:
  """Lossless PNG encoding of a uint8 HxW or HxWx3 array."""
  buf = io.BytesIO()
  PIL.Image.fromarray(image).save(buf, format='PNG')
  return buf.getvalue()


@dataclasses.dataclass(eq=False)  # tfds.core.BuilderConfig is a plain (non-frozen) dataclass
class DigitsConfig(tfds.core.BuilderConfig):
  """`seed` drives the split partition and (for digits_m) the photo patches."""

  seed: int = 0


class _DigitsBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Shared code of `digits` and `digits_m`; subclasses define `_make_images`."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release.'}
  BUILDER_CONFIGS = [DigitsConfig(name='default', seed=0)]
  code_path = folder.source_code_path

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=self.__doc__,
      features=tfds.features.FeaturesDict(
        {
          'image': tfds.features.Image(shape=(IMAGE_SIZE, IMAGE_SIZE, 3), encoding_format='png'),
          'label': tfds.features.ClassLabel(names=[str(d) for d in range(10)]),
          # "sklearn_digits/<index>": the source digit, so disjointness can be checked.
          'file_name': tfds.features.Text(),
        }
      ),
      supervised_keys=('image', 'label'),
    )

  def _make_images(self, indices: np.ndarray, split: str) -> tuple[np.ndarray, np.ndarray]:
    raise NotImplementedError

  def _split_generators(self, dl_manager: tfds.download.DownloadManager) -> Mapping[str, Iterator]:
    del dl_manager  # generated, nothing to download
    parts = partition(self.builder_config.seed)
    return {s: self._generate_examples(parts[f'{self.name}/{s}'], s) for s in ('train', 'test')}

  def _generate_examples(self, indices: np.ndarray, split: str) -> Iterator[tuple[int, dict]]:
    images, labels = self._make_images(indices, split)
    for i, image, label in zip(indices, images, labels):
      yield (
        int(i),
        {'image': png_bytes(image), 'label': int(label), 'file_name': f'sklearn_digits/{i:04d}'},
      )


class Digits(_DigitsBuilder):
  """Source domain: UCI/sklearn handwritten digits upscaled to 32x32 RGB."""

  name = 'digits'

  def _make_images(self, indices, split):
    del split
    gray, labels = digit_images(indices)
    return np.repeat(gray[..., None], 3, axis=-1), labels


class DigitsM(_DigitsBuilder):
  """Target domain: the same kind of digits blended with scikit-image photo patches (MNIST-M)."""

  name = 'digits_m'

  def _make_images(self, indices, split):
    gray, labels = digit_images(indices)
    return blend_with_photos(gray, self.builder_config.seed, ('train', 'test').index(split)), labels
