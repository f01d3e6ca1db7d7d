"""Per-convolution timing of ResNet-50 on CPU: PyTorch vs JAX (plain XLA conv vs the routed form).

The train step's CPU gap to PyTorch is in the convolutions (`step_breakdown.py`: the backbone's
backward runs at a third of PyTorch's GFLOP/s). This script times every distinct convolution shape
of ResNet-50 on its own, so that a rewrite in `dsbn_jax/models/conv.py` is routed only where it is
faster, shape by shape:

- `fwd`: the forward convolution;
- `dx`: the input gradient alone, `dw`: the kernel gradient alone (JAX: the VJP of the conv in one
  argument under `jit`, the unused forward removed by XLA; PyTorch: `aten.convolution_backward`
  with one output requested, what autograd calls);
- `fwd+bwd`: forward and both gradients, as in training (the stem's input gradient included,
  although a train step never needs it).

Sides: `torch` (NCHW, `--torch_threads` threads, oneDNN), `xla` (`lax.conv_general_dilated`),
`auto` (the form `conv.Conv(impl='auto')` picks on this backend: `matmul` for 1x1 on CPU) and, with
`--tried`, the rewrites of the 3x3 / 7x7 gradients that were tried and are not routed (defined
below; each checked against `xla` before it is timed). Each (shape, mode) compiles the JAX sides
first, then runs `--reps` repetitions, each timing every side once (`--calls` calls each), in an
order that rotates with the repetition so that load from other processes hits all sides alike;
reported is the median per side. The weighted totals multiply each shape by how often ResNet-50
uses it.

  python benchmarks/conv_profile.py [--batch 8 --image_size 224 --reps 5 --calls 1
      --torch_threads 2 --tried --modes fwd,dx,dw,fwd+bwd --only SUBSTRING --out PATH]

Prints a Markdown table and writes JSON (default `benchmarks/results/conv_profile.json`).
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import shlex
import statistics
import sys
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402  (before TF/JAX: see tests/conftest.py)

from dsbn_jax.models import conv  # noqa: E402

MODES = ("fwd", "dx", "dw", "fwd+bwd")


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--batch", type=int, default=8, help="images per call")
  p.add_argument("--image_size", type=int, default=224, help="square network input (px)")
  p.add_argument("--reps", type=int, default=5, help="timed repetitions per side")
  p.add_argument("--calls", type=int, default=1, help="calls per repetition")
  p.add_argument("--torch_threads", type=int, default=2, help="torch.set_num_threads")
  p.add_argument(
    "--tried",
    action="store_true",
    help="also time the rewrites tried for the 3x3 and 7x7 convs (not routed)",
  )
  p.add_argument(
    "--modes", default=",".join(MODES), help="comma-separated subset of " + ", ".join(MODES)
  )
  p.add_argument("--only", default="", help="time only shapes whose name contains this")
  p.add_argument("--out", default=os.path.join(_REPO, "benchmarks", "results", "conv_profile.json"))
  return p.parse_args(argv)


def resnet50_convs(size: int) -> list[dict]:
  """Distinct conv shapes of torchvision ResNet-50 at `size` px: name, count, h, cin, cout, k, s."""
  shapes: dict[tuple, dict] = {}

  def add(name, h, cin, cout, k, s):
    key = (h, cin, cout, k, s)
    if key not in shapes:
      shapes[key] = {"name": name, "count": 0, "h": h, "cin": cin, "cout": cout, "k": k, "s": s}
    shapes[key]["count"] += 1

  add("stem 7x7/2", size, 3, 64, 7, 2)
  h = (size + 6 - 7) // 2 + 1
  h = (h + 2 - 3) // 2 + 1  # max pool
  cin = 64
  for i, blocks in enumerate((3, 4, 6, 3)):
    width = 64 * 2**i
    for j in range(blocks):
      s = 2 if (i > 0 and j == 0) else 1
      ho = (h + 2 - 3) // s + 1
      add(f"l{i + 1} 1x1 {cin}->{width}", h, cin, width, 1, 1)
      add(f"l{i + 1} 3x3/{s} {width}", h, width, width, 3, s)
      add(f"l{i + 1} 1x1 {width}->{4 * width}", ho, width, 4 * width, 1, 1)
      if j == 0:
        add(f"l{i + 1} down 1x1/{s} {cin}->{4 * width}", h, cin, 4 * width, 1, s)
      cin, h = 4 * width, ho
  return list(shapes.values())


def median_s(ts: list[float]) -> float:
  return statistics.median(ts)


# ---------------------------------------------------------------- rewrites tried, not routed
# Custom VJPs for the k > 1 convolutions (forward: the plain conv). Kept here, with `--tried`, so
# the "tried, did not help" figures in BENCHMARKS.md can be rerun; `conv.py` routes none of them.


def _input_grad_explicit(g_NHWC, kernel_HWIO, in_shape, stride, pad):
  """dx of a strided conv without lhs_dilation: dy interleaved with zeros by `lax.pad`, then a
  stride-1 conv with the flipped, transposed kernel (equinox PR #1259's rewrite)."""
  k = kernel_HWIO.shape[0]
  pads = [(0, 0, 0)]
  for size, out in ((in_shape[1], g_NHWC.shape[1]), (in_shape[2], g_NHWC.shape[2])):
    lo = k - 1 - pad
    pads.append((lo, size + k - 1 - lo - ((out - 1) * stride + 1), stride - 1))
  g = jax.lax.pad(g_NHWC, jnp.zeros((), g_NHWC.dtype), (*pads, (0, 0, 0)))
  kernel_HWOI = jnp.flip(kernel_HWIO, (0, 1)).transpose(0, 1, 3, 2)
  return jax.lax.conv_general_dilated(
    g, kernel_HWOI, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
  )


def _input_grad_phases(g_NHWC, kernel_HWIO, in_shape, stride, pad):
  """dx of a strided conv as stride² stride-1 convs, one per phase of dx (the taps that reach
  it), interleaved: no zeros multiplied, no lhs_dilation."""
  n, h, w, c = in_shape
  k = kernel_HWIO.shape[0]
  ho, wo = g_NHWC.shape[1:3]
  hp0, wp0 = -(-h // stride), -(-w // stride)
  rows = []
  for a in range(stride):
    cols = []
    for b in range(stride):
      # dx row stride*i + a gets dy row o through tap t = stride*(i - o) + a + pad.
      th = sorted((t for t in range(k) if (t - a - pad) % stride == 0), reverse=True)
      tw = sorted((t for t in range(k) if (t - b - pad) % stride == 0), reverse=True)
      hp, wp = -(-(h - a) // stride), -(-(w - b) // stride)
      if not th or not tw:
        part = jnp.zeros((n, hp, wp, c), g_NHWC.dtype)
      else:
        oh0, ow0 = (a + pad - th[0]) // stride, (b + pad - tw[0]) // stride
        sub_HWOI = kernel_HWIO[np.array(th)][:, np.array(tw)].transpose(0, 1, 3, 2)
        part = jax.lax.conv_general_dilated(
          g_NHWC,
          sub_HWOI,
          (1, 1),
          ((-oh0, hp + oh0 + len(th) - 1 - ho), (-ow0, wp + ow0 + len(tw) - 1 - wo)),
          dimension_numbers=("NHWC", "HWIO", "NHWC"),
        )
      cols.append(jnp.pad(part, ((0, 0), (0, hp0 - hp), (0, wp0 - wp), (0, 0))))
    rows.append(jnp.stack(cols, axis=3))  # (n, hp0, wp0, stride, c)
  out = jnp.stack(rows, axis=2).reshape(n, hp0 * stride, wp0 * stride, c)
  return out[:, :h, :w, :]


def _weight_grad_taps(x_NHWC, g_NHWC, k, stride, pad, im2col):
  """dW[i, j] = x tap (i, j)ᵀ @ dy per tap (`taps`), or one matmul over concatenated taps."""
  n, _, _, c = x_NHWC.shape
  ho, wo = g_NHWC.shape[1:3]
  xp = jnp.pad(x_NHWC, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  taps = [
    jax.lax.slice(
      xp,
      (0, i, j, 0),
      (n, i + (ho - 1) * stride + 1, j + (wo - 1) * stride + 1, c),
      (1, stride, stride, 1),
    )
    for i in range(k)
    for j in range(k)
  ]
  dims = (((0, 1, 2), (0, 1, 2)), ((), ()))
  if im2col:
    return jax.lax.dot_general(jnp.concatenate(taps, axis=3), g_NHWC, dims).reshape(k, k, c, -1)
  return jnp.stack([jax.lax.dot_general(t, g_NHWC, dims) for t in taps]).reshape(k, k, c, -1)


def _weight_grad_s2d(x_NHWC, g_NHWC, k, stride, pad):
  """dW of a strided conv as that of a stride-1 conv over the space-to-depth input."""
  n, h, w, c = x_NHWC.shape
  ho, wo = g_NHWC.shape[1:3]
  s, k2 = stride, -(-k // stride)
  h2, w2 = ho + k2 - 1, wo + k2 - 1
  xp = jax.lax.pad(
    x_NHWC,
    jnp.zeros((), x_NHWC.dtype),
    ((0, 0, 0), (pad, s * h2 - h - pad, 0), (pad, s * w2 - w - pad, 0), (0, 0, 0)),
  )
  xs = xp.reshape(n, h2, s, w2, s, c).transpose(0, 1, 3, 2, 4, 5).reshape(n, h2, w2, s * s * c)
  w4 = jnp.zeros((k2, k2, s * s * c, g_NHWC.shape[3]), g_NHWC.dtype)
  dw4 = jax.vjp(
    lambda k_: jax.lax.conv_general_dilated(
      xs, k_, (1, 1), "VALID", dimension_numbers=("NHWC", "HWIO", "NHWC")
    ),
    w4,
  )[1](g_NHWC)[0]
  dw = dw4.reshape(k2, k2, s, s, c, -1).transpose(0, 2, 1, 3, 4, 5).reshape(k2 * s, k2 * s, c, -1)
  return dw[:k, :k]


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _conv_tried(x_NHWC, kernel_HWIO, stride, dx_form, dw_form):
  return conv.conv_xla(x_NHWC, kernel_HWIO, stride)


def _conv_tried_fwd(x_NHWC, kernel_HWIO, stride, dx_form, dw_form):
  return conv.conv_xla(x_NHWC, kernel_HWIO, stride), (x_NHWC, kernel_HWIO)


def _conv_tried_bwd(stride, dx_form, dw_form, res, g_NHWC):
  x_NHWC, kernel_HWIO = res
  k = kernel_HWIO.shape[0]
  pad = k // 2
  if dw_form == "xla":
    dk = jax.vjp(lambda k_: conv.conv_xla(x_NHWC, k_, stride), kernel_HWIO)[1](g_NHWC)[0]
  elif dw_form == "s2d":
    dk = _weight_grad_s2d(x_NHWC, g_NHWC, k, stride, pad)
  else:
    dk = _weight_grad_taps(x_NHWC, g_NHWC, k, stride, pad, im2col=dw_form == "im2col")
  if dx_form == "xla":
    dx = jax.vjp(lambda x_: conv.conv_xla(x_, kernel_HWIO, stride), x_NHWC)[1](g_NHWC)[0]
  else:
    fn = {"explicit": _input_grad_explicit, "phases": _input_grad_phases}[dx_form]
    dx = fn(g_NHWC, kernel_HWIO, x_NHWC.shape, stride, pad)
  return dx.astype(x_NHWC.dtype), dk.astype(kernel_HWIO.dtype)


_conv_tried.defvjp(_conv_tried_fwd, _conv_tried_bwd)


def tried_forms(k: int, s: int) -> list[str]:
  """`dx=<form>` / `dw=<form>`: the other gradient is XLA's."""
  forms = ["dw=taps", "dw=im2col"] if k > 1 else []
  if k > 1 and s > 1:
    forms += ["dw=s2d", "dx=explicit", "dx=phases"]
  return forms


def conv_form(x, w, s: int, form: str):
  if form == "xla":
    return conv.conv_xla(x, w, s)
  if form == "matmul":
    return conv.conv_1x1_matmul(x, w, s)
  which, name = form.split("=")
  return _conv_tried(x, w, s, name if which == "dx" else "xla", name if which == "dw" else "xla")


def jax_fns(shape: dict, form: str):
  s = shape["s"]

  def f(x, w):
    return conv_form(x, w, s, form)

  def fwd(x, w, g):
    del g
    return f(x, w)

  def dx(x, w, g):
    return jax.vjp(lambda x_: f(x_, w), x)[1](g)[0]

  def dw(x, w, g):
    return jax.vjp(lambda w_: f(x, w_), w)[1](g)[0]

  def fwd_bwd(x, w, g):
    y, vjp = jax.vjp(f, x, w)
    return (y, *vjp(g))

  return {"fwd": jax.jit(fwd), "dx": jax.jit(dx), "dw": jax.jit(dw), "fwd+bwd": jax.jit(fwd_bwd)}


def max_rel_error(fns: dict, ref: dict, x, w, g) -> float:
  """Largest |form - xla| / max|xla| over the output and both gradients."""
  got, want = fns["fwd+bwd"](x, w, g), ref["fwd+bwd"](x, w, g)
  return max(float(jnp.abs(a - b).max() / jnp.abs(b).max()) for a, b in zip(got, want))


def torch_fns(shape: dict):
  k, s = shape["k"], shape["s"]
  pad = k // 2
  conv2d = torch.nn.functional.conv2d
  cbw = torch.ops.aten.convolution_backward

  def bwd(x, w, g, mask):
    return cbw(g, x, w, None, [s, s], [pad, pad], [1, 1], False, [0, 0], 1, mask)

  def fwd_bwd(x, w, g):
    y = conv2d(x, w, None, s, pad)
    return y, *bwd(x, w, g, [True, True, False])[:2]

  return {
    "fwd": lambda x, w, g: conv2d(x, w, None, s, pad),
    "dx": lambda x, w, g: bwd(x, w, g, [True, False, False])[0],
    "dw": lambda x, w, g: bwd(x, w, g, [False, True, False])[1],
    "fwd+bwd": fwd_bwd,
  }


def profile_shape(args, shape: dict, modes) -> dict:
  rng = np.random.default_rng(0)
  n, h, cin, cout, k, s = (
    args.batch,
    shape["h"],
    shape["cin"],
    shape["cout"],
    shape["k"],
    shape["s"],
  )
  ho = (h + 2 * (k // 2) - k) // s + 1
  x_np = rng.normal(size=(n, h, h, cin)).astype(np.float32)
  w_np = (rng.normal(size=(k, k, cin, cout)) / np.sqrt(k * k * cin)).astype(np.float32)
  g_np = rng.normal(size=(n, ho, ho, cout)).astype(np.float32)
  xj, wj, gj = jnp.asarray(x_np), jnp.asarray(w_np), jnp.asarray(g_np)
  xt = torch.from_numpy(x_np.transpose(0, 3, 1, 2).copy())
  wt = torch.from_numpy(w_np.transpose(3, 2, 0, 1).copy())
  gt = torch.from_numpy(g_np.transpose(0, 3, 1, 2).copy())
  auto = "matmul" if conv.uses_matmul(k, "auto") else "xla"
  forms = ["xla", auto] if auto != "xla" else ["xla"]
  if args.tried:
    forms += tried_forms(k, s)
  sides = {"torch": torch_fns(shape)}
  for form in forms:
    sides[form] = jax_fns(shape, form)
  out = {
    **shape,
    "ho": ho,
    "auto_form": auto,
    "median_ms": {},
    "max_rel_error_vs_xla": {
      form: max_rel_error(sides[form], sides["xla"], xj, wj, gj) for form in forms[1:]
    },
  }
  bad = {f: e for f, e in out["max_rel_error_vs_xla"].items() if not e < 1e-4}
  if bad:
    raise AssertionError(f"{shape['name']}: forms differ from the plain conv: {bad}")
  for mode in modes:
    calls = {}
    for name, fns in sides.items():
      fn = fns[mode]
      if name == "torch":
        calls[name] = lambda fn=fn: fn(xt, wt, gt)
      else:
        compiled = fn.lower(xj, wj, gj).compile()
        calls[name] = lambda c=compiled: jax.block_until_ready(c(xj, wj, gj))
      calls[name]()  # warm-up
    times = {name: [] for name in calls}
    names = list(calls)
    for r in range(args.reps):
      order = names[r % len(names) :] + names[: r % len(names)]
      for name in order:
        t0 = time.perf_counter()
        for _ in range(args.calls):
          calls[name]()
        times[name].append((time.perf_counter() - t0) / args.calls)
    out["median_ms"][mode] = {name: round(1e3 * median_s(ts), 2) for name, ts in times.items()}
    print(
      f"{shape['name']:>24} x{shape['count']} {mode:>8}: "
      + ", ".join(f"{k_} {v:.1f}" for k_, v in out["median_ms"][mode].items()),
      flush=True,
    )
  return out


def main(args) -> dict:
  torch.set_num_threads(args.torch_threads)
  modes = [m for m in args.modes.split(",") if m]
  cmd = (
    "python benchmarks/conv_profile.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
  ).strip()
  load_start = os.getloadavg()
  wall0 = time.perf_counter()
  rows = [
    profile_shape(args, sh, modes)
    for sh in resnet50_convs(args.image_size)
    if args.only in sh["name"]
  ]
  totals = {}
  for mode in modes:
    for side in ("torch", "xla", "auto"):
      key = "auto_form" if side == "auto" else None
      totals.setdefault(mode, {})[side] = round(
        sum(r["count"] * r["median_ms"][mode][r[key] if key else side] for r in rows), 1
      )
  result = {
    "command": cmd,
    "batch": args.batch,
    "image_size": args.image_size,
    "reps": args.reps,
    "calls": args.calls,
    "torch_threads": args.torch_threads,
    "jax_backend": jax.default_backend(),
    "jax": jax.__version__,
    "torch": torch.__version__,
    "cpu_count": os.cpu_count(),
    "load_average": {
      "start": [round(v, 2) for v in load_start],
      "end": [round(v, 2) for v in os.getloadavg()],
    },
    "rows": rows,
    "weighted_total_ms": totals,
    "wall_s": round(time.perf_counter() - wall0, 1),
  }
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)

  print(
    f"\n{args.batch} images @ {args.image_size}, median ms of {args.reps} reps, torch "
    f"{args.torch_threads} threads; load {load_start[0]:.1f}-{os.getloadavg()[0]:.1f}; "
    f"`{cmd}`\n"
  )
  head = " | ".join(f"{m} torch / xla / auto" for m in modes)
  print(f"| conv (input px) | n | auto form | {head} |")
  print("|---|---|---|" + "---|" * len(modes))
  for r in rows:
    cells = " | ".join(
      f"{r['median_ms'][m]['torch']:.1f} / {r['median_ms'][m]['xla']:.1f} / "
      f"{r['median_ms'][m][r['auto_form']]:.1f}"
      for m in modes
    )
    print(f"| {r['name']} ({r['h']}²) | {r['count']} | {r['auto_form']} | {cells} |")
  cells = " | ".join(
    f"**{totals[m]['torch']:.0f} / {totals[m]['xla']:.0f} / {totals[m]['auto']:.0f}**"
    for m in modes
  )
  print(f"| weighted total (x n) | | | {cells} |")
  if args.tried:
    print("\ntried forms (ms):")
    for r in rows:
      for m in modes:
        extra = {k_: v for k_, v in r["median_ms"][m].items() if k_ not in ("torch", "xla")}
        if len(extra) > 1 or (extra and r["auto_form"] == "xla"):
          print(f"  {r['name']} {m}: " + ", ".join(f"{k_} {v:.1f}" for k_, v in extra.items()))
  print(f"\nwrote {os.path.relpath(args.out, _REPO)}")
  return result


if __name__ == "__main__":
  main(parse_args())
