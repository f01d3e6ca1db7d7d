"""No silent wrong answers (issue 13): foreign workdirs, damaged checkpoints, domains that differ
only by case, images outside class folders, classes without target images.

Everything runs in-process (``train.train_and_evaluate``, ``predict.predict_folder``,
``sweep.run_sweep``): the session's smoke run on one CPU device (conftest's ``smoke_run``), copied
with ``shutil.copytree`` for each damaged-checkpoint case and resumed on one device as well, and
one tiny run on a generated custom tree on the suite's 8 emulated CPU devices.
The sweep's refusal of a foreign root is in ``sweep_test.py`` (absl: ``dsbn_jax.sweep`` and
``dsbn_jax.predict`` define the same flags, so one process imports only one of them).
"""

import importlib.util
import json
import os
import shutil

import jax
import numpy as np
import pytest

from dsbn_jax import checkpointing, config_check, predict, train
from dsbn_jax.datasets import catalog
from dsbn_jax.errors import UserError
from tests import cli_driver, data_fixtures

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _smoke_config(data_dir):
  spec = importlib.util.spec_from_file_location("smoke", os.path.join(ROOT, "configs", "smoke.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.data.data_dir = str(data_dir)
  return config


def _snapshot(root) -> dict:
  """Relative path -> bytes of every file under ``root``."""
  return {
    os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
    for d, _, files in os.walk(root)
    for f in files
  }


def _assert_same_state(a, b):
  (step_a, sa), (step_b, sb) = a, b
  assert step_a == step_b
  flat_b = dict(jax.tree_util.tree_leaves_with_path(sb))
  for path, x in jax.tree_util.tree_leaves_with_path(sa):
    np.testing.assert_array_equal(x, flat_b[path], err_msg=str(path))


@pytest.fixture(scope="module")
def data_dir(digits_data_dir):
  """The session's prepared Digits (read only)."""
  return digits_data_dir


@pytest.fixture(scope="module")
def custom_data_dir(tmp_path_factory):
  """Where this module's custom datasets are prepared (not the shared Digits folder)."""
  return tmp_path_factory.mktemp("tfds_custom")


@pytest.fixture(scope="module")
def run(smoke_run):
  """The uninterrupted smoke run (6 steps, checkpoints 3 and 6, one device) and its results."""
  workdir, _ = smoke_run
  assert sorted(os.listdir(workdir / "checkpoints")) == ["3", "6"]
  return workdir, json.loads((workdir / "results.json").read_text())


@pytest.fixture(scope="module")
def images(tmp_path_factory):
  folder = tmp_path_factory.mktemp("images")
  for i in range(3):
    data_fixtures.write_image(str(folder / f"{i}.png"), data_fixtures.random_image(i, (32, 32)))
  return folder


# ---------------------------------------------------------------------------------------------
# 2. A workdir that holds someone else's files
# ---------------------------------------------------------------------------------------------


def _foreign(folder):
  folder.mkdir(parents=True)
  (folder / "results.json").write_text('{"mine": 1}')
  (folder / "curves.png").write_bytes(b"\x89PNG not ours")
  (folder / "metrics.jsonl").write_text("".join(f'{{"step": {i}}}\n' for i in range(10)))
  return _snapshot(folder)


def test_a_foreign_non_empty_workdir_is_refused_untouched(tmp_path, data_dir):
  workdir = tmp_path / "theirs"
  before = _foreign(workdir)
  with pytest.raises(
    UserError,
    match=r"is not empty and is not a run's \(no config.json; it "
    r"holds curves.png, metrics.jsonl, results.json\)",
  ):
    train.train_and_evaluate(_smoke_config(data_dir), str(workdir))
  assert _snapshot(workdir) == before  # no .lock, no config.json, every byte kept


def test_an_empty_workdir_or_one_holding_only_our_lock_is_ours(tmp_path, data_dir):
  config = _smoke_config(data_dir)
  (tmp_path / "empty").mkdir()
  (tmp_path / "locked").mkdir()
  (tmp_path / "locked" / ".lock").write_text("pid 1 on host\n")  # a run stopped before config.json
  (tmp_path / "locked" / ".DS_Store").write_bytes(b"\0")
  for name in ("empty", "locked", "new"):
    train.guard_workdir(str(tmp_path / name), config)
  (tmp_path / "hidden").mkdir()
  (tmp_path / "hidden" / ".env").write_text("SECRET=1")  # another hidden file is someone's
  with pytest.raises(UserError, match=r"holds \.env\)"):
    train.guard_workdir(str(tmp_path / "hidden"), config)
  (tmp_path / "file").write_text("x")
  with pytest.raises(UserError, match="is a file, not a folder"):
    train.guard_workdir(str(tmp_path / "file"), config)
  (tmp_path / "badjson").mkdir()
  (tmp_path / "badjson" / "config.json").write_text("{not json")
  with pytest.raises(UserError, match="holds a config.json that is not a run's"):
    train.guard_workdir(str(tmp_path / "badjson"), config)


def test_predict_out_never_replaces_a_file_that_is_not_a_predictions_csv(run, images, tmp_path):
  workdir, _ = run
  mine = tmp_path / "notes.txt"
  mine.write_text("my notes\n")
  with pytest.raises(UserError, match="exists and is not a predictions CSV"):
    predict.predict_folder(str(workdir), str(images), str(mine))
  assert mine.read_text() == "my notes\n"
  with pytest.raises(UserError, match="is a folder"):
    predict.predict_folder(str(workdir), str(images), str(tmp_path))
  out = tmp_path / "preds.csv"
  assert predict.predict_folder(str(workdir), str(images), str(out)) == 3
  assert predict.predict_folder(str(workdir), str(images), str(out)) == 3  # its own CSV: replaced


# ---------------------------------------------------------------------------------------------
# 3. A damaged checkpoint
# ---------------------------------------------------------------------------------------------


def _largest_file(folder) -> str:
  files = [os.path.join(d, f) for d, _, fs in os.walk(folder) for f in fs]
  return max(files, key=os.path.getsize)


def _damage(step_dir, how: str) -> None:
  if how == "empty":
    shutil.rmtree(step_dir)
    os.makedirs(step_dir)
    return
  path = _largest_file(step_dir)
  data = bytearray(open(path, "rb").read())
  if how == "flip":  # 0xff bytes: a float32 of four of them is a NaN
    mid = len(data) // 2
    data[mid : mid + 64] = b"\xff" * 64
  else:  # truncate
    data = data[: len(data) // 2]
  with open(path, "wb") as f:
    f.write(data)


@pytest.mark.parametrize("how", ["flip", "truncate", "empty"])
def test_a_damaged_newest_checkpoint_falls_back_and_resumes_to_the_same_result(
  run, tmp_path, data_dir, capsys, how
):
  ref, ref_results = run
  workdir = tmp_path / "run"
  shutil.copytree(ref, workdir)
  _damage(workdir / "checkpoints" / "6", how)
  capsys.readouterr()
  with cli_driver.mesh_of(1):  # the reference's device count: the same numbers, bit for bit
    results = train.train_and_evaluate(_smoke_config(data_dir), str(workdir))
  out = capsys.readouterr()
  warnings = [l for l in out.out.splitlines() if l.startswith("warning: checkpoint")]
  assert len(warnings) == 1, out.out
  assert warnings[0].startswith(f"warning: checkpoint {workdir}/checkpoints/6 is damaged (")
  assert warnings[0].endswith(
    f"); falling back to step 3 (moved to {workdir}/{checkpointing.DAMAGED_DIR}/6)"
  )
  assert "Traceback" not in out.err and "Event loop is closed" not in out.err
  assert f"resumed from {workdir}/checkpoints at step 3" in out.out
  assert sorted(os.listdir(workdir / checkpointing.DAMAGED_DIR)) == ["6"]  # kept, not deleted
  _assert_same_state(
    checkpointing.read_state_arrays(str(workdir)), checkpointing.read_state_arrays(str(ref))
  )
  for key in ("evals", "best_accuracy", "last_accuracy", "confusion_matrix"):
    assert results[key] == ref_results[key], key


def test_every_checkpoint_damaged_is_a_one_line_error_and_moves_nothing(run, tmp_path, data_dir):
  workdir = tmp_path / "run"
  shutil.copytree(run[0], workdir)
  for step in ("3", "6"):
    _damage(workdir / "checkpoints" / step, "empty")
  with pytest.raises(UserError) as e, cli_driver.mesh_of(1):
    train.train_and_evaluate(_smoke_config(data_dir), str(workdir))
  msg = str(e.value)
  assert "\n" not in msg
  assert msg.startswith(f"checkpoint {workdir}/checkpoints/6 is damaged (KeyError: ")
  assert msg.endswith(
    "; so is the older one: choose a new --workdir, or move "
    f"{workdir}/checkpoints away to train from scratch in this one (nothing "
    "was deleted)"
  )
  assert sorted(os.listdir(workdir / "checkpoints")) == ["3", "6"]
  assert not (workdir / checkpointing.DAMAGED_DIR).exists()
  from dsbn_jax import run_control  # pylint: disable=g-import-not-at-top

  lock = run_control.WorkdirLock(str(workdir))  # released by the refused run
  lock.acquire()
  lock.release()


@pytest.mark.parametrize("how", ["flip", "truncate", "empty"])
def test_predict_with_only_a_damaged_checkpoint_is_a_one_line_error_and_no_csv(
  run, images, tmp_path, how
):
  workdir = tmp_path / "run"
  shutil.copytree(run[0], workdir)
  shutil.rmtree(workdir / "checkpoints" / "3")
  _damage(workdir / "checkpoints" / "6", how)
  out = tmp_path / "preds.csv"
  with pytest.raises(
    UserError,
    match=rf"^checkpoint {workdir}/checkpoints/6 is damaged \(.*\); "
    r"there is no older one: try --checkpoint=best, or train again in a new "
    r"--workdir \(no predictions written\)$",
  ):
    predict.predict_folder(str(workdir), str(images), str(out))
  assert not out.exists() and not os.path.exists(str(out) + ".tmp")


def test_predict_falls_back_to_the_previous_checkpoint_naming_the_damaged_one(
  run, images, tmp_path, capsys
):
  workdir = tmp_path / "run"
  shutil.copytree(run[0], workdir)
  _damage(workdir / "checkpoints" / "6", "flip")
  before = _snapshot(workdir)
  capsys.readouterr()
  assert predict.predict_folder(str(workdir), str(images), str(tmp_path / "p.csv")) == 3
  err = capsys.readouterr().err
  assert f"warning: checkpoint {workdir}/checkpoints/6 is damaged (" in err
  assert "); falling back to step 3\n" in err and "last checkpoint (step 3)" in err
  assert _snapshot(workdir) == before  # reading never moves or changes anything


def test_check_state_names_a_non_finite_or_misshapen_leaf():
  state = {"params": {"fc": {"kernel": np.ones((2, 3), np.float32)}}, "step": np.int32(4)}
  assert checkpointing.check_state(state, like=state) is None
  bad = {
    "params": {"fc": {"kernel": np.array([[1, np.nan, 0]] * 2, np.float32)}},
    "step": np.int32(4),
  }
  assert checkpointing.check_state(bad) == "non-finite values in params/fc/kernel"
  like = {"params": {"fc": {"kernel": jax.ShapeDtypeStruct((2, 4), np.float32)}}}
  assert checkpointing.check_state(state, like) == (
    "params/fc/kernel is float32[2, 3], expected float32[2, 4]"
  )
  sums = checkpointing.checksums(state)  # what a save stores; the device computes the same sums
  assert sums == checkpointing.checksums(jax.tree_util.tree_map(jax.numpy.asarray, state))
  assert checkpointing.check_state(state, sums=sums) is None
  flipped = {
    "params": {"fc": {"kernel": state["params"]["fc"]["kernel"].copy()}},
    "step": np.int32(4),
  }
  flipped["params"]["fc"]["kernel"].view(np.uint8).reshape(-1)[5] ^= 0x10  # still finite
  assert np.isfinite(flipped["params"]["fc"]["kernel"]).all()
  assert checkpointing.check_state(flipped, sums=sums) == "checksum mismatch in params/fc/kernel"


def test_predict_never_writes_non_finite_probabilities(run, images, tmp_path, monkeypatch):
  config, class_names, _ = predict.load_run(str(run[0]))

  def nan_predictor(batch):
    return {"probs": np.full((len(batch["image"]), len(class_names)), np.nan, np.float32)}

  monkeypatch.setattr(
    predict, "load_run", lambda *a: (config, class_names, lambda bs: map(nan_predictor, bs))
  )
  out = tmp_path / "preds.csv"
  with pytest.raises(UserError, match=r"gives non-finite probabilities \(e.g. for .*0.png\)"):
    predict.predict_folder(str(run[0]), str(images), str(out))
  assert not out.exists()


# ---------------------------------------------------------------------------------------------
# 5. Domains that differ only by case; 6. images outside class folders, classes without images
# ---------------------------------------------------------------------------------------------


def _custom(config, tree, source, target, name):
  config.data.dataset, config.data.manual_dir = "custom", str(tree)
  config.data.custom_name, config.data.source, config.data.target = name, source, target
  return config


@pytest.fixture(scope="module")
def case_tree(tmp_path_factory):
  """Domains ``Src`` and ``src``; class ``c2`` has images in ``src`` only."""
  tree = tmp_path_factory.mktemp("case") / "tree"
  data_fixtures.make_domain_tree(str(tree), ["Src"], ["c0", "c1"], per_class=(4,))
  data_fixtures.make_domain_tree(str(tree), ["src"], ["c0", "c1", "c2"], per_class=(3,), seed=1)
  return tree


def test_domains_differing_only_by_case_resolve_exactly_or_fail_as_ambiguous(
  case_tree, custom_data_dir
):
  config = _custom(_smoke_config(custom_data_dir), case_tree, "Src", "src", "case")
  info = catalog.get_data_info(config.data)
  assert (info.source.name, info.target.name) == ("Src", "src")
  assert (info.source.num_train, info.target.num_eval) == (8, 9)
  for spelling in ("SRC", "sRc"):
    with pytest.raises(
      UserError,
      match=r"domain '%s' is ambiguous for dataset custom: it matches "
      r"\['Src', 'src'\], which differ only by case; give the exact name" % spelling,
    ):
      catalog.canonical_domain(config.data, spelling)
  config.data.target = "SRC"
  with pytest.raises(
    UserError,
    match=r"^invalid config.data.target='SRC': domain 'SRC' is "
    "ambiguous",
  ):
    config_check.validate(config)


def test_same_domain_warns_and_a_class_without_target_images_is_null(
  case_tree, custom_data_dir, tmp_path, capsys
):
  """Source = target = ``Src``, which has no ``c2`` images: c2's accuracy is null, not 0.0, and
  is left out of mean_class_accuracy."""
  config = _custom(_smoke_config(custom_data_dir), case_tree, "Src", "Src", "case")
  config.total_steps = config.eval_every_steps = config.checkpoint_every_steps = 1
  capsys.readouterr()
  results = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert (
    "warning: source and target are the same domain (Src): this is no domain adaptation; "
    "check config.data.source and config.data.target"
  ) in capsys.readouterr().out
  saved = json.loads((tmp_path / "run" / "results.json").read_text())
  per_class = saved["per_class_accuracy"]
  assert list(per_class) == ["c0", "c1", "c2"] and per_class["c2"] is None
  assert all(isinstance(per_class[c], float) for c in ("c0", "c1"))
  assert saved["mean_class_accuracy"] == pytest.approx((per_class["c0"] + per_class["c1"]) / 2)
  assert saved["confusion_matrix"][2] == [0, 0, 0] and results["num_target_images"] == 8


def test_images_directly_in_a_domain_folder_are_an_error_naming_one(tmp_path):
  tree = tmp_path / "tree"
  data_fixtures.make_domain_tree(str(tree), ["a", "b"], ["c0", "c1"])
  for name in ("stray_1.jpg", "stray_2.png"):
    data_fixtures.write_image(
      str(tree / "b" / name),
      data_fixtures.random_image(7, (32, 32)),
      "JPEG" if name.endswith("jpg") else "PNG",
    )
  config = _custom(_smoke_config(tmp_path / "tfds"), tree, "a", "b", "stray")
  workdir = tmp_path / "run"
  with pytest.raises(
    UserError,
    match=rf"^2 image\(s\) directly in the domain folder {tree}/b "
    r"\(e.g. stray_1.jpg\) belong to no class; move each into its <class>/ "
    r"sub-folder \(or out of the tree\) and build the dataset again$",
  ):
    train.train_and_evaluate(config, str(workdir))
  assert not workdir.exists()
  for name in ("stray_1.jpg", "stray_2.png"):
    os.replace(tree / "b" / name, tree / "b" / "c1" / name)
  info = catalog.get_data_info(config.data)  # built now, the moved images counted
  assert info.target.num_eval == 2 + 3 + 2  # make_domain_tree: b/c0 2 images, b/c1 3


def test_a_run_saved_before_fields_were_added_is_still_ours(tmp_path):
  """A config.json without the fields added later resumes when they hold the values that compute
  what it computed; another value is another configuration."""
  from configs import smoke
  from dsbn_jax import train

  config = smoke.get_config()
  saved = json.loads(config.to_json_best_effort())
  for field in ("matmul_precision", "fused_pass", "conv_impl"):
    del saved["model"][field]
  (tmp_path / "config.json").write_text(json.dumps(saved))
  (tmp_path / "checkpoints" / "3").mkdir(parents=True)  # a run that trained (train.never_trained)
  train.guard_workdir(str(tmp_path), config)  # no error
  config.model.fused_pass = True
  with pytest.raises(UserError, match="model.fused_pass: None -> True"):
    train.guard_workdir(str(tmp_path), config)
