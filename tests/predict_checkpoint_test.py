"""``predict --checkpoint=best|last|selected`` on a smoke run, the best and selected checkpoints
across resumes, and the panels of ``curves.png``.

Training runs are the command ``python -m dsbn_jax.main`` on one CPU device (the generated Digits
data of conftest's ``digits_data_dir``), run in this process (tests/cli_driver.py), except the
crash: a real subprocess killed with ``kill -9``, started in the background when the test session
starts (``background_jobs``, run by conftest's ``background_runs``);
predict is called in-process on the run's target test images, exported from the prepared dataset
as their stored PNG bytes into ``<class>/<n>.png``.
"""

import csv
import json
import os
import shutil
import subprocess

import jax
import numpy as np
import pytest

from dsbn_jax import checkpointing, predict, reporting
from dsbn_jax.errors import UserError
from tests import cli_driver, suite_env, train_test

ROOT = suite_env.ROOT
# configs/smoke.py with an evaluation after every step, 5 steps and a larger lr0: the target
# accuracy then goes 10.4, 11.2, 11.2, 9.3, 10.4 %, so the best evaluation (step 2) is not the last
# (step 5), and the evaluations outpace the regular checkpoints (steps 3 and 5). With the plain
# smoke run the accuracy only rises, and best and last would be the same step-6 model. The
# entropy validator's pick is kept too (select_with: it needs no source split, so training is the
# same).
OVERRIDES = (
  "--config.eval_every_steps=1",
  "--config.total_steps=5",
  "--config.optim.lr0=0.2",
  "--config.select_with=entropy",
  "--config.method=alda",  # with model.bn='dsbn': alda_dsbn, the smoke config's method
  "--config.model.bn=dsbn",
)
LAST = 5


def _main(workdir, data_dir):
  """The command, in this process, on one device."""
  result = cli_driver.run_main(workdir, data_dir, *OVERRIDES)
  assert result.returncode == 0, result.stderr[-3000:]
  return result


def _main_subprocess(workdir, data_dir, env):
  """The command as a new process (the crash: only a process can be killed)."""
  cmd = train_test._command(workdir, data_dir, *OVERRIDES)
  return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)


def background_jobs(session, root, data_dir) -> dict:
  """{"crash": a run killed as its step 3 starts (kill -9 after 2 steps): ``(workdir,
  CompletedProcess)``}, started by conftest's ``background_runs`` when the session starts."""
  if not any(
    str(getattr(item, "path", "")) == os.path.abspath(__file__)
    and item.name == "test_a_crash_after_the_best_evaluation_resumes_to_the_same_best_checkpoint"
    for item in session.items
  ):
    return {}  # not selected
  workdir = root / "crashed"
  env = suite_env.subprocess_env(1, DSBN_JAX_KILL_AT_STEP="2")  # this process's environment now
  return {"crash": lambda: (workdir, _main_subprocess(workdir, data_dir, env))}


@pytest.fixture(scope="module")
def data_dir(digits_data_dir):
  return digits_data_dir


@pytest.fixture(scope="module")
def crashed(background_runs):
  """The future of ``background_jobs``' crash."""
  return background_runs[f"{__name__.rsplit('.', 1)[-1]}:crash"]


@pytest.fixture(scope="module")
def run(tmp_path_factory, data_dir):
  """A finished smoke run (uninterrupted) and its results.json."""
  workdir = tmp_path_factory.mktemp("run") / "run"
  _main(workdir, data_dir)
  return workdir, json.loads((workdir / "results.json").read_text())


