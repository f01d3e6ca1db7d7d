"""Any global batch on any device count: each domain's batch is padded to a multiple of the device
count with masked rows, and training computes what one device computes on the unpadded batch."""

import functools
import json
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from dsbn_jax import checkpointing, input_pipeline, losses, sharding, train_step
from dsbn_jax.models import dsbn, heads
from tests import cli_driver, data_fixtures
from tests.train_step_test import NUM_CLASSES, SMALL, make_config, small_state

SIZE = 16  # small_cnn: 16 -> conv5 12 -> pool 6 -> conv5 2 -> pool 1
STEPS = 3
METHODS = ("alda_dsbn", "alda", "dann", "source_only")
CASES = ((8, 36), (5, 36), (3, 8))  # (devices, global batch per domain): 40, 40 and 9 rows


def _config(method: str, fused: bool, batch_size: int):
  cfg = make_config(method, **SMALL)
  cfg.batch_size = batch_size  # the real rows: a batch with more rows carries padding
  cfg.model.fused_pass = fused
  cfg.model.dropout_rate = 0.5  # D's dropout must draw the same numbers for the real rows
  cfg.loss.threshold = 0.3  # some target rows confident: every ALDA term is live
  # Tame dynamics (as sharding_test): 3 steps must not amplify ~1 ulp of reduction order.
  cfg.optim.lr0, cfg.loss.ramp_max_steps = 0.001, 200
  return cfg


def _host_state(cfg, seed: int = 0) -> train_step.TrainState:
  """Random weights for ``SIZE`` images (no jitted init to compile), BN statistics moved off
  (0, 1) so that a wrong running-statistics update shows; host arrays: each run puts (and donates)
  its own copy."""
  return jax.device_get(small_state(cfg, seed, size=SIZE, spread=True))


def _batches(batch_size: int, seed: int = 0) -> list:
  """STEPS batches of ``batch_size`` real rows per domain, with an all-True mask."""
  rng = np.random.default_rng(seed)

  def domain():
    return {
      "image": rng.normal(size=(batch_size, SIZE, SIZE, 3)).astype(np.float32),
      "label": rng.integers(0, NUM_CLASSES, batch_size).astype(np.int32),
      "mask": np.ones(batch_size, bool),
    }

  return [{"source": domain(), "target": domain()} for _ in range(STEPS)]


def _pad(batch: dict, rows: int, seed: int) -> dict:
  """``batch`` padded to ``rows`` rows per domain, real rows first. The padding is garbage (large
  noise, random labels) rather than the pipeline's zeros: it must not matter at all."""
  rng = np.random.default_rng(seed)

  def pad(domain):
    n = rows - len(domain["label"])
    garbage = 5.0 + 10.0 * rng.normal(size=(n, *domain["image"].shape[1:]))
    return {
      "image": np.concatenate([domain["image"], garbage.astype(np.float32)]),
      "label": np.concatenate([domain["label"], rng.integers(0, NUM_CLASSES, n, dtype=np.int32)]),
      "mask": np.concatenate([domain["mask"], np.zeros(n, bool)]),
    }

  return {k: pad(v) for k, v in batch.items()}


def _train(cfg, state, batches, devices: int):
  """STEPS jitted steps on a mesh of the first ``devices`` devices -> (host variables, metrics)."""
  mesh = sharding.make_mesh(jax.devices()[:devices])
  step = sharding.jit_train_step(mesh, cfg)
  state = sharding.replicate(state, mesh)
  rng = sharding.replicate(jax.random.key(7), mesh)
  metrics = []
  for batch in batches:
    state, m = step(state, sharding.to_global(batch, mesh), rng)
    metrics.append(m)
  flat = traverse_util.flatten_dict({"params": state.params, "batch_stats": state.batch_stats})
  return jax.device_get(flat), jax.device_get(metrics)


def _max_abs_difference(run, reference) -> float:
  """Largest |difference| over every param, BN statistic and metric of every step."""
  (v, m), (v_ref, m_ref) = run, reference
  assert v.keys() == v_ref.keys()
  worst = max(float(np.abs(np.asarray(v[k]) - np.asarray(v_ref[k])).max()) for k in v)
  for step_m, step_ref in zip(m, m_ref):
    assert step_m.keys() == step_ref.keys()
    worst = max(worst, *(abs(float(step_m[k]) - float(step_ref[k])) for k in step_m))
  return worst


_REFERENCES = {}  # (method, batch size) -> 1 device, two calls, unpadded: shared by both settings


