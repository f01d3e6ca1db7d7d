"""ResNet-50 in torchvision's exact layout, with every BatchNorm domain-specific; and a small CNN.

Layout = torchvision ``resnet50`` (v1.5): the stride of a bottleneck sits on its 3x3 conv, every conv
has ``bias=False``, and padding is explicit ``(k // 2)`` on both sides. Flax's ``'SAME'`` would pad
stride-2 layers (0, 1) on even inputs where torchvision pads (1, 1), so ported weights would see
shifted windows. Module names mirror torchvision's state_dict keys (``layer1.0.conv1`` ->
``layer1_0/conv1``, ``downsample.0/1`` -> ``downsample_conv/downsample_bn``) so the port is a rename.

Every norm layer -- stem ``bn1``, ``bn1..bn3`` of each block and the downsample BN -- is a
``DomainSpecificBatchNorm`` (DSBN official code, ``resnetdsbn.py``); ``num_domains=1`` is the plain
shared-BN ResNet the ALDA code uses.
"""

import functools
from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

from dsbn_jax.models.conv import Conv
from dsbn_jax.models.dsbn import Domain, DomainSpecificBatchNorm

# torchvision initialises convs with kaiming_normal_(mode='fan_out', nonlinearity='relu'): an
# untruncated normal with std sqrt(2 / fan_out).
conv_init = nn.initializers.variance_scaling(2.0, "fan_out", "normal")


