"""The pure training step (no devices, no I/O: ``sharding.py`` jits it; evaluation.py evaluates).

One step mirrors one iteration of the official ALDA ``train.py::train`` (docs/reference.md §1-§2):
1. source batch through G+C (BN branch 0), then target batch (branch 1 for DSBN methods, the shared
   branch 0 otherwise): BN batch statistics are per domain, and the running statistics of the
   target call start from those the source call left, as torch updates them in place. The
   reference makes two calls, as here by default; ``model.fused_pass`` makes one over both
   batches interleaved, with the same maths (``_forward_both_domains``);
2. D on the concatenated bottleneck features [f_s; f_t] behind gradient reversal (coefficient
   ``calc_coeff(i + 1)``), ALDA's three terms (or DANN's domain loss);
3. total = CE_s + adv_weight·L_adv + adv_weight·λ_T(i)·L_T, plus L_reg on D only;
4. one optimizer update for G, C and D together.

Batch format: ``{'source': {'image': f32[R,H,W,3], 'label': i32[R], 'mask': bool[R]}, 'target':
{...same}}``; the target labels are read only for the diagnostic ``train/target_acc``. A global
batch of ``cfg.batch_size`` (B) rows per domain is padded to R rows, a multiple of the device count
(``input_pipeline``), its real rows marked by 'mask' (optional: absent, every row is real). The
padding rows enter no loss, no BN statistic, no metric and no gradient, and D's dropout draws for
the real rows what it draws in the unpadded batch: the step computes what one device computes with
the B real rows. When no row is padded (R = B) the mask is not read: the step is op for op the
unpadded one.
"""

from typing import Any

import jax
import jax.numpy as jnp
from flax.training import train_state

from dsbn_jax import losses, methods, optim
from dsbn_jax.errors import UserError
from dsbn_jax.models import heads


class TrainState(train_state.TrainState):
  """params/opt_state/step (flax) + the BN running statistics of every domain branch."""

  batch_stats: Any


def create_train_state(
  rng: jax.Array,
  config,
  model: heads.AdaptationNet,
  image_shape: tuple[int, int, int],
  pretrained: dict | None = None,
) -> TrainState:
  """Randomly initialised state; pure, so it can run under ``jax.jit(..., out_shardings=...)``.

  ``pretrained`` (``torchvision_port.load_pretrained_backbone``) replaces the backbone's params
  and BN statistics. The optimizer state does not depend on param values (zero momentum), so
  initialising it before the replacement is the same as after.
  """
  x = jnp.zeros((1, *image_shape), jnp.float32)
  variables = model.init({"params": rng}, x, method="init_all")
  params, batch_stats = dict(variables["params"]), dict(variables["batch_stats"])
  if pretrained is not None:
    _check_same_structure(params["backbone"], pretrained["params"], "params")
    _check_same_structure(batch_stats["backbone"], pretrained["batch_stats"], "batch_stats")
    params["backbone"] = pretrained["params"]
    batch_stats["backbone"] = pretrained["batch_stats"]
  return TrainState.create(
    apply_fn=model.apply,
    params=params,
    batch_stats=batch_stats,
    tx=optim.create_optimizer(config.optim),
  )


def _check_same_structure(ours, theirs, what: str) -> None:
  shapes = lambda t: jax.tree.map(lambda v: tuple(v.shape), t)  # noqa: E731
  if jax.tree.structure(ours) != jax.tree.structure(theirs) or shapes(ours) != shapes(theirs):
    raise UserError(
      f"pretrained backbone {what} do not fit model.backbone; check "
      "model.pretrained_path and model.backbone"
    )


