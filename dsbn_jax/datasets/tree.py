"""A custom tree's identity: which images it holds, in which domain and class, with which bytes.

`identify(root, cache_dir)` lists ``root/<domain>/<class>/<image>`` (the files the builder reads:
`folder.list_images`, regular files with an image suffix, hidden ones skipped) and returns a
`TreeId`: the domains, the classes, every image's relative path with the SHA-256 of its bytes, and
`TreeId.digest`, one hash over all of them. The digest is the tree's content, wherever it lies: a
moved or copied tree has the same digest, and any added, removed, renamed, relabelled (moved to
another class folder) or edited image gives another one. A prepared copy is named after it
(`catalog`), and a run records it (``config.data.dataset_digest``), so a run never resumes on, or
evaluates, another tree than the one it trained on.

Hashing reads every byte (0.6 s per GB here; what preparing reads anyway), so the digests are kept
per root in ``cache_dir`` with each file's stat -- size, modification time, inode change time
(ctime), inode and device -- and a later start hashes only the files whose stat changed. The
kernel sets ctime on every write and nothing can set it back (``touch``, ``cp -p`` and
``os.utime`` set the modification time only), so bytes rewritten with their old size and
modification time are hashed again; a file whose stat changed while its bytes did not (``touch``,
a copy of the tree) keeps its digest, and nothing is rebuilt.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import unicodedata
from collections.abc import Mapping

from dsbn_jax.datasets import folder
from dsbn_jax.errors import UserError

_CACHE_FORMAT = 1


@dataclasses.dataclass(frozen=True)
class TreeId:
  """What a custom tree holds (see the module docstring)."""

  root: str
  domains: tuple[str, ...]  # domain folder names, sorted
  classes: tuple[str, ...]  # sorted union of the class folder names over the domains
  files: Mapping[str, str]  # 'domain/class/name' -> SHA-256 of the file's bytes
  digest: str  # SHA-256 over domains, classes and every (path, file digest)

  def summary(self) -> dict:
    """What a prepared copy records of the tree it was read from (``folder.SOURCE_FILE``)."""
    return {
      'root': self.root,
      'domains': list(self.domains),
      'classes': list(self.classes),
      'images': len(self.files),
      'digest': self.digest,
    }


def relative_path(domain: str, class_name: str, name: str) -> str:
  """The key of an image in `TreeId.files` (what the builder checks each file's bytes against)."""
  return '/'.join(p for p in (domain, class_name, name) if p)


def _bad_class_names(names) -> list[str]:
  """Class folder names a prepared dataset cannot hold as they are: TFDS stores the class names
  one per line and strips each when reading them back, so a name with surrounding white space or a
  line break would come back as another name (``'cat '`` as ``'cat'``, the name of another folder)."""
  return [
    n
    for n in names
    if n != n.strip() or any(unicodedata.category(ch) in ('Cc', 'Zl', 'Zp') for ch in n)
  ]


def _listing(root: str) -> tuple[list[str], list[str], list[tuple[str, str, str, str]]]:
  """(domains, classes, [(domain, class, name, path)]) of the tree; images directly in a domain
  folder get class '' (the build refuses them, but they are part of what the tree holds)."""
  domains = folder.visible_subdirs(root)
  classes, images = set(), []
  for d in domains:
    domain_dir = os.path.join(root, d)
    names = folder.visible_subdirs(domain_dir)
    bad = _bad_class_names(names)
    if bad:
      raise UserError(
        f'class folder(s) {bad} in {domain_dir} begin or end with white space or hold a line '
        'break; a prepared dataset stores class names without them (the name would change, '
        f'or clash with another folder); rename {"them" if len(bad) > 1 else "it"} and run again'
      )
    classes.update(names)
    for c in ['', *names]:
      class_dir = os.path.join(domain_dir, c)
      images += [(d, c, n, os.path.join(class_dir, n)) for n in folder.list_images(class_dir)[0]]
  return domains, sorted(classes), images


def _stat_key(path: str) -> list[int]:
  st = os.stat(path)
  return [st.st_size, st.st_mtime_ns, st.st_ctime_ns, st.st_ino, st.st_dev]


def file_digest(path: str) -> str:
  """SHA-256 of a file's bytes."""
  h = hashlib.sha256()
  with open(path, 'rb') as f:
    while chunk := f.read(1 << 20):
      h.update(chunk)
  return h.hexdigest()


def _cache_path(cache_dir: str, root: str) -> str:
  return os.path.join(cache_dir, hashlib.sha256(root.encode()).hexdigest()[:24] + '.json')


def _read_cache(path: str, root: str) -> dict:
  try:
    with open(path, encoding='utf-8') as f:
      cache = json.load(f)
  except (OSError, ValueError):
    return {}
  ok = isinstance(cache, dict) and cache.get('format') == _CACHE_FORMAT
  ok = ok and cache.get('root') == root and isinstance(cache.get('files'), dict)
  return cache['files'] if ok else {}


def _write_cache(path: str, root: str, files: dict) -> None:
  """Best effort (a read-only data_dir only costs hashing again next time); atomic."""
  tmp = f'{path}.{os.getpid()}.tmp'
  try:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(tmp, 'w', encoding='utf-8') as f:
      json.dump({'format': _CACHE_FORMAT, 'root': root, 'files': files}, f)
    os.replace(tmp, path)
  except OSError:
    try:
      os.remove(tmp)
    except OSError:
      pass


# In this process: root -> (the stat of every file, its TreeId): a run asks several times.
_MEMO: dict[str, tuple[dict, TreeId]] = {}


def identify(root: str, cache_dir: str | None) -> TreeId:
  """The `TreeId` of the tree at ``root`` (which must exist), hashing only the files whose stat
  is not the one ``cache_dir`` recorded with their digest (None: no cache, hash every file)."""
  root = os.path.abspath(root)
  domains, classes, images = _listing(root)
  stats = {}
  for d, c, n, path in images:
    try:
      stats[relative_path(d, c, n)] = (path, _stat_key(path))
    except OSError as e:  # removed since it was listed
      raise UserError(f'cannot read {path} ({e.strerror or e}); run again') from e
  memo = _MEMO.get(root)
  if memo is not None and memo[0] == {k: s for k, (_, s) in stats.items()}:
    if memo[1].domains == tuple(domains) and memo[1].classes == tuple(classes):
      return memo[1]
  cache_file = _cache_path(cache_dir, root) if cache_dir else None
  cached = _read_cache(cache_file, root) if cache_file else {}
  files, new_cache, hashed = {}, {}, 0
  for rel, (path, key) in stats.items():
    old = cached.get(rel)
    if isinstance(old, list) and len(old) == len(key) + 1 and old[:-1] == key:
      digest = old[-1]
    else:
      try:
        digest = file_digest(path)
      except OSError as e:
        raise UserError(f'cannot read {path} ({e.strerror or e}); check it and run again') from e
      hashed += 1
    files[rel] = digest
    new_cache[rel] = [*key, digest]
  if cache_file and (hashed or set(cached) != set(new_cache)):
    _write_cache(cache_file, root, new_cache)
  content = hashlib.sha256()
  content.update(json.dumps([domains, classes], ensure_ascii=False).encode())
  for rel in sorted(files):
    content.update(f'\n{rel}\0{files[rel]}'.encode())
  tree_id = TreeId(
    root=root,
    domains=tuple(domains),
    classes=tuple(classes),
    files=files,
    digest=content.hexdigest(),
  )
  _MEMO[root] = ({k: s for k, (_, s) in stats.items()}, tree_id)
  return tree_id


def describe_change(stored: Mapping, now: Mapping) -> str | None:
  """What differs between two `TreeId.summary`s, in a few words; None if nothing."""
  changes = []
  for key in ('domains', 'classes'):
    old, new = set(stored.get(key) or ()), set(now[key])
    if old != new:
      changes.append(
        f'{key} '
        + ', '.join([f'+{x}' for x in sorted(new - old)] + [f'-{x}' for x in sorted(old - new)])
      )
  if stored.get('images') != now['images']:
    changes.append(f'images {stored.get("images")} -> {now["images"]}')
  if not changes and stored.get('digest') != now['digest']:
    changes.append('image files changed (renamed, moved to another class, replaced or edited)')
  return '; '.join(changes) or None
