"""What every command-line entry point shares: quiet library logs, one-line user errors."""

import errno
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
    msg = re.sub(
      r": \('Non-boolean argument to boolean flag', .*\)$",
      " is not a boolean; valid: true, false",
      str(e),
    )
  except (AttributeError, KeyError) as e:  # ml_collections: no such config field
    while e.args and isinstance(e.args[0], BaseException):  # AttributeError(KeyError(text))
      e = e.args[0]
    msg = f"unknown config field {' '.join(str(e.args[0] if e.args else e).split())}"
  except (TypeError, ValueError) as e:  # ml_collections: a value of the wrong type
    msg = " ".join(str(e).split())
  print(f"error: bad command line: {msg} (see --helpfull)", file=sys.stderr, flush=True)
  sys.exit(2)


# A full disk (or a full quota) while writing anything: one line, exit 2, in every entry point.
DISK_FULL_ERRNOS = (errno.ENOSPC, errno.EDQUOT)
# What libraries that do not raise OSError (orbax/tensorstore, TensorFlow's file writers) put in
# their messages for the same errors.
DISK_FULL_TEXTS = tuple(os.strerror(n) for n in DISK_FULL_ERRNOS)
# The file such a message names (tensorstore: 'Failed writing: "<path>"', 'local file "<path>"');
# an orbax save in progress writes in '<step>.orbax-checkpoint-tmp...': the step folder is named.
_QUOTED_PATH = re.compile(r'(?:writing|file)[:\s]+"(/[^"]+)"')
_ORBAX_TMP = re.compile(r"\.orbax-checkpoint-tmp.*$")


def _chain(e: BaseException):
  """``e``, then its causes and contexts (what it was raised from or while handling)."""
  seen = set()
  while e is not None and id(e) not in seen:
    seen.add(id(e))
    yield e
    e = e.__cause__ or e.__context__


def disk_full(e: BaseException):
  """``(reason, path or None)`` if ``e`` (or what it was raised from or while handling) says the
  disk or the quota is full, else None. The path is the first file named along the chain."""
  reason, path = None, None
  for x in _chain(e):
    if isinstance(x, OSError) and x.errno in DISK_FULL_ERRNOS:
      found = os.strerror(x.errno)
    else:
      found = next((t for t in DISK_FULL_TEXTS if t in str(x)), None)
    if found:
      reason = reason or found
      named = getattr(x, "filename", None) if isinstance(x, OSError) else None
      if named is None and (quoted := _QUOTED_PATH.search(str(x))):
        named = _ORBAX_TMP.sub("", quoted.group(1))
      path = path or named
  return (reason, path) if reason else None


def disk_full_message(
  e: BaseException, *, where: str | None = None, resume: str = "run the same command again"
) -> str | None:
  """The one line for a full disk (None if ``e`` is not one): it starts with ``disk full``, names
  the file (or ``where``, when no file is known) and says what to do (``resume``)."""
  found = disk_full(e)
  if found is None:
    return None
  reason, path = found
  place = (
    f" while writing {os.fspath(path)}" if path else f" while writing in {where}" if where else ""
  )
  return f"disk full ({reason}){place}; free some space, then {resume}"


def run_cli(fn, *args):
  """Calls ``fn``; a UserError becomes one line on stderr and exit status 2 (no traceback).

  So does a full disk or quota (``OSError`` ENOSPC/EDQUOT, or a library error saying so) raised
  while writing anything (``disk_full_message``): one line starting ``error: disk full``.

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
    print(
      "\ninterrupted (no checkpoint written: training had not started, or Ctrl-C was "
      "pressed twice)",
      file=sys.stderr,
      flush=True,
    )
    sys.exit(130)
  except Exception as e:  # pylint: disable=broad-except  (only a full disk is answered here)
    msg = disk_full_message(e)
    if msg is None:
      raise
    print(f"error: {msg}", file=sys.stderr, flush=True)
    sys.exit(2)
