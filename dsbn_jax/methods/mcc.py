"""MCC, minimum class confusion (Jin et al., ECCV 2020), on the target logits.

As the official code computes it (thuml/Versatile-Domain-Adaptation @ db5012a :
``pytorch/train_image_office.py`` L168-182; TLlib's ``tllib/self_training/mcc.py`` L61-86 gives the
same value; docs/reference.md §15). No discriminator and no gradient reversal; the loss is added to
the source cross-entropy with weight 1 (``loss.adv_weight``'s default). The step's glue
(``loss_terms``, ``objective``, ``metrics``: ``train_step.py``'s docstring) follows the function;
its temperature is ``loss.mcc_temperature``.
"""

import jax
import jax.numpy as jnp

from dsbn_jax.methods import cdan, source_only


def mcc_loss(
  logits_t: jax.Array, temperature: float = 2.5, mask: jax.Array | None = None
) -> jax.Array:
  """L_MCC = (Σ C̃ - tr C̃) / K on the target rows.

  Args:
    logits_t: f32[B, K], the classifier's raw target logits.
    temperature: T of Ŷ = softmax(z / T); 2.5 is the official default (Office), 3.0 for VisDA.
    mask: bool[B], the real rows of a padded target batch (None: all real). Padded rows get
      weight 0 (no part in C) and B below is the real count.
  Returns:
    Scalar. With H_i = -Σ Ŷ_i log(Ŷ_i + 1e-5) **detached**, w_i = B (1 + e^{-H_i}) / Σ_j (1 + e^{-H_j}),
    C = Ŷᵀ diag(w) Ŷ (K×K) and C̃ = C divided by ``C.sum(dim=1)`` broadcast along the last axis, as
    the reference writes it (column j divided by row sum j: the same as row normalisation because C
    is symmetric).
  """
  b, k = logits_t.shape
  real_B = jnp.ones((b,), jnp.bool_) if mask is None else mask
  n = jnp.sum(real_B).astype(jnp.float32)
  # Padded logits are zeroed (junk gives no NaN) and their rows get weight 0: no part in C.
  y_BxK = jax.nn.softmax(jnp.where(real_B[:, None], logits_t, 0.0) / temperature, axis=1)
  w_B = jnp.where(real_B, 1.0 + jnp.exp(-jax.lax.stop_gradient(cdan.entropy(y_BxK))), 0.0)
  w_B = n * w_B / jnp.sum(w_B)
  cov_KxK = (y_BxK * w_B[:, None]).T @ y_BxK
  cov_KxK = cov_KxK / jnp.sum(cov_KxK, axis=1)[None, :]
  return (jnp.sum(cov_KxK) - jnp.trace(cov_KxK)) / k


# ------------------------------------------------------------------------------------- the step
def loss_terms(out, discriminate, coeffs, cfg) -> dict:
  """'mcc': ``mcc_loss`` of the real target rows at ``loss.mcc_temperature``."""
  del discriminate, coeffs
  return {"mcc": mcc_loss(out.logits_t, cfg.loss.mcc_temperature, out.mask_t)}


def objective(terms, coeffs, cfg):
  """CE + adv_weight·L_MCC; no D-only term."""
  del coeffs
  return terms["ce"] + cfg.loss.adv_weight * terms["mcc"], 0.0


metrics = source_only.metrics  # nothing besides the logged terms: no discriminator, no coefficient
