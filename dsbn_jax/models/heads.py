"""The heads on top of the backbone, the discriminators, and the full model assembled from a config.

What the config's method needs (its discriminator and what it reads, its BN branches) is
``methods.resolve(config)``; the pretrained backbone is loaded by
``torchvision_port.load_pretrained_backbone``.

Reference (official ALDA ``network.py``; docs/reference.md §4):
- ``ResNetFc``: backbone -> bottleneck ``Linear(2048, 512)`` (no BN, no ReLU, no dropout) ->
  classifier ``Linear(512, K)``. The bottleneck output is what both the classifier and D see.
- ``Multi_AdversarialNetwork(512, 1024, K)``: Linear -> ReLU -> Dropout(0.5), twice, then
  ``Linear(1024, K)``, raw logits (ALDA). DANN's ``AdversarialNetwork`` is the same with one output
  (its final sigmoid lives in ``losses.dann_loss``), and so is CDAN's (thuml/CDAN ``network.py``),
  on a wider input (the multilinear map, K·F, or the randomized map, d = 1024); MADA's K
  class-wise discriminators are K of DANN's, here vectorised (``ClasswiseDiscriminator``).
- ``init_weights``: every Linear is ``xavier_normal_`` (an *untruncated* normal with std
  sqrt(2 / (fan_in + fan_out))) with zero bias. Flax's ``glorot_normal`` is truncated, hence
  ``variance_scaling(1, 'fan_avg', 'normal')`` (docs/reference.md §4).

The gradient reversal layer that the reference puts inside D's forward lives in the method's loss
(its coefficient depends on the step), so the discriminators are plain MLPs.
"""

from typing import Any

import flax.linen as nn
import jax
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


class ClasswiseDiscriminator(nn.Module):
  """MADA's K class-wise discriminators D_k, each DANN's 1-logit ``Discriminator``, vectorised:
  their params stacked on a leading K axis (``d_k/ad_layer1/kernel``: [K, F, hidden]), one batched
  matmul per layer. D_k reads column k of ``x_NxKxF`` and draws its own dropout masks (its own
  key), with the padded-row handling of ``Discriminator``. Returns raw logits f32[N, K]."""

  num_classes: int
  hidden_dim: int = 1024
  dropout_rate: float = 0.5
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x_NxKxF, *, train: bool, mask=None):
    def one(disc, x_NxF, mask_N):  # D_k on its rows (lifted vmap passes no keyword arguments)
      return disc(x_NxF, train=train, mask=mask_N)[:, 0]

    stacked = nn.vmap(
      one,
      variable_axes={"params": 0},
      split_rngs={"params": True, "dropout": True},
      in_axes=(1, None),
      out_axes=1,
      axis_size=self.num_classes,
    )
    disc = Discriminator(1, self.hidden_dim, self.dropout_rate, self.dtype, name="d_k")
    return stacked(disc, x_NxKxF, mask)


class RandomMatrices(nn.Module):
  """CDAN's ``RandomLayer`` matrices R_f f32[F, d] and R_g f32[K, d], entries N(0, 1), drawn once
  at init from the params rng. Constants: returned through ``stop_gradient``, and their optimizer
  group ('frozen', ``optim.py``) neither moves nor decays them; they live in ``params`` so that
  checkpoints, restores, sharding and ``predict`` carry them with no code of their own."""

  num_classes: int
  dim: int = 1024

  @nn.compact
  def __call__(self, feat_dim: int):
    normal = nn.initializers.normal(stddev=1.0)
    r_f = self.param("r_f", normal, (feat_dim, self.dim), jnp.float32)
    r_g = self.param("r_g", normal, (self.num_classes, self.dim), jnp.float32)
    return jax.lax.stop_gradient(r_f), jax.lax.stop_gradient(r_g)


