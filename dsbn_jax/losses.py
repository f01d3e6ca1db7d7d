"""ALDA losses, DANN's domain loss, the coefficient ramps and gradient reversal.

Everything mirrors what the official PyTorch code computes (``ZJULearning/ALDA`` ``loss.py`` and
``network.py``; docs/reference.md §1-§3), including its quirks, so that values *and* gradients
match torch autograd:

- ``alda_losses`` is ``loss.py::ALDA_loss``: pseudo labels from detached probabilities for both
  domains, a strict ``> threshold`` target mask, the corrected label = column ŷ of the per-sample
  confusion matrix, BCE summed over classes and averaged over kept rows, ``L_T`` averaged over
  confident rows x K, and D's regulariser on the raw logits of the source rows.
- BCE is torch's ``nn.BCELoss``: each log clamped at -100 in the forward pass, and torch's own
  backward ``(c - t) / max(c (1 - c), 1e-12)``, which stays finite where the sigmoid saturates.
- Where torch returns NaN (``L_T`` over an empty confident set) we return exactly 0, and the
  gradient is 0 in both.

Where the official code and the paper disagree, the code wins (docs/reference.md §1): the source
rows' corrected label uses the *predicted* class (only the BCE target uses the ground truth), and
``L_T`` is linear in the probabilities (no log).
"""

import jax
import jax.numpy as jnp
import optax

# torch's BCE kernel: log terms clamped at -100 (forward), c(1-c) floored at 1e-12 (backward).
_BCE_LOG_MIN = -100.0
_BCE_GRAD_EPS = 1e-12


@jax.custom_vjp
def torch_bce(c, t):
  """Elementwise ``torch.nn.BCELoss(reduction='none')(c, t)``: -[t log c + (1 - t) log(1 - c)]."""
  log_c = jnp.maximum(jnp.log(c), _BCE_LOG_MIN)
  log_1mc = jnp.maximum(jnp.log1p(-c), _BCE_LOG_MIN)  # torch uses log1p(-c), not log(1 - c)
  return -(t * log_c + (1.0 - t) * log_1mc)


def _torch_bce_fwd(c, t):
  return torch_bce(c, t), (c, t)


def _torch_bce_bwd(res, g):
  c, t = res
  # ATen binary_cross_entropy_backward: not the derivative of the clamped forward, but finite.
  grad_c = g * (c - t) / jnp.maximum((1.0 - c) * c, _BCE_GRAD_EPS)
  grad_t = g * (jnp.log1p(-c) - jnp.log(c))  # targets here are constants; kept for completeness
  return grad_c, grad_t


torch_bce.defvjp(_torch_bce_fwd, _torch_bce_bwd)


def masked_mean(x_B: jax.Array, mask_B: jax.Array | None) -> jax.Array:
  """Mean of ``x_B`` over the rows where ``mask_B`` (the real rows of a padded batch; None: all
  rows, ``jnp.mean``); the other rows enter neither the sum nor the count, nor the gradient."""
  if mask_B is None:
    return jnp.mean(x_B)
  return jnp.sum(jnp.where(mask_B, x_B, 0.0)) / jnp.maximum(jnp.sum(mask_B), 1)


def cross_entropy(logits_BxK: jax.Array, labels_B: jax.Array, mask_B=None) -> jax.Array:
  """Mean softmax cross-entropy, ``torch.nn.CrossEntropyLoss()`` (source classification loss),
  over the real rows ``mask_B`` (None: all)."""
  ce_B = optax.softmax_cross_entropy_with_integer_labels(logits_BxK, labels_B)
  return masked_mean(ce_B, mask_B)


def confident_mask(probs_BxK: jax.Array, threshold: float) -> jax.Array:
  """Rows whose max probability is *strictly* above ``threshold`` (``maxpred > threshold``)."""
  return jnp.max(probs_BxK, axis=-1) > threshold


