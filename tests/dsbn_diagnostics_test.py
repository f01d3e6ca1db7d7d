"""benchmarks/dsbn_diagnostics.py: batch statistics read back from the DSBN running update."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from benchmarks import dsbn_diagnostics as diag
from dsbn_jax.models import resnet
from dsbn_jax.models.dsbn import DomainSpecificBatchNorm


def test_batch_stat_from_update_matches_direct_statistics():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(1.5, 2.0, (6, 5, 5, 3)).astype(np.float32))
  layer = DomainSpecificBatchNorm(num_domains=2)
  variables = layer.init(jax.random.key(0), x, domain=0, train=False)
  stats = {
    "mean": jnp.asarray(rng.uniform(-1, 1, (2, 3)).astype(np.float32)),
    "var": jnp.asarray(rng.uniform(0.5, 2, (2, 3)).astype(np.float32)),
  }
  _, upd = layer.apply(
    {"params": variables["params"], "batch_stats": stats},
    x,
    domain=1,
    train=True,
    mutable=["batch_stats"],
  )
  x64 = np.asarray(x, np.float64).reshape(-1, 3)
  new = upd["batch_stats"]
  for k, direct in (("mean", x64.mean(0)), ("var", x64.var(0, ddof=1))):
    got = diag.batch_stat_from_update(stats[k][1], new[k][1], layer.momentum)
    np.testing.assert_allclose(got, direct, rtol=1e-5)  # digits cancel with old != 0
    np.testing.assert_array_equal(new[k][0], stats[k][0])  # the other branch is untouched


def test_exact_statistics_in_layer_order_and_exact():
  model = resnet.SmallCNN(num_domains=2, feature_dim=8, widths=(4, 6))
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.normal(0.3, 1.0, (5, 16, 16, 3)).astype(np.float32))
  variables = jax.jit(lambda x: model.init(jax.random.key(0), x, domain=0, train=False))(x)
  variables = {
    "params": variables["params"],
    "batch_stats": jax.tree.map(lambda v: v + 0.5, variables["batch_stats"]),
  }
  layers = diag.exact_statistics(model, variables, x, domain=1)
  assert [l["path"] for l in layers] == [("bn1",), ("bn2",), ("bn_fc",)]
  assert [l["n"] for l in layers] == [5 * 12 * 12, 5 * 2 * 2, 5]

  direct = {}

  def record(next_fun, args, kwargs, context):  # the input each BN layer normalises
    if isinstance(context.module, DomainSpecificBatchNorm):
      v = np.asarray(args[0], np.float64).reshape(-1, args[0].shape[-1])
      direct[context.module.name] = (v.mean(0), v.var(0, ddof=1))
    return next_fun(*args, **kwargs)

  with nn.intercept_methods(record):
    model.apply(variables, x, domain=1, train=True, mutable=["batch_stats"])
  for l in layers:
    mean, var = direct[l["path"][-1]]
    np.testing.assert_allclose(l["mean"], mean, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(l["var"], var, rtol=1e-5)

  replaced = diag.with_statistics(variables["batch_stats"], layers, domain=1)
  np.testing.assert_allclose(replaced["bn2"]["var"][1], direct["bn2"][1], rtol=1e-5)
  np.testing.assert_array_equal(
    replaced["bn2"]["var"][0], variables["batch_stats"]["bn2"]["var"][0]
  )


def test_relative_distance_and_mix_weight():
  src, tgt = np.array([2.0, 0.0]), np.array([0.0, 1.0])
  assert diag.relative_distance(src, tgt) == np.sqrt(5.0)
  assert abs(diag.mix_weight(0.25 * src + 0.75 * tgt, src, tgt) - 0.25) < 1e-12
