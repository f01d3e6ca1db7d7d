"""GPU check (issue 22): everything a lent GPU machine should measure, in one run of one script.

Sections, in this order (each one's figures are written to the JSON as soon as it ends, so a run
cut short keeps what it measured; a section that fails is recorded under ``errors`` and the others
still run; one that would not end inside ``--budget_s`` is recorded under ``skipped``):

1. ``torch_step``: the PyTorch reference step (``tests/torch_reference.py``'s ``Trainer``, the
   official ALDA iteration, on torchvision's ResNet-50 with every BN a DSBN, through
   ``benchmarks/step_throughput.py``'s ``TorchSide``) in float32 and in AMP bf16 (the networks under
   autocast, the losses in float32), channels_last and cudnn.benchmark on a GPU, TF32 allowed (what
   XLA's default precision does): median step time over ``--steps`` single steps after the warm-up,
   each followed by ``torch.cuda.synchronize``; img/s; ``torch.cuda.max_memory_allocated`` per mode.
   Its learning rate is 0 (the same kernels: SGD still computes and applies its update): stepping
   on one batch from a random init, the reference diverges within a few steps and its ALDA
   assertion then stops it. It runs in a child process of this script, on a GPU before the JAX
   process touches the device (torch's allocator and libraries stay out of it, and a torch crash
   leaves the JAX figures alone); on a CPU (``--smoke``) beside the JAX sections.
2. ``jax_step``: ``train_step.train_step`` jitted by ``sharding.jit_train_step`` (state donated) on
   a one-device mesh, the ``alda_dsbn`` model of ``heads.create_model`` (ResNet-50, random init),
   the config of ``configs/officehome.py``, in float32 and bfloat16 (``model.dtype``) with
   ``model.fused_pass`` False ("two_calls", the default) and True ("fused"). Per variant: the trace
   + lowering and XLA compile times (``jit(...).lower(...).compile()``), the compiled program's
   memory analysis, the median of ``--steps`` single steps after ``--warmup`` (each step blocked on
   with ``block_until_ready``), img/s (2 x batch images per step), the loss of the first and last
   step, and the device's ``peak_bytes_in_use`` after it (JAX's peak cannot be reset: a running
   maximum, the float32 two-call variant first so that its figure is its own). Every variant (and
   every loop, and the precision check) starts from the same initial state, kept in host memory,
   and the same first batch: their first losses agree up to rounding (a check of the maths on the
   device: the fused pass and bf16 compute the two-call float32 step).
3. ``loop``: ``train.py``'s per-step work for ``--loop_steps`` steps, reproduced (``train.py``
   imports tensorflow_datasets, which the GPU machine lacks): the jitted step in the loop's form,
   with the on-device watch (``train_step.watch_step``) in the same computation, ``reporting.Progress``, and a read of the
   metrics and the watch only every ``log_every_steps`` (the config's 50); img/s as ``Progress``
   measures it (the first step out). Left out, each a few microseconds per step with one process:
   the fault-injection hooks' environment lookups and ``GracefulStop.requested`` (a flag read);
   no evaluation, checkpoint or metrics file. Three sources of batches: ``device_resident`` (float32
   batches already on the device, cycled: the loop without any input transfer) and ``host_fed``
   (host float32 batches staged two ahead by ``sharding.prefetch_to_global``: what
   ``data.train_input='host'`` sends), both with section 2's float32 two-call jitted step (its
   first call here traces again and reuses the compiled program: ``first_step_s``); and
   ``resident_cache`` (``sharding.jit_train_step(..., train_input='resident')``: uint8 images held
   on the device, only row numbers, crop boxes and flips staged two ahead: what
   ``data.train_input='auto'`` picks on a GPU, augmented inside the step by ``device_augment``).
4. ``precision``: the first float32 two-call step (initial state, first batch) compiled at
   ``jax_default_matmul_precision`` 'default' (TF32 on NVIDIA Ampere and later) and at 'highest':
   every metric of the step, and the loss difference.

Synthetic data: normal-distributed float32 images and uniform labels (uint8 images for the
resident cache); random-init ResNet-50 (no weights file needed). ``loss.threshold`` is 0.0 (every
target row counts): a random-init network is never 90 % confident, and the reference's L_T is then
NaN (the mean of nothing), which poisons its weights and trips its assertion on the next step; the
JAX step's work does not depend on the threshold (masks).

  python benchmarks/gpu_check.py              # on the GPU machine (BENCHMARKS.md: the run command)
  python benchmarks/gpu_check.py --smoke      # CPU: small_cnn, 32 px, 2 + 2, 3 steps (< 1 min)

``--smoke`` runs every section on a CPU with JAX's ``small_cnn`` (torch keeps ResNet-50, at 32 px,
one thread), XLA's CPU backend at its lowest optimisation level, and the torch child beside the JAX
sections: a check of the code paths, whose figures mean nothing (``tests/gpu_check_test.py``).

Writes JSON to ``--out`` (default ``$OUT/gpu_check.json`` where ``OUT`` is set, else
``benchmarks/results/gpu_check_<date>.json``; ``gpu_check_smoke_<date>.json`` for ``--smoke``) and
prints a table. Needs jax, flax, optax, ml_collections (configs), torch and torchvision; never
imports TensorFlow (``dsbn_jax.train``, ``input_pipeline``, ``transforms`` and ``datasets`` do, at
import time, and are not imported).
"""

