"""The methods a config can train (``config.method``), their BN (``model.bn``), one resolution.

A run trains one **method** with one **BN** choice, two independent axes:

- the method: ``METHODS`` maps its name to its light declaration (``MethodSpec``: which
  discriminator the model needs and what it feeds it, whether the target batch goes through the
  network, and the module ``dsbn_jax/methods/<module>.py`` that computes its losses; the interface
  of such a module is in ``train_step.py``'s docstring);
- the BN, ``model.bn``: 'shared' (one BN branch for both domains) or 'dsbn' (domain-specific BN,
  DSBN: the source goes through branch 0, the target through branch 1), for any method.

Names. ``config.method`` also takes ``<method>_dsbn`` (``alda_dsbn``, ``dann_dsbn``: the names runs
had before ``model.bn``): the method with DSBN. ``model.bn='auto'`` (the default, and what a
config.json written before the field means) takes the BN of the name: 'dsbn' for ``<method>_dsbn``,
else 'shared'. An explicit ``model.bn`` must agree with a ``_dsbn`` name (``alda_dsbn`` with
``model.bn='shared'`` is a one-line error); with a plain name it picks the BN (``alda`` with
``model.bn='dsbn'`` is ``alda_dsbn``). The **display name** of a pair -- sweep run folders, tables,
results.json, the default workdir -- is ``<method>`` for shared BN and ``<method>_dsbn`` for DSBN,
so the existing pairs keep the names they had (``alda_dsbn`` = ALDA with DSBN, the paper's method;
``alda`` = ALDA with shared BN).

CDAN's discriminator input is a config choice too: ``loss.cdan_randomized`` turns the
multilinear map of ``cdan``/``cdan_e`` into the randomized map (``Method.randomized``; the spec
then reads 'random', and the model holds the fixed matrices, width ``model.random_dim``).

``resolve(config)`` is the one resolution, read by the model (``models/heads.py``: the
discriminator, the number of BN branches), the pretrained loader (``models/torchvision_port.py``),
the train step (which module), evaluation (the target's BN branch), sweeps, reports and
``config_check``. This module imports nothing heavy: the config check reads it before JAX or Flax
load; the train step imports a method's module by name (``method_module``).
"""

import dataclasses
import importlib

from dsbn_jax.errors import UserError

# The discriminator kinds the model builds (models/heads.py), named after the method that brought
# each: 'dann' one logit (domain), 'alda' K logits, 'mada' K class-wise discriminators of one logit.
DISCRIMINATORS = ("none", "dann", "alda", "mada")
# What the discriminator reads (models/heads.py builds it for that width): 'features' the
# bottleneck features f [N, F]; 'multilinear' vec(g ⊗ f) [N, K*F] and 'random' the randomized map
# [N, d] (CDAN; the model stores the fixed random matrices); 'classwise' p_k·f [N, K, F] (MADA).
DISC_INPUTS = ("features", "multilinear", "random", "classwise")
BN = ("shared", "dsbn")  # what model.bn resolves to
BN_SETTINGS = ("auto", *BN)  # model.bn's values ('auto': the method name's BN)
DSBN_SUFFIX = "_dsbn"


@dataclasses.dataclass(frozen=True)
class MethodSpec:
  """What a method needs from the model and the step (names only: read before JAX loads)."""

  module: str  # dsbn_jax/methods/<module>.py: loss_terms, objective, metrics (train_step.py)
  discriminator: str = "none"  # DISCRIMINATORS
  disc_input: str = "features"  # DISC_INPUTS
  uses_target: bool = True  # False: the target batch never enters the network (source_only)
  # Keyword options of the module's functions, as (name, value) pairs, for modules that serve
  # several methods; read with ``dict(methods.resolve(cfg).spec.options)``.
  options: tuple = ()

  def __post_init__(self):
    if self.discriminator not in DISCRIMINATORS or self.disc_input not in DISC_INPUTS:
      raise ValueError(f"unknown discriminator or input in {self}")
    if (self.discriminator == "mada") != (self.disc_input == "classwise"):
      raise ValueError(f"the 'mada' discriminator reads, and only it, 'classwise' inputs: {self}")


METHODS = {
  # CE on the source only. The target never enters the network, so it cannot leak into the BN
  # statistics (that would be AdaBN-style adaptation, not the "ResNet-50" baseline).
  "source_only": MethodSpec("source_only", uses_target=False),
  "dann": MethodSpec("dann", discriminator="dann"),  # DANN: domain BCE, gradient reversal
  "alda": MethodSpec("alda", discriminator="alda"),  # ALDA; with DSBN, the paper's method
  # CDAN: DANN's 1-logit D on the multilinear map vec(g ⊗ f) (the randomized map with
  # loss.cdan_randomized); CDAN+E: the same D, BCE weighted by the prediction entropy.
  "cdan": MethodSpec("cdan", "dann", "multilinear", options=(("entropy", False),)),
  "cdan_e": MethodSpec("cdan", "dann", "multilinear", options=(("entropy", True),)),
  "jan": MethodSpec("jan"),  # JAN: joint MMD of (f, softmax), no discriminator
  "mada": MethodSpec("mada", "mada", "classwise"),  # MADA: K class-wise D_k on p_k·f
  "mcc": MethodSpec("mcc"),  # MCC: minimum class confusion of the target softmax
  "bnm": MethodSpec("bnm"),  # BNM: batch nuclear-norm maximisation of the target softmax
}


