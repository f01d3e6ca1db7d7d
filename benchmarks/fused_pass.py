"""One backbone pass over both domains (``model.fused_pass=True``) vs the reference's two calls.

The same `alda_dsbn` (or `--method`) ResNet-50 train step, jitted on one device, built twice: with
the source and target batches through the backbone in one call over the 2B interleaved images, and
in two calls of B images. Timed repetitions alternate between the two (the order flips every
repetition) so that load from other processes hits both alike; reported: median images/s of each,
the ratio fused / two-call of the medians and the median of the per-repetition ratios, compile
times, and the loss of the first step (equal up to float rounding: the same maths; the loss after
the timed steps is not comparable: a random-init ResNet-50 stepping on one batch diverges, and
chaotically amplifies the rounding differences).

  python benchmarks/fused_pass.py [--batch 8 --image_size 224 --reps 5 --steps_per_rep 2
      --method alda_dsbn --dtype float32 --device cpu --out PATH]

Writes JSON to `--out` (default benchmarks/results/fused_pass_<device>_<batch>x<size>_<dtype>
.json) and prints a Markdown table row with the command.
"""

from __future__ import annotations

import argparse
import os
import shlex
import statistics
import sys

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--batch", type=int, default=8, help="images per domain per step")
  p.add_argument("--image_size", type=int, default=224, help="square input size (px)")
  p.add_argument("--reps", type=int, default=5, help="timed repetitions per variant")
  p.add_argument("--steps_per_rep", type=int, default=2, help="train steps per repetition")
  p.add_argument("--method", default="alda_dsbn", choices=("alda_dsbn", "alda", "dann"))
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
  p.add_argument("--num_classes", type=int, default=65)
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=None)
  args = p.parse_args(argv)
  if args.out is None:
    args.out = os.path.join(
      _REPO,
      "benchmarks",
      "results",
      f"fused_pass_{args.device}_{args.batch}x{args.image_size}_{args.dtype}.json",
    )
  return args


ARGS = parse_args()
if ARGS.device == "gpu":
  os.environ["JAX_PLATFORMS"] = "cuda"
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")

import json  # noqa: E402

import numpy as np  # noqa: E402
import step_throughput as st  # noqa: E402  (torch before TF; JaxSide, config and batch builders)


def main(args) -> dict:
  cmd = "python benchmarks/fused_pass.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
  bench_args = st.jax_bench_args(args)
  batch_np = st.host_batch(bench_args, np.random.default_rng(args.seed))
  load_start = os.getloadavg()
  configs = {}
  for name, fused in (("two_calls", False), ("fused", True)):
    configs[name] = st.make_config(bench_args)
    configs[name].method, configs[name].model.fused_pass = args.method, fused
  sides, first, first_loss = st.compiled_sides(bench_args, configs, batch_np)
  times = st.time_alternating(sides, args.reps, args.steps_per_rep)
  imgs = 2 * args.batch
  summary = {n: st.summarize(times[n], imgs, args.steps_per_rep) for n in sides}
  for n in sides:
    summary[n].update(
      first_call_s=round(first[n], 2),
      first_step_loss=first_loss[n],
      final_loss=sides[n].final_loss(),
      device_memory=sides[n].device_memory(),
    )
  paired = [t / f for t, f in zip(times["two_calls"], times["fused"])]
  result = {
    "command": cmd,
    "method": args.method,
    "config": {
      "batch_per_domain": args.batch,
      "image_size": args.image_size,
      "dtype": args.dtype,
      "device": args.device,
      "reps": args.reps,
      "steps_per_rep": args.steps_per_rep,
    },
    "machine": st.machine_info(bench_args),
    "load_average": {
      "start": [round(v, 2) for v in load_start],
      "end": [round(v, 2) for v in os.getloadavg()],
    },
    **summary,
    "speedup_fused_over_two_calls": round(
      summary["fused"]["median_images_per_s"] / summary["two_calls"]["median_images_per_s"], 3
    ),
    "speedup_paired_median": round(statistics.median(paired), 3),
  }
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)
  print(
    "\n| step | device | two calls img/s | fused img/s | fused / two calls | compile two / "
    "fused | load | command |\n|---|---|---|---|---|---|---|---|"
  )
  print(
    f"| {args.method} ResNet-50, {args.batch}+{args.batch} @ {args.image_size}, {args.dtype} "
    f"| {result['machine']['jax_device_kind']}, {os.cpu_count()} CPUs | "
    f"{summary['two_calls']['median_images_per_s']} | {summary['fused']['median_images_per_s']}"
    f" | {result['speedup_fused_over_two_calls']} (paired {result['speedup_paired_median']}) | "
    f"{first['two_calls']:.0f} / {first['fused']:.0f} s | {load_start[0]:.1f}-"
    f"{os.getloadavg()[0]:.1f} | `{cmd}` |"
  )
  return result


if __name__ == "__main__":
  main(ARGS)
