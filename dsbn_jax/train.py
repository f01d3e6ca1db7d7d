"""The main job: data, model and state; the train loop with evaluation, checkpoints and outputs.

No math lives here (``train_step.py``) and no device logic (``sharding.py``). Outputs in the workdir:
``config.json`` (the resolved config that ran), ``metrics.jsonl`` + ``tensorboard/`` (every
``log_every_steps``: the losses and accuracies averaged over the steps since the previous row,
the schedule's values at its step (step_watch.py); and every evaluation), ``checkpoints/`` (orbax),
``curves.png`` and the final ``results.json`` (best and last target accuracy, per-class accuracy
-- None for a class without target images -- and its mean over the classes with images, confusion
matrix, steps, wall time, img/s).

Evaluation protocol (``evaluation.py``): the target set with the target DSBN branch in eval mode,
every ``eval_every_steps`` and at the end. ``best`` is the maximum over evaluations -- the number
the ALDA code logs and the papers report (model selection on the test set, docs/reference.md §7)
-- and ``last`` is the final model's; both are recorded. The reference evaluates before iteration
i for i % 500 == 499 (after 499, 999, ... updates); here it is after 500, 1000, ... updates.

Label-free model selection (``validators.py``): every evaluation also scores the model with the
validators, from the unlabelled target predictions and (with data.source_val_fraction > 0) the
held-out labelled source split; ``results.json`` ``selection`` holds, per validator, its score at
every evaluation, the step it selects and that step's target accuracy
(docs/model_selection.md).
"""

import json
import os
import signal
import time

import jax
import ml_collections
import numpy as np
import tensorflow_datasets as tfds
from flax import traverse_util

from dsbn_jax import (
  checkpointing,
  cli,
  device_augment,
  eval_data,
  evaluation,
  input_pipeline,
  methods,
  reporting,
  run_control,
  sharding,
  step_watch,
  validators,
)
from dsbn_jax.datasets import catalog, prepared
from dsbn_jax.errors import UserError
from dsbn_jax.models import heads, torchvision_port
from dsbn_jax.step_watch import NonFiniteLossError  # noqa: F401  (raised by the loop; re-exported)

# Config fields that may change between a run and its resumption without making it another run:
# cadence of logs/checkpoints, local paths and input-pipeline throughput knobs.
_RESUME_SAFE = (
  "log_every_steps",
  "checkpoint_every_steps",
  "keep_checkpoints",
  "data.data_dir",
  "data.manual_dir",
  "data.num_parallel_calls",
  "data.prefetch_batches",
  "data.cache_resized",
  "data.train_input",  # the same boxes and flips; a pixel within ~0.001 of a half may round apart
  "data.resident_max_gb",
  "model.pretrained_path",
)


_TRAIN_INPUT_SAYS = {  # data.train_input, once resolved (device_augment.resolve_train_input)
  "device": "train augmentation on the devices: the host sends the uint8 resized rows",
  "resident": "train augmentation on the devices: both domains' resized images are held on "
  "every device (data.train_input='resident'); the host sends row numbers",
}


def task_lr0(config, source: str, target: str) -> float:
  """The base learning rate of the task ``source -> target`` (canonical domain names): its entry in
  ``optim.lr0_per_task`` (keys in any spelling ``catalog.canonical_domain`` accepts), else
  ``optim.lr0``."""
  for task, lr0 in config.optim.get("lr0_per_task", {}).items():
    s, t = task.split("->")
    if (catalog.canonical_domain(config.data, s), catalog.canonical_domain(config.data, t)) == (
      source,
      target,
    ):
      return float(lr0)
  return float(config.optim.lr0)


def _resolve_lr0(config, source: str, target: str) -> None:
  """In place: ``optim.lr0`` becomes the task's rate, and the table, now read, is emptied."""
  config.optim.lr0 = task_lr0(config, source, target)
  config.optim.lr0_per_task = {}


def resolve_config(config: ml_collections.ConfigDict, info: catalog.DataInfo):
  """A copy with the values derived from the data: the number of classes, the custom tree's
  content digest (``data.dataset_digest``), and in ``optim.lr0`` the task's base learning rate (``task_lr0``; ``optim.lr0_per_task`` is emptied: the resolved
  config, which a run writes to config.json, holds the rate it trains with)."""
  config = ml_collections.ConfigDict(config.to_dict())
  config.model.num_classes = info.num_classes
  config.data.dataset_digest = info.digest
  _resolve_lr0(config, info.source.name, info.target.name)
  return config