def _reference(method: str, batch_size: int):
  """One device, the reference's two calls, the unpadded batches: what the padded runs of both
  ``model.fused_pass`` settings must compute (computed once per method and batch size)."""
  key = (method, batch_size)
  if key not in _REFERENCES:
    cfg = _config(method, False, batch_size)
    _REFERENCES[key] = _train(cfg, _host_state(cfg), _batches(batch_size), 1)
  return _REFERENCES[key]


@pytest.mark.parametrize(
  "method, fused",
  [
    pytest.param(m, f, id=f"{m}-{'fused_pass' if f else 'two_calls'}")
    for m in METHODS
    for f in (False, True)
    if not (m == "source_only" and f)  # source_only never reads model.fused_pass: one program
  ],
)
def test_padded_batches_on_n_devices_equal_one_device(method, fused):
  """36 + 36 on 8 and on 5 devices (40 rows, 4 padded), 8 + 8 on 3 devices (9 rows, 1 padded):
  every param, BN statistic and metric after 3 steps within 1e-5 of one device with the unpadded
  batches and the reference's two calls (``fused``: one backbone pass on the padded devices). The padding rows hold garbage, so anything of theirs that leaked would show."""
  t0 = time.perf_counter()
  references, said = {}, []
  for devices, batch_size in CASES:
    cfg = _config(method, fused, batch_size)
    state = _host_state(cfg)
    batches = _batches(batch_size)
    if batch_size not in references:
      references[batch_size] = _reference(method, batch_size)
    rows = sharding.padded_batch_size(batch_size, devices)
    assert rows > batch_size  # really padded
    padded = [_pad(b, rows, seed=i) for i, b in enumerate(batches)]
    run = _train(cfg, state, padded, devices)
    worst = _max_abs_difference(run, references[batch_size])
    said.append(f"{devices} devices {batch_size} -> {rows} rows: max |diff| {worst:.2e}")
    assert worst <= 1e-5, said[-1]
  reference_metrics = references[36][1]
  if method != "source_only":
    assert 0 < float(reference_metrics[0]["train/confident_frac"]) < 1
  print(f"{method} fused={fused}: " + "; ".join(said) + f" ({time.perf_counter() - t0:.1f} s)")


def test_padding_changes_the_result_when_it_is_not_masked():
  """The check above is not vacuous: the same padded batches read as all real (batch_size = the
  row count, so the step takes the unmasked path) end far from the unpadded run."""
  devices, batch_size = 8, 36
  cfg = _config("alda_dsbn", False, batch_size)
  state, batches = _host_state(cfg), _batches(batch_size)
  rows = sharding.padded_batch_size(batch_size, devices)
  padded = [_pad(b, rows, seed=i) for i, b in enumerate(batches)]
  reference = _train(cfg, state, batches, 1)
  unmasked = _train(_config("alda_dsbn", False, rows), state, padded, devices)
  assert _max_abs_difference(unmasked, reference) > 1e-2


def test_discriminator_dropout_draws_the_unpadded_numbers_for_real_rows():
  """D's dropout is drawn per position: the real rows of [source; target] padded to R rows each
  draw what they draw unpadded (threefry, partitionable: a position's bits do not depend on the
  leading dimension)."""
  assert jax.config.jax_threefry_partitionable
  b, r, f = 5, 8, 6
  disc = heads.Discriminator(num_outputs=3, hidden_dim=16, dropout_rate=0.5)
  rng = np.random.default_rng(0)
  feat_s, feat_t = rng.normal(size=(2, b, f)).astype(np.float32)
  garbage = rng.normal(size=(2, r - b, f)).astype(np.float32)
  variables = disc.init(jax.random.key(0), jnp.zeros((1, f)), train=False)
  keys = {"dropout": jax.random.key(3)}
  plain = disc.apply(variables, np.concatenate([feat_s, feat_t]), train=True, rngs=keys)
  padded_feat = np.concatenate([feat_s, garbage[0], feat_t, garbage[1]])
  mask = np.concatenate([np.ones(b, bool), np.zeros(r - b, bool)] * 2)
  padded = disc.apply(variables, padded_feat, train=True, rngs=keys, mask=mask)
  np.testing.assert_allclose(padded[mask], plain, rtol=0, atol=1e-6)
  eval_mode = disc.apply(variables, np.concatenate([feat_s, feat_t]), train=False)
  assert np.abs(np.asarray(plain) - np.asarray(eval_mode)).max() > 1e-2  # dropout was on


