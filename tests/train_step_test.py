"""The training step against the PyTorch reference iteration, gradient routing, baselines."""

import copy
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util

from dsbn_jax import config_defaults, losses, methods, optim, train_step
from dsbn_jax.models import heads
from tests import torch_reference as ref
from tests import torch_utils

NUM_CLASSES = 5
TINY = dict(
  backbone="resnet", stage_sizes=(2, 1, 1), num_filters=8, bottleneck_dim=16, disc_hidden_dim=32
)


def make_config(method, **model):
  """Parity config: dropout off, lr and ramps fast enough that every term moves the weights."""
  cfg = config_defaults.get_config()
  cfg.method = method
  cfg.model.num_classes = NUM_CLASSES
  cfg.model.dropout_rate = 0.0
  cfg.model.update(model)
  cfg.optim.lr0 = 0.01
  # Off-default weights and a short ramp, so that a mis-weighted or mis-stepped term shows up.
  cfg.loss.adv_weight, cfg.loss.trade_off, cfg.loss.ramp_max_steps = 0.7, 1.3, 2
  return cfg


def make_batch(rng, b, size):
  def domain():
    return {
      "image": rng.normal(size=(b, size, size, 3)).astype(np.float32),
      "label": rng.integers(0, NUM_CLASSES, b).astype(np.int32),
    }

  return {"source": domain(), "target": domain()}


def to_torch(x_NHWC):
  return torch_utils.nhwc_to_nchw(x_NHWC)


def flax_variables(flat, model, image_shape):
  """Nested ``{'params', 'batch_stats'}`` from a flat torch export; must fill the model exactly."""
  shapes = jax.eval_shape(
    lambda: model.init(jax.random.key(0), jnp.zeros((1, *image_shape)), method="init_all")
  )
  want = {
    (col, *p): v.shape for col in shapes for p, v in traverse_util.flatten_dict(shapes[col]).items()
  }
  assert set(flat) == set(want), set(flat) ^ set(want)
  for k, v in flat.items():
    assert v.shape == want[k], (k, v.shape, want[k])
  out = {
    col: traverse_util.unflatten_dict(
      {k[1:]: jnp.asarray(v) for k, v in flat.items() if k[0] == col}
    )
    for col in shapes
  }
  return out


def torch_models(cfg, seed, feature_dim, bias_range=(-0.2, 0.2)):
  """Reference G+C and D for ``cfg``: DSBN or plain BN, perturbed BN, xavier heads; D on the
  features (ALDA, DANN) or on CDAN's multilinear map; no D (None) for a method without one."""
  torch.manual_seed(seed)
  m = cfg.model
  method = methods.resolve(cfg)
  num_domains = method.num_domains
  if m.backbone == "resnet50":
    backbone = ref.resnet50_features(num_domains)
  else:
    backbone = ref.SmallResNet(m.stage_sizes, m.num_filters, num_domains)
  ref.perturb_bn(backbone, seed, bias_range)
  base = ref.ResNetFc(backbone, feature_dim, m.bottleneck_dim, m.num_classes)
  adversary = method.adversary
  if adversary == "none":
    return base, None
  width = {"features": 1, "multilinear": m.num_classes}[method.spec.disc_input]
  ad_net = ref.AdversarialNetwork(
    width * m.bottleneck_dim,
    m.disc_hidden_dim,
    1 if adversary == "dann" else m.num_classes,
    dropout=m.dropout_rate,
    max_iter=cfg.loss.ramp_max_steps,
    sigmoid=adversary == "dann",
  )
  return base, ad_net


def median_target_confidence(base, batch, cfg) -> float:
  """A threshold that splits the first target batch into confident / not (computed, not typed)."""
  base = copy.deepcopy(base)  # train-mode forward would move the running stats of the real one
  ref.set_domain(base, methods.resolve(cfg).target_branch)
  with torch.no_grad():
    _, logits = base.train()(to_torch(batch["target"]["image"]))
  return float(np.median(torch.softmax(logits, 1).max(1).values.numpy()))


