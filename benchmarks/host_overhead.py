"""Host CPU per train step and per evaluated image: the work outside the jitted computations.

What the host must do for every step -- the train input pipeline (crop, flip, normalise), the
gather, the host-to-device staging (``sharding.prefetch_to_global``), the Python loop with its
jit dispatches, finite-check and logs -- measured in the real loop (``train.train_and_evaluate``)
at the Office settings (``configs/custom.py`` on a generated ``root/<domain>/<class>/*.jpg`` tree
of 500x375 JPEGs: 256x256 resize cached, RandomResizedCrop 224, flip, 36 + 36 images per step,
a ResNet-50 state, 10-crop evaluation in batches of 32 images), with the device work taken out:

- the train step is replaced by one that reads one pixel of each batch and returns the state with
  its step count advanced and the real step's metrics (the same names and shapes), jitted by
  ``sharding.jit_train_step`` with the real shardings and donation: its dispatch is the real one
  (the whole ResNet-50 state goes in and out), its compute is nothing;
- the eval step likewise: outputs of the real shapes (probabilities over the classes, 512-d
  features) from one pixel per image; the validators then score them on the host as always.

Each measurement is a fresh process pinned to ``--cores`` cores (``os.sched_setaffinity`` before
TensorFlow and JAX start, as ``office_scale.py`` does). Train: after ``--warmup`` steps, the
process CPU time (``time.process_time``: every thread, the input pipeline's included) and the
main thread's (``time.thread_time``: the loop, which no core can share) over ``--steps`` steps,
the device synchronised at both ends; divided by the steps. The ceiling this host can feed is
``cores / CPU per image``, and never more than ``1 / main-thread CPU per image``; the rate measured
in the window (device work nothing) is printed beside it; so is the step's dispatch alone (the
fake step called on a copy of the state after the window, no pipeline), a part of the train
figure. Evaluation: the one at the end of the run (``train._Run.run_eval``), per evaluated image
the pass over the images (``evaluation.evaluate``: the 10-crop input pipeline, the transfers, the
outputs read back, the confusion matrix) -- the second of two passes: the first traces and
compiles the eval step, once per run, and is reported apart (``first_pass_cpu_s``) -- and apart,
per evaluation, the rest of ``run_eval`` (the validators' scores, the best checkpoint written, the
metrics row).

  python benchmarks/host_overhead.py [--root data/host_overhead --images_per_domain 360
      --classes 12 --warmup 20 --steps 100 --cores 1,2 --train_inputs host,device,resident
      --json benchmarks/results/host_overhead.json]

``data.train_input`` 'device' and 'resident' (``device_augment``) move the crop, flip and
normalisation into the jitted step; the fake step then skips that device work too (it reads one
value of each array the host sent), so the figures are the host's part only: gathering the uint8
rows (or only their numbers), the draws, the staging and the loop. The evaluation takes its crops
on the device in every mode (the cached uint8 images cross; the fake eval step reads one pixel).

``--tiny`` replaces ResNet-50 by a one-block ResNet of width 8 (a quick check of the script: the
state's dispatch is then cheaper than the real one). Prints Markdown table rows with the command;
writes the figures to ``--json``.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time

import numpy as np
import PIL.Image

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
WIDTH, HEIGHT = 500, 375  # px, a typical Office-31 amazon / Office-Home image
BATCH = 36  # images per domain per step (the reference's)


def write_tree(root: str, images_per_domain: int, classes: int) -> None:
  """Smooth random colour JPEGs (quality 90) in ``root/{source,target}/class_XX/``."""
  rng = np.random.default_rng(0)
  for domain in ("source", "target"):
    for i in range(images_per_domain):
      class_dir = os.path.join(root, domain, f"class_{i % classes:02d}")
      os.makedirs(class_dir, exist_ok=True)
      small = rng.integers(0, 256, (HEIGHT // 8, WIDTH // 8, 3), dtype=np.uint8)
      img = PIL.Image.fromarray(small).resize((WIDTH, HEIGHT), PIL.Image.BICUBIC)
      img.save(os.path.join(class_dir, f"{i:05d}.jpg"), quality=90)


def _config(a: dict):
  from dsbn_jax import config_defaults  # pylint: disable=g-import-not-at-top

  config = config_defaults.get_config("custom")
  d = config.data
  d.manual_dir, d.data_dir, d.source, d.target = a["tree"], a["tfds"], "source", "target"
  config.batch_size = BATCH
  config.model.pretrained_path = ""  # random init: the weights' values do not matter here
  if a["tiny"]:
    config.model.backbone, config.model.stage_sizes, config.model.num_filters = "resnet", (1,), 8
  config.data.train_input = a.get("train_input", "host")
  config.total_steps = a["warmup"] + a["steps"] + 1
  config.eval_every_steps = config.checkpoint_every_steps = config.total_steps  # at the end only
  return config


def _clocks() -> tuple[float, float, float]:
  return time.perf_counter(), time.process_time(), time.thread_time()


def _child_prepare(a: dict) -> dict:
  from dsbn_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  from dsbn_jax.datasets import catalog  # pylint: disable=g-import-not-at-top

  t0 = time.perf_counter()
  data = _config(a).data
  info = catalog.get_data_info(data)
  prepare_s = time.perf_counter() - t0
  input_pipeline.resident_images(data)  # the resized caches every measured run then reads
  input_pipeline.make_eval_data(data, crops_on_device=True, process_index=0, process_count=1)
  return {
    "prepare_s": round(prepare_s, 1),
    "cache_s": round(time.perf_counter() - t0 - prepare_s, 1),
    "classes": info.num_classes,
  }


def _child_measure(a: dict) -> dict:
  """One run in this (pinned) process: the train window and the final evaluation."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top

  from dsbn_jax import (  # pylint: disable=g-import-not-at-top
    compile_cache,
    device_augment,
    evaluation,
    sharding,
    train,
  )
  from dsbn_jax import train_step as train_step_lib  # pylint: disable=g-import-not-at-top

  compile_cache.enable()
  config = _config(a)
  real_eval_step, real_jit_train_step = evaluation.eval_step, sharding.jit_train_step

  def fake_train_step(state, batch, rng, *, cfg):
    real = functools.partial(train_step_lib.train_step, cfg=cfg)
    _, shapes = jax.eval_shape(real, state, batch, rng)  # the real metrics' names and shapes
    touch = (batch["source"]["image"][0, 0, 0, 0] + batch["target"]["image"][0, 0, 0, 0]) * 0
    metrics = {k: jnp.zeros(s.shape, s.dtype) + touch.astype(s.dtype) for k, s in shapes.items()}
    return state.replace(step=state.step + 1), metrics

  def fake_eval_step(state, batch, *, cfg, domain=None):
    real = functools.partial(real_eval_step, cfg=cfg, domain=domain)
    shapes = jax.eval_shape(real, state, batch)
    images = batch["image"]
    x = images[(slice(None),) + (0,) * (images.ndim - 1)]  # one value per image
    k, d = shapes["probs"].shape[1], shapes["features"].shape[1]
    probs = jax.nn.softmax(x[:, None] * jnp.arange(k, dtype=jnp.float32), axis=-1)
    pred = jnp.argmax(probs, axis=-1).astype(jnp.int32)
    mask = batch["mask"].astype(jnp.bool_)
    return {
      "probs": probs,
      "features": x[:, None] + jnp.arange(d, dtype=jnp.float32),
      "pred": pred,
      "label": batch["label"],
      "mask": mask,
      "num_correct": jnp.sum((pred == batch["label"]) & mask, dtype=jnp.int32),
      "num_valid": jnp.sum(mask, dtype=jnp.int32),
    }

  def fake_train_batch(batch, data, images=None):
    """The device input's (packed) batch as the step's, without the augmentation's device work:
    one value of each array the host sent, broadcast (XLA computes only what the fake step
    reads)."""
    size, out = data.crop_size or data.resize_size, {}
    for name, part in batch.items():
      draws = part["draws"]  # device_augment.pack's columns
      one = draws[0, 0].astype(jnp.float32)
      if "image" in part:
        one = one + part["image"].reshape(-1)[0]
      if images is not None:
        one = one + images[name][0, 0, 0, 0]
      column = device_augment.DRAWS.index
      out[name] = {
        "image": jnp.broadcast_to(one, (draws.shape[0], size, size, 3)),
        "label": draws[:, column("label")],
        "mask": draws[:, column("mask")].astype(bool),
      }
    return out

  sharding.jit_train_step = lambda mesh, cfg, step_fn=None, **kw: real_jit_train_step(
    mesh, cfg, step_fn=fake_train_step, **kw
  )
  device_augment.train_batch = fake_train_batch
  evaluation.eval_step = fake_eval_step

  w0, w1 = a["warmup"], a["warmup"] + a["steps"]
  marks, last_batch, out = {}, {}, {}
  real_to_global, real_tick = sharding.to_global, train._CpuEstimate.tick

  def to_global(batch, mesh):
    last_batch["value"] = real_to_global(batch, mesh)
    return last_batch["value"]

  def tick(self, done, metrics):  # after every step of the real loop
    real_tick(self, done, metrics)
    if done in (w0, w1):
      jax.block_until_ready(metrics)
      marks[done] = _clocks()
    if done == w1:  # the step's dispatch alone: the run's jitted fake step on a copy of the state
      run, reps = self.run, 30
      state = sharding.replicate(jax.device_get(run.state), run.mesh)  # a copy: donated below
      watched = sharding.replicate(train_step_lib.empty_watch(), run.mesh)
      args = (last_batch["value"], run.step_rng, *run.step_args)
      state, watched, m = run.train_fn(state, watched, *args)
      jax.block_until_ready(m)
      t = _clocks()
      for _ in range(reps):
        state, watched, m = run.train_fn(state, watched, *args)
      jax.block_until_ready(m)
      out["dispatch_cpu_ms"] = (_clocks()[1] - t[1]) * 1e3 / reps

  evals, passes = [], []
  real_run_eval, real_evaluate = train._Run.run_eval, evaluation.evaluate

  def run_eval(self, step):
    t = _clocks()
    result = real_run_eval(self, step)
    evals.append((t, _clocks(), result["num_images"]))
    return result

  def evaluate(*args, **kwargs):
    w = _clocks()  # a first, unmeasured pass: it traces and compiles the eval step (a run's
    real_evaluate(*args, **kwargs)  # first evaluation only), which is not per-image host work
    t = _clocks()
    result = real_evaluate(*args, **kwargs)
    passes.append((t, _clocks(), result["num_images"], t[1] - w[1]))
    return result

  sharding.to_global, train._CpuEstimate.tick = to_global, tick
  train._Run.run_eval, evaluation.evaluate = run_eval, evaluate
  t0 = time.perf_counter()
  train.train_and_evaluate(config, a["workdir"])
  run_s = time.perf_counter() - t0

  (p0, c0, m0), (p1, c1, m1) = marks[w0], marks[w1]
  steps, images = a["steps"], a["steps"] * 2 * BATCH
  cpu_ms, main_ms = (c1 - c0) * 1e3 / steps, (m1 - m0) * 1e3 / steps
  cores = len(os.sched_getaffinity(0))
  (e0, e1, n_eval), (q0, q1, _, warm_cpu) = evals[-1], passes[-1]
  return {
    "cores": cores,
    "train_input": config.data.train_input,
    "platform": jax.devices()[0].platform,
    "backbone": config.model.backbone,
    "train": {
      "steps": steps,
      "cpu_ms_per_step": round(cpu_ms, 2),
      "main_thread_ms_per_step": round(main_ms, 2),
      "dispatch_cpu_ms_per_step": round(out["dispatch_cpu_ms"], 2),
      "cpu_ms_per_image": round(cpu_ms / (2 * BATCH), 3),
      "ceiling_images_per_s": round(min(cores * 2 * BATCH / cpu_ms, 2 * BATCH / main_ms) * 1e3, 1),
      "measured_images_per_s": round(images / (p1 - p0), 1),
    },
    "eval": {
      "images": n_eval,
      "crops_per_image": 10 if config.data.eval_mode == "10crop" else 1,
      "pass_cpu_ms_per_image": round((q1[1] - q0[1]) * 1e3 / n_eval, 3),
      "pass_main_thread_ms_per_image": round((q1[2] - q0[2]) * 1e3 / n_eval, 3),
      "pass_images_per_s": round(n_eval / (q1[0] - q0[0]), 1),
      "rest_cpu_s": round((e1[1] - e0[1]) - (q1[1] - q0[1]) - warm_cpu, 2),
      "first_pass_cpu_s": round(warm_cpu, 2),
    },
    "run_s": round(run_s, 1),
  }


