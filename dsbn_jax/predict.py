"""Classify a folder of images with a trained workdir (target DSBN branch), writing a CSV.

  python -m dsbn_jax.predict --workdir=runs/x --images=path/to/folder --out=predictions.csv
  python -m dsbn_jax.predict --workdir=runs/x --images=path/to/folder --checkpoint=best
  python -m dsbn_jax.predict --workdir=runs/x --images=path/to/folder --checkpoint=selected

Every ``.jpg/.jpeg/.png/.bmp/.gif/.webp`` file below ``--images`` (the files training reads as
images: ``datasets.decode.IMAGE_SUFFIXES``; hidden files and folders skipped as training skips them;
regular files only, a named pipe or a device named like an image is skipped with a warning) is
preprocessed exactly as the run's evaluation (``data.eval_mode``: 10-crop or center crop) and
classified through the same forward pass the training loop evaluates with
(``evaluation.predict_batches`` over ``evaluation.eval_step``), with the model of
``--checkpoint``: ``last`` (default) the latest checkpoint, chosen without any label; ``best`` the
best-evaluated one (``checkpoints_best/``, the model behind ``best_accuracy`` in results.json),
which was selected with the target test labels -- the papers' protocol, not an unbiased estimate;
``selected`` the evaluation the run's label-free validator picked (``checkpoints_selected/``, kept
when the run was trained with ``config.select_with``; docs/model_selection.md).
The CSV has one row per image: path, predicted class, its probability, the top-5 classes and an
error cell (empty); stderr names the checkpoint and step used.

Images are read exactly as the dataset builders read them (``datasets.decode.pipeline_bytes``: a
full PIL decode under PIL's decompression-bomb limit ``PIL.Image.MAX_IMAGE_PIXELS``, exotic modes
and containers -- CMYK JPEG, 16-bit PNG, GIF, BMP, TIFF, WebP -- converted to RGB as in training),
then decoded by the input pipeline, so an image gives the pixels it would give in training. A file
that cannot be read (not an image, truncated, over the bomb limit) is skipped with a warning on
stderr and a row whose prediction, probability and top-5 cells are empty and whose error cell says
why; when no image can be read at all, the run is a one-line error and no CSV is written.

Spreadsheet safety (OWASP CSV injection): text cells come from file and folder names (paths, and
class names, which are the training tree's folder names), so a cell that would begin with ``=``,
``+``, ``-``, ``@``, a tab or a carriage return -- which spreadsheets run as a formula -- is written
with a single quote ``'`` in front; so is a cell that itself begins with ``'``, so the rule can be
undone exactly: remove one leading ``'`` from any cell that has one to get the original text.
"""

import collections
import csv
import errno
import io
import os
import re
import stat
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags  # noqa: E402

from dsbn_jax import compile_cache  # noqa: E402
from dsbn_jax.cli import define_flag, parse_flags, quiet_library_logs, run_cli  # noqa: E402

_WORKDIR = define_flag(
  flags.DEFINE_string, "workdir", None, "A training run's directory.", path=True
)
_IMAGES = define_flag(
  flags.DEFINE_string,
  "images",
  None,
  "Folder of images to classify (searched recursively).",
  path=True,
)
_OUT = define_flag(flags.DEFINE_string, "out", "predictions.csv", "CSV file to write.", path=True)
_BATCH = flags.DEFINE_integer("batch_size", 32, "Images per forward pass.")
CHECKPOINTS = ("last", "best", "selected")
_CHECKPOINT = flags.DEFINE_enum(
  "checkpoint",
  "last",
  list(CHECKPOINTS),
  "Which model: 'last' = the latest checkpoint (no labels used to choose it); 'best' = the "
  "best-evaluated state, selected with the target test labels (the papers' protocol, the "
  "model behind results.json's best_accuracy); 'selected' = the evaluation the run's label-free "
  "validator picked (config.select_with; no target labels used).",
)


def _not_regular(path: str) -> str:
  """What ``path`` is when it is not a regular file (reading a named pipe or a device could block
  forever or never end)."""
  try:
    mode = os.stat(path).st_mode
  except OSError as e:
    return f"a broken symbolic link ({e.strerror or e})" if os.path.islink(path) else str(e)
  kinds = (
    (stat.S_ISFIFO, "a named pipe"),
    (stat.S_ISSOCK, "a socket"),
    (stat.S_ISCHR, "a device"),
    (stat.S_ISBLK, "a device"),
  )
  return next((what for test, what in kinds if test(mode)), "not a regular file")


