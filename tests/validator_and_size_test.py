"""Issue 21, items 9 and 6: a validator that cannot score gives None and its reason, never a crash
(a target domain of one image trains and evaluates, with and without ``config.select_with``); an
image size below what the backbone takes is refused by ``config_check.validate`` in one line,
before any workdir exists.

Everything is in-process: validators on hand-made degenerate inputs, the consumers of their
scores on hand-made evaluations, two tiny runs of configs/custom.py (SmallCNN, 16x16 PNGs, one
target image) through tests/cli_driver.py, and ``jax.eval_shape`` of each backbone's init.
"""

import json
import os
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsbn_jax import config_check, sharding, sweep, train, validators
from dsbn_jax.errors import UserError
from dsbn_jax.models import heads
from tests import cli_driver, data_fixtures

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CUSTOM = os.path.join(ROOT, "configs", "custom.py")

ONE = np.array([[0.7, 0.2, 0.1]])  # one target prediction
MANY = np.array([[0.7, 0.2, 0.1], [0.1, 0.8, 0.1], [0.2, 0.2, 0.6], [0.6, 0.3, 0.1]])

# ---------------------------------------------------------------------------------------------
# Item 9: validators on degenerate inputs, and every consumer of their None
# ---------------------------------------------------------------------------------------------


def test_one_target_prediction_scores_what_it_can_and_says_why_not_the_rest():
  feats = np.random.default_rng(0).normal(size=(4, 2))
  scores, skipped = validators.scores_and_reasons(
    ONE, feats[:1], MANY, np.array([0, 1, 2, 0]), feats
  )
  assert (
    scores["snd"] is None and skipped["snd"] == "snd needs at least 2 target predictions (has 1)"
  )
  assert scores["info_max"] is None and "info_max needs at least 2" in skipped["info_max"]
  assert scores["dev"] is None and skipped["dev"] == "dev needs at least 2 target features (has 1)"
  assert scores["entropy"] == pytest.approx(validators.entropy(ONE))
  assert isinstance(scores["bnm"], float) and scores["source_accuracy"] == 100.0
  assert set(skipped) == {"snd", "info_max", "dev"}
  assert validators.scores(ONE) == {k: scores[k] for k in validators.TARGET_ONLY}  # no raise


def test_degenerate_inputs_give_none_with_a_reason_never_an_exception():
  labels = np.array([0, 1, 2, 0])
  feats = np.random.default_rng(1).normal(size=(4, 2))
  # no target prediction at all
  scores, skipped = validators.scores_and_reasons(np.zeros((0, 3)))
  assert scores == dict.fromkeys(validators.TARGET_ONLY) and set(skipped) == set(scores)
  assert skipped["entropy"] == "entropy needs target predictions (has 0)"
  # a non-finite prediction (NaN in the SVD of bnm, in sklearn's fit of dev)
  bad = MANY.copy()
  bad[1, 0] = np.nan
  scores, skipped = validators.scores_and_reasons(bad, feats, MANY, labels, feats)
  assert [k for k, v in scores.items() if v is None] == ["entropy", "info_max", "snd", "bnm"]
  assert skipped["bnm"] == "bnm: the target predictions hold non-finite values"
  nan_feats = feats.copy()
  nan_feats[0, 0] = np.inf
  scores, skipped = validators.scores_and_reasons(MANY, feats, MANY, labels, nan_feats)
  assert scores["dev"] is None and "non-finite" in skipped["dev"]
  # one held-out source row: dev's control variate has no variance to estimate
  scores, skipped = validators.scores_and_reasons(MANY, feats, MANY[:1], labels[:1], feats[:1])
  assert scores["dev"] is None and skipped["dev"].startswith("dev needs at least 2 held-out source")
  assert scores["source_accuracy"] == 100.0
  with pytest.raises(validators.Unscorable, match="snd needs at least 2"):
    validators.snd(ONE)  # the function itself still refuses; scores_and_reasons turns it to None


