"""Heads, discriminator and model assembly: reference structure, init and forward."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from flax import traverse_util

from dsbn_jax import config_defaults
from dsbn_jax.errors import UserError
from dsbn_jax.models import heads
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