@pytest.mark.parametrize("domain", [1, (0, 1)], ids=["one_domain", "fused"])
def test_masked_batch_norm_uses_only_the_real_rows(domain):
  """Normalisation and running statistics (unbiased with the real count) of the real rows only:
  a padded batch gives the unpadded batch's outputs and statistics."""
  rng = np.random.default_rng(1)
  g = len(domain) if isinstance(domain, tuple) else 1
  real, rows = 6 * g, 8 * g  # rows interleaved by group: the padding is the last 2 of each group
  x = rng.normal(1.5, 2.0, (real, 3, 3, 4)).astype(np.float32)
  garbage = rng.normal(50.0, 30.0, (rows - real, 3, 3, 4)).astype(np.float32)
  layer = dsbn.DomainSpecificBatchNorm(num_domains=2)
  variables = layer.init(jax.random.key(0), x[:1], domain=0, train=False)
  apply = functools.partial(layer.apply, variables, domain=domain, train=True, mutable=True)
  y, stats = apply(x)
  y_pad, stats_pad = apply(np.concatenate([x, garbage]), mask=np.arange(rows) < real)
  np.testing.assert_allclose(y_pad[:real], y, rtol=0, atol=1e-5)
  for k in ("mean", "var"):
    np.testing.assert_allclose(
      stats_pad["batch_stats"][k], stats["batch_stats"][k], rtol=1e-6, atol=1e-6
    )
  if g == 1:  # the running variance's Bessel factor counts the real values: n = 6 x 3 x 3
    want = 0.9 * 1.0 + 0.1 * np.var(x.reshape(-1, 4), axis=0, ddof=1)
    np.testing.assert_allclose(stats_pad["batch_stats"]["var"][1], want, rtol=1e-5)


def test_masked_losses_equal_the_unpadded_ones_and_padding_gets_no_gradient():
  rng = np.random.default_rng(2)
  b, r, k = 5, 7, 4
  mask_b = np.arange(r) < b
  mask_n = np.concatenate([mask_b, mask_b])

  def pad(x):  # [source; target] rows of 2b -> 2r, garbage after each half's real rows
    s, t = x[:b], x[b:]
    g = 3.0 * rng.normal(size=(r - b, *x.shape[1:])).astype(x.dtype)
    return np.concatenate([s, g, t, g])

  logits = rng.normal(size=(2 * b, k)).astype(np.float32)
  probs = np.asarray(jax.nn.softmax(rng.normal(size=(2 * b, k)) * 3, axis=-1), np.float32)
  labels = rng.integers(0, k, b).astype(np.int32)
  labels_pad = np.concatenate([labels, np.zeros(r - b, np.int32)])

  @jax.jit
  def alda(d, p, mask=None, lab=labels):
    return losses.alda_losses(d, lab, p, 0.5, mask)

  want = alda(logits, probs)
  got = alda(pad(logits), pad(probs), mask_n, labels_pad)
  np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-7)
  assert float(want[2]) != 0.0  # some target row is confident: L_T is live
  grads = jax.grad(lambda d: sum(alda(d, pad(probs), mask_n, labels_pad)))(pad(logits))
  assert np.all(np.asarray(grads)[~mask_n] == 0) and np.abs(np.asarray(grads)[mask_n]).max() > 0
  np.testing.assert_allclose(
    losses.dann_loss(pad(logits[:, :1]), mask_n), losses.dann_loss(logits[:, :1]), rtol=1e-6
  )
  np.testing.assert_allclose(
    losses.cross_entropy(pad(logits)[:r], labels_pad, mask_b),
    losses.cross_entropy(logits[:b], labels),
    rtol=1e-6,
  )


def test_start_up_line_says_the_padding_and_nothing_is_refused():
  from configs import smoke  # pylint: disable=g-import-not-at-top

  config = smoke.get_config()
  config.batch_size, config.data.eval_batch_size = 36, 36
  mesh = sharding.make_mesh()
  sharding.check_batch_sizes(config, mesh)  # 36 on 8 devices: no longer refused
  line = sharding.describe(mesh, config, "runs/x")
  assert (
    "batch 36 + 36 (source + target, global; padded to 40 per domain over 8 devices, 4 masked "
    "rows), eval batch 40 (data.eval_batch_size 36 rounded up to 8 devices), workdir runs/x"
  ) in line, line
  config.batch_size, config.data.eval_batch_size = 32, 64
  assert "batch 32 + 32 (source + target, global), workdir runs/x" in sharding.describe(
    mesh, config, "runs/x"
  )


