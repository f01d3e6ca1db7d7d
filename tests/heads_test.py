"""Heads, discriminator and model assembly: reference structure, init and forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util

from dsbn_jax import config_defaults
from dsbn_jax.errors import UserError
from dsbn_jax.models import heads, resnet
from tests import torch_reference as ref


def _config(method="alda_dsbn", **model):
  cfg = config_defaults.get_config()
  cfg.method = method
  cfg.model.update(model)
  return cfg


def _shapes(cfg, size=64):
  model = heads.create_model(cfg)
  shapes = jax.eval_shape(
    lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), method="init_all")
  )
  return {"/".join(k): v.shape for k, v in traverse_util.flatten_dict(shapes["params"]).items()}


@pytest.mark.parametrize(
  "method,num_domains,disc_out",
  [
    ("alda_dsbn", 2, 65),
    ("alda", 1, 65),
    ("dann_dsbn", 2, 1),
    ("dann", 1, 1),
    ("source_only", 1, None),
  ],
)
def test_resnet50_model_structure_per_method(method, num_domains, disc_out):
  """ResNetFc: 2048 -> 512 bottleneck -> K; D 512 -> 1024 -> 1024 -> K (ALDA) or 1 (DANN)."""
  shapes = _shapes(_config(method))
  assert shapes["bottleneck/kernel"] == (2048, 512) and shapes["bottleneck/bias"] == (512,)
  assert shapes["classifier/kernel"] == (512, 65)
  assert shapes["backbone/bn1/scale"] == (num_domains, 64)
  assert shapes["backbone/layer4_2/bn3/scale"] == (num_domains, 2048)
  disc = {k: v for k, v in shapes.items() if k.startswith("disc/")}
  if disc_out is None:
    assert not disc
  else:
    assert disc == {
      "disc/ad_layer1/kernel": (512, 1024),
      "disc/ad_layer1/bias": (1024,),
      "disc/ad_layer2/kernel": (1024, 1024),
      "disc/ad_layer2/bias": (1024,),
      "disc/ad_layer3/kernel": (1024, disc_out),
      "disc/ad_layer3/bias": (disc_out,),
    }


def test_no_bottleneck_feeds_backbone_features_to_classifier_and_disc():
  shapes = _shapes(
    _config(
      backbone="small_cnn", feature_dim=40, bottleneck_dim=0, num_classes=10, disc_hidden_dim=8
    ),
    size=28,
  )
  assert "bottleneck/kernel" not in shapes
  assert shapes["classifier/kernel"] == (40, 10)
  assert shapes["disc/ad_layer1/kernel"] == (40, 8)


def test_dense_init_is_untruncated_xavier_normal_with_zero_bias():
  """torch ``xavier_normal_``: N(0, 2 / (fan_in + fan_out)), no truncation (flax's glorot is)."""
  disc = heads.Discriminator(num_outputs=31, hidden_dim=1024)
  params = disc.init(jax.random.key(0), jnp.zeros((1, 512)), train=False)["params"]
  w = np.asarray(params["ad_layer1"]["kernel"])  # 512 x 1024
  std = np.sqrt(2.0 / (512 + 1024))
  torch_w = torch.nn.init.xavier_normal_(torch.empty(1024, 512)).numpy()
  assert abs(w.std() / std - 1) < 0.01 and abs(torch_w.std() / std - 1) < 0.01
  assert abs(w.mean()) < 0.01 * std
  # A normal truncated at 2 std never exceeds it; 524k untruncated draws reach ~4.5 std.
  assert np.abs(w).max() > 3.5 * std and np.abs(torch_w).max() > 3.5 * std
  for layer in params.values():
    assert np.all(np.asarray(layer["bias"]) == 0)


def test_discriminator_forward_matches_torch_and_dropout_needs_train():
  k = 7
  disc = heads.Discriminator(num_outputs=k, hidden_dim=32, dropout_rate=0.5)
  x = np.random.default_rng(0).normal(size=(6, 16)).astype(np.float32)
  torch_disc = ref.AdversarialNetwork(16, 32, k)
  # Export D alone (an empty module stands in for G+C): keys ('params', 'disc', layer, name).
  flat = {key[2:]: jnp.asarray(v) for key, v in ref.to_flax(torch.nn.Module(), torch_disc).items()}
  shapes = jax.eval_shape(lambda: disc.init(jax.random.key(1), x, train=False))["params"]
  assert flat.keys() == traverse_util.flatten_dict(shapes).keys()
  variables = {"params": traverse_util.unflatten_dict(flat)}
  with torch.no_grad():
    want = torch_disc.eval()(torch.from_numpy(x)).numpy()
  np.testing.assert_allclose(disc.apply(variables, x, train=False), want, atol=1e-5)
  dropped = disc.apply(variables, x, train=True, rngs={"dropout": jax.random.key(2)})
  assert np.abs(np.asarray(dropped) - want).max() > 1e-3  # dropout active in training only


def test_unknown_method_and_backbone_are_user_errors():
  with pytest.raises(UserError, match="alda_dsbn"):
    heads.create_model(_config(method="alda_bn"))
  with pytest.raises(UserError, match="small_cnn"):
    heads.create_model(_config(backbone="vgg16"))


# ------------------------------------------------- the discriminator kinds of the other methods
K, F, HIDDEN = 65, 512, 1024  # Office-Home's classes, the bottleneck width, D's width


def _net(discriminator, disc_input):
  """AdaptationNet at full head size (K=65, F=512) on a small backbone: the heads do not care."""
  return heads.AdaptationNet(
    backbone=resnet.SmallCNN(num_domains=1, feature_dim=40),
    num_classes=K,
    bottleneck_dim=F,
    discriminator=discriminator,
    disc_input=disc_input,
  )


@pytest.mark.parametrize(
  "discriminator, disc_input, x_shape, out_shape, layer1",
  [
    ("dann", "features", (6, F), (6, 1), (F, HIDDEN)),
    ("alda", "features", (6, F), (6, K), (F, HIDDEN)),
    ("dann", "multilinear", (6, K * F), (6, 1), (K * F, HIDDEN)),  # CDAN's vec(g ⊗ f)
    ("dann", "random", (6, 1024), (6, 1), (1024, HIDDEN)),  # CDAN's randomized map, d = 1024
    ("mada", "classwise", (6, K, F), (6, K), (K, F, HIDDEN)),  # K stacked D_k
  ],
)
def test_discriminator_kinds_shapes_at_full_size(
  discriminator, disc_input, x_shape, out_shape, layer1
):
  """Every D kind is Linear -> ReLU -> Dropout, twice (hidden 1024), then its logits; CDAN's random
  matrices R_f [F, d], R_g [K, d] sit in params (their own optimizer group)."""
  net = _net(discriminator, disc_input)
  variables = jax.eval_shape(
    lambda: net.init(jax.random.key(0), jnp.zeros((1, 28, 28, 3)), method="init_all")
  )
  shapes = {
    "/".join(k): v.shape for k, v in traverse_util.flatten_dict(variables["params"]).items()
  }
  disc = {
    k.removeprefix("disc/").removeprefix("d_k/"): v for k, v in shapes.items() if "disc/" in k
  }
  stack = layer1[:1] if discriminator == "mada" else ()
  outputs = 1 if discriminator in ("dann", "mada") else K
  assert disc == {
    "ad_layer1/kernel": layer1,
    "ad_layer1/bias": (*stack, HIDDEN),
    "ad_layer2/kernel": (*stack, HIDDEN, HIDDEN),
    "ad_layer2/bias": (*stack, HIDDEN),
    "ad_layer3/kernel": (*stack, HIDDEN, outputs),
    "ad_layer3/bias": (*stack, outputs),
  }
  random = {k: v for k, v in shapes.items() if k.startswith("random_map/")}
  want = {"random_map/r_f": (F, 1024), "random_map/r_g": (K, 1024)}
  assert random == (want if disc_input == "random" else {})
  out = jax.eval_shape(
    lambda v, x: net.apply(
      v, x, train=True, method="discriminate", rngs={"dropout": jax.random.key(1)}
    ),
    variables,
    jax.ShapeDtypeStruct(x_shape, jnp.float32),
  )
  assert out.shape == out_shape and out.dtype == jnp.float32


def _classwise(k=4, f=6, hidden=16, dropout_rate=0.5):
  disc = heads.ClasswiseDiscriminator(k, hidden, dropout_rate)
  variables = disc.init(jax.random.key(0), jnp.zeros((1, k, f)), train=False)
  return disc, variables


def test_classwise_discriminator_is_k_separate_discriminators_in_one_batched_matmul():
  """Column k of the vectorised D is ``Discriminator(1)`` with the k-th slice of the stacked
  params, applied to column k of the input; each D_k has its own init and its own dropout key."""
  k, n, f = 4, 7, 6
  disc, variables = _classwise(k, f)
  x = np.random.default_rng(0).normal(size=(n, k, f)).astype(np.float32)
  out = np.asarray(disc.apply(variables, x, train=False))
  one = heads.Discriminator(1, 16, 0.5)
  stacked = variables["params"]["d_k"]
  for j in range(k):
    params_j = jax.tree.map(lambda p, j=j: p[j], stacked)
    want = one.apply({"params": params_j}, x[:, j], train=False)[:, 0]
    np.testing.assert_allclose(out[:, j], want, rtol=1e-6, atol=1e-6)
  kernels = np.asarray(stacked["ad_layer1"]["kernel"])
  assert min(np.abs(kernels[0] - kernels[j]).max() for j in range(1, k)) > 1e-3  # own init each
  jaxpr = str(jax.make_jaxpr(lambda v: disc.apply(v, x, train=False))(variables))
  assert jaxpr.count("dot_general") == 3  # one batched matmul per layer, not one per D_k
  # Identical D_k (the same params) on identical inputs: equal in eval, their own masks in train.
  same = {"params": jax.tree.map(lambda p: jnp.broadcast_to(p[:1], p.shape), stacked)}
  x_same = np.broadcast_to(x[:, :1], x.shape)
  ev = np.asarray(disc.apply({"params": {"d_k": same["params"]}}, x_same, train=False))
  np.testing.assert_array_equal(ev, np.broadcast_to(ev[:, :1], ev.shape))
  tr = np.asarray(
    disc.apply(
      {"params": {"d_k": same["params"]}}, x_same, train=True, rngs={"dropout": jax.random.key(1)}
    )
  )
  assert min(np.abs(tr[:, 0] - tr[:, j]).max() for j in range(1, k)) > 1e-3


def test_classwise_discriminator_dropout_draws_the_unpadded_numbers_for_real_rows():
  """As ``Discriminator``: the real rows of a padded batch draw the dropout masks they draw
  unpadded, in every D_k; the padding rows (garbage) change nothing."""
  k, b, r, f = 3, 5, 8, 6
  disc, variables = _classwise(k, f)
  rng = np.random.default_rng(0)
  x_s, x_t = rng.normal(size=(2, b, k, f)).astype(np.float32)
  garbage = 50.0 * rng.normal(size=(2, r - b, k, f)).astype(np.float32)
  keys = {"dropout": jax.random.key(3)}
  plain = disc.apply(variables, np.concatenate([x_s, x_t]), train=True, rngs=keys)
  mask = np.concatenate([np.ones(b, bool), np.zeros(r - b, bool)] * 2)
  padded_x = np.concatenate([x_s, garbage[0], x_t, garbage[1]])
  padded = disc.apply(variables, padded_x, train=True, rngs=keys, mask=mask)
  np.testing.assert_allclose(np.asarray(padded)[mask], plain, rtol=0, atol=1e-6)
  eval_mode = disc.apply(variables, np.concatenate([x_s, x_t]), train=False)
  assert np.abs(np.asarray(plain) - np.asarray(eval_mode)).max() > 1e-2  # dropout was on


def test_random_matrices_are_standard_normal_constants_with_no_gradient():
  net = _net("dann", "random")
  variables = net.init(jax.random.key(0), jnp.zeros((1, 28, 28, 3)), method="init_all")
  r_f, r_g = net.apply(variables, F, method="random_matrices")
  stored = variables["params"]["random_map"]
  np.testing.assert_array_equal(r_f, stored["r_f"])
  np.testing.assert_array_equal(r_g, stored["r_g"])
  for r in (r_f, r_g):  # N(0, 1) entries (524k and 67k draws)
    assert abs(float(r.mean())) < 0.01 and abs(float(r.std()) - 1) < 0.01
  assert np.abs(np.asarray(r_f) - np.asarray(r_g)[:1]).max() > 1  # drawn apart

  def total(params):
    r_f, r_g = net.apply({"params": params}, F, method="random_matrices")
    return jnp.sum(r_f**2) + jnp.sum(r_g**2)

  grads = jax.grad(total)(variables["params"])["random_map"]
  assert all(float(jnp.abs(g).max()) == 0 for g in jax.tree.leaves(grads))
