"""Office at full scale, rehearsed on generated data: archives, TFDS builds, input pipeline, main job.

The real Office-Home / Office-31 downloads cannot be fetched here, but their shape can be generated.
Stages (``--stages``, default all, in this order; each one is resumable: finished work is kept under
``--root`` and reused, and its figures are kept in ``<root>/results.json``):

  generate  full-size archives shaped like the real downloads (deterministic, seeded per image):
            ``OfficeHomeDataset_10072016.zip`` (Art 2,427 / Clipart 4,365 / Product 4,439 /
            "Real World" 4,357 images in the 65 class folders, plus the archive's ImageInfo.csv
            and imagelist.txt) and ``domain_adaptation_images.tar.gz`` (amazon 2,817 at 300x300,
            dslr 498 at 1000x1000, webcam 795 at about 640x480, in ``<domain>/images/<class>/``).
            Office-Home images: long side log-normal per domain (about 100 px to 4,500 px), aspect
            ratios from 1:4 to 4:1, mostly RGB JPEG, plus PNG (RGB, RGBA, palette), grayscale and
            CMYK JPEGs. Pixels: class-coloured shapes over smooth noise plus fine grain, so that
            decoding costs what a photo's would.
  build     both datasets through our TFDS builders from the manual directory holding the archive,
            as a user would (a fresh process each): wall time, peak RSS, disk size of the prepared
            dataset and of the extracted archive; the per-domain counts checked against the
            published ones.
  pipeline  the train input pipeline at the real settings (Office-Home Product -> Real_World, the
            two largest domains, 36 + 36 RandomResizedCrop 224 from the 256x256 resize, flip,
            normalise) with ``data.cache_resized`` on and off, and the 10-crop evaluation batches
            (32 images of 10 crops) of Real_World; each in a fresh process pinned to 1 and to 2
            cores (``os.sched_setaffinity``, set before TensorFlow starts): set-up time, images/s,
            peak RSS.
  main      ``python -m dsbn_jax.main --config=configs/officehome.py`` on a generated copy of
            Office-Home with ``--scale`` of the images of every class (all 65 classes kept), at the
            real batch (36 + 36 @ 224, ResNet-50 from a randomly initialised torchvision ResNet-50
            saved with ``torch.save``): an uninterrupted run of ``--steps`` steps (checkpoint every
            ``--steps // 2``) ending in one complete 10-crop evaluation of the target domain
            (Clipart), and the same run SIGKILLed as step ``--steps // 2 + 2`` starts and resumed
            with the same command; its final state must equal the uninterrupted one bit for bit.

  python benchmarks/office_scale.py [--root data/office_scale --stages generate,build,pipeline,main
      --scale 0.05 --steps 6 --workers 2]

Runs on a workstation (about an hour on 2 cores), not in CI. Needs the test extra (torch) for the
weights file. Prints a Markdown summary; figures go to ``<root>/results.json`` and
``benchmarks/results/office_scale.json``.
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import math
import multiprocessing
import os
import platform
import re
import shlex
import shutil
import subprocess
import sys
import tarfile
import time
import zipfile

import numpy as np
import PIL.Image
import PIL.ImageDraw

from dsbn_jax.datasets import office

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

OFFICE_HOME_ZIP = 'OfficeHomeDataset_10072016.zip'
OFFICE31_TAR = 'domain_adaptation_images.tar.gz'
# Folder names as distributed (the builders map "Real World" to the split Real_World).
OFFICE_HOME_FOLDERS = {
  'Art': 'Art',
  'Clipart': 'Clipart',
  'Product': 'Product',
  'Real_World': 'Real World',
}
# Long side (px) per Office-Home domain: log-normal (median, sigma), clipped to [96, 4500].
# Real World holds camera photos (the largest files); Clipart and Art are mostly web-sized.
_LONG_SIDE = {
  'Art': (700, 0.7),
  'Clipart': (500, 0.6),
  'Product': (900, 0.5),
  'Real_World': (1200, 0.6),
}
_LONG_SIDE_RANGE = (96, 4500)
# (probability, PIL mode, format) of an Office-Home file; the rest are RGB JPEGs.
_ODD_FORMATS = (
  (0.02, 'RGB', 'PNG'),
  (0.005, 'RGBA', 'PNG'),
  (0.005, 'P', 'PNG'),
  (0.01, 'L', 'JPEG'),
  (0.005, 'CMYK', 'JPEG'),
)
OFFICE31_SIZES = {'amazon': (300, 300), 'dslr': (1000, 1000), 'webcam': (640, 480)}
GOAL_IMAGES_PER_S = 2500  # the H200 train-step goal the input pipeline has to feed


# ----------------------------------------------------------------------------------------------
# Generation
# ----------------------------------------------------------------------------------------------


def _seed(*parts) -> int:
  return int.from_bytes(hashlib.sha256('/'.join(map(str, parts)).encode()).digest()[:8], 'little')


def class_counts(total: int, classes, seed: int, scale: float = 1.0) -> dict[str, int]:
  """Per-class image counts summing to `total` (uneven, as in the real sets); scaled: >= 1 each."""
  rng = np.random.default_rng(seed)
  weights = rng.uniform(0.5, 1.5, len(classes))
  counts = np.floor(weights / weights.sum() * total).astype(int)
  counts[np.argsort(-weights)[: total - counts.sum()]] += 1  # exact total
  return {c: max(1, round(n * scale)) if scale != 1.0 else int(n) for c, n in zip(classes, counts)}


def _office_home_spec(domain: str, seed: int) -> tuple[int, int, str, str]:
  """(width, height, PIL mode, format) of one generated Office-Home image."""
  rng = np.random.default_rng(seed)
  median, sigma = _LONG_SIDE[domain]
  long_side = int(np.clip(rng.lognormal(math.log(median), sigma), *_LONG_SIDE_RANGE))
  # Aspect w/h: mostly 3:4 .. 4:3, a few panoramas and tall images (1:4 .. 4:1).
  aspect = math.exp(
    rng.uniform(math.log(0.25), math.log(4.0))
    if rng.uniform() < 0.05
    else rng.uniform(math.log(0.75), math.log(4 / 3))
  )
  w, h = (long_side, long_side / aspect) if aspect >= 1 else (long_side * aspect, long_side)
  u, mode, fmt = rng.uniform(), 'RGB', 'JPEG'
  for p, m, f in _ODD_FORMATS:
    if u < p:
      mode, fmt = m, f
      break
    u -= p
  return max(int(w), 8), max(int(h), 8), mode, fmt


_GRAIN_TILE = 509  # px; a prime, so the tiling does not line up with JPEG's 8x8 blocks
_grain_tile: list = []


def _grain(width: int, height: int, seed: int) -> PIL.Image.Image:
  """Fine grain: one seeded noise tile, pasted at an offset per image (cheap at 20 MP)."""
  if not _grain_tile:
    noise = np.random.default_rng(12345).normal(128, 24, (_GRAIN_TILE, _GRAIN_TILE, 3))
    _grain_tile.append(PIL.Image.fromarray(np.clip(noise, 0, 255).astype(np.uint8)))
  tile, n = _grain_tile[0], _GRAIN_TILE
  out = PIL.Image.new('RGB', (width, height))
  dx, dy = seed % n, (seed // n) % n
  for x in range(-dx, width, n):
    for y in range(-dy, height, n):
      out.paste(tile, (x, y))
  return out


def render(class_index: int, seed: int, width: int, height: int, mode: str, fmt: str) -> bytes:
  """Encoded image: smooth noise, a class-coloured shape, fine grain; cheap, never constant."""
  rng = np.random.default_rng(seed)
  small = rng.integers(0, 256, (max(height // 32, 2), max(width // 32, 2), 3), dtype=np.uint8)
  img = PIL.Image.fromarray(small).resize((width, height), PIL.Image.BILINEAR)
  draw = PIL.ImageDraw.Draw(img)
  hue = (class_index * 47) % 256
  colour = (hue, (hue * 3 + 85) % 256, (255 - hue) % 256)
  x0, y0 = rng.uniform(0, 0.4, 2)
  x1, y1 = rng.uniform(0.6, 1.0, 2)
  box = (int(x0 * width), int(y0 * height), int(x1 * width), int(y1 * height))
  (draw.ellipse if class_index % 2 else draw.rectangle)(box, fill=colour)
  img = PIL.Image.blend(img, _grain(width, height, seed), 0.12)
  out = io.BytesIO()
  img.convert(mode).save(
    out, format=fmt, **({'quality': int(rng.integers(75, 96))} if fmt == 'JPEG' else {})
  )
  return out.getvalue()


def _render_job(job):
  return job[0], render(*job[1:])


def office_home_jobs(scale: float):
  """(archive path, class index, seed, w, h, mode, fmt) of every Office-Home image, in order."""
  classes = office.OFFICE_HOME_CLASSES
  for split, folder in OFFICE_HOME_FOLDERS.items():
    counts = class_counts(office.OFFICE_HOME_COUNTS[split], classes, _seed('oh', split), scale)
    for k, c in enumerate(classes):
      for i in range(counts[c]):
        seed = _seed('oh', split, c, i)
        w, h, mode, fmt = _office_home_spec(split, seed)
        ext = '.png' if fmt == 'PNG' else '.jpg'
        yield (
          f'OfficeHomeDataset_10072016/{folder}/{c}/{i + 1:05d}{ext}',
          k,
          seed,
          w,
          h,
          mode,
          fmt,
        )


def office31_jobs():
  classes = office.OFFICE31_CLASSES
  for domain, total in office.OFFICE31_COUNTS.items():
    counts = class_counts(total, classes, _seed('o31', domain))
    for k, c in enumerate(classes):
      for i in range(counts[c]):
        seed = _seed('o31', domain, c, i)
        w, h = OFFICE31_SIZES[domain]
        if domain == 'webcam':  # "640x480-ish": a few other webcam modes
          w, h = ((640, 480), (640, 480), (640, 480), (600, 450), (704, 528))[seed % 5]
        yield f'{domain}/images/{c}/frame_{i + 1:04d}.jpg', k, seed, w, h, 'RGB', 'JPEG'


def _write_archive(path: str, jobs, workers: int, extra: dict[str, bytes]) -> dict:
  """Renders `jobs` on `workers` processes into a zip or tar.gz at `path` (via a .tmp file)."""
  t0 = time.perf_counter()
  tmp = path + '.tmp'
  jobs = list(jobs)
  n_bytes, formats = 0, {}
  is_zip = path.endswith('.zip')
  archive = (
    zipfile.ZipFile(tmp, 'w', zipfile.ZIP_DEFLATED, compresslevel=1)
    if is_zip
    else tarfile.open(tmp, 'w:gz', compresslevel=1)
  )

  def add(name: str, data: bytes) -> None:
    if is_zip:
      archive.writestr(zipfile.ZipInfo(name, date_time=(2016, 10, 7, 0, 0, 0)), data)
    else:
      info = tarfile.TarInfo(name)
      info.size, info.mtime = len(data), 1476000000
      archive.addfile(info, io.BytesIO(data))

  with archive, multiprocessing.Pool(workers) as pool:
    for name, data in extra.items():
      add(name, data)
    for i, (name, data) in enumerate(pool.imap(_render_job, jobs, chunksize=8)):
      add(name, data)
      n_bytes += len(data)
      ext = os.path.splitext(name)[1]
      formats[ext] = formats.get(ext, 0) + 1
      if (i + 1) % 1000 == 0 or i + 1 == len(jobs):
        rate = (i + 1) / (time.perf_counter() - t0)
        print(
          f'  {os.path.basename(path)}: {i + 1}/{len(jobs)} images, {rate:.0f} img/s, ETA '
          f'{(len(jobs) - i - 1) / rate:.0f} s',
          flush=True,
        )
  os.replace(tmp, path)
  pixels = [j[3] * j[4] for j in jobs]
  modes = {}
  for j in jobs:
    modes[f'{j[6]} {j[5]}'] = modes.get(f'{j[6]} {j[5]}', 0) + 1
  return {
    'archive': path,
    'images': len(jobs),
    'image_bytes': n_bytes,
    'archive_bytes': os.path.getsize(path),
    'seconds': round(time.perf_counter() - t0, 1),
    'megapixels_median': round(float(np.median(pixels)) / 1e6, 3),
    'megapixels_max': round(max(pixels) / 1e6, 2),
    'long_side_px_min_max': [
      min(max(j[3], j[4]) for j in jobs),
      max(max(j[3], j[4]) for j in jobs),
    ],
    'formats': modes,
  }


def _office_home_extras(jobs) -> dict[str, bytes]:
  """The real archive's two listing files beside the domain folders (the builder ignores them)."""
  rows = ['Folder,File,Width,Height'] + [f'{j[0].split("/", 1)[1]},{j[3]},{j[4]}' for j in jobs]
  return {
    'OfficeHomeDataset_10072016/ImageInfo.csv': '\n'.join(rows).encode(),
    'OfficeHomeDataset_10072016/imagelist.txt': '\n'.join(
      j[0].split('/', 1)[1] for j in jobs
    ).encode(),
  }


