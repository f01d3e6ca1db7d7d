"""Data parallelism on 8 emulated CPU devices: same numbers as 1 device, one compilation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsbn_jax import evaluation, sharding, train_step
from dsbn_jax.errors import UserError
from dsbn_jax.models import heads
from tests.train_step_test import NUM_CLASSES, SIZE, SMALL, make_batch, make_config

STEPS = 3


def _counting(fn, counter):
  """``fn`` that counts its Python executions, i.e. its traces under jit."""

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    counter.append(1)
    return fn(*args, **kwargs)

  return wrapped


def _train(mesh, cfg, state, batches):
  """STEPS jitted train steps and one eval step on ``mesh``; counts the train-step traces."""
  traces = []
  step = sharding.jit_train_step(mesh, cfg, _counting(train_step.train_step, traces))
  metrics, rng = [], sharding.replicate(jax.random.key(1), mesh)
  for batch in batches:
    old = state
    state, m = step(state, sharding.to_global(batch, mesh), rng)
    metrics.append(jax.device_get(m))
  evaluate = evaluation.jit_eval_step(mesh, cfg)
  rng = np.random.default_rng(9)
  eval_batch = {
    "image": rng.normal(size=(8, 2, SIZE, SIZE, 3)).astype(np.float32),
    "label": rng.integers(0, NUM_CLASSES, 8).astype(np.int32),
    "mask": np.arange(8) < 7,
  }
  out = jax.device_get(evaluate(state, sharding.to_global(eval_batch, mesh)))
  return state, metrics, out, len(traces), old


@pytest.fixture(scope="module", params=[False, True], ids=["two_calls", "fused_pass"])
def runs(request):
  cfg = make_config("alda_dsbn", **SMALL)
  cfg.model.fused_pass = request.param  # interleaved [src_i, tgt_i] rows stay sharded by row
  cfg.loss.threshold = 0.3  # some target rows confident: every ALDA term is live
  # Reduction order differs between 1 and 8 devices (~1 ulp); keep the dynamics tame so that
  # 3 steps do not amplify it (the parity config's lr 0.01 / GRL ~1 does, chaotically).
  cfg.optim.lr0, cfg.loss.ramp_max_steps = 0.001, 200
  cfg.model.dropout_rate = 0.5  # D's dropout masks must not depend on the device count either
  rng = np.random.default_rng(0)
  batches = [make_batch(rng, 8, SIZE) for _ in range(STEPS)]
  mesh8, mesh1 = sharding.make_mesh(), sharding.make_mesh(jax.devices()[:1])
  state8 = sharding.create_sharded_state(
    mesh8, jax.random.key(0), cfg, heads.create_model(cfg), (SIZE, SIZE, 3)
  )
  # The same initial state on one device, through the host (fresh buffers: both get donated).
  state1 = jax.tree.map(lambda x: jax.device_put(np.asarray(x), sharding.replicated(mesh1)), state8)
  return _train(mesh1, cfg, state1, batches), _train(mesh8, cfg, state8, batches)


def test_mesh_spans_all_devices_on_one_data_axis():
  mesh = sharding.make_mesh()
  assert mesh.axis_names == ("data",) and mesh.devices.size == len(jax.devices()) == 8


def test_to_global_shards_rows_over_devices_and_rejects_uneven_batches():
  mesh = sharding.make_mesh()
  x = np.arange(16 * 3, dtype=np.float32).reshape(16, 3)
  g = sharding.to_global({"x": x}, mesh)["x"]
  assert g.sharding.spec == sharding.data_sharding(mesh).spec
  assert {s.data.shape for s in g.addressable_shards} == {(2, 3)}
  np.testing.assert_array_equal(np.asarray(g), x)
  with pytest.raises(UserError, match="multiple of the device count"):
    sharding.to_global({"x": x[:12]}, mesh)


def test_eight_devices_equal_one_device(runs):
  (s1, m1, e1, _, _), (s8, m8, e8, _, _) = runs
  for a, b in zip(m1, m8):
    assert a.keys() == b.keys()
    for k in a:
      assert abs(float(a[k]) - float(b[k])) <= 1e-5, (k, a[k], b[k])
  assert 0 < float(m1[0]["train/confident_frac"]) < 1
  for tree1, tree8 in ((s1.params, s8.params), (s1.batch_stats, s8.batch_stats)):
    for x1, x8 in zip(jax.tree.leaves(tree1), jax.tree.leaves(tree8)):
      np.testing.assert_allclose(np.asarray(x8), np.asarray(x1), atol=1e-5, rtol=0)
  np.testing.assert_allclose(e8["probs"], e1["probs"], atol=1e-5)
  for k in ("pred", "num_correct", "num_valid"):
    np.testing.assert_array_equal(e8[k], e1[k])


def test_step_compiles_once_keeps_state_replicated_and_donates_it(runs):
  _, (s8, _, _, n_traces, donated) = runs
  assert n_traces == 1  # STEPS calls, one trace: no retrace across steps
  assert int(s8.step) == STEPS
  for leaf in jax.tree.leaves((s8.params, s8.batch_stats, s8.opt_state)):
    assert leaf.sharding.is_fully_replicated and len(leaf.sharding.device_set) == 8
  assert all(x.is_deleted() for x in jax.tree.leaves(donated.params))


def test_pretrained_variables_replace_the_backbone():
  cfg = make_config("alda_dsbn", **SMALL)
  model = heads.create_model(cfg)
  mesh = sharding.make_mesh()
  shapes = jax.eval_shape(
    lambda: model.init(jax.random.key(0), np.zeros((1, SIZE, SIZE, 3)), method="init_all")
  )
  pretrained = {
    col: jax.tree.map(lambda s: np.full(s.shape, 0.5, s.dtype), shapes[col]["backbone"])
    for col in ("params", "batch_stats")
  }
  state = sharding.create_sharded_state(
    mesh, jax.random.key(0), cfg, model, (SIZE, SIZE, 3), pretrained=pretrained
  )
  for leaf in jax.tree.leaves((state.params["backbone"], state.batch_stats["backbone"])):
    np.testing.assert_array_equal(np.asarray(leaf), 0.5)
  assert float(np.abs(np.asarray(state.params["classifier"]["kernel"])).max()) > 0
  bad = {
    "params": {"conv1": pretrained["params"]["conv1"]},
    "batch_stats": pretrained["batch_stats"],
  }
  with pytest.raises(UserError, match="pretrained"):
    sharding.create_sharded_state(mesh, jax.random.key(0), cfg, model, (SIZE, SIZE, 3), bad)


def test_single_process_does_not_initialize_distributed(monkeypatch):
  monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
  assert sharding.maybe_initialize_distributed() is False
  assert jax.process_count() == 1


def test_start_up_line_and_the_cpu_warning_for_resnet50():
  from configs import smoke
  from dsbn_jax import train

  config = smoke.get_config()
  mesh = sharding.make_mesh()
  line = sharding.describe(mesh, config, "runs/x")
  assert line == (
    "dsbn_jax: platform cpu, 8 x cpu, 1 process, mesh data=8, compute float32, "
    "matmul precision default, batch 8 + 8 (source + target, global), workdir runs/x"
  )
  assert not sharding.slow_on_cpu(mesh, config)
  config.model.backbone = "resnet50"
  assert sharding.slow_on_cpu(mesh, config)

  class FakeRun:  # what the estimate reads of a run
    start_step, said = 100, []
    config = smoke.get_config()
    config.total_steps = 20000

    def say(self, msg):
      self.said.append(msg)

  estimate = train._CpuEstimate(FakeRun(), enabled=True)
  for done in range(101, 106):
    estimate.tick(done, jnp.zeros(()))
  assert len(FakeRun.said) == 1, FakeRun.said
  assert "s per step on the CPU, the remaining 19896 steps take about" in FakeRun.said[0]
  assert train._duration(3 * 86400) == "3.0 days" and train._duration(5 * 3600) == "5.0 hours"
