"""Train input-pipeline throughput (images/s) over generated Office-sized JPEGs.

Writes a two-domain ``root/<domain>/<class>/*.jpg`` tree of 500x375 JPEGs (Office images are about
that size), builds it with the custom-dataset builder, then times `make_train_iterator` with the
Office data config (decode -> 256x256 resize -> RandomResizedCrop 224 -> flip -> normalise), source
and target batches of `--batch` each, with data.cache_resized on (decode + resize once, then crops
only; the default) and off (full decode every time). Images/s counts both domains. Prints one
Markdown table row per mode with the command, and writes the figures to `--json`
(default benchmarks/results/input_pipeline.json).

  python benchmarks/input_pipeline.py [--images_per_domain 240 --batch 36 --steps 30 --warmup 5]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import sys
import tempfile
import time

import numpy as np
import PIL.Image

from dsbn_jax import config_defaults, input_pipeline

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

WIDTH, HEIGHT = 500, 375  # px, a typical Office-31 amazon / Office-Home image


def write_jpegs(root: str, images_per_domain: int, classes: int = 12) -> None:
  """Smooth random colour JPEGs (quality 90), a realistic decode cost, in two domains."""
  rng = np.random.default_rng(0)
  for domain in ('source', 'target'):
    for i in range(images_per_domain):
      class_dir = os.path.join(root, domain, f'class_{i % classes:02d}')
      os.makedirs(class_dir, exist_ok=True)
      small = rng.integers(0, 256, (HEIGHT // 8, WIDTH // 8, 3), dtype=np.uint8)
      img = PIL.Image.fromarray(small).resize((WIDTH, HEIGHT), PIL.Image.BICUBIC)
      img.save(os.path.join(class_dir, f'{i:05d}.jpg'), quality=90)


def measure(data, batch: int, steps: int, warmup: int) -> dict:
  """Seconds and images/s of `steps` train batches after `warmup` ones (and the set-up time)."""
  t0 = time.perf_counter()
  it = input_pipeline.make_train_iterator(
    data, global_batch_size=batch, seed=0, process_index=0, process_count=1
  )
  for _ in range(warmup):
    next(it)
  t1 = time.perf_counter()
  for _ in range(steps):
    b = next(it)
  seconds = time.perf_counter() - t1
  assert b['source']['image'].shape == (batch, data.crop_size, data.crop_size, 3)
  return {
    'setup_and_warmup_s': round(t1 - t0, 2),
    'seconds': round(seconds, 2),
    'images_per_s': round(2 * batch * steps / seconds, 1),
    'steps_per_s': round(steps / seconds, 2),
  }


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument('--images_per_domain', type=int, default=240)
  p.add_argument('--batch', type=int, default=36, help='images per domain per step')
  p.add_argument('--steps', type=int, default=30)
  p.add_argument('--warmup', type=int, default=5)
  p.add_argument('--json', default=os.path.join(_REPO, 'benchmarks/results/input_pipeline.json'))
  args = p.parse_args()
  cmd = (
    'python benchmarks/input_pipeline.py ' + ' '.join(shlex.quote(a) for a in sys.argv[1:])
  ).strip()
  common = {
    'command': cmd,
    'cpus': os.cpu_count(),
    'machine': platform.machine(),
    'image_size': f'{WIDTH}x{HEIGHT} JPEG',
    'images_per_domain': args.images_per_domain,
    'batch_per_domain': args.batch,
  }
  results = []
  with tempfile.TemporaryDirectory() as tmp:
    write_jpegs(os.path.join(tmp, 'tree'), args.images_per_domain)
    data = config_defaults.get_data_config('custom')
    data.manual_dir, data.data_dir = os.path.join(tmp, 'tree'), os.path.join(tmp, 'tfds')
    data.source, data.target = 'source', 'target'
    for cache in (True, False):
      data.cache_resized = cache
      results.append(
        common | {'cache_resized': cache} | measure(data, args.batch, args.steps, args.warmup)
      )
  os.makedirs(os.path.dirname(args.json), exist_ok=True)
  with open(args.json, 'w') as f:
    json.dump(results, f, indent=2)
  for r in results:
    print(
      f"| train input pipeline, {WIDTH}x{HEIGHT} JPEG -> 224, batch {args.batch}+{args.batch}, "
      f"cache_resized={r['cache_resized']} | {r['images_per_s']} img/s (set-up "
      f"{r['setup_and_warmup_s']} s) | {r['cpus']} CPUs | `{cmd}` |"
    )


if __name__ == '__main__':
  main()
