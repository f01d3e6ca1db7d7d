"""Run outputs: JSONL + TensorBoard metrics, a progress bar, accuracy/loss plots, result tables."""

import contextlib
import json
import math
import os
import sys
import time
from collections.abc import Mapping

import numpy as np
import tqdm

from dsbn_jax.errors import UserError


def _name_file(e: OSError, path: str) -> OSError:
  """``e`` with ``path`` as its file when it names none (a failed ``write``/``flush`` does not):
  the one-line error for a full disk then says which file (``cli.disk_full_message``)."""
  if e.filename is None:
    e.filename = path
  return e


def write_atomic(path: str, text: str) -> None:
  """Writes ``text`` to ``path`` through ``path.tmp`` and a rename: a crash or a full disk never
  leaves half a file (the old one is kept); an ``OSError`` names ``path``."""
  tmp = path + ".tmp"
  try:
    with open(tmp, "w", encoding="utf-8") as f:
      f.write(text)
    os.replace(tmp, path)
  except OSError as e:
    try:
      os.remove(tmp)
    except OSError:
      pass
    e.filename = None if e.filename in (tmp, None) else e.filename
    raise _name_file(e, path)


def read_json(path: str, kind: type = dict, errors: str = "strict"):
  """The JSON value in ``path``, whose top level must be a ``kind`` (dict or list): what the run
  files (``config.json``, ``classes.json``, ``results.json``) hold. A ``ValueError`` says why not:
  truncated or not JSON (``json.JSONDecodeError``, not UTF-8), or another type at the top."""
  with open(path, encoding="utf-8", errors=errors) as f:
    value = json.load(f)
  if not isinstance(value, kind):
    raise ValueError(f"not a JSON {'object' if kind is dict else 'list'}")
  return value


class MetricWriter:
  """Writes scalars to ``<workdir>/metrics.jsonl`` and TensorBoard event files (process 0 only)."""

  def __init__(
    self,
    workdir: str,
    enabled: bool = True,
    resume_step: int | None = None,
    reevaluate: bool = False,
  ):
    """``resume_step``: the step the run resumes from. Rows after it in ``metrics.jsonl`` were
    written by the crashed attempt and are written again as the run repeats those steps, so they
    are dropped first (TensorBoard keeps the newest value per step by itself). ``reevaluate``: the
    run is finished and evaluates its final step again, so that step's eval row goes too."""
    self.enabled = enabled
    self._tb = None
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, "metrics.jsonl")
    self._path = path
    if resume_step is not None and os.path.exists(path):
      # A truncated last line (a crash or a full disk mid-write) is dropped with a warning.
      rows = read_jsonl(path, truncated_ok=True) if resume_step > 0 else []  # 0: all go
      kept = [
        r
        for r in rows
        if r["step"] < resume_step
        or (r["step"] == resume_step and not (reevaluate and "eval/accuracy" in r))
      ]
      write_atomic(path, "".join(json.dumps(r) + "\n" for r in kept))
    self._jsonl = open(path, "a", encoding="utf-8")
    import tensorflow as tf  # TensorBoard events via tf.summary (TF is already the input stack)

    self._tf = tf
    self._tb = tf.summary.create_file_writer(os.path.join(workdir, "tensorboard"))

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    row = {"step": int(step), **{k: float(v) for k, v in scalars.items()}}
    try:
      self._jsonl.write(json.dumps(row) + "\n")
      self._jsonl.flush()
    except OSError as e:
      raise _name_file(e, self._path)
    with self._tb.as_default(step=int(step)):
      for k, v in scalars.items():
        self._tf.summary.scalar(k, float(v))
    self._tb.flush()

  def close(self, quiet: bool = False) -> None:
    """Closes the files; ``quiet``: on the way out of an error, whose message says what failed,
    a failure to flush them (a full disk again) is not raised over it."""
    if not self.enabled or self._tb is None:
      return
    jsonl, tb, self._tb = self._jsonl, self._tb, None
    try:
      try:
        jsonl.close()
      finally:
        tb.close()
    except Exception:  # pylint: disable=broad-except
      if not quiet:
        raise