def _jsonable(config) -> dict:
  return json.loads(config.to_json_best_effort())


# What a workdir may hold without our config.json and still be ours, empty: the lock of a run that
# stopped before writing config.json, and what file browsers drop into any folder.
_EMPTY_ENOUGH = frozenset({".lock", ".DS_Store", "Thumbs.db", "desktop.ini"})


def foreign_entries(folder: str, ours=()) -> list[str]:
  """Sorted names in an existing ``folder`` other than ``ours`` and ``_EMPTY_ENOUGH`` (and the
  probe file another run's ``run_control.check_writable`` may have there for an instant)."""
  return sorted(
    n
    for n in os.listdir(folder)
    if n not in _EMPTY_ENOUGH and n not in ours and not n.startswith(run_control.PROBE_PREFIX)
  )


# Config fields added after runs were already made, with the value that computes what those runs
# computed: a run whose config.json lacks one resumes when the field holds that value. (conv_impl
# 'auto' computes 1x1 convolutions as matmuls on CPU: the same maths within float rounding.)
_ADDED_LATER = {
  "model.matmul_precision": "default",
  "model.fused_pass": False,
  "model.conv_impl": "auto",
  "data.source_val_fraction": 0.0,
  "select_with": "",
  "model.bn": "auto",
  "sweep.bn": ["auto"],
  "model.random_dim": 1024,
  "loss.cdan_randomized": False,
  "loss.mada_weight": 0.3,
  "loss.mcc_temperature": 2.5,
}
_NO = object()


def _canonical_method(flat: dict) -> dict:
  """The flat fields with ``method`` the display name of the (method, BN) pair that ``method`` and
  ``model.bn`` name, and no ``model.bn``: 'alda_dsbn' (with model.bn absent, as written before
  the field, 'auto' or 'dsbn') and 'alda' with model.bn='dsbn' are one run. As written when they
  name no pair."""
  try:
    method = methods.resolve_name(flat.get("method"), flat.get("model.bn", "auto"))
  except UserError:
    return flat
  return {**{k: v for k, v in flat.items() if k != "model.bn"}, "method": method.display_name}


def _as_written_now(saved: dict, config) -> dict:
  """The flat fields of a saved config.json in the form this version writes: before
  ``optim.lr0_per_task``, a config held the per-task rates as ``optim.lr0_by_task`` ((source,
  target, lr0) rows) and ``optim.lr0_default``, selected by ``optim.lr0 < 0``; a resolved config
  held the task's rate in ``optim.lr0`` already, as now. ``config``: the config compared with it
  (its task, whose names the saved one shares or the comparison fails anyway)."""
  saved = dict(saved)
  by_task = saved.pop("optim.lr0_by_task", None)
  default = saved.pop("optim.lr0_default", None)
  lr0 = saved.get("optim.lr0")
  if isinstance(lr0, (int, float)) and lr0 < 0 and default is not None:
    source, target = (
      catalog.canonical_domain(config.data, config.data[k]) for k in ("source", "target")
    )
    rates = {(s, t): lr for s, t, lr in by_task or ()}
    saved["optim.lr0"] = float(rates.get((source, target), default))
  return saved


# Config fields read from the data (resolve_config): not known before it is prepared.
_DERIVED = ("model.num_classes", "data.dataset_digest")


def never_trained(workdir: str) -> bool:
  """Whether ``workdir`` holds no checkpoint (rolling, best or selected) and no results.json: the
  run there stopped before its first checkpoint, so nothing would be lost by starting it anew."""
  if os.path.exists(os.path.join(workdir, "results.json")):
    return False
  for folder in (checkpointing.ROLLING_DIR, checkpointing.BEST_DIR, checkpointing.SELECTED_DIR):
    try:
      if any(n[:1].isdigit() for n in os.listdir(os.path.join(workdir, folder))):
        return False
    except OSError:  # no such folder
      pass
  return True