def _evals(snd_scores, accs):
  out = []
  for i, (s, a) in enumerate(zip(snd_scores, accs)):
    e = {"step": i + 1, "accuracy": a, "validators": {"snd": s, "entropy": -float(i)}}
    if s is None:
      e["validators_skipped"] = {"snd": "snd needs at least 2 target predictions (has 1)"}
    out.append(e)
  return out


def test_select_rank_correlation_and_selection_skip_none():
  evals = _evals([None, 0.5, None, 0.9, 0.1], [10.0, 20.0, 30.0, 40.0, 50.0])
  assert validators.select(evals, "snd")["step"] == 4
  assert validators.select(_evals([None, None], [1.0, 2.0]), "snd") is None
  # pairs with a None are left out: (0.5, 20), (0.9, 40), (0.1, 50)
  assert validators.rank_correlation([None, 0.5, None, 0.9, 0.1], [1, 20, 3, 40, 50]) == (
    pytest.approx(validators.rank_correlation([0.5, 0.9, 0.1], [20, 40, 50]))
  )
  chosen = train.selection(evals)["snd"]
  assert (chosen["step"], chosen["accuracy"]) == (4, 40.0)
  assert chosen["scores"] == {"1": None, "2": 0.5, "3": None, "4": 0.9, "5": 0.1}
  assert chosen["skipped"] == {
    "1": "snd needs at least 2 target predictions (has 1)",
    "3": "snd needs at least 2 target predictions (has 1)",
  }
  never = train.selection(_evals([None, None, None], [1.0, 2.0, 3.0]))
  assert never["snd"]["step"] is None and never["snd"]["accuracy"] is None
  assert never["snd"]["rank_correlation"] is None and len(never["snd"]["skipped"]) == 3
  assert never["entropy"]["step"] == 1


def _keep_apart_host(meta):
  saved = []
  ckpt = types.SimpleNamespace(
    apart_step=lambda apart: None, save_apart=lambda apart, step, state, m: saved.append(step)
  )
  return types.SimpleNamespace(meta=meta, ckpt=ckpt, state=None), saved


def test_a_validator_that_cannot_score_an_evaluation_keeps_the_previous_pick():
  first, second = _evals([0.5, None], [10.0, 90.0])
  host, saved = _keep_apart_host({})
  score = lambda e: e["validators"].get("snd")
  train._Run._keep_apart(host, "selected", "checkpoints_selected", first, score)
  train._Run._keep_apart(host, "selected", "checkpoints_selected", second, score)
  assert host.meta["selected"] is first and saved == [1]
  host, saved = _keep_apart_host({})  # never scored: nothing kept, nothing saved
  train._Run._keep_apart(host, "selected", "checkpoints_selected", second, score)
  assert "selected" not in host.meta and saved == []


def test_from_process_0_carries_none_across_processes(monkeypatch):
  """Two processes, faked: the broadcast is the identity, so what comes back is what was sent."""
  from jax.experimental import multihost_utils

  monkeypatch.setattr(jax, "process_count", lambda: 2)
  monkeypatch.setattr(multihost_utils, "broadcast_one_to_all", lambda x: x)
  got = sharding.from_process_0({"entropy": -0.25, "snd": None, "bnm": 0.1 + 0.2})
  assert got == {"entropy": -0.25, "snd": None, "bnm": 0.1 + 0.2}


def _fake_run(root, seed, snd_scores, accs):
  from tests.model_selection_test import _fake  # pylint: disable=g-import-not-at-top

  _fake(root, "m", "a->b", seed, _evals(snd_scores, accs))


