"""CDAN/CDAN+E, JAN, MADA, MCC and BNM losses against the torch oracles: values and gradients.

Every case compares, in float32, the JAX loss and its gradient with respect to the network outputs
(bottleneck features and classifier logits) with torch autograd through the reference's own
structure (tests/torch_reference.py), then checks that padded rows change nothing.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dsbn_jax import losses
from dsbn_jax.methods import bnm, cdan, jan, mada, mcc
from tests import torch_reference as ref

TOL = dict(rtol=1e-5, atol=1e-6)
KS = (3, 31, 65)
STEP = 1500  # the GRL coefficients are ~0.6 here: neither 0 nor saturated
FEAT = 8  # bottleneck width of the cases (D's input is K·F for the multilinear map)
REGIMES = ("mixed", "one_class", "confident", "uniform")


def _logits(rng, b, k, regime="mixed"):
  """f32[b, k] classifier logits. mixed: about half the rows have a dominant class; one_class:
  every row's argmax is the same class (p ≈ 0.9+); confident: every row one-hot-ish (p > 0.999),
  classes spread so that each class occurs (b >= k) or none twice (b < k); uniform: flat rows
  (max p barely above 1/K)."""
  z = rng.normal(size=(b, k))
  if regime == "mixed":
    rows = rng.random(b) < 0.5
    z[rows, rng.integers(0, k, int(rows.sum()))] += 8.0
  elif regime == "one_class":
    z[:, int(rng.integers(0, k))] += 6.0
  elif regime == "confident":
    z[np.arange(b), rng.permutation(max(b, k))[:b] % k] += 12.0
  elif regime == "uniform":
    z *= 0.1
  return z.astype(np.float32)


def _t(x):
  """A leaf torch tensor (float32) that records gradients."""
  return torch.tensor(np.asarray(x), requires_grad=True)


def _assert_close(ours, theirs, name=""):
  """Value or gradient parity; the JAX side must be finite."""
  ours = np.asarray(ours)
  assert np.all(np.isfinite(ours)), name
  np.testing.assert_allclose(ours, theirs, err_msg=name, **TOL)


def _value_and_grad(fn, argnums=0):
  """``jax.value_and_grad`` compiled: one program per case instead of an eager compile per op."""
  return jax.jit(jax.value_and_grad(fn, argnums))


def _torch_grads(loss, inputs):
  """Gradients of ``loss`` w.r.t. ``inputs`` (zeros where it does not depend on one)."""
  grads = torch.autograd.grad(loss, inputs, allow_unused=True)
  return [np.zeros(x.shape, np.float32) if g is None else g.numpy() for g, x in zip(grads, inputs)]


# ----------------------------------------------------------------------------------------- CDAN
def _torch_disc(in_dim, seed):
  """DANN's AdversarialNetwork (sigmoid output, GRL hook) without dropout, at loop index STEP."""
  torch.manual_seed(seed)
  ad_net = ref.AdversarialNetwork(in_dim, 16, 1, dropout=0.0, sigmoid=True)
  ad_net.iter_num = STEP  # forward increments first: coefficient calc_coeff(STEP + 1)
  return ad_net


def _disc_weights(ad_net):
  """The torch D's (in, out) weights and biases, for ``_cdan_value_and_grad``."""
  layers = (ad_net.ad_layer1, ad_net.ad_layer2, ad_net.ad_layer3)
  return [(l.weight.detach().numpy().T, l.bias.detach().numpy()) for l in layers]