def guard_workdir(workdir: str, config, *, resolved: bool = True) -> str | None:
  """Refuses a workdir that is not new, empty or a run of this configuration (never touches it).

  A non-empty folder without our ``config.json`` holds someone else's files (a results.json or
  metrics.jsonl of another tool would be replaced); a run of another configuration would be mixed,
  and so would a run on another content of its custom tree (``data.dataset_digest``). A run of
  another configuration that saved no checkpoint (``never_trained``: it failed before its first
  one) is accepted: the returned line says it starts anew (None otherwise).
  ``resolved=False`` compares a config before ``resolve_config`` (what a run has before it prepares
  its data, and a sweep before it decides to skip a finished run): its task's ``optim.lr0`` is
  resolved from the domain names (nothing prepared) and the fields read from the data
  (``_DERIVED``) are not compared.
  """
  path = os.path.join(workdir, "config.json")
  if os.path.exists(workdir) and not os.path.isdir(workdir):
    raise UserError(f"--workdir={workdir} is a file, not a folder; choose a new --workdir")
  if not os.path.exists(path):
    foreign = foreign_entries(workdir) if os.path.isdir(workdir) else []
    if foreign:
      shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
      raise UserError(
        f"workdir {workdir} is not empty and is not a run's (no config.json; it "
        f"holds {shown}); choose a new or empty --workdir (nothing was changed in "
        "this one)"
      )
    return None
  try:
    saved = reporting.read_json(path)
  except ValueError as e:  # JSONDecodeError too
    raise UserError(
      f"workdir {workdir} holds a config.json that is not a run's ({e}); choose a "
      "new --workdir (nothing was changed in this one)"
    ) from None
  if not resolved:
    config = ml_collections.ConfigDict(config.to_dict())
    _resolve_lr0(
      config, *(catalog.canonical_domain(config.data, config.data[k]) for k in ("source", "target"))
    )
  old = _canonical_method(_as_written_now(traverse_util.flatten_dict(saved, sep="."), config))
  new = _canonical_method(traverse_util.flatten_dict(_jsonable(config), sep="."))
  derived = () if resolved else _DERIVED
  differ = sorted(
    k
    for k in set(old) | set(new)
    if old.get(k) != new.get(k)
    and not k.startswith(_RESUME_SAFE + derived)
    and not (k not in old and _ADDED_LATER.get(k, _NO) == new.get(k))
    # a run from before digests were recorded: its tree cannot be compared
    and not (k == "data.dataset_digest" and k not in old)
  )
  if not differ:
    return None
  shown = ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in differ[:4])
  shown += " ..." if len(differ) > 4 else ""
  if never_trained(workdir):
    return (
      f"workdir {workdir} holds a run of another configuration ({shown}) that saved no "
      "checkpoint: it starts anew with this one"
    )
  if differ == ["data.dataset_digest"]:
    raise UserError(
      f"workdir {workdir} holds a run trained on other images: the custom tree "
      f"{config.data.manual_dir} is not the content that run read (data.dataset_digest "
      f"{str(old.get(differ[0]))[:12]}... -> {str(new.get(differ[0]))[:12]}...: images added, "
      "removed, moved or edited since, or another tree); choose a new --workdir (nothing was "
      "changed in this one), or restore the tree"
    )
  raise UserError(
    f"workdir {workdir} holds a run of another configuration ({shown}); choose a new --workdir "
    "(nothing was changed in this one)"
  )


def _write_json(path: str, obj) -> None:
  reporting.write_atomic(path, json.dumps(obj, indent=2))  # a crash never leaves half a file


def _claim(workdir: str, config, lock: run_control.WorkdirLock, say, resolved: bool) -> None:
  """``guard_workdir`` on every process; then (the first time) process 0 takes the lock. Every
  process has checked the workdir before process 0 writes to it (another would find process 0's
  config.json.tmp there), and all stop when one refuses it."""
  refused = None
  try:
    note = guard_workdir(workdir, config, resolved=resolved)
    if note and resolved:
      say(note)
    if jax.process_index() == 0 and not lock.held:
      lock.acquire()  # one live run per workdir; refused before this run writes anything
  except UserError as e:
    refused = e
  if not sharding.every_process(refused is None):
    raise refused or UserError(
      f"another process refused workdir {workdir} (its output says why); nothing was changed"
    )


