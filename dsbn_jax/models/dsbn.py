"""Domain-specific batch normalisation (DSBN, Chang et al. CVPR 2019) in Flax linen.

One BatchNorm branch per domain: every branch has its own scale/bias (``params``) and its own running
mean/var (``batch_stats``). The branch is a static Python int chosen per call, so a batch is
single-domain, exactly like the official ``_DomainSpecificBatchNorm`` which takes ``domain_label[0]``.

The branches are stored stacked along a leading axis of size ``num_domains`` (``scale_DxC``); a call
reads and writes only row ``domain``, so the other rows stay bit-identical. ``num_domains=1`` is plain
BatchNorm (the shared-BN baselines).

Numerics follow torch's ``BatchNorm2d`` (parity reference, facts §7.9), not Flax's ``nn.BatchNorm``:
- ``momentum`` is given in torch's convention: new = (1 - momentum)·old + momentum·batch;
- the running variance is updated with the *unbiased* batch variance (n / (n - 1)), while the
  normalisation itself uses the biased one;
- statistics are computed in float32 with a two-pass variance, whatever the compute dtype.

Under ``jax.jit`` with the batch sharded over a mesh, the means below are over the *global* batch, so
multi-device training is synchronised BN (identical to one device holding the whole batch).
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp


class DomainSpecificBatchNorm(nn.Module):
  """BatchNorm with ``num_domains`` independent branches over the last (channel) axis."""

  num_domains: int = 2
  momentum: float = 0.1  # torch convention (Flax's nn.BatchNorm would call this 0.9)
  epsilon: float = 1e-5
  dtype: Any = None  # compute dtype of the output; None = input dtype
  scale_init: Any = nn.initializers.ones
  bias_init: Any = nn.initializers.zeros

  @nn.compact
  def __call__(self, x, *, domain: int, train: bool):
    if not 0 <= domain < self.num_domains:
      raise ValueError(f"domain={domain} but this layer has {self.num_domains} domain branch(es)")
    c = x.shape[-1]
    shape_DxC = (self.num_domains, c)
    scale_DxC = self.param("scale", self.scale_init, shape_DxC, jnp.float32)
    bias_DxC = self.param("bias", self.bias_init, shape_DxC, jnp.float32)
    mean_DxC = self.variable("batch_stats", "mean", lambda: jnp.zeros(shape_DxC, jnp.float32))
    var_DxC = self.variable("batch_stats", "var", lambda: jnp.ones(shape_DxC, jnp.float32))

    reduce_axes = tuple(range(x.ndim - 1))
    bshape = (1,) * (x.ndim - 1) + (c,)  # explicit broadcast (rank promotion may be 'raise')
    if train:
      x32 = x.astype(jnp.float32)
      mean_C = jnp.mean(x32, axis=reduce_axes)
      centred = x32 - mean_C.reshape(bshape)
      var_C = jnp.mean(jnp.square(centred), axis=reduce_axes)  # biased, two-pass
      # Flax would update the statistics during init; torch's freshly built module holds the
      # initial values, so init leaves them untouched.
      if not self.is_initializing():
        n = x.size // c
        unbiased_C = var_C * (n / max(n - 1, 1))
        m = self.momentum
        mean_DxC.value = mean_DxC.value.at[domain].set(
            (1.0 - m) * mean_DxC.value[domain] + m * mean_C)
        var_DxC.value = var_DxC.value.at[domain].set(
            (1.0 - m) * var_DxC.value[domain] + m * unbiased_C)
    else:
      mean_C = mean_DxC.value[domain]
      var_C = var_DxC.value[domain]

    # y = (x - mean) * (scale / sqrt(var + eps)) + bias, folded into one multiply-add.
    mul_C = scale_DxC[domain] * jnp.reciprocal(jnp.sqrt(var_C + self.epsilon))
    add_C = bias_DxC[domain] - mean_C * mul_C
    dtype = self.dtype or x.dtype
    return (x * mul_C.reshape(bshape).astype(dtype) + add_C.reshape(bshape).astype(dtype)).astype(dtype)
