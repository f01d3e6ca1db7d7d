"""DANN (Ganin et al., JMLR 2016), as the official ALDA code trains it (``loss.py::DANN``,
``network.py::AdversarialNetwork``; docs/reference.md §1-§3).

A 1-logit discriminator on the bottleneck features [f_s; f_t] behind gradient reversal (coefficient
``calc_coeff(i + 1)``), BCE against domain labels 1 (source) / 0 (target); G, C and D minimise
CE_s + adv_weight·L_dann in one update. The module interface is in ``train_step.py``'s docstring.
"""

import jax
import jax.numpy as jnp

from dsbn_jax import losses


def loss_terms(out, discriminate, coeffs, cfg) -> dict:
  """'dann': the domain BCE of D on the reversed features (``losses.dann_loss``)."""
  del cfg
  d_logits = discriminate(losses.gradient_reversal(out.feat_N, coeffs["grl_coeff"]))
  return {"dann": losses.dann_loss(d_logits, out.mask_N)}


def objective(terms, coeffs, cfg):
  """CE + adv_weight·L_dann (train.py's ``total_loss``); no D-only term."""
  del coeffs
  return terms["ce"] + cfg.loss.adv_weight * terms["dann"], 0.0


def metrics(out, coeffs, cfg) -> dict:
  """The GRL coefficient, and the fraction of (real) target rows whose max softmax probability is
  above ``loss.threshold`` (the rows ALDA would count; logged for every adversarial method)."""
  probs_t = jax.nn.softmax(out.logits_t, axis=-1)
  conf = losses.confident_mask(probs_t, cfg.loss.threshold)
  return {
    "grl_coeff": coeffs["grl_coeff"],
    "confident_frac": losses.masked_mean(conf.astype(jnp.float32), out.mask_t),
  }