def _scored_entry(step: int, result: dict, source: dict | None) -> dict:
  """The ``evals`` entry of an evaluation: its accuracy and every validator's score, process 0's
  on every process (they decide collective saves); a validator that could not score is None, its
  reason in ``validators_skipped``."""
  scores, skipped = validators.scores_and_reasons(
    target_probs=result["probs"],
    target_features=result["features"],
    **(
      {}
      if source is None
      else {
        "source_probs": source["probs"],
        "source_labels": source["labels"],
        "source_features": source["features"],
      }
    ),
  )
  scores = sharding.from_process_0(scores)  # every process then picks the same checkpoints
  entry = {"step": step, "accuracy": result["accuracy"], "validators": scores}
  unscored = [k for k, v in scores.items() if v is None]  # None: it could not score, and why
  if unscored:
    entry["validators_skipped"] = {
      k: skipped.get(k, "process 0 could not score it") for k in unscored
    }
  return entry


def _train_input(config, mesh, info: catalog.DataInfo, say) -> str:
  """Where the train augmentation runs (``device_augment.resolve_train_input``), said when it is
  on the devices."""
  mode = device_augment.resolve_train_input(
    config.data, sharding.platform(mesh), info.source.num_train + info.target.num_train
  )
  if mode != "host":
    say(_TRAIN_INPUT_SAYS[mode])
  return mode