def run_both(cfg, *, image_size, batch_size, feature_dim, seed=0, steps=2, **torch_kw):
  """2 steps of the JAX step and of the torch reference from the same weights and batches."""
  rng = np.random.default_rng(seed)
  batches = [make_batch(rng, batch_size, image_size) for _ in range(steps)]
  base, ad_net = torch_models(cfg, seed, feature_dim, **torch_kw)
  cfg.loss.threshold = median_target_confidence(base, batches[0], cfg)
  model = heads.create_model(cfg)
  variables = flax_variables(ref.to_flax(base, ad_net), model, (image_size, image_size, 3))
  state = train_step.TrainState.create(
    apply_fn=model.apply,
    params=variables["params"],
    batch_stats=variables["batch_stats"],
    tx=optim.create_optimizer(cfg.optim),
  )
  trainer = ref.Trainer(
    base,
    ad_net,
    method=cfg.method,
    lr0=cfg.optim.lr0,
    threshold=cfg.loss.threshold,
    trade_off=cfg.loss.trade_off,
    adv_weight=cfg.loss.adv_weight,
    lr_gamma=cfg.optim.lr_gamma,
    lr_power=cfg.optim.lr_power,
    weight_decay=cfg.optim.weight_decay / 2,
    mcc_temperature=cfg.loss.mcc_temperature,
  )
  step = jax.jit(functools.partial(train_step.train_step, cfg=cfg))
  jax_metrics, torch_metrics = [], []
  for i, batch in enumerate(batches):
    state, metrics = step(state, batch, jax.random.key(seed))
    jax_metrics.append(jax.device_get(metrics))
    torch_metrics.append(
      trainer.step(
        i,
        to_torch(batch["source"]["image"]),
        torch.from_numpy(batch["source"]["label"]).long(),
        to_torch(batch["target"]["image"]),
      )
    )
  return state, jax_metrics, ref.to_flax(base, ad_net), torch_metrics, variables


def assert_losses_match(jax_metrics, torch_metrics, tol):
  """Every loss term and coefficient of every step within ``tol``; returns the worst |delta|."""
  worst = 0.0
  for i, (ours, theirs) in enumerate(zip(jax_metrics, torch_metrics)):
    for name, value in theirs.items():
      got = float(ours[f"train/{name}"])
      if name in ("correct", "loss") and np.isnan(value):
        # torch: mean over an empty confident set is NaN (its gradient is 0); ours is exactly 0.
        assert (got == 0.0) if name == "correct" else np.isfinite(got), (i, name, got)
        continue
      assert abs(got - value) <= tol, f"step {i} {name}: jax {got} torch {value}"
      worst = max(worst, abs(got - value))
  return worst


def assert_variables_match(state, torch_flat, initial, tol):
  """Every param and BN statistic within ``tol`` of torch, and far closer than it moved."""

  def flat(params, batch_stats):
    out = {("params", *k): v for k, v in traverse_util.flatten_dict(params).items()}
    out.update({("batch_stats", *k): v for k, v in traverse_util.flatten_dict(batch_stats).items()})
    return {k: np.asarray(v) for k, v in out.items()}

  ours = flat(state.params, state.batch_stats)
  init = flat(initial["params"], initial["batch_stats"])
  assert set(ours) == set(torch_flat)
  dev = {k: float(np.abs(ours[k] - v).max()) for k, v in torch_flat.items()}
  moved = {k: float(np.abs(v - init[k]).max()) for k, v in torch_flat.items()}
  worst = max(dev, key=dev.get)
  assert dev[worst] <= tol, f"max |jax - torch| = {dev[worst]} at {worst}"
  # Non-vacuous: each leaf's update agrees with torch's to 1% (every leaf moves: weight decay).
  ratio = {k: dev[k] / moved[k] for k in dev}
  worst_ratio = max(ratio, key=ratio.get)
  assert ratio[worst_ratio] <= 1e-2, (worst_ratio, dev[worst_ratio], moved[worst_ratio])
  return dev[worst], ratio[worst_ratio]


@pytest.mark.parametrize("method", ["alda_dsbn", "alda"])
def test_two_steps_match_torch_small_resnet(method):
  """Aggressive ramps (GRL coefficient 0.99 at step 0) and lr: every term moves every weight."""
  cfg = make_config(method, **TINY)
  state, jm, tflat, tm, init = run_both(
    cfg, image_size=32, batch_size=6, feature_dim=TINY["num_filters"] * 4 * 4
  )
  assert any(0.0 < float(m["train/confident_frac"]) < 1.0 for m in jm)  # the mask is exercised
  print("losses max |dev|:", assert_losses_match(jm, tm, 1e-5))
  print("max |dev|, max dev/move:", assert_variables_match(state, tflat, init, 1e-4))


