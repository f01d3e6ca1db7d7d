"""One validation of a whole config, before a command creates or touches a workdir.

``validate(config)`` is what ``dsbn_jax.main`` runs before training, ``dsbn_jax.sweep`` runs on
every run's config before the first run starts, and ``dsbn_jax.predict`` runs on a workdir's
``config.json`` (``for_predict=True``: the model and evaluation fields only). It checks every
enumerated field against its choices, the ranges (positive sizes and step counts, probabilities,
seeds), the image size against the smallest the backbone takes, the batch sizes against the
device count, and what the disk can tell cheaply without preparing a dataset: domain names, a
custom tree, an unprepared dataset's manual directory, the weights file. The first bad value
raises ``UserError`` with one line naming the field, the value and what is valid
(``invalid config.method='alda_dsnb'; valid: source_only, dann, ...``).

Choices live next to the code that consumes them (``methods.NAMES``, ``optim.OPTIMIZERS``,
``input_pipeline.EVAL_MODES``, ...); the two below are defined here because this module imports
nothing heavy at load time, so the model code can import them without a cycle.
"""

import math
import os

from dsbn_jax import methods
from dsbn_jax.errors import UserError

MATMUL_PRECISIONS = ("default", "high", "highest")  # model.matmul_precision
CONV_IMPLS = ("auto", "xla", "matmul")  # model.conv_impl
SEED_MAX = 2**32 - 1  # jax.random.key keeps the low 32 bits: larger seeds would collide

_MISSING = object()


class _Checker:
  """Reads fields by dotted path and raises the one-line error for the first bad one."""

  def __init__(self, config, where: str):
    self.config = config
    self.where = f" in {where}" if where else ""

  def get(self, path: str):
    node = self.config
    for part in path.split("."):
      if not hasattr(node, "keys") or part not in node:
        return _MISSING
      node = node[part]
    return node

  def fail(self, path: str, value, valid: str):
    raise UserError(f"invalid config.{path}={value!r}{self.where}; valid: {valid}")

  def choice(self, path: str, choices) -> None:
    value = self.get(path)
    if value is not _MISSING and (not isinstance(value, str) or value not in choices):
      self.fail(path, value, ", ".join(choices))

  def boolean(self, path: str) -> None:
    value = self.get(path)
    if value is not _MISSING and not isinstance(value, bool):
      self.fail(path, value, "True, False")

  def integer(self, path: str, lo: int | None = None, hi: int | None = None, note: str = ""):
    value = self.get(path)
    if value is _MISSING:
      return
    if not _is_int(value) or (lo is not None and value < lo) or (hi is not None and value > hi):
      self.fail(path, value, _int_range(lo, hi) + note)

  def number(
    self,
    path: str,
    lo: float | None = None,
    hi: float | None = None,
    *,
    lo_open: bool = False,
    hi_open: bool = False,
    note: str = "",
  ) -> None:
    value = self.get(path)
    if value is _MISSING:
      return
    ok = _is_number(value) and math.isfinite(value)
    if ok and lo is not None:
      ok = value > lo if lo_open else value >= lo
    if ok and hi is not None:
      ok = value < hi if hi_open else value <= hi
    if not ok:
      self.fail(path, value, _number_range(lo, hi, lo_open, hi_open) + note)

  def numbers(self, path: str, count: int, *, positive: bool = False, ordered: bool = False):
    value = self.get(path)
    if value is _MISSING:
      return
    seq = list(value) if isinstance(value, (list, tuple)) else None
    ok = (
      seq is not None and len(seq) == count and all(_is_number(v) and math.isfinite(v) for v in seq)
    )
    ok = ok and (not positive or all(v > 0 for v in seq))
    ok = ok and (not ordered or seq[0] <= seq[1])
    if not ok:
      self.fail(
        path,
        value,
        f"{count} finite numbers"
        + (", each > 0" if positive else "")
        + (", low <= high" if ordered else ""),
      )


def _is_int(v) -> bool:
  return isinstance(v, int) and not isinstance(v, bool)


def _is_number(v) -> bool:
  return isinstance(v, (int, float)) and not isinstance(v, bool)


def _int_range(lo, hi) -> str:
  if lo is not None and hi is not None:
    return f"an integer in [{lo}, {hi}]"
  return "an integer" + (f" >= {lo}" if lo is not None else f" <= {hi}" if hi is not None else "")