def list_images(folder: str) -> list[str]:
  """The image files below ``folder``, sorted: the names training reads as images
  (``datasets.decode.IMAGE_SUFFIXES``), hidden files and folders skipped as training skips them
  (``datasets.folder.is_hidden``: dotfiles, ``__MACOSX``, ``Thumbs.db``...), and regular files only
  (a symbolic link to one included): anything else named like an image -- a named pipe, a
  device, a broken link -- is skipped with a warning on stderr."""
  from dsbn_jax.datasets import decode
  from dsbn_jax.datasets import folder as tree
  from dsbn_jax.errors import UserError

  if not os.path.isdir(folder):
    raise UserError(f"--images={folder} is not a folder")
  paths = []
  for d, dirs, files in os.walk(folder):
    dirs[:] = [n for n in dirs if not tree.is_hidden(n)]  # not descended into
    for f in files:
      p = os.path.join(d, f)
      if tree.is_hidden(f) or not f.lower().endswith(decode.IMAGE_SUFFIXES):
        continue
      if os.path.isfile(p):
        paths.append(p)
      else:
        print(f"warning: skipped {p}: {_not_regular(p)}, not an image file", file=sys.stderr)
  if not paths:
    raise UserError(
      f"no images ({', '.join(decode.IMAGE_SUFFIXES)}, hidden files and folders skipped) "
      f"under {folder}"
    )
  return sorted(paths)


def read_run(workdir: str):
  """``(config, class_names, step, state arrays)`` of a training workdir's latest checkpoint."""
  config, class_names, step, state, _ = read_run_checkpoint(workdir)
  return config, class_names, step, state


def read_run_checkpoint(workdir: str, checkpoint: str = "last"):
  """``read_run`` plus the checkpoint's meta (its evaluations; ``meta['best']`` for ``best``)."""
  import ml_collections

  from dsbn_jax import checkpointing, config_check
  from dsbn_jax.errors import UserError

  if checkpoint not in CHECKPOINTS:
    raise UserError(f"invalid --checkpoint={checkpoint}; valid: {', '.join(CHECKPOINTS)}")
  paths = [os.path.join(workdir, f) for f in ("config.json", "classes.json")]
  if not all(os.path.exists(p) for p in paths):
    raise UserError(f"{workdir} is not a training workdir (no config.json/classes.json)")
  saved = [_read_json(p, kind) for p, kind in zip(paths, (dict, list))]
  config, class_names = ml_collections.ConfigDict(saved[0]), saved[1]
  config_check.validate(config, for_predict=True, where=paths[0])
  like = _model_variables(config)  # each checkpoint read must fit the model of config.json
  other = "last" if checkpoint != "last" else "best"
  apart = {"best": checkpointing.BEST_DIR, "selected": checkpointing.SELECTED_DIR}.get(checkpoint)
  folder = apart or checkpointing.ROLLING_DIR
  if checkpoint == "selected" and not config.get("select_with"):
    raise UserError(
      f"{workdir} kept no selected checkpoint: it was trained without config.select_with (its "
      "validators' picks are in results.json 'selection'); use --checkpoint=last or best"
    )
  try:
    step, state, meta = checkpointing.read_checkpoint(workdir, folder=folder, like=like)
  except FileNotFoundError as e:
    if apart:
      raise UserError(
        f"{workdir} has no {checkpoint} checkpoint ({apart}/; runs trained before it existed "
        "keep none): use --checkpoint=last"
      ) from e
    raise UserError(f"{e}: train it first") from e
  except checkpointing.DamagedCheckpointError as e:
    raise UserError(
      f"{e}: try --checkpoint={other}, or train again in a new --workdir (no predictions written)"
    ) from None
  return config, class_names, step, state, meta


def _read_json(path: str, kind: type):
  """A run's JSON file of the given top-level type; one line naming it when it is damaged."""
  from dsbn_jax import reporting
  from dsbn_jax.errors import UserError

  if not os.path.isfile(path):  # a named pipe there would block the read forever
    raise UserError(
      f"{path} is {_not_regular(path)}, not the file training wrote, so this workdir cannot be "
      "used for predictions"
    )
  try:
    return reporting.read_json(path, kind)
  except ValueError as e:  # JSONDecodeError (truncated, not JSON), not UTF-8, another type
    raise UserError(
      f"{path} is damaged ({e}); it is not the file training wrote, so this workdir cannot be "
      "used for predictions"
    ) from None


def _model_variables(config):
  """Shapes and dtypes of the ``params`` and ``batch_stats`` the run's model expects."""
  import jax
  import jax.numpy as jnp

  from dsbn_jax.models import heads

  model = heads.create_model(config)
  size = config.data.crop_size or config.data.resize_size
  image = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  variables = jax.eval_shape(
    lambda x: model.init({"params": jax.random.key(0)}, x, method="init_all"), image
  )
  return {k: variables[k] for k in ("params", "batch_stats")}


