"""What every command-line entry point shares: quiet library logs, one-line user errors."""

import os
import re
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


def define_flag(define, name: str, *args, **kwargs):
  """``define(name, *args, **kwargs)`` (an absl or ml_collections ``DEFINE_*``), or the holder of
  the flag ``name`` when another entry point imported in the same process (tests import main,
  sweep and predict together) already defined it: absl refuses a second definition."""
  from absl import flags  # pylint: disable=g-import-not-at-top
  if name in flags.FLAGS:
    return flags.FlagHolder(flags.FLAGS, flags.FLAGS[name])
  return define(name, *args, **kwargs)


def parse_flags(argv):
  """absl's flag parsing, but a bad flag or config override is one line and exit status 2.

  A typo in a config field (``--config.optim.lr=0.1``) raises AttributeError inside
  ml_collections' parser, which absl would print as a chained traceback; a bad value
  (``--config.optim.lr0=abc``) would print absl's two-line "FATAL Flags parsing error".
  """
  from absl import flags  # pylint: disable=g-import-not-at-top
  try:
    return flags.FLAGS(argv)
  except flags.Error as e:  # a bad value or an unknown flag
    msg = re.sub(r": \('Non-boolean argument to boolean flag', .*\)$", " is not a boolean; valid: "
                 "true, false", str(e))
  except (AttributeError, KeyError) as e:  # ml_collections: no such config field
    while e.args and isinstance(e.args[0], BaseException):  # AttributeError(KeyError(text))
      e = e.args[0]
    msg = f"unknown config field {' '.join(str(e.args[0] if e.args else e).split())}"
  except (TypeError, ValueError) as e:  # ml_collections: a value of the wrong type
    msg = " ".join(str(e).split())
  print(f"error: bad command line: {msg} (see --helpfull)", file=sys.stderr, flush=True)
  sys.exit(2)


def run_cli(fn, *args):
  """Calls ``fn``; a UserError becomes one line on stderr and exit status 2 (no traceback).

  A run stopped by SIGINT/SIGTERM after saving its checkpoint (``run_control.Stopped``) prints
  that on stdout and exits with ``run_control.EXIT_STOPPED`` (75); a Ctrl-C before training
  started exits 130 with one line.
  """
  from dsbn_jax import run_control  # pylint: disable=g-import-not-at-top
  try:
    return fn(*args)
  except UserError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)
  except run_control.Stopped as e:
    import jax  # pylint: disable=g-import-not-at-top
    if jax.process_index() == 0:
      print(str(e), flush=True)
    sys.exit(run_control.EXIT_STOPPED)
  except KeyboardInterrupt:
    print("\ninterrupted (no checkpoint written: training had not started, or Ctrl-C was "
          "pressed twice)", file=sys.stderr, flush=True)
    sys.exit(130)