def _run_child(kind: str, a: dict, cores: int | None, log: str) -> dict:
  """This script's hidden sub-command ``kind`` in a fresh interpreter (pinned to ``cores``)."""
  argv = [os.path.abspath(__file__), kind, json.dumps(a)]
  code = (
    "import runpy, sys; sys.argv = sys.argv[1:]; runpy.run_path(sys.argv[0], run_name='__main__')"
  )
  if cores:
    code = f"import os; os.sched_setaffinity(0, set(range({cores}))); {code}"
  env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": _REPO}
  with open(log, "w") as f:
    proc = subprocess.run(
      [sys.executable, "-c", code, *argv], stdout=subprocess.PIPE, stderr=f, text=True, env=env
    )
  if proc.returncode != 0:
    raise SystemExit(f"{kind} (cores {cores}) failed (exit {proc.returncode}); see {log}")
  return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> None:
  if len(sys.argv) > 2 and sys.argv[1].startswith("_"):  # a child process (see _run_child)
    a = json.loads(sys.argv[2])
    result = {"_prepare": _child_prepare, "_measure": _child_measure}[sys.argv[1]](a)
    print(json.dumps(result), flush=True)
    return
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--root", default=os.path.join(_REPO, "data", "host_overhead"))
  p.add_argument("--images_per_domain", type=int, default=360)
  p.add_argument("--classes", type=int, default=12)
  p.add_argument("--warmup", type=int, default=20, help="steps before the window")
  p.add_argument("--steps", type=int, default=100, help="steps in the window")
  p.add_argument("--cores", default="1,2", help="core counts, one fresh process each")
  p.add_argument("--tiny", action="store_true", help="a one-block ResNet instead of ResNet-50")
  p.add_argument(
    "--train_inputs",
    default="host,device,resident",
    help="data.train_input values, one fresh process per value and core count",
  )
  p.add_argument(
    "--json", default=os.path.join(_REPO, "benchmarks", "results", "host_overhead.json")
  )
  args = p.parse_args()
  command = shlex.join([".venv/bin/python", "benchmarks/host_overhead.py", *sys.argv[1:]])
  root = os.path.abspath(args.root)
  tree = os.path.join(root, f"tree_{args.images_per_domain}x{args.classes}")
  if not os.path.isdir(tree):
    write_tree(tree + ".tmp", args.images_per_domain, args.classes)
    os.replace(tree + ".tmp", tree)
  a = {
    "tree": tree,
    "tfds": os.path.join(root, "tfds"),
    "tiny": args.tiny,
    "warmup": args.warmup,
    "steps": args.steps,
  }
  prepared = _run_child("_prepare", a, None, os.path.join(root, "prepare.log"))
  results = []
  for train_input in args.train_inputs.split(","):
    for cores in [int(c) for c in args.cores.split(",")]:
      workdir = os.path.join(root, "runs", f"{train_input}_{cores}core")
      shutil.rmtree(workdir, ignore_errors=True)
      log = os.path.join(root, f"measure_{train_input}_{cores}core.log")
      b = {**a, "workdir": workdir, "train_input": train_input}
      results.append(_run_child("_measure", b, cores, log))
  print(f"\n`{command}` ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)\n")
  print(
    "| data.train_input | cores | train: host CPU ms/step (main thread; step dispatch) | "
    "ceiling img/s | measured img/s | eval: host CPU ms/image, 10-crop pass (main thread) | "
    "eval pass img/s | rest of an evaluation: CPU s |"
  )
  print("|---|---|---|---|---|---|---|---|")
  for r in results:
    t, e = r["train"], r["eval"]
    print(
      f"| {r['train_input']} | {r['cores']} | {t['cpu_ms_per_step']} "
      f"({t['main_thread_ms_per_step']}; "
      f"{t['dispatch_cpu_ms_per_step']}) | {t['ceiling_images_per_s']} | "
      f"{t['measured_images_per_s']} | {e['pass_cpu_ms_per_image']} "
      f"({e['pass_main_thread_ms_per_image']}) | {e['pass_images_per_s']} | {e['rest_cpu_s']} |"
    )
  os.makedirs(os.path.dirname(os.path.abspath(args.json)), exist_ok=True)
  with open(args.json, "w", encoding="utf-8") as f:
    json.dump({"command": command, "prepare": prepared, "results": results}, f, indent=1)
    f.write("\n")


if __name__ == "__main__":
  main()
