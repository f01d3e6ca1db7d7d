"""ResNet-50 structure (via eval_shape) and the small digits CNN."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import traverse_util

from dsbn_jax.models import resnet


def _shapes(model, size=64):
  return jax.eval_shape(
    lambda: model.init(jax.random.key(0), jnp.zeros((1, size, size, 3)), domain=0, train=False)
  )


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


@pytest.mark.parametrize("num_domains, expected", [(1, 23_508_032), (2, 23_561_152)])
def test_resnet50_parameter_count(num_domains, expected):
  # torchvision resnet50: 25,557,032 parameters, minus fc (2048*1000 + 1000) = 23,508,032;
  # each extra domain adds the scale and bias of 53 BN layers = 53,120 values.
  shapes = _shapes(resnet.ResNet50(num_domains=num_domains))
  assert _count(shapes["params"]) == expected


def test_resnet50_has_53_domain_specific_norms_including_downsample():
  flat = traverse_util.flatten_dict(_shapes(resnet.ResNet50(num_domains=2))["batch_stats"])
  norms = {path[:-1] for path in flat}
  assert len(norms) == 53
  assert ("layer1_0", "downsample_bn") in norms and ("bn1",) in norms
  assert all(v.shape[0] == 2 for v in flat.values())


def test_resnet50_feature_shape_for_odd_size():
  out = jax.eval_shape(
    lambda: resnet.ResNet50(num_domains=2).init_with_output(
      jax.random.key(0), jnp.zeros((3, 193, 193, 3)), domain=1, train=False
    )
  )[0]
  assert out.shape == (3, 2048)


def test_stride2_padding_is_torchvision_symmetric():
  # On an even input, torchvision's 3x3/stride-2 conv pads (1, 1); Flax 'SAME' would pad (0, 1) and
  # give a different output. A kernel of ones over an image that is 1 only at (0, 0) sees that pixel
  # from output (0, 0) only with a top/left pad of 1.
  conv = resnet._conv(1, 3, 2, "c", jnp.float32)
  x = jnp.zeros((1, 4, 4, 1)).at[0, 0, 0, 0].set(1.0)
  y = conv.apply({"params": {"kernel": jnp.ones((3, 3, 1, 1))}}, x)
  assert y.shape == (1, 2, 2, 1)
  np.testing.assert_array_equal(np.asarray(y)[0, :, :, 0], [[1, 0], [0, 0]])


def test_small_cnn_shapes_and_branches():
  model = resnet.SmallCNN(num_domains=2, feature_dim=64)
  x = jnp.asarray(np.random.default_rng(0).normal(size=(4, 32, 32, 3)), jnp.float32)
  v = model.init(jax.random.key(0), x, domain=0, train=False)
  feats, upd = model.apply(v, x, domain=1, train=True, mutable=["batch_stats"])
  assert feats.shape == (4, 64)
  flat_new = traverse_util.flatten_dict(upd["batch_stats"])
  flat_old = traverse_util.flatten_dict(v["batch_stats"])
  assert len({p[:-1] for p in flat_new}) == 3
  for k in flat_new:
    np.testing.assert_array_equal(flat_new[k][0], flat_old[k][0])
    assert not np.array_equal(flat_new[k][1], flat_old[k][1])
