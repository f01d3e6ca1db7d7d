"""DomainSpecificBatchNorm against torch.nn.BatchNorm2d/1d, branch isolation and train/eval modes."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dsbn_jax.models.dsbn import DomainSpecificBatchNorm


def _init(layer, x):
  return layer.init(jax.random.key(0), x, domain=0, train=False)


def _randomise(variables, rng):
  """Distinct scale/bias/statistics per branch, so a wrong branch cannot pass by accident."""

  def rand(x, lo, hi):
    return jnp.asarray(rng.uniform(lo, hi, x.shape).astype(np.float32))

  return {
    "params": {
      "scale": rand(variables["params"]["scale"], 0.5, 1.5),
      "bias": rand(variables["params"]["bias"], -0.5, 0.5),
    },
    "batch_stats": {
      "mean": rand(variables["batch_stats"]["mean"], -1, 1),
      "var": rand(variables["batch_stats"]["var"], 0.5, 2.0),
    },
  }


def _torch_bn(variables, d, ndim):
  c = variables["params"]["scale"].shape[1]
  bn = (torch.nn.BatchNorm2d if ndim == 4 else torch.nn.BatchNorm1d)(c)  # eps 1e-5, momentum 0.1
  with torch.no_grad():
    bn.weight.copy_(torch.from_numpy(np.array(variables["params"]["scale"][d])))
    bn.bias.copy_(torch.from_numpy(np.array(variables["params"]["bias"][d])))
    bn.running_mean.copy_(torch.from_numpy(np.array(variables["batch_stats"]["mean"][d])))
    bn.running_var.copy_(torch.from_numpy(np.array(variables["batch_stats"]["var"][d])))
  return bn


def _to_torch(x):
  x = np.asarray(x)
  return torch.from_numpy(x.transpose(0, 3, 1, 2).copy() if x.ndim == 4 else x)


def _from_torch(y):
  y = y.detach().numpy()
  return y.transpose(0, 2, 3, 1) if y.ndim == 4 else y


@pytest.mark.parametrize("shape", [(4, 5, 7, 6), (6, 9)])
@pytest.mark.parametrize("domain", [0, 1, 2])
def test_train_mode_matches_torch_and_touches_one_branch(shape, domain):
  rng = np.random.default_rng(domain)
  layer = DomainSpecificBatchNorm(num_domains=3)
  x = jnp.asarray(rng.normal(2.0, 3.0, shape).astype(np.float32))
  variables = _randomise(_init(layer, x), rng)
  y, updates = layer.apply(variables, x, domain=domain, train=True, mutable=["batch_stats"])

  bn = _torch_bn(variables, domain, len(shape)).train()
  y_ref = _from_torch(bn(_to_torch(x)))
  np.testing.assert_allclose(np.asarray(y), y_ref, atol=1e-5, rtol=1e-5)
  new = updates["batch_stats"]
  np.testing.assert_allclose(new["mean"][domain], bn.running_mean.numpy(), atol=1e-6, rtol=1e-6)
  # torch updates running_var with the unbiased variance; the biased one would fail this.
  np.testing.assert_allclose(new["var"][domain], bn.running_var.numpy(), atol=1e-6, rtol=1e-6)
  for other in set(range(3)) - {domain}:
    for k in ("mean", "var"):
      np.testing.assert_array_equal(new[k][other], variables["batch_stats"][k][other])


@pytest.mark.parametrize("domain", [0, 1])
def test_eval_mode_uses_the_branch_running_statistics(domain):
  rng = np.random.default_rng(7)
  layer = DomainSpecificBatchNorm(num_domains=2)
  x = jnp.asarray(rng.normal(size=(3, 4, 4, 5)).astype(np.float32))
  variables = _randomise(_init(layer, x), rng)
  y = layer.apply(variables, x, domain=domain, train=False)
  bn = _torch_bn(variables, domain, 4).eval()
  np.testing.assert_allclose(np.asarray(y), _from_torch(bn(_to_torch(x))), atol=1e-5, rtol=1e-5)
  y_other = layer.apply(variables, x, domain=1 - domain, train=False)
  assert np.abs(np.asarray(y) - np.asarray(y_other)).max() > 1e-2  # the branches really differ


def test_gradients_reach_only_the_used_branch():
  layer = DomainSpecificBatchNorm(num_domains=2)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 3, 3, 6)).astype(np.float32))
  variables = _randomise(_init(layer, x), np.random.default_rng(1))

  def loss(params):
    y, _ = layer.apply(
      {**variables, "params": params}, x, domain=1, train=True, mutable=["batch_stats"]
    )
    return jnp.sum(y * y)

  g = jax.grad(loss)(variables["params"])
  assert np.all(np.asarray(g["scale"][0]) == 0) and np.all(np.asarray(g["bias"][0]) == 0)
  assert np.all(np.abs(np.asarray(g["scale"][1])) > 0)


def test_single_domain_is_plain_batchnorm_and_init_keeps_statistics():
  layer = DomainSpecificBatchNorm(num_domains=1)
  x = jnp.ones((2, 3, 3, 4)) * 5.0
  variables = layer.init(jax.random.key(0), x, domain=0, train=True)
  assert variables["params"]["scale"].shape == (1, 4)
  np.testing.assert_array_equal(variables["batch_stats"]["mean"], np.zeros((1, 4)))
  np.testing.assert_array_equal(variables["batch_stats"]["var"], np.ones((1, 4)))
  with pytest.raises(ValueError, match="domain=1"):
    layer.apply(variables, x, domain=1, train=False)


def test_bfloat16_compute_keeps_float32_statistics():
  layer = DomainSpecificBatchNorm(num_domains=2, dtype=jnp.bfloat16)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 4, 4, 3)), jnp.bfloat16)
  variables = layer.init(jax.random.key(0), x, domain=0, train=False)
  y, upd = layer.apply(variables, x, domain=0, train=True, mutable=["batch_stats"])
  assert y.dtype == jnp.bfloat16
  assert upd["batch_stats"]["var"].dtype == jnp.float32
  assert variables["params"]["scale"].dtype == jnp.float32


@pytest.mark.parametrize("train", [False, True], ids=["eval", "train"])
def test_bfloat16_normalises_in_float32_and_rounds_once(train):
  """bfloat16 compute against the float32 layer on the same (bfloat16) input: the error is the one
  rounding of y to bfloat16 (2^-8 relative). The former ``x * mul + add`` with ``add = bias -
  mean * mul`` rounded to bfloat16 first shifted each channel by up to |mean / sigma|·|scale|·2^-8
  (channel means ~40 sigma here: ~0.1, far above y's own rounding)."""
  rng = np.random.default_rng(3)
  c = 6
  mean_c = rng.uniform(20.0, 60.0, c)
  x = jnp.asarray(rng.normal(mean_c, 1.0, (32, 4, 4, c)), jnp.bfloat16)
  x32 = x.astype(jnp.float32)
  m, v = np.asarray(x32).reshape(-1, c).mean(0), np.asarray(x32).reshape(-1, c).var(0)
  layer = DomainSpecificBatchNorm(num_domains=1, dtype=jnp.bfloat16)
  variables = {
    "params": {
      "scale": jnp.asarray(rng.uniform(0.5, 1.5, (1, c)), jnp.float32),
      "bias": jnp.asarray(rng.uniform(-0.5, 0.5, (1, c)), jnp.float32),
    },
    "batch_stats": {"mean": jnp.asarray(m[None], jnp.float32), "var": jnp.asarray(v[None])},
  }
  apply = lambda lay, inp: lay.apply(variables, inp, domain=0, train=train, mutable=True)[0]  # noqa: E731
  y_ref = np.asarray(apply(DomainSpecificBatchNorm(num_domains=1), x32))  # float32 layer
  y = apply(layer, x)
  assert y.dtype == jnp.bfloat16
  err = np.abs(np.asarray(y, np.float32) - y_ref)
  bound = 2.0**-8 * np.abs(y_ref) + 1e-4  # one rounding of y (+ float32 cancellation in x*mul+add)
  # The former formula on the same statistics, for the record and to show the bound tells them apart.
  stats = {"mean": m, "var": v} if train else variables["batch_stats"]
  mul = variables["params"]["scale"][0] / np.sqrt(np.asarray(stats["var"]).reshape(-1) + 1e-5)
  add = variables["params"]["bias"][0] - np.asarray(stats["mean"]).reshape(-1) * mul
  bf16 = lambda a: jnp.asarray(a.reshape(1, 1, 1, c), jnp.bfloat16)  # noqa: E731
  y_old = x * bf16(mul) + bf16(add)
  err_old = np.abs(np.asarray(y_old, np.float32) - y_ref)
  print(f"bf16 BN max |error| vs float32: {err.max():.2e} now, {err_old.max():.2e} before")
  assert np.all(err <= bound), err.max()
  assert not np.all(err_old <= bound) and err_old.max() > 10 * err.max()
