"""The pure training step (no devices, no I/O: ``sharding.py`` jits it; evaluation.py evaluates).

One step mirrors one iteration of the official ALDA ``train.py::train`` (docs/reference.md §1-§2):
1. source batch through G+C (BN branch 0), then target batch (branch 1 with DSBN, the shared
   branch 0 otherwise: ``methods.resolve(cfg).target_branch``): BN batch statistics are per
   domain, and the running statistics of the target call start from those the source call left,
   as torch updates them in place. The reference makes two calls, as here by default;
   ``model.fused_pass`` makes one over both batches interleaved, with the same maths
   (``_forward_both_domains``). A method that keeps the target out (``spec.uses_target=False``:
   source_only) makes the source call alone;
2. the source CE ('ce'), then the method's own terms (``loss_terms`` of its module, below): e.g.
   D on the concatenated bottleneck features [f_s; f_t] behind gradient reversal (coefficient
   ``calc_coeff(i + 1)``), ALDA's three terms or DANN's domain loss;
3. the method's objective: the loss G, C and D minimise (ALDA: CE_s + adv_weight·L_adv +
   adv_weight·λ_T(i)·L_T) plus any term whose gradient reaches D only (ALDA's L_reg);
4. one optimizer update for G, C and D together.

A method's module, ``dsbn_jax/methods/<spec.module>.py`` (``methods.method_module``), holds three
pure functions; the step does the forward pass, calls them and differentiates:

  loss_terms(out: StepOutputs, discriminate, coeffs: dict, cfg) -> dict[str, f32[]]
      Its terms (besides 'ce'), each logged as ``train/<name>``; differentiable in the params
      through ``out`` and ``discriminate``. ``discriminate(x)`` is D's forward (raw logits) in
      train mode on any input of ``spec.disc_input``'s form, with the step's one dropout key (the
      same masks at every call, as the reference's single D forward) and the padded rows of
      [source; target] (``out.mask_N``); the method applies the gradient reversal itself
      (``losses.gradient_reversal(x, coeffs['grl_coeff'])``). ``coeffs``: ``step_coefficients``.
  objective(terms: dict, coeffs: dict, cfg) -> (loss, d_only)
      ``loss`` (with ``terms['ce']``) is what G, C and D minimise, logged as ``train/loss``;
      ``d_only`` a term computed on detached inputs, whose gradient reaches D only, added to the
      differentiated total but not to ``loss`` (ALDA's L_reg; 0.0 for none).
  metrics(out: StepOutputs, coeffs: dict, cfg) -> dict[str, f32[]]
      Its diagnostics, logged as ``train/<name>`` beside loss, lr, source_acc, the terms, and
      target_acc when the target goes through the network.

A module serving several methods reads its options as ``dict(methods.resolve(cfg).spec.options)``.

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

import flax
import jax
import jax.numpy as jnp
import numpy as np
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


@flax.struct.dataclass
class StepOutputs:
  """What the forward pass gives a method: float32 features and logits of the real and padding
  rows of each domain (R rows), the source labels and the padding masks."""

  feat_s: jax.Array  # f32[R, F]: what the classifier and D read (bottleneck features)
  logits_s: jax.Array  # f32[R, K]
  labels_s: jax.Array  # i32[R]
  mask_s: jax.Array | None  # bool[R]: the real rows of a padded batch (None: every row is real)
  feat_t: jax.Array | None = None  # None: the target batch did not go through the network
  logits_t: jax.Array | None = None
  mask_t: jax.Array | None = None
  # (R_f f32[F, d], R_g f32[K, d]): the model's fixed matrices for disc_input='random' (CDAN's
  # randomized map; None for the other inputs), constants: read through stop_gradient.
  random_matrices: tuple | None = None

  @property
  def feat_N(self) -> jax.Array:
    """[f_s; f_t], f32[2R, F]: D's input rows, source first."""
    return jnp.concatenate([self.feat_s, self.feat_t])

  @property
  def logits_N(self) -> jax.Array:
    return jnp.concatenate([self.logits_s, self.logits_t])

  @property
  def mask_N(self) -> jax.Array | None:
    """The real rows of [source; target] (None: every row is real)."""
    return None if self.mask_s is None else jnp.concatenate([self.mask_s, self.mask_t])