def compute_loss_terms(apply_fn, params, batch_stats, batch, dropout_rng, grl_coeff, *, cfg):
  """Forward pass and every loss term of ``cfg.method``; differentiable in ``params``.

  Returns ``(terms, aux)``: ``terms`` has 'ce' (+ 'dann', or 'adv', 'reg', 'correct'); ``aux`` has
  the updated 'batch_stats' and the float32 'logits_s' / 'logits_t' ('logits_t' absent for
  source_only). 'reg' is computed from *detached* features, so its gradient reaches D only.
  """
  spec = methods.method_spec(cfg.method)
  src, tgt = batch["source"], batch["target"]
  mask_s, mask_t = padding_mask(src, cfg), padding_mask(tgt, cfg)
  if spec.adversary == "none":
    # Source-only: the target batch never enters the network, so it cannot leak into the shared
    # BN statistics (that would be AdaBN-style adaptation, not the "ResNet-50" baseline).
    (_, logits_s), upd = apply_fn(
      {"params": params, "batch_stats": batch_stats},
      src["image"],
      domain=0,
      train=True,
      mutable=["batch_stats"],
      mask=mask_s,
    )
    return (
      {"ce": losses.cross_entropy(logits_s, src["label"], mask_s)},
      {"batch_stats": upd["batch_stats"], "logits_s": logits_s},
    )
  (feat_s, logits_s), (feat_t, logits_t), new_stats = _forward_both_domains(
    apply_fn,
    params,
    batch_stats,
    src["image"],
    tgt["image"],
    target_branch=spec.target_branch,
    fused=cfg.model.fused_pass,
    masks=None if mask_s is None else (mask_s, mask_t),
  )
  terms = {"ce": losses.cross_entropy(logits_s, src["label"], mask_s)}
  aux = {"batch_stats": new_stats, "logits_s": logits_s, "logits_t": logits_t}
  feat_Nxf = jnp.concatenate([feat_s, feat_t])
  mask_N = None if mask_s is None else jnp.concatenate([mask_s, mask_t])

  def discriminate(feat):  # same rng each call -> the same dropout mask, like the single D forward
    return apply_fn(
      {"params": params},
      feat,
      train=True,
      method="discriminate",
      rngs={"dropout": dropout_rng},
      mask=mask_N,
    )

  d_logits = discriminate(losses.gradient_reversal(feat_Nxf, grl_coeff))
  if spec.adversary == "dann":
    terms["dann"] = losses.dann_loss(d_logits, mask_N)
    return terms, aux
  probs_NxK = jax.nn.softmax(jnp.concatenate([logits_s, logits_t]), axis=-1)
  labels_s, threshold = src["label"], cfg.loss.threshold
  terms["adv"], _, terms["correct"] = losses.alda_losses(
    d_logits, labels_s, probs_NxK, threshold, mask_N
  )
  # train.py back-propagates reg_loss with every G/C param at requires_grad=False: it updates D
  # only. Same D forward (same dropout mask) on detached features gives exactly that gradient.
  _, terms["reg"], _ = losses.alda_losses(
    discriminate(jax.lax.stop_gradient(feat_Nxf)), labels_s, probs_NxK, threshold, mask_N
  )
  return terms, aux


def padding_mask(domain_batch: dict, cfg) -> jax.Array | None:
  """The real rows (bool[R]) of one domain's batch when it holds padding rows, else None.

  A batch is padded only beyond ``cfg.batch_size`` rows (``input_pipeline``): at exactly that
  many rows every row is real and the mask is not read, so the step keeps the unpadded path op for
  op (bit-identical results). A batch without 'mask' is all real.
  """
  mask = domain_batch.get("mask")
  if mask is None or domain_batch["image"].shape[0] == cfg.batch_size:
    return None
  return jnp.asarray(mask, jnp.bool_)


def _forward_both_domains(
  apply_fn, params, batch_stats, images_s, images_t, *, target_branch: int, fused: bool, masks=None
):
  """``(feat_s, logits_s), (feat_t, logits_t), new_batch_stats`` of G+C in train mode.

  ``masks``: the real rows ``(mask_s, mask_t)`` of padded batches (None: every row is real); the
  BN statistics see only those (interleaved like the images in the fused call).

  The reference makes two calls, source (branch 0) then target (``target_branch``), each normalised
  with its own batch statistics, the running statistics threaded from the first into the second.
  ``fused`` computes the same in one call over the 2B images interleaved (source row i, target row
  i, ...): every BN layer normalises each domain with its own statistics and branch and updates the
  running statistics in the same order (``DomainSpecificBatchNorm`` with a domain tuple).
  """
  variables = {"params": params, "batch_stats": batch_stats}
  mask_s, mask_t = (None, None) if masks is None else masks
  if not fused:
    out_s, upd = apply_fn(
      variables, images_s, domain=0, train=True, mutable=["batch_stats"], mask=mask_s
    )
    out_t, upd = apply_fn(
      {"params": params, "batch_stats": upd["batch_stats"]},
      images_t,
      domain=target_branch,
      train=True,
      mutable=["batch_stats"],
      mask=mask_t,
    )
    return out_s, out_t, upd["batch_stats"]
  b = images_s.shape[0]
  images = jnp.stack([images_s, images_t], axis=1).reshape((2 * b, *images_s.shape[1:]))
  mask = None if masks is None else jnp.stack([mask_s, mask_t], axis=1).reshape(2 * b)
  (feat, logits), upd = apply_fn(
    variables,
    images,
    domain=(0, target_branch),
    train=True,
    mutable=["batch_stats"],
    mask=mask,
  )
  split = lambda a: tuple(jnp.moveaxis(a.reshape((b, 2, *a.shape[1:])), 1, 0))  # noqa: E731
  (feat_s, feat_t), (logits_s, logits_t) = split(feat), split(logits)
  return (feat_s, logits_s), (feat_t, logits_t), upd["batch_stats"]


