"""ALDA (Chen et al., AAAI 2020), as the official code trains it (``train.py::train``,
``loss.py::ALDA_loss``; docs/reference.md §1-§3); with ``model.bn='dsbn'`` the paper's method.

A K-logit discriminator on the bottleneck features [f_s; f_t] behind gradient reversal (coefficient
``calc_coeff(i + 1)``); ``losses.alda_losses`` gives the adversarial BCE L_adv, D's regulariser
L_reg and the corrected target loss L_T. G, C and D minimise CE_s + adv_weight·L_adv +
adv_weight·λ_T(i)·L_T, and L_reg updates D only. The module interface is in ``train_step.py``'s
docstring.
"""

import jax

from dsbn_jax import losses
from dsbn_jax.methods import dann


def loss_terms(out, discriminate, coeffs, cfg) -> dict:
  """'adv', 'correct' (L_adv, L_T) from D on the reversed features, and 'reg' (L_reg) from the
  same D forward (same dropout mask) on detached features, so that its gradient reaches D only:
  train.py back-propagates reg_loss with every G/C param at requires_grad=False."""
  feat_N, mask_N = out.feat_N, out.mask_N
  d_logits = discriminate(losses.gradient_reversal(feat_N, coeffs["grl_coeff"]))
  probs_N = jax.nn.softmax(out.logits_N, axis=-1)
  labels_s, threshold = out.labels_s, cfg.loss.threshold
  adv, _, correct = losses.alda_losses(d_logits, labels_s, probs_N, threshold, mask_N)
  _, reg, _ = losses.alda_losses(
    discriminate(jax.lax.stop_gradient(feat_N)), labels_s, probs_N, threshold, mask_N
  )
  return {"adv": adv, "reg": reg, "correct": correct}


def objective(terms, coeffs, cfg):
  """train.py's ``total_loss`` = CE + adv_weight·L_adv + adv_weight·λ_T·L_T; L_reg reaches D only."""
  w = cfg.loss.adv_weight
  return terms["ce"] + w * terms["adv"] + w * coeffs["lambda_t"] * terms["correct"], terms["reg"]


def metrics(out, coeffs, cfg) -> dict:
  """DANN's (GRL coefficient, confident fraction) and λ_T, the weight of L_T."""
  return {**dann.metrics(out, coeffs, cfg), "lambda_t": coeffs["lambda_t"]}
