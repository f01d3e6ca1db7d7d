"""Source only: the classifier trained on the labelled source alone (the "ResNet-50" baseline).

No term besides the step's source CE, no discriminator, and the target batch never enters the
network (``MethodSpec(uses_target=False)``): it cannot move the BN statistics either. The module
interface (``loss_terms``, ``objective``, ``metrics``) is in ``train_step.py``'s docstring.
"""


def loss_terms(out, discriminate, coeffs, cfg) -> dict:
  """No term besides the step's 'ce'."""
  del out, discriminate, coeffs, cfg
  return {}


def objective(terms, coeffs, cfg):
  """The source CE; nothing reaches D (there is none)."""
  del coeffs, cfg
  return terms["ce"], 0.0


def metrics(out, coeffs, cfg) -> dict:
  del out, coeffs, cfg
  return {}
