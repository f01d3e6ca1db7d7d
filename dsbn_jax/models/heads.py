"""The heads on top of the backbone, the discriminator, and the full model assembled from a config.

What each method needs (its discriminator, its BN branches) is ``methods.METHODS``; the pretrained
backbone is loaded by ``torchvision_port.load_pretrained_backbone``.

Reference (official ALDA ``network.py``; docs/reference.md §4):
- ``ResNetFc``: backbone -> bottleneck ``Linear(2048, 512)`` (no BN, no ReLU, no dropout) ->
  classifier ``Linear(512, K)``. The bottleneck output is what both the classifier and D see.
- ``Multi_AdversarialNetwork(512, 1024, K)``: Linear -> ReLU -> Dropout(0.5), twice, then
  ``Linear(1024, K)``, raw logits (ALDA). DANN's ``AdversarialNetwork`` is the same with one output
  (its final sigmoid lives in ``losses.dann_loss``).
- ``init_weights``: every Linear is ``xavier_normal_`` (an *untruncated* normal with std
  sqrt(2 / (fan_in + fan_out))) with zero bias. Flax's ``glorot_normal`` is truncated, hence
  ``variance_scaling(1, 'fan_avg', 'normal')`` (docs/reference.md §4).

The gradient reversal layer that the reference puts inside D's forward lives in the train step
(its coefficient depends on the step), so ``Discriminator`` is a plain MLP.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from dsbn_jax import methods
from dsbn_jax.errors import UserError
from dsbn_jax.models import resnet
from dsbn_jax.models.dsbn import Domain

xavier_normal = nn.initializers.variance_scaling(1.0, "fan_avg", "normal")

BACKBONES = ("resnet50", "resnet", "small_cnn")  # model.backbone
DTYPES = ("float32", "bfloat16")  # model.dtype: compute dtype (params and BN stats stay float32)


def _dense(features: int, name: str, dtype: Any) -> nn.Dense:
  return nn.Dense(
    features,
    kernel_init=xavier_normal,
    bias_init=nn.initializers.zeros,
    dtype=dtype,
    param_dtype=jnp.float32,
    name=name,
  )


class Discriminator(nn.Module):
  """ALDA's ``Multi_AdversarialNetwork`` (``num_outputs=K``) or DANN's D (``num_outputs=1``)."""

  num_outputs: int
  hidden_dim: int = 1024
  dropout_rate: float = 0.5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, feat_NxF, *, train: bool, mask=None):
    """``mask``: bool[N] of the real rows of a padded batch (None: all real). D is row-wise but
    for its dropout, drawn per position: the real rows go first, in order, so that each draws the
    numbers it draws in the unpadded batch (threefry with ``jax_threefry_partitionable``, JAX's
    default: a position's numbers do not depend on the leading dimension), then back in place."""
    x = feat_NxF.astype(self.dtype)
    order = None
    if mask is not None and train and self.dropout_rate:
      order = jnp.argsort(jnp.logical_not(mask).astype(jnp.int32), stable=True)
      x = x[order]
    for i in (1, 2):
      x = nn.relu(_dense(self.hidden_dim, f"ad_layer{i}", self.dtype)(x))
      # One D forward per step over [source; target] -> one dropout mask shared by all its losses.
      x = nn.Dropout(self.dropout_rate, deterministic=not train)(x)
    logits = _dense(self.num_outputs, "ad_layer3", self.dtype)(x).astype(jnp.float32)
    return logits if order is None else logits[jnp.argsort(order)]


class AdaptationNet(nn.Module):
  """Backbone (G) + bottleneck + classifier (C), and the discriminator D as a second method.

  ``__call__`` returns ``(feat_NxF, logits_NxK)`` with F = bottleneck_dim (or the backbone's width
  when there is no bottleneck); ``discriminate`` maps features to D's raw logits. Top-level param
  names (``backbone``, ``bottleneck``, ``classifier``, ``disc``) are the optimizer's groups.
  """

  backbone: nn.Module
  num_classes: int
  bottleneck_dim: int = 512  # 0 = no bottleneck: the classifier and D see the backbone features
  disc_outputs: int = 0  # 0 = no discriminator (source_only)
  disc_hidden_dim: int = 1024
  dropout_rate: float = 0.5
  dtype: Any = jnp.float32

  def setup(self):
    if self.bottleneck_dim:
      self.bottleneck = _dense(self.bottleneck_dim, "bottleneck", self.dtype)
    self.classifier = _dense(self.num_classes, "classifier", self.dtype)
    if self.disc_outputs:
      self.disc = Discriminator(
        self.disc_outputs, self.disc_hidden_dim, self.dropout_rate, self.dtype
      )

  def __call__(self, x_NHWC, *, domain: Domain, train: bool, mask=None):
    """``mask``: bool[N] of the real rows of a padded batch (None: all), for the backbone's BN
    statistics; the heads are row-wise."""
    feat = self.backbone(x_NHWC, domain=domain, train=train, mask=mask)
    if self.bottleneck_dim:
      feat = self.bottleneck(feat.astype(self.dtype)).astype(jnp.float32)
    logits = self.classifier(feat.astype(self.dtype)).astype(jnp.float32)
    return feat, logits

  def discriminate(self, feat_NxF, *, train: bool, mask=None):
    return self.disc(feat_NxF, train=train, mask=mask)

  def init_all(self, x_NHWC):
    """Touches every submodule (``model.init(..., method='init_all')``)."""
    feat, logits = self(x_NHWC, domain=0, train=False)
    if self.disc_outputs:
      self.discriminate(feat, train=False)
    return logits


def _backbone(model_cfg, num_domains: int, dtype: Any) -> nn.Module:
  name = model_cfg.backbone
  conv_impl = model_cfg.get("conv_impl", "auto")  # absent from configs saved before the field
  if name == "resnet50":
    return resnet.ResNet50(num_domains=num_domains, dtype=dtype, conv_impl=conv_impl)
  if name == "resnet":
    return resnet.ResNet(
      stage_sizes=tuple(model_cfg.stage_sizes),
      num_domains=num_domains,
      num_filters=model_cfg.num_filters,
      dtype=dtype,
      conv_impl=conv_impl,
    )
  if name == "small_cnn":
    return resnet.SmallCNN(num_domains=num_domains, feature_dim=model_cfg.feature_dim, dtype=dtype)
  raise UserError(
    f"unknown backbone {name!r} (config field model.backbone); valid: {', '.join(BACKBONES)}"
  )


def min_input_size(model_cfg) -> int:
  """The smallest square input (pixels per side) the backbone of ``model_cfg`` takes
  (``resnet.min_input_size``); the heads read pooled features, so any backbone output fits them."""
  return resnet.min_input_size(_backbone(model_cfg, 1, jnp.float32))


def create_model(config) -> AdaptationNet:
  """The full model for ``config.method`` and ``config.model`` (``config_defaults.py``)."""
  spec = methods.method_spec(config.method)
  m = config.model
  dtype = jnp.dtype(m.dtype)
  disc_outputs = {"none": 0, "dann": 1, "alda": m.num_classes}[spec.adversary]
  return AdaptationNet(
    backbone=_backbone(m, spec.num_domains, dtype),
    num_classes=m.num_classes,
    bottleneck_dim=m.bottleneck_dim,
    disc_outputs=disc_outputs,
    disc_hidden_dim=m.disc_hidden_dim,
    dropout_rate=m.dropout_rate,
    dtype=dtype,
  )
