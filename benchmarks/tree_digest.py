"""What identifying a custom image tree costs at Office-Home size (`dsbn_jax.datasets.tree.identify`).

Every run start identifies its custom tree: `tree.identify(root, cache_dir)` lists
``root/<domain>/<class>/<image>``, stats every file and SHA-256-hashes every file whose stat (size,
mtime, ctime, inode, device) is not the one its JSON cache in ``cache_dir`` recorded; in a process,
`tree._MEMO` answers the later calls. This script generates (once, kept under ``--root``, reused when
present) an Office-Home-shaped folder tree with the generator of `office_scale.py` (``--scale`` of
the images of every class, 1.0 = the full 15,588 images in 4 domains x 65 classes, about 3.3 GB;
the archive's ImageInfo.csv and imagelist.txt beside the domain folders), then times, ``--repeats``
times each (median, min-max), with `tree._MEMO` cleared before every measurement:

  a. first start: an empty cache (a fresh ``cache_dir``): every file hashed; hashing MB/s;
  b. a later start, nothing changed: the cache hit (listing, stats, the JSON cache);
  c. after ``os.utime`` on every file (all stats changed, bytes not): every file hashed again, and
     the digest must be unchanged;
  d. the in-process memo hit (a second `identify` in the same process: listing and stats again);

and, to see where the time goes: the listing alone (`tree._listing`), the listing plus one
``os.stat`` per file, a bare ``os.scandir``/``os.stat`` walk, reading and writing the JSON cache,
hashing every file alone (`tree.file_digest`, one thread, as identify does; and on a thread pool of
``os.cpu_count()`` threads, which identify does not do), and SHA-256 over bytes in memory. The
page cache is warm for all of these (the tree was just generated or read); when
``/proc/sys/vm/drop_caches`` is writable (root) a and b are also measured once each after dropping
it (``sync; echo 3``: page, dentry and inode caches), unless ``--no_cold``.

  python benchmarks/tree_digest.py [--root data/tree_digest --scale 1.0 --workers 2 --repeats 5
      --out benchmarks/results/tree_digest.json --no_cold --real_bytes 1.1e9
      --from_zip data/office_scale/full/manual/office_home/OfficeHomeDataset_10072016.zip]

The generated JPEGs are about 3x the real ones' bytes (3.3 GB at full size, against about 1.1 GB),
so the hashing cases are also given scaled to ``--real_bytes`` (an estimate, labelled as such).
Rendering the full tree takes about 14 minutes on 2 cores; ``--from_zip`` extracts it instead from
the archive ``office_scale.py`` generated (same generator, same bytes).

Prints a Markdown table and the machine facts (CPUs, load average before and after, platform,
Python, memory, file system); the figures go to ``--out``.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import gc
import hashlib
import json
import multiprocessing
import os
import platform
import shlex
import shutil
import statistics
import sys
import tempfile
import time
import zipfile

os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')  # tree -> folder imports TensorFlow Datasets

import office_scale  # noqa: E402  (benchmarks/ is on sys.path: the Office-Home generator)

from dsbn_jax.datasets import tree  # noqa: E402

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_ARCHIVE_TOP = 'OfficeHomeDataset_10072016'  # the folder holding the domains in the real archive
_DROP_CACHES = '/proc/sys/vm/drop_caches'

# ----------------------------------------------------------------------------------------------
# The tree
# ----------------------------------------------------------------------------------------------


def _write_image(job) -> int:
  """Renders one `office_scale.office_home_jobs` image to its path (job[0]) unless it is there
  already (an interrupted generation resumes); via a hidden temporary file, so a file under its
  own name is always complete. Returns its size."""
  path = job[0]
  if not os.path.exists(path):
    data = office_scale.render(*job[1:])
    tmp = os.path.join(os.path.dirname(path), f'.{os.path.basename(path)}.{os.getpid()}.tmp')
    with open(tmp, 'wb') as f:
      f.write(data)
    os.replace(tmp, path)
  return os.path.getsize(path)


def generate(base: str, scale: float, workers: int, from_zip: str = '') -> dict:
  """The Office-Home-shaped tree under ``base/OfficeHomeDataset_10072016`` (generated once: a
  ``base.json`` beside it marks it complete). Returns what that file records. With `from_zip`
  (an ``OfficeHomeDataset_10072016.zip`` that `office_scale.py` generated at the same scale: the
  same generator, so the same bytes), the tree is extracted from it instead of rendered."""
  marker = base + '.json'
  if os.path.exists(marker):
    with open(marker) as f:
      return json.load(f) | {'reused': True}
  t0 = time.perf_counter()
  jobs = list(office_scale.office_home_jobs(scale))
  prefix = _ARCHIVE_TOP + '/'
  assert all(j[0].startswith(prefix) for j in jobs), jobs[0][0]
  if from_zip:
    return _extract(base, from_zip, [j[0] for j in jobs], t0)
  for name, data in office_scale._office_home_extras(jobs).items():
    os.makedirs(os.path.dirname(os.path.join(base, name)), exist_ok=True)
    with open(os.path.join(base, name), 'wb') as f:
      f.write(data)
  jobs = [(os.path.join(base, *j[0].split('/')), *j[1:]) for j in jobs]
  for d in sorted({os.path.dirname(j[0]) for j in jobs}):
    os.makedirs(d, exist_ok=True)
  n_bytes = 0
  with multiprocessing.Pool(workers) as pool:
    for i, size in enumerate(pool.imap_unordered(_write_image, jobs, chunksize=8)):
      n_bytes += size
      if (i + 1) % 1000 == 0 or i + 1 == len(jobs):
        rate = (i + 1) / (time.perf_counter() - t0)
        print(
          f'  generate: {i + 1}/{len(jobs)} images, {rate:.0f} img/s, ETA '
          f'{(len(jobs) - i - 1) / rate:.0f} s',
          flush=True,
        )
  return _write_marker(
    base,
    {
      'images': len(jobs),
      'image_bytes': n_bytes,
      'generate_s': round(time.perf_counter() - t0, 1),
      'workers': workers,
    },
  )


def _write_marker(base: str, out: dict) -> dict:
  marker = base + '.json'
  with open(marker + '.tmp', 'w') as f:
    json.dump(out, f, indent=2)
  os.replace(marker + '.tmp', marker)
  return out | {'reused': False}


def _extract(base: str, zip_path: str, names: list[str], t0: float) -> dict:
  """The tree from `office_scale.py`'s archive; its images must be exactly `names`."""
  if not os.path.isfile(zip_path):
    raise SystemExit(f'--from_zip: no file {zip_path}')
  with zipfile.ZipFile(zip_path) as z:
    members = {i.filename: i for i in z.infolist() if not i.is_dir()}
    images = [n for n in members if n.lower().endswith(('.jpg', '.png'))]
    if sorted(images) != sorted(names):
      raise SystemExit(
        f'{zip_path} holds {len(images)} images, not the {len(names)} of this --scale; '
        'generate instead (leave out --from_zip)'
      )
    print(f'  generate: extracting {len(members)} files from {zip_path}', flush=True)
    z.extractall(base)
  return _write_marker(
    base,
    {
      'images': len(images),
      'image_bytes': sum(members[n].file_size for n in images),
      'generate_s': round(time.perf_counter() - t0, 1),
      'extracted_from': os.path.abspath(zip_path),
    },
  )


