"""Label-free model selection end to end: the held-out source split, the eval outputs the
validators read, their scores in every evaluation and ``results.json``, and the sweep tables.

The validators' own maths is in validators_test.py (hand-made inputs with known scores).
"""

import functools
import hashlib
import json
import os

import jax
import numpy as np
import pytest

from dsbn_jax import data_source, evaluation, input_pipeline, sweep, validators
from dsbn_jax.datasets import catalog
from tests import cli_driver
from tests import data_fixtures as fx
from tests.evaluation_test import eval_setup  # noqa: F401  (a fixture)
from tests.train_step_test import SIZE

FRACTION = 0.25


def _names(n):
  return np.array([f"class{i % 5}/img{i:05d}.png".encode() for i in range(n)])


def test_source_val_mask_is_a_pure_function_of_each_name():
  names = _names(4000)
  mask = input_pipeline.source_val_mask(names, FRACTION)
  assert abs(mask.mean() - FRACTION) < 0.03  # about the fraction (binomial sd 0.007)
  for k in range(5):  # of every class
    assert abs(mask[k::5].mean() - FRACTION) < 0.05
  perm = np.random.default_rng(0).permutation(len(names))
  np.testing.assert_array_equal(input_pipeline.source_val_mask(names[perm], FRACTION), mask[perm])
  np.testing.assert_array_equal(input_pipeline.source_val_mask(names[:7], FRACTION), mask[:7])
  assert not input_pipeline.source_val_mask(names, 0.0).any()
  bigger = input_pipeline.source_val_mask(names, 0.5)
  assert bigger[mask].all()  # a larger fraction only adds images
  # The rule, written out: the name's blake2b-64 hash below fraction * 2^64.
  want = [
    int.from_bytes(hashlib.blake2b(n, digest_size=8).digest(), "little") < FRACTION * 2**64
    for n in names[:50]
  ]
  np.testing.assert_array_equal(mask[:50], want)


def test_held_out_source_images_never_reach_the_train_stream(digits_data_dir, monkeypatch):
  data = fx.get_data_config("digits")
  data.data_dir = digits_data_dir
  data.source_val_fraction = FRACTION
  source = catalog.resolve_domain(data, data.source)
  _, _, kept = data_source.load_encoded(
    source.builder, source.train_split, source.num_train, FRACTION
  )
  _, _, held = data_source.load_encoded(
    source.builder, source.train_split, source.num_train, FRACTION, val=True
  )
  kept, held = set(np.asarray(kept).tolist()), set(np.asarray(held).tolist())  # stored rows
  assert not kept & held and len(kept | held) == source.num_train
  assert 0.15 * source.num_train < len(held) < 0.35 * source.num_train

  val = input_pipeline.make_source_val_data(data, process_index=0, process_count=1)
  val_labels = [y for batch in val for y in batch["label"][batch["mask"]]]
  assert val.num_examples == len(held) == len(val_labels)
  assert set(val_labels) == set(range(10))  # every class has held-out images

  # The train stream caches and permutes exactly the kept rows (with cache_resized, the default).
  seen = {}
  train_rows, train_stream = input_pipeline._train_rows, input_pipeline._train_stream

  def spy_rows(cache, *args):
    rows = train_rows(cache, *args)
    seen.setdefault("rows", []).append(set(cache.stored[rows].tolist()))  # as stored rows
    return rows

  def spy_stream(*args):
    stream = train_stream(*args)
    seen.setdefault("n", []).append(stream.num_examples)
    return stream

  monkeypatch.setattr(input_pipeline, "_train_rows", spy_rows)
  monkeypatch.setattr(input_pipeline, "_train_stream", spy_stream)
  stream = input_pipeline.make_train_iterator(
    data, global_batch_size=32, seed=0, process_index=0, process_count=1
  )
  next(stream)
  target = catalog.resolve_domain(data, data.target)
  assert seen["rows"][0] == kept and seen["n"][0] == len(kept)  # source: the held-out rows left out
  assert len(seen["rows"][1]) == seen["n"][1] == target.num_train  # target: every image


