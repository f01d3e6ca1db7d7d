"""CDAN and CDAN+E (Long et al., NeurIPS 2018): the discriminator's input maps, its loss, and the
step's glue of both methods (``loss_terms``, ``objective``, ``metrics``: ``train_step.py``'s
docstring; the registry's option 'entropy' tells CDAN+E from CDAN).

The maps and the loss are pure functions, written from the official code (thuml/CDAN @ c904cd3 :
``pytorch/loss.py`` L9-45, ``pytorch/network.py`` L10-41; docs/reference.md §12), so that values
*and* gradients match torch autograd:

- D sees a map of the bottleneck features f and the **detached** classifier softmax g (the official
  map input is ``softmax_output.detach()``): the multilinear map vec(g ⊗ f), or the randomized map
  (f R_f / sqrt(d)) ⊙ (g R_g) with fixed N(0, 1) matrices (``RandomLayer``).
- The caller reverses the gradient on the map before D, as for DANN
  (``losses.gradient_reversal(h, losses.grl_coeff(step))``: D's own ``iter_num`` counts first).
- ``cdan_loss`` is DANN's BCE (source 1, target 0) without entropy, and the CDAN+E weighting with it:
  the entropy (of the *non-detached* softmax) goes through its own gradient reversal with the
  coefficient the training loop passes, ``calc_coeff(i)`` = ``losses.ramp(step)`` (one step behind
  D's); w = 1 + e^{-H}, normalised per domain by detached sums; Σ w·bce / Σ w (Σ w detached).
  TLlib detaches w and normalises it over the whole batch instead: we follow the official code.
"""

import jax
import jax.numpy as jnp

from dsbn_jax import losses, methods
from dsbn_jax.methods import dann

ENTROPY_EPS = 1e-5  # loss.py::Entropy: -Σ p log(p + 1e-5)


def entropy(probs_NxK: jax.Array) -> jax.Array:
  """Per-row entropy H = -Σ_k p log(p + 1e-5) (``loss.py::Entropy``), f32[N] >= 0; differentiable."""
  return jnp.sum(-probs_NxK * jnp.log(probs_NxK + ENTROPY_EPS), axis=1)


def multilinear_map(feat_NxF: jax.Array, probs_NxK: jax.Array) -> jax.Array:
  """vec(g ⊗ f): f32[N, K·F], element k·F + j = g_k f_j, the order of the official
  ``bmm(softmax.unsqueeze(2), feature.unsqueeze(1)).view(-1, K*F)``; g = ``probs`` detached."""
  n, k = probs_NxK.shape
  g_NxK = jax.lax.stop_gradient(probs_NxK)
  return (g_NxK[:, :, None] * feat_NxF[:, None, :]).reshape(n, k * feat_NxF.shape[1])


def random_matrices(rng: jax.Array, feat_dim: int, num_classes: int, dim: int = 1024):
  """The fixed matrices of the randomized map, ``RandomLayer``'s layout and law:
  ``(r_FxD, r_KxD)`` = (f32[F, d], f32[K, d]), entries N(0, 1), drawn once (keep them constant)."""
  rng_f, rng_g = jax.random.split(rng)
  return (
    jax.random.normal(rng_f, (feat_dim, dim), jnp.float32),
    jax.random.normal(rng_g, (num_classes, dim), jnp.float32),
  )


def random_map(
  feat_NxF: jax.Array, probs_NxK: jax.Array, r_FxD: jax.Array, r_KxD: jax.Array
) -> jax.Array:
  """``RandomLayer.forward([f, g])``: (f R_f / sqrt(d)) ⊙ (g R_g), f32[N, d]; g = ``probs`` detached.

  Same operation order as the reference (the first product divided by d^(1/2), then multiplied).
  """
  g_NxK = jax.lax.stop_gradient(probs_NxK)
  d = r_FxD.shape[1]
  return (feat_NxF @ r_FxD) / jnp.float32(d**0.5) * (g_NxK @ r_KxD)


def _per_domain_weights(entropy_N: jax.Array, mask_N: jax.Array | None) -> jax.Array:
  """w_n = 1 + e^{-H_n}, divided by the detached sum of its own domain's (real) rows."""
  b = entropy_N.shape[0] // 2
  w_N = 1.0 + jnp.exp(-entropy_N)
  if mask_N is not None:
    w_N = jnp.where(mask_N, w_N, 0.0)
  w_s, w_t = w_N[:b], w_N[b:]
  # A domain with no real row (all padding) would divide 0 by 0; its weights are 0 anyway.
  sum_s, sum_t = (jax.lax.stop_gradient(jnp.where(s > 0, s, 1.0)) for s in (w_s.sum(), w_t.sum()))
  return jnp.concatenate([w_s / sum_s, w_t / sum_t])


