"""The optax optimizer against torch.optim.SGD with the reference's param groups and schedule."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch

from dsbn_jax import config_defaults, optim
from tests import torch_reference as ref

SHAPES = {
  "backbone": {"conv": (3, 3, 4, 8), "bn": (2, 8)},
  "bottleneck": {"kernel": (8, 6)},
  "classifier": {"kernel": (6, 5), "bias": (5,)},
  "disc": {"kernel": (6, 5)},
}


def _tree(rng, scale=1.0):
  return jax.tree.map(
    lambda s: (rng.normal(size=s) * scale).astype(np.float32),
    SHAPES,
    is_leaf=lambda s: isinstance(s, tuple),
  )


@pytest.mark.parametrize("step", [0, 1, 500, 1000, 10000, 20000])
def test_inv_schedule_matches_reference_scheduler(step):
  cfg = config_defaults.get_config().optim
  opt = ref.make_sgd([([torch.zeros(1, requires_grad=True)], 1)], cfg.lr0)
  ref.inv_lr_scheduler(opt, step, cfg.lr_gamma, cfg.lr_power, cfg.lr0, 0.0005)
  np.testing.assert_allclose(optim.inv_schedule(cfg)(step), opt.param_groups[0]["lr"], rtol=1e-6)


@pytest.mark.parametrize("mults", [(1.0, 10.0, 10.0), (0.5, 3.0, 7.0)])
def test_updates_match_torch_sgd_over_steps(mults):
  """Nesterov momentum (buffer starting at the first gradient), coupled decay, per-group lr."""
  cfg = config_defaults.get_config().optim
  cfg.lr0, cfg.weight_decay = 0.05, 0.01  # large enough that decay and momentum both matter
  cfg.lr_mult_backbone, cfg.lr_mult_head, cfg.lr_mult_disc = mults
  rng = np.random.default_rng(0)
  params = _tree(rng)
  grads = [_tree(rng) for _ in range(5)]

  tx = optim.create_optimizer(cfg)
  ours = jax.tree.map(jnp.asarray, params)
  state = tx.init(ours)
  update = jax.jit(tx.update)
  torch_params = jax.tree.map(lambda x: torch.tensor(x, requires_grad=True), params)
  groups = [
    (jax.tree.leaves(torch_params["backbone"]), mults[0]),
    (
      jax.tree.leaves(torch_params["bottleneck"]) + jax.tree.leaves(torch_params["classifier"]),
      mults[1],
    ),
    (jax.tree.leaves(torch_params["disc"]), mults[2]),
  ]
  opt = ref.make_sgd(groups, cfg.lr0, momentum=cfg.momentum, weight_decay=cfg.weight_decay / 2)
  for i, g in enumerate(grads):
    updates, state = update(jax.tree.map(jnp.asarray, g), state, ours)
    ours = optax.apply_updates(ours, updates)
    ref.inv_lr_scheduler(opt, i, cfg.lr_gamma, cfg.lr_power, cfg.lr0, cfg.weight_decay / 2)
    for p, gi in zip(jax.tree.leaves(torch_params), jax.tree.leaves(g)):
      p.grad = torch.from_numpy(gi)
    opt.step()
    for ours_leaf, theirs, start in zip(
      jax.tree.leaves(ours), jax.tree.leaves(torch_params), jax.tree.leaves(params)
    ):
      theirs = theirs.detach().numpy()
      assert np.abs(theirs - start).max() > 1e-3  # every group moves
      np.testing.assert_allclose(ours_leaf, theirs, atol=1e-6, rtol=1e-6)


def test_first_step_is_lr_times_one_point_nine_decayed_gradient():
  """torch's buffer starts at d = g + wd·w, so step 0 moves by lr·(d + 0.9·d) (optax: trace 0)."""
  cfg = config_defaults.get_config().optim
  params = {"disc": {"w": jnp.array([1.0, -2.0])}}
  g = {"disc": {"w": jnp.array([0.5, 0.25])}}
  tx = optim.create_optimizer(cfg)
  updates, _ = tx.update(g, tx.init(params), params)
  d = g["disc"]["w"] + cfg.weight_decay * params["disc"]["w"]
  lr = cfg.lr0 * cfg.lr_mult_disc
  np.testing.assert_allclose(updates["disc"]["w"], -lr * (1 + cfg.momentum) * d, rtol=1e-6)


