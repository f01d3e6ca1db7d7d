"""The custom dataset: any ``root/<domain>/<class>/<image>`` tree, one prepared copy per content.

`DomainFolder` (TFDS name ``domain_folder``) reads the tree: one split per domain folder (non-word
characters become '_': "Real World" -> ``Real_World``), classes the sorted union of the class
folder names over all domains (a class may be missing from some domain).

Its prepared copy is named after the tree's content (`make_builder`: ``<name>_<digest[:12]>``,
``<name>`` the folder's name or ``data.custom_name``; `tree.TreeId`), so:

- a tree that changes gets a new copy; the old one is never modified or deleted under a run that
  reads it (`prepared.py`'s locks), and is deleted (`delete_outdated`) once no process reads it;
- two trees with the same folder name never share a copy, and a moved or copied tree reuses its
  copy (the same content);
- every file's bytes are checked against the digest taken when preparation started, so a tree
  edited while it is being prepared is an error, never a copy named after other content.

A successful build records the tree it read (`SOURCE_FILE`: root, domains, classes, image count,
digest). When the tree is gone, its newest prepared copy is used as it is. Class names of a prepared
copy come from its own metadata, never from the folders as they are now.
"""

from __future__ import annotations

import dataclasses
import json
import os

import tensorflow_datasets as tfds
from absl import logging

from dsbn_jax.datasets import folder, prepared
from dsbn_jax.datasets import tree as tree_lib
from dsbn_jax.errors import UserError

SOURCE_FILE = 'source_tree.json'  # in a prepared copy's version folder: `TreeId.summary()`


@dataclasses.dataclass(eq=False)  # tfds.core.BuilderConfig is a plain (non-frozen) dataclass
class DomainFolderConfig(tfds.core.BuilderConfig):
  """`name`: the TFDS config name; `root`: the tree; `tree`: what it held when the builder was
  made (None: a prepared copy used without its tree, which is gone)."""

  root: str = ''
  tree: tree_lib.TreeId | None = dataclasses.field(default=None, repr=False)  # TFDS logs the repr


class DomainFolder(folder.DomainFolderBuilder):
  """A custom tree as a TFDS builder (see the module docstring)."""

  name = 'domain_folder'
  BUILDER_CONFIGS = []  # always a DomainFolderConfig made by make_builder

  def _tree(self) -> tree_lib.TreeId:
    tree = getattr(self.builder_config, 'tree', None)
    if tree is None:
      raise UserError(
        f'custom dataset folder {self.builder_config.root} is missing or empty; expected '
        'root/<domain>/<class>/<image> (config field data.manual_dir)'
      )
    return tree

  def _domains(self) -> dict[str, str]:
    tree = getattr(self.builder_config, 'tree', None)
    if tree is None and self.is_prepared():  # the tree is gone: the copy's own splits
      return {s: s for s in self.info.splits}
    domains = {folder.split_name(d): d for d in self._tree().domains}
    if len(domains) != len(self._tree().domains):
      raise UserError(
        f'domain folder names in {self._tree().root} clash once non-word characters become "_"'
      )
    return domains

  def _class_names(self) -> list[str] | None:
    if self.is_prepared():  # the names its records were labelled with, whatever the folders say now
      return _stored_label_names(self.data_dir)
    tree = getattr(self.builder_config, 'tree', None)
    return list(tree.classes) if tree is not None else None

  def _locate_root(self, dl_manager: tfds.download.DownloadManager) -> str:
    del dl_manager  # the tree is given by the config, nothing to download
    return self._tree().root

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    tree = self._tree()
    splits = super()._split_generators(dl_manager)
    listed = {
      tree_lib.relative_path(d, c, n)
      for d in tree.domains
      for c in folder.visible_subdirs(os.path.join(tree.root, d))
      for n in folder.list_images(os.path.join(tree.root, d, c))[0]
    }
    if listed != set(tree.files):
      raise _changed_while_preparing(tree.root)
    return splits

  def _read_image(self, path: str) -> tuple[bytes, bool]:
    tree = self._tree()
    key = os.path.relpath(path, tree.root).replace(os.sep, '/')
    try:
      return folder.read_image_bytes(path, custom=True, sha256=tree.files.get(key, ''))
    except FileNotFoundError:
      raise _changed_while_preparing(tree.root) from None

  def download_and_prepare(self, **kwargs) -> None:  # pylint: disable=arguments-differ
    """TFDS's, then records the tree the new records were read from (`SOURCE_FILE`)."""
    tree = self._tree()
    was_prepared = self.is_prepared()
    super().download_and_prepare(**kwargs)
    if not was_prepared and self.is_prepared():
      write_source(self.data_dir, tree.summary())


def _changed_while_preparing(root: str) -> UserError:
  return UserError(
    f'the custom tree {root} changed while it was being prepared (files added, removed or '
    'edited); run again once it is no longer being changed'
  )


