"""The methods a config can train (``config.method``) and what each needs from the model.

One registry for the model (``models/heads.py``: which discriminator, how many BN branches), the
train and eval steps (which adversarial loss, which BN branch the target uses), the pretrained
loader (``models/torchvision_port.py``: how many branches receive the ImageNet statistics), sweeps
and ``config_check``. Imports nothing heavy: the config check reads it before JAX or Flax load.
"""

import dataclasses

from dsbn_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class MethodSpec:
  """What a method needs from the model: its adversary and whether BN is domain-specific."""

  adversary: str  # 'none' | 'dann' (1-logit D, domain BCE) | 'alda' (K-logit D, ALDA losses)
  dsbn: bool  # True: source uses BN branch 0, target branch 1; False: one shared branch

  @property
  def num_domains(self) -> int:
    return 2 if self.dsbn else 1

  @property
  def target_branch(self) -> int:
    """The BN branch the target domain goes through (training and evaluation)."""
    return 1 if self.dsbn else 0


METHODS = {
  "source_only": MethodSpec("none", dsbn=False),
  "dann": MethodSpec("dann", dsbn=False),
  "alda": MethodSpec("alda", dsbn=False),
  "alda_dsbn": MethodSpec("alda", dsbn=True),  # the paper's method
  "dann_dsbn": MethodSpec("dann", dsbn=True),
}


def method_spec(method: str) -> MethodSpec:
  """The ``MethodSpec`` of a config's ``method`` name; a clear error for an unknown one."""
  if method not in METHODS:
    raise UserError(f"unknown method {method!r} (config field method); valid: {', '.join(METHODS)}")
  return METHODS[method]