def read_jsonl(path: str, truncated_ok: bool = False, warn=None) -> list[dict]:
  """The rows of a ``metrics.jsonl`` (``[]`` if there is none), each a JSON object with a step.

  ``truncated_ok``: a last line that does not parse -- what a crash or a full disk in the middle of
  a write leaves (half a row, or NUL bytes after a power loss) -- is dropped with a ``warning:`` line through ``warn`` (default: stderr); any
  other bad line is a ``UserError`` naming the file and the line.
  """
  if not os.path.exists(path):
    return []
  with open(path, encoding="utf-8", errors="replace") as f:
    lines = [(n, line) for n, line in enumerate(f, 1) if line.strip()]
  rows = []
  for i, (n, line) in enumerate(lines):
    try:
      row = json.loads(line)
    except ValueError as e:  # JSONDecodeError: cut short (a row always ends with its "}")
      why = " ".join(str(e).split())
      if truncated_ok and i == len(lines) - 1:
        (warn or _stderr)(
          f"warning: {path} line {n} is truncated ({why}), left by an interrupted "
          "write; dropped (the run writes the steps after its checkpoint again)"
        )
        break
    else:
      step = row.get("step") if isinstance(row, dict) else None
      if isinstance(step, int) and not isinstance(step, bool):
        rows.append(row)
        continue
      why = "not a JSON object with an integer 'step'"
    raise UserError(
      f"{path} line {n} is damaged ({why}); move the file away (the run keeps the "
      "metrics it writes from then on) or choose a new --workdir"
    )
  return rows


def _stderr(line: str) -> None:
  print(line, file=sys.stderr, flush=True)


def fmt_duration(seconds: float) -> str:
  if not math.isfinite(seconds):
    return "?"
  seconds = int(seconds)
  h, rem = divmod(seconds, 3600)
  m, s = divmod(rem, 60)
  return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class Progress:
  """Training progress (process 0): step/total, img/s, ETA and chosen metrics, at each report.

  On a terminal a tqdm bar, redrawn at each report (``write`` prints a line above it); off a
  terminal (a log file) one line per report, e.g. ``step 500/10000 (5%) 71.3 img/s ETA 2h13m
  loss=1.234 source_acc=0.5``. The rate counts training steps only: the clock starts once the
  session's first step (its compilation) has run, and the time ``excluded`` (evaluations,
  checkpoints) is left out. The ETA is the remaining steps at the pace of this session since its
  first step, evaluations and checkpoints included.

  ``sync(x)`` blocks until the device values ``x`` are computed (``jax.block_until_ready``): JAX
  dispatches steps asynchronously, so the clock reads are taken once the work before them is done.
  """

  def __init__(
    self,
    total_steps: int,
    start_step: int,
    images_per_step: int,
    enabled: bool = True,
    sync=lambda x: x,
    file=None,
  ):
    self.total, self.images_per_step, self.enabled = total_steps, images_per_step, enabled
    self._sync = sync
    self._file = file or sys.stdout
    self._clock_step = self._t0 = None  # the clock starts after the session's first step
    self._excluded = 0.0  # seconds of evaluations and checkpoints since the clock started
    self._bar = None
    if enabled and self._file.isatty():
      self._bar = tqdm.tqdm(
        total=total_steps,
        initial=start_step,
        file=self._file,
        dynamic_ncols=True,
        mininterval=0,
        smoothing=0,
        bar_format="step {n}/{total} {percentage:3.0f}%|{bar}| {postfix}",
      )

  def tick(self, step: int, ready) -> None:
    """After each step (``ready``: its outputs): the session's first one starts the clock."""
    if self._t0 is None:
      self._sync(ready)
      self._clock_step, self._t0 = step, time.perf_counter()

  @contextlib.contextmanager
  def excluded(self, ready=None):
    """A block that is not training (an evaluation, a checkpoint): its time leaves the rate.
    ``ready``: the state it reads, waited for first (the steps before it are training time)."""
    if self._t0 is None:
      yield
      return
    self._sync(ready)
    t = time.perf_counter()
    try:
      yield
    finally:
      self._excluded += time.perf_counter() - t

  def rate(self, step: int) -> float:
    """Images per second of the training steps of this session up to ``step`` (0.0: none timed)."""
    if self._t0 is None or step <= self._clock_step:
      return 0.0
    dt = time.perf_counter() - self._t0 - self._excluded
    return (step - self._clock_step) * self.images_per_step / dt if dt > 0 else 0.0

  def eta(self, step: int) -> float:
    """Seconds to ``total_steps`` at this session's pace since its first step (inf: not known)."""
    if self._t0 is None or step <= self._clock_step:
      return float("inf")
    return (self.total - step) * (time.perf_counter() - self._t0) / (step - self._clock_step)

  def report(self, step: int, metrics: Mapping[str, float]) -> None:
    if not self.enabled:
      return
    shown = " ".join(f"{k.split('/')[-1]}={v:.4g}" for k, v in metrics.items())
    status = f"{self.rate(step):.1f} img/s ETA {fmt_duration(self.eta(step))} {shown}".strip()
    if self._bar is not None:
      self._bar.update(step - self._bar.n)
      self._bar.set_postfix_str(status)  # redraws
    else:
      print(
        f"step {step}/{self.total} ({100 * step / max(self.total, 1):.0f}%) {status}",
        file=self._file,
        flush=True,
      )

  def write(self, line: str) -> None:
    """Prints ``line`` (above the bar on a terminal)."""
    if self._bar is not None:
      self._bar.write(line, file=self._file)
    else:
      print(line, file=self._file, flush=True)

  def close(self) -> None:
    if self._bar is not None:
      self._bar.close()
      self._bar = None


