"""Digits <-> Digits-M accuracy table: every method with shared BN and with DSBN, and a target-only oracle.

Every (method, direction, seed) is one real ``python -m dsbn_jax.main --config=configs/digits.py``
run (the command a user types), in ``<workdir>/<method>/<source>-<target>/seed<k>`` (the layout of
``dsbn_jax.sweep``), ``--jobs`` of them at a time. A run is single-threaded (XLA's Eigen pool off):
the small CNN's step does not use a second core (6.3 vs 7.5 steps/s measured with 1 and 2 cores),
so two one-core runs side by side finish the table in about half the time. Re-running the command
resumes an interrupted table: a finished run only re-evaluates its final checkpoint (seconds), an
interrupted one resumes from its checkpoint, and a workdir of another configuration (after an edit
of ``configs/digits.py``, say) fails that run with the workdir guard's one-line error.

The target-only oracle is ``source_only`` trained on the labelled target train split
(``--config.data.source=<target>``) and evaluated on the same held-out target test split as the
others; it is stored as method ``target_only`` under the adaptation task it bounds.

Outputs in ``<workdir>``: ``results.md`` (best and last target accuracy, mean ± std over seeds;
then the label-free model-selection tables, one per validator: docs/model_selection.md),
``summary.json``, ``results.png`` (bar plot), ``selection.png`` (each validator's pick beside best
and last), ``benchmark.json`` (the command, wall time, load). The validator table of BENCHMARKS.md
(a converged budget, evaluated every 50 steps, with a held-out source split):

  python benchmarks/accuracy_digits.py --workdir runs/selection_digits --no_oracle \
      --methods source_only,dann,alda,alda_dsbn --set total_steps=5000 --set eval_every_steps=50 --set checkpoint_every_steps=1000 \
      --set data.source_val_fraction=0.2

Hyper-parameters are those of ``configs/digits.py``. They were chosen without the target test
split: ``--eval_split=train`` evaluates every run on the target images adapted on, by their labels
(the transductive protocol of the reference's Office evaluation), never on the held-out test digits;
BENCHMARKS.md lists the candidates tried that way.

The comparison table of BENCHMARKS.md (issue 23: every method x BN, 102 runs, no oracle; the
results.md then ends with DSBN minus shared BN per method, paired by seed):

  python benchmarks/accuracy_digits.py --workdir runs/methods_digits --no_oracle \
      --set total_steps=5000 --set eval_every_steps=50 --set checkpoint_every_steps=1000 \
      --set data.source_val_fraction=0.2

  python benchmarks/accuracy_digits.py [--workdir runs/accuracy_digits] [--seeds 0,1,2]
      [--methods source_only,dann,alda,alda_dsbn] [--directions digits->digits_m,digits_m->digits]
      [--no_oracle] [--jobs 2] [--eval_split train] [--set optim.lr0=0.03 --set ...]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from dsbn_jax import methods, sweep  # noqa: E402  (light: no JAX/TF import until a run starts)

# Every method of the registry with shared BN and with DSBN (source_only: shared BN only), by
# display name: source_only, dann, dann_dsbn, alda, alda_dsbn, cdan, cdan_dsbn, ...
METHODS = tuple(
  name
  for method, spec in methods.METHODS.items()
  for name in (method, *((method + methods.DSBN_SUFFIX,) if spec.uses_target else ()))
)
DIRECTIONS = ("digits->digits_m", "digits_m->digits")
ORACLE = "target_only"


def _runs(args) -> list[tuple[str, str, int, list[str]]]:
  """(method label, task, seed, config overrides) of every run, oracle last."""
  runs = []
  for task in args.directions:
    source, target = task.split("->")
    for method in args.methods:
      for seed in args.seeds:
        runs.append(
          (method, task, seed, [f"--config.method={method}", f"--config.data.source={source}"])
        )
    if args.oracle:
      for seed in args.seeds:
        runs.append(
          (ORACLE, task, seed, ["--config.method=source_only", f"--config.data.source={target}"])
        )
  out = []
  for label, task, seed, overrides in runs:
    target = task.split("->")[1]
    overrides += [f"--config.data.target={target}", f"--config.seed={seed}"]
    if args.eval_split:
      overrides.append(f"--config.data.eval_split={args.eval_split}")
    overrides += [f"--config.{s}" for s in args.set]
    out.append((label, task, seed, overrides))
  return out


def _env(cache_dir: str) -> dict:
  env = dict(os.environ)
  flags = env.get("XLA_FLAGS", "")
  if "xla_cpu_multi_thread_eigen" not in flags:
    env["XLA_FLAGS"] = (flags + " --xla_cpu_multi_thread_eigen=false").strip()
  env.setdefault("JAX_PLATFORMS", "cpu")
  env.setdefault("JAX_COMPILATION_CACHE_DIR", cache_dir)  # seeds of one method share a compile
  return env


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--workdir", default="runs/accuracy_digits")
  parser.add_argument("--seeds", default="0,1,2", type=lambda s: [int(x) for x in s.split(",")])
  parser.add_argument("--methods", default=",".join(METHODS), type=lambda s: s.split(","))
  parser.add_argument("--directions", default=",".join(DIRECTIONS), type=lambda s: s.split(","))
  parser.add_argument("--no_oracle", dest="oracle", action="store_false")
  parser.add_argument(
    "--jobs",
    type=int,
    default=min(2, os.cpu_count() or 1),
    help="runs side by side (one CPU core each)",
  )
  parser.add_argument(
    "--eval_split",
    default="",
    help="'train': evaluate on the target train split (hyper-parameter search)",
  )
  parser.add_argument(
    "--set",
    action="append",
    default=[],
    help="extra config override without '--config.', e.g. optim.lr0=0.03",
  )
  args = parser.parse_args()

  root = os.path.abspath(args.workdir)
  os.makedirs(os.path.join(root, "logs"), exist_ok=True)
  env = _env(os.path.join(root, "jax_cache"))
  pending = [
    (label, task, seed, overrides, sweep.run_dir(root, label, task, seed))
    for label, task, seed, overrides in _runs(args)
  ]
  total, t0, load0 = len(pending), time.time(), os.getloadavg()
  print(f"{total} runs to do, {args.jobs} at a time; logs in {root}/logs", flush=True)
  running, failed, done = [], [], 0
  while pending or running:
    while pending and len(running) < args.jobs:
      label, task, seed, overrides, workdir = pending.pop(0)
      cmd = [
        sys.executable,
        "-m",
        "dsbn_jax.main",
        "--config=configs/digits.py",
        f"--workdir={workdir}",
        *overrides,
      ]
      log = os.path.join(root, "logs", f"{label}_{task.replace('->', '-')}_seed{seed}.log")
      with open(log, "w", encoding="utf-8") as f:
        f.write(shlex.join(cmd) + "\n")
        f.flush()
        proc = subprocess.Popen(cmd, cwd=_REPO, env=env, stdout=f, stderr=subprocess.STDOUT)
      running.append((proc, label, task, seed, workdir, log, time.time()))
    time.sleep(1.0)
    for item in list(running):
      proc, label, task, seed, workdir, log, started = item
      if proc.poll() is None:
        continue
      running.remove(item)
      done += 1
      elapsed = time.time() - t0
      if proc.returncode != 0:
        failed.append(log)
        print(
          f"[{done}/{total}] {label} {task} seed {seed}: FAILED ({proc.returncode}), see {log}",
          flush=True,
        )
        continue
      with open(os.path.join(workdir, "results.json"), encoding="utf-8") as f:
        r = json.load(f)
      eta = elapsed / done * (total - done)
      print(
        f"[{done}/{total}] {label} {task} seed {seed}: best {r['best_accuracy']:.1f} last "
        f"{r['last_accuracy']:.1f} ({time.time() - started:.0f} s); elapsed {elapsed / 60:.1f} "
        f"min, ETA {eta / 60:.1f} min",
        flush=True,
      )
  wall = time.time() - t0
  methods = list(args.methods) + ([ORACLE] if args.oracle else [])
  out = sweep.write_summary(root, list(args.directions), methods, args.seeds)
  bench = {
    "command": shlex.join([sys.executable.split(os.sep)[-1]] + sys.argv),
    "runs_done": total,
    "failed": failed,
    "wall_time_s": wall,
    "jobs": args.jobs,
    "load_avg_before": load0,
    "load_avg_after": os.getloadavg(),
    "cpu_count": os.cpu_count(),
    "machine": platform.processor() or platform.machine(),
    "eval_split": args.eval_split or "test",
    "overrides": args.set,
  }
  with open(os.path.join(root, "benchmark.json"), "w", encoding="utf-8") as f:
    json.dump(bench, f, indent=2)
  print("\n" + out["markdown"])
  print(
    f"{total} runs in {wall / 60:.1f} min ({args.jobs} at a time); table {root}/results.md, "
    f"plot {root}/results.png",
    flush=True,
  )
  if failed:
    sys.exit(f"{len(failed)} runs failed: {failed}")


if __name__ == "__main__":
  main()
