"""ALDA/DANN losses, ramps and gradient reversal against the torch re-implementation."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dsbn_jax import losses
from tests import torch_reference as ref

TOL = 1e-5
TERMS = ("adv", "reg", "correct")


def _case(seed, k, b=5, regime="mixed"):
  """Random D logits / classifier probabilities / labels; ``regime`` sets which rows are confident.

  mixed: some source and some target rows get a dominant class (max prob ~1), others stay flat;
  none: every row flat (no confident target row); all: every row dominant; saturated: mixed, and
  D's logit at the pseudo label of one source and one target row is ±120, where the sigmoid is
  exactly 1 or 0 in float32 (BCE log clamp at -100, torch's 1e-12 backward floor). Only two rows:
  each clamped term adds 100 to the sum, and the loss must stay small enough for 1e-5 to be
  within float32 resolution.
  """
  rng = np.random.default_rng(seed)
  disc = rng.normal(0.0, 2.0, (2 * b, k)).astype(np.float32)
  logits = rng.normal(0.0, 1.0, (2 * b, k))
  boost = {"none": np.zeros(2 * b, bool), "all": np.ones(2 * b, bool)}.get(
    regime, rng.random(2 * b) < 0.5
  )
  boost[b] = regime != "none"  # at least one confident target row unless "none"
  boost[b + 1] = regime == "all"  # and at least one unconfident one unless "all"
  logits[boost, rng.integers(0, k, int(boost.sum()))] += 30.0
  probs = np.exp(logits - logits.max(1, keepdims=True))
  probs = (probs / probs.sum(1, keepdims=True)).astype(np.float32)
  labels = rng.integers(0, k, b).astype(np.int32)
  if regime == "saturated":
    for row in (0, b):
      disc[row, probs[row].argmax()] = rng.choice([-120.0, 120.0])
  return disc, labels, probs


@functools.partial(jax.jit, static_argnums=3)
def _jax_values_and_jacobians(disc, labels, probs, threshold):
  terms = lambda d, p: jnp.stack(losses.alda_losses(d, labels, p, threshold))  # noqa: E731
  return terms(disc, probs), jax.jacrev(terms, argnums=(0, 1))(disc, probs)


def _jax_terms_and_grads(disc, labels, probs, threshold):
  values, (d_disc, d_probs) = _jax_values_and_jacobians(disc, labels, probs, threshold)
  return (
    {n: float(values[i]) for i, n in enumerate(TERMS)},
    {n: (np.asarray(d_disc[i]), np.asarray(d_probs[i])) for i, n in enumerate(TERMS)},
  )


def _torch_terms_and_grads(disc, labels, probs, threshold):
  values, grads = {}, {}
  for i, name in enumerate(TERMS):
    d = torch.from_numpy(disc).requires_grad_()
    p = torch.from_numpy(probs).requires_grad_()
    out = ref.alda_loss(d, torch.from_numpy(labels).long(), p, threshold)[i]
    values[name] = float(out.detach())
    g = torch.autograd.grad(out, (d, p), allow_unused=True)
    grads[name] = tuple(
      np.zeros_like(x) if gi is None else gi.numpy() for gi, x in zip(g, (disc, probs))
    )
  return values, grads


def _compare(disc, labels, probs, threshold):
  ours, our_grads = _jax_terms_and_grads(disc, labels, probs, threshold)
  theirs, their_grads = _torch_terms_and_grads(disc, labels, probs, threshold)
  worst = 0.0
  for name in TERMS:
    if np.isnan(theirs[name]):  # torch: mean over no confident row -> NaN value, zero gradient
      assert name == "correct" and ours[name] == 0.0
    else:
      worst = max(worst, abs(ours[name] - theirs[name]))
    for g_ours, g_theirs in zip(our_grads[name], their_grads[name]):
      assert np.all(np.isfinite(g_ours)), name
      worst = max(worst, float(np.abs(g_ours - g_theirs).max()))
  assert worst <= TOL, worst
  return ours, theirs


@pytest.mark.parametrize("k", [3, 31, 65])
@pytest.mark.parametrize("regime", ["mixed", "none", "all", "saturated"])
def test_alda_losses_and_gradients_match_torch(k, regime):
  for seed in range(3):
    b = 10 if regime == "saturated" else 5
    disc, labels, probs = _case(seed + 100 * k, k, b, regime=regime)
    n_conf = int((probs[b:].max(1) > 0.9).sum())
    assert {"none": n_conf == 0, "all": n_conf == b}.get(regime, 0 < n_conf < b)
    ours, theirs = _compare(disc, labels, probs, 0.9)
    assert np.isnan(theirs["correct"]) == (n_conf == 0)


def test_threshold_is_strict():
  """A target row whose max prob is exactly the threshold (in float32) is not confident."""
  k, b = 4, 3
  disc, labels, _ = _case(0, k, b)
  probs = np.full((2 * b, k), 0.1 / (k - 1), np.float32)
  probs[:, 0] = np.float32(0.9)  # max prob == float32(0.9) == the threshold in float32
  probs[b] = [0.02, 0.94, 0.02, 0.02]  # one target row strictly above
  assert np.asarray(losses.confident_mask(jnp.asarray(probs[b:]), 0.9)).tolist() == [
    True,
    False,
    False,
  ]
  ours, theirs = _compare(disc, labels, probs, 0.9)
  assert np.isfinite(theirs["correct"])  # exactly the one strictly-above row counted, in both


def test_no_confident_target_gives_exact_zero_and_zero_gradients():
  disc, labels, probs = _case(7, 31, regime="none")
  value, grad = jax.jit(jax.value_and_grad(lambda p: losses.alda_losses(disc, labels, p, 0.9)[2]))(
    probs
  )
  assert float(value) == 0.0
  assert np.all(np.asarray(grad) == 0.0)


def test_torch_bce_matches_torch_including_clamps():
  c = np.array([0.0, 1.0, 1e-8, 1 - 6e-8, 0.3, 0.7, 1e-30], np.float32)
  t = np.array([1.0, 0.0, 0.0, 1.0, 0.2, 0.5, 0.5], np.float32)
  ct = torch.from_numpy(c).requires_grad_()
  want = torch.nn.BCELoss(reduction="none")(ct, torch.from_numpy(t))
  (want_grad,) = torch.autograd.grad(want.sum(), ct)
  got, vjp = jax.vjp(lambda x: losses.torch_bce(x, jnp.asarray(t)), jnp.asarray(c))
  np.testing.assert_allclose(got, want.detach().numpy(), rtol=1e-6)
  np.testing.assert_allclose(vjp(jnp.ones_like(got))[0], want_grad.numpy(), rtol=1e-6)


def test_dann_loss_matches_torch():
  rng = np.random.default_rng(0)
  z = (rng.normal(size=(8, 1)) * 3).astype(np.float32)
  zt = torch.from_numpy(z).requires_grad_()
  want = ref.dann_loss(torch.sigmoid(zt))
  (want_grad,) = torch.autograd.grad(want, zt)
  value, grad = jax.value_and_grad(losses.dann_loss)(jnp.asarray(z))
  assert abs(float(value) - float(want.detach())) <= TOL
  np.testing.assert_allclose(grad, want_grad.numpy(), atol=TOL)


def test_cross_entropy_matches_torch():
  rng = np.random.default_rng(1)
  logits = rng.normal(size=(6, 31)).astype(np.float32) * 3
  labels = rng.integers(0, 31, 6)
  want = torch.nn.CrossEntropyLoss()(torch.from_numpy(logits), torch.from_numpy(labels))
  assert abs(float(losses.cross_entropy(logits, labels.astype(np.int32))) - float(want)) <= TOL


@pytest.mark.parametrize("step", [0, 1, 7, 499, 2000, 10000, 20000])
def test_ramps_and_their_step_offsets(step):
  """GRL uses calc_coeff(i + 1) (D's iter_num counts before use); L_T's weight calc_coeff(i)."""
  np.testing.assert_allclose(losses.grl_coeff(step), ref.calc_coeff(step + 1), rtol=1e-6, atol=1e-7)
  np.testing.assert_allclose(
    losses.correct_loss_weight(step, trade_off=1.3),
    ref.calc_coeff(step, high=1.3),
    rtol=1e-6,
    atol=1e-7,
  )
  np.testing.assert_allclose(
    losses.ramp(step, max_steps=300.0), ref.calc_coeff(step, max_iter=300.0), rtol=1e-6, atol=1e-7
  )


def test_gradient_reversal_is_identity_forward_and_minus_coeff_backward():
  x = jnp.asarray(np.random.default_rng(2).normal(size=(5, 7)).astype(np.float32)) * 1e3
  g = jnp.asarray(np.random.default_rng(3).normal(size=(5, 7)).astype(np.float32))
  for coeff in (0.0, 0.3, 1.0):
    y, vjp = jax.vjp(losses.gradient_reversal, x, jnp.float32(coeff))
    np.testing.assert_array_equal(y, x)  # bit-exact forward
    gx, gc = vjp(g)
    np.testing.assert_array_equal(gx, -coeff * g)  # torch hook: -coeff * grad
    assert float(gc) == 0.0  # the coefficient is a constant
  y = jax.jit(losses.gradient_reversal)(x, 0.5)
  np.testing.assert_array_equal(y, x)