# ----------------------------------------------------------------------------------------------
# Measurements
# ----------------------------------------------------------------------------------------------

_file_digest = tree.file_digest
_hashed = [0]


def _counting_file_digest(path: str) -> str:
  _hashed[0] += 1
  return _file_digest(path)


tree.file_digest = _counting_file_digest  # identify looks it up per call: counts files hashed


def _identify(root: str, cache_dir: str | None, clear_memo: bool = True) -> tuple[float, dict]:
  """Seconds of one `tree.identify` (a fresh process's state unless `clear_memo` is False)."""
  if clear_memo:
    tree._MEMO.clear()
  gc.collect()
  _hashed[0] = 0
  t0 = time.perf_counter()
  tree_id = tree.identify(root, cache_dir)
  seconds = time.perf_counter() - t0
  return seconds, {'hashed': _hashed[0], 'digest': tree_id.digest, 'files': len(tree_id.files)}


def _timed(fn) -> tuple[float, object]:
  gc.collect()
  t0 = time.perf_counter()
  r = fn()
  return time.perf_counter() - t0, r


def _bare_walk(root: str) -> tuple[int, int]:
  """(files, bytes) by os.scandir over root/<domain>/<class>/ and one os.stat per file."""
  n = n_bytes = 0
  with os.scandir(root) as domains:
    for d in domains:
      if not d.is_dir():
        continue
      with os.scandir(d.path) as classes:
        for c in classes:
          if not c.is_dir():
            continue
          with os.scandir(c.path) as files:
            for f in files:
              n += 1
              n_bytes += os.stat(f.path).st_size
  return n, n_bytes


def _listing_and_stats(root: str) -> list:
  return [tree._stat_key(p) for *_, p in tree._listing(root)[2]]


