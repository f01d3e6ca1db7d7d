"""Train-step images/s of `alda_dsbn` on ResNet-50: our JAX step vs the PyTorch reference step.

One process, one machine, the same step on both sides: source + target batch through the backbone
(domain-specific BN, branch 0 then 1), bottleneck + classifier, the ALDA discriminator behind
gradient reversal, the ALDA losses (adv + λ_T·L_T, and L_reg on D only), and one Nesterov-SGD
update of G, C and D with the per-group learning rates.

- JAX: `sharding.create_sharded_state` (random init, jitted) and `sharding.jit_train_step` on a
  1-device mesh (state donated); the batch is put on the device once and reused.
- PyTorch: `tests/torch_reference.py` (torchvision ResNet-50 with every BN a DSBN, the reference's
  `ResNetFc`, `Multi_AdversarialNetwork`, `ALDA_loss`, SGD nesterov, `Trainer.step`), eager mode.
  Its step reads every loss back to the host (`float(...)`) as the reference loop does.

Both sides run a warm-up (JAX: the first call, which compiles, timed separately as compile time,
then `--warmup` more steps), then `--reps` timed repetitions of `--steps_per_rep` steps each,
alternating JAX and PyTorch (the order flips every repetition), so that load from other processes
hits both alike (`--conv_impl xla,auto`: one JAX side per form, the order of the three rotating, so
that the forms are compared under the same load). Reported: the median images/s over repetitions
(images = source + target), the ratio JAX/PyTorch of the medians and the median of the
per-repetition (paired) ratios, the compile time, and memory: peak RSS while each side runs
(sampled every 10 ms; one process, so each figure also holds the other side's resident state:
compare the increments), or on GPU the peak device memory (`device.memory_stats()` /
`torch.cuda.max_memory_allocated`).

Load matters beyond noise: on a CPU shared with another busy process, torch's OpenMP fork-join
(one barrier per op, static split over `--torch_threads`) slows down far more than XLA's thread
pool when one of its threads is descheduled, so the ratio depends on the machine's load; quote it
with the load figures in the JSON, and compare `--torch_threads 1`.

The confidence threshold defaults to 0.0 (every target row counts): a random-init network is never
90 % confident, and with no confident row the reference's L_T is NaN (mean of nothing), which
poisons its weights and trips its `[0, 1]` assertion on the next step. The amount of work per step
does not depend on the threshold in the JAX step (masks), and barely in the reference.

bf16 (`--dtype bfloat16`): JAX computes in bf16 via `config.model.dtype` (params, BN statistics and
losses stay float32). PyTorch uses autocast bf16 on GPU only (the networks under autocast, the
losses in float32: `BCELoss` refuses autocast); on CPU it stays float32 (recorded in the JSON).

  python benchmarks/step_throughput.py [--batch 8 --image_size 112 --reps 3 --steps_per_rep 3
      --warmup 1 --dtype float32 --device cpu --torch_threads 0 --pause_s 1 --conv_impl auto
      --out PATH]

Prints a Markdown table row (with the command) and writes the JSON to `--out` (default
benchmarks/results/step_throughput_<device>_<batch>x<size>_<dtype>.json, with `_conv-<impl>` before
`.json` for a `--conv_impl` other than auto).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import json
import os
import platform
import resource
import shlex
import statistics
import sys
import threading
import time

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _REPO)  # for tests.torch_reference, the PyTorch reference step (not installed)


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--batch", type=int, default=8, help="images per domain per step")
  p.add_argument("--image_size", type=int, default=112, help="square input size (px)")
  p.add_argument("--reps", type=int, default=3, help="timed repetitions per framework")
  p.add_argument("--steps_per_rep", type=int, default=3, help="train steps per repetition")
  p.add_argument(
    "--warmup",
    type=int,
    default=1,
    help="untimed steps per framework after the first (compiling) one",
  )
  p.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32")
  p.add_argument("--device", choices=("cpu", "gpu"), default="cpu")
  p.add_argument("--num_classes", type=int, default=65, help="K (65 Office-Home, 31 Office-31)")
  p.add_argument(
    "--threshold",
    type=float,
    default=0.0,
    help="ALDA confidence threshold (see the module doc for why not 0.9)",
  )
  p.add_argument(
    "--torch_channels_last",
    choices=("auto", "on", "off"),
    default="auto",
    help="torch memory format; auto = channels_last on GPU, NCHW on CPU",
  )
  p.add_argument(
    "--torch_threads",
    type=int,
    default=0,
    help="torch.set_num_threads; 0 = os.cpu_count() (XLA:CPU uses every core)",
  )
  p.add_argument(
    "--pause_s",
    type=float,
    default=1.0,
    help="idle seconds before each timed repetition (lets the other framework's "
    "worker threads go to sleep)",
  )
  p.add_argument(
    "--conv_impl",
    default="auto",
    help="JAX convolution form (config model.conv_impl, dsbn_jax/models/conv.py): "
    "auto = 1x1 convs as matmuls on CPU, xla = lax.conv_general_dilated, "
    "matmul; a comma list (e.g. xla,auto) times one JAX step per form, all "
    "alternating with PyTorch (the first is the `jax` side of the JSON)",
  )
  p.add_argument("--seed", type=int, default=0)
  p.add_argument("--out", default=None, help="JSON path (default benchmarks/results/...)")
  args = p.parse_args(argv)
  args.conv_impls = args.conv_impl.split(",")
  bad = [v for v in args.conv_impls if v not in ("auto", "xla", "matmul")]
  if bad or len(set(args.conv_impls)) != len(args.conv_impls):
    p.error(f"--conv_impl {args.conv_impl!r}: distinct values of auto, xla, matmul")
  args.conv_impl = args.conv_impls[0]
  if args.out is None:
    suffix = "" if args.conv_impls == ["auto"] else "_conv-" + "-".join(args.conv_impls)
    args.out = os.path.join(
      _REPO,
      "benchmarks",
      "results",
      f"step_throughput_{args.device}_{args.batch}x{args.image_size}_{args.dtype}{suffix}.json",
    )
  return args


# The device decides the environment below, which must be set before JAX is imported. Imported as a
# module (benchmarks/step_breakdown.py), the defaults apply and the importer's argv is not read.
ARGS = parse_args(None if __name__ == "__main__" else [])
if ARGS.device == "cpu":
  os.environ.setdefault("JAX_PLATFORMS", "cpu")
else:
  # JAX would otherwise grab 75 % of the GPU up front and starve torch in the same process; growing
  # on demand also makes peak_bytes_in_use mean the step's real need.
  os.environ.setdefault("XLA_PYTHON_CLIENT_PREALLOCATE", "false")
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# torch (and triton) before anything that may pull in TensorFlow: triton after TF segfaults.
import numpy as np  # noqa: E402
import psutil  # noqa: E402
import torch  # noqa: E402
import torchvision  # noqa: E402

try:
  import triton  # noqa: E402,F401
except ImportError:
  pass

import flax  # noqa: E402
import jax  # noqa: E402
import jaxlib  # noqa: E402
import optax  # noqa: E402

from dsbn_jax import config_defaults, sharding  # noqa: E402
from dsbn_jax.models import heads  # noqa: E402
from tests import torch_reference as ref  # noqa: E402

_PROC = psutil.Process()


def rss_mb() -> float:
  return _PROC.memory_info().rss / 2**20


class PeakRSS:
  """Context manager: the highest RSS (MiB) seen by a 10 ms sampling thread while inside."""

  def __init__(self, interval_s: float = 0.01):
    self.interval_s, self.peak_mb = interval_s, 0.0
    self._stop = threading.Event()

  def _run(self):
    while not self._stop.is_set():
      self.peak_mb = max(self.peak_mb, rss_mb())
      self._stop.wait(self.interval_s)

  def __enter__(self):
    self.peak_mb = rss_mb()
    self._thread = threading.Thread(target=self._run, daemon=True)
    self._thread.start()
    return self

  def __exit__(self, *exc):
    self._stop.set()
    self._thread.join()
    self.peak_mb = max(self.peak_mb, rss_mb())


def make_config(args, conv_impl: str | None = None):
  cfg = config_defaults.get_config()
  cfg.method = "alda_dsbn"
  cfg.batch_size = args.batch
  cfg.model.backbone = "resnet50"
  cfg.model.num_classes = args.num_classes
  cfg.model.dtype = args.dtype
  cfg.model.conv_impl = conv_impl or args.conv_impl
  cfg.model.pretrained_path = ""
  cfg.loss.threshold = args.threshold
  return cfg


def host_batch(args, rng: np.random.Generator) -> dict:
  def domain():
    return {
      "image": rng.normal(size=(args.batch, args.image_size, args.image_size, 3)).astype(
        np.float32
      ),
      "label": rng.integers(0, args.num_classes, args.batch).astype(np.int32),
    }

  return {"source": domain(), "target": domain()}


# ------------------------------------------------------------------------------------------ JAX
class JaxSide:
  name = "jax"

  def __init__(self, args, cfg, batch_np):
    self.args = args
    self.device = jax.devices(args.device)[0]
    self.mesh = sharding.make_mesh([self.device])
    model = heads.create_model(cfg)
    t0 = time.perf_counter()
    self.state = sharding.create_sharded_state(
      self.mesh, jax.random.key(args.seed), cfg, model, (args.image_size, args.image_size, 3)
    )
    jax.block_until_ready(self.state)
    self.init_s = time.perf_counter() - t0
    self.batch = sharding.to_global(batch_np, self.mesh)
    self.rng = sharding.replicate(jax.random.key(args.seed + 1), self.mesh)
    self.step_fn = sharding.jit_train_step(self.mesh, cfg)
    self.metrics = None
    self.donation_ok = None

  def first_call(self) -> float:
    """The compiling call (trace + lower + compile + one step), seconds; checks donation."""
    old_leaf = jax.tree.leaves(self.state.params)[0]
    t0 = time.perf_counter()
    self.state, self.metrics = self.step_fn(self.state, self.batch, self.rng)
    jax.block_until_ready((self.state, self.metrics))
    seconds = time.perf_counter() - t0
    self.donation_ok = bool(old_leaf.is_deleted())
    return seconds

  def run(self, steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
      self.state, self.metrics = self.step_fn(self.state, self.batch, self.rng)
    jax.block_until_ready((self.state, self.metrics))
    return time.perf_counter() - t0

  def final_loss(self) -> float:
    return float(jax.device_get(self.metrics["train/loss"]))

  def cache_size(self) -> int | None:
    try:
      return int(self.step_fn._cache_size())  # pylint: disable=protected-access
    except AttributeError:
      return None

  def device_memory(self) -> dict | None:
    stats = self.device.memory_stats()
    if not stats:
      return None
    keep = ("peak_bytes_in_use", "bytes_in_use", "bytes_limit")
    return {f"{k.replace('bytes', 'mib')}": round(stats[k] / 2**20, 1) for k in keep if k in stats}


# -------------------------------------------------------------------------------------- PyTorch
class _AutocastD(ref.AdversarialNetwork):
  """The reference D with its Linear layers under bf16 autocast, float32 logits out."""

  def forward(self, x):
    with torch.autocast("cuda", dtype=torch.bfloat16):
      return super().forward(x).float()


class _AutocastTrainer(ref.Trainer):
  """The reference step with both network forwards under bf16 autocast, losses in float32."""

  def _forward(self, xs, xt):
    with torch.autocast("cuda", dtype=torch.bfloat16):
      features, outputs_source, outputs = super()._forward(xs, xt)
    return features.float(), outputs_source.float(), outputs.float()


class TorchSide:
  name = "torch"

  def __init__(self, args, cfg, batch_np):
    self.args = args
    on_gpu = args.device == "gpu"
    self.dev = torch.device("cuda" if on_gpu else "cpu")
    self.autocast = on_gpu and args.dtype == "bfloat16"
    self.channels_last = {"on": True, "off": False, "auto": on_gpu}[args.torch_channels_last]
    if on_gpu:
      torch.backends.cudnn.benchmark = True
      # XLA uses TF32 for float32 convs and matmuls on Ampere+ by default; give torch the same.
      torch.backends.cuda.matmul.allow_tf32 = True
      torch.backends.cudnn.allow_tf32 = True
      # The reference builds its loss constants with the default device (CPU); put them on the GPU.
      torch.set_default_device(self.dev)
      create_matrix = ref.create_matrix
      ref.create_matrix = functools.lru_cache(lambda n: create_matrix(n).to(self.dev))
    m, o, lo = cfg.model, cfg.optim, cfg.loss
    t0 = time.perf_counter()
    torch.manual_seed(args.seed)
    base = ref.ResNetFc(ref.resnet50_features(num_domains=2), 2048, m.bottleneck_dim, m.num_classes)
    d_cls = _AutocastD if self.autocast else ref.AdversarialNetwork
    ad_net = d_cls(
      m.bottleneck_dim,
      m.disc_hidden_dim,
      m.num_classes,
      dropout=m.dropout_rate,
      max_iter=lo.ramp_max_steps,
    )
    base.to(self.dev)
    ad_net.to(self.dev)
    if self.channels_last:
      base.to(memory_format=torch.channels_last)
    trainer_cls = _AutocastTrainer if self.autocast else ref.Trainer
    # The reference takes the base decay (x decay_mult 2 inside); ours is the product.
    self.trainer = trainer_cls(
      base,
      ad_net,
      method="alda_dsbn",
      lr0=o.lr0,
      threshold=lo.threshold,
      trade_off=lo.trade_off,
      adv_weight=lo.adv_weight,
      lr_gamma=o.lr_gamma,
      lr_power=o.lr_power,
      weight_decay=o.weight_decay / 2,
    )
    fmt = torch.channels_last if self.channels_last else torch.contiguous_format

    def images(x):
      return torch.from_numpy(x.transpose(0, 3, 1, 2).copy()).to(self.dev, memory_format=fmt)

    self.xs, self.xt = images(batch_np["source"]["image"]), images(batch_np["target"]["image"])
    self.ys = torch.from_numpy(batch_np["source"]["label"].astype(np.int64)).to(self.dev)
    self._sync()
    self.init_s = time.perf_counter() - t0
    self.i, self.out = 0, None

  def _sync(self):
    if self.dev.type == "cuda":
      torch.cuda.synchronize()

  def run(self, steps: int) -> float:
    t0 = time.perf_counter()
    for _ in range(steps):
      self.out = self.trainer.step(self.i, self.xs, self.ys, self.xt)
      self.i += 1
    self._sync()
    return time.perf_counter() - t0

  def final_loss(self) -> float:
    return float(self.out["loss"])

  def device_memory(self) -> dict | None:
    if self.dev.type != "cuda":
      return None
    return {
      "max_memory_allocated_mib": round(torch.cuda.max_memory_allocated() / 2**20, 1),
      "max_memory_reserved_mib": round(torch.cuda.max_memory_reserved() / 2**20, 1),
    }


# ------------------------------------------------------------------------------------------ main
def machine_info(args) -> dict:
  cpu_model = platform.processor()
  with contextlib.suppress(OSError):
    with open("/proc/cpuinfo") as f:
      cpu_model = next(
        (ln.split(":", 1)[1].strip() for ln in f if ln.startswith("model name")), cpu_model
      )
  jdev = jax.devices(args.device)[0]
  info = {
    "hostname": platform.node(),
    "platform": platform.platform(),
    "python": platform.python_version(),
    "cpu_count": os.cpu_count(),
    "cpu_affinity": len(os.sched_getaffinity(0)),
    "cpu_model": cpu_model,
    "total_ram_gib": round(psutil.virtual_memory().total / 2**30, 1),
    "jax": jax.__version__,
    "jaxlib": jaxlib.__version__,
    "flax": flax.__version__,
    "optax": optax.__version__,
    "torch": torch.__version__,
    "torchvision": torchvision.__version__,
    "jax_backend": jax.default_backend(),
    "jax_device_kind": jdev.device_kind,
    "jax_platform": jdev.platform,
    "torch_num_threads": torch.get_num_threads(),
    "torch_num_interop_threads": torch.get_num_interop_threads(),
    "xla_flags": os.environ.get("XLA_FLAGS", ""),
    "threads_note": "XLA:CPU runs its intra-op pool on every core; torch.set_num_threads"
    "(os.cpu_count()).",
  }
  if args.device == "gpu":
    info["torch_device_name"] = torch.cuda.get_device_name(0)
  return info


def jax_bench_args(args) -> argparse.Namespace:
  """This script's arguments for a benchmark that compares JAX steps (``fused_pass.py``,
  ``method_steps.py``): its batch, image size, dtype, device, class count and seed."""
  return parse_args(
    [
      *("--batch", str(args.batch), "--image_size", str(args.image_size), "--dtype", args.dtype),
      *("--device", args.device, "--num_classes", str(args.num_classes), "--seed", str(args.seed)),
    ]
  )


def compiled_sides(bench_args, configs: dict, batch_np) -> tuple[dict, dict, dict]:
  """``(sides, first_call_s, first_step_loss)``: a ``JaxSide`` per named config, each compiled
  (its first call timed, its loss read) and warmed up by one more step, in order."""
  sides, first, first_loss = {}, {}, {}
  for name, cfg in configs.items():
    sides[name] = JaxSide(bench_args, cfg, batch_np)
    first[name] = sides[name].first_call()
    first_loss[name] = sides[name].final_loss()
    sides[name].run(1)  # warm-up
    print(f"[{name}] first (compiling) call {first[name]:.1f} s", flush=True)
  return sides, first, first_loss


def time_alternating(sides: dict, reps: int, steps_per_rep: int) -> dict[str, list[float]]:
  """Seconds of ``steps_per_rep`` steps of every side (``JaxSide``-like ``run``), ``reps`` times,
  the order rotating every repetition so that load from other processes hits every side alike."""
  names, times = list(sides), {name: [] for name in sides}
  for r in range(reps):
    order = names[r % len(names) :] + names[: r % len(names)]
    for name in order:
      times[name].append(sides[name].run(steps_per_rep))
    print(
      f"[rep {r + 1}/{reps}] "
      + ", ".join(f"{n} {times[n][-1]:.2f} s" for n in names)
      + f" (load {os.getloadavg()[0]:.2f})",
      flush=True,
    )
  return times


def summarize(seconds: list[float], imgs_per_step: int, steps: int) -> dict:
  ips = [imgs_per_step * steps / s for s in seconds]
  return {
    "rep_seconds": [round(s, 4) for s in seconds],
    "rep_images_per_s": [round(v, 2) for v in ips],
    "median_step_s": round(statistics.median(seconds) / steps, 4),
    "median_images_per_s": round(statistics.median(ips), 2),
    "min_images_per_s": round(min(ips), 2),
    "max_images_per_s": round(max(ips), 2),
  }


def main(args) -> dict:
  torch.set_num_threads(args.torch_threads or os.cpu_count())
  cmd = (
    "python benchmarks/step_throughput.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
  ).strip()
  load_start = os.getloadavg()
  wall0 = time.perf_counter()
  rss = {"after_imports_mib": round(rss_mb(), 1)}
  cfg = make_config(args)
  batch_np = host_batch(args, np.random.default_rng(args.seed))
  imgs_per_step = 2 * args.batch

  with PeakRSS() as peak:
    jx = JaxSide(args, cfg, batch_np)
  rss["jax_state_built_mib"], rss["peak_during_jax_init_mib"] = (
    round(rss_mb(), 1),
    round(peak.peak_mb, 1),
  )
  with PeakRSS() as peak:
    first_call_s = jx.first_call()
  rss["peak_during_jax_compile_mib"] = round(peak.peak_mb, 1)
  print(
    f"[jax] init {jx.init_s:.1f} s, first (compiling) call {first_call_s:.1f} s, donation "
    f"{'ok' if jx.donation_ok else 'NOT applied'}",
    flush=True,
  )

  extras = []  # one more JAX side per further --conv_impl value
  for impl in args.conv_impls[1:]:
    side = JaxSide(args, make_config(args, impl), batch_np)
    side.name, side.conv_impl = f"jax[{impl}]", impl
    side.first_call_s = side.first_call()
    print(f"[{side.name}] first (compiling) call {side.first_call_s:.1f} s", flush=True)
    extras.append(side)

  th = TorchSide(args, cfg, batch_np)
  rss["torch_model_built_mib"] = round(rss_mb(), 1)
  torch_first_s = th.run(1)
  print(f"[torch] init {th.init_s:.1f} s, first step {torch_first_s:.2f} s", flush=True)

  sides = [jx, th, *extras]
  for side in sides:  # warm-up
    if args.warmup:
      side.run(args.warmup)

  times = {side.name: [] for side in sides}
  peaks = {side.name: 0.0 for side in sides}
  rep_load = []
  rep_order = []
  for r in range(args.reps):
    order = sides[r % len(sides) :] + sides[: r % len(sides)]  # two sides: flips every rep
    rep_order.append(",".join(side.name for side in order))
    for side in order:
      time.sleep(args.pause_s)
      with PeakRSS() as peak:
        times[side.name].append(side.run(args.steps_per_rep))
      peaks[side.name] = max(peaks[side.name], peak.peak_mb)
    rep_load.append(round(os.getloadavg()[0], 2))
    print(
      f"[rep {r + 1}/{args.reps}] jax {times['jax'][-1]:.2f} s, torch "
      f"{times['torch'][-1]:.2f} s"
      + "".join(f", {e.name} {times[e.name][-1]:.2f} s" for e in extras)
      + f" for {args.steps_per_rep} steps "
      f"(load {os.getloadavg()[0]:.2f})",
      flush=True,
    )
  rss["peak_during_jax_steps_mib"] = round(peaks["jax"], 1)
  rss["peak_during_torch_steps_mib"] = round(peaks["torch"], 1)
  rss["process_peak_ru_maxrss_mib"] = round(
    resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1
  )

  js = summarize(times["jax"], imgs_per_step, args.steps_per_rep)
  ts = summarize(times["torch"], imgs_per_step, args.steps_per_rep)
  med_step = statistics.median(times["jax"]) / args.steps_per_rep
  js.update(
    init_s=round(jx.init_s, 2),
    first_call_s=round(first_call_s, 2),
    compile_s_est=round(first_call_s - med_step, 2),
    jit_cache_size_after=jx.cache_size(),
    donation_ok=jx.donation_ok,
    final_loss=jx.final_loss(),
    device_memory=jx.device_memory(),
    compute_dtype=args.dtype,
  )
  ts.update(
    init_s=round(th.init_s, 2),
    first_step_s=round(torch_first_s, 2),
    final_loss=th.final_loss(),
    device_memory=th.device_memory(),
    compute_dtype="bfloat16 (autocast)" if th.autocast else "float32",
    channels_last=th.channels_last,
    mode="eager",
  )
  paired = [t / j for j, t in zip(times["jax"], times["torch"])]
  extra_results = {}
  for e in extras:
    es = summarize(times[e.name], imgs_per_step, args.steps_per_rep)
    e_paired = [t / j for j, t in zip(times[e.name], times["torch"])]
    es.update(
      first_call_s=round(e.first_call_s, 2),
      donation_ok=e.donation_ok,
      final_loss=e.final_loss(),
      ratio_jax_over_torch=round(es["median_images_per_s"] / ts["median_images_per_s"], 3),
      ratio_paired_median=round(statistics.median(e_paired), 3),
      ratio_paired_per_rep=[round(v, 3) for v in e_paired],
      speedup_over_first_paired_median=round(
        statistics.median([j / x for j, x in zip(times["jax"], times[e.name])]), 3
      ),
    )
    extra_results[e.conv_impl] = es
  result = {
    "command": cmd,
    "benchmark": "alda_dsbn train step, ResNet-50 (DSBN), source + target batch",
    "config": {
      "batch_per_domain": args.batch,
      "images_per_step": imgs_per_step,
      "image_size": args.image_size,
      "dtype": args.dtype,
      "device": args.device,
      "reps": args.reps,
      "steps_per_rep": args.steps_per_rep,
      "warmup_steps": args.warmup,
      "num_classes": args.num_classes,
      "threshold": args.threshold,
      "seed": args.seed,
      "pause_s": args.pause_s,
      "conv_impl": args.conv_impl,
      "rep_order": rep_order,
    },
    "machine": machine_info(args),
    "load_average": {
      "start": [round(v, 2) for v in load_start],
      "end": [round(v, 2) for v in os.getloadavg()],
      "after_each_rep_1min": rep_load,
      "note": "1/5/15-min load averages (os.getloadavg) of the whole machine",
    },
    "jax": js,
    "torch": ts,
    "ratio_jax_over_torch": round(js["median_images_per_s"] / ts["median_images_per_s"], 3),
    "ratio_paired_median": round(statistics.median(paired), 3),
    "ratio_paired_per_rep": [round(v, 3) for v in paired],
    **({"jax_other_conv_impls": extra_results} if extras else {}),
    "rss": rss,
    "wall_s": round(time.perf_counter() - wall0, 1),
  }
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w") as f:
    json.dump(result, f, indent=2)

  if args.device == "gpu":
    mem = (
      f"JAX {(js['device_memory'] or {}).get('peak_mib_in_use', '?')} MiB / torch "
      f"{ts['device_memory']['max_memory_allocated_mib']} MiB device peak"
    )
  else:
    mem = (
      f"RSS peak {rss['peak_during_jax_compile_mib']:.0f} MiB JAX compile, "
      f"{rss['peak_during_jax_steps_mib']:.0f} / {rss['peak_during_torch_steps_mib']:.0f} "
      f"MiB JAX / torch steps (one process)"
    )
  print()
  print(
    "| step | device | JAX img/s | PyTorch img/s | JAX/PyTorch | JAX compile | memory | "
    "load | command |"
  )
  print("|---|---|---|---|---|---|---|---|---|")
  print(
    f"| alda_dsbn ResNet-50, {args.batch}+{args.batch} @ {args.image_size}, {args.dtype} "
    f"(torch {ts['compute_dtype']}), conv_impl {args.conv_impl} | "
    f"{result['machine']['jax_device_kind']}, "
    f"{os.cpu_count()} CPUs, torch {torch.get_num_threads()} threads | "
    f"{js['median_images_per_s']} | {ts['median_images_per_s']} | "
    f"{result['ratio_jax_over_torch']} (paired {result['ratio_paired_median']}) | "
    f"{js['compile_s_est']} s | {mem} | {load_start[0]:.1f}-{os.getloadavg()[0]:.1f} | "
    f"`{cmd}` |"
  )
  for impl, es in extra_results.items():
    print(
      f"| same, conv_impl {impl} (alternating with the row above) | | "
      f"{es['median_images_per_s']} | {ts['median_images_per_s']} | "
      f"{es['ratio_jax_over_torch']} (paired {es['ratio_paired_median']}; "
      f"{es['speedup_over_first_paired_median']}x conv_impl {args.conv_impl}, paired) | "
      f"| | | |"
    )
  print(f"\nwrote {os.path.relpath(args.out, _REPO)}")
  return result


if __name__ == "__main__":
  main(ARGS)