@functools.partial(jax.jit, static_argnames=("use_entropy", "use_random"))
def _cdan_value_and_grad(feat, logits, wb, r_f, r_g, *, use_entropy, use_random):
  """CDAN(+E) as the step will compute it, with the same D as a function (raw logit out; the
  sigmoid is in ``cdan_loss``); value and gradient w.r.t. (features, logits)."""

  def loss(f, z):
    p = jax.nn.softmax(z, axis=1)
    h = cdan.random_map(f, p, r_f, r_g) if use_random else cdan.multilinear_map(f, p)
    h = losses.gradient_reversal(h, losses.grl_coeff(STEP))  # the caller's GRL, as for DANN
    for i, (w, b) in enumerate(wb):
      h = h @ w + b[None]
      h = jax.nn.relu(h) if i < 2 else h
    ent = cdan.entropy(p) if use_entropy else None
    return cdan.cdan_loss(h, ent, losses.ramp(STEP) if use_entropy else None)

  return jax.value_and_grad(loss, (0, 1))(feat, logits)


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize(
  "use_entropy, use_random, regime",
  [
    (False, False, "mixed"),
    (False, True, "mixed"),
    (True, True, "mixed"),
    *[(True, False, r) for r in REGIMES],
  ],
)
def test_cdan_matches_torch(k, use_entropy, use_random, regime):
  b, rng = 5, np.random.default_rng(k)
  feat, logits = rng.normal(size=(2 * b, FEAT)).astype(np.float32), _logits(rng, 2 * b, k, regime)
  r_f, r_g = map(np.array, cdan.random_matrices(jax.random.key(k), FEAT, k, 64))
  ad_net = _torch_disc(64 if use_random else k * FEAT, seed=k)
  value, grads = _cdan_value_and_grad(
    feat, logits, _disc_weights(ad_net), r_f, r_g, use_entropy=use_entropy, use_random=use_random
  )
  f_t, z_t = _t(feat), _t(logits)
  p_t = torch.softmax(z_t, dim=1)
  layer = (
    ref.RandomLayer([torch.from_numpy(r_f), torch.from_numpy(r_g)], 64) if use_random else None
  )
  ent_t = ref.entropy(p_t) if use_entropy else None
  want = ref.cdan_loss([f_t, p_t], ad_net, ent_t, ref.calc_coeff(STEP), layer)
  _assert_close(value, want.item(), "value")
  for name, g, w in zip(("feat", "logits"), grads, _torch_grads(want, (f_t, z_t))):
    _assert_close(g, w, name)
  if not use_entropy:  # the map's softmax is detached: without entropy, no gradient to the logits
    assert np.all(np.asarray(grads[1]) == 0.0)


def test_maps_layout_and_detach():
  """vec(g ⊗ f) in bmm/view order exactly; RandomLayer's layout; random_matrices' law."""
  rng = np.random.default_rng(0)
  f, p = rng.normal(size=(4, 5)).astype(np.float32), rng.random((4, 3)).astype(np.float32)
  want = torch.bmm(torch.from_numpy(p).unsqueeze(2), torch.from_numpy(f).unsqueeze(1)).view(-1, 15)
  np.testing.assert_array_equal(cdan.multilinear_map(f, p), want.numpy())
  np.testing.assert_array_equal(
    mada.classwise_inputs(f, p), want.numpy().reshape(4, 3, 5)
  )  # [N, K, F]: row n, discriminator k
  r_f, r_g = cdan.random_matrices(jax.random.key(1), 5, 3, 1024)
  assert r_f.shape == (5, 1024) and r_g.shape == (3, 1024) and r_f.dtype == jnp.float32
  both = np.concatenate([np.ravel(r_f), np.ravel(r_g)])
  assert abs(both.mean()) < 0.05 and abs(both.std() - 1.0) < 0.05  # N(0, 1), 8192 draws
  layer = ref.RandomLayer([torch.from_numpy(np.array(r)) for r in (r_f, r_g)], 1024)
  want = layer.forward([torch.from_numpy(f), torch.from_numpy(p)]).numpy()
  np.testing.assert_allclose(cdan.random_map(f, p, r_f, r_g), want, **TOL)
  for fn in (cdan.multilinear_map, lambda f, p: cdan.random_map(f, p, r_f, r_g)):
    g_p = jax.grad(lambda p: jnp.sum(fn(f, p) ** 2))(p)  # detached softmax
    assert np.all(np.asarray(g_p) == 0.0)