# plot_curves' panels, in order: (metric, title, y label). A term a method does not log is skipped.
# Every method's transfer terms (dsbn_jax/methods/*.py, ``loss_terms``) have a panel, and so has
# CDAN+E's entropy coefficient; the GRL coefficient, ALDA's lambda_t and the diagnostic
# train/target_acc have none (tests/reporting_test.py checks both against what each method logs).
CURVES = (
  ("eval/accuracy", "target accuracy (evaluation)", "accuracy (%)"),
  ("train/loss", "total loss (CE + transfer)", "loss"),
  ("train/ce", "source cross-entropy", "loss"),
  ("train/adv", "adversarial loss (ALDA)", "loss"),
  ("train/reg", "discriminator regulariser", "loss"),
  ("train/correct", "corrected-target loss", "loss"),
  ("train/dann", "DANN domain loss", "loss"),
  ("train/cdan", "CDAN conditional domain loss", "loss"),
  ("train/mada", "MADA class-wise domain losses (sum)", "loss"),
  ("train/jmmd", "JAN joint MMD", "discrepancy"),
  ("train/mcc", "MCC class confusion (target)", "loss"),
  ("train/bnm", "BNM: − mean singular value (target)", "loss"),
  ("train/entropy_coeff", "CDAN+E entropy GRL coefficient", "coefficient"),
  ("train/confident_frac", "confident target fraction", "fraction of target batch"),
)


def plot_curves(jsonl_path: str, png_path: str, title: str = "") -> list[str]:
  """Target accuracy, each training loss term (every method's: ``CURVES``), CDAN+E's entropy
  coefficient and the confident fraction against step, each on its own axes, from
  ``metrics.jsonl``; returns the titles of the axes drawn.

  The accuracy panel is always drawn (empty before the first evaluation); the others only for the
  metrics the run logged (source_only: total and CE).
  """
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  rows = read_jsonl(jsonl_path)
  panels = []
  for key, name, ylabel in CURVES:
    pts = [(r["step"], r[key]) for r in rows if key in r and np.isfinite(r[key])]
    if pts or key == "eval/accuracy":
      panels.append((key, name, ylabel, pts))
  ncols = min(len(panels), 4)
  nrows = math.ceil(len(panels) / ncols)
  fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 3.0 * nrows), squeeze=False)
  for ax, (key, name, ylabel, pts) in zip(axes.flat, panels):
    if pts:
      ax.plot(
        *zip(*pts), marker="o" if key.startswith("eval/") else None, markersize=3, linewidth=1
      )
    ax.set(xlabel="step", ylabel=ylabel, title=name)
    ax.title.set_fontsize(9)
  for ax in axes.flat[len(panels) :]:
    fig.delaxes(ax)
  fig.suptitle(title)
  fig.tight_layout()
  fig.savefig(png_path, dpi=110)
  plt.close(fig)
  return [name for _, name, _, _ in panels]


def mean_std(values, signed: bool = False) -> str:
  """``values``' mean ± sample std at one decimal ('–' for none, the value alone for one);
  ``signed``: the mean with its sign (a difference)."""
  values = [v for v in values if v is not None]
  sign = "+" if signed else ""
  if not values:
    return "–"
  if len(values) == 1:
    return f"{values[0]:{sign}.1f}"
  return f"{np.mean(values):{sign}.1f} ± {np.std(values, ddof=1):.1f}"