def total_loss(terms: dict, lambda_t, cfg) -> jax.Array:
  """train.py's ``total_loss`` = CE + transfer loss (L_reg is separate: it reaches only D)."""
  w = cfg.loss.adv_weight
  if "dann" in terms:
    return terms["ce"] + w * terms["dann"]
  if "adv" in terms:
    return terms["ce"] + w * terms["adv"] + w * lambda_t * terms["correct"]
  return terms["ce"]


def step_coefficients(step, cfg) -> dict:
  """GRL coefficient (``calc_coeff(i + 1)``) and L_T weight λ_T (``calc_coeff(i)``) at step i."""
  lc = cfg.loss
  return {
    "grl_coeff": losses.grl_coeff(step, lc.ramp_alpha, lc.ramp_max_steps),
    "lambda_t": losses.correct_loss_weight(step, lc.trade_off, lc.ramp_alpha, lc.ramp_max_steps),
  }


def train_step(state: TrainState, batch, rng: jax.Array, *, cfg):
  """One SGD step of ``cfg.method``; returns ``(new_state, metrics)`` (metrics: f32 scalars).

  ``rng`` is a fixed base key: the step number is folded in here, so a resumed run draws the same
  dropout masks as an uninterrupted one.
  """
  coeffs = step_coefficients(state.step, cfg)
  dropout_rng = jax.random.fold_in(rng, state.step)

  def loss_fn(params):
    terms, aux = compute_loss_terms(
      state.apply_fn, params, state.batch_stats, batch, dropout_rng, coeffs["grl_coeff"], cfg=cfg
    )
    loss = total_loss(terms, coeffs["lambda_t"], cfg)
    return loss + terms.get("reg", 0.0), (loss, terms, aux)

  grads, (loss, terms, aux) = jax.grad(loss_fn, has_aux=True)(state.params)
  new_state = state.apply_gradients(grads=grads, batch_stats=aux["batch_stats"])
  metrics = _train_metrics(state, batch, loss, terms, aux, coeffs, cfg)
  return new_state, metrics


def _accuracy(logits_BxK, labels_B, mask_B=None):
  return losses.masked_mean((jnp.argmax(logits_BxK, -1) == labels_B).astype(jnp.float32), mask_B)


def _train_metrics(state, batch, loss, terms, aux, coeffs, cfg) -> dict:
  """The logged scalars; the batch means are over the real rows."""
  adversary = methods.method_spec(cfg.method).adversary
  mask_s = padding_mask(batch["source"], cfg)
  metrics = {
    "train/loss": loss,
    "train/lr": optim.inv_schedule(cfg.optim)(state.step),
    "train/source_acc": _accuracy(aux["logits_s"], batch["source"]["label"], mask_s),
  }
  metrics.update({f"train/{k}": v for k, v in terms.items()})
  if adversary != "none":
    metrics["train/grl_coeff"] = coeffs["grl_coeff"]
    probs_t = jax.nn.softmax(aux["logits_t"], axis=-1)
    conf = losses.confident_mask(probs_t, cfg.loss.threshold)
    mask_t = padding_mask(batch["target"], cfg)
    metrics["train/confident_frac"] = losses.masked_mean(conf.astype(jnp.float32), mask_t)
    # Diagnostic only: the target labels never enter a loss.
    metrics["train/target_acc"] = _accuracy(aux["logits_t"], batch["target"]["label"], mask_t)
  if adversary == "alda":
    metrics["train/lambda_t"] = coeffs["lambda_t"]
  return jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), metrics)