def _number_range(lo, hi, lo_open, hi_open) -> str:
  if lo is not None and hi is not None:
    return f"a number in {'(' if lo_open else '['}{lo:g}, {hi:g}{')' if hi_open else ']'}"
  if lo is not None:
    return f"a number {'>' if lo_open else '>='} {lo:g}"
  return "a finite number"


def validate(config, *, for_predict: bool = False, where: str = "") -> None:
  """Raises ``UserError`` (one line) at the first invalid field of ``config``; writes nothing.

  Args:
    config: a whole config (``config_defaults.py`` layout); fields it lacks are not checked (a
      workdir written by an older version).
    for_predict: check only what classifying images with a trained run uses (model and
      evaluation preprocessing), not the training loop, the data sources or the devices.
    where: where the config comes from, quoted in the message (e.g. a workdir's config.json).
  """
  c = _Checker(config, where)
  _check_model(c, for_predict)
  _check_preprocessing(c)
  _check_input_size(c)
  if for_predict:
    c.integer("model.num_classes", 1)
    return
  _check_loop(c)
  _check_optim(c)
  _check_loss(c)
  _check_data_train(c)
  _check_paths(c, config)
  _check_devices(config)


def _check_model(c: _Checker, for_predict: bool) -> None:
  from dsbn_jax.models import heads  # pylint: disable=g-import-not-at-top  (flax: load lazily)

  c.choice("model.bn", methods.BN_SETTINGS)
  c.boolean("loss.cdan_randomized")  # shapes the model (CDAN's D input): predict reads it too
  if c.get("method") is not _MISSING:
    try:  # an unknown name, a '_dsbn' name with model.bn='shared', source_only with DSBN
      methods.resolve(c.config)
    except UserError as e:
      raise UserError(f"{e}{c.where}") from None
  c.choice("model.backbone", heads.BACKBONES)
  c.choice("model.dtype", heads.DTYPES)
  c.choice("model.matmul_precision", MATMUL_PRECISIONS)
  c.choice("model.conv_impl", CONV_IMPLS)
  c.boolean("model.fused_pass")
  backbone = c.get("model.backbone")
  if backbone == "resnet":
    stages = c.get("model.stage_sizes")
    if stages is not _MISSING and not (
      isinstance(stages, (list, tuple)) and stages and all(_is_int(v) and v >= 1 for v in stages)
    ):
      c.fail("model.stage_sizes", stages, "blocks per stage: one or more integers, each >= 1")
    c.integer("model.num_filters", 1)
  if backbone == "small_cnn":
    c.integer("model.feature_dim", 1)
  c.integer("model.bottleneck_dim", 0, note=" (0 = no bottleneck)")
  c.integer("model.disc_hidden_dim", 1)
  c.integer("model.random_dim", 1)
  if not for_predict:
    c.number("model.dropout_rate", 0.0, 1.0, hi_open=True)
    if c.get("model.pretrained_path") and backbone != "resnet50":
      c.fail(
        "model.backbone",
        backbone,
        "resnet50 (the only backbone with pretrained weights: model.pretrained_path is set)",
      )


def _check_preprocessing(c: _Checker) -> None:
  """The fields the evaluation transform reads (training and predict)."""
  from dsbn_jax import input_pipeline  # pylint: disable=g-import-not-at-top  (TF: load lazily)

  c.choice("data.resize_method", input_pipeline.RESIZE_METHODS)
  c.choice("data.eval_mode", input_pipeline.EVAL_MODES)
  c.integer("data.resize_size", 1)
  c.numbers("data.mean", 3)
  c.numbers("data.std", 3, positive=True)
  resize = c.get("data.resize_size")
  if resize is _MISSING:
    return
  if c.get("data.eval_mode") == "10crop":
    c.integer("data.crop_size", 1, resize - 1, note=" (10crop: below data.resize_size)")
  else:
    c.integer("data.crop_size", 0, resize, note=" (0 = no crop; at most data.resize_size)")


