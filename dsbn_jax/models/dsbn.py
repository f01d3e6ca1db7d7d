"""Domain-specific batch normalisation (DSBN, Chang et al. CVPR 2019) in Flax linen.

One BatchNorm branch per domain: every branch has its own scale/bias (``params``) and its own running
mean/var (``batch_stats``). The branch is static, chosen per call:
- ``domain=d`` (an int): the batch is single-domain, exactly like the official
  ``_DomainSpecificBatchNorm`` which takes ``domain_label[0]``;
- ``domain=(d_0, ..., d_{G-1})`` (a tuple): a *fused* batch of G single-domain groups whose rows are
  interleaved (row r belongs to group r % G: ``jnp.stack(groups, 1).reshape(-1, ...)``). Each group is
  normalised with its own batch statistics and its own branch ``d_g``, and the running statistics are
  updated group after group: the maths of G sequential calls, one per group (equal within float
  rounding), in one pass. Interleaving keeps a batch sharded on its leading axis sharded the same way.

The branches are stored stacked along a leading axis of size ``num_domains`` (``scale_DxC``); a call
reads and writes only row ``domain``, so the other rows stay bit-identical. ``num_domains=1`` is plain
BatchNorm (the shared-BN baselines).

Numerics follow torch's ``BatchNorm2d`` (docs/reference.md §4), not Flax's ``nn.BatchNorm``:
- ``momentum`` is given in torch's convention: new = (1 - momentum)·old + momentum·batch;
- the running variance is updated with the *unbiased* batch variance (n / (n - 1)), while the
  normalisation itself uses the biased one;
- statistics are computed in float32 with a two-pass variance, whatever the compute dtype, and
  the normalisation too, rounded once to the compute dtype.

A train-mode call may carry a ``mask`` (bool[N]) of the batch's real rows: a batch padded to a
multiple of the device count (``input_pipeline``) normalises with the statistics of its real rows
only, and its running variance uses their count (n / (n - 1), n real rows x pixels), so the result
is that of the unpadded batch; the padding rows are normalised too but reach nothing else.

Under ``jax.jit`` with the batch sharded over a mesh, the means below are over the *global* batch, so
multi-device training is synchronised BN (identical to one device holding the whole batch).
"""

from typing import Any, Sequence

import flax.linen as nn
import jax.numpy as jnp

Domain = int | Sequence[int]  # one branch, or one per interleaved group of a fused batch