def test_sweep_tables_leave_out_and_name_the_runs_a_validator_could_not_score(tmp_path):
  _fake_run(tmp_path, 0, [0.1, 0.9], [50.0, 70.0])  # snd picks step 2 (70)
  _fake_run(tmp_path, 1, [None, None], [40.0, 60.0])  # snd scored nothing
  md = sweep.write_summary(str(tmp_path), ["a->b"], ["m"], [0, 1])["markdown"]
  snd = md.split("#### `snd`")[1].split("####")[0]
  assert "| m | 70.0 | 70.0 |" in snd, snd
  assert (
    "Left out, not scored: m a→b seed 1: snd needs at least 2 target predictions (has 1)." in snd
  )
  overall = md.split("Every validator over every run above")[1]
  assert "| `snd` | 1 |" in overall and "| `entropy` | 2 |" in overall
  assert sweep._selected(json.loads(_results_text(tmp_path, 1)), "snd") is None


def _results_text(root, seed):
  with open(os.path.join(sweep.run_dir(str(root), "m", "a->b", seed), "results.json")) as f:
    return f.read()


# ---------------------------------------------------------------------------------------------
# Item 9 end to end: a target domain of one image
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def one_image_tree(tmp_path_factory):
  """Source ``s``: 4 images in each of classes c0 and c1; target ``t``: one image of c0 (16x16
  PNGs); and the data_dir the runs share."""
  root = tmp_path_factory.mktemp("one_image")
  tree = root / "tree"
  for c in ("c0", "c1"):
    for i in range(4):
      image = data_fixtures.random_image(10 * i + (c == "c1"), (16, 16))
      data_fixtures.write_image(str(tree / "s" / c / f"{c}_{i}.png"), image)
  data_fixtures.write_image(
    str(tree / "t" / "c0" / "only.png"), data_fixtures.random_image(99, (16, 16))
  )
  return tree, root / "tfds"


def _run_one_image(tree, data_dir, workdir, *overrides):
  return cli_driver.run_main(
    workdir,
    data_dir,
    f"--config.data.manual_dir={tree}",
    "--config.data.source=s",
    "--config.data.target=t",
    "--config.method=source_only",
    "--config.model.backbone=small_cnn",
    "--config.model.pretrained_path=",
    "--config.model.feature_dim=8",
    "--config.model.bottleneck_dim=8",
    "--config.data.resize_size=16",
    "--config.data.crop_size=0",
    "--config.data.eval_mode=center",
    "--config.data.eval_batch_size=4",
    "--config.batch_size=1",  # the target domain holds one image
    "--config.total_steps=2",
    "--config.eval_every_steps=1",
    "--config.checkpoint_every_steps=2",
    *overrides,
    config=CUSTOM,
  )


def test_a_target_of_one_image_trains_and_records_why_a_validator_is_none(one_image_tree, tmp_path):
  tree, data_dir = one_image_tree
  workdir = tmp_path / "run"
  result = _run_one_image(tree, data_dir, workdir, "--config.data.source_val_fraction=0.5")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Traceback" not in result.stderr
  results = json.loads((workdir / "results.json").read_text())
  assert results["num_target_images"] == 1 and [e["step"] for e in results["evals"]] == [1, 2]
  for e in results["evals"]:
    assert e["validators"]["snd"] is None and e["validators"]["dev"] is None
    assert e["validators_skipped"]["snd"] == "snd needs at least 2 target predictions (has 1)"
    assert e["validators_skipped"]["dev"] == "dev needs at least 2 target features (has 1)"
    assert isinstance(e["validators"]["entropy"], float)
    assert isinstance(e["validators"]["source_accuracy"], float)
  assert results["selection"]["snd"]["step"] is None
  assert results["selection"]["snd"]["skipped"]["2"].startswith("snd needs at least 2")
  assert results["selection"]["entropy"]["step"] in (1, 2) and results["selected"] is None
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  logged = [r for r in rows if "validators/entropy" in r]
  assert [r["step"] for r in logged] == [1, 2]
  assert not any("validators/snd" in r or "validators/dev" in r for r in rows)