@dataclasses.dataclass(frozen=True)
class Method:
  """A method with its BN: what a run trains (``resolve``)."""

  name: str  # a key of METHODS
  bn: str  # 'shared' | 'dsbn'
  # loss.cdan_randomized: D reads the randomized map ('random') where the method's spec says
  # 'multilinear' (CDAN, CDAN+E); set by ``resolve`` only for such a method.
  randomized: bool = False

  @property
  def spec(self) -> MethodSpec:
    """The registry's spec, with disc_input 'random' for a randomized CDAN."""
    spec = METHODS[self.name]
    return dataclasses.replace(spec, disc_input="random") if self.randomized else spec

  @property
  def display_name(self) -> str:
    """``alda`` (shared BN), ``alda_dsbn`` (DSBN): run folders, tables, results.json."""
    return self.name + (DSBN_SUFFIX if self.dsbn else "")

  @property
  def dsbn(self) -> bool:
    return self.bn == "dsbn"

  @property
  def num_domains(self) -> int:
    """BN branches of the model: 2 with DSBN, else 1."""
    return 2 if self.dsbn else 1

  @property
  def target_branch(self) -> int:
    """The BN branch the target domain goes through (training and evaluation)."""
    return 1 if self.dsbn else 0

  @property
  def adversary(self) -> str:
    """The discriminator kind (``spec.discriminator``; this name predates the registry)."""
    return self.spec.discriminator


# Every valid config.method. A method that keeps the target out of the network (source_only) has
# no DSBN form: its target branch would never see an image (refused by ``resolve_name``).
NAMES = (*METHODS, *(m + DSBN_SUFFIX for m, spec in METHODS.items() if spec.uses_target))


def resolve_name(
  method: str, bn: str = "auto", *, method_field="config.method", bn_field="config.model.bn"
) -> Method:
  """``Method`` of a method name and a ``model.bn`` setting (module docstring); a one-line
  ``UserError`` for an unknown name or setting, or a ``_dsbn`` name with ``bn='shared'``.
  ``method_field`` / ``bn_field``: where the values come from, named in the messages."""
  # The method a name names: itself, or a '_dsbn' name's base ('source_only_dsbn' included, so
  # that it gets its own error below).
  named = isinstance(method, str)
  base = method.removesuffix(DSBN_SUFFIX) if named and method not in METHODS else method
  if not named or base not in METHODS:
    raise UserError(f"invalid {method_field}={method!r}; valid: {', '.join(NAMES)}")
  if not isinstance(bn, str) or bn not in BN_SETTINGS:
    raise UserError(f"invalid {bn_field}={bn!r}; valid: {', '.join(BN_SETTINGS)}")
  if base == method:
    resolved = Method(base, "shared" if bn == "auto" else bn)
  elif bn == "shared":
    raise UserError(
      f"invalid {bn_field}='shared' for {method_field}={method!r} ({base} with DSBN); use "
      f"{method_field}={base!r} for shared BN, or {bn_field}='auto'"
    )
  else:
    resolved = Method(base, "dsbn")
  if resolved.dsbn and not METHODS[base].uses_target:
    raise UserError(
      f"{base} with DSBN ({method_field}={method!r}, {bn_field}={bn!r}) is not a method: the "
      "target never enters the network, so its BN branch would be evaluated untrained; use "
      f"{bn_field}='shared' for {base}"
    )
  return resolved


def resolve(config) -> Method:
  """The ``Method`` of a whole config: ``config.method`` with ``config.model.bn`` ('auto' where a
  config, e.g. a config.json written before the field, lacks it), randomized when
  ``config.loss.cdan_randomized`` is set and the method's D reads the multilinear map."""
  model, loss = config.get("model") or {}, config.get("loss") or {}
  method = resolve_name(config.method, model.get("bn", "auto"))
  if loss.get("cdan_randomized", False) is True and method.spec.disc_input == "multilinear":
    return dataclasses.replace(method, randomized=True)
  return method


def method_module(method: Method):
  """The module computing ``method``'s losses (``dsbn_jax.methods.<spec.module>``; imports JAX)."""
  return importlib.import_module(f"{__name__}.{method.spec.module}")
