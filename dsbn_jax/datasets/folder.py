"""Image-folder TFDS builders: one split per domain folder, one class per sub-folder.

`DomainFolderBuilder` is the shared base of `office31`, `office_home` and the config-driven custom
dataset `domain_folder` (any ``root/<domain>/<class>/*.{jpg,png}`` tree, no code needed).

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
import inspect
import io
import os
import re
from collections.abc import Iterator, Mapping, Sequence

from absl import logging
from etils import epath
import PIL.Image
import tensorflow_datasets as tfds

from dsbn_jax.errors import UserError

IMAGE_SUFFIXES = ('.jpg', '.jpeg', '.png')
ARCHIVE_SUFFIXES = ('.zip', '.tar', '.tar.gz', '.tgz')
# Never images: macOS/Windows metadata. Dotfiles (incl. AppleDouble "._x.jpg") are skipped too.
_IGNORED_NAMES = frozenset({'thumbs.db', 'desktop.ini', '__macosx'})
# (PIL format, PIL mode) pairs whose stored bytes TF decodes to exactly PIL's .convert('RGB') pixels
# (JPEG: with dct_method='INTEGER_ACCURATE', see input_pipeline.decode_image).
_KEEP_AS_IS = {
    'JPEG': frozenset({'L', 'RGB'}),
    'PNG': frozenset({'1', 'L', 'LA', 'P', 'RGB', 'RGBA'}),
}
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


def _visible_subdirs(path: str) -> list[str]:
  return sorted(e.name for e in os.scandir(path) if e.is_dir() and not is_hidden(e.name))


def list_images(class_dir: str) -> tuple[list[str], list[str]]:
  """Sorted image file names directly in `class_dir`, and the non-image names that were skipped."""
  images, skipped = [], []
  for entry in sorted(os.scandir(class_dir), key=lambda e: e.name):
    if is_hidden(entry.name):
      continue
    if entry.is_file() and entry.name.lower().endswith(IMAGE_SUFFIXES):
      images.append(entry.name)
    else:
      skipped.append(entry.name)
  return images, skipped


def read_image_bytes(path: str) -> tuple[bytes, bool]:
  """Returns (bytes to store, converted?) after a full PIL decode; UserError naming the bad file."""
  with open(path, 'rb') as f:
    data = f.read()
  try:
    with PIL.Image.open(io.BytesIO(data)) as img:
      img.load()  # full decode: catches truncation, which Image.verify() does not
      if img.mode in _KEEP_AS_IS.get(img.format, ()):
        return data, False
      out = io.BytesIO()
      img.convert('RGB').save(out, format='PNG')  # the reference's .convert('RGB'), losslessly
      return out.getvalue(), True
  except (OSError, SyntaxError, ValueError, PIL.Image.DecompressionBombError) as e:
    raise UserError(f'cannot read image {path} ({type(e).__name__}: {e}); replace it with the file '
                    'from the original archive (or delete it) and build the dataset again') from e


def find_root(base: str, domain_folders: Sequence[str]) -> str | None:
  """Shallowest directory at or below `base` that holds every domain folder (breadth first)."""
  level = [base]
  for _ in range(_ROOT_SEARCH_DEPTH + 1):
    for path in level:
      if all(os.path.isdir(os.path.join(path, d)) for d in domain_folders):
        return path
    level = [os.path.join(p, d) for p in level for d in _visible_subdirs(p)]
  return None


def find_archives(base: str) -> list[str]:
  """Archives (zip/tar[.gz]) directly in `base`: the dataset as downloaded, not yet extracted."""
  return sorted(os.path.join(base, n) for n in os.listdir(base)
                if not is_hidden(n) and n.lower().endswith(ARCHIVE_SUFFIXES))


def manual_dir_or_raise(dl_manager: tfds.download.DownloadManager, instructions: str) -> str:
  """The manual directory, or a one-line UserError with the download instructions."""
  try:
    return os.fspath(dl_manager.manual_dir)
  except (AssertionError, ValueError) as e:  # TFDS asserts "does not exist or is empty"
    where = getattr(dl_manager, '_manual_dir', None) or '(not set)'
    raise missing_manual_dir_error(where, instructions) from e


def missing_manual_dir_error(where: str, instructions: str) -> UserError:
  """The one-line error for a missing or empty manual directory, with the download instructions."""
  return UserError(f'the manual directory {where} is missing or empty: '
                   f'{" ".join(instructions.split())} (config field data.manual_dir)')


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
  classes = _visible_subdirs(domain_dir)
  loose = list_images(domain_dir)[0]
  if loose:  # one class per sub-folder: an image beside them has no label and would be left out
    raise UserError(f'{len(loose)} image(s) directly in the domain folder {domain_dir} (e.g. '
                    f'{loose[0]}) belong to no class; move each into its <class>/ sub-folder (or '
                    'out of the tree) and build the dataset again')
  if class_names is not None:
    unknown = sorted(set(classes) - set(class_names))
    if unknown:
      raise UserError(f'unexpected class folder(s) {unknown} in {domain_dir}; valid classes are '
                      f'{list(class_names)}. Remove them, or use data.dataset=custom')
  items, skipped = [], []
  for c in classes:
    images, other = list_images(os.path.join(domain_dir, c))
    items += [(c, os.path.join(domain_dir, c, n)) for n in images]
    skipped += [os.path.join(c, n) for n in other]
  if skipped:
    logging.warning('%s: skipped %d non-image entries (e.g. %s)', domain_dir, len(skipped),
                    skipped[:3])
  if not items:
    raise UserError(f'no .jpg/.png images under {domain_dir}/<class>/; check the folder layout')
  return DomainFiles(split=split, folder=domain_dir, items=tuple(items))


def warn_if_counts_differ(dataset: str, files: DomainFiles, published: int | None,
                          num_classes: int) -> None:
  """Logs a clear warning when a domain's image count is not the published one (a test tree)."""
  n, k = len(files.items), len(files.class_counts())
  if published is not None and n != published:
    logging.warning('%s/%s: found %d images in %d of %d classes under %s, but the published '
                    'dataset has %d; results will not be comparable to the paper unless this is '
                    'intended',
                    dataset, files.split, n, k, num_classes, files.folder, published)
  elif k != num_classes:
    logging.warning('%s/%s: only %d of %d classes have images under %s',
                    dataset, files.split, k, num_classes, files.folder)


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
        features=tfds.features.FeaturesDict({
            # Original encoded bytes (JPEG or PNG); decoded to RGB by the input pipeline.
            'image': tfds.features.Image(shape=(None, None, 3)),
            # Class order = sorted folder names (see the builder's docstring).
            'label': tfds.features.ClassLabel(names=self._class_names()),
            # Path relative to the domain folder, e.g. "Drill/00014.jpg".
            'file_name': tfds.features.Text(),
        }),
        supervised_keys=('image', 'label'),
    )

  def _locate_root(self, dl_manager: tfds.download.DownloadManager) -> str:
    """The folder holding the domain folders: manual_dir, somewhere below it, or in its archive."""
    base = manual_dir_or_raise(dl_manager, self.MANUAL_DOWNLOAD_INSTRUCTIONS)
    folders = list(self._domains().values())
    root = find_root(base, folders)
    archives = find_archives(base) if root is None else []
    for archive in archives:  # the archive as downloaded: extracted once (TFDS caches it)
      root = root or find_root(os.fspath(dl_manager.extract(archive)), folders)
    if root is None:
      raise UserError(f'no folder holding {folders} found in {base} (searched {_ROOT_SEARCH_DEPTH} '
                      f'levels deep and archives {[os.path.basename(a) for a in archives]}): '
                      f'{" ".join(self.MANUAL_DOWNLOAD_INSTRUCTIONS.split())}')
    return root

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
      warn_if_counts_differ(self.name, files, self.PUBLISHED_COUNTS.get(split),
                            len(self._class_names()))
      splits[split] = self._generate_examples(files)
    return splits

  def _generate_examples(self, files: DomainFiles) -> Iterator[tuple[str, dict]]:
    converted = 0
    for class_name, path in files.items:
      data, was_converted = read_image_bytes(path)
      converted += was_converted
      rel = os.path.relpath(path, files.folder)
      yield rel, {'image': data, 'label': class_name, 'file_name': rel}
    if converted:
      logging.info('%s/%s: %d images converted to RGB PNG (CMYK, 16-bit or non-JPEG/PNG)',
                   self.name, files.split, converted)