def load_run(workdir: str, checkpoint: str = "last"):
  """``(config, class_names, classify)`` of a workdir's ``checkpoint``; ``classify(batches)`` is
  ``evaluation.predict_batches`` with its model on one local device: eval outputs per batch."""
  import functools

  import jax

  from dsbn_jax import evaluation, sharding
  from dsbn_jax.models import heads

  config, class_names, step, state, meta = read_run_checkpoint(workdir, checkpoint)
  mesh = sharding.make_mesh(jax.local_devices()[:1])
  held = evaluation.eval_state(
    heads.create_model(config).apply, state["params"], state["batch_stats"], mesh
  )
  classify = functools.partial(
    evaluation.predict_batches, evaluation.jit_eval_step(mesh, config), held, mesh=mesh
  )
  if checkpoint == "best":
    used = (
      f"best checkpoint (step {step}, target accuracy {meta['best']['accuracy']:.2f}% at "
      "that evaluation, selected with the target labels)"
    )
  elif checkpoint == "selected":
    used = (
      f"selected checkpoint (step {step}, picked by validator {config.select_with} without "
      f"target labels; its target accuracy was {meta['selected']['accuracy']:.2f}%)"
    )
  else:
    used = f"last checkpoint (step {step})"
  from dsbn_jax import methods  # light: no JAX

  name = methods.resolve(config).display_name  # 'alda' with model.bn='dsbn' is alda_dsbn
  print(f"{workdir}: {used}, method {name}", file=sys.stderr)
  return config, class_names, classify


def read_image(path: str) -> bytes:
  """The bytes of image file ``path`` the input pipeline decodes: the dataset builders' ones.

  Raises ``datasets.decode.READ_ERRORS`` for a file that cannot be read.
  """
  from dsbn_jax.datasets import decode

  return decode.pipeline_bytes(_read_regular(path))[0]


def _read_regular(path: str, size: int = -1) -> bytes:
  """The bytes of the regular file ``path`` (at most ``size``); an ``OSError`` for anything else,
  without blocking: opened non-blocking, so a named pipe put there since it was listed is refused
  at once instead of waiting forever for a writer."""
  fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
  with os.fdopen(fd, "rb") as f:
    if not stat.S_ISREG(os.fstat(fd).st_mode):
      raise OSError(errno.EINVAL, f"{_not_regular(path)}, not a regular file", path)
    return f.read(size)


def predict_folder(
  workdir: str, folder: str, out_csv: str, batch_size: int = 32, checkpoint: str = "last"
) -> int:
  """Writes ``out_csv`` with the model of ``checkpoint`` (last | best); returns how many images
  were classified.

  Unreadable images are skipped (a warning on stderr, a CSV row with the error); none readable is
  a UserError and no CSV.
  """
  import numpy as np
  import tensorflow as tf

  from dsbn_jax import input_pipeline, reporting
  from dsbn_jax.datasets import catalog, decode
  from dsbn_jax.errors import UserError

  if not isinstance(batch_size, int) or batch_size < 1:
    raise UserError(f"invalid --batch_size={batch_size}; valid: an integer >= 1")
  _check_out(out_csv)
  catalog.hide_accelerators_from_tf()
  config, class_names, classify = load_run(workdir, checkpoint)  # its config.json checked first
  paths = list_images(folder)
  rows = [None] * len(paths)  # in path order, filled as images are skipped or classified
  skipped = []  # (index, reason)
  in_flight = collections.deque()  # the image indices of each batch handed to classify

  def batch_of(pending):  # fixed batch shape (padded, masked): one compilation
    in_flight.append([i for i, _ in pending])
    images = [image for _, image in pending]
    pad = batch_size - len(images)
    return {
      "image": np.stack(images + [np.zeros_like(images[0])] * pad),
      "label": np.zeros(batch_size, np.int32),
      "mask": np.arange(batch_size) < len(images),
    }

  def batches():
    pending = []  # (index, preprocessed image) of the next batch
    for i, p in enumerate(paths):
      try:
        data = tf.constant(read_image(p))
        pending.append((i, input_pipeline.preprocess_eval(data, config.data).numpy()))
      except (*decode.READ_ERRORS, tf.errors.OpError) as e:
        if isinstance(e, tf.errors.OpError):  # TF refuses bytes PIL read: its message, no op names
          e = type(e)(None, None, re.sub(r"\{\{.*?\}\}|\[Op:.*?\].*", "", e.message))
        reason = decode.describe(e)
        print(f"warning: skipped {p}, it cannot be read as an image ({reason})", file=sys.stderr)
        rows[i] = [os.path.relpath(p, folder), "", "", "", reason]
        skipped.append((i, reason))
        continue
      if len(pending) == batch_size:
        yield batch_of(pending)
        pending = []
    if pending:
      yield batch_of(pending)

  for out in classify(batches()):
    indices = in_flight.popleft()
    probs = np.asarray(out["probs"])[: len(indices)]
    if not np.isfinite(probs).all():  # never written: a NaN row would read as class 0
      bad = paths[indices[int(np.flatnonzero(~np.isfinite(probs).all(axis=1))[0])]]
      raise UserError(
        f"the {checkpoint} checkpoint of {workdir} gives non-finite probabilities "
        f"(e.g. for {bad}): its weights are damaged or the run diverged; try "
        f"--checkpoint={'best' if checkpoint == 'last' else 'last'} or train again "
        f"(no predictions written to {out_csv})"
      )
    for i, pr in zip(indices, probs):
      top = np.argsort(-pr)[:5]
      rows[i] = [
        os.path.relpath(paths[i], folder),
        class_names[top[0]],
        f"{pr[top[0]]:.4f}",
        " ".join(f"{class_names[k]}:{pr[k]:.3f}" for k in top),
        "",
      ]
  if len(skipped) == len(paths):
    i, reason = skipped[0]
    raise UserError(
      f"none of the {len(paths)} images under {folder} can be read (e.g. "
      f"{paths[i]}: {reason}); no predictions written to {out_csv}"
    )
  if skipped:
    print(
      f"warning: {len(skipped)} of {len(paths)} images could not be read and were skipped; "
      f"their rows in {out_csv} give the error",
      file=sys.stderr,
    )
  os.makedirs(os.path.dirname(os.path.abspath(out_csv)), exist_ok=True)
  text = io.StringIO(newline="")
  w = csv.writer(text)
  w.writerow(_HEADER)
  w.writerows([[spreadsheet_safe(cell) for cell in row] for row in rows])
  # atomic: a failure (a full disk) never leaves half a CSV or a .tmp, and names out_csv
  reporting.write_atomic(out_csv, text.getvalue())
  return len(paths) - len(skipped)


