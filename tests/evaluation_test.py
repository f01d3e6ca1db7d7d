"""evaluation.py: the eval step (crop averaging, target branch, masks), the forward pass over
batches that training, predict and the diagnostics share, and the accuracies of an evaluation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsbn_jax import evaluation, sharding
from tests.train_step_test import NUM_CLASSES, SIZE, SMALL, make_config, small_state


@pytest.fixture(scope="module")
def eval_setup():
  """An alda_dsbn state whose two BN branches differ (scale, bias and running statistics)."""
  cfg = make_config("alda_dsbn", **SMALL)
  state = small_state(cfg)
  rng = np.random.default_rng(4)

  def perturb(path, x):
    name = path[-1].key
    lo, hi = {"scale": (0.5, 1.5), "var": (0.5, 2.0)}.get(name, (-0.5, 0.5))
    if name in ("scale", "bias", "mean", "var") and path[0].key == "backbone":
      return jnp.asarray(rng.uniform(lo, hi, x.shape).astype(np.float32))
    return x

  state = state.replace(
    params=jax.tree_util.tree_map_with_path(perturb, state.params),
    batch_stats=jax.tree_util.tree_map_with_path(perturb, state.batch_stats),
  )
  return cfg, state


def test_eval_averages_crop_softmax_with_the_target_branch_and_counts_masked(eval_setup):
  cfg, state = eval_setup
  rng = np.random.default_rng(5)
  b, c = 4, 3
  batch = {
    "image": rng.normal(size=(b, c, SIZE, SIZE, 3)).astype(np.float32),
    "label": rng.integers(0, NUM_CLASSES, b).astype(np.int32),
    "mask": np.array([True, True, True, False]),
  }
  out = jax.jit(functools.partial(evaluation.eval_step, cfg=cfg))(state, batch)

  variables = {"params": state.params, "batch_stats": state.batch_stats}

  def probs(domain):  # one crop at a time, as image_classification_test does
    per_crop = [
      jax.nn.softmax(state.apply_fn(variables, batch["image"][:, j], domain=domain, train=False)[1])
      for j in range(c)
    ]
    return np.mean(np.stack(per_crop), axis=0)

  want = probs(1)
  np.testing.assert_allclose(out["probs"], want, atol=1e-6)
  assert np.abs(probs(0) - want).max() > 1e-3  # the branches differ: branch 1 was really used
  pred = want.argmax(-1)
  np.testing.assert_array_equal(out["pred"], pred)
  assert int(out["num_valid"]) == 3
  assert int(out["num_correct"]) == int(((pred == batch["label"]) & batch["mask"]).sum())


def test_eval_without_crop_axis_equals_one_crop(eval_setup):
  cfg, state = eval_setup
  rng = np.random.default_rng(6)
  images = rng.normal(size=(2, 1, SIZE, SIZE, 3)).astype(np.float32)
  labels, mask = np.zeros(2, np.int32), np.ones(2, bool)
  step = functools.partial(evaluation.eval_step, cfg=cfg)
  with_axis = step(state, {"image": images, "label": labels, "mask": mask})
  without = step(state, {"image": images[:, 0], "label": labels, "mask": mask})
  np.testing.assert_allclose(with_axis["probs"], without["probs"], atol=1e-7)


class _EvalData:
  """What ``input_pipeline.make_eval_data`` gives: batches, their count and the images in them."""

  def __init__(self, batches, num_examples):
    self.batches, self.num_examples = batches, num_examples

  def __len__(self):
    return len(self.batches)

  def __iter__(self):
    return iter(self.batches)


def test_evaluate_through_the_jitted_step_on_a_mesh_counts_each_image_once(eval_setup):
  cfg, state = eval_setup
  mesh = sharding.make_mesh(jax.devices()[:2])
  rng = np.random.default_rng(7)
  batches = [
    {
      "image": rng.normal(size=(4, SIZE, SIZE, 3)).astype(np.float32),
      "label": rng.integers(0, NUM_CLASSES, 4).astype(np.int32),
      "mask": np.array([True, True, True, m]),
    }
    for m in (True, False)
  ]
  eval_fn = evaluation.jit_eval_step(mesh, cfg)
  held = evaluation.eval_state(
    state.apply_fn, jax.device_get(state.params), jax.device_get(state.batch_stats), mesh
  )
  outs = list(evaluation.predict_batches(eval_fn, held, batches, mesh))
  direct = [evaluation.eval_step(state, b, cfg=cfg) for b in batches]
  for out, want in zip(outs, direct):
    assert isinstance(out["probs"], np.ndarray)  # host arrays
    np.testing.assert_allclose(out["probs"], want["probs"], atol=1e-6)
  result = evaluation.evaluate(eval_fn, held, _EvalData(batches, 7), mesh, NUM_CLASSES)
  assert result["num_images"] == 7
  correct = sum(int(w["num_correct"]) for w in direct)
  assert result["accuracy"] == pytest.approx(100.0 * correct / 7)
  with pytest.raises(RuntimeError, match="evaluated 7 images, expected 8"):
    evaluation.evaluate(eval_fn, held, _EvalData(batches, 8), mesh, NUM_CLASSES)


def test_summarize_leaves_classes_without_images_out_of_the_mean():
  confusion = [[3, 1, 0], [0, 0, 0], [1, 0, 1]]  # [true, predicted]; class 1 has no images
  result = evaluation.summarize(confusion)
  assert result["num_images"] == 6 and result["accuracy"] == pytest.approx(400 / 6)
  assert result["per_class_accuracy"] == [75.0, None, 50.0]
  assert result["mean_class_accuracy"] == pytest.approx(62.5)
  assert result["confusion"] == confusion
  assert evaluation.summarize(np.zeros((2, 2), int))["mean_class_accuracy"] is None


def test_predict_batches_dispatches_the_next_batch_before_reading_one():
  """The devices compute batch k + 1 while the host reads batch k (issue 22): by the time the first
  outputs are yielded, the second batch has been dispatched; outputs still come in order."""
  mesh = sharding.make_mesh(jax.devices()[:1])
  calls = []

  def eval_fn(state, batch):
    calls.append(int(np.asarray(batch["x"])[0]))
    return {"x": batch["x"] * 10}

  gen = evaluation.predict_batches(eval_fn, None, ({"x": np.array([i])} for i in range(3)), mesh)
  first = next(gen)
  assert calls == [0, 1] and int(first["x"][0]) == 0
  assert [int(o["x"][0]) for o in gen] == [10, 20] and calls == [0, 1, 2]
