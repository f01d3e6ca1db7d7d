"""Generated image trees for the dataset and input-pipeline tests (nothing is downloaded).

`make_domain_tree` writes ``root/<domain>/[images/]<class>/<file>`` with a few small images per
class in mixed sizes, formats and PIL modes, plus files that must be ignored. It returns a manifest
from which the tests derive every expected count and label.
"""

from __future__ import annotations

import dataclasses
import io
import os

import numpy as np
import PIL.Image

# (PIL mode, format, extension) cycled over the images; covers the conversions the builders handle.
MODES = (
  ('RGB', 'JPEG', '.jpg'),
  ('L', 'JPEG', '.jpg'),
  ('CMYK', 'JPEG', '.jpg'),
  ('P', 'PNG', '.png'),
  ('RGBA', 'PNG', '.png'),
  ('LA', 'PNG', '.png'),
  ('I;16', 'PNG', '.png'),
  ('RGB', 'PNG', '.PNG'),
  ('1', 'PNG', '.png'),
  ('RGB', 'JPEG', '.JPG'),
)
SIZES = ((40, 30), (23, 57), (64, 48), (31, 31))  # (width, height) px
IGNORED = ('.DS_Store', 'Thumbs.db', '._frame_0001.jpg', 'desktop.ini')  # never examples
OFFICE_HOME_DOMAINS = ('Art', 'Clipart', 'Product', 'Real World')
# Chosen to exercise the label mapping: case-sensitive sort ('TV' < 'Table'), first and last class.
OFFICE_HOME_SUBSET = ('Alarm_Clock', 'TV', 'Table', 'ToothBrush', 'Webcam', 'Drill')


@dataclasses.dataclass(frozen=True)
class Entry:
  domain: str  # folder name as written ("Real World")
  class_name: str
  rel: str  # path relative to the domain folder (the builders' file_name)
  path: str
  mode: str


def encode(array: np.ndarray, mode: str, fmt: str) -> bytes:
  """uint8 HxWx3 array -> bytes of an image with PIL `mode` in format `fmt`."""
  img = PIL.Image.fromarray(array)
  if mode == 'I;16':
    img = PIL.Image.fromarray(array[..., 0].astype(np.uint16) * 257)
  else:
    img = img.convert(mode)
  buf = io.BytesIO()
  img.save(buf, format=fmt, **({'quality': 90} if fmt == 'JPEG' else {}))
  return buf.getvalue()


def random_image(seed: int, size: tuple[int, int]) -> np.ndarray:
  """A smooth-ish random colour image (distinct per seed), uint8 HxWx3."""
  w, h = size
  rng = np.random.default_rng(seed)
  small = rng.integers(0, 256, (max(h // 4, 2), max(w // 4, 2), 3), dtype=np.uint8)
  return np.asarray(PIL.Image.fromarray(small).resize((w, h), PIL.Image.BILINEAR))


def make_domain_tree(
  root: str, domains, classes, *, per_class=(1, 2, 3), subdir: str = '', seed: int = 0
) -> list[Entry]:
  """Writes the tree; image counts per (domain, class) cycle through `per_class`."""
  entries, k = [], seed * 1000
  for d_i, domain in enumerate(domains):
    os.makedirs(os.path.join(root, domain), exist_ok=True)
    _write(os.path.join(root, domain, '.DS_Store'), b'\0')
    for c_i, class_name in enumerate(classes):
      class_dir = os.path.join(root, domain, subdir, class_name)
      os.makedirs(class_dir, exist_ok=True)
      for name in IGNORED:
        _write(os.path.join(class_dir, name), b'not an image')
      for n in range(per_class[(d_i + c_i) % len(per_class)]):
        mode, fmt, ext = MODES[k % len(MODES)]
        rel = os.path.join(class_name, f'img_{n:03d}{ext}')
        path = os.path.join(root, domain, subdir, rel)
        _write(path, encode(random_image(k, SIZES[k % len(SIZES)]), mode, fmt))
        entries.append(Entry(domain, class_name, rel, path, mode))
        k += 1
  return entries


def _write(path: str, data: bytes) -> None:
  with open(path, 'wb') as f:
    f.write(data)


def write_image(path: str, array: np.ndarray, fmt: str = 'PNG') -> None:
  """Writes one RGB image (used for known-image tests)."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  _write(path, encode(array, 'RGB', fmt))


def get_data_config(name: str):
  """The data section of dataset ``name`` (``dsbn_jax.config_defaults.get_data_config``)."""
  from dsbn_jax import config_defaults  # pylint: disable=g-import-not-at-top

  return config_defaults.get_data_config(name)


def get_config(name: str, lock: bool = True):
  """``configs/<name>.py``'s config, loaded by the parser behind the entry points' ``--config``
  flag (ml_collections' ``DEFINE_config_file``, ``lock_config=True``): what
  ``python -m dsbn_jax.main --config=configs/<name>.py`` starts from, before any override."""
  from ml_collections.config_flags import config_flags  # pylint: disable=g-import-not-at-top

  repo = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  parser = config_flags.ConfigFileFlagParser(name='config', lock_config=lock)
  return parser.parse(os.path.join(repo, 'configs', f'{name}.py'))