def test_eval_step_returns_crop_mean_features_through_the_chosen_branch(eval_setup):  # noqa: F811
  cfg, state = eval_setup
  rng = np.random.default_rng(7)
  batch = {
    "image": rng.normal(size=(3, 2, SIZE, SIZE, 3)).astype(np.float32),
    "label": np.zeros(3, np.int32),
    "mask": np.ones(3, bool),
  }
  variables = {"params": state.params, "batch_stats": state.batch_stats}
  for domain, want_branch in ((None, 1), (0, 0), (1, 1)):
    out = jax.jit(functools.partial(evaluation.eval_step, cfg=cfg, domain=domain))(state, batch)
    feats = [
      state.apply_fn(variables, batch["image"][:, j], domain=want_branch, train=False)[0]
      for j in range(2)
    ]
    np.testing.assert_allclose(out["features"], np.mean(feats, axis=0), atol=1e-5)
  src = evaluation.eval_step(state, batch, cfg=cfg, domain=0)
  tgt = evaluation.eval_step(state, batch, cfg=cfg)
  assert np.abs(np.asarray(src["probs"]) - np.asarray(tgt["probs"])).max() > 1e-3


@pytest.fixture(scope="module")
def selection_run(tmp_path_factory, digits_data_dir):
  return _run_with_source_split(tmp_path_factory.mktemp("selection") / "run", digits_data_dir)


def _run_with_source_split(workdir, data_dir):
  """``(workdir, results)`` of configs/smoke.py with a held-out source split, evaluated at steps
  2, 4 and 6 (in this process, tests/cli_driver.py)."""
  result = cli_driver.run_main(
    workdir,
    data_dir,
    f"--config.data.source_val_fraction={FRACTION}",
    "--config.eval_every_steps=2",
  )
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir, json.loads((workdir / "results.json").read_text())


def test_every_evaluation_scores_every_validator_and_results_name_each_choice(selection_run):
  workdir, results = selection_run
  evals = results["evals"]
  assert [e["step"] for e in evals] == [2, 4, 6]
  for e in evals:
    assert sorted(e["validators"]) == sorted(validators.NAMES)
    assert all(np.isfinite(v) for v in e["validators"].values())
  assert sorted(results["selection"]) == sorted(validators.NAMES)
  for name, chosen in results["selection"].items():
    scores = [e["validators"][name] for e in evals]
    pick = evals[int(np.argmax(scores))]
    assert chosen["step"] == pick["step"] and chosen["accuracy"] == pick["accuracy"]
    assert chosen["scores"] == {str(e["step"]): e["validators"][name] for e in evals}
    assert chosen["rank_correlation"] == validators.rank_correlation(
      scores, [e["accuracy"] for e in evals]
    )
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  logged = [r for r in rows if "validators/info_max" in r]
  assert [r["step"] for r in logged] == [2, 4, 6]
  assert logged[-1]["validators/dev"] == evals[-1]["validators"]["dev"]


def test_validators_never_read_the_target_labels(
  selection_run, digits_data_dir, monkeypatch, tmp_path
):
  """The same run with every target label changed: other accuracies, the same validator scores."""
  from dsbn_jax import train

  _, results = selection_run
  make_eval_data = input_pipeline.make_eval_data

  def wrong_labels(*args, **kwargs):
    real = make_eval_data(*args, **kwargs)
    shifted = real.dataset.map(lambda b: {**b, "label": (b["label"] + 1) % 10})
    return input_pipeline.EvalData(shifted, real.num_examples, real.num_batches)

  monkeypatch.setattr(train.eval_data, "make_eval_data", wrong_labels)
  _, other = _run_with_source_split(tmp_path / "wrong_labels", digits_data_dir)
  assert [e["accuracy"] for e in other["evals"]] != [e["accuracy"] for e in results["evals"]]
  assert [e["validators"] for e in other["evals"]] == [e["validators"] for e in results["evals"]]


def test_smoke_run_without_a_source_split_scores_the_target_validators(smoke_run):
  workdir, _ = smoke_run
  results = json.loads((workdir / "results.json").read_text())
  assert sorted(results["selection"]) == sorted(validators.TARGET_ONLY)
  for e in results["evals"]:
    assert sorted(e["validators"]) == sorted(validators.TARGET_ONLY)