def _check_input_size(c: _Checker) -> None:
  """The model's input -- data.crop_size, or data.resize_size without a crop, in training and in
  evaluation -- is at least the smallest the backbone takes (``heads.min_input_size``, derived
  from the layers): a smaller one fails in the model init, after the workdir is written."""
  from dsbn_jax.models import heads  # pylint: disable=g-import-not-at-top  (flax: load lazily)

  backbone, resize, crop = (
    c.get(p) for p in ("model.backbone", "data.resize_size", "data.crop_size")
  )
  if backbone not in heads.BACKBONES or resize is _MISSING:
    return
  try:
    least = heads.min_input_size(c.config.model)
  except (AttributeError, KeyError):  # a field the backbone reads is missing: an older config
    return
  why = f"model.backbone={backbone!r} takes inputs of at least {least}x{least} px"
  if c.get("data.eval_mode") == "10crop":  # its crop is below the resize
    c.integer("data.resize_size", least + 1, note=f" ({why}; 10crop crops below it)")
  else:
    c.integer("data.resize_size", least, note=f" ({why})")
  if crop is not _MISSING and crop != 0:
    c.integer("data.crop_size", least, note=f" ({why})")


def _check_loop(c: _Checker) -> None:
  c.integer("seed", 0, SEED_MAX)
  c.integer("batch_size", 1)
  c.integer("total_steps", 1)
  for path in ("eval_every_steps", "checkpoint_every_steps", "log_every_steps", "keep_checkpoints"):
    c.integer(path, 1)
  from dsbn_jax import validators  # pylint: disable=g-import-not-at-top  (numpy only)

  select_with = c.get("select_with")
  if select_with is not _MISSING:
    if not isinstance(select_with, str) or select_with not in ("", *validators.NAMES):
      c.fail("select_with", select_with, "'' (keep none), " + ", ".join(validators.NAMES))
    fraction = c.get("data.source_val_fraction")
    if select_with in validators.NEEDS_SOURCE and fraction in (_MISSING, 0, 0.0):
      raise UserError(
        f"config.select_with={select_with!r} needs a held-out source split: set "
        "config.data.source_val_fraction (e.g. 0.2), or choose one of "
        f"{', '.join(validators.TARGET_ONLY)}"
      )


def _check_optim(c: _Checker) -> None:
  from dsbn_jax import optim  # pylint: disable=g-import-not-at-top

  c.choice("optim.name", optim.OPTIMIZERS)
  c.boolean("optim.nesterov")
  c.number("optim.lr0", 0.0, note=" (per-task rates: optim.lr0_per_task)")
  table = c.get("optim.lr0_per_task")
  if table is not _MISSING:
    rows = list(table.items()) if hasattr(table, "items") else None
    if rows is None or not all(
      isinstance(task, str)
      and len(task.split("->")) == 2
      and all(p.strip() for p in task.split("->"))
      and _is_number(lr0)
      and math.isfinite(lr0)
      and lr0 >= 0
      for task, lr0 in rows
    ):
      c.fail(
        "optim.lr0_per_task",
        table.to_dict() if hasattr(table, "to_dict") else table,
        "{'source->target': lr0 >= 0, ...}",
      )
  c.number("optim.momentum", 0.0, 1.0)
  for path in (
    "weight_decay",
    "lr_mult_backbone",
    "lr_mult_head",
    "lr_mult_disc",
    "lr_gamma",
    "lr_power",
  ):
    c.number(f"optim.{path}", 0.0)
  if c.get("optim.name") == "adam":
    c.number("optim.adam_b1", 0.0, 1.0, hi_open=True)
    c.number("optim.adam_b2", 0.0, 1.0, hi_open=True)
    c.number("optim.adam_eps", 0.0, lo_open=True)


def _check_loss(c: _Checker) -> None:
  c.number("loss.threshold", 0.0, 1.0)
  c.number("loss.trade_off", 0.0)
  c.number("loss.adv_weight", 0.0)
  c.number("loss.mada_weight", 0.0)
  c.number("loss.mcc_temperature", 0.0, lo_open=True)
  c.number("loss.ramp_alpha", 0.0)
  c.number("loss.ramp_max_steps", 0.0, lo_open=True)