def _hash_all(paths: list[str], threads: int) -> int:
  if threads <= 1:
    return len([_file_digest(p) for p in paths])
  with concurrent.futures.ThreadPoolExecutor(threads) as pool:
    return len(list(pool.map(_file_digest, paths, chunksize=16)))


def _sha256_in_memory(n_bytes: int = 256 << 20) -> float:
  """MB/s of hashlib.sha256 over bytes already in memory (1 MiB updates, as file_digest reads)."""
  chunk = os.urandom(1 << 20)
  h = hashlib.sha256()
  t0 = time.perf_counter()
  for _ in range(n_bytes >> 20):
    h.update(chunk)
  return n_bytes / 1e6 / (time.perf_counter() - t0)


def _drop_page_cache() -> bool:
  """sync; echo 3 > /proc/sys/vm/drop_caches (page cache, dentries and inodes); False if refused."""
  try:
    os.sync()
    with open(_DROP_CACHES, 'w') as f:
      f.write('3\n')
    return True
  except OSError:
    return False


def _summary(seconds: list[float], **extra) -> dict:
  return {
    'median_s': round(statistics.median(seconds), 4),
    'min_s': round(min(seconds), 4),
    'max_s': round(max(seconds), 4),
    'seconds': [round(s, 4) for s in seconds],
  } | extra


def measure(root: str, work: str, repeats: int, cold: bool, total_bytes: int) -> dict:
  """Every case (see the module docstring); `work` holds the cache folders (removed after)."""
  cases, digests = {}, set()
  mb = total_bytes / 1e6

  def run_identify(name: str, cache_dirs, clear_memo: bool = True, before=None) -> None:
    seconds, hashed = [], []
    for k in range(repeats):
      if before:
        before(k)
      s, r = _identify(root, cache_dirs(k), clear_memo)
      seconds.append(s)
      hashed.append(r['hashed'])
      digests.add(r['digest'])
    cases[name] = _summary(seconds, files_hashed=hashed)
    if max(hashed):
      cases[name]['hash_MB_per_s'] = round(mb / statistics.median(seconds), 1)
    print(f'  {name}: median {cases[name]["median_s"]} s, files hashed {hashed}', flush=True)

  # Listing and stats alone.
  for name, fn in (
    ('listing alone (tree._listing)', lambda: tree._listing(root)),
    ('listing + os.stat per file (what every identify does)', lambda: _listing_and_stats(root)),
    ('bare os.scandir walk + os.stat per file', lambda: _bare_walk(root)),
  ):
    cases[name] = _summary([_timed(fn)[0] for _ in range(repeats)], files_hashed=[0] * repeats)
  # a. First start: a fresh, empty cache folder each time.
  fresh = lambda k: tempfile.mkdtemp(prefix='empty_', dir=work)
  run_identify('a. first start, empty cache', fresh)
  warm_cache = tempfile.mkdtemp(prefix='warm_', dir=work)
  _identify(root, warm_cache)
  cache_file = tree._cache_path(warm_cache, root)
  cache_bytes = os.path.getsize(cache_file)
  # b. A later start, nothing changed.
  run_identify('b. later start, cache hit', lambda k: warm_cache)
  # d. The memo hit: identify again in the same process.
  _identify(root, warm_cache)
  run_identify('d. same process again, memo hit', lambda k: warm_cache, clear_memo=False)
  # c. Every file touched (os.utime: mtime and ctime change, bytes do not).
  paths = [p for *_, p in tree._listing(root)[2]]
  touch_s = []

  def touch(k: int) -> None:
    t0 = time.perf_counter()
    now = time.time_ns()
    for p in paths:
      os.utime(p, ns=(now, now))
    touch_s.append(time.perf_counter() - t0)

  run_identify('c. after os.utime on every file, cache stale', lambda k: warm_cache, before=touch)
  assert len(digests) == 1, f'the digest changed: {digests}'
  # Components: the JSON cache, hashing alone.
  files = tree._read_cache(cache_file, root)
  assert len(files) == len(paths), (len(files), len(paths))
  spare = os.path.join(work, 'spare', 'cache.json')
  for name, fn in (
    ('JSON cache read (tree._read_cache)', lambda: tree._read_cache(cache_file, root)),
    ('JSON cache write (tree._write_cache)', lambda: tree._write_cache(spare, root, files)),
    ('hashing alone, 1 thread (tree.file_digest per file)', lambda: _hash_all(paths, 1)),
    (
      f'hashing alone, {os.cpu_count()} threads (not what identify does)',
      lambda: _hash_all(paths, os.cpu_count() or 1),
    ),
  ):
    seconds = [_timed(fn)[0] for _ in range(repeats)]
    hashing = name.startswith('hashing')
    cases[name] = _summary(seconds, files_hashed=[len(paths) if hashing else 0] * repeats)
    if hashing:
      cases[name]['hash_MB_per_s'] = round(mb / statistics.median(seconds), 1)
  out = {
    'cases': cases,
    'digest': digests.pop(),
    'cache_file_bytes': cache_bytes,
    'touch_all_s_median': round(statistics.median(touch_s), 4),
    'sha256_in_memory_MB_per_s': round(_sha256_in_memory(), 1),
  }
  # Cold page cache (last: it leaves the cache cold for anything after it).
  writable = os.access(_DROP_CACHES, os.W_OK)
  if cold and writable:
    dropped = 0
    for name, cache_dir in (
      ('a. first start, empty cache, cold page cache', tempfile.mkdtemp(dir=work)),
      ('b. later start, cache hit, cold page cache', warm_cache),
    ):
      if not _drop_page_cache():
        break
      dropped += 1
      s, r = _identify(root, cache_dir)
      assert r['digest'] == out['digest'], (r['digest'], out['digest'])
      cases[name] = _summary([s], files_hashed=[r['hashed']])
      if r['hashed']:
        cases[name]['hash_MB_per_s'] = round(mb / s, 1)
      print(f'  {name}: {s:.3f} s, files hashed {r["hashed"]}', flush=True)
    out['page_cache'] = (
      'warm page cache, plus one measurement of a and b each after dropping it'
      if dropped == 2
      else f'warm page cache ({_DROP_CACHES} refused the write: {dropped} cold measurements)'
    )
  elif cold:
    out['page_cache'] = f'warm page cache ({_DROP_CACHES} not writable: no cold measurement)'
  else:
    out['page_cache'] = 'warm page cache (--no_cold)'
  return out


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------


