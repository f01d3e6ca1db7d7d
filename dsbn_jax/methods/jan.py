"""JAN (Long et al., ICML 2017): the joint maximum mean discrepancy (JMMD) of features and softmax.

As TLlib computes it (thuml/Transfer-Learning-Library @ c4aa59e : ``tllib/alignment/jan.py``
L19-93, ``tllib/alignment/dan.py`` L92-119, ``tllib/modules/kernels.py`` L13-62; docs/reference.md
§13), with the kernels its JAN script builds: no discriminator, no gradient reversal; the loss is
minimised by the whole network (neither input is detached). The step's glue (``loss_terms``,
``objective``, ``metrics``: ``train_step.py``'s docstring) follows the function.
"""

import jax
import jax.numpy as jnp

from dsbn_jax import losses
from dsbn_jax.methods import source_only

FEATURE_BANDWIDTH_SCALES = tuple(2.0**k for k in range(-3, 2))  # GaussianKernel(alpha=2**k)
SOFTMAX_SIGMA = 0.92  # GaussianKernel(sigma=0.92, track_running_stats=False)


def _squared_distances(x_NxD: jax.Array) -> jax.Array:
  """‖x_i - x_j‖², f32[N, N], from the differences as the reference does (exact 0 on the diagonal,
  never negative, unlike the Gram-matrix form)."""
  return jnp.sum((x_NxD[None, :, :] - x_NxD[:, None, :]) ** 2, axis=2)


def _index_matrix(mask_s: jax.Array, mask_t: jax.Array) -> jax.Array:
  """``dan.py::_update_index_matrix`` (quadratic version), generalised to the real rows: 1/(n(n-1))
  on the off-diagonal pairs of one domain, -1/(n_s n_t) on the cross-domain pairs, 0 elsewhere."""
  n_s, n_t = jnp.sum(mask_s), jnp.sum(mask_t)
  real_N = jnp.concatenate([mask_s, mask_t])
  source_N = jnp.concatenate([jnp.ones_like(mask_s), jnp.zeros_like(mask_t)])
  pair_NxN = real_N[:, None] & real_N[None, :]
  same_NxN = source_N[:, None] == source_N[None, :]
  off_diag_NxN = ~jnp.eye(real_N.shape[0], dtype=jnp.bool_)
  n_same_N = jnp.where(source_N, n_s, n_t)
  within = 1.0 / jnp.maximum(n_same_N * (n_same_N - 1), 1).astype(jnp.float32)
  cross = -1.0 / jnp.maximum(n_s * n_t, 1).astype(jnp.float32)
  value_NxN = jnp.where(same_NxN, within[:, None] * off_diag_NxN, cross)
  return jnp.where(pair_NxN, value_NxN, 0.0)


def jmmd(
  feat_s: jax.Array,
  feat_t: jax.Array,
  probs_s: jax.Array,
  probs_t: jax.Array,
  mask_s: jax.Array | None = None,
  mask_t: jax.Array | None = None,
) -> jax.Array:
  """``JointMultipleKernelMaximumMeanDiscrepancy`` (``linear=False``) on (f, softmax) of both domains.

  Args:
    feat_s, feat_t: f32[B, F], the bottleneck features of the source and target rows.
    probs_s, probs_t: f32[B, K], the classifier's softmax (not detached).
    mask_s, mask_t: bool[B], the real rows of padded batches (None: all real). Padded rows enter
      neither the bandwidth nor any pair; the batch sizes below are then the real counts.
  Returns:
    Scalar: Σ_ij k_ij·M_ij + 2/(B - 1), what TLlib returns, where k is the joint kernel over the 2B
    rows [source; target], the product of Σ_{a ∈ {1/8 .. 2}} exp(-‖f_i - f_j‖² / (2a·m)) (m the mean
    of ‖f_i - f_j‖² over all (2B)² pairs, diagonal included, **detached**) and
    exp(-‖p_i - p_j‖² / (2·0.92²)); M is the quadratic (unbiased) estimator's index matrix (mean
    over i ≠ j within each domain, minus twice the mean over cross pairs). The constant 2/(B - 1) is
    TLlib's bookkeeping ("to make up for the value on the diagonal"): no gradient; with padding it is
    1/(n_s - 1) + 1/(n_t - 1). The value can be slightly negative.
  """
  b = feat_s.shape[0]
  if not feat_s.shape == feat_t.shape or not probs_s.shape == probs_t.shape or b < 2:
    raise ValueError(f"jmmd wants equal (B>=2, .) shapes; got {feat_s.shape}, {probs_s.shape}")
  mask_s = jnp.ones((b,), jnp.bool_) if mask_s is None else mask_s
  mask_t = jnp.ones((b,), jnp.bool_) if mask_t is None else mask_t
  real_N = jnp.concatenate([mask_s, mask_t])
  # Padded rows are zeroed before anything: junk there can give no NaN, nor any gradient.
  feat_NxF = jnp.where(real_N[:, None], jnp.concatenate([feat_s, feat_t]), 0.0)
  probs_NxK = jnp.where(real_N[:, None], jnp.concatenate([probs_s, probs_t]), 0.0)

  dist_f = _squared_distances(feat_NxF)
  pair_NxN = real_N[:, None] & real_N[None, :]
  m = jax.lax.stop_gradient(losses.masked_mean(dist_f.reshape(-1), pair_NxN.reshape(-1)))
  kernel_f = 0.0  # sum([kernel(x) for kernel in layer_kernels]): the same order of additions
  for scale in FEATURE_BANDWIDTH_SCALES:
    kernel_f = kernel_f + jnp.exp(-dist_f / (2.0 * (scale * m)))
  sigma_square = jnp.float32(SOFTMAX_SIGMA * SOFTMAX_SIGMA)  # torch.tensor(sigma * sigma)
  kernel_p = jnp.exp(-_squared_distances(probs_NxK) / (2.0 * sigma_square))

  n_s, n_t = jnp.sum(mask_s), jnp.sum(mask_t)
  offset = 1.0 / jnp.maximum(n_s - 1, 1) + 1.0 / jnp.maximum(n_t - 1, 1)  # 2/(B-1) unpadded
  return losses.pairwise_sum(kernel_f * kernel_p * _index_matrix(mask_s, mask_t)) + offset


# ------------------------------------------------------------------------------------- the step
def loss_terms(out, discriminate, coeffs, cfg) -> dict:
  """'jmmd': ``jmmd`` of the bottleneck features and the softmax of both domains' real rows."""
  del discriminate, coeffs, cfg
  probs_s, probs_t = (jax.nn.softmax(z, axis=-1) for z in (out.logits_s, out.logits_t))
  return {"jmmd": jmmd(out.feat_s, out.feat_t, probs_s, probs_t, out.mask_s, out.mask_t)}


def objective(terms, coeffs, cfg):
  """CE + adv_weight·JMMD (TLlib's trade-off 1.0 is adv_weight's default); no D-only term."""
  del coeffs
  return terms["ce"] + cfg.loss.adv_weight * terms["jmmd"], 0.0


metrics = source_only.metrics  # nothing besides the logged terms: no discriminator, no coefficient
