"""The train step of every method beside ALDA's: CPU time per step, side by side (issue 23).

The same ResNet-50 step (``train_step.train_step`` jitted on one device by
``sharding.jit_train_step``), one per method and BN (``--methods``, config.method names; ``alda``
first, the yardstick), on one synthetic batch of ``--batch`` + ``--batch`` images at
``--image_size``. Timed repetitions rotate the order of the methods every repetition, so that load
from other processes hits every method alike. Reported per method: the median step time and
images/s, the ratio of its median step time to ALDA's, its compile (first call) time, and its
first step's loss. A method's own extra work (CDAN's multilinear map into a K*F-wide
discriminator, MADA's K discriminators, JAN's kernels, BNM's SVD) is part of its step.

  python benchmarks/method_steps.py [--batch 8 --image_size 224 --reps 5 --steps_per_rep 2
      --methods alda,dann,cdan,cdan_e,jan,mada,mcc,bnm --dtype float32 --device cpu --out PATH]

Writes JSON to ``--out`` (default benchmarks/results/method_steps_<device>_<batch>x<size>.json)
and prints a Markdown table with the command.
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import sys

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
METHODS = "alda,dann,cdan,cdan_e,jan,mada,mcc,bnm"


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--batch", type=int, default=8, help="images per domain per step")
  p.add_argument("--image_size", type=int, default=224, help="square input size (px)")
  p.add_argument("--reps", type=int, default=5, help="timed repetitions per method")
  p.add_argument("--steps_per_rep", type=int, default=2, help="train steps per repetition")
  p.add_argument("--methods", default=METHODS, help="config.method names; the first is the base")
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
  p.add_argument("--num_classes", type=int, default=65)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=None)
  args = p.parse_args(argv)
  if args.out is None:
    name = f"method_steps_{args.device}_{args.batch}x{args.image_size}.json"
    args.out = os.path.join(_REPO, "benchmarks", "results", name)
  return args


ARGS = parse_args()
if ARGS.device == "gpu":
  os.environ["JAX_PLATFORMS"] = "cuda"
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import numpy as np  # noqa: E402
import step_throughput as st  # noqa: E402  (JaxSide, config and batch builders)


def main(args) -> dict:
  cmd = "python benchmarks/method_steps.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
  bench_args = st.jax_bench_args(args)
  batch_np = st.host_batch(bench_args, np.random.default_rng(args.seed))
  load_start = os.getloadavg()
  configs = {}
  for method in args.methods.split(","):
    configs[method] = st.make_config(bench_args)
    configs[method].method = method
  sides, first, first_loss = st.compiled_sides(bench_args, configs, batch_np)
  times = st.time_alternating(sides, args.reps, args.steps_per_rep)
  summary = {m: st.summarize(times[m], 2 * args.batch, args.steps_per_rep) for m in sides}
  base = next(iter(sides))
  for m in sides:
    summary[m].update(
      first_call_s=round(first[m], 2),
      first_step_loss=first_loss[m],
      step_time_over_base=round(summary[m]["median_step_s"] / summary[base]["median_step_s"], 3),
    )
  result = {
    "command": cmd,
    "base": base,
    "config": {
      "batch_per_domain": args.batch,
      "image_size": args.image_size,
      "dtype": args.dtype,
      "device": args.device,
      "num_classes": args.num_classes,
      "reps": args.reps,
      "steps_per_rep": args.steps_per_rep,
    },
    "machine": st.machine_info(bench_args),
    "load_average": {
      "start": [round(v, 2) for v in load_start],
      "end": [round(v, 2) for v in os.getloadavg()],
    },
    "methods": summary,
  }
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)
  print(
    f"\n`{cmd}` ({result['machine']['jax_device_kind']}, {os.cpu_count()} CPUs, load "
    f"{load_start[0]:.1f}-{os.getloadavg()[0]:.1f})\n"
  )
  print(f"| method | median step s | img/s | step time / {base} | compile s | first loss |")
  print("|---|---|---|---|---|---|")
  for m, r in summary.items():
    print(
      f"| {m} | {r['median_step_s']} | {r['median_images_per_s']} | "
      f"{r['step_time_over_base']} | {r['first_call_s']:.0f} | {r['first_step_loss']:.4f} |"
    )
  return result


if __name__ == "__main__":
  main(ARGS)
