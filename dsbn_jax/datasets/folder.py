"""Image-folder TFDS builders: one split per domain folder, one class per sub-folder.

`DomainFolderBuilder` is the shared base of `office31`, `office_home` and the config-driven custom
dataset `domain_folder` (`custom.py`: any ``root/<domain>/<class>/<image>`` tree, no code needed).
An image is a regular file (or a link to one) named ``*.jpg|jpeg|png|bmp|gif|webp``
(`decode.IMAGE_SUFFIXES`, what predict reads too); anything else is skipped with a warning.

Examples hold the **original encoded bytes**: `tfds.features.Image.encode_example` stores `bytes`
verbatim (it only encodes numpy arrays), so we read each file, check it and hand over its bytes.
Every image is fully decoded with PIL at build time, so a truncated or unreadable file stops the
build with its path (benchmark images are never dropped silently). Pixels become RGB at decode time
(`tf.io.decode_*(channels=3)` in the input pipeline), which matches the reference's PIL
``.convert('RGB')`` (docs/reference.md §6) for grayscale, palette, alpha and bilevel JPEG/PNG. The
few files whose TF decode would *not* match ``.convert('RGB')`` -- CMYK/YCCK JPEGs (we do not rely
on TF's CMYK path), 16-bit or other exotic PNG modes (TF rescales, PIL clips), and any other
container (GIF, BMP, TIFF, WebP, MPO) -- are converted with PIL ``.convert('RGB')`` and stored as
lossless PNG; the number of such files is logged.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import inspect
import os
import re
import shutil
import tarfile
import time
import zipfile
from collections.abc import Iterator, Mapping, Sequence

import tensorflow_datasets as tfds
from absl import logging
from etils import epath
from tensorflow_datasets.core.download import extractor as tfds_extractor

from dsbn_jax.datasets import decode  # the normalisation predict applies too
from dsbn_jax.errors import UserError

IMAGE_SUFFIXES = decode.IMAGE_SUFFIXES  # the same files as predict reads
ARCHIVE_SUFFIXES = ('.zip', '.tar', '.tar.gz', '.tgz')
# Never images: macOS/Windows metadata. Dotfiles (incl. AppleDouble "._x.jpg") are skipped too.
_IGNORED_NAMES = frozenset({'thumbs.db', 'desktop.ini', '__macosx'})
_ROOT_SEARCH_DEPTH = 3  # levels below manual_dir (or an extracted archive) searched for the domains


@tfds.core.utils.classproperty
@classmethod
def source_code_path(cls) -> epath.Path:
  """`DatasetBuilder.code_path` without TFDS's lazy `importlib_resources` import.

  TFDS 4.9.10 uses `importlib_resources` there but declares it only for Python < 3.9
  (tensorflow/datasets#11212), so building any dataset fails without that package.
  """
  return epath.Path(inspect.getfile(cls))


def is_hidden(name: str) -> bool:
  """True for dotfiles and OS metadata (`.DS_Store`, `Thumbs.db`, `__MACOSX`...)."""
  return name.startswith('.') or name.lower() in _IGNORED_NAMES


def split_name(domain_folder: str) -> str:
  """TFDS split name of a domain folder: non-word characters become '_' ("Real World")."""
  return re.sub(r'\W', '_', domain_folder)


def _entries(path: str) -> list[os.DirEntry]:
  """Visible entries of the folder `path`, sorted by name; one it cannot list is a UserError."""
  try:
    with os.scandir(path) as it:
      return sorted((e for e in it if not is_hidden(e.name)), key=lambda e: e.name)
  except OSError as e:
    raise UserError(
      f'cannot list the folder {path} ({e.strerror or e}); check that it exists and is readable'
    ) from e


def _link_loop_error(path: str, e: OSError) -> UserError:
  return UserError(f'{path} is a symbolic link that loops ({e.strerror or e}); remove the link')


def _is_dir(entry: os.DirEntry) -> bool:
  """`entry.is_dir()`; a symbolic link looping onto itself or onto a folder holding it (its
  listing would hold itself again) is a UserError naming it."""
  try:
    is_dir = entry.is_dir()
  except OSError as e:  # ELOOP: a link to itself, or links to each other
    raise _link_loop_error(entry.path, e) from e
  if is_dir and entry.is_symlink():
    target = os.path.realpath(entry.path)
    holder = os.path.realpath(os.path.dirname(entry.path))
    if holder == target or holder.startswith(target.rstrip(os.sep) + os.sep):
      raise UserError(
        f'{entry.path} is a symbolic link to {target}, a folder that holds it (a '
        'loop); remove the link, or replace it by the folder it should be'
      )
  return is_dir


def visible_subdirs(path: str) -> list[str]:
  """Sorted names of the visible folders in ``path`` (symbolic links to folders included)."""
  return [e.name for e in _entries(path) if _is_dir(e)]


def list_images(class_dir: str) -> tuple[list[str], list[str]]:
  """Sorted image file names directly in `class_dir`, and the non-image names that were skipped.

  Folders (a symbolic link to one included, even a looping one: it is never followed) are skipped;
  a symbolic link named like an image that leads nowhere (broken, or looping) is a UserError.
  """
  images, skipped = [], []
  for entry in _entries(class_dir):
    if entry.name.lower().endswith(IMAGE_SUFFIXES):
      try:
        is_file = entry.is_file()
        if not is_file and entry.is_symlink():
          os.stat(entry.path)  # raises for a broken or looping link
      except OSError as e:
        raise UserError(
          f'image {entry.path} is a broken symbolic link (to '
          f'{_readlink(entry.path)}: {e.strerror or e}); fix or delete the link and '
          'run again'
        ) from e
      if is_file:
        images.append(entry.name)
        continue
    skipped.append(entry.name)
  return images, skipped


def _readlink(path: str) -> str:
  try:
    return os.readlink(path)
  except OSError:
    return '?'


def read_image_bytes(
  path: str, *, custom: bool = False, sha256: str | None = None
) -> tuple[bytes, bool]:
  """Returns (bytes to store, converted?) after a full PIL decode; UserError naming the bad file.

  `custom`: the file is in the user's own tree (advice: fix or delete it), not from a published
  archive (advice: take it again from the archive). `sha256`: the digest its bytes had when the
  build started (`tree.TreeId`); other bytes (the file was edited meanwhile) are a UserError.
  """
  with open(path, 'rb') as f:
    data = f.read()
  if sha256 is not None and hashlib.sha256(data).hexdigest() != sha256:
    raise UserError(
      f'{path} changed while the dataset was being prepared (its bytes are not the ones read '
      'when preparation started); run again once the tree is no longer being changed'
    )
  try:
    return decode.pipeline_bytes(data)
  except decode.READ_ERRORS as e:
    advice = (
      'fix or delete the file and run again'
      if custom
      else 'replace it with the file from '
      'the original archive (or delete it) and build the dataset again'
    )
    raise UserError(f'cannot read image {path} ({decode.describe(e)}); {advice}') from e


def find_root(base: str, domain_folders: Sequence[str]) -> str | None:
  """Shallowest directory at or below `base` that holds every domain folder (breadth first)."""
  level = [base]
  for _ in range(_ROOT_SEARCH_DEPTH + 1):
    for path in level:
      if all(os.path.isdir(os.path.join(path, d)) for d in domain_folders):
        return path
    level = [os.path.join(p, d) for p in level for d in visible_subdirs(p)]
  return None


def find_archives(base: str) -> list[str]:
  """Archives (zip/tar[.gz]) directly in `base`: the dataset as downloaded, not yet extracted."""
  return sorted(
    os.path.join(base, n)
    for n in os.listdir(base)
    if not is_hidden(n) and n.lower().endswith(ARCHIVE_SUFFIXES)
  )


def extract_or_raise(dl_manager: tfds.download.DownloadManager, archive: str) -> str:
  """`dl_manager.extract(archive)`; a damaged or truncated archive is a one-line UserError, and
  the partial extraction this attempt left in TFDS's extract folder is removed."""
  extract_dir = getattr(dl_manager, '_extract_dir', None)  # TFDS: <download_dir>/extracted
  before = set(os.listdir(extract_dir)) if extract_dir and os.path.isdir(extract_dir) else set()
  try:
    return os.fspath(dl_manager.extract(archive))
  except (
    tfds_extractor.ExtractError,
    OSError,
    EOFError,
    zipfile.BadZipFile,
    tarfile.TarError,
  ) as e:
    if extract_dir and os.path.isdir(extract_dir):
      for name in set(os.listdir(extract_dir)) - before:
        if name.startswith('incomplete.'):  # TFDS's temporary folder, renamed only on success
          _remove_tree(os.path.join(extract_dir, name))
    cause = e.__cause__ or e
    reason = ' '.join(f'{type(cause).__name__}: {cause}'.split())
    raise UserError(
      f'cannot extract the archive {archive}: it is damaged or incomplete ({reason});'
      ' download it again, replace it and run again'
    ) from e


def _remove_tree(path: str) -> None:
  """rmtree, retried briefly: TFDS's extraction threads may still be writing files into it."""
  for _ in range(5):
    shutil.rmtree(path, ignore_errors=True)
    if not os.path.exists(path):
      return
    time.sleep(0.1)
  logging.warning('could not remove the partial extraction %s; delete it by hand', path)


def manual_dir_or_raise(dl_manager: tfds.download.DownloadManager, instructions: str) -> str:
  """The manual directory, or a one-line UserError with the download instructions."""
  try:
    return os.fspath(dl_manager.manual_dir)
  except (AssertionError, ValueError) as e:  # TFDS asserts "does not exist or is empty"
    where = getattr(dl_manager, '_manual_dir', None) or '(not set)'
    raise missing_manual_dir_error(where, instructions) from e


def missing_manual_dir_error(where: str, instructions: str) -> UserError:
  """The one-line error for a missing or empty manual directory, with the download instructions."""
  return UserError(
    f'the manual directory {where} is missing or empty: '
    f'{" ".join(instructions.split())} (config field data.manual_dir)'
  )


@dataclasses.dataclass(frozen=True)
class DomainFiles:
  """The image files of one domain: (class name, path) pairs in a fixed order."""

  split: str
  folder: str
  items: tuple[tuple[str, str], ...]

  def class_counts(self) -> Mapping[str, int]:
    return collections.Counter(c for c, _ in self.items)


def collect_domain(domain_dir: str, split: str, class_names: Sequence[str] | None) -> DomainFiles:
  """Lists `domain_dir/<class>/<image>`; with fixed class names, unknown folders are a UserError."""
  if not os.path.isdir(domain_dir):
    raise UserError(f'domain folder {domain_dir} is missing; re-extract the dataset archive')
  classes = visible_subdirs(domain_dir)
  loose = list_images(domain_dir)[0]
  if loose:  # one class per sub-folder: an image beside them has no label and would be left out
    raise UserError(
      f'{len(loose)} image(s) directly in the domain folder {domain_dir} (e.g. '
      f'{loose[0]}) belong to no class; move each into its <class>/ sub-folder (or '
      'out of the tree) and build the dataset again'
    )
  if class_names is not None:
    unknown = sorted(set(classes) - set(class_names))
    if unknown:
      raise UserError(
        f'unexpected class folder(s) {unknown} in {domain_dir}; valid classes are '
        f'{list(class_names)}. Remove them, or use data.dataset=custom'
      )
  items, skipped = [], []
  for c in classes:
    images, other = list_images(os.path.join(domain_dir, c))
    items += [(c, os.path.join(domain_dir, c, n)) for n in images]
    skipped += [os.path.join(c, n) for n in other]
  if skipped:
    logging.warning(
      '%s: skipped %d non-image entries (e.g. %s)', domain_dir, len(skipped), skipped[:3]
    )
  if not items:
    raise UserError(
      f'no images ({"/".join(IMAGE_SUFFIXES)}) under {domain_dir}/<class>/; check the folder layout'
    )
  return DomainFiles(split=split, folder=domain_dir, items=tuple(items))


def warn_if_counts_differ(
  dataset: str, files: DomainFiles, published: int | None, num_classes: int
) -> None:
  """Logs a clear warning when a domain's image count is not the published one (a test tree)."""
  n, k = len(files.items), len(files.class_counts())
  if published is not None and n != published:
    logging.warning(
      '%s/%s: found %d images in %d of %d classes under %s, but the published '
      'dataset has %d; results will not be comparable to the paper unless this is '
      'intended',
      dataset,
      files.split,
      n,
      k,
      num_classes,
      files.folder,
      published,
    )
  elif k != num_classes:
    logging.warning(
      '%s/%s: only %d of %d classes have images under %s',
      dataset,
      files.split,
      k,
      num_classes,
      files.folder,
    )


class DomainFolderBuilder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """Base: subclasses set `DOMAINS` (split -> folder), `CLASS_NAMES`, `PUBLISHED_COUNTS`."""

  VERSION = tfds.core.Version('1.0.0')
  RELEASE_NOTES = {'1.0.0': 'Initial release: original encoded bytes, sorted class folders.'}
  DOMAINS: Mapping[str, str] = {}  # split name -> folder name (as distributed)
  CLASS_NAMES: Sequence[str] | None = None  # None: read from the folders (custom dataset)
  PUBLISHED_COUNTS: Mapping[str, int] = {}  # split -> image count of the official release
  DOMAIN_SUBDIR = ''  # Office-31 keeps images under <domain>/images/<class>
  DESCRIPTION = ''
  HOMEPAGE = ''
  code_path = source_code_path
  CITATION = ''

  def _class_names(self) -> list[str]:
    return list(self.CLASS_NAMES)

  def _domains(self) -> Mapping[str, str]:
    return self.DOMAINS

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=self.DESCRIPTION or self.__doc__,
      homepage=self.HOMEPAGE,
      citation=self.CITATION,
      features=tfds.features.FeaturesDict(
        {
          # Original encoded bytes (JPEG or PNG); decoded to RGB by the input pipeline.
          'image': tfds.features.Image(shape=(None, None, 3)),
          # Class order = sorted folder names (see the builder's docstring).
          'label': tfds.features.ClassLabel(names=self._class_names()),
          # Path relative to the domain folder, e.g. "Drill/00014.jpg".
          'file_name': tfds.features.Text(),
        }
      ),
      supervised_keys=('image', 'label'),
    )

  def _locate_root(self, dl_manager: tfds.download.DownloadManager) -> str:
    """The folder holding the domain folders: manual_dir, somewhere below it, or in its archive."""
    base = manual_dir_or_raise(dl_manager, self.MANUAL_DOWNLOAD_INSTRUCTIONS)
    folders = list(self._domains().values())
    root = find_root(base, folders)
    archives = find_archives(base) if root is None else []
    for archive in archives:  # the archive as downloaded: extracted once (TFDS caches it)
      extracted = extract_or_raise(dl_manager, archive)
      self._extracted.append(extracted)
      root = root or find_root(extracted, folders)
    if root is None:
      raise UserError(
        f'no folder holding {folders} found in {base} (searched {_ROOT_SEARCH_DEPTH} '
        f'levels deep and archives {[os.path.basename(a) for a in archives]}): '
        f'{" ".join(self.MANUAL_DOWNLOAD_INSTRUCTIONS.split())}'
      )
    return root

  def download_and_prepare(self, **kwargs) -> None:  # pylint: disable=arguments-differ
    """TFDS's; then the archive's extracted copy goes: the records hold every image's bytes.

    (Office-Home: 3.3 GB that TFDS would otherwise keep in ``<data_dir>/downloads/extracted``
    beside the archive and the prepared records.) A failed build keeps it for the next attempt.
    """
    self._extracted = []
    super().download_and_prepare(**kwargs)
    if self.is_prepared():
      for path in self._extracted:
        _remove_tree(path)

  def _domain_dir(self, root: str, folder: str) -> str:
    path = os.path.join(root, folder, self.DOMAIN_SUBDIR) if self.DOMAIN_SUBDIR else ''
    # Some Office-31 mirrors drop the images/ level: accept <domain>/<class>/ as well.
    return path if path and os.path.isdir(path) else os.path.join(root, folder)

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    root = self._locate_root(dl_manager)
    names = self.CLASS_NAMES
    splits = {}
    for split, folder in self._domains().items():
      files = collect_domain(self._domain_dir(root, folder), split, names)
      warn_if_counts_differ(
        self.name, files, self.PUBLISHED_COUNTS.get(split), len(self._class_names())
      )
      splits[split] = self._generate_examples(files)
    return splits

  def _read_image(self, path: str) -> tuple[bytes, bool]:
    """`read_image_bytes` of a published dataset's file (the custom builder checks more)."""
    return read_image_bytes(path)

  def _generate_examples(self, files: DomainFiles) -> Iterator[tuple[str, dict]]:
    converted = 0
    for class_name, path in files.items:
      data, was_converted = self._read_image(path)
      converted += was_converted
      rel = os.path.relpath(path, files.folder)
      yield rel, {'image': data, 'label': class_name, 'file_name': rel}
    if converted:
      logging.info(
        '%s/%s: %d images converted to RGB PNG (CMYK, 16-bit or non-JPEG/PNG)',
        self.name,
        files.split,
        converted,
      )
