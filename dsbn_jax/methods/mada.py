"""MADA (Pei et al., AAAI 2018): K class-wise discriminators, their inputs and their loss.

The only official code is Caffe + AlexNet (thuml/MADA @ d33b8e9 : ``models/mada/train_val.prototxt``
and ``outerproduct_layer.cu``; docs/reference.md §14): the softmax p and the bottleneck features f
go through an outer product whose gradient to p is zeroed (p detached), one gradient-reversal
layer, a slice into K inputs p_k·f, and K discriminators D_k (in → 1024 → ReLU → Dropout → 1024 →
ReLU → Dropout → 1), each with its own ``SigmoidCrossEntropyLoss`` (domain labels source 0, target
1) of ``loss_weight`` 0.3. The K discriminators are meant to run as one batched matmul over the
``[N, K, F]`` inputs of ``classwise_inputs`` (the caller reverses the gradient on them first).

The step's glue (``loss_terms``, ``objective``, ``metrics``: ``train_step.py``'s docstring) feeds
them to the model's ``ClasswiseDiscriminator`` and weights the sum by ``loss.mada_weight`` (0.3,
the prototxt's ``loss_weight`` of each D_k) times ``loss.adv_weight``.
"""

import jax
import jax.numpy as jnp
import optax

from dsbn_jax import losses
from dsbn_jax.methods import cdan, dann


def classwise_inputs(feat_NxF: jax.Array, probs_NxK: jax.Array) -> jax.Array:
  """D_k's inputs p_nk·f_n, f32[N, K, F] (row n, discriminator k), p detached: the outer product
  of the Caffe model, i.e. CDAN's multilinear map before it is flattened."""
  n, k = probs_NxK.shape
  return cdan.multilinear_map(feat_NxF, probs_NxK).reshape(n, k, feat_NxF.shape[1])


def mada_loss(d_logits_NxK: jax.Array, mask: jax.Array | None = None) -> jax.Array:
  """Σ_k mean_n BCE(sigmoid(z_nk), domain_n): the K discriminators' losses, summed.

  Args:
    d_logits_NxK: f32[2B, K], raw logit of D_k on row n's input p_nk·f_n ([source; target] rows).
    mask: bool[2B], the real rows of padded batches (None: all real).
  Returns:
    Scalar: for each D_k, Caffe's ``SigmoidCrossEntropyLoss`` (the numerically stable logistic loss,
    gradient (σ(z) - t)/N) against source 0 / target 1, **averaged over the N = 2B (real) rows**;
    then **summed over k** (K separate loss layers). The reference scales each D_k's loss by 0.3
    (``loss_weight``): that factor is the caller's trade-off, not folded in here.
  """
  n, k = d_logits_NxK.shape
  b = n // 2
  if n != 2 * b:
    raise ValueError(f"mada_loss wants (2B, K) logits, got {d_logits_NxK.shape}")
  domain_NxK = jnp.broadcast_to(
    jnp.concatenate([jnp.zeros((b, 1)), jnp.ones((b, 1))]), (n, k)
  )  # Caffe's DummyData labels: source 0, target 1
  bce_NxK = optax.sigmoid_binary_cross_entropy(d_logits_NxK, domain_NxK)
  mean_K = jax.vmap(losses.masked_mean, in_axes=(1, None))(bce_NxK, mask)
  return jnp.sum(mean_K)


# ------------------------------------------------------------------------------------- the step
def loss_terms(out, discriminate, coeffs, cfg) -> dict:
  """'mada': Σ_k L_k of the K class-wise D_k on p_k·f of [source; target] (p detached), reversed
  with ``grl_coeff`` (``calc_coeff(i + 1)``, the usual ramp)."""
  del cfg
  x_NxKxF = classwise_inputs(out.feat_N, jax.nn.softmax(out.logits_N, axis=-1))
  d_logits = discriminate(losses.gradient_reversal(x_NxKxF, coeffs["grl_coeff"]))
  return {"mada": mada_loss(d_logits, out.mask_N)}


def objective(terms, coeffs, cfg):
  """CE + adv_weight·mada_weight·Σ_k L_k (the prototxt: CE + 0.3·Σ_k L_k); no D-only term."""
  del coeffs
  return terms["ce"] + cfg.loss.adv_weight * cfg.loss.mada_weight * terms["mada"], 0.0


metrics = dann.metrics  # DANN's: the GRL coefficient and the confident fraction