def _stored_label_names(data_dir: str) -> list[str] | None:
  """Class names saved with a prepared dataset (TFDS's ``label.labels.txt``); None if absent."""
  try:
    with open(os.path.join(data_dir, 'label.labels.txt')) as f:
      return [name.strip() for name in f.read().split('\n') if name.strip()]
  except OSError:
    return None


def read_source(version_dir: str) -> dict | None:
  """The `SOURCE_FILE` of a prepared copy; None if it has none (or an unreadable one)."""
  try:
    with open(os.path.join(version_dir, SOURCE_FILE), encoding='utf-8') as f:
      source = json.load(f)
  except (OSError, ValueError):
    return None
  return source if isinstance(source, dict) else None


def write_source(version_dir: str, source: dict) -> None:
  path = os.path.join(version_dir, SOURCE_FILE)
  tmp = f'{path}.{os.getpid()}.tmp'
  with open(tmp, 'w', encoding='utf-8') as f:
    json.dump(source, f)
  os.replace(tmp, path)  # a process reading it sees the old or the new file, whole


def _copies(data_root: str) -> list[tuple[str, str, dict | None]]:
  """(config name, version folder, recorded source) of every prepared custom copy, newest first."""
  base = os.path.join(data_root, DomainFolder.name)
  version = str(DomainFolder.VERSION)
  found = []
  for name in os.listdir(base) if os.path.isdir(base) else ():
    version_dir = os.path.join(base, name, version)
    if os.path.isfile(os.path.join(version_dir, 'dataset_info.json')):
      found.append((os.path.getmtime(version_dir), name, version_dir))
  return [(name, d, read_source(d)) for _, name, d in sorted(found, reverse=True)]


def make_builder(root: str, data_root: str, name: str) -> DomainFolder:
  """The builder of the tree at ``root`` as it is now (its copy in ``data_root``, prepared or
  not), or, when the tree is gone, of its newest prepared copy."""
  root = os.path.abspath(root)
  if os.path.isdir(root) and folder.visible_subdirs(root):
    tree = tree_lib.identify(root, prepared.state_dir(data_root, 'trees'))
    config = DomainFolderConfig(name=f'{name}_{tree.digest[:12]}', root=root, tree=tree)
    return DomainFolder(config=config, data_dir=data_root)
  for copy, _, source in _copies(data_root):
    if source is not None and source.get('root') == root:
      return DomainFolder(config=DomainFolderConfig(name=copy, root=root), data_dir=data_root)
  raise UserError(
    f'custom dataset folder {root} is missing or empty; expected root/<domain>/<class>/<image> '
    '(config field data.manual_dir)'
  )


def digest(builder: DomainFolder) -> str:
  """The content digest of what ``builder`` reads (its tree's, or its prepared copy's record)."""
  tree = getattr(builder.builder_config, 'tree', None)
  if tree is not None:
    return tree.digest
  source = read_source(builder.data_dir) or {}
  return str(source.get('digest', ''))


def say_change(builder: DomainFolder) -> None:
  """Before ``builder``'s copy is prepared: one warning line when the same tree had another copy
  (it changed since), saying what changed."""
  tree = getattr(builder.builder_config, 'tree', None)
  if tree is None:
    return
  for copy, _, source in _copies(os.fspath(builder.data_dir_root)):
    if (
      source is not None and source.get('root') == tree.root and copy != builder.builder_config.name
    ):
      logging.warning(
        'custom dataset %s changed since it was prepared (%s); preparing the new content in %s '
        '(the old copy is deleted once no run reads it)',
        tree.root,
        tree_lib.describe_change(source, tree.summary()) or 'its record differs',
        builder.data_dir,
      )
      return


def delete_outdated(builder: DomainFolder) -> None:
  """After ``builder``'s copy is prepared: it records the tree's root (a moved tree reuses the copy
  of its content), and the other copies of the same root -- older contents of the tree -- are
  deleted unless a process reads them."""
  tree = getattr(builder.builder_config, 'tree', None)
  if tree is None:
    return
  data_root = os.fspath(builder.data_dir_root)
  source = read_source(builder.data_dir)
  if source is not None and source.get('root') != tree.root:
    try:
      write_source(builder.data_dir, dict(source, root=tree.root))
    except OSError as e:
      logging.info('could not record the new root of %s: %s', builder.data_dir, e)
  for copy, version_dir, other in _copies(data_root):
    if copy != builder.builder_config.name and (other or {}).get('root') == tree.root:
      lock = prepared.lock_path(data_root, version_dir)
      if prepared.delete_unread(os.path.dirname(version_dir), lock, data_root):
        logging.info('deleted %s, an outdated copy of %s', version_dir, tree.root)