def pairwise_sum(x: jax.Array) -> jax.Array:
  """Sum of all entries by pairwise halving (error ~log2(n) ulp).

  XLA's CPU reduction adds sequentially (error ~n ulp: 1e-5 on L_adv's ~10^3 BCE terms with K=65,
  10x torch's cascade sum), and under jit it fuses a row-then-column sum back into one flat loop;
  elementwise adds are never reassociated, so this tree keeps its accuracy.
  """
  x = x.reshape(-1)
  n = x.shape[0]
  x = jnp.pad(x, (0, (1 << max(n - 1, 0).bit_length()) - n))
  while x.shape[0] > 1:
    half = x.shape[0] // 2
    x = x[:half] + x[half:]
  return x[0]


def _corrected_labels(xi_NxK: jax.Array, pred_N: jax.Array) -> jax.Array:
  """Column ŷ of the confusion matrix: c[ŷ] = ξ_ŷ, c[k≠ŷ] = (1 - ξ_ŷ) / (K - 1).

  Computed as fl(1/(K-1)) - fl(1/(K-1))·ξ_ŷ, the same float32 operations as the reference's
  ``ant_eye/(K-1) + create_matrix(K)·ξ`` summed against a one-hot, so the values are bit-identical
  (docs/reference.md §1, steps 4-5).
  """
  k = xi_NxK.shape[-1]
  onehot_NxK = jax.nn.one_hot(pred_N, k, dtype=jnp.bool_)
  xi_hat_N = jnp.take_along_axis(xi_NxK, pred_N[:, None], axis=-1)[:, 0]
  inv = jnp.float32(1.0 / (k - 1))
  off_diag_N = inv - inv * xi_hat_N
  return jnp.where(onehot_NxK, xi_hat_N[:, None], off_diag_N[:, None])


def alda_losses(
  disc_logits: jax.Array,
  labels_source: jax.Array,
  probs: jax.Array,
  threshold: float = 0.9,
  mask: jax.Array | None = None,
):
  """ALDA's three loss terms, exactly as ``loss.py::ALDA_loss`` of the official code.

  Args:
    disc_logits: f32[2B, K], the discriminator's raw logits on [source; target] bottleneck features.
    labels_source: i32[B], source ground truth.
    probs: f32[2B, K], the classifier's softmax on [source; target] (source rows first).
    threshold: target rows count only where max prob > threshold (strictly).
    mask: bool[2B], the real rows of padded [source; target] batches (None: all real); the
      others count nowhere, as if the batches had only the real rows.
  Returns:
    ``(adv_loss, reg_loss, correct_loss)``: the adversarial BCE (sum over K, mean over the B source
    rows plus the confident target rows), D's regulariser (softmax CE of the source rows' raw logits
    against the labels) and the corrected target loss ``L_T`` (mean over confident rows x K of
    -p·c with c detached; exactly 0 with zero gradient when no target row is confident, where torch
    gives NaN). ``probs`` reaches only ``L_T``; the pseudo labels and masks are built from
    ``stop_gradient(probs)``.
  """
  n, k = disc_logits.shape
  b = n // 2
  if n != 2 * b or probs.shape != (n, k) or labels_source.shape != (b,) or k < 2:
    raise ValueError(
      f"alda_losses wants disc_logits/probs (2B, K>=2) and labels (B,); got "
      f"{disc_logits.shape}, {probs.shape}, {labels_source.shape}"
    )
  xi_NxK = jax.nn.sigmoid(disc_logits)
  probs_sg_NxK = jax.lax.stop_gradient(probs)
  pred_N = jnp.argmax(probs_sg_NxK, axis=-1)  # pseudo labels, both domains (docs/reference.md §1)
  confident_B = confident_mask(probs_sg_NxK[b:], threshold)
  source_B = jnp.ones((b,), jnp.bool_)
  if mask is not None:  # padding rows: neither kept nor confident
    source_B, confident_B = mask[:b], confident_B & mask[b:]
  keep_N = jnp.concatenate([source_B, confident_B])  # (real) source rows always kept
  # A non-confident target row gets an all-zero one-hot, hence an all-zero corrected label.
  c_NxK = _corrected_labels(xi_NxK, pred_N) * keep_N[:, None]

  # BCE targets: ground-truth one-hot for source, the "opposite distribution" u for target.
  onehot_tgt_BxK = jax.nn.one_hot(pred_N[b:], k) * confident_B[:, None]
  t_NxK = jnp.concatenate([jax.nn.one_hot(labels_source, k), (1.0 - onehot_tgt_BxK) / (k - 1)])
  bce_NxK = jnp.where(keep_N[:, None], torch_bce(c_NxK, t_NxK), 0.0)
  adv_loss = pairwise_sum(bce_NxK) / jnp.sum(keep_N)  # denominator >= B > 0

  reg_loss = cross_entropy(disc_logits[:b], labels_source, None if mask is None else source_B)

  m = jnp.sum(confident_B)
  c_tgt_BxK = jax.lax.stop_gradient(c_NxK[b:])  # corrected labels are detached in L_T
  masked_BxK = jnp.where(confident_B[:, None], probs[b:] * c_tgt_BxK, 0.0)
  correct_loss = jnp.where(m > 0, -pairwise_sum(masked_BxK) / (jnp.maximum(m, 1) * k), 0.0)
  return adv_loss, reg_loss, correct_loss