def _load_avg() -> list[float]:
  return [round(x, 2) for x in os.getloadavg()]


def _memory_gib() -> float | None:
  try:
    with open('/proc/meminfo') as f:
      return round(int(f.readline().split()[1]) / 2**20, 1)
  except (OSError, ValueError, IndexError):
    return None


def _file_system(path: str) -> str | None:
  """Type and device of the mount holding `path` (the longest mount point over it)."""
  try:
    with open('/proc/mounts') as f:
      mounts = [line.split() for line in f]
  except OSError:
    return None
  path = os.path.realpath(path)
  best = max(
    (m for m in mounts if path == m[1] or path.startswith(m[1].rstrip('/') + '/')),
    key=lambda m: len(m[1]),
    default=None,
  )
  return f'{best[2]} ({best[0]} on {best[1]})' if best else None


def estimate(results: dict, real_bytes: float) -> dict:
  """The hashing cases at the real images' total size: the generated JPEGs are larger than the
  real ones (fine grain compresses badly), and hashing time goes with the bytes. Estimate = the
  case's median minus its hashing share, plus that share scaled by real / generated bytes, with
  hashing alone (1 thread, warm) as the hashing share; cold: its MB/s."""
  cases, generated = results['cases'], results['tree']['bytes']
  hash_s = cases['hashing alone, 1 thread (tree.file_digest per file)']['median_s']
  out = {'real_bytes': real_bytes, 'generated_bytes': generated}
  for name, c in cases.items():
    if name[:2] not in ('a.', 'c.') or 'hash_MB_per_s' not in c:
      continue
    if 'cold' in name:
      out[name] = round(real_bytes / 1e6 / c['hash_MB_per_s'], 3)
    else:
      out[name] = round(c['median_s'] - hash_s + hash_s * real_bytes / generated, 3)
  return out