@pytest.fixture(scope="module")
def target_images(run, tmp_path_factory):
  """The evaluated target split as ``<class>/<n>.png`` (the stored bytes, so identical pixels)."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top

  from dsbn_jax.datasets import catalog  # pylint: disable=g-import-not-at-top

  workdir, results = run
  config = ml_collections.ConfigDict(json.loads((workdir / "config.json").read_text()))
  domain = catalog.resolve_domain(config.data, config.data.target)
  folder = tmp_path_factory.mktemp("target_images")
  n = 0
  stored = domain.builder.as_dataset(
    split=domain.eval_split, decoders={"image": tfds.decode.SkipDecoding()}
  )
  for ex in stored.as_numpy_iterator():
    data = ex["image"]
    assert data[:4] == b"\x89PNG"
    path = folder / results["class_names"][ex["label"]] / f"{n:05d}.png"
    path.parent.mkdir(exist_ok=True)
    path.write_bytes(data)
    n += 1
  assert n == results["num_target_images"]
  return folder


def _predict_accuracy(workdir, folder, out_csv, checkpoint, capsys) -> tuple[float, str]:
  """(accuracy in % over the folder tree's classes, predict's stderr)."""
  capsys.readouterr()
  n = predict.predict_folder(str(workdir), str(folder), str(out_csv), checkpoint=checkpoint)
  err = capsys.readouterr().err
  with open(out_csv, encoding="utf-8") as f:
    rows = list(csv.DictReader(f))
  assert len(rows) == n
  correct = sum(r["prediction"] == r["path"].split(os.sep)[0] for r in rows)
  return 100.0 * correct / n, err


def _best_state(workdir):
  return checkpointing.read_checkpoint(str(workdir), folder=checkpointing.BEST_DIR)


def _assert_same(a, b):
  leaves_a, leaves_b = jax.tree_util.tree_leaves_with_path(a), jax.tree_util.tree_leaves(b)
  assert len(leaves_a) == len(leaves_b)
  for (path, x), y in zip(leaves_a, leaves_b):
    np.testing.assert_array_equal(x, y, err_msg=str(path))


def test_each_checkpoint_folder_has_its_own_multi_process_barriers(tmp_path):
  """orbax names a multi-process save's barriers after the step directory alone unless a prefix
  tells the managers apart: the best and the selected state saved at one evaluation then meet at
  one barrier and time out (a 2-process run did, once in four). Each manager's prefix is its
  folder. (Read from orbax's private attribute: the prefix acts only with several processes.)"""
  ckpt = checkpointing.Checkpointer(str(tmp_path), async_save=False)
  try:
    for folder in (checkpointing.BEST_DIR, checkpointing.SELECTED_DIR):
      ckpt.apart_step(folder)  # opens that folder's manager
    managers = {checkpointing.ROLLING_DIR: ckpt._mngr, **ckpt._apart}  # pylint: disable=protected-access
    prefixes = {
      folder: mngr._multiprocessing_options.barrier_sync_key_prefix  # pylint: disable=protected-access
      for folder, mngr in managers.items()
    }
    assert prefixes == {folder: folder for folder in managers} and len(prefixes) == 3
  finally:
    ckpt.close()


def test_the_best_checkpoint_is_kept_apart_from_the_rolling_ones(run):
  workdir, results = run
  assert [e["step"] for e in results["evals"]] == [1, 2, 3, 4, 5]
  assert results["best_step"] < LAST, "best is the last evaluation: choose other OVERRIDES"
  assert sorted(os.listdir(workdir / "checkpoints")) == ["3", "5"]  # resume never sees best
  assert os.listdir(workdir / checkpointing.BEST_DIR) == [str(results["best_step"])]
  step, _, meta = _best_state(workdir)
  assert step == results["best_step"]
  assert {k: meta["best"][k] for k in ("step", "accuracy")} == {
    "step": results["best_step"],
    "accuracy": results["best_accuracy"],
  }
  assert meta["best"] == results["evals"][[e["step"] for e in results["evals"]].index(step)]


def test_predict_best_and_last_give_their_evaluations_accuracies(
  run, target_images, tmp_path, capsys
):
  workdir, results = run
  best, err = _predict_accuracy(workdir, target_images, tmp_path / "best.csv", "best", capsys)
  assert best == results["best_accuracy"]
  assert f"best checkpoint (step {results['best_step']}, " in err
  assert "selected with the target labels" in err
  last, err = _predict_accuracy(workdir, target_images, tmp_path / "last.csv", "last", capsys)
  assert last == results["last_accuracy"] == results["evals"][-1]["accuracy"]
  assert f"last checkpoint (step {LAST})" in err
  assert err.rstrip().endswith(", method alda_dsbn"), err  # the pair's name, not config.method's
  assert best > last


def test_predict_selected_is_the_validators_pick_chosen_without_labels(
  run, target_images, tmp_path, capsys
):
  workdir, results = run
  chosen = results["selection"]["entropy"]
  want = {"validator": "entropy", "step": chosen["step"], "accuracy": chosen["accuracy"]}
  assert results["selected"] == want
  assert os.listdir(workdir / checkpointing.SELECTED_DIR) == [str(chosen["step"])]
  acc, err = _predict_accuracy(workdir, target_images, tmp_path / "sel.csv", "selected", capsys)
  assert acc == chosen["accuracy"]
  assert f"selected checkpoint (step {chosen['step']}, picked by validator entropy" in err
  step, _, meta = checkpointing.read_checkpoint(str(workdir), folder=checkpointing.SELECTED_DIR)
  assert step == chosen["step"] and meta["selected"]["step"] == step


def test_predict_best_of_a_run_without_a_best_checkpoint_is_a_one_line_error(
  run, target_images, tmp_path
):
  workdir = tmp_path / "old_run"  # as trained before the best checkpoint existed
  shutil.copytree(run[0], workdir, ignore=shutil.ignore_patterns(checkpointing.BEST_DIR))
  with pytest.raises(UserError) as e:
    predict.predict_folder(
      str(workdir), str(target_images), str(tmp_path / "p.csv"), checkpoint="best"
    )
  msg = str(e.value)
  assert "\n" not in msg and "has no best checkpoint" in msg and "--checkpoint=last" in msg
  assert not (tmp_path / "p.csv").exists()
  with pytest.raises(UserError, match="invalid --checkpoint=first; valid: last, best, selected"):
    predict.predict_folder(
      str(run[0]), str(target_images), str(tmp_path / "p.csv"), checkpoint="first"
    )


def test_resuming_the_finished_run_keeps_its_best_checkpoint(run, data_dir, tmp_path):
  workdir = tmp_path / "run"
  shutil.copytree(run[0], workdir)
  proc = _main(workdir, data_dir)
  assert f"at step {LAST}" in proc.stdout
  assert json.loads((workdir / "results.json").read_text())["evals"] == run[1]["evals"]
  assert os.listdir(workdir / checkpointing.BEST_DIR) == [str(run[1]["best_step"])]
  (step, state, meta), (ref_step, ref_state, ref_meta) = _best_state(workdir), _best_state(run[0])
  assert step == ref_step and meta == ref_meta
  _assert_same(state, ref_state)


def test_a_crash_after_the_best_evaluation_resumes_to_the_same_best_checkpoint(
  run, data_dir, crashed
):
  """Killed as step 3 starts, after the evaluations of steps 1 and 2 wrote best checkpoints but
  before the first regular checkpoint: the best checkpoint is ahead of the resume point (step 0).
  The resumed run re-trains and re-evaluates those steps bit for bit, replaces it, and ends with
  the uninterrupted run's best checkpoint."""
  workdir, proc = crashed.result(timeout=1800)
  assert proc.returncode == -9, proc.stderr[-2000:]
  assert not os.listdir(workdir / "checkpoints")
  assert os.listdir(workdir / checkpointing.BEST_DIR)  # step 1's at least (2's may be partial)
  resumed = _main(workdir, data_dir)
  assert "resumed from" not in resumed.stdout
  assert json.loads((workdir / "results.json").read_text())["evals"] == run[1]["evals"]
  (step, state, meta), (ref_step, ref_state, ref_meta) = _best_state(workdir), _best_state(run[0])
  assert step == ref_step and meta["best"] == ref_meta["best"]
  _assert_same(state, ref_state)
  assert os.listdir(workdir / checkpointing.BEST_DIR) == [str(ref_step)]
  selected = [os.listdir(w / checkpointing.SELECTED_DIR) for w in (workdir, run[0])]
  assert selected[0] == selected[1] == [str(run[1]["selected"]["step"])]


_ALL_TERMS = (
  "train/loss",
  "train/ce",
  "train/adv",
  "train/reg",
  "train/correct",
  "train/dann",
  "train/confident_frac",
)


def test_curves_draw_every_loss_term_and_the_confident_fraction_on_their_own_axes(tmp_path):
  path = tmp_path / "metrics.jsonl"
  rows = [
    {"step": s, **{k: 1.0 / s + i for i, k in enumerate(_ALL_TERMS)}, "train/lr": 0.01}
    for s in range(1, 5)
  ] + [{"step": 4, "eval/accuracy": 50.0}]
  path.write_text("".join(json.dumps(r) + "\n" for r in rows))
  titles = reporting.plot_curves(str(path), str(tmp_path / "c.png"), "all terms")
  assert titles == [
    "target accuracy (evaluation)",
    "total loss (CE + transfer)",
    "source cross-entropy",
    "adversarial loss (ALDA)",
    "discriminator regulariser",
    "corrected-target loss",
    "DANN domain loss",
    "confident target fraction",
  ]
  assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
  # source_only logs only the CE (and the total it equals): no empty panels for the rest.
  path.write_text(
    "".join(json.dumps({"step": s, "train/loss": 1.0, "train/ce": 1.0}) + "\n" for s in (1, 2))
  )
  titles = reporting.plot_curves(str(path), str(tmp_path / "s.png"))
  assert titles == [
    "target accuracy (evaluation)",
    "total loss (CE + transfer)",
    "source cross-entropy",
  ]