def generate(manual_root: str, scale: float, workers: int, office31: bool = True) -> dict:
  out = {}
  oh_dir = os.path.join(manual_root, 'office_home')
  os.makedirs(oh_dir, exist_ok=True)
  jobs = list(office_home_jobs(scale))
  out['office_home'] = _write_archive(
    os.path.join(oh_dir, OFFICE_HOME_ZIP), jobs, workers, _office_home_extras(jobs)
  )
  if office31:
    o31_dir = os.path.join(manual_root, 'office31')
    os.makedirs(o31_dir, exist_ok=True)
    out['office31'] = _write_archive(
      os.path.join(o31_dir, OFFICE31_TAR), office31_jobs(), workers, {}
    )
  return out


# ----------------------------------------------------------------------------------------------
# Child processes: a fresh interpreter per measurement (peak RSS, CPU affinity, clean TF state)
# ----------------------------------------------------------------------------------------------


def _run_child(
  args: list[str], cores: int | None = None, env: dict | None = None, log: str | None = None
) -> tuple[dict | None, dict]:
  """Runs this script's hidden sub-command; returns (its JSON result, {seconds, peak_rss_mib})."""
  cmd = [sys.executable, os.path.abspath(__file__), *args]
  if cores:
    cmd = [
      sys.executable,
      '-c',
      'import os,runpy,sys; os.sched_setaffinity(0, set(range('
      f'{cores}))); sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name="__main__")',
      *cmd[1:],
    ]
  t0 = time.perf_counter()
  with open(log or os.devnull, 'w') as f:
    proc = subprocess.Popen(
      cmd, stdout=subprocess.PIPE, stderr=f, text=True, env={**os.environ, **(env or {})}
    )
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
  stats = {
    'seconds': round(time.perf_counter() - t0, 1),
    'peak_rss_mib': round(usage.ru_maxrss / 1024),
  }
  if os.waitstatus_to_exitcode(status) != 0:
    raise SystemExit(
      f'{" ".join(args)} failed (exit {os.waitstatus_to_exitcode(status)}); see {log}'
    )
  result = json.loads(out.strip().splitlines()[-1]) if out.strip() else None
  return result, stats