def cdan_loss(
  d_logits_Nx1: jax.Array,
  entropy_N: jax.Array | None = None,
  grl_coeff=None,
  mask: jax.Array | None = None,
) -> jax.Array:
  """CDAN's domain loss on D's raw logits, ``loss.py::CDAN`` after D (D's sigmoid is applied here).

  Args:
    d_logits_Nx1: f32[2B, 1], D on the map of [source; target] rows (source rows first).
    entropy_N: f32[2B], ``entropy(probs)`` of the non-detached softmax, for CDAN+E; None: plain
      CDAN, the mean BCE against 1 (source) / 0 (target), i.e. ``losses.dann_loss``.
    grl_coeff: the coefficient of the gradient reversal on the entropy (required with
      ``entropy_N``); the official loop passes ``calc_coeff(i)`` = ``losses.ramp(step)``.
    mask: bool[2B], the real rows of padded [source; target] batches (None: all real); padded rows
      enter neither the BCE, nor the weights, nor their per-domain sums.
  Returns:
    Scalar. CDAN+E: Σ_n w̃_n·bce_n / Σ_n w̃_n with w̃ = w_s/Σw_s on source rows and w_t/Σw_t on
    target rows, w = 1 + e^{-H}, every Σ detached (``.detach().item()`` in the reference), so the
    entropy's gradient flows through the numerators only, and is then multiplied by -grl_coeff.
  """
  n = d_logits_Nx1.shape[0]
  if d_logits_Nx1.shape != (n, 1) or n % 2:
    raise ValueError(f"cdan_loss wants (2B, 1) logits, got {d_logits_Nx1.shape}")
  if entropy_N is None:
    return losses.dann_loss(d_logits_Nx1, mask)
  if grl_coeff is None or entropy_N.shape != (n,):
    raise ValueError(
      f"CDAN+E wants entropy (2B,) and grl_coeff; got {entropy_N.shape}, {grl_coeff}"
    )
  b = n // 2
  domain_N = jnp.concatenate([jnp.ones((b,)), jnp.zeros((b,))])
  bce_N = losses.torch_bce(jax.nn.sigmoid(d_logits_Nx1[:, 0]), domain_N)
  if mask is not None:  # padded rows: no BCE, no weight (and no NaN from junk entropies)
    bce_N = jnp.where(mask, bce_N, 0.0)
    entropy_N = jnp.where(mask, entropy_N, 0.0)
  weight_N = _per_domain_weights(losses.gradient_reversal(entropy_N, grl_coeff), mask)
  return jnp.sum(weight_N * bce_N) / jax.lax.stop_gradient(jnp.sum(weight_N))


# ------------------------------------------------------------------------ the step (cdan, cdan_e)
def _uses_entropy(cfg) -> bool:
  return dict(methods.resolve(cfg).spec.options)["entropy"]


def loss_terms(out, discriminate, coeffs, cfg) -> dict:
  """'cdan': ``cdan_loss`` of D on the map of [f_s; f_t] and the detached softmax g -- the
  multilinear map, or the randomized one when the step hands the model's fixed matrices
  (``loss.cdan_randomized``) -- reversed with ``grl_coeff`` (``calc_coeff(i + 1)``); CDAN+E
  weights it by the entropy of the non-detached g, reversed with ``entropy_coeff``
  (``calc_coeff(i)``), as the official ``train_image.py`` calls ``loss.CDAN``."""
  probs_N = jax.nn.softmax(out.logits_N, axis=-1)
  if out.random_matrices is None:
    h = multilinear_map(out.feat_N, probs_N)
  else:
    h = random_map(out.feat_N, probs_N, *out.random_matrices)
  d_logits = discriminate(losses.gradient_reversal(h, coeffs["grl_coeff"]))
  if not _uses_entropy(cfg):
    return {"cdan": cdan_loss(d_logits, mask=out.mask_N)}
  return {"cdan": cdan_loss(d_logits, entropy(probs_N), coeffs["entropy_coeff"], out.mask_N)}


def objective(terms, coeffs, cfg):
  """CE + adv_weight·L_cdan (the official ``trade_off`` 1.0 is adv_weight's default); no D-only
  term."""
  del coeffs
  return terms["ce"] + cfg.loss.adv_weight * terms["cdan"], 0.0


def metrics(out, coeffs, cfg) -> dict:
  """DANN's (GRL coefficient, confident fraction), and CDAN+E's entropy coefficient."""
  extra = {"entropy_coeff": coeffs["entropy_coeff"]} if _uses_entropy(cfg) else {}
  return {**dann.metrics(out, coeffs, cfg), **extra}
