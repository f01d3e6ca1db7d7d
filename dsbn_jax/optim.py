"""The reference optimizer in optax: Nesterov SGD, coupled weight decay, per-group lr, inv decay.

Reference (official ALDA ``train.py``/``lr_schedule.py``/``network.py``; docs/reference.md §5): one
``torch.optim.SGD(momentum=0.9, nesterov=True)`` over the groups backbone (lr x1), bottleneck and
classifier (x10) and D (x10), every group with weight decay 0.0005 x decay_mult 2 = 0.001; before
step i ``inv_lr_scheduler`` sets each group's lr to lr0 (1 + 0.001 i)^-0.75 x lr_mult.

torch's update per param (``_single_tensor_sgd``), with g the gradient:
  d = g + wd·w;  buf = d (first step) or 0.9·buf + d;  step = d + 0.9·buf;  w -= lr·step.
optax ``add_decayed_weights(wd)`` -> ``trace(0.9, nesterov=True)`` -> ``scale_by_learning_rate``
is the same computation: the trace starts at zeros, so its first value 0.9·0 + d = d is torch's
"buf starts at d"; the lr multiplies after the momentum, so the buffer is lr-free in both.
"""

import jax.numpy as jnp
import optax

from dsbn_jax.errors import UserError

# Top-level param name (``heads.AdaptationNet``) -> optimizer group. Every discriminator kind is
# 'disc' (lr x lr_mult_disc, the weight decay of every group). 'frozen': constants kept in params
# (CDAN's random matrices, ``heads.RandomMatrices``), never updated nor decayed.
OPTIMIZERS = ("sgd", "adam")  # optim.name
FROZEN = "frozen"
PARAM_GROUPS = {
  "backbone": "backbone",
  "bottleneck": "head",
  "classifier": "head",
  "disc": "disc",
  "random_map": FROZEN,
}


def inv_schedule(optim_cfg) -> optax.Schedule:
  """``lr_schedule.py::inv_lr_scheduler``: step i -> lr0 · (1 + gamma·i)^(-power) (base group)."""

  def schedule(step):
    i = jnp.asarray(step, jnp.float32)
    return optim_cfg.lr0 * (1.0 + optim_cfg.lr_gamma * i) ** (-optim_cfg.lr_power)

  return schedule


def lr_multipliers(optim_cfg) -> dict:
  """Group name -> lr multiplier (``get_parameters``' lr_mult)."""
  return {
    "backbone": optim_cfg.lr_mult_backbone,
    "head": optim_cfg.lr_mult_head,
    "disc": optim_cfg.lr_mult_disc,
  }


def param_labels(params) -> dict:
  """The optimizer group of every top-level subtree of ``params``."""
  unknown = sorted(set(params) - set(PARAM_GROUPS))
  if unknown:
    raise ValueError(f"params with no optimizer group: {unknown}; known: {sorted(PARAM_GROUPS)}")
  return {name: PARAM_GROUPS[name] for name in params}


def _group_optimizer(optim_cfg, lr_mult: float) -> optax.GradientTransformation:
  base = inv_schedule(optim_cfg)
  lr = lambda step: lr_mult * base(step)  # noqa: E731
  name = optim_cfg.get("name", "sgd")
  if name == "sgd":
    update = optax.sgd(lr, momentum=optim_cfg.momentum, nesterov=optim_cfg.nesterov)
  elif name == "adam":  # torch.optim.Adam(weight_decay=wd): coupled L2 before the moments
    update = optax.adam(lr, b1=optim_cfg.adam_b1, b2=optim_cfg.adam_b2, eps=optim_cfg.adam_eps)
  else:
    raise UserError(f"unknown optimizer config.optim.name={name!r}; valid: {', '.join(OPTIMIZERS)}")
  return optax.chain(
    optax.add_decayed_weights(optim_cfg.weight_decay),  # coupled L2: g + wd·w, on every param
    update,
  )


def create_optimizer(optim_cfg) -> optax.GradientTransformation:
  """One optimizer for G, C and D (the reference's single ``optimizer.step()``), lr per group.

  ``optim.name='adam'`` swaps in ``torch.optim.Adam``'s update (coupled L2 before the moments), the
  update rule of ALDA's digits scripts, but not their recipe (docs/reference.md §9): there G and D
  have separate Adams (lr 2e-4 or 1e-3, weight decay 5e-4), G's lr decays in steps (halved every
  5 or 6 epochs; x0.3 every 3 for SVHN) while D's never decays, and there are no lr multipliers.
  Here one optimizer keeps the config's inv schedule and multipliers for every group, D included.
  """
  transforms = {
    group: _group_optimizer(optim_cfg, mult) for group, mult in lr_multipliers(optim_cfg).items()
  }
  plain = optax.multi_transform(transforms, param_labels)
  # The 'frozen' group (set_to_zero: no update, no decay, no state) only for params that have one,
  # so that every other model's optimizer state, hence its checkpoints, keeps its structure.
  frozen = optax.multi_transform({**transforms, FROZEN: optax.set_to_zero()}, param_labels)
  pick = lambda tree: frozen if FROZEN in param_labels(tree).values() else plain  # noqa: E731
  return optax.GradientTransformationExtraArgs(
    lambda params: pick(params).init(params),
    lambda updates, state, params=None, **extra: pick(updates).update(
      updates, state, params, **extra
    ),
  )
