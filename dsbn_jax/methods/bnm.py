"""BNM, batch nuclear-norm maximisation (Cui et al., CVPR 2020), on the target logits.

As the official code computes it (cuishuhao/BNM @ 2d23c61 : ``DA/BNM/train_image.py`` L160-173,
L222-251; docs/reference.md §16): -mean of the singular values of the target softmax, i.e. the
nuclear norm divided by min(B, K) (pytorch-adapt divides by B instead). No discriminator, no
gradient reversal; trade-off 1 (``loss.adv_weight``'s default). The step's glue (``loss_terms``,
``objective``, ``metrics``: ``train_step.py``'s docstring) follows the function.
"""

import jax
import jax.numpy as jnp

from dsbn_jax.methods import source_only


def bnm_loss(logits_t: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """-‖softmax(z_t)‖_* / min(B, K), ``-torch.mean(torch.svd(softmax_tgt)[1])``.

  Args:
    logits_t: f32[B, K], the classifier's raw target logits (the softmax is not detached).
    mask: bool[B], the real rows of a padded target batch (None: all real). Padded rows of the
      softmax are zeroed, which leaves the nonzero singular values (hence the nuclear norm)
      unchanged, and B in the normaliser is the real count n: min(n, K).
  Returns:
    Scalar. Gradient: -U Vᵀ / min(n, K), through ``jnp.linalg.svd(..., compute_uv=False)`` (whose
    derivative is diag(Uᵀ dP V): no 1/(σ_i - σ_j) terms); it is well defined while the softmax has
    full rank min(n, K), as in torch.
  """
  b, k = logits_t.shape
  real_B = jnp.ones((b,), jnp.bool_) if mask is None else mask
  n = jnp.sum(real_B)
  p_BxK = jax.nn.softmax(jnp.where(real_B[:, None], logits_t, 0.0), axis=1)
  p_BxK = jnp.where(real_B[:, None], p_BxK, 0.0)
  s = jnp.linalg.svd(p_BxK, full_matrices=False, compute_uv=False)
  return -jnp.sum(s) / jnp.minimum(n, k).astype(jnp.float32)


# ------------------------------------------------------------------------------------- the step
def loss_terms(out, discriminate, coeffs, cfg) -> dict:
  """'bnm': ``bnm_loss`` of the real target rows."""
  del discriminate, coeffs, cfg
  return {"bnm": bnm_loss(out.logits_t, out.mask_t)}


def objective(terms, coeffs, cfg):
  """CE + adv_weight·L_BNM; no D-only term."""
  del coeffs
  return terms["ce"] + cfg.loss.adv_weight * terms["bnm"], 0.0


metrics = source_only.metrics  # nothing besides the logged terms: no discriminator, no coefficient
