"""The CPU convolution forms (models/conv.py) against the plain convolution, and the param tree.

Every form ``conv.Conv`` can route a ResNet convolution to must give the values and the gradients
(w.r.t. input and kernel) of ``lax.conv_general_dilated`` with torchvision padding: 1x1 at
stride 1 and 2 (even and odd inputs) as a matmul, float32 and bfloat16 compute. And replacing
``nn.Conv`` must not change the params: same tree, shapes, dtypes and initial values.
"""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dsbn_jax.errors import UserError
from dsbn_jax.models import conv, resnet

# float32: both sides sum the same products in (possibly) different orders; values are O(1).
# bfloat16: inputs are rounded to bf16 first, so both sides see the same operands; what differs is
# the rounding of the bf16 results (8 bits of mantissa: relative 2^-8 ~ 4e-3) and the accumulation
# order, hence 2e-2 relative to the largest magnitude.
TOL = {jnp.float32: 1e-5, jnp.bfloat16: 2e-2}


def _reference(x_NHWC, kernel_HWIO, stride):
  pad = kernel_HWIO.shape[0] // 2
  return jax.lax.conv_general_dilated(
    x_NHWC,
    kernel_HWIO,
    (stride, stride),
    ((pad, pad), (pad, pad)),
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
  )


def _close(a, b, dtype):
  a, b = np.asarray(a, np.float32), np.asarray(b, np.float32)
  assert a.shape == b.shape and a.dtype == b.dtype
  scale = max(1.0, float(np.abs(b).max())) if dtype == jnp.bfloat16 else 1.0
  np.testing.assert_allclose(a, b, rtol=0, atol=TOL[dtype] * scale)


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("size, stride", [(6, 1), (5, 1), (6, 2), (7, 2)])
def test_1x1_matmul_matches_conv_in_value_and_grad(size, stride, dtype):
  rng = np.random.default_rng(size * 10 + stride)
  # Small integers / 4 are exact in bf16 and keep float32 sums exact up to the order of additions.
  x = jnp.asarray(rng.integers(-4, 5, (2, size, size, 5)) / 4, dtype)
  kernel = jnp.asarray(rng.integers(-4, 5, (1, 1, 5, 3)) / 4, dtype)
  out_size = (size - 1) // stride + 1
  g = jnp.asarray(rng.normal(size=(2, out_size, out_size, 3)), dtype)

  def loss(fn):
    return lambda x_, k_: jnp.sum(fn(x_, k_, stride).astype(jnp.float32) * g.astype(jnp.float32))

  y = conv.conv_1x1_matmul(x, kernel, stride)
  _close(y, _reference(x, kernel, stride), dtype)
  grads = jax.grad(loss(conv.conv_1x1_matmul), argnums=(0, 1))(x, kernel)
  ref_grads = jax.grad(loss(_reference), argnums=(0, 1))(x, kernel)
  for got, want in zip(grads, ref_grads):
    _close(got, want, dtype)


@pytest.mark.parametrize("kernel_size, stride", [(1, 1), (1, 2), (3, 1), (3, 2), (7, 2)])
def test_every_impl_of_the_module_matches_the_plain_conv(kernel_size, stride):
  rng = np.random.default_rng(kernel_size + stride)
  x = jnp.asarray(rng.normal(size=(2, 9, 9, 4)), jnp.float32)
  kernel = jnp.asarray(rng.normal(size=(kernel_size, kernel_size, 4, 6)) / kernel_size, jnp.float32)
  want = _reference(x, kernel, stride)
  for impl in conv.IMPLS:
    module = conv.Conv(6, kernel_size, stride, dtype=jnp.float32, impl=impl)
    got = module.apply({"params": {"kernel": kernel}}, x)
    _close(got, want, jnp.float32)


def test_auto_uses_the_matmul_only_for_1x1_on_cpu():
  assert conv.uses_matmul(1, "auto", "cpu") and conv.uses_matmul(1, "matmul", "gpu")
  assert not conv.uses_matmul(1, "auto", "gpu") and not conv.uses_matmul(1, "auto", "tpu")
  assert not conv.uses_matmul(1, "xla", "cpu") and not conv.uses_matmul(3, "matmul", "cpu")
  with pytest.raises(UserError, match="model.conv_impl"):
    conv.uses_matmul(1, "cudnn", "cpu")


def _old_conv(features, kernel, stride, name, dtype, impl="auto"):
  """``resnet._conv`` as it was before models/conv.py: a configured ``nn.Conv``."""
  del impl
  pad = kernel // 2
  return nn.Conv(
    features,
    (kernel, kernel),
    strides=(stride, stride),
    padding=((pad, pad), (pad, pad)),
    use_bias=False,
    kernel_init=resnet.conv_init,
    dtype=dtype,
    param_dtype=jnp.float32,
    name=name,
  )


def _shapes(model, x):
  return jax.eval_shape(lambda: model.init(jax.random.key(0), x, domain=0, train=False))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_resnet50_param_tree_is_the_nn_conv_one(monkeypatch, dtype):
  model = resnet.ResNet50(num_domains=2, dtype=dtype)
  x = jnp.zeros((1, 64, 64, 3))
  new = _shapes(model, x)
  monkeypatch.setattr(resnet, "_conv", _old_conv)
  old = _shapes(model, x)
  assert jax.tree.structure(new) == jax.tree.structure(old)
  pairs = zip(jax.tree.leaves_with_path(new), jax.tree.leaves(old))
  assert all(a.shape == b.shape and a.dtype == b.dtype for (_, a), b in pairs)
  assert new["params"]["layer2_0"]["downsample_conv"]["kernel"].shape == (1, 1, 256, 512)
  assert new["params"]["conv1"]["kernel"].dtype == jnp.float32


def test_bottleneck_init_values_and_outputs_equal_nn_conv(monkeypatch):
  # A stride-2 block has every 1x1 kind (stride 1, the stride-2 downsample) and a 3x3.
  model = resnet.Bottleneck(width=2, stride=2, num_domains=2, conv_impl="matmul")
  x = jnp.asarray(np.random.default_rng(0).normal(size=(2, 7, 7, 4)), jnp.float32)

  def init_and_apply():
    variables = model.init(jax.random.key(0), x, domain=0, train=False)
    return variables, model.apply(variables, x, domain=1, train=False)

  new, feats = jax.jit(init_and_apply)()
  monkeypatch.setattr(resnet, "_conv", _old_conv)
  old, old_feats = jax.jit(init_and_apply)()
  jax.tree.map(np.testing.assert_array_equal, new, old)
  np.testing.assert_allclose(feats, old_feats, rtol=0, atol=1e-5)