def test_every_top_level_param_needs_a_group():
  assert optim.param_labels({"backbone": 0, "disc": 0}) == {"backbone": "backbone", "disc": "disc"}
  with pytest.raises(ValueError, match="mystery"):
    optim.param_labels({"backbone": 0, "mystery": 0})


def test_adam_matches_torch_adam_with_coupled_decay_and_the_schedule():
  """optim.name='adam' (torch Adam's update, as in ALDA's digits scripts) vs torch.optim.Adam."""
  cfg = config_defaults.get_config().optim
  cfg.name, cfg.lr0, cfg.weight_decay, cfg.lr_gamma = "adam", 0.01, 0.01, 0.3
  cfg.lr_mult_backbone, cfg.lr_mult_head, cfg.lr_mult_disc = 1.0, 2.0, 3.0
  rng = np.random.default_rng(1)
  params, grads = _tree(rng), [_tree(rng) for _ in range(5)]
  tx = optim.create_optimizer(cfg)
  ours = jax.tree.map(jnp.asarray, params)
  state = tx.init(ours)
  torch_params = jax.tree.map(lambda x: torch.tensor(x, requires_grad=True), params)
  groups = [
    {"params": jax.tree.leaves(torch_params[k]), "mult": m}
    for k, m in (("backbone", 1.0), ("bottleneck", 2.0), ("classifier", 2.0), ("disc", 3.0))
  ]
  opt = torch.optim.Adam(groups, lr=cfg.lr0, weight_decay=cfg.weight_decay)
  for i, g in enumerate(grads):
    updates, state = tx.update(jax.tree.map(jnp.asarray, g), state, ours)
    ours = optax.apply_updates(ours, updates)
    for group in opt.param_groups:
      group["lr"] = cfg.lr0 * (1 + cfg.lr_gamma * i) ** -cfg.lr_power * group["mult"]
    for p, gi in zip(jax.tree.leaves(torch_params), jax.tree.leaves(g)):
      p.grad = torch.from_numpy(gi)
    opt.step()
  for ours_leaf, theirs in zip(jax.tree.leaves(ours), jax.tree.leaves(torch_params)):
    np.testing.assert_allclose(ours_leaf, theirs.detach().numpy(), atol=1e-6, rtol=1e-5)


def test_unknown_optimizer_is_a_user_error():
  cfg = config_defaults.get_config().optim
  cfg.name = "adamw"
  with pytest.raises(optim.UserError, match="adamw"):
    optim.create_optimizer(cfg)


def test_frozen_constants_never_move_and_other_states_keep_their_structure():
  """CDAN's random matrices ('random_map': group 'frozen') stay bit-exact under gradients, weight
  decay and momentum while the other groups move; a model without them gets the optimizer state
  it always had (no 'frozen' entry), so the checkpoints of earlier runs still restore."""
  cfg = config_defaults.get_config().optim
  cfg.weight_decay = 0.01
  rng = np.random.default_rng(0)
  plain = jax.tree.map(jnp.asarray, _tree(rng))
  params = {**plain, "random_map": {"r_f": jnp.asarray(rng.normal(size=(6, 4)), jnp.float32)}}
  tx = optim.create_optimizer(cfg)
  assert set(tx.init(plain).inner_states) == {"backbone", "head", "disc"}
  state = tx.init(params)
  assert set(state.inner_states) == {"backbone", "head", "disc", "frozen"}
  assert not jax.tree.leaves(state.inner_states["frozen"])  # no momentum kept for constants
  moved = params
  for _ in range(3):
    grads = jax.tree.map(lambda p: jnp.ones_like(p), moved)
    updates, state = tx.update(grads, state, moved)
    moved = optax.apply_updates(moved, updates)
  np.testing.assert_array_equal(moved["random_map"]["r_f"], params["random_map"]["r_f"])
  for group in plain:
    for a, b in zip(jax.tree.leaves(moved[group]), jax.tree.leaves(params[group])):
      assert float(jnp.abs(a - b).max()) > 1e-4, group
