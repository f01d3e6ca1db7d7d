"""What every command-line entry point shares: quiet library logs, one-line user errors."""

import os
import sys

from absl import logging

from dsbn_jax.errors import UserError


def quiet_library_logs() -> None:
  """absl INFO is orbax's chatter (dozens of lines per checkpoint); our progress goes to stdout."""
  if logging.get_verbosity() == logging.INFO and "--verbosity" not in " ".join(sys.argv):
    logging.set_verbosity(logging.WARNING)


def use_cpu_collectives() -> None:
  """Multi-process runs on CPU need a collectives backend: gloo (no effect on GPU/TPU)."""
  if os.environ.get("JAX_COORDINATOR_ADDRESS"):
    import jax
    jax.config.update("jax_cpu_collectives_implementation", "gloo")


def run_cli(fn, *args):
  """Calls ``fn``; a UserError becomes one line on stderr and exit status 2 (no traceback)."""
  try:
    return fn(*args)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)