from __future__ import annotations

import argparse
import datetime
import gc
import itertools
import json
import os
import platform
import shlex
import statistics
import subprocess
import sys
import time
import traceback

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_BENCH = os.path.join(_REPO, "benchmarks")
for _p in (_BENCH, _REPO):  # the repository (dsbn_jax, configs, tests) and step_throughput
  if _p not in sys.path:
    sys.path.insert(0, _p)

T0 = time.perf_counter()

# Sizes per mode. full: the Office recipe (36 + 36 crops of 224 from the 256 resize) sized to end
# within 8 minutes on one H200; smoke: the same code on a CPU in well under a minute.
_FULL = dict(
  batch=36,
  image_size=224,
  warmup=5,
  steps=30,
  loop_steps=200,
  log_every=None,  # the config's log_every_steps (50)
  resident_images=512,  # per domain, 256 x 256 x 3 uint8 each
  budget_s=420.0,  # no section starts that would end past it
  torch_timeout_s=150.0,
)
_SMOKE = {"batch": 2, "image_size": 32, "resize_size": 40, "warmup": 1, "steps": 3}
_SMOKE.update(loop_steps=4, log_every=2, resident_images=8, budget_s=600.0, torch_timeout_s=240.0)
SIZES = {"full": _FULL, "smoke": _SMOKE}
DTYPES = ("float32", "bfloat16")
PASSES = (("two_calls", False), ("fused", True))  # model.fused_pass
SMOKE_BACKBONE = "small_cnn"  # --smoke's JAX backbone: the fewest ops to compile (torch: ResNet-50)
# --smoke on a CPU: LLVM at its lowest optimisation level (the smoke figures are never reported).
SMOKE_XLA_FLAGS = ("--xla_backend_optimization_level=0", "--xla_llvm_disable_expensive_passes=true")
OFFICE_HOME_ART_CLIPART = 2427 + 4365  # train images of the default task (configs/officehome.py)


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  p.add_argument("--smoke", action="store_true", help="tiny sizes, for a CPU")
  p.add_argument(
    "--device",
    choices=("gpu", "cpu"),
    default=None,
    help="where JAX and torch run (default: gpu, cpu with --smoke); gpu fails without one",
  )
  p.add_argument("--out", default=None, help="JSON path (default: see the module doc)")
  p.add_argument("--batch", type=int, default=None, help="images per domain per step")
  p.add_argument("--image_size", type=int, default=None, help="train crop size (px)")
  p.add_argument("--warmup", type=int, default=None, help="untimed steps before the timed ones")
  p.add_argument("--steps", type=int, default=None, help="timed single steps per variant")
  p.add_argument("--loop_steps", type=int, default=None, help="steps of each loop variant")
  p.add_argument(
    "--budget_s",
    type=float,
    default=None,
    help="seconds after which no further section starts (one that would run past it is skipped)",
  )
  p.add_argument("--no_torch", action="store_true", help="skip the PyTorch section")
  p.add_argument("--torch_child", default=None, help=argparse.SUPPRESS)  # internal: JSON path
  args = p.parse_args(argv)
  sizes = dict(SIZES["smoke" if args.smoke else "full"])
  for k in ("batch", "image_size", "warmup", "steps", "loop_steps", "budget_s"):
    if getattr(args, k) is not None:
      sizes[k] = getattr(args, k)
  args.sizes = sizes
  args.device = args.device or ("cpu" if args.smoke else "gpu")
  if args.out is None:
    name = f"gpu_check{'_smoke' if args.smoke else ''}_{datetime.date.today().isoformat()}.json"
    out_dir = os.environ.get("OUT") or os.path.join(_REPO, "benchmarks", "results")
    args.out = os.path.join(out_dir, "gpu_check.json" if os.environ.get("OUT") else name)
  return args


def say(msg: str) -> None:
  print(f"[gpu_check +{time.perf_counter() - T0:6.1f} s] {msg}", flush=True)


def _ms(seconds):
  return None if seconds is None else round(1000.0 * seconds, 3)


def timing_summary(step_s: list[float], images_per_step: int) -> dict:
  """Median step time and img/s of single timed steps (seconds each)."""
  med = statistics.median(step_s)
  return {
    "median_step_ms": _ms(med),
    "images_per_s": round(images_per_step / med, 2),
    "min_step_ms": _ms(min(step_s)),
    "max_step_ms": _ms(max(step_s)),
    "timed_steps": len(step_s),
    "step_ms": [_ms(s) for s in step_s],
  }


