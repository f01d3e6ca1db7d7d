"""Where the ResNet-50 step's time goes, JAX vs PyTorch: forward and forward+backward of the backbone.

The full-step benchmark (`step_throughput.py`) compares the whole `alda_dsbn` step; this one splits
the backbone's share to locate a gap:

- `fwd`: the DSBN ResNet-50 backbone in train mode (batch statistics, running-stat update) on one
  domain batch of `--batch` images, features summed to a scalar;
- `fwd+bwd`: the same plus the gradient of that scalar w.r.t. every parameter (JAX: `jax.grad`
  under `jit`; PyTorch: `.backward()`, eager, oneDNN convolutions on CPU).

Each configuration runs a warm-up (JAX's first call, which compiles, is timed separately), then
`--reps` repetitions of `--steps` calls, alternating JAX and PyTorch; reported are the medians in
images/s and the JAX/PyTorch ratios, and the achieved GFLOP/s of both (XLA's cost analysis counts the
floating-point operations of one call; the same count is used for PyTorch's identical computation). The head, the discriminator and the optimizer update are what
remains of the full step (`step_throughput.py` minus twice `fwd+bwd`, one call per domain).

XLA's CPU backend takes flags from the environment, so alternatives are compared by running the
script under different `XLA_FLAGS` (the JSON records them), e.g.
`XLA_FLAGS=--xla_cpu_use_onednn=true`; `--jax_step` times only our whole JAX step (the `JaxSide`
of `step_throughput.py`, `--batch` images per domain) for that comparison, without PyTorch. `--trace_dir DIR` additionally writes a `jax.profiler`
trace of two JAX `fwd+bwd` calls (open with TensorBoard's profile plugin or Perfetto); the
optimised HLO comes from `XLA_FLAGS=--xla_dump_to=DIR`.

  python benchmarks/step_breakdown.py [--batch 16 --image_size 224 --reps 3 --steps 1
      --torch_threads 0 --trace_dir DIR --out PATH]
  XLA_FLAGS=... python benchmarks/step_breakdown.py --jax_step --batch 8 --image_size 224
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import statistics
import sys
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _REPO)  # for tests.torch_reference, the PyTorch reference step (not installed)

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402  (before TF/JAX: see tests/conftest.py)

from dsbn_jax.models import resnet  # noqa: E402
from tests import torch_reference as ref  # noqa: E402


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--batch", type=int, default=16, help="images in the one-domain batch")
  p.add_argument("--image_size", type=int, default=224, help="square input size (px)")
  p.add_argument("--reps", type=int, default=3, help="timed repetitions per side and part")
  p.add_argument("--steps", type=int, default=1, help="calls per repetition")
  p.add_argument("--torch_threads", type=int, default=0, help="0 = os.cpu_count()")
  p.add_argument("--trace_dir", default="", help="write a jax.profiler trace of fwd+bwd here")
  p.add_argument(
    "--jax_step",
    action="store_true",
    help="time only our whole JAX alda_dsbn step (--batch per domain), no PyTorch: "
    "for comparing XLA_FLAGS settings",
  )
  p.add_argument("--out", default="", help="JSON path (default benchmarks/results/...)")
  return p.parse_args(argv)


class Jax:
  """The backbone in JAX: jitted forward and forward+backward, on the default device."""

  def __init__(self, x: np.ndarray):
    self.model = resnet.ResNet50(num_domains=2)
    self.x = jnp.asarray(x)
    variables = jax.jit(lambda k: self.model.init(k, self.x, domain=0, train=False))(
      jax.random.key(0)
    )
    self.params, self.stats = variables["params"], variables["batch_stats"]

    def loss(params, stats, x):
      feats, updates = self.model.apply(
        {"params": params, "batch_stats": stats}, x, domain=0, train=True, mutable=["batch_stats"]
      )
      return jnp.sum(feats), updates["batch_stats"]

    self.parts = {"fwd": jax.jit(loss), "fwd+bwd": jax.jit(jax.grad(loss, has_aux=True))}

  def flops(self, part: str) -> float | None:
    """XLA's count of floating-point operations of one call (its cost analysis), if it gives one."""
    try:
      cost = self.parts[part].lower(self.params, self.stats, self.x).compile().cost_analysis()
      cost = cost[0] if isinstance(cost, (list, tuple)) else cost
      return float(cost["flops"])
    except Exception:  # pylint: disable=broad-except  (backend without cost analysis)
      return None

  def run(self, part: str, steps: int) -> float:
    fn, out = self.parts[part], None
    t0 = time.perf_counter()
    for _ in range(steps):
      out = fn(self.params, self.stats, self.x)
    jax.block_until_ready(out)
    return time.perf_counter() - t0