_HEADER = ["path", "prediction", "probability", "top5", "error"]
_OLD_HEADERS = (["path", "prediction", "probability", "top5"],)  # CSVs of earlier versions
# A cell beginning with one of these is run as a formula by spreadsheets (OWASP CSV injection);
# "'" itself is included so that removing one leading "'" always restores the text.
_FORMULA_STARTS = ("=", "+", "-", "@", "\t", "\r", "'")


def spreadsheet_safe(cell: str) -> str:
  """``cell``, with a ``'`` in front when a spreadsheet would run it (see the module docstring)."""
  return "'" + cell if cell.startswith(_FORMULA_STARTS) else cell


def _check_out(out_csv: str) -> None:
  """``--out`` may replace a predictions CSV (a previous run's), never another file, and its
  folder can be written (``run_control.check_writable``: not under a file, not read-only, not a
  virtual filesystem like /proc), checked before any image is classified."""
  from dsbn_jax import run_control
  from dsbn_jax.errors import UserError

  if not out_csv:
    raise UserError("--out= is empty; give the CSV file to write, e.g. --out=predictions.csv")
  if os.path.isdir(out_csv) or out_csv.endswith((os.sep, "/")):
    raise UserError(f"--out={out_csv} is a folder; give the CSV file to write")
  if os.path.lexists(out_csv) and not os.path.isfile(out_csv):  # never opened: it could block
    raise UserError(
      f"--out={out_csv} exists and is {_not_regular(out_csv)}, not a file; choose another --out "
      "(it was left unchanged)"
    )
  run_control.check_writable(os.path.dirname(os.path.abspath(out_csv)), "--out", out_csv)
  if os.path.exists(out_csv):
    # its first line only, whatever the file holds (a big file without a newline included)
    try:
      first = _read_regular(out_csv, 4096).decode("utf-8", "replace").splitlines()[:1]
    except OSError as e:
      raise UserError(
        f"--out={out_csv} exists and cannot be read ({e.strerror or e}); choose another --out"
      ) from None
    if "".join(first).strip() not in {",".join(h) for h in (_HEADER, *_OLD_HEADERS)}:
      raise UserError(
        f"--out={out_csv} exists and is not a predictions CSV (its first line is "
        f"not {','.join(_HEADER)}); choose another --out (it was left unchanged)"
      )


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  quiet_library_logs()
  compile_cache.enable()  # before anything compiles
  from dsbn_jax import launcher  # pylint: disable=g-import-not-at-top

  run_cli(launcher.require_single_process)  # one process: never srun -n 2 / mpirun (one CSV)
  n = run_cli(
    predict_folder, _WORKDIR.value, _IMAGES.value, _OUT.value, _BATCH.value, _CHECKPOINT.value
  )
  print(f"classified {n} images with the {_CHECKPOINT.value} checkpoint -> {_OUT.value}")


if __name__ == "__main__":
  flags.mark_flags_as_required(["workdir", "images"])
  app.run(main, flags_parser=parse_flags)