# ----------------------------------------------------------------------------------------- MADA
@pytest.mark.parametrize("k", KS)
def test_mada_matches_caffe_graph(k):
  """K discriminators run as one batched matmul on ``classwise_inputs`` == K separate torch Ds."""
  b, hidden, rng = 5, 6, np.random.default_rng(10 + k)
  feat, logits = rng.normal(size=(2 * b, FEAT)).astype(np.float32), _logits(rng, 2 * b, k)
  torch.manual_seed(k)
  ad_nets = [_torch_mlp(FEAT, hidden) for _ in range(k)]
  w1, b1, w2, b2 = (
    np.stack([getattr(d[i], attr).detach().numpy() for d in ad_nets])
    for i, attr in ((0, "weight"), (0, "bias"), (2, "weight"), (2, "bias"))
  )
  coeff = float(losses.grl_coeff(STEP))

  def ours(f, z):
    x_NxKxF = losses.gradient_reversal(mada.classwise_inputs(f, jax.nn.softmax(z, axis=1)), coeff)
    h_NxKxH = jax.nn.relu(jnp.einsum("nkf,khf->nkh", x_NxKxF, w1) + b1[None])
    return mada.mada_loss(jnp.einsum("nkh,koh->nko", h_NxKxH, w2)[:, :, 0] + b2[None, :, 0])

  value, grads = _value_and_grad(ours, (0, 1))(feat, logits)
  f_t, z_t = _t(feat), _t(logits)
  want = ref.mada_loss(f_t, torch.softmax(z_t, dim=1), ad_nets, coeff)
  _assert_close(value, want.item(), "value")
  g_feat, g_logits = _torch_grads(want, (f_t, z_t))
  _assert_close(grads[0], g_feat, "feat")
  assert np.all(np.asarray(grads[1]) == 0.0) and np.all(g_logits == 0.0)  # p detached


def _torch_mlp(in_dim, hidden):
  return torch.nn.Sequential(
    torch.nn.Linear(in_dim, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, 1)
  )


# ------------------------------------------------------------------------------------------ JAN
def _jmmd_rows(f, z, mask=None):
  """JMMD of [source; target] rows of features ``f`` and logits ``z`` (mask: [source; target])."""
  b, p = f.shape[0] // 2, jax.nn.softmax(z, axis=1)
  m = (None, None) if mask is None else (mask[:b], mask[b:])
  return jan.jmmd(f[:b], f[b:], p[:b], p[b:], *m)


_JMMD_VALUE_AND_GRAD = jax.jit(jax.value_and_grad(_jmmd_rows, (0, 1)))


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("regime", REGIMES)
def test_jmmd_matches_tllib(k, regime):
  b, rng = 6, np.random.default_rng(20 + k)
  feat = rng.normal(size=(2 * b, FEAT)).astype(np.float32)
  feat[b:] += 0.5  # a domain shift, so that the discrepancy is not ~0
  logits = _logits(rng, 2 * b, k, regime)
  value, grads = _JMMD_VALUE_AND_GRAD(feat, logits)
  f_t, z_t = _t(feat), _t(logits)
  p_t = torch.softmax(z_t, dim=1)
  want = ref.jmmd_loss((f_t[:b], p_t[:b]), (f_t[b:], p_t[b:]))
  _assert_close(value, want.item(), "value")
  for name, g, w in zip(("feat", "logits"), grads, _torch_grads(want, (f_t, z_t))):
    _assert_close(g, w, name)


# ------------------------------------------------------------------------------------ MCC / BNM
# Compiled once per shape, shared by the regimes and temperatures of a shape.
_MCC_VALUE_AND_GRAD = jax.jit(jax.value_and_grad(mcc.mcc_loss))
_BNM_VALUE_AND_GRAD = jax.jit(jax.value_and_grad(bnm.bnm_loss))


@pytest.mark.parametrize("k", KS)
@pytest.mark.parametrize("regime", REGIMES)
@pytest.mark.parametrize("temperature", [2.5, 1.0])
def test_mcc_matches_official(k, regime, temperature):
  logits = _logits(np.random.default_rng(30 + k), 8, k, regime)
  value, grad = _MCC_VALUE_AND_GRAD(logits, temperature)
  z_t = _t(logits)
  want = ref.mcc_loss(z_t, temperature, k)
  _assert_close(value, want.item(), "value")
  _assert_close(grad, _torch_grads(want, (z_t,))[0], "logits")