class Torch:
  """The same backbone in PyTorch (torchvision ResNet-50 with DSBN layers), eager."""

  def __init__(self, x: np.ndarray):
    torch.manual_seed(0)
    self.model = ref.resnet50_features(num_domains=2).train()
    ref.set_domain(self.model, 0)
    self.x = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())

  def run(self, part: str, steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
      if part == "fwd":
        with torch.no_grad():
          float(self.model(self.x).sum())
      else:
        self.model.zero_grad(set_to_none=True)
        out = self.model(self.x).sum()
        out.backward()
        float(out.detach())
    return time.perf_counter() - t0


def jax_step_only(args) -> dict:
  """The whole JAX step of step_throughput.py (its JaxSide), alone: median of --reps x --steps."""
  import step_throughput  # pylint: disable=g-import-not-at-top  (benchmarks/ is on sys.path)

  st_args = step_throughput.parse_args(
    ["--batch", str(args.batch), "--image_size", str(args.image_size)]
  )
  side = step_throughput.JaxSide(
    st_args,
    step_throughput.make_config(st_args),
    step_throughput.host_batch(st_args, np.random.default_rng(0)),
  )
  compile_s = side.first_call()
  side.run(1)
  times = [side.run(args.steps) for _ in range(args.reps)]
  rate = 2 * args.batch * args.steps / statistics.median(times)
  flags = os.environ.get("XLA_FLAGS", "")
  result = {
    "command": shlex.join(["python"] + sys.argv),
    "xla_flags": flags,
    "args": vars(args),
    "jax_step_img_s": rate,
    "step_s": times,
    "first_call_s": compile_s,
    "final_loss": side.final_loss(),
    "jit_cache_size": side.cache_size(),
    "load_avg_end": os.getloadavg(),
  }
  print(
    f"| `{flags or '(none)'}` | {rate:.2f} | {compile_s:.1f} s | {side.final_loss():.4f} | "
    f"`XLA_FLAGS={shlex.quote(flags)} {result['command']}` |",
    flush=True,
  )
  return result


def main(args) -> dict:
  torch.set_num_threads(args.torch_threads or os.cpu_count())
  x = (
    np.random.default_rng(0)
    .normal(size=(args.batch, args.image_size, args.image_size, 3))
    .astype(np.float32)
  )
  sides = {"jax": Jax(x), "torch": Torch(x)}
  compile_s = {}
  for part in ("fwd", "fwd+bwd"):
    compile_s[part] = sides["jax"].run(part, 1)  # trace + compile + one call
    sides["jax"].run(part, 1)
    sides["torch"].run(part, 1)
  times = {(s, p): [] for s in sides for p in ("fwd", "fwd+bwd")}
  for rep in range(args.reps):
    order = ("jax", "torch") if rep % 2 == 0 else ("torch", "jax")
    for part in ("fwd", "fwd+bwd"):
      for side in order:
        times[(side, part)].append(sides[side].run(part, args.steps))
  if args.trace_dir:
    with jax.profiler.trace(args.trace_dir):
      sides["jax"].run("fwd+bwd", 2)

  def rate(side, part):
    return args.batch * args.steps / statistics.median(times[(side, part)])

  rows = {}
  for part in ("fwd", "fwd+bwd"):
    flops = sides["jax"].flops(part)
    gflops = {
      side: (flops / 1e9 * rate(side, part) / args.batch if flops else None) for side in sides
    }
    rows[part] = {
      "jax_img_s": rate("jax", part),
      "torch_img_s": rate("torch", part),
      "ratio": rate("jax", part) / rate("torch", part),
      "gflop_per_call": flops / 1e9 if flops else None,
      "jax_gflop_s": gflops["jax"],
      "torch_gflop_s": gflops["torch"],
      "jax_compile_s": compile_s[part],
      "jax_s": times[("jax", part)],
      "torch_s": times[("torch", part)],
    }
  result = {
    "command": shlex.join(["python"] + sys.argv),
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "args": vars(args),
    "parts": rows,
    "load_avg_end": os.getloadavg(),
    "cpu_count": os.cpu_count(),
    "machine": platform.processor() or platform.machine(),
    "jax": jax.__version__,
    "torch": torch.__version__,
    "torch_threads": torch.get_num_threads(),
  }
  flags = result["xla_flags"] or "default"
  for part, r in rows.items():
    print(
      f"| backbone {part}, {args.batch} @ {args.image_size} | XLA_FLAGS={flags} | "
      f"{r['jax_img_s']:.2f} | {r['torch_img_s']:.2f} | {r['ratio']:.3f} | "
      f"{r['gflop_per_call'] or float('nan'):.1f} GFLOP: {r['jax_gflop_s'] or float('nan'):.1f}"
      f" / {r['torch_gflop_s'] or float('nan'):.1f} GFLOP/s | "
      f"{r['jax_compile_s']:.1f} s | `{result['command']}` |",
      flush=True,
    )
  return result


def write_result(result: dict, args, kind: str) -> None:
  """``--out``, or benchmarks/results/<kind>_<batch>x<size>_<XLA flags>.json."""
  flags = (result["xla_flags"] or "default").replace("--", "").replace("=", "-").replace(" ", "_")
  out = args.out or os.path.join(
    _REPO, "benchmarks", "results", f"{kind}_{args.batch}x{args.image_size}_{flags}.json"
  )
  os.makedirs(os.path.dirname(out), exist_ok=True)
  with open(out, "w", encoding="utf-8") as f:
    json.dump(result, f, indent=2)


if __name__ == "__main__":
  _args = parse_args()
  if _args.jax_step:
    write_result(jax_step_only(_args), _args, "jax_step")
  else:
    write_result(main(_args), _args, "step_breakdown")