def make_config(dtype: str, fused: bool, smoke: bool, batch: int, image_size: int):
  """``configs/officehome.py`` (the Office-Home recipe: ALDA + DSBN on ResNet-50, SGD, inv schedule)
  at this check's batch and image size, random init, threshold 0.0 (module doc)."""
  from configs import officehome  # pylint: disable=g-import-not-at-top  (ml_collections)

  cfg = officehome.get_config()
  cfg.method = "alda_dsbn"
  cfg.batch_size = batch
  cfg.model.dtype = dtype
  cfg.model.fused_pass = fused
  cfg.model.pretrained_path = ""  # random init: no weights file on the device machine
  cfg.loss.threshold = 0.0
  cfg.data.crop_size = image_size
  if smoke:
    cfg.data.resize_size = SIZES["smoke"]["resize_size"]
    cfg.model.backbone = SMOKE_BACKBONE
  return cfg


def synthetic_batch(rng, batch: int, image_size: int, num_classes: int) -> dict:
  """A host batch of the 'host' train input: float32 NHWC images (normal), int32 labels."""

  def domain():
    return {
      "image": rng.standard_normal((batch, image_size, image_size, 3), dtype="float32"),
      "label": rng.integers(0, num_classes, batch).astype("int32"),
    }

  return {"source": domain(), "target": domain()}


def write_json(path: str, obj) -> None:
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  tmp = f"{path}.tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2)
  os.replace(tmp, path)


class Budget:
  """Wall-clock budget from the script's start: a section starts only if its estimate fits."""

  def __init__(self, limit_s: float):
    self.limit_s = limit_s

  def elapsed(self) -> float:
    return time.perf_counter() - T0

  def refuse(self, estimate_s: float) -> str | None:
    """None when a section of about ``estimate_s`` seconds fits; else why not."""
    if self.elapsed() + estimate_s <= self.limit_s:
      return None
    return (
      f"time budget: {self.elapsed():.0f} s used of --budget_s {self.limit_s:.0f}, and this "
      f"section takes about {estimate_s:.0f} s"
    )