def table(results: dict) -> str:
  t = results['tree']
  rows = [
    f"Tree: {t['images']:,} images, {t['bytes'] / 1e6:,.1f} MB ({t['bytes'] / 2**30:.3f} GiB), "
    f"{t['domains']} domains, {t['classes']} classes, at {t['root']} (scale {t['scale']:g}); "
    f"{results['page_cache']}; {results['repeats']} repeats.",
    '',
    '| case | median s | min–max s | files hashed | hash MB/s |',
    '|---|---|---|---|---|',
  ]
  for name, c in results['cases'].items():
    hashed = sorted(set(c['files_hashed']))
    rows.append(
      f"| {name} | {c['median_s']:.4f} | {c['min_s']:.4f}–{c['max_s']:.4f} | "
      f"{'/'.join(str(h) for h in hashed)} | {c.get('hash_MB_per_s', '')} |"
    )
  m, e = results['machine'], results['estimate_at_real_size']
  rows += [
    '',
    f"Generated images hold {e['generated_bytes'] / e['real_bytes']:.1f}x the bytes of the real "
    f"ones (assumed {e['real_bytes'] / 1e6:,.0f} MB at this scale, --real_bytes); hashing scaled "
    'to that size (estimate, not measured): '
    + '; '.join(f'{k}: {v} s' for k, v in e.items() if k not in ('real_bytes', 'generated_bytes'))
    + '.',
    f"SHA-256 over bytes in memory: {results['sha256_in_memory_MB_per_s']} MB/s; JSON cache file: "
    f"{results['cache_file_bytes']:,} bytes; os.utime on every file: "
    f"{results['touch_all_s_median']} s; digest {results['digest'][:16]}... (the same in every "
    'case).',
    f"Machine: {m['cpus']} CPUs, load average {m['load_before']} before, {m['load_after']} after; "
    f"{m['platform']}; Python {m['python']}; {m['memory_gib']} GiB memory; file system "
    f"{m['file_system']}.",
    f"Command: `{results['command']}`",
  ]
  return '\n'.join(rows)


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument(
    '--root',
    default=os.path.join(_REPO, 'data', 'tree_digest'),
    help='the generated tree (kept and reused) and scratch cache folders',
  )
  p.add_argument(
    '--scale', type=float, default=1.0, help="fraction of every class's images (1.0: full size)"
  )
  p.add_argument('--workers', type=int, default=2, help='image generation processes')
  p.add_argument('--repeats', type=int, default=5)
  p.add_argument('--no_cold', action='store_true', help='never drop the page cache')
  p.add_argument(
    '--from_zip',
    default='',
    help="extract the tree from office_scale.py's OfficeHomeDataset_10072016.zip of the same "
    'scale (the same bytes; much faster than rendering) instead of rendering it',
  )
  p.add_argument(
    '--real_bytes',
    type=float,
    default=1.1e9,
    help='bytes of the 15,588 real Office-Home images, for the estimate at their size (scaled by '
    'the number of images)',
  )
  p.add_argument('--out', default=os.path.join(_REPO, 'benchmarks', 'results', 'tree_digest.json'))
  args = p.parse_args()
  command = (
    'python benchmarks/tree_digest.py ' + ' '.join(shlex.quote(a) for a in sys.argv[1:])
  ).strip()
  base = os.path.abspath(os.path.join(args.root, f'office_home_scale{args.scale:g}'))
  os.makedirs(os.path.dirname(base), exist_ok=True)
  print(f'tree: {base}', flush=True)
  generated = generate(base, args.scale, args.workers, args.from_zip)
  root = os.path.join(base, _ARCHIVE_TOP)
  domains, classes, images = tree._listing(root)
  n_files, n_bytes = _bare_walk(root)
  assert n_files == len(images) == generated['images'], (n_files, len(images), generated)
  print(f'tree: {n_files:,} files, {n_bytes:,} bytes ({n_bytes / 2**30:.3f} GiB)', flush=True)
  _hash_all([p for *_, p in images], 1)  # the page cache warm for every file (as after generating)
  load_before = _load_avg()
  work = tempfile.mkdtemp(prefix='caches_', dir=os.path.dirname(base))
  try:
    measured = measure(root, work, args.repeats, not args.no_cold, n_bytes)
  finally:
    shutil.rmtree(work, ignore_errors=True)
  results = {
    'command': command,
    'machine': {
      'cpus': os.cpu_count(),
      'load_before': load_before,
      'load_after': _load_avg(),
      'platform': platform.platform(),
      'python': platform.python_version(),
      'memory_gib': _memory_gib(),
      'file_system': _file_system(root),
    },
    'tree': {
      'root': root,
      'scale': args.scale,
      'images': n_files,
      'bytes': n_bytes,
      'domains': len(domains),
      'classes': len(classes),
      'generated': generated,
    },
    'repeats': args.repeats,
    **measured,
  }
  full = sum(office_scale.office.OFFICE_HOME_COUNTS.values())
  results['estimate_at_real_size'] = estimate(results, args.real_bytes * n_files / full)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out + '.tmp', 'w') as f:
    json.dump(results, f, indent=2)
  os.replace(args.out + '.tmp', args.out)
  print(table(results))
  print(f'figures: {args.out}')


if __name__ == '__main__':
  main()