def dann_loss(disc_logits_Nx1: jax.Array, mask_N: jax.Array | None = None) -> jax.Array:
  """``loss.py::DANN``: BCE of sigmoid(D) against domain labels 1 (source rows), 0 (target),
  averaged over the real rows ``mask_N`` (None: all)."""
  n = disc_logits_Nx1.shape[0]
  b = n // 2
  if disc_logits_Nx1.shape != (2 * b, 1):
    raise ValueError(f"dann_loss wants (2B, 1) logits, got {disc_logits_Nx1.shape}")
  domain_Nx1 = jnp.concatenate([jnp.ones((b, 1)), jnp.zeros((b, 1))])
  # The reference's D ends in nn.Sigmoid and uses nn.BCELoss (mean): same clamps, same gradients.
  bce_Nx1 = torch_bce(jax.nn.sigmoid(disc_logits_Nx1), domain_Nx1)
  return jnp.mean(bce_Nx1) if mask_N is None else masked_mean(bce_Nx1[:, 0], mask_N)


def ramp(step, high: float = 1.0, alpha: float = 10.0, max_steps: float = 10000.0) -> jax.Array:
  """``network.py::calc_coeff`` (low=0): 2·high / (1 + exp(-alpha·step/max_steps)) - high.

  The reference evaluates it in float64 on the host; here it is float32 on device (relative
  difference ~1e-7), because ``step`` is a traced array inside the jitted step.
  """
  p = jnp.asarray(step, jnp.float32) / max_steps
  return 2.0 * high / (1.0 + jnp.exp(-alpha * p)) - high


def grl_coeff(step, alpha: float = 10.0, max_steps: float = 10000.0) -> jax.Array:
  """Gradient-reversal coefficient at 0-based step i: ``calc_coeff(i + 1)``.

  D's forward increments its ``iter_num`` *before* computing the coefficient
  (docs/reference.md §2-§3).
  """
  return ramp(step + 1, 1.0, alpha, max_steps)


def correct_loss_weight(
  step, trade_off: float = 1.0, alpha: float = 10.0, max_steps: float = 10000.0
) -> jax.Array:
  """λ_T at 0-based step i: ``calc_coeff(i, high=trade_off)`` (uses i, not i + 1; λ_T(0) = 0).

  train.py: ``transfer = adv_weight·L_adv + adv_weight·calc_coeff(i, high=trade_off)·L_T``; the
  ``adv_weight`` factor is applied by the caller, not folded in here.
  """
  return ramp(step, trade_off, alpha, max_steps)


def gradient_reversal(x: jax.Array, coeff) -> jax.Array:
  """Identity forward (bit-exact); backward multiplies the incoming gradient by ``-coeff``.

  ``network.py::grl_hook``: the hook replaces g by ``-coeff·g`` on D's input. ``coeff`` itself
  receives no gradient. Written with ``stop_gradient`` so it composes with any transform.
  """
  coeff = jax.lax.stop_gradient(jnp.asarray(coeff, x.dtype))
  reversed_x = -coeff * x
  # value: x + (r - r) = x exactly; derivative: 0 + (-coeff - 0) = -coeff.
  return jax.lax.stop_gradient(x) + (reversed_x - jax.lax.stop_gradient(reversed_x))