def compute_loss_terms(apply_fn, params, batch_stats, batch, dropout_rng, coeffs, *, cfg):
  """Forward pass and every loss term of the config's method; differentiable in ``params``.

  ``coeffs``: ``step_coefficients`` of the step, or a bare number, the GRL coefficient alone (all
  that DANN's and ALDA's terms read). Returns ``(terms, aux)``: ``terms`` has 'ce' and the
  method's terms (DANN: 'dann'; ALDA: 'adv', 'reg', 'correct'); ``aux`` has the updated
  'batch_stats', the float32 'logits_s' / 'logits_t' ('logits_t' absent when the target stays
  out, source_only) and the method's ``StepOutputs`` ('outputs').
  """
  method = methods.resolve(cfg)
  module = methods.method_module(method)
  coeffs = coeffs if isinstance(coeffs, dict) else {"grl_coeff": coeffs}
  src, tgt = batch["source"], batch["target"]
  mask_s, mask_t = padding_mask(src, cfg), padding_mask(tgt, cfg)
  if method.spec.uses_target:
    (feat_s, logits_s), (feat_t, logits_t), new_stats = _forward_both_domains(
      apply_fn,
      params,
      batch_stats,
      src["image"],
      tgt["image"],
      target_branch=method.target_branch,
      fused=cfg.model.fused_pass,
      masks=None if mask_s is None else (mask_s, mask_t),
    )
  else:
    (feat_s, logits_s), upd = apply_fn(
      {"params": params, "batch_stats": batch_stats},
      src["image"],
      domain=0,
      train=True,
      mutable=["batch_stats"],
      mask=mask_s,
    )
    feat_t = logits_t = mask_t = None
    new_stats = upd["batch_stats"]
  random_matrices = None
  if method.spec.disc_input == "random":
    random_matrices = apply_fn({"params": params}, feat_s.shape[-1], method="random_matrices")
  out = StepOutputs(
    feat_s, logits_s, src["label"], mask_s, feat_t, logits_t, mask_t, random_matrices
  )
  terms = {"ce": losses.cross_entropy(logits_s, src["label"], mask_s)}
  aux = {"batch_stats": new_stats, "logits_s": logits_s, "outputs": out}
  if feat_t is not None:
    aux["logits_t"] = logits_t

  def discriminate(x):  # same rng each call -> the same dropout mask, like the single D forward
    return apply_fn(
      {"params": params},
      x,
      train=True,
      method="discriminate",
      rngs={"dropout": dropout_rng},
      mask=out.mask_N,
    )

  terms.update(module.loss_terms(out, discriminate, coeffs, cfg))
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


def step_coefficients(step, cfg) -> dict:
  """At step i: the GRL coefficient on D's input (``calc_coeff(i + 1)``), ALDA's L_T weight λ_T
  (``calc_coeff(i, high=trade_off)``) and CDAN+E's entropy GRL coefficient (``calc_coeff(i)``, what
  the official CDAN loop passes to ``loss.CDAN``; docs/reference.md §12)."""
  lc = cfg.loss
  return {
    "grl_coeff": losses.grl_coeff(step, lc.ramp_alpha, lc.ramp_max_steps),
    "lambda_t": losses.correct_loss_weight(step, lc.trade_off, lc.ramp_alpha, lc.ramp_max_steps),
    "entropy_coeff": losses.ramp(step, 1.0, lc.ramp_alpha, lc.ramp_max_steps),
  }