@pytest.mark.parametrize("method", ["alda_dsbn"])
def test_two_steps_match_torch_resnet50(method):
  """Real ResNet-50 (64 px, 4 + 4 images), reference lr0, a 50x faster GRL/L_T ramp than default.

  The paper's method only: ``alda`` (shared BN) differs from it in no step code, only in the BN
  layers, which ``test_two_steps_match_torch_small_resnet[alda]`` covers through the step and
  torchvision_port_test compares with torch for ResNet-50 in train mode (outputs and running
  statistics, num_domains=1 included).

  The settings keep the problem well conditioned, which 1e-4 needs: with the tiny net's aggressive
  ramp, or BN biases that kill many ReLUs, a random-init ResNet-50's float32 gradient cancels
  catastrophically (a reversed gradient through 53 train-mode BNs on 4 images): torch float32
  then drifts >1e-4 from torch float64 within 2 steps, and JAX (BN reductions in float32, where
  torch's CPU kernels accumulate in double) drifts further. Here both stay ~1e-6 from each other.
  """
  cfg = make_config(method, backbone="resnet50", bottleneck_dim=32, disc_hidden_dim=32)
  cfg.optim.lr0, cfg.loss.ramp_max_steps = 0.001, 200
  state, jm, tflat, tm, init = run_both(
    cfg, image_size=64, batch_size=4, feature_dim=2048, bias_range=(0.0, 0.4)
  )
  print("losses max |dev|:", assert_losses_match(jm, tm, 1e-4))
  print("max |dev|, max dev/move:", assert_variables_match(state, tflat, init, 1e-4))


@pytest.mark.parametrize("method", ["dann_dsbn"])
def test_dann_two_steps_match_torch_small_resnet(method):
  """The DANN baseline (1-logit D, sigmoid BCE, GRL) follows the reference iteration too."""
  cfg = make_config(method, **TINY)
  state, jm, tflat, tm, init = run_both(
    cfg, image_size=32, batch_size=6, feature_dim=TINY["num_filters"] * 4 * 4
  )
  assert_losses_match(jm, tm, 1e-5)
  assert_variables_match(state, tflat, init, 1e-4)


# ------------------------------------------------------------- mechanisms, on a small CNN (fast)
SMALL = dict(backbone="small_cnn", feature_dim=24, bottleneck_dim=16, disc_hidden_dim=32)
SIZE = 28  # small_cnn: 28 -> conv5 24 -> pool 12 -> conv5 8 -> pool 4


def small_state(cfg, seed=0, *, size=SIZE, spread=False):
  """A train state with random numpy weights for ``size`` images: no jitted init to compile (slow
  on CPU).

  Kernels ~ N(0, 1/fan_in), biases 0, BN scale 1 and statistics (0, 1); the mechanism tests
  need reasonable weights, not the production init (``sharding_test`` covers that path).
  ``spread``: BN scales and variances ~ U(0.5, 1.5), biases and means ~ U(-0.2, 0.2), so that a
  wrong running-statistics update shows.
  """
  model = heads.create_model(cfg)
  shapes = jax.eval_shape(
    lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), method="init_all")
  )
  rng = np.random.default_rng(seed)

  def value(path, s):
    name = path[-1].key
    if name == "kernel":
      return rng.normal(0, 1 / np.sqrt(np.prod(s.shape[:-1])), s.shape).astype(np.float32)
    if spread:
      low, high = (0.5, 1.5) if name in ("scale", "var") else (-0.2, 0.2)
      return rng.uniform(low, high, s.shape).astype(np.float32)
    return np.full(s.shape, 1.0 if name in ("scale", "var") else 0.0, np.float32)

  variables = jax.tree.map(jnp.asarray, jax.tree_util.tree_map_with_path(value, shapes))
  return train_step.TrainState.create(
    apply_fn=model.apply,
    params=variables["params"],
    batch_stats=variables["batch_stats"],
    tx=optim.create_optimizer(cfg.optim),
  )