@dataclasses.dataclass(eq=False)  # tfds.core.BuilderConfig is a plain (non-frozen) dataclass
class DomainFolderConfig(tfds.core.BuilderConfig):
  """A custom dataset: `name` is its TFDS config name, `root` holds ``<domain>/<class>/<image>``."""

  root: str = ''


class DomainFolder(DomainFolderBuilder):
  """Any ``root/<domain>/<class>/*.{jpg,png}`` tree: one split per domain folder.

  Classes: the sorted union of the class folder names over all domains (a class may be missing
  from some domain). Split names: domain folder names with non-word characters replaced by '_'.
  Built from `DomainFolderConfig(name=..., root=...)`; a changed tree needs a new name or a rebuild
  (delete ``<data_dir>/domain_folder/<name>``), since TFDS reuses a prepared dataset as is.
  """

  name = 'domain_folder'
  BUILDER_CONFIGS = []  # always a custom DomainFolderConfig

  def _root(self) -> str:
    root = getattr(self.builder_config, 'root', '')
    if not root:
      raise UserError('the custom dataset needs its folder: set data.manual_dir to a '
                      'root/<domain>/<class>/ image tree')
    return root

  def _domains(self) -> dict[str, str]:
    root = self._root()
    if not os.path.isdir(root) or not _visible_subdirs(root):
      raise UserError(f'custom dataset folder {root} is missing or empty; expected '
                      'root/<domain>/<class>/*.jpg|png (config field data.manual_dir)')
    domains = {split_name(d): d for d in _visible_subdirs(root)}
    if len(domains) != len(_visible_subdirs(root)):
      raise UserError(f'domain folder names in {root} clash once non-word characters become "_"')
    return domains

  def _class_names(self) -> list[str] | None:
    root = self._root()
    if not os.path.isdir(root):  # prepared earlier, tree gone: names come from the stored metadata
      return None
    domains = self._domains().values()
    return sorted({c for d in domains for c in _visible_subdirs(os.path.join(root, d))})

  def _locate_root(self, dl_manager: tfds.download.DownloadManager) -> str:
    del dl_manager  # the tree is given by the config, nothing to download
    return self._root()