def _fake(root, method, task, seed, evals):
  """A finished run's results.json whose evaluations carry validator scores."""
  from dsbn_jax import train

  workdir = sweep.run_dir(str(root), method, task, seed)
  os.makedirs(workdir)
  accs = [e["accuracy"] for e in evals]
  results = {
    "seed": seed,
    "best_accuracy": max(accs),
    "last_accuracy": accs[-1],
    "evals": evals,
    "selection": train.selection(evals),
  }
  with open(os.path.join(workdir, "results.json"), "w", encoding="utf-8") as f:
    json.dump(results, f)


def _evals(accs, scores):
  return [
    {"step": 10 * (i + 1), "accuracy": a, "validators": {"entropy": s, "bnm": -s}}
    for i, (a, s) in enumerate(zip(accs, scores))
  ]


def test_sweep_tables_per_validator(tmp_path):
  # seed 0: entropy picks step 20 (acc 70; best 80, last 60); bnm picks step 10 (acc 50)
  _fake(tmp_path, "m", "a->b", 0, _evals([50, 70, 80, 60], [1, 4, 3, 2]))
  # seed 1: entropy picks step 30 (acc 90 = best; last 85); bnm picks step 10 (acc 40)
  _fake(tmp_path, "m", "a->b", 1, _evals([40, 60, 90, 85], [1, 2, 5, 3]))
  out = sweep.write_summary(str(tmp_path), ["a->b"], ["m"], [0, 1])
  md = out["markdown"]
  entropy = md.split("#### `entropy`")[1].split("####")[0]
  # accuracy 70, 90 -> 80.0 ± 14.1; gap to best -10, 0 -> -5.0 ± 7.1; to last +10, +5 -> 7.5 ± 3.5
  # rho: seed 0 ranks (0,3,2,1) vs (0,2,3,1) -> 0.8; seed 1 (0,1,3,2) vs (0,1,3,2) -> 1.0
  assert "| m | 80.0 ± 14.1 | 80.0 ± 14.1 | -5.0 ± 7.1 | 7.5 ± 3.5 | +0.90 |" in entropy, entropy
  bnm = md.split("#### `bnm`")[1].split("####")[0]
  assert "| m | 45.0 ± 7.1 | 45.0 ± 7.1 | -40.0 ± 14.1 | -27.5 ± 24.7 | -0.90 |" in bnm, bnm
  overall = md.split("Every validator over every run above")[1]
  assert "| `entropy` | 2 | -5.0 ± 7.1 | 7.5 ± 3.5 | +0.90 | 2 of 2 runs |" in overall
  assert (tmp_path / "selection.png").read_bytes()[:4] == b"\x89PNG"
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert summary["m"]["a->b"][0]["selection"]["entropy"] == {
    "step": 20,
    "accuracy": 70,
    "rank_correlation": pytest.approx(0.8),
  }


def test_sweep_of_runs_without_validators_has_no_selection_table(tmp_path):
  _fake(tmp_path, "m", "a->b", 0, [{"step": 1, "accuracy": 50.0}])
  assert "Label-free" not in sweep.write_summary(str(tmp_path), ["a->b"], ["m"], [0])["markdown"]
  assert not (tmp_path / "selection.png").exists()


def test_a_run_stopped_at_a_selected_step_is_that_evaluations_model(smoke_run, tmp_path):
  """docs/model_selection.md: retraining with total_steps = the validator's step gives the model it
  picked (the stream, schedule and ramps do not depend on total_steps): here the 6-step smoke
  run's step-3 checkpoint, array for array, with the same evaluation."""
  from dsbn_jax import checkpointing

  workdir, _ = smoke_run
  short = tmp_path / "short"
  result = cli_driver.run_main(short, _data_dir_of(workdir), "--config.total_steps=3")
  assert result.returncode == 0, result.stderr[-3000:]
  step, want = checkpointing.read_state_arrays(str(workdir), 3)
  got_step, got = checkpointing.read_state_arrays(str(short), None)
  assert got_step == step == 3
  want_leaves = dict(jax.tree_util.tree_leaves_with_path(want))
  for path, x in jax.tree_util.tree_leaves_with_path(got):
    np.testing.assert_array_equal(x, want_leaves[path], err_msg=str(path))
  evals = json.loads((workdir / "results.json").read_text())["evals"]
  short_evals = json.loads((short / "results.json").read_text())["evals"]
  assert short_evals == [e for e in evals if e["step"] == 3]


def _data_dir_of(workdir) -> str:
  return json.loads((workdir / "config.json").read_text())["data"]["data_dir"]