class _Run:
  """Everything one training run holds; the loop below is split into its named steps."""

  def __init__(self, config, workdir: str):
    self.lock = self.ckpt = self.progress = None
    try:
      self._setup(config, workdir)
    except BaseException:  # in-process callers (sweeps, tests) may start this workdir again
      try:
        if self.ckpt is not None:
          self.ckpt.close()
      finally:
        if self.lock is not None:  # a workdir this start created and left empty goes again
          self.lock.release(discard=True)
      raise

  def _setup(self, config, workdir: str):
    self.workdir = workdir
    self.is_main = jax.process_index() == 0
    self.mesh = sharding.make_mesh()
    sharding.check_batch_sizes(config, self.mesh)
    self.say(sharding.describe(self.mesh, config, workdir))
    if sharding.slow_on_cpu(self.mesh, config):
      self.say(
        "warning: this trains a ResNet-50 on the CPU (JAX found no GPU or TPU), which "
        "takes days; on an accelerator host install its extra (README, 'GPU and TPU'). "
        "An estimate from the measured step rate follows after a few steps."
      )
    # A missing weights file fails before data preparation.
    pretrained = torchvision_port.load_pretrained_backbone(config)
    self.lock = run_control.WorkdirLock(workdir)
    _claim(workdir, config, self.lock, self.say, resolved=False)  # the lock before the data
    tfds.display_progress_bar(False)  # dataset preparation: TFDS's bars would flood the log
    self.info = catalog.get_data_info(config.data)
    lr0 = config.optim.lr0
    self.config = config = resolve_config(config, self.info)
    if config.optim.lr0 != lr0:  # an entry of optim.lr0_per_task: said, as a flag did not set it
      self.say(
        f"optim.lr0 {config.optim.lr0:g} for {self.info.source.name}->"
        f"{self.info.target.name} (its optim.lr0_per_task entry; optim.lr0 {lr0:g} is the "
        "other tasks')"
      )
    if self.info.source.name == self.info.target.name:
      self.say(
        f"warning: source and target are the same domain ({self.info.source.name}): this "
        "is no domain adaptation; check config.data.source and config.data.target"
      )
    _claim(workdir, config, self.lock, self.say, resolved=True)  # class count, tree digest
    self.model = heads.create_model(config)
    size = config.data.crop_size or config.data.resize_size  # train crop, or the resize alone
    image_shape = (size, size, 3)
    rng = jax.random.key(config.seed)
    init_rng, step_rng = jax.random.split(rng)
    self.step_rng = sharding.replicate(step_rng, self.mesh)  # one base key; the step folds in
    self.state = sharding.create_sharded_state(
      self.mesh, init_rng, config, self.model, image_shape, pretrained
    )
    self.train_input = _train_input(config, self.mesh, self.info, self.say)
    self.train_fn = sharding.jit_train_step(
      self.mesh, config, train_input=self.train_input, watch=True
    )
    self.eval_fn = evaluation.jit_eval_step(self.mesh, config)
    on_device = config.data.cache_resized  # the eval step crops the cached images (exact)
    self.eval_data = eval_data.make_eval_data(config.data, crops_on_device=on_device)
    self.source_val = None  # (eval fn through the source branch, the held-out source split)
    if config.data.source_val_fraction > 0:
      self.source_val = (
        evaluation.jit_eval_step(self.mesh, config, domain=0),
        eval_data.make_source_val_data(config.data, crops_on_device=on_device),
      )
    input_pipeline.check_train_batches(
      config.data,
      self.info,
      config.batch_size,
      source_held_out=self.source_val[1].num_examples if self.source_val else 0,
    )
    # Every check that reads the data has passed: only now is the workdir written.
    if self.is_main:
      _write_json(os.path.join(workdir, "config.json"), _jsonable(config))
      _write_json(os.path.join(workdir, "classes.json"), list(self.info.class_names))
    self.ckpt = checkpointing.Checkpointer(workdir, max_to_keep=config.keep_checkpoints)
    self.meta = {"evals": [], "best": None, "wall_time_s": 0.0}
    try:  # the newest good checkpoint; damaged newer ones are named and moved aside
      found = self.ckpt.restore_latest(self.state, self.say)
    except checkpointing.DamagedCheckpointError as e:
      raise UserError(
        f"{e}: choose a new --workdir, or move {self.ckpt.directory} away to train "
        "from scratch in this one (nothing was deleted)"
      ) from None
    if found is not None:
      latest, self.state, self.meta = found
      self.say(f"resumed from {self.ckpt.directory} at step {latest}")
    self.start_step = int(jax.device_get(self.state.step))
    self.writer = reporting.MetricWriter(
      workdir,
      enabled=self.is_main,
      resume_step=self.start_step,  # 0: a crash before ckpt 1
      reevaluate=self.start_step >= config.total_steps,
    )

  def say(self, msg: str) -> None:
    if self.is_main:
      if self.progress is not None:  # above the progress bar on a terminal
        self.progress.write(msg)
      else:
        print(msg, flush=True)

  def checkpoint(self, step: int) -> None:
    try:
      self.ckpt.save(step, self.state, self.meta)
    except OSError as e:  # a full disk: the one-line error names the checkpoint (cli)
      e.filename = e.filename or os.path.join(self.ckpt.directory, str(step))
      raise

  def _keep_apart(self, key: str, apart: str, entry: dict, score) -> None:
    """``meta[key]`` becomes ``entry`` when its ``score`` is higher (the first of equal ones
    stays), and the state is saved apart in ``<workdir>/<apart>`` on every change. A resumed run
    re-evaluating the step its crashed attempt saved apart overwrites it; so does a finished run
    from before that folder existed re-evaluating its final step. An ``entry`` whose score is
    None (a validator that could not score it) is no candidate: the kept one stays."""
    if score(entry) is None:
      return
    kept = self.meta.get(key)
    improved = kept is None or score(entry) > score(kept)
    if improved:
      self.meta[key] = entry
    step = entry["step"]
    if improved or (self.meta[key]["step"] == step and self.ckpt.apart_step(apart) != step):
      self.ckpt.save_apart(apart, step, self.state, self.meta)

  def run_eval(self, step: int) -> dict:
    t0 = time.perf_counter()
    result = evaluation.evaluate(
      self.eval_fn, self.state, self.eval_data, self.mesh, self.info.num_classes, self.say
    )
    source = None
    if self.source_val is not None:  # labelled held-out source images, never target labels
      fn, data = self.source_val
      source = evaluation.evaluate(fn, self.state, data, self.mesh, self.info.num_classes)
    entry = _scored_entry(step, result, source)
    scores = entry["validators"]
    evals = self.meta["evals"]
    if evals and evals[-1]["step"] == step:  # re-evaluating a finished run: no duplicate entry
      evals.pop()
    evals.append(entry)
    self._keep_apart("best", checkpointing.BEST_DIR, entry, lambda e: e["accuracy"])
    name = self.config.select_with
    if name:  # the validator's pick, chosen without target labels (predict --checkpoint=selected)
      self._keep_apart(
        "selected", checkpointing.SELECTED_DIR, entry, lambda e: e["validators"].get(name)
      )
      if scores.get(name) is None:
        kept = self.meta.get("selected")
        self.say(
          f"warning: config.select_with={name!r} could not score step {step} "
          f"({entry['validators_skipped'][name]}); "
          + (
            f"the selected checkpoint stays step {kept['step']}" if kept else "nothing selected yet"
          )
        )
    self.writer.write(
      step,
      {
        "eval/accuracy": result["accuracy"],
        "eval/best_accuracy": self.meta["best"]["accuracy"],
        "eval/seconds": time.perf_counter() - t0,
        **{f"validators/{k}": v for k, v in scores.items() if v is not None},
      },
    )
    self.say(
      f"step {step}: target accuracy {result['accuracy']:.2f}% (best "
      f"{self.meta['best']['accuracy']:.2f}% at step {self.meta['best']['step']})"
    )
    return result