class DomainSpecificBatchNorm(nn.Module):
  """BatchNorm with ``num_domains`` independent branches over the last (channel) axis."""

  num_domains: int = 2
  momentum: float = 0.1  # torch convention (Flax's nn.BatchNorm would call this 0.9)
  epsilon: float = 1e-5
  dtype: Any = None  # compute dtype of the output; None = input dtype
  scale_init: Any = nn.initializers.ones
  bias_init: Any = nn.initializers.zeros

  @nn.compact
  def __call__(self, x, *, domain: Domain, train: bool, mask=None):
    """``mask``: bool[N], the batch's real rows (None: all), in train mode the only rows its
    statistics see; the other (padding) rows are normalised with them and otherwise ignored."""
    domains = tuple(domain) if isinstance(domain, (tuple, list)) else (domain,)
    if not domains or not all(0 <= d < self.num_domains for d in domains):
      raise ValueError(f"domain={domain} but this layer has {self.num_domains} domain branch(es)")
    c, g = x.shape[-1], len(domains)
    if x.shape[0] % g:
      raise ValueError(f"a batch of {x.shape[0]} rows cannot hold {g} interleaved domain groups")
    shape_DxC = (self.num_domains, c)
    scale_DxC = self.param("scale", self.scale_init, shape_DxC, jnp.float32)
    bias_DxC = self.param("bias", self.bias_init, shape_DxC, jnp.float32)
    mean_DxC = self.variable("batch_stats", "mean", lambda: jnp.zeros(shape_DxC, jnp.float32))
    var_DxC = self.variable("batch_stats", "var", lambda: jnp.ones(shape_DxC, jnp.float32))

    # One group (a single-domain batch): reduce x itself. G groups: rows as (N/G, G, ...), group g
    # is [:, g], and the statistics are reduced over a (G, N/G, ...) view, group-major like G
    # separate calls' reductions: reducing (N/G, G, ...) over the axes around G sums in another
    # order, which the reference step's gradients (a random-init ResNet-50's, through dozens of
    # train-mode BNs) amplify ~10x. The one-group path is kept op for op as it was before fusing,
    # so that single-domain runs reproduce earlier results bit for bit.
    if g == 1:
      xg, stats_view, bshape = x, lambda a: a, (1,) * (x.ndim - 1) + (c,)
      reduce_axes = tuple(range(x.ndim - 1))
      rows = lambda a_DxC: a_DxC[domains[0]]  # noqa: E731  (C,)
      group = lambda a_C, i: a_C  # noqa: E731
      row_shape = (x.shape[0],)  # the mask's rows, as x's leading axes
    else:
      xg = x.reshape((x.shape[0] // g, g) + x.shape[1:])
      stats_view = lambda a: jnp.moveaxis(a, 1, 0)  # noqa: E731
      bshape = (1, g) + (1,) * (xg.ndim - 3) + (c,)  # explicit broadcast (rank promotion)
      reduce_axes = tuple(range(1, xg.ndim - 1))
      rows = lambda a_DxC: jnp.stack([a_DxC[d] for d in domains])  # noqa: E731  (GxC)
      group = lambda a_GxC, i: a_GxC[i]  # noqa: E731
      row_shape = xg.shape[:2]
    if train:
      x32 = xg.astype(jnp.float32)
      if mask is None:
        mean = jnp.mean(stats_view(x32), axis=reduce_axes)
        centred = x32 - mean.reshape(bshape)
        var = jnp.mean(stats_view(jnp.square(centred)), axis=reduce_axes)  # biased, two-pass
        n = x.size // (c * g)
        bessel = n / max(n - 1, 1)
      else:  # the same over the real rows only: padding rows enter no sum and no count
        keep = mask.astype(jnp.bool_).reshape(row_shape + (1,) * (xg.ndim - len(row_shape)))
        per_row = x.size // (x.shape[0] * c)  # values per row and channel (pixels)
        # real values per channel (of each group): shape (1,) or (G, 1), exact in float32
        n = jnp.sum(stats_view(keep.astype(jnp.float32)), axis=reduce_axes) * per_row
        n = jnp.maximum(n, 1.0)
        mean = jnp.sum(stats_view(jnp.where(keep, x32, 0.0)), axis=reduce_axes) / n
        centred = x32 - mean.reshape(bshape)
        var = jnp.sum(stats_view(jnp.where(keep, jnp.square(centred), 0.0)), axis=reduce_axes) / n
        bessel = n / jnp.maximum(n - 1.0, 1.0)
      # Flax would update the statistics during init; torch's freshly built module holds the
      # initial values, so init leaves them untouched.
      if not self.is_initializing():
        unbiased = var * bessel
        m = self.momentum
        for i, d in enumerate(domains):  # in group order: G sequential calls' updates
          mean_DxC.value = mean_DxC.value.at[d].set(
            (1.0 - m) * mean_DxC.value[d] + m * group(mean, i)
          )
          var_DxC.value = var_DxC.value.at[d].set(
            (1.0 - m) * var_DxC.value[d] + m * group(unbiased, i)
          )
    else:
      mean, var = rows(mean_DxC.value), rows(var_DxC.value)

    # y = (x - mean) * (scale / sqrt(var + eps)) + bias, folded into one multiply-add, in float32
    # and rounded once to the compute dtype: rounding ``mul`` and ``add`` = bias - mean * mul to
    # bfloat16 first would shift each channel by up to |mean / sigma| * |scale| * 2^-8 (relative
    # rounding error of bfloat16), where y itself is off by at most |y| * 2^-8.
    mul = rows(scale_DxC) * jnp.reciprocal(jnp.sqrt(var + self.epsilon))
    add = rows(bias_DxC) - mean * mul
    dtype = self.dtype or x.dtype
    y = xg.astype(jnp.float32) * mul.reshape(bshape) + add.reshape(bshape)
    return y.astype(dtype).reshape(x.shape)