class AdaptationNet(nn.Module):
  """Backbone (G) + bottleneck + classifier (C), and the discriminator D as a second method.

  ``__call__`` returns ``(feat_NxF, logits_NxK)`` with F = bottleneck_dim (or the backbone's width
  when there is no bottleneck); ``discriminate`` maps D's input to its raw logits;
  ``random_matrices`` gives CDAN's fixed matrices. Top-level param names (``backbone``,
  ``bottleneck``, ``classifier``, ``disc``, ``random_map``) are the optimizer's groups.
  """

  backbone: nn.Module
  num_classes: int
  bottleneck_dim: int = 512  # 0 = no bottleneck: the classifier and D see the backbone features
  discriminator: str = "none"  # methods.DISCRIMINATORS: 'none' (source_only), 'dann', 'alda', ...
  disc_input: str = "features"  # methods.DISC_INPUTS: what ``discriminate`` is given
  disc_hidden_dim: int = 1024
  dropout_rate: float = 0.5
  random_dim: int = 1024  # d of disc_input='random' (CDAN's RandomLayer width)
  dtype: Any = jnp.float32

  def setup(self):
    if self.bottleneck_dim:
      self.bottleneck = _dense(self.bottleneck_dim, "bottleneck", self.dtype)
    self.classifier = _dense(self.num_classes, "classifier", self.dtype)
    d = (self.disc_hidden_dim, self.dropout_rate, self.dtype)
    if self.discriminator == "mada":
      self.disc = ClasswiseDiscriminator(self.num_classes, *d)
    elif self.discriminator != "none":
      self.disc = Discriminator({"dann": 1, "alda": self.num_classes}[self.discriminator], *d)
    if self.disc_input == "random":
      self.random_map = RandomMatrices(self.num_classes, self.random_dim)

  def __call__(self, x_NHWC, *, domain: Domain, train: bool, mask=None):
    """``mask``: bool[N] of the real rows of a padded batch (None: all), for the backbone's BN
    statistics; the heads are row-wise."""
    feat = self.backbone(x_NHWC, domain=domain, train=train, mask=mask)
    if self.bottleneck_dim:
      feat = self.bottleneck(feat.astype(self.dtype)).astype(jnp.float32)
    logits = self.classifier(feat.astype(self.dtype)).astype(jnp.float32)
    return feat, logits

  def discriminate(self, x, *, train: bool, mask=None):
    """D's raw logits: f32[N, 1] ('dann'), f32[N, K] ('alda'; 'mada', from x f32[N, K, F])."""
    return self.disc(x, train=train, mask=mask)

  def random_matrices(self, feat_dim: int):
    """``(R_f, R_g)`` of disc_input='random', constants (``RandomMatrices``)."""
    return self.random_map(feat_dim)

  def init_all(self, x_NHWC):
    """Touches every submodule (``model.init(..., method='init_all')``)."""
    feat, logits = self(x_NHWC, domain=0, train=False)
    if self.disc_input == "random":
      self.random_matrices(feat.shape[-1])
    if self.discriminator != "none":
      n, f = feat.shape
      shape = {  # D's input for disc_input (the values do not matter to the init)
        "multilinear": (n, self.num_classes * f),
        "random": (n, self.random_dim),
        "classwise": (n, self.num_classes, f),
      }.get(self.disc_input)
      self.discriminate(feat if shape is None else jnp.zeros(shape, feat.dtype), train=False)
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
  """The full model for the config's method and BN (``methods.resolve``) and ``config.model``
  (``config_defaults.py``)."""
  method = methods.resolve(config)
  m = config.model
  dtype = jnp.dtype(m.dtype)
  return AdaptationNet(
    backbone=_backbone(m, method.num_domains, dtype),
    num_classes=m.num_classes,
    bottleneck_dim=m.bottleneck_dim,
    discriminator=method.spec.discriminator,
    disc_input=method.spec.disc_input,
    disc_hidden_dim=m.disc_hidden_dim,
    dropout_rate=m.dropout_rate,
    random_dim=m.get("random_dim", 1024),  # absent from configs saved before the field
    dtype=dtype,
  )