def test_the_pipeline_pads_this_process_part_real_rows_first(digits_data_dir):
  """9 + 9 over 8 devices: 16 rows per domain, the 9 real ones first and as the unpadded stream's
  rows (their augmentation seeded by the same positions); 2 processes x 4 devices hold rows
  [0, 8) and [8, 16) of the same global batch; a process may hold padding only."""
  data = data_fixtures.get_data_config("digits")
  data.data_dir = digits_data_dir

  def first_batch(batch_size=9, **layout):
    it = input_pipeline.make_train_iterator(data, global_batch_size=batch_size, seed=0, **layout)
    return next(it)

  unpadded = first_batch(process_index=0, process_count=1)  # one device: every row real
  padded = first_batch(process_index=0, process_count=1, device_count=8)
  parts = [first_batch(process_index=p, process_count=2, device_count=8) for p in (0, 1)]
  for d in ("source", "target"):
    assert unpadded[d]["mask"].tolist() == [True] * 9
    assert padded[d]["mask"].tolist() == [True] * 9 + [False] * 7
    np.testing.assert_array_equal(padded[d]["image"][:9], unpadded[d]["image"])
    np.testing.assert_array_equal(padded[d]["label"][:9], unpadded[d]["label"])
    assert not padded[d]["image"][9:].any() and not padded[d]["label"][9:].any()
    assert [len(p[d]["mask"]) for p in parts] == [8, 8]
    for k in ("image", "label", "mask"):
      np.testing.assert_array_equal(np.concatenate([p[d][k] for p in parts]), padded[d][k])
  # 3 rows over 4 processes x 2 devices: processes 2 and 3 hold padding only (2 rows each)
  empty = first_batch(3, process_index=3, process_count=4, device_count=8)
  for d in ("source", "target"):
    assert empty[d]["image"].shape == (2, 32, 32, 3) and not empty[d]["mask"].any()


def test_eval_batches_round_up_to_the_device_count_and_count_every_image_once(digits_data_dir):
  """An eval batch of 5 over 2 processes x 2 devices: 4 rows per process (8 a step), each image
  once over both processes."""
  data = data_fixtures.get_data_config("digits")
  data.data_dir = digits_data_dir
  labels, rows = [], set()
  for p in (0, 1):
    evaluation = input_pipeline.make_eval_data(
      data, global_batch_size=5, process_index=p, process_count=2, device_count=4
    )
    for batch in evaluation:
      rows.add(len(batch["mask"]))
      labels.extend(batch["label"][batch["mask"]].tolist())
  assert rows == {4} and len(labels) == evaluation.num_examples


def test_the_command_at_batch_9_on_8_devices_equals_1_device(tmp_path, digits_data_dir):
  """``python -m dsbn_jax.main --config=configs/smoke.py --config.batch_size=9``, once refused on
  8 devices: it runs, says its padding, and ends where the same run on 1 device ends (3 steps:
  every param, BN statistic and logged train metric within 1e-5, the same evaluation)."""
  runs = {}
  for devices in (1, 8):
    workdir = tmp_path / f"devices_{devices}"
    result = cli_driver.run_main(
      workdir,
      digits_data_dir,
      "--config.batch_size=9",
      "--config.total_steps=3",
      devices=devices,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    runs[devices] = workdir, result
  assert "batch 9 + 9 (source + target, global), workdir" in runs[1][1].stdout
  assert "global; padded to 16 per domain over 8 devices, 7 masked rows)" in runs[8][1].stdout
  (w1, _), (w8, _) = runs[1], runs[8]
  (step1, s1), (step8, s8) = (checkpointing.read_state_arrays(str(w), None) for w in (w1, w8))
  assert step1 == step8 == 3
  worst = 0.0
  for col in ("params", "batch_stats"):
    for (path, x1), (_, x8) in zip(
      jax.tree_util.tree_leaves_with_path(s1[col]), jax.tree_util.tree_leaves_with_path(s8[col])
    ):
      np.testing.assert_allclose(x8, x1, rtol=0, atol=1e-5, err_msg=f"{col}{path}")
      worst = max(worst, float(np.abs(np.asarray(x8) - np.asarray(x1)).max()))
  rows = [
    [json.loads(line) for line in (w / "metrics.jsonl").read_text().splitlines()] for w in (w1, w8)
  ]
  for r1, r8 in zip(*rows):
    for k in r1:
      if k.startswith("train/") and k != "train/images_per_s":
        np.testing.assert_allclose(r8[k], r1[k], rtol=0, atol=1e-5, err_msg=k)
        worst = max(worst, abs(r8[k] - r1[k]))
  results = [json.loads((w / "results.json").read_text()) for w in (w1, w8)]
  assert results[0]["confusion_matrix"] == results[1]["confusion_matrix"]
  print(f"batch 9 on 8 devices vs 1: max |diff| {worst:.2e}")