# -------------------------------------------------------------------------------------- PyTorch
def torch_child(args) -> int:
  """The PyTorch section, in its own process: writes its JSON to ``args.torch_child``."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  import step_throughput as st  # pylint: disable=g-import-not-at-top  (torch before anything else)
  import torch  # pylint: disable=g-import-not-at-top
  import torchvision  # pylint: disable=g-import-not-at-top

  sz = args.sizes
  on_gpu = args.device == "gpu"
  if on_gpu and not torch.cuda.is_available():
    raise SystemExit("torch sees no CUDA device")
  if args.smoke:  # a shared CPU: OpenMP's spinning threads slow down 10x under load
    torch.set_num_threads(1)
  out = {
    "torch": torch.__version__,
    "torchvision": torchvision.__version__,
    "cuda": torch.version.cuda,
    "cudnn": torch.backends.cudnn.version() if on_gpu else None,
    "device_name": torch.cuda.get_device_name(0) if on_gpu else platform.processor() or "cpu",
    "model": "torchvision resnet50, every BN a DSBN (tests/torch_reference.py)",
    "settings": "cudnn.benchmark, TF32 matmul+conv allowed, channels_last (GPU)"
    if on_gpu
    else "CPU: float32 only (autocast bf16 is GPU-only in TorchSide), NCHW",
  }
  cfg = make_config("float32", False, args.smoke, sz["batch"], sz["image_size"])
  # lr 0: the same kernels (SGD still computes and applies its update), but the reference stepping
  # on one batch from a random init diverges within a few steps, and then its ALDA assertion
  # ("corrected label outside [0, 1]") stops it (seen at step 7 of --smoke).
  cfg.optim.lr0 = 0.0
  n_cls = cfg.model.num_classes
  batch = synthetic_batch(np.random.default_rng(0), sz["batch"], sz["image_size"], n_cls)
  images_per_step = 2 * sz["batch"]
  for dtype in DTYPES:
    st_args = st.parse_args(
      [
        "--device",
        args.device,
        "--dtype",
        dtype,
        "--batch",
        str(sz["batch"]),
        "--image_size",
        str(sz["image_size"]),
        "--torch_channels_last",
        "auto",
      ]
    )
    if on_gpu:
      torch.cuda.reset_peak_memory_stats()
    side = st.TorchSide(st_args, cfg, batch)
    first_s = side.run(1)  # cudnn.benchmark picks its algorithms here
    side.run(sz["warmup"])
    step_s = [side.run(1) for _ in range(sz["steps"])]
    entry = timing_summary(step_s, images_per_step)
    entry.update(
      lr0=cfg.optim.lr0,
      compute="bfloat16 (autocast)" if side.autocast else "float32",
      channels_last=side.channels_last,
      init_s=round(side.init_s, 2),
      first_step_s=round(first_s, 3),
      loss_last=side.final_loss(),
      max_memory_allocated_bytes=torch.cuda.max_memory_allocated() if on_gpu else None,
      max_memory_reserved_bytes=torch.cuda.max_memory_reserved() if on_gpu else None,
    )
    out[dtype] = entry
    print(
      f"[torch] {dtype}: {entry['median_step_ms']} ms/step, {entry['images_per_s']} img/s "
      f"({entry['compute']})",
      flush=True,
    )
    del side
    gc.collect()
    if on_gpu:
      torch.cuda.empty_cache()
  write_json(args.torch_child, out)
  return 0


def start_torch(args):
  """Starts the PyTorch child process; returns its handle for ``finish_torch``."""
  path = f"{args.out}.torch.json"
  if os.path.exists(path):
    os.remove(path)
  cmd = [sys.executable, os.path.abspath(__file__), "--torch_child", path, "--device", args.device]
  cmd += ["--smoke"] if args.smoke else []
  for k in ("batch", "image_size", "warmup", "steps"):
    cmd += [f"--{k}", str(args.sizes[k])]
  say("torch: " + shlex.join(cmd[1:]))
  return subprocess.Popen(cmd), path, time.perf_counter()


def finish_torch(args, handle, result: dict) -> None:
  """Waits for the child (at most ``torch_timeout_s`` from its start) and records its JSON."""
  proc, path, started = handle
  try:
    proc.wait(timeout=max(1.0, args.sizes["torch_timeout_s"] - (time.perf_counter() - started)))
  except subprocess.TimeoutExpired:
    proc.kill()
    proc.wait()
    raise RuntimeError(f"the torch child ran past {args.sizes['torch_timeout_s']:.0f} s") from None
  if proc.returncode != 0 or not os.path.exists(path):
    raise RuntimeError(f"the torch child exited {proc.returncode} (its output is above)")
  with open(path) as f:
    ts = result["torch_step"] = json.load(f)
  os.remove(path)
  result["memory"]["torch_max_memory_allocated_bytes"] = {
    d: ts[d]["max_memory_allocated_bytes"] for d in DTYPES
  }
  for k in ("torch", "torchvision", "cuda", "cudnn", "device_name"):
    result["device"][f"torch_{k}" if k != "torch" else k] = ts[k]


# ------------------------------------------------------------------------------------------ JAX
class JaxCheck:
  """The JAX sections: one state, one device-resident batch, the compiled variants."""

  def __init__(self, args):
    import jax  # pylint: disable=g-import-not-at-top
    import numpy as np  # pylint: disable=g-import-not-at-top

    from dsbn_jax import sharding  # pylint: disable=g-import-not-at-top
    from dsbn_jax.models import heads  # pylint: disable=g-import-not-at-top

    self.jax, self.np, self.sharding = jax, np, sharding
    self.args, self.sz = args, args.sizes
    self.images_per_step = 2 * self.sz["batch"]
    self.device = jax.devices()[0]
    self.mesh = sharding.make_mesh([self.device])
    self.cfgs = {
      (dtype, name): make_config(dtype, fused, args.smoke, self.sz["batch"], self.sz["image_size"])
      for dtype in DTYPES
      for name, fused in PASSES
    }
    base = self.cfgs[("float32", "two_calls")]
    self.models = {dtype: heads.create_model(self.cfgs[(dtype, "two_calls")]) for dtype in DTYPES}
    self.host_rng = np.random.default_rng(0)
    n_cls = base.model.num_classes
    self.host_pool = [
      synthetic_batch(self.host_rng, self.sz["batch"], self.sz["image_size"], n_cls)
      for _ in range(2)
    ]
    self.batch = sharding.to_global(self.host_pool[0], self.mesh)
    init_rng, step_rng = jax.random.split(jax.random.key(base.seed))
    self.rng = sharding.replicate(step_rng, self.mesh)
    t0 = time.perf_counter()
    size = self.sz["image_size"]
    state = sharding.create_sharded_state(
      self.mesh, init_rng, base, self.models["float32"], (size, size, 3)
    )
    jax.block_until_ready(state)
    self.init_s = time.perf_counter() - t0
    # Every variant, loop and precision step starts from this state (kept in host memory), so
    # that their first losses compare: the same maths in every variant, up to rounding.
    self.init_host = jax.device_get(state)
    del state
    self.jitted, self.compiled = {}, {}
    self.variant_s = []  # wall seconds of each step variant (the next one's estimate)

  def memory(self) -> dict | None:
    stats = self.device.memory_stats()
    if not stats:
      return None
    keep = ("peak_bytes_in_use", "bytes_in_use", "bytes_limit")
    return {k: int(stats[k]) for k in keep if k in stats}

  def initial(self, dtype: str = "float32"):
    """A fresh device copy of the initial state, with ``dtype``'s model (each step donates it)."""
    state = self.sharding.replicate(self.init_host, self.mesh)
    return state.replace(apply_fn=self.models[dtype].apply)

  def _compile(self, cfg, state, *extra, train_input=None, watch=False):
    """(jitted step, compiled step, seconds to trace + lower, seconds of XLA's compile), at the
    config's matmul precision as train.py runs it; ``watch``: the train loop's form, which
    takes and returns the on-device watch (``train_step.watch_step``) too."""
    kwargs = {} if train_input is None else {"train_input": train_input}
    with self.jax.default_matmul_precision(cfg.model.matmul_precision):
      fn = self.sharding.jit_train_step(self.mesh, cfg, watch=watch, **kwargs)
      t0 = time.perf_counter()
      watched = (self.empty_watch(),) if watch else ()
      batch = self.batch if not extra else extra[0]
      lowered = fn.lower(state, *watched, batch, self.rng, *extra[1:])
      t1 = time.perf_counter()
      compiled = lowered.compile()
      t2 = time.perf_counter()
    return fn, compiled, t1 - t0, t2 - t1

  @staticmethod
  def memory_analysis(compiled) -> dict | None:
    try:
      ma = compiled.memory_analysis()
    except Exception:  # pylint: disable=broad-except  (not every backend has one)
      return None
    if ma is None:
      return None
    names = ("argument", "output", "alias", "temp", "generated_code")
    return {f"{n}_bytes": int(getattr(ma, f"{n}_size_in_bytes", -1)) for n in names}

  # --- section 2: the step variants ---------------------------------------------------------
  def step_variant(self, dtype: str, name: str) -> dict:
    jax, cfg = self.jax, self.cfgs[(dtype, name)]
    t_start = time.perf_counter()
    state = self.initial(dtype)
    fn, compiled, lower_s, compile_s = self._compile(cfg, state)
    self.jitted[(dtype, name)], self.compiled[(dtype, name)] = fn, compiled
    state, metrics = compiled(state, self.batch, self.rng)
    loss_first = float(jax.device_get(metrics["train/loss"]))
    for _ in range(self.sz["warmup"]):
      state, metrics = compiled(state, self.batch, self.rng)
    jax.block_until_ready(metrics)
    step_s = []
    for _ in range(self.sz["steps"]):
      t0 = time.perf_counter()
      state, metrics = compiled(state, self.batch, self.rng)
      jax.block_until_ready(metrics)
      step_s.append(time.perf_counter() - t0)
    del state
    host = jax.device_get(metrics)
    entry = timing_summary(step_s, self.images_per_step)
    entry.update(
      compile_s=round(lower_s + compile_s, 2),
      trace_lower_s=round(lower_s, 2),
      xla_compile_s=round(compile_s, 2),
      loss_first=loss_first,
      loss_last=float(host["train/loss"]),
      finite=bool(all(self.np.isfinite(v).all() for v in host.values())),
      compiled_memory=self.memory_analysis(compiled),
      device_memory_after=self.memory(),
    )
    self.variant_s.append(time.perf_counter() - t_start)
    return entry

  # --- section 3: the loop ----------------------------------------------------------------------
  def empty_watch(self):
    from dsbn_jax import train_step  # pylint: disable=g-import-not-at-top

    return self.sharding.replicate(train_step.empty_watch(), self.mesh)

  def watched_step(self):
    """The float32 two-call step in the train loop's form (``watch=True``), jitted once."""
    if "watched" not in self.jitted:
      cfg = self.cfgs[("float32", "two_calls")]
      self.jitted["watched"] = self.sharding.jit_train_step(self.mesh, cfg, watch=True)
    return self.jitted["watched"]

  def run_loop(self, step_fn, batches, total: int, extra=(), state=None) -> dict:
    """train.py's per-step pattern: the step with its on-device watch (``step_fn``, jitted with
    ``watch=True``), Progress; the metrics and the watch read back only every log_every_steps
    (and at the end)."""
    jax = self.jax
    from dsbn_jax import reporting  # pylint: disable=g-import-not-at-top

    log_every = self.sz["log_every"] or self.cfgs[("float32", "two_calls")].log_every_steps
    progress = reporting.Progress(total, 0, self.images_per_step, sync=jax.block_until_ready)
    watch, reads, rows = self.empty_watch(), 0, []
    state = self.initial() if state is None else state
    t0 = time.perf_counter()
    first_step_s = None
    with jax.default_matmul_precision(self.cfgs[("float32", "two_calls")].model.matmul_precision):
      for step in range(total):
        state, watch, metrics = step_fn(state, watch, next(batches), self.rng, *extra)
        done = step + 1
        progress.tick(done, metrics)  # the first step syncs and starts the clock
        if done == 1:
          first_step_s = time.perf_counter() - t0
        if done % log_every == 0 or done == total:
          host, watched = jax.device_get((metrics, watch))
          reads += 1
          rows.append({"step": done, "loss": float(host["train/loss"])})
          progress.report(done, {k: host[k] for k in ("train/loss", "train/source_acc")})
    jax.block_until_ready(state)
    wall = time.perf_counter() - t0
    rate = progress.rate(total)
    progress.close()
    del state
    bad = sorted(k for k, b in zip(sorted(host), watched["bad"]) if b)
    return {
      "steps": total,
      "images_per_s": round(rate, 2),
      "wall_s": round(wall, 2),
      "first_step_s": round(first_step_s, 3),
      "host_reads": reads,
      "log_every_steps": log_every,
      "finite": int(watched["step"]) == 0,
      "first_nonfinite_step": int(watched["step"]) or None,
      "nonfinite_metrics": bad,
      "loss_rows": rows,
    }

  def loop_device_resident(self) -> dict:
    pool = [self.batch, self.sharding.to_global(self.host_pool[1], self.mesh)]
    out = self.run_loop(self.watched_step(), itertools.cycle(pool), self.sz["loop_steps"])
    out["batches"] = "2 float32 batches on the device, cycled (no input transfer)"
    return out

  def loop_host_fed(self) -> dict:
    total = self.sz["loop_steps"]
    host = itertools.islice(itertools.cycle(self.host_pool), total)
    batches = self.sharding.prefetch_to_global(host, self.mesh)  # two staged ahead, as train.py
    out = self.run_loop(self.watched_step(), batches, total)
    out["batches"] = "2 host float32 batches, cycled, through sharding.prefetch_to_global"
    return out

  def real_run_train_input(self) -> str | None:
    """What data.train_input='auto' picks for Office-Home Art -> Clipart on this platform."""
    from dsbn_jax import device_augment  # pylint: disable=g-import-not-at-top

    data = self.cfgs[("float32", "two_calls")].data
    return device_augment.resolve_train_input(
      data, self.sharding.platform(self.mesh), OFFICE_HOME_ART_CLIPART
    )

  def loop_resident_cache(self) -> dict:
    """data.train_input='resident': uint8 resized images held on the device; the host stages only
    row numbers, crop boxes and flips (two ahead), and the step crops, flips and normalises."""
    np, sz = self.np, self.sz
    cfg = self.cfgs[("float32", "two_calls")].copy_and_resolve_references()
    cfg.data.train_input = "resident"
    n, r, b, size = sz["resident_images"], cfg.data.resize_size, sz["batch"], sz["image_size"]
    rng = self.host_rng
    images = {d: rng.integers(0, 256, (n, r, r, 3), dtype=np.uint8) for d in ("source", "target")}
    images = self.sharding.replicate(images, self.mesh)

    def draws():
      side = rng.integers(size // 2, r + 1, (b, 2))  # crop height, width in [S/2, R]
      top = rng.integers(0, r - side[:, 0] + 1)
      left = rng.integers(0, r - side[:, 1] + 1)
      return {
        "row": rng.integers(0, n, b).astype(np.int32),
        "box": np.stack([top, left, side[:, 0], side[:, 1]], axis=1).astype(np.int32),
        "flip": rng.integers(0, 2, b).astype(bool),
        "label": rng.integers(0, cfg.model.num_classes, b).astype(np.int32),
        "mask": np.ones(b, bool),
      }

    pool = [{"source": draws(), "target": draws()} for _ in range(4)]
    example = self.sharding.to_global(pool[0], self.mesh)
    t0 = time.perf_counter()
    state = self.initial()
    fn, _, lower_s, compile_s = self._compile(
      cfg, state, example, images, train_input="resident", watch=True
    )
    total = sz["loop_steps"]
    batches = self.sharding.prefetch_to_global(
      itertools.islice(itertools.cycle(pool), total), self.mesh
    )
    out = self.run_loop(fn, batches, total, extra=(images,), state=state)
    out.update(
      batches=f"uint8 {r}x{r} images, {n} per domain, held on the device; rows, boxes and flips "
      "staged by sharding.prefetch_to_global; augmented in the step (device_augment)",
      compile_s=round(lower_s + compile_s, 2),
      section_s=round(time.perf_counter() - t0, 2),
    )
    return out

  # --- section 4: precision ---------------------------------------------------------------------
  def precision(self) -> dict:
    jax, np = self.jax, self.np
    key = ("float32", "two_calls")
    cfg = self.cfgs[key].copy_and_resolve_references()
    cfg.model.matmul_precision = "highest"
    _, m_default = self.compiled[key](self.initial(), self.batch, self.rng)
    state = self.initial()
    _, compiled, lower_s, compile_s = self._compile(cfg, state)
    _, m_highest = compiled(state, self.batch, self.rng)
    d, h = jax.device_get((m_default, m_highest))
    metrics = {
      k: {"default": float(d[k]), "highest": float(h[k]), "abs_diff": float(abs(d[k] - h[k]))}
      for k in sorted(d)
    }
    loss_d, loss_h = float(d["train/loss"]), float(h["train/loss"])
    return {
      "what": "the first float32 step (initial state, first batch): "
      "jax_default_matmul_precision 'default' (TF32 on NVIDIA Ampere+) vs 'highest'",
      "loss_default": loss_d,
      "loss_highest": loss_h,
      "loss_abs_diff": abs(loss_d - loss_h),
      "loss_rel_diff": abs(loss_d - loss_h) / max(abs(loss_h), 1e-30),
      "finite": bool(np.isfinite([loss_d, loss_h]).all()),
      "highest_compile_s": round(lower_s + compile_s, 2),
      "metrics": metrics,
    }


def run_jax_sections(args, result: dict, budget: Budget, save) -> None:
  """Sections 2-4, each recorded (or its error or skip) as it ends."""
  import flax  # pylint: disable=g-import-not-at-top
  import jax  # pylint: disable=g-import-not-at-top
  import jaxlib  # pylint: disable=g-import-not-at-top
  import optax  # pylint: disable=g-import-not-at-top

  dev = jax.devices()[0]
  result["device"].update(
    jax=jax.__version__,
    jaxlib=getattr(jaxlib, "__version__", None),
    flax=flax.__version__,
    optax=optax.__version__,
    jax_backend=jax.default_backend(),
    jax_device_kind=dev.device_kind,
    jax_devices=len(jax.devices()),
    compilation_cache_dir=getattr(jax.config, "jax_compilation_cache_dir", None),
  )
  say(f"JAX {jax.__version__} on {dev.device_kind} ({jax.default_backend()}); building the state")
  jc = JaxCheck(args)
  result["jax_state_init_s"] = round(jc.init_s, 2)
  save()

  def section(path: tuple, fn, estimate_s: float) -> None:
    name = "/".join(path)
    why = budget.refuse(estimate_s)
    if why:
      result["skipped"][name] = why
      say(f"{name}: skipped ({why})")
      save()
      return
    say(f"{name} ...")
    try:
      value = fn()
    except Exception:  # pylint: disable=broad-except  (recorded; the other sections still run)
      result["errors"][name] = traceback.format_exc()[-4000:]
      say(f"{name}: FAILED\n{result['errors'][name]}")
    else:
      node = result
      for k in path[:-1]:
        node = node.setdefault(k, {})
      node[path[-1]] = value
      say(f"{name}: {_one_line(value)}")
    result["memory"]["jax_peak_bytes_in_use"] = (jc.memory() or {}).get("peak_bytes_in_use")
    save()

  for dtype, name in (
    ("float32", "two_calls"),
    ("bfloat16", "two_calls"),
    ("float32", "fused"),
    ("bfloat16", "fused"),
  ):
    last = jc.variant_s[-1] if jc.variant_s else 0.0
    section(("jax_step", dtype, name), lambda d=dtype, n=name: jc.step_variant(d, n), last)

  have_step = ("float32", "two_calls") in jc.jitted
  two = result.get("jax_step", {}).get("float32", {}).get("two_calls", {})
  result["memory"]["jax_peak_bytes_in_use_float32_two_calls"] = (
    two.get("device_memory_after") or {}
  ).get("peak_bytes_in_use")
  step_ms = (result.get("jax_step", {}).get("float32", {}).get("two_calls") or {}).get(
    "median_step_ms", 0.0
  )
  loop_est = args.sizes["loop_steps"] * (step_ms or 0.0) / 1000.0 * 1.5 + 5.0
  compile_est = max(jc.variant_s, default=0.0)
  try:
    result["loop_real_run_train_input"] = jc.real_run_train_input()
  except Exception as e:  # pylint: disable=broad-except  (a note, not a measurement)
    result["loop_real_run_train_input"] = f"unknown: {e!r}"
  if have_step:
    section(("loop", "device_resident"), jc.loop_device_resident, loop_est)
    section(("loop", "host_fed"), jc.loop_host_fed, loop_est)
    section(("loop", "resident_cache"), jc.loop_resident_cache, loop_est + compile_est)
    section(("precision",), jc.precision, compile_est)
  else:
    result["skipped"]["loop"] = result["skipped"]["precision"] = "no float32 two_calls step"


def _one_line(value) -> str:
  if isinstance(value, dict):
    keys = ("median_step_ms", "images_per_s", "compile_s", "loss_abs_diff", "finite")
    return ", ".join(f"{k} {value[k]}" for k in keys if k in value)
  return str(value)


# ------------------------------------------------------------------------------------ the run
def gpu_info() -> dict | None:
  try:
    out = subprocess.run(
      [
        "nvidia-smi",
        "--query-gpu=name,driver_version,memory.total,clocks.max.sm",
        "--format=csv,noheader",
      ],
      capture_output=True,
      text=True,
      timeout=20,
      check=True,
    ).stdout.strip()
  except (OSError, subprocess.SubprocessError):
    return None
  return {"nvidia_smi": out}


def ratios(result: dict) -> dict:
  """JAX img/s over PyTorch img/s, per dtype and pass (torch's bf16 is AMP)."""
  out = {}
  torch_side = result.get("torch_step") or {}
  for dtype in DTYPES:
    t = (torch_side.get(dtype) or {}).get("images_per_s")
    for name, _ in PASSES:
      j = (result.get("jax_step", {}).get(dtype, {}).get(name) or {}).get("images_per_s")
      out.setdefault(dtype, {})[name] = round(j / t, 3) if j and t else None
  return out


def print_table(result: dict) -> None:
  def cell(entry):
    if not entry:
      return "–"
    return f"{entry['median_step_ms']} ms ({entry['images_per_s']} img/s)"

  js, ts = result.get("jax_step", {}), result.get("torch_step") or {}
  s, kind = result["settings"], result["device"].get("jax_device_kind")
  print(f"\n| {s['batch']} + {s['batch']} @ {s['image_size']}, {kind} | float32 | bfloat16 |")
  print("|---|---|---|")
  for name, _ in PASSES:
    row = [cell(js.get(d, {}).get(name)) for d in DTYPES]
    print(f"| JAX step, {name}: median (img/s) | {row[0]} | {row[1]} |")
    comp = [str((js.get(d, {}).get(name) or {}).get("compile_s", "–")) for d in DTYPES]
    print(f"| JAX compile s, {name} | {comp[0]} | {comp[1]} |")
  print(f"| PyTorch step (bf16: AMP) | {cell(ts.get('float32'))} | {cell(ts.get('bfloat16'))} |")
  for name, _ in PASSES:
    r = [result["ratio_jax_over_torch"].get(d, {}).get(name) for d in DTYPES]
    print(f"| JAX / PyTorch, {name} | {r[0]} | {r[1]} |")
  jmem = [
    ((js.get(d, {}).get("two_calls") or {}).get("device_memory_after") or {}).get(
      "peak_bytes_in_use"
    )
    for d in DTYPES
  ]
  tmem = [(ts.get(d) or {}).get("max_memory_allocated_bytes") for d in DTYPES]
  print(f"| peak MiB, JAX after two_calls (running max) | {_mib(jmem[0])} | {_mib(jmem[1])} |")
  print(f"| peak MiB, PyTorch max_memory_allocated | {_mib(tmem[0])} | {_mib(tmem[1])} |")
  print(f"| peak MiB, JAX whole run | {_mib(result['memory'].get('jax_peak_bytes_in_use'))} | |")
  for name, entry in result.get("loop", {}).items():
    print(f"| loop {entry.get('steps')} steps, {name}: img/s | {entry.get('images_per_s')} | |")
  p = result.get("precision") or {}
  print(
    f"| loss default - highest (abs, rel) | {p.get('loss_abs_diff')} | {p.get('loss_rel_diff')} |"
  )
  print(f"| wall s | {result.get('wall_s')} | |")
  for k, v in result["skipped"].items():
    print(f"skipped {k}: {v}")
  for k in result["errors"]:
    print(f"FAILED {k} (traceback in the JSON)")


def _mib(n):
  return "–" if n is None else f"{n / 2**20:.0f}"


def main(argv=None) -> int:
  args = parse_args(argv)
  # Before JAX is imported: the platform (a GPU run fails rather than measuring the CPU).
  os.environ["JAX_PLATFORMS"] = "cuda" if args.device == "gpu" else "cpu"
  os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
  if args.smoke and args.device == "cpu":  # its figures mean nothing: compile fast (about 1.5x)
    os.environ["XLA_FLAGS"] = " ".join([os.environ.get("XLA_FLAGS", ""), *SMOKE_XLA_FLAGS]).strip()
  if args.torch_child:
    return torch_child(args)
  result = {
    "check": "benchmarks/gpu_check.py (issue 22)",
    "command": shlex.join(["python", *sys.argv]),
    "date": datetime.datetime.now().isoformat(timespec="seconds"),
    "smoke": args.smoke,
    "settings": {
      **args.sizes,
      "images_per_step": 2 * args.sizes["batch"],
      "method": "alda_dsbn",
      "config": "configs/officehome.py, random init, loss.threshold 0.0",
      "backbone": f"{SMOKE_BACKBONE} (JAX), resnet50 (torch)" if args.smoke else "resnet50",
      "device": args.device,
      "xla_flags": os.environ.get("XLA_FLAGS", ""),
    },
    "device": {
      "python": platform.python_version(),
      "host": platform.node(),
      "cpu_count": os.cpu_count(),
      **(gpu_info() or {}),
    },
    "memory": {},
    "skipped": {},
    "errors": {},
  }

  def save() -> None:
    result["wall_s"] = round(time.perf_counter() - T0, 1)
    result["ratio_jax_over_torch"] = ratios(result)
    write_json(args.out, result)

  budget = Budget(args.sizes["budget_s"])
  say(f"writing {args.out}")
  torch_handle = None

  def torch_step(action) -> None:
    nonlocal torch_handle
    try:
      torch_handle = action()
    except Exception:  # pylint: disable=broad-except  (recorded; the JAX sections still run)
      torch_handle = None
      result["errors"]["torch_step"] = traceback.format_exc()[-4000:]
      say(f"torch_step: FAILED\n{result['errors']['torch_step']}")
    save()

  if args.no_torch:
    result["skipped"]["torch_step"] = "--no_torch"
  else:
    torch_step(lambda: start_torch(args))
    # On a GPU the child ends before JAX touches the device; a CPU (--smoke) runs both at once.
    if args.device == "gpu" and torch_handle:
      torch_step(lambda: finish_torch(args, torch_handle, result))
  try:
    run_jax_sections(args, result, budget, save)
  except Exception:  # pylint: disable=broad-except  (the state or the device failed)
    result["errors"]["jax"] = traceback.format_exc()[-4000:]
    say(f"jax: FAILED\n{result['errors']['jax']}")
  if torch_handle:
    torch_step(lambda: finish_torch(args, torch_handle, result))
  save()
  print_table(result)
  say(f"wrote {args.out}")
  return 1 if result["errors"] else 0


if __name__ == "__main__":
  sys.exit(main())