def test_select_with_a_validator_that_never_scores_says_so_in_results(one_image_tree, tmp_path):
  tree, data_dir = one_image_tree
  workdir = tmp_path / "run"
  result = _run_one_image(tree, data_dir, workdir, "--config.select_with=snd")
  assert result.returncode == 0, result.stderr[-3000:]
  assert "Traceback" not in result.stderr
  results = json.loads((workdir / "results.json").read_text())
  assert results["selected"] == {
    "step": None,
    "accuracy": None,
    "validator": "snd",
    "reason": "snd could not score any evaluation (snd needs at least 2 target predictions "
    "(has 1)); no selected checkpoint was kept",
  }
  assert not (workdir / "checkpoints_selected").exists()
  assert (
    "warning: config.select_with='snd' could not score step 2 (snd needs at least 2 target "
    "predictions (has 1)); nothing selected yet"
  ) in result.stdout


# ---------------------------------------------------------------------------------------------
# Item 6: the smallest input each backbone takes
# ---------------------------------------------------------------------------------------------


def _config(backbone, size, crop=0, eval_mode="center"):
  config = data_fixtures.get_config("smoke", lock=False)
  config.model.backbone = backbone
  config.model.stage_sizes = (1, 1)  # 'resnet' only
  config.model.num_filters = 4  # 'resnet' only
  config.model.num_classes = 3
  config.data.resize_size, config.data.crop_size, config.data.eval_mode = size, crop, eval_mode
  return config


def _init_shape(config, size):
  model = heads.create_model(config)
  x = jax.ShapeDtypeStruct((1, size, size, 3), jnp.float32)
  return jax.eval_shape(lambda x: model.init(jax.random.key(0), x, method="init_all"), x)


@pytest.mark.parametrize("backbone, least", [("small_cnn", 16), ("resnet", 1), ("resnet50", 1)])
def test_each_backbone_at_its_smallest_input_validates_and_initialises(backbone, least):
  config = _config(backbone, least)
  assert heads.min_input_size(config.model) == least
  config_check.validate(config)
  config_check.validate(config, for_predict=True)
  _init_shape(config, least)  # the model initialises at that size
  if least > 1:
    with pytest.raises(ZeroDivisionError):  # what a run hit, after config.json was written
      _init_shape(config, least - 1)


@pytest.mark.parametrize(
  "size, crop, eval_mode, message",
  [
    (
      15,
      0,
      "center",
      "invalid config.data.resize_size=15; valid: an integer >= 16 (model.backbone='small_cnn' "
      "takes inputs of at least 16x16 px)",
    ),
    (
      32,
      8,
      "center",
      "invalid config.data.crop_size=8; valid: an integer >= 16 (model.backbone='small_cnn' "
      "takes inputs of at least 16x16 px)",
    ),
    (
      16,
      15,
      "10crop",
      "invalid config.data.resize_size=16; valid: an integer >= 17 (model.backbone='small_cnn' "
      "takes inputs of at least 16x16 px; 10crop crops below it)",
    ),
  ],
)
def test_an_input_below_the_backbone_minimum_is_refused_in_one_line(size, crop, eval_mode, message):
  config = _config("small_cnn", size, crop, eval_mode)
  for for_predict in (False, True):
    with pytest.raises(UserError) as e:
      config_check.validate(config, for_predict=for_predict)
    assert str(e.value) == message


def test_main_with_a_too_small_size_exits_2_and_creates_no_workdir(tmp_path):
  workdir = tmp_path / "new"
  result = cli_driver.run_main(workdir, tmp_path / "tfds", "--config.data.resize_size=8")
  assert result.returncode == 2, result.stderr[-3000:]
  assert result.stderr.strip().splitlines() == [
    "error: invalid config.data.resize_size=8; valid: an integer >= 16 "
    "(model.backbone='small_cnn' takes inputs of at least 16x16 px)"
  ]
  assert not workdir.exists() and not (tmp_path / "tfds").exists()