# (B, K): B > K (the Office-31 batch 36 > 31 classes, where pytorch-adapt's 1/B differs) and B < K.
@pytest.mark.parametrize("b, k", [(8, 3), (36, 31), (5, 31), (6, 65)])
@pytest.mark.parametrize("regime", REGIMES)
def test_bnm_matches_official(b, k, regime):
  logits = _logits(np.random.default_rng(40 + b + k), b, k, regime)
  value, grad = _BNM_VALUE_AND_GRAD(logits)
  z_t = _t(logits)
  want = ref.bnm_loss(torch.softmax(z_t, dim=1))
  _assert_close(value, want.item(), "value")
  _assert_close(grad, _torch_grads(want, (z_t,))[0], "logits")
  nuclear = np.linalg.svd(np.asarray(jax.nn.softmax(logits), np.float64), compute_uv=False).sum()
  np.testing.assert_allclose(float(value), -nuclear / min(b, k), rtol=1e-5)  # not 1/B


# ---------------------------------------------------------------------------------- padded rows
def _padding_mask(rows, pad, halves, rng):
  """bool[rows + pad]: ``pad`` padded rows at random places; with ``halves``, ``pad`` in each half
  ([source; target], each padded separately, as the train step's mask_N)."""
  if halves:
    return np.concatenate([_padding_mask(rows // 2, pad, False, rng) for _ in range(2)])
  mask = np.zeros(rows + pad, bool)
  mask[rng.permutation(rows + pad)[:rows]] = True
  return mask


def _insert(x, mask, rng):
  """``x``'s rows, in order, at the True rows of ``mask``; large junk in the others."""
  out = (rng.normal(size=(mask.size, *x.shape[1:])) * 50).astype(np.float32)
  out[mask] = x
  return out


def _cdan_e(d, ent, mask=None):
  return cdan.cdan_loss(d, ent, losses.ramp(STEP), mask)


# name: (loss of its arrays and the mask, the arrays' shapes without the rows, per-domain halves)
PADDED_CASES = {
  "cdan": (lambda d, mask=None: cdan.cdan_loss(d, mask=mask), [(1,)], True),
  "cdan_e": (_cdan_e, [(1,), ()], True),
  "mada": (lambda d, mask=None: mada.mada_loss(d, mask), [(31,)], True),
  "jmmd": (_jmmd_rows, [(FEAT,), (31,)], True),
  "mcc": (lambda z, mask=None: mcc.mcc_loss(z, 2.5, mask), [(31,)], False),
  "bnm_b_lt_k": (lambda z, mask=None: bnm.bnm_loss(z, mask), [(31,)], False),
  "bnm_b_gt_k": (lambda z, mask=None: bnm.bnm_loss(z, mask), [(3,)], False),
}


@pytest.mark.parametrize("name", PADDED_CASES)
def test_padded_rows_change_nothing(name):
  """With junk in padded rows, the loss and its gradients equal those of the real rows alone;
  padded rows get exactly zero gradient."""
  fn, shapes, halves = PADDED_CASES[name]
  rng, rows = np.random.default_rng(50), 10
  arrays = [(rng.normal(size=(rows, *s)) * 2).astype(np.float32) for s in shapes]
  arrays[-1] = np.abs(arrays[-1]) if name == "cdan_e" else arrays[-1]  # an entropy is >= 0
  mask = _padding_mask(rows, 3, halves, rng)
  padded, real = [_insert(x, mask, rng) for x in arrays], np.flatnonzero(mask)
  argnums = tuple(range(len(arrays)))
  value, grads = _value_and_grad(fn, argnums)(*arrays)
  value_p, grads_p = _value_and_grad(lambda *a: fn(*a, mask=jnp.asarray(mask)), argnums)(*padded)
  np.testing.assert_allclose(value_p, value, rtol=2e-6, atol=1e-7)
  for g, g_p in zip(grads, grads_p):
    np.testing.assert_allclose(np.asarray(g_p)[real], g, rtol=2e-6, atol=1e-7)
    assert np.all(np.asarray(g_p)[~mask] == 0.0)