def window_output_size(size: int, kernel: int, stride: int = 1, padding: int = 0) -> int:
  """Pixels along one side out of a convolution or pooling window over ``size`` pixels, padded
  ``padding`` on both sides (XLA's floor rule); 0 when the window does not fit."""
  return max((size + 2 * padding - kernel) // stride + 1, 0)


def min_input_size(backbone: nn.Module, limit: int = 4096) -> int:
  """The smallest square input (pixels per side) ``backbone`` takes: the first size whose last
  feature map (``backbone.output_size``, non-decreasing in the input size) keeps a pixel.

  Below it a model init fails (a zero-sized feature map: a ``ZeroDivisionError`` in the next layer's
  initialiser, or a negative shape). Pure arithmetic, no trace."""
  for size in range(1, limit + 1):
    if backbone.output_size(size) >= 1:
      return size
  raise ValueError(f"{type(backbone).__name__} takes no input of {limit} pixels or fewer")


def _conv(
  features: int, kernel: int, stride: int, name: str, dtype: Any, impl: str = "auto"
) -> Conv:
  # No bias, padding kernel // 2 on both sides, HWIO float32 kernel; impl: see models/conv.py.
  return Conv(
    features,
    kernel,
    stride,
    kernel_init=conv_init,
    dtype=dtype,
    param_dtype=jnp.float32,
    impl=impl,
    name=name,
  )


class Bottleneck(nn.Module):
  """torchvision ``Bottleneck``: 1x1 -> 3x3 (stride) -> 1x1 (x4), projection when shapes change."""

  width: int
  stride: int
  num_domains: int
  dtype: Any = jnp.float32
  conv_impl: str = "auto"  # models/conv.py: 'auto' | 'xla' | 'matmul'

  @nn.compact
  def __call__(self, x, *, domain: Domain, train: bool, mask=None):
    norm = functools.partial(
      DomainSpecificBatchNorm, num_domains=self.num_domains, dtype=self.dtype
    )
    bn = dict(domain=domain, train=train, mask=mask)
    out_features = self.width * 4
    y = _conv(self.width, 1, 1, "conv1", self.dtype, self.conv_impl)(x)
    y = nn.relu(norm(name="bn1")(y, **bn))
    y = _conv(self.width, 3, self.stride, "conv2", self.dtype, self.conv_impl)(y)
    y = nn.relu(norm(name="bn2")(y, **bn))
    y = _conv(out_features, 1, 1, "conv3", self.dtype, self.conv_impl)(y)
    y = norm(name="bn3")(y, **bn)
    if self.stride != 1 or x.shape[-1] != out_features:
      x = _conv(out_features, 1, self.stride, "downsample_conv", self.dtype, self.conv_impl)(x)
      x = norm(name="downsample_bn")(x, **bn)
    return nn.relu(y + x)


class ResNet(nn.Module):
  """Bottleneck ResNet returning the globally average-pooled features (no fc)."""

  STEM = (7, 2)  # conv1: kernel, stride (padding kernel // 2)
  POOL = (3, 2, 1)  # max pool: window, stride, padding

  stage_sizes: Sequence[int]
  num_domains: int = 2
  num_filters: int = 64  # width of the stem and of the first stage's bottlenecks
  dtype: Any = jnp.float32  # compute dtype; params and BN statistics stay float32
  conv_impl: str = "auto"  # convolution form, models/conv.py: 'auto' | 'xla' | 'matmul'

  @nn.compact
  def __call__(self, x_NHWC, *, domain: Domain, train: bool, mask=None):
    """``mask``: bool[N] of the real rows of a padded batch, for every BN (None: all real)."""
    x = x_NHWC.astype(self.dtype)
    x = _conv(self.num_filters, *self.STEM, "conv1", self.dtype, self.conv_impl)(x)
    x = DomainSpecificBatchNorm(self.num_domains, dtype=self.dtype, name="bn1")(
      x, domain=domain, train=train, mask=mask
    )
    x = nn.relu(x)
    # torchvision MaxPool2d(3, 2, padding=1) pads with -inf, on both sides.
    window, stride, pad = self.POOL
    x = nn.max_pool(x, (window, window), strides=(stride, stride), padding=((pad, pad), (pad, pad)))
    for i, n_blocks in enumerate(self.stage_sizes):
      for j in range(n_blocks):
        stride = self._block_stride(i, j)
        x = Bottleneck(
          self.num_filters * 2**i,
          stride,
          self.num_domains,
          self.dtype,
          self.conv_impl,
          name=f"layer{i + 1}_{j}",
        )(x, domain=domain, train=train, mask=mask)
    return jnp.mean(x.astype(jnp.float32), axis=(1, 2))  # adaptive avg-pool to 1x1, flattened

  @staticmethod
  def _block_stride(stage: int, block: int) -> int:
    return 2 if (stage > 0 and block == 0) else 1

  def output_size(self, size: int) -> int:
    """Pixels per side of the last feature map (before the pooling) for a ``size`` input: the
    stem, the max pool, then each block's strided 3x3 (its 1x1 downsample gives the same)."""
    kernel, stride = self.STEM
    size = window_output_size(size, kernel, stride, kernel // 2)
    size = window_output_size(size, *self.POOL)
    for i, n_blocks in enumerate(self.stage_sizes):
      for j in range(n_blocks):
        size = window_output_size(size, 3, self._block_stride(i, j), 1)
    return size


ResNet50 = functools.partial(ResNet, stage_sizes=(3, 4, 6, 3))


class SmallCNN(nn.Module):
  """LeNet-like CNN for 32x32 digits, every norm layer domain-specific.

  conv5x5(32) -> BN -> ReLU -> maxpool2 -> conv5x5(64) -> BN -> ReLU -> maxpool2 -> fc(feature_dim)
  -> BN -> ReLU, with BN after every layer so that DSBN has something to specialise. This network
  is ours, for our Digits -> Digits-M benchmark: ALDA's digits nets are different (``network.py``
  ``USPS_EnsembNet``, 256-d features, and ``SVHN_EnsembNet``, 128-d; docs/reference.md §9).
  """

  num_domains: int = 2
  feature_dim: int = 500
  widths: Sequence[int] = (32, 64)
  dtype: Any = jnp.float32

  KERNEL = 5  # each conv's window (no padding)
  POOL = 2  # each max pool's window and stride

  @nn.compact
  def __call__(self, x_NHWC, *, domain: Domain, train: bool, mask=None):
    """``mask``: bool[N] of the real rows of a padded batch, for every BN (None: all real)."""
    norm = functools.partial(
      DomainSpecificBatchNorm, num_domains=self.num_domains, dtype=self.dtype
    )
    bn = dict(domain=domain, train=train, mask=mask)
    x = x_NHWC.astype(self.dtype)
    for i, w in enumerate(self.widths):
      k, p = self.KERNEL, self.POOL
      x = nn.Conv(w, (k, k), padding="VALID", dtype=self.dtype, name=f"conv{i + 1}")(x)
      x = nn.relu(norm(name=f"bn{i + 1}")(x, **bn))
      x = nn.max_pool(x, (p, p), strides=(p, p))
    x = x.reshape((x.shape[0], -1))
    x = nn.Dense(self.feature_dim, dtype=self.dtype, name="fc")(x)
    x = nn.relu(norm(name="bn_fc")(x, **bn))
    return x.astype(jnp.float32)

  def output_size(self, size: int) -> int:
    """Pixels per side of the last feature map (what ``fc`` flattens) for a ``size`` input."""
    for _ in self.widths:
      size = window_output_size(size, self.KERNEL)
      size = window_output_size(size, self.POOL, self.POOL)
    return size