def _inject_fault(step: int) -> None:
  """Test hooks for the reliability tests (all off unless their variable is set), as step ``step``
  starts: ``DSBN_JAX_KILL_AT_STEP=k`` SIGKILLs this process (crash + resume);
  ``DSBN_JAX_SIGNAL_AT_STEP=k:SIGTERM`` (or ``:SIGINT``) sends it that signal. ``_inject_nan``
  is the third."""
  if os.environ.get("DSBN_JAX_KILL_AT_STEP") == str(step):
    os.kill(os.getpid(), signal.SIGKILL)
  signal_at, _, signal_name = os.environ.get("DSBN_JAX_SIGNAL_AT_STEP", "").partition(":")
  if signal_at == str(step):
    os.kill(os.getpid(), getattr(signal, signal_name))


def _inject_nan(step: int, batch: dict) -> dict:
  """``DSBN_JAX_NAN_AT_STEP=k`` (a test hook) feeds step k a source batch of NaN pixels: a
  non-finite loss computed by the real step, which must stop the run and keep the last good
  checkpoint. Applied to the host batches as they are read (ahead of their step)."""
  if os.environ.get("DSBN_JAX_NAN_AT_STEP") == str(step):
    source = dict(batch["source"], image=np.full_like(batch["source"]["image"], np.nan))
    batch = dict(batch, source=source)
  return batch


class _CpuEstimate:
  """For a ResNet-50 on CPU: after a few steps past compilation, one line with the time to go."""

  WARMUP, MEASURED = 1, 3  # steps: the first compiles; the next three are timed

  def __init__(self, run: _Run, enabled: bool):
    self.run, self.enabled = run, enabled
    self.t0 = None

  def tick(self, done: int, metrics) -> None:
    if not self.enabled:
      return
    first = self.run.start_step + self.WARMUP
    if done == first:
      jax.block_until_ready(metrics)
      self.t0 = time.perf_counter()
    elif self.t0 is not None and done == first + self.MEASURED:
      jax.block_until_ready(metrics)
      s_per_step = (time.perf_counter() - self.t0) / self.MEASURED
      left = self.run.config.total_steps - done
      self.run.say(
        f"warning: at {s_per_step:.1f} s per step on the CPU, the remaining {left} "
        f"steps take about {_duration(left * s_per_step)} (evaluations not included)"
      )
      self.enabled = False