def train_step(state: TrainState, batch, rng: jax.Array, *, cfg):
  """One SGD step of ``cfg.method``; returns ``(new_state, metrics)`` (metrics: f32 scalars).

  ``rng`` is a fixed base key: the step number is folded in here, so a resumed run draws the same
  dropout masks as an uninterrupted one.
  """
  coeffs = step_coefficients(state.step, cfg)
  dropout_rng = jax.random.fold_in(rng, state.step)

  module = methods.method_module(methods.resolve(cfg))

  def loss_fn(params):
    terms, aux = compute_loss_terms(
      state.apply_fn, params, state.batch_stats, batch, dropout_rng, coeffs, cfg=cfg
    )
    loss, d_only = module.objective(terms, coeffs, cfg)
    return loss + d_only, (loss, terms, aux)

  grads, (loss, terms, aux) = jax.grad(loss_fn, has_aux=True)(state.params)
  new_state = state.apply_gradients(grads=grads, batch_stats=aux["batch_stats"])
  metrics = _train_metrics(state, batch, loss, terms, aux, coeffs, cfg)
  return new_state, metrics


def _accuracy(logits_BxK, labels_B, mask_B=None):
  return losses.masked_mean((jnp.argmax(logits_BxK, -1) == labels_B).astype(jnp.float32), mask_B)


def _train_metrics(state, batch, loss, terms, aux, coeffs, cfg) -> dict:
  """The logged scalars; the batch means are over the real rows."""
  out = aux["outputs"]
  metrics = {
    "train/loss": loss,
    "train/lr": optim.inv_schedule(cfg.optim)(state.step),
    "train/source_acc": _accuracy(out.logits_s, out.labels_s, out.mask_s),
  }
  metrics.update({f"train/{k}": v for k, v in terms.items()})
  if out.logits_t is not None:  # diagnostic only: the target labels never enter a loss
    metrics["train/target_acc"] = _accuracy(out.logits_t, batch["target"]["label"], out.mask_t)
  module = methods.method_module(methods.resolve(cfg))
  metrics.update({f"train/{k}": v for k, v in module.metrics(out, coeffs, cfg).items()})
  return jax.tree.map(lambda v: jnp.asarray(v, jnp.float32), metrics)


# The logged metrics that are the schedule's value at the logged step; every other metric is logged
# as its mean over the steps since the previous row (the log window).
SCHEDULE_METRICS = frozenset(
  {"train/lr", *(f"train/{k}" for k in ("grl_coeff", "lambda_t", "entropy_coeff"))}
)
# Slots of the on-device watch: the step's metrics in sorted-name order, zero-padded (a fixed shape,
# so the watch exists before the step's metrics are known, and the train loop compiles one step).
WATCH_SLOTS = 32


def empty_watch(window_sum=None, window_count: int = 0) -> dict:
  """The watch before any step (host values): no non-finite step, and the log window's sums
  (``window_sum``: ``WATCH_SLOTS`` values, a resumed run's saved window) over ``window_count``
  steps."""
  window_sum = np.zeros(WATCH_SLOTS, np.float32) if window_sum is None else window_sum
  return {
    "step": np.int32(0),
    "bad": np.zeros(WATCH_SLOTS, bool),
    "sum": np.asarray(window_sum, np.float32),
    "count": np.int32(window_count),
  }


def watch_step(watch: dict, metrics: dict, step) -> dict:
  """``watch`` after one more step (the train loop's on-device watch, fused into the step): the
  first step (``step``, the state's step count after it) whose metrics were not all finite (0 while
  there is none) and which slots those were, and the log window's metric sums and step count.
  Slot ``i`` holds ``sorted(metrics)[i]``."""
  names = sorted(metrics)
  if len(names) > WATCH_SLOTS:
    raise ValueError(f"{len(names)} metrics, more than train_step.WATCH_SLOTS={WATCH_SLOTS}")
  values = jnp.stack([jnp.asarray(metrics[k], jnp.float32) for k in names])
  values = jnp.pad(values, (0, WATCH_SLOTS - len(names)))
  bad = ~jnp.isfinite(values)
  first = (watch["step"] == 0) & jnp.any(bad)
  return {
    "step": jnp.where(first, jnp.asarray(step, jnp.int32), watch["step"]),
    "bad": jnp.where(first, bad, watch["bad"]),
    "sum": watch["sum"] + values,
    "count": watch["count"] + 1,
  }