@pytest.mark.parametrize(
  "method,model",
  [("alda_dsbn", SMALL), ("alda", SMALL), ("dann", SMALL), ("source_only", SMALL), ("alda", TINY)],
)
def test_fused_pass_equals_two_calls(method, model):
  """One backbone call over both domains == the reference's two calls: every param, BN statistic
  and logged metric after 3 steps within 1e-5 (and every BN statistic moved far more than that)."""
  ends = {}
  for fused in (False, True):
    cfg = make_config(method, **model)
    cfg.model.fused_pass, cfg.model.dropout_rate = fused, 0.5  # dropout on: same masks both ways
    cfg.loss.threshold = 0.5
    state, step = small_state(cfg), jax.jit(functools.partial(train_step.train_step, cfg=cfg))
    rng, metrics = np.random.default_rng(3), []
    for _ in range(3):
      state, m = step(state, make_batch(rng, 6, SIZE), jax.random.key(7))
      metrics.append(m)
    ends[fused] = (state, metrics)
  flat = lambda st: traverse_util.flatten_dict(  # noqa: E731
    {"params": st.params, "batch_stats": st.batch_stats}
  )
  two, one = flat(ends[False][0]), flat(ends[True][0])
  init = flat(small_state(make_config(method, **model)))
  assert set(two) == set(one)
  for k in two:
    np.testing.assert_allclose(one[k], two[k], rtol=0, atol=1e-5, err_msg=str(k))
    if k[0] == "batch_stats":  # the running statistics moved: the order of updates is exercised
      assert np.abs(np.asarray(two[k]) - np.asarray(init[k])).max() > 1e-3, k
  for m_two, m_one in zip(ends[False][1], ends[True][1]):
    for k in m_two:
      np.testing.assert_allclose(m_one[k], m_two[k], rtol=0, atol=1e-5, err_msg=k)


def test_fused_batch_norm_updates_shared_statistics_in_domain_order():
  """Shared BN, fused: the running mean is that of two sequential updates, source then target --
  not the mean of one update over both halves, nor the reversed order."""
  from dsbn_jax.models import dsbn

  bn = dsbn.DomainSpecificBatchNorm(num_domains=1, momentum=0.1)
  rng = np.random.default_rng(0)
  xs, xt = rng.normal(1.0, 1, (4, 3)), rng.normal(-2.0, 1, (4, 3))
  x = jnp.asarray(np.stack([xs, xt], 1).reshape(8, 3), jnp.float32)
  variables = bn.init(jax.random.key(0), x, domain=(0, 0), train=True)
  _, upd = bn.apply(variables, x, domain=(0, 0), train=True, mutable=["batch_stats"])
  after_s = 0.9 * 0.0 + 0.1 * xs.mean(0)
  np.testing.assert_allclose(
    upd["batch_stats"]["mean"][0], 0.9 * after_s + 0.1 * xt.mean(0), rtol=1e-6
  )


@pytest.fixture(scope="module")
def routing_setup():
  cfg = make_config("alda_dsbn", **SMALL)
  cfg.loss.threshold = 0.0  # every target row confident: L_T has a gradient to look at
  state = small_state(cfg)
  batch = make_batch(np.random.default_rng(1), 4, SIZE)
  return cfg, state, batch


def term_grads(cfg, state, batch, coeff, names=("ce", "adv", "reg", "correct")):
  """d(term)/d(params) for the named loss terms, at a fixed GRL coefficient."""

  def terms(params):
    t, _ = train_step.compute_loss_terms(
      state.apply_fn, params, state.batch_stats, batch, jax.random.key(0), coeff, cfg=cfg
    )
    return {n: t[n] for n in names}

  return jax.jit(jax.jacrev(terms))(state.params)


def test_gradient_reversal_flips_only_the_feature_extractor(routing_setup, monkeypatch):
  cfg, state, batch = routing_setup
  coeff = 0.37
  reversed_ = term_grads(cfg, state, batch, coeff, names=("adv",))
  monkeypatch.setattr(losses, "gradient_reversal", lambda x, c: x)  # the unreversed graph
  plain = term_grads(cfg, state, batch, coeff, names=("adv",))
  for group in ("backbone", "bottleneck"):  # G: -coeff times the unreversed adversarial gradient
    for got, want in zip(
      jax.tree.leaves(reversed_["adv"][group]), jax.tree.leaves(plain["adv"][group])
    ):
      assert float(jnp.abs(want).max()) > 0
      np.testing.assert_allclose(got, -coeff * want, rtol=1e-5, atol=1e-7)
  jax.tree.map(np.testing.assert_array_equal, reversed_["adv"]["disc"], plain["adv"]["disc"])