def _duration(seconds: float) -> str:
  if seconds >= 2 * 86400:
    return f"{seconds / 86400:.1f} days"
  if seconds >= 2 * 3600:
    return f"{seconds / 3600:.1f} hours"
  return f"{seconds / 60:.0f} minutes"


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains ``config`` in ``workdir`` (resuming the latest checkpoint there); returns results.

  Every float32 matmul and convolution runs at ``model.matmul_precision``. A workdir that cannot
  be written is refused before anything else (``run_control.check_writable``); a full disk later
  is a ``UserError`` naming the file and the checkpoint the run resumes from (``_disk_full``).
  """
  run_control.check_writable(workdir)  # before data preparation and before anything is written
  try:
    # prepared.reading(): the prepared data this run reads is never deleted while it runs
    with jax.default_matmul_precision(config.model.matmul_precision), prepared.reading():
      run = _Run(config, workdir)
      try:
        return _train_loop(run)
      finally:
        run.lock.release()
  except Exception as e:  # pylint: disable=broad-except  (only a full disk is answered here)
    if isinstance(e, UserError) or cli.disk_full(e) is None:
      raise
    raise UserError(_disk_full(e, workdir)) from None


def _disk_full(e: Exception, workdir: str) -> str:
  """The one line for a full disk (``cli.disk_full_message``) with the step the run resumes from:
  the newest checkpoint on disk (a save the full disk interrupted never counts)."""
  steps = checkpointing.saved_steps(workdir)
  resume = (
    f"run the same command to resume from checkpoint step {steps[-1]}"
    if steps
    else "run the same command again (no checkpoint was written: it starts from step 0)"
  )
  return cli.disk_full_message(e, where=workdir, resume=resume)


def _train_loop(run: _Run) -> dict:
  workdir = run.workdir
  config, total = run.config, run.config.total_steps
  batch_images = 2 * config.batch_size
  train_iter = input_pipeline.make_train_iterator(
    config.data,
    global_batch_size=config.batch_size,
    seed=config.seed,
    start_step=run.start_step,
    train_input=run.train_input,
  )
  if run.train_input != "host":  # one int32 array of draws per domain crosses, not five
    train_iter = map(device_augment.pack, train_iter)
  run.step_args = ()  # 'resident': both domains' resized images, on every device
  if run.train_input == "resident":
    run.step_args = (sharding.replicate(input_pipeline.resident_images(config.data), run.mesh),)

  # Two batches staged on the devices ahead of their step: a step never waits for its input.
  batches = sharding.prefetch_to_global(
    (_inject_nan(s, b) for s, b in zip(range(run.start_step, total), train_iter)), run.mesh
  )
  run.progress = progress = reporting.Progress(
    total, run.start_step, batch_images, enabled=run.is_main, sync=jax.block_until_ready
  )
  t_start, last_eval = time.perf_counter(), None
  cpu_clock = _CpuEstimate(run, enabled=sharding.slow_on_cpu(run.mesh, config))
  # Updated inside the step; read only where the loop reads or waits anyway.
  watch = step_watch.StepWatch(run.mesh, run.meta)
  wall0 = run.meta["wall_time_s"]
  saved = None

  def save(done: int) -> None:  # a checkpoint of the state after step done, if all were finite
    watch.to_meta(run.meta, run.ckpt)
    run.meta["wall_time_s"] = wall0 + time.perf_counter() - t_start
    with progress.excluded(run.state):  # not training time: out of the img/s
      run.checkpoint(done)

  # SIGINT/SIGTERM from here on: finish the step, checkpoint it, exit 75 (run_control).
  with run_control.GracefulStop() as stop:
    try:
      for step in range(run.start_step, total):
        _inject_fault(step)
        run.state, value, metrics = run.train_fn(
          run.state, watch.value, next(batches), run.step_rng, *run.step_args
        )
        watch.update(value, metrics)
        done = step + 1
        cpu_clock.tick(done, metrics)
        progress.tick(done, metrics)  # the first step (compilation) is not timed
        if done % config.log_every_steps == 0 or done == total:  # means since the last row
          host = watch.log_row(run.ckpt, metrics)
          host["train/images_per_s"] = progress.rate(done)
          run.writer.write(done, host)
          progress.report(
            done, {k: host[k] for k in ("train/loss", "train/source_acc") if k in host}
          )
        if done % config.eval_every_steps == 0 or done == total:
          watch.check(run.ckpt)  # no evaluation (nor best checkpoint) of a non-finite state
          with progress.excluded(run.state):  # not training time: out of the img/s
            last_eval = run.run_eval(done)
        if done % config.checkpoint_every_steps == 0 or done == total:
          save(done)
          saved = done
        if done < total and stop.requested(sync=done % config.log_every_steps == 0):
          if saved != done:
            save(done)
          run.ckpt.wait()
          raise run_control.Stopped(done, stop.signal_name)
    except BaseException:  # an error, a NaN stop, a signal: finish a pending async save, then stop
      run.progress = None
      progress.close()
      try:
        run.ckpt.close()
      finally:
        run.writer.close(quiet=True)  # the error raised (a full disk: the file) says what failed
      raise
  try:
    progress.close()
    run.progress = None
    if last_eval is None:  # resumed a finished run: evaluate the final state again
      last_eval = run.run_eval(int(jax.device_get(run.state.step)))
    wall = wall0 + time.perf_counter() - t_start
    run.ckpt.close()
    results = _results(run, last_eval, wall, trained=total - run.start_step, t=t_start)
    if run.is_main:
      _write_json(os.path.join(workdir, "results.json"), results)
      reporting.plot_curves(
        os.path.join(workdir, "metrics.jsonl"),
        os.path.join(workdir, "curves.png"),
        f"{methods.resolve(config).display_name}: {run.info.source.name} -> {run.info.target.name}",
      )
  except BaseException:  # e.g. a full disk at results.json: the same clean stop
    try:
      run.ckpt.close()
    finally:
      run.writer.close(quiet=True)
    raise
  run.writer.close()
  return results


def selection(evals: list[dict]) -> dict:
  """What each label-free validator selects among a run's evaluations: its score at every
  evaluation, the step it picks and that step's target accuracy, and the rank correlation of its
  score with the target accuracy over the evaluations (an analysis that reads the target labels;
  the choice itself never does). Validators missing from the evaluations (the source ones without
  data.source_val_fraction, or a run from before validators) are left out. A score of None (the
  validator could not score that evaluation) is no candidate; ``skipped`` has its reason per step,
  and a validator that scored no evaluation has ``step`` and ``accuracy`` None."""
  out = {}
  for name in validators.NAMES:
    present = [e for e in evals if name in e.get("validators", {})]
    if not present:
      continue
    chosen = validators.select(evals, name)
    out[name] = {
      "step": None if chosen is None else chosen["step"],
      "accuracy": None if chosen is None else chosen["accuracy"],
      "scores": {str(e["step"]): e["validators"][name] for e in present},
      "rank_correlation": validators.rank_correlation(
        [e["validators"][name] for e in present], [e["accuracy"] for e in present]
      ),
    }
    skipped = {
      str(e["step"]): e.get("validators_skipped", {}).get(name, "not scored")
      for e in present
      if e["validators"][name] is None
    }
    if skipped:
      out[name]["skipped"] = skipped
  return out


def _selected_result(meta: dict, name: str) -> dict | None:
  """results.json ``selected``: the step and target accuracy of ``config.select_with``'s pick, or,
  when it scored no evaluation, step and accuracy None and the ``reason`` (nothing was kept in
  checkpoints_selected/)."""
  if not name:
    return None
  if "selected" in meta:
    return {k: meta["selected"][k] for k in ("step", "accuracy")} | {"validator": name}
  why = [
    e["validators_skipped"][name] for e in meta["evals"] if name in e.get("validators_skipped", {})
  ]
  return {
    "step": None,
    "accuracy": None,
    "validator": name,
    "reason": f"{name} could not score any evaluation ({why[-1] if why else 'no evaluation'}); "
    "no selected checkpoint was kept",
  }


def _results(run: _Run, last_eval: dict, wall: float, trained: int, t: float) -> dict:
  config = run.config
  elapsed = time.perf_counter() - t
  return {
    "method": methods.resolve(config).display_name,  # alda_dsbn: alda with model.bn='dsbn'
    "source": run.info.source.name,
    "target": run.info.target.name,
    "seed": config.seed,
    "steps": config.total_steps,
    "best_accuracy": run.meta["best"]["accuracy"],
    "best_step": run.meta["best"]["step"],
    "last_accuracy": last_eval["accuracy"],
    "evals": run.meta["evals"],
    "selection": selection(run.meta["evals"]),
    # config.select_with's pick, kept in checkpoints_selected/ (predict --checkpoint=selected)
    "selected": _selected_result(run.meta, config.select_with),
    "per_class_accuracy": dict(zip(run.info.class_names, last_eval["per_class_accuracy"])),
    "mean_class_accuracy": last_eval["mean_class_accuracy"],
    "confusion_matrix": last_eval["confusion"],
    "class_names": list(run.info.class_names),
    "num_target_images": last_eval["num_images"],
    "wall_time_s": wall,
    "images_per_s_this_session": trained * 2 * config.batch_size / elapsed if elapsed else 0.0,
    "num_devices": len(jax.devices()),
    "num_processes": jax.process_count(),
  }