def _check_data_train(c: _Checker) -> None:
  from dsbn_jax import input_pipeline  # pylint: disable=g-import-not-at-top
  from dsbn_jax.datasets import (
    catalog,  # pylint: disable=g-import-not-at-top
    digits,  # pylint: disable=g-import-not-at-top
  )

  c.choice("data.dataset", catalog.DATASETS)
  c.choice("data.train_sharding", input_pipeline.TRAIN_SHARDINGS)
  c.boolean("data.random_flip")
  c.boolean("data.cache_resized")
  _check_train_input(c)
  c.integer("data.eval_batch_size", 1)
  c.number("data.source_val_fraction", 0.0, 1.0, hi_open=True)
  c.integer("data.digits_seed", 0, SEED_MAX)
  num_calls = c.get("data.num_parallel_calls")
  if num_calls != -1:
    c.integer("data.num_parallel_calls", 1, note=", or -1 (tf.data AUTOTUNE)")
  prefetch = c.get("data.prefetch_batches")
  if prefetch != -1:
    c.integer("data.prefetch_batches", 0, note=", or -1 (tf.data AUTOTUNE)")
  c.numbers("data.crop_scale", 2, positive=True, ordered=True)
  c.numbers("data.crop_ratio", 2, positive=True, ordered=True)
  split = c.get("data.eval_split")
  digit_splits = sorted({s.split("/")[1] for s in digits.SPLITS}, reverse=True)  # train, test
  if c.get("data.dataset") == "digits" and split not in (_MISSING, "", *digit_splits):
    c.fail("data.eval_split", split, "'' (the protocol's split), " + ", ".join(digit_splits))


def _check_train_input(c: _Checker) -> None:
  """Where the train augmentation runs (``device_augment.resolve_train_input``; 'auto' resolves
  once the devices are known); a forced device input needs the resized cache, 'resident' the
  global train stream."""
  from dsbn_jax import device_augment  # pylint: disable=g-import-not-at-top

  c.choice("data.train_input", device_augment.TRAIN_INPUTS)
  c.number("data.resident_max_gb", 0.0)
  mode = c.get("data.train_input")
  if mode in ("device", "resident") and c.get("data.cache_resized") is False:
    c.fail(
      "data.train_input",
      mode,
      "'auto' or 'host' with data.cache_resized=False (the device "
      "input reads the resized-image cache)",
    )
  if mode == "resident" and c.get("data.train_sharding") == "process":
    c.fail(
      "data.train_input",
      mode,
      "'auto', 'host' or 'device' with data.train_sharding="
      "'process' (a resident domain is whole on every device)",
    )


def _check_paths(c: _Checker, config) -> None:
  """Domains, the dataset's input folder and the weights file: read-only, nothing prepared."""
  from dsbn_jax.datasets import (  # pylint: disable=g-import-not-at-top
    catalog,  # pylint: disable=g-import-not-at-top
    folder,
    office,
  )
  from dsbn_jax.models import torchvision_port  # pylint: disable=g-import-not-at-top

  data = config.data
  catalog.valid_domains(data)  # custom: the tree (or its prepared copy); errors name manual_dir
  for role in ("source", "target"):
    try:
      catalog.canonical_domain(data, data[role])
    except UserError as e:
      raise UserError(f"invalid config.data.{role}={data[role]!r}: {e}") from None
  builders = {"office31": office.Office31, "office_home": office.OfficeHome}
  if (
    data.dataset in builders
    and not catalog.get_builder(data, data.source, prepare=False).is_prepared()
  ):
    manual = os.path.abspath(os.path.expanduser(data.manual_dir)) if data.manual_dir else ""
    if not (manual and os.path.isdir(manual) and os.listdir(manual)):
      raise folder.missing_manual_dir_error(
        manual or "(not set)", builders[data.dataset].MANUAL_DOWNLOAD_INSTRUCTIONS
      )
  _check_lr0_tasks(c, data)
  if c.get("model.pretrained_path"):
    torchvision_port.check_weights_file(config.model.pretrained_path)


def _check_lr0_tasks(c: _Checker, data) -> None:
  """Every ``optim.lr0_per_task`` key names two domains of the dataset, each task once: a typo
  would otherwise leave its task at ``optim.lr0`` without a word."""
  from dsbn_jax.datasets import catalog  # pylint: disable=g-import-not-at-top

  table = c.get("optim.lr0_per_task")
  seen = {}
  for task in () if table is _MISSING else table:
    try:
      key = tuple(catalog.canonical_domain(data, name) for name in task.split("->"))
    except UserError as e:
      raise UserError(f"invalid config.optim.lr0_per_task key {task!r}{c.where}: {e}") from None
    if key in seen:
      raise UserError(
        f"invalid config.optim.lr0_per_task{c.where}: {seen[key]!r} and {task!r} "
        "are the same task; keep one"
      )
    seen[key] = task


def _check_devices(config) -> None:
  """The mesh the run will build holds as many devices on every process (any batch size is
  padded to a multiple of the device count: sharding.padded_batch_size)."""
  from dsbn_jax import sharding  # pylint: disable=g-import-not-at-top

  sharding.check_batch_sizes(config, sharding.make_mesh())