def _data_config(dataset: str, manual_dir: str, data_dir: str):
  from dsbn_jax import config_defaults  # pylint: disable=g-import-not-at-top

  data = config_defaults.get_data_config(dataset)
  data.manual_dir, data.data_dir = manual_dir, data_dir
  return data


def _child_build(dataset: str, manual_dir: str, data_dir: str) -> dict:
  from dsbn_jax.datasets import catalog  # pylint: disable=g-import-not-at-top

  data = _data_config(dataset, manual_dir, data_dir)
  builder = catalog.get_builder(data, '')
  return {
    'splits': {k: v.num_examples for k, v in builder.info.splits.items()},
    'classes': len(builder.info.features['label'].names),
  }


def _rss_mib() -> float:
  with open('/proc/self/status') as f:
    return int(re.search(r'VmRSS:\s+(\d+)', f.read()).group(1)) / 1024


def _child_pipeline(kind: str, manual_dir: str, data_dir: str, cache: bool, steps: int) -> dict:
  from dsbn_jax import input_pipeline  # pylint: disable=g-import-not-at-top

  data = _data_config('office_home', manual_dir, data_dir)
  data.source, data.target, data.cache_resized = 'Product', 'Real_World', cache
  rss0 = _rss_mib()
  t0 = time.perf_counter()
  if kind == 'train':
    batch = 36
    it = input_pipeline.make_train_iterator(
      data, global_batch_size=batch, seed=0, process_index=0, process_count=1
    )
    images_per_batch = 2 * batch
  else:
    data.target = 'Real_World'
    it = iter(input_pipeline.make_eval_data(data, process_index=0, process_count=1))
    images_per_batch = data.eval_batch_size
  first = next(it)
  t1 = time.perf_counter()
  for _ in range(2):  # warm-up past the first batches
    next(it)
  t2 = time.perf_counter()
  for _ in range(steps):
    b = next(it)
  t3 = time.perf_counter()
  shape = (b['source']['image'] if kind == 'train' else b['image']).shape
  del first
  return {
    'cpus_affine': len(os.sched_getaffinity(0)),
    'first_batch_s': round(t1 - t0, 1),
    'images_per_s': round(steps * images_per_batch / (t3 - t2), 1),
    'batches_timed': steps,
    'batch_shape': list(shape),
    'rss_after_setup_mib': round(_rss_mib()),
    'rss_before_mib': round(rss0),
  }