def test_each_term_reaches_exactly_the_reference_parameters(routing_setup):
  """reg -> D only (the requires_grad trick); L_T -> G and C, never D; L_adv -> G and D, not C."""
  cfg, state, batch = routing_setup
  grads = term_grads(cfg, state, batch, 0.5)
  nonzero = lambda tree: any(float(jnp.abs(x).max()) > 0 for x in jax.tree.leaves(tree))  # noqa
  reaches = {term: {group for group, g in grads[term].items() if nonzero(g)} for term in grads}
  assert reaches == {
    "ce": {"backbone", "bottleneck", "classifier"},
    "adv": {"backbone", "bottleneck", "disc"},
    "reg": {"disc"},
    "correct": {"backbone", "bottleneck", "classifier"},
  }


def test_source_only_never_looks_at_the_target_batch():
  cfg = make_config("source_only", **SMALL)
  state = small_state(cfg)
  step = jax.jit(functools.partial(train_step.train_step, cfg=cfg))
  batch = make_batch(np.random.default_rng(2), 4, SIZE)
  other = {
    "source": batch["source"],
    "target": make_batch(np.random.default_rng(3), 4, SIZE)["target"],
  }
  (s1, m1), (s2, m2) = step(state, batch, jax.random.key(0)), step(state, other, jax.random.key(0))
  assert set(m1) == {"train/loss", "train/ce", "train/lr", "train/source_acc"}
  jax.tree.map(
    np.testing.assert_array_equal, (s1.params, s1.batch_stats, m1), (s2.params, s2.batch_stats, m2)
  )
  assert "disc" not in s1.params


def test_dann_metrics_and_update():
  cfg = make_config("dann", **SMALL)
  state = small_state(cfg)
  new, metrics = jax.jit(functools.partial(train_step.train_step, cfg=cfg))(
    state, make_batch(np.random.default_rng(2), 4, SIZE), jax.random.key(0)
  )
  assert set(metrics) == {
    "train/loss",
    "train/ce",
    "train/dann",
    "train/lr",
    "train/grl_coeff",
    "train/source_acc",
    "train/target_acc",
    "train/confident_frac",
  }
  assert all(np.isfinite(float(v)) for v in metrics.values())
  assert state.params["disc"]["ad_layer3"]["kernel"].shape[-1] == 1
  assert int(new.step) == 1
  assert float(metrics["train/lr"]) == pytest.approx(cfg.optim.lr0)


@pytest.fixture(scope="module")
def dropout_run():
  """alda_dsbn with D's dropout on: the config, initial state, a batch and the jitted step."""
  cfg = make_config("alda_dsbn", **SMALL)
  cfg.model.dropout_rate = 0.5
  step = jax.jit(functools.partial(train_step.train_step, cfg=cfg))
  return cfg, small_state(cfg), make_batch(np.random.default_rng(2), 4, SIZE), step


def test_dropout_masks_come_from_the_rng_argument(dropout_run):
  _, state, batch, step = dropout_run
  d = lambda s: np.asarray(s[0].params["disc"]["ad_layer1"]["kernel"])  # noqa: E731
  same = d(step(state, batch, jax.random.key(7))), d(step(state, batch, jax.random.key(7)))
  other = d(step(state, batch, jax.random.key(8)))
  np.testing.assert_array_equal(*same)
  assert np.abs(same[0] - other).max() > 1e-6


def test_bfloat16_compute_keeps_float32_state_and_tracks_float32(dropout_run):
  cfg32, state32, batch, step32 = dropout_run
  cfg = copy.deepcopy(cfg32)
  cfg.model.dtype = "bfloat16"
  state = state32.replace(apply_fn=heads.create_model(cfg).apply)  # same float32 weights
  s16, m16 = jax.jit(functools.partial(train_step.train_step, cfg=cfg))(
    state, batch, jax.random.key(0)
  )
  _, m32 = step32(state32, batch, jax.random.key(0))  # same dropout masks: same rng and shapes
  for leaf in jax.tree.leaves((s16.params, s16.batch_stats, s16.opt_state)):
    assert leaf.dtype in (jnp.float32, jnp.int32), leaf.dtype
  for name in ("train/ce", "train/adv", "train/reg"):
    assert float(m16[name]) == pytest.approx(float(m32[name]), rel=3e-2), name
  assert float(m16["train/ce"]) != float(m32["train/ce"])  # bfloat16 really was used