# ----------------------------------------------------------------------------------------------
# The main job
# ----------------------------------------------------------------------------------------------


def _main_job(
  workdir: str,
  manual_dir: str,
  data_dir: str,
  weights: str,
  steps: int,
  log: str,
  env: dict | None = None,
) -> dict:
  """`python -m dsbn_jax.main --config=configs/officehome.py` with timestamps per output line."""
  ckpt = max(steps // 2, 1)
  cmd = [
    sys.executable,
    '-m',
    'dsbn_jax.main',
    '--config=configs/officehome.py',
    f'--workdir={workdir}',
    f'--config.data.manual_dir={manual_dir}',
    f'--config.data.data_dir={data_dir}',
    f'--config.model.pretrained_path={weights}',
    f'--config.total_steps={steps}',
    f'--config.checkpoint_every_steps={ckpt}',
    f'--config.eval_every_steps={steps}',
    '--config.log_every_steps=1',
  ]
  t0 = time.perf_counter()
  lines = []
  with open(log, 'a') as f:
    proc = subprocess.Popen(
      cmd,
      cwd=_REPO,
      stdout=subprocess.PIPE,
      stderr=subprocess.STDOUT,
      text=True,
      env={**os.environ, **(env or {})},
    )
    for line in proc.stdout:
      t = time.perf_counter() - t0
      lines.append((t, line.rstrip()))
      f.write(f'[{t:8.1f}s] {line}')
      f.flush()
      print(f'    [{t:7.1f}s] {line.rstrip()}'[:160], flush=True)
    _, status, usage = os.wait4(proc.pid, 0)
  step_times = {
    int(m.group(1)): t for t, line in lines if (m := re.match(r'step (\d+)/\d+ ', line))
  }
  return {
    'command': ' '.join(shlex.quote(c) for c in cmd[2:]),
    'lines': lines,
    'exit': os.waitstatus_to_exitcode(status),
    'seconds': round(time.perf_counter() - t0, 1),
    'peak_rss_mib': round(usage.ru_maxrss / 1024),
    'step_times': step_times,
  }


def _state_arrays(workdir: str):
  import jax  # pylint: disable=g-import-not-at-top

  from dsbn_jax import predict  # pylint: disable=g-import-not-at-top

  _, class_names, step, state = predict.read_run(workdir)
  return class_names, step, jax.tree_util.tree_leaves_with_path(state)


def compare_runs(a: str, b: str) -> dict:
  """Bitwise comparison of two workdirs' final checkpoints and their evaluations."""
  _, step_a, leaves_a = _state_arrays(a)
  _, step_b, leaves_b = _state_arrays(b)
  differ = [
    jax_path
    for (jax_path, x), (_, y) in zip(leaves_a, leaves_b)
    if np.asarray(x).tobytes() != np.asarray(y).tobytes()
  ]
  ra, rb = (json.load(open(os.path.join(w, 'results.json'))) for w in (a, b))
  keys = ('evals', 'per_class_accuracy', 'confusion_matrix', 'last_accuracy')
  return {
    'steps': [step_a, step_b],
    'arrays': len(leaves_a),
    'arrays_differing': [str(p) for p in differ[:5]],
    'num_differing': len(differ),
    'results_equal': all(ra[k] == rb[k] for k in keys),
  }


def main_stage(root: str, scale: float, steps: int, workers: int, results: dict) -> dict:
  tag = f'scale{scale:g}'
  manual = os.path.join(root, tag, 'manual')
  data_dir = os.path.join(root, tag, 'tfds')
  out = results.get('main', {})
  if out.get('scale') != scale:  # another scale: nothing of the old one applies
    out = {'scale': scale}
  if not os.path.exists(os.path.join(manual, 'office_home', OFFICE_HOME_ZIP)):
    print(f'main: generating Office-Home at scale {scale:g}', flush=True)
    out['generate'] = generate(manual, scale, workers, office31=False)['office_home']
  if 'build' not in out:
    print('main: building the scaled Office-Home', flush=True)
    r, stats = _run_child(
      ['_build', 'office_home', os.path.join(manual, 'office_home'), data_dir],
      log=os.path.join(root, f'{tag}_build.log'),
    )
    out['build'] = r | stats
  weights = os.path.join(root, 'resnet50-random-torchvision.pth')
  if not os.path.exists(weights):  # a fresh interpreter: torch next to TensorFlow can crash
    code = (
      'import sys, torch, torchvision; torch.manual_seed(0); '
      'torch.save(torchvision.models.resnet50(weights=None).state_dict(), sys.argv[1]); '
      'print(torch.__version__, torchvision.__version__)'
    )
    versions = subprocess.run(
      [sys.executable, '-c', code, weights], check=True, capture_output=True, text=True
    ).stdout.split()
    out['weights'] = {
      'path': weights,
      'bytes': os.path.getsize(weights),
      'torch': versions[0],
      'torchvision': versions[1],
    }
  runs = os.path.join(root, tag, 'runs')
  if os.path.exists(runs):  # the runs are cheap to redo relative to their meaning: always fresh
    shutil.rmtree(runs)
  os.makedirs(runs)
  common = (os.path.join(manual, 'office_home'), data_dir, weights, steps)
  print('main: the uninterrupted run', flush=True)
  a = _main_job(os.path.join(runs, 'uninterrupted'), *common, log=os.path.join(runs, 'a.log'))
  kill_at = max(steps // 2, 1) + 2 if steps >= 4 else steps - 1
  print(
    f'main: the same run, SIGKILLed as step {kill_at} starts, then the same command again',
    flush=True,
  )
  b1 = _main_job(
    os.path.join(runs, 'killed'),
    *common,
    log=os.path.join(runs, 'b.log'),
    env={'DSBN_JAX_KILL_AT_STEP': str(kill_at - 1)},
  )  # the hook counts from 0
  b2 = _main_job(os.path.join(runs, 'killed'), *common, log=os.path.join(runs, 'b.log'))
  res = json.load(open(os.path.join(runs, 'uninterrupted', 'results.json')))
  rows = [json.loads(line) for line in open(os.path.join(runs, 'uninterrupted', 'metrics.jsonl'))]
  eval_s = [r['eval/seconds'] for r in rows if 'eval/seconds' in r]
  times = a['step_times']
  timed = sorted(s for s in times if s >= 2)
  s_per_step = (times[timed[-1]] - times[timed[0]]) / (timed[-1] - timed[0])
  out.update(
    {
      'command': a['command'],
      'uninterrupted_exit': a['exit'],
      'killed_exit': b1['exit'],
      'resumed_exit': b2['exit'],
      'resumed_from': next((line for _, line in b2['lines'] if 'resumed from' in line), None),
      'start_line': next((line for _, line in a['lines'] if line.startswith('dsbn_jax:')), None),
      'first_step_s_incl_setup_and_compile': round(times[min(times)], 1),
      'seconds_per_step': round(s_per_step, 2),
      'steps_per_s': round(1 / s_per_step, 4),
      'train_images_per_s': round(72 / s_per_step, 2),
      'eval_seconds': round(eval_s[-1], 1),
      'eval_images': res['num_target_images'],
      'eval_images_per_s': round(res['num_target_images'] / eval_s[-1], 2),
      'full_clipart_eval_estimate_s': round(
        office.OFFICE_HOME_COUNTS['Clipart'] / (res['num_target_images'] / eval_s[-1])
      ),
      'peak_rss_mib': {
        'uninterrupted': a['peak_rss_mib'],
        'killed': b1['peak_rss_mib'],
        'resumed': b2['peak_rss_mib'],
      },
      'wall_s': {'uninterrupted': a['seconds'], 'killed': b1['seconds'], 'resumed': b2['seconds']},
      'results_classes': len(res['per_class_accuracy']),
      'results_classes_null': sum(v is None for v in res['per_class_accuracy'].values()),
      'last_accuracy': res['last_accuracy'],
      'kill_at_step': kill_at,
      'resumed_equals_uninterrupted': compare_runs(
        os.path.join(runs, 'uninterrupted'), os.path.join(runs, 'killed')
      ),
    }
  )
  return out


# ----------------------------------------------------------------------------------------------
# Driver
# ----------------------------------------------------------------------------------------------


def _du(path: str) -> int:
  return sum(
    os.path.getsize(os.path.join(d, f))
    for d, _, fs in os.walk(path)
    for f in fs
    if not os.path.islink(os.path.join(d, f))
  )


def _save(root: str, results: dict) -> None:
  for path in (
    os.path.join(root, 'results.json'),
    os.path.join(_REPO, 'benchmarks', 'results', 'office_scale.json'),
  ):
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + '.tmp', 'w') as f:
      json.dump(results, f, indent=2)
    os.replace(path + '.tmp', path)


def _load_avg() -> str:
  return '/'.join(f'{x:.1f}' for x in os.getloadavg())


def run(args) -> dict:
  root = os.path.abspath(args.root)
  os.makedirs(root, exist_ok=True)
  path = os.path.join(root, 'results.json')
  results = json.load(open(path)) if os.path.exists(path) else {}
  results['machine'] = {
    'cpus': os.cpu_count(),
    'platform': platform.platform(),
    'python': platform.python_version(),
  }
  stages = args.stages.split(',')
  manual, data_dir = os.path.join(root, 'full', 'manual'), os.path.join(root, 'full', 'tfds')
  t_all = time.perf_counter()
  if 'generate' in stages and 'generate' not in results:
    print('generate: full-size archives', flush=True)
    results['generate'] = generate(manual, 1.0, args.workers) | {'load_after': _load_avg()}
    _save(root, results)
  if 'build' in stages:
    builds = results.setdefault('build', {})
    for dataset in ('office_home', 'office31'):
      if dataset in builds:
        continue
      print(f'build: {dataset} through the TFDS builder', flush=True)
      downloads = os.path.join(data_dir, 'downloads')
      r, stats = _run_child(
        ['_build', dataset, os.path.join(manual, dataset), data_dir],
        log=os.path.join(root, f'build_{dataset}.log'),
      )
      published = office.OFFICE_HOME_COUNTS if dataset == 'office_home' else office.OFFICE31_COUNTS
      builds[dataset] = (
        r
        | stats
        | {
          'counts_match_published': r['splits'] == published,
          'prepared_bytes': _du(os.path.join(data_dir, dataset)),
          'extracted_bytes_left': _du(downloads),  # kept by TFDS after the build
          'load_after': _load_avg(),
        }
      )
      _save(root, results)
  if 'pipeline' in stages:
    pipe = results.setdefault('pipeline', {})
    for kind, cache in (('train', True), ('train', False), ('eval', False)):
      for cores in (1, 2):
        key = f'{kind}_cache{int(cache)}_cores{cores}' if kind == 'train' else f'eval_cores{cores}'
        if key in pipe:
          continue
        print(f'pipeline: {key}', flush=True)
        steps = args.pipeline_batches
        r, stats = _run_child(
          [
            '_pipeline',
            kind,
            os.path.join(manual, 'office_home'),
            data_dir,
            str(int(cache)),
            str(steps),
          ],
          cores=cores,
          log=os.path.join(root, f'pipeline_{key}.log'),
        )
        pipe[key] = r | stats | {'load_after': _load_avg()}
        print(f'  {pipe[key]}', flush=True)
        _save(root, results)
  if 'main' in stages:
    results['main'] = main_stage(root, args.scale, args.steps, args.workers, results)
    results['main']['load_after'] = _load_avg()
    _save(root, results)
  results.setdefault('wall_s', {})[','.join(stages)] = round(time.perf_counter() - t_all, 1)
  _save(root, results)
  return results


def _gib(n: float) -> str:
  return f'{n / 2**30:.2f}'


def summary(results: dict) -> str:
  """BENCHMARKS.md's tables, from the figures in results.json (nothing typed in by hand)."""
  out = []
  gen = {k: v for k, v in results.get('generate', {}).items() if isinstance(v, dict)}
  if gen:
    out += [
      '| generated archive | images | archive GiB | megapixels median / max | long side px | '
      'formats | seconds |',
      '|---|---|---|---|---|---|---|',
    ]
    for name, g in gen.items():
      formats = ', '.join(f'{k} {v}' for k, v in sorted(g['formats'].items(), key=lambda x: -x[1]))
      out.append(
        f"| {os.path.basename(g['archive'])} | {g['images']} | {_gib(g['archive_bytes'])}"
        f" | {g['megapixels_median']} / {g['megapixels_max']} | "
        f"{g['long_side_px_min_max'][0]}-{g['long_side_px_min_max'][1]} | {formats} | "
        f"{g['seconds']} |"
      )
    out.append('')
  out += [
    '| build (TFDS builder, fresh process) | wall s | peak RSS MiB | prepared GiB | '
    'extracted copy left GiB | images per split | = published counts | load after |',
    '|---|---|---|---|---|---|---|---|',
  ]
  for key, title in (('build_before_extracted_copy_removal', 'before the fix'), ('build', '')):
    for name, b in results.get(key, {}).items():
      left = b.get('extracted_bytes_left', b.get('extracted_bytes'))
      out.append(
        f"| {name}{' (' + title + ')' if title else ''} | {b['seconds']} | "
        f"{b['peak_rss_mib']} | {_gib(b['prepared_bytes'])} | {_gib(left)} | "
        f"{b['splits']} | {b['counts_match_published']} | {b['load_after']} |"
      )
  out.append('')
  for key, title in (('pipeline_before_memory_fix', ' (before the memory fix)'), ('pipeline', '')):
    pipe = results.get(key, {})
    if not pipe:
      continue
    out += [
      f'| input pipeline, Product -> Real_World{title} | cores | img/s | img/s per core | first batch s | RSS after '
      'set-up MiB | peak RSS MiB | load after |',
      '|---|---|---|---|---|---|---|---|',
    ]
    for k, p in pipe.items():
      cores = p['cpus_affine']
      what = (
        k.rsplit('_cores', 1)[0]
        .replace('train_cache1', 'train 36+36, cache_resized=True')
        .replace('train_cache0', 'train 36+36, cache_resized=False')
        .replace('eval', '10-crop eval, 32 images')
      )
      out.append(
        f"| {what} | {cores} | {p['images_per_s']} | {p['images_per_s'] / cores:.1f} | "
        f"{p['first_batch_s']} | {p['rss_after_setup_mib']} | {p['peak_rss_mib']} | "
        f"{p['load_after']} |"
      )
    for kind in ('train_cache1', 'train_cache0', 'eval'):
      one, two = pipe.get(f'{kind}_cores1'), pipe.get(f'{kind}_cores2')
      if one and two:
        out.append(
          f'\n{kind}{title}: {GOAL_IMAGES_PER_S} img/s needs '
          f"{math.ceil(GOAL_IMAGES_PER_S / one['images_per_s'])} cores at the 1-core rate; "
          f"2 cores give {two['images_per_s'] / one['images_per_s']:.2f}x the 1-core rate"
        )
    out.append('')
  m = results.get('main', {})
  if 'seconds_per_step' in m:
    eq = m['resumed_equals_uninterrupted']
    out += [
      '| main job (scaled Office-Home) | value |',
      '|---|---|',
      f"| command | `python -m {m['command']}` |",
      f"| start-up line | `{m['start_line']}` |",
      f"| scale, images | {m['scale']} of every class: {m['build']['splits']} |",
      f"| first step (set-up, cache, compile) | {m['first_step_s_incl_setup_and_compile']} s |",
      f"| train step, 36 + 36 @ 224 | {m['seconds_per_step']} s ({m['steps_per_s']} steps/s, "
      f"{m['train_images_per_s']} img/s) |",
      f"| 10-crop evaluation of the target | {m['eval_images']} images in {m['eval_seconds']}"
      f" s ({m['eval_images_per_s']} img/s); the full Clipart (4,365) would take about "
      f"{m['full_clipart_eval_estimate_s'] / 60:.0f} min |",
      f"| peak RSS | {m['peak_rss_mib']} MiB |",
      f"| results.json | {m['results_classes']} classes ({m['results_classes_null']} null), "
      f"last accuracy {m['last_accuracy']:.2f} % |",
      f"| kill -9 as step {m['kill_at_step']} starts, then the same command | exits "
      f"{m['killed_exit']} then {m['resumed_exit']}; `{m['resumed_from']}`; final state "
      f"{eq['num_differing']} of {eq['arrays']} arrays differ, evaluations equal: "
      f"{eq['results_equal']} |",
      f"| wall, uninterrupted / killed / resumed | {m['wall_s']} s |",
      '',
    ]
  out.append(f"Wall time per invocation (stages: seconds): {results.get('wall_s')}")
  return '\n'.join(out)


def main() -> None:
  if len(sys.argv) > 1 and sys.argv[1].startswith('_'):  # a child process (see _run_child)
    kind, rest = sys.argv[1], sys.argv[2:]
    os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')
    if kind == '_build':
      r = _child_build(*rest)
    else:
      r = _child_pipeline(rest[0], rest[1], rest[2], bool(int(rest[3])), int(rest[4]))
    print(json.dumps(r))
    return
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument(
    '--root',
    default=os.path.join(_REPO, 'data', 'office_scale'),
    help='generated archives, prepared datasets and runs (kept between runs)',
  )
  p.add_argument('--stages', default='generate,build,pipeline,main')
  p.add_argument(
    '--scale',
    type=float,
    default=0.05,
    help='main job: fraction of every class\'s images (all 65 classes kept)',
  )
  p.add_argument('--steps', type=int, default=6, help='main job: train steps')
  p.add_argument('--pipeline_batches', type=int, default=10, help='timed batches per measurement')
  p.add_argument('--workers', type=int, default=os.cpu_count(), help='image generation processes')
  p.add_argument('--report', action='store_true', help='print the tables of <root>/results.json')
  args = p.parse_args()
  if args.report:
    print(summary(json.load(open(os.path.join(os.path.abspath(args.root), 'results.json')))))
    return
  results = run(args)
  results['command'] = 'python benchmarks/office_scale.py ' + ' '.join(
    shlex.quote(a) for a in sys.argv[1:]
  )
  _save(os.path.abspath(args.root), results)
  print(summary(results))


if __name__ == '__main__':
  main()
