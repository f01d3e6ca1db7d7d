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


# The flags that name a file or folder (``define_flag(..., path=True)``): ``parse_flags`` expands
# a leading ``~`` in their values, as a shell does in ``--workdir ~/x`` but not in ``--workdir=~/x``
# (which would otherwise create a folder named ``~``).
PATH_FLAGS = set()


def define_config_flag():
  """The ``--config`` flag of main and sweep: an ml_collections config file (``~`` expanded)."""
  from ml_collections import config_flags  # pylint: disable=g-import-not-at-top

  return define_flag(
    config_flags.DEFINE_config_file,
    "config",
    None,
    "Experiment config file.",
    lock_config=True,
    path=True,
  )


def define_flag(define, name: str, *args, path: bool = False, **kwargs):
  """``define(name, *args, **kwargs)`` (an absl or ml_collections ``DEFINE_*``), or the holder of
  the flag ``name`` when another entry point imported in the same process (tests import main,
  sweep and predict together) already defined it: absl refuses a second definition. ``path``: the
  flag names a file or folder (``~`` expanded, ``PATH_FLAGS``)."""
  from absl import flags  # pylint: disable=g-import-not-at-top

  if path:
    PATH_FLAGS.add(name)
  if name in flags.FLAGS:
    return flags.FlagHolder(flags.FLAGS, flags.FLAGS[name])
  return define(name, *args, **kwargs)


def expand_paths(argv) -> list:
  """``argv`` with a leading ``~`` of every ``PATH_FLAGS`` value expanded (``--name=value`` and
  ``--name value``, one dash or two), as the config's path fields are."""
  out, i = list(argv[:1]), 1
  while i < len(argv):
    arg = argv[i]
    if arg == "--":  # the rest are positional arguments
      out += argv[i:]
      break
    m = re.fullmatch(r"(--?)([\w.-]+)(?:=(.*))?", arg, re.S)
    if m and m.group(2) in PATH_FLAGS:
      if m.group(3) is not None:
        arg = f"{m.group(1)}{m.group(2)}={os.path.expanduser(m.group(3))}"
      elif i + 1 < len(argv):
        out.append(arg)
        i += 1
        arg = os.path.expanduser(argv[i])
    out.append(arg)
    i += 1
  return out


def _flag_value(argv, name: str) -> str | None:
  """The last value ``argv`` gives the flag ``name`` (absl's rule), None if none."""
  value = None
  for i, arg in enumerate(argv[1:], 1):
    if arg == "--":
      break
    m = re.fullmatch(rf"--?{re.escape(name)}(?:=(.*))?", arg, re.S)
    if m:
      value = m.group(1) if m.group(1) is not None else (argv[i + 1] if i + 1 < len(argv) else None)
  return value


def _check_config_file(argv) -> str | None:
  """The file ``--config`` names (its ``:argument`` removed), None without one; a UserError when
  it is missing or not a regular file, checked before ml_collections runs it (a missing file would
  only fail at the first use of the config, with a traceback; a named pipe would block)."""
  value = _flag_value(argv, "config")
  if value is None:
    return None
  path = value.split(":", 1)[0]
  fix = "give a config file, e.g. --config=configs/digits.py"
  if not path:
    raise UserError(f"--config={value} names no file; {fix}")
  if not os.path.exists(path):
    where = "" if os.path.isabs(path) else f" (relative to {os.getcwd()})"
    raise UserError(f"--config={value}: no such file{where}; {fix}")
  if os.path.isdir(path):
    raise UserError(f"--config={value} is a folder, not a config file; {fix}")
  if not os.path.isfile(path):
    raise UserError(f"--config={value} is not a regular file; {fix}")
  return path


def _in_file(filename, path: str) -> bool:
  return bool(filename) and os.path.abspath(filename) == os.path.abspath(path)


def _config_file_error(e: BaseException, path: str) -> str | None:
  """Python's own report of an error in the config file ``path`` itself (a syntax error, or an
  exception its code raised), from its first frame in that file: none of ours, absl's or
  ml_collections' frames. None when ``e`` (and what it was raised from) did not come from there."""
  import traceback  # pylint: disable=g-import-not-at-top

  for x in _chain(e):
    if isinstance(x, SyntaxError) and _in_file(x.filename, path):
      return "".join(traceback.format_exception_only(type(x), x)).rstrip()
    tb = x.__traceback__
    while tb is not None and not _in_file(tb.tb_frame.f_code.co_filename, path):
      tb = tb.tb_next
    if tb is not None:
      return "".join(traceback.format_exception(type(x), x, tb, chain=False)).rstrip()
  return None


def _config_load_error(e: BaseException, value: str) -> str | None:
  """One line for a config file that could not be read (an ``OSError`` while loading it), or
  that defines no ``get_config``; None for another error."""
  for x in _chain(e):
    if isinstance(x, AttributeError) and getattr(x, "name", None) == "get_config":
      return (
        f"--config={value} defines no get_config(); a config file defines get_config() "
        "returning the config (e.g. configs/digits.py)"
      )
    if isinstance(x, OSError) and x.errno is not None:
      return (
        f"--config={value} cannot be read ({x.strerror or x}); check the file and its permissions"
      )
  return None


def _check_config_value(value: str) -> None:
  """The config flag holds a ConfigDict: ml_collections keeps an ``OSError`` raised while loading
  the file in a stand-in that raises it at the first use (a traceback in ``main``), and takes a
  ``get_config()`` that returns something else."""
  import ml_collections  # pylint: disable=g-import-not-at-top
  from absl import flags  # pylint: disable=g-import-not-at-top

  config = flags.FLAGS["config"].value
  if isinstance(config, ml_collections.ConfigDict):
    return
  error = vars(config).get("_error") if hasattr(config, "__dict__") else None
  if isinstance(error, BaseException):  # ml_collections' _ErrorConfig
    raise error
  raise UserError(
    f"--config={value}: get_config() returned {type(config).__name__}, not a "
    "ml_collections.ConfigDict; return the config (e.g. configs/digits.py)"
  )


def parse_flags(argv):
  """absl's flag parsing, but a bad flag or config override is one line and exit status 2.

  A typo in a config field (``--config.optim.lr=0.1``) raises AttributeError inside
  ml_collections' parser, which absl would print as a chained traceback; a bad value
  (``--config.optim.lr0=abc``) would print absl's two-line "FATAL Flags parsing error". A
  ``--config`` file that is missing or cannot be read is one line too; an error in the config
  file's own code is Python's report of it from the file's first frame on (file, line, error).
  The values of ``PATH_FLAGS`` have a leading ``~`` expanded (``expand_paths``).
  """
  from absl import flags  # pylint: disable=g-import-not-at-top

  config_file = value = None
  try:
    argv = expand_paths([argv[0], *flags.FLAGS.read_flags_from_files(argv[1:], force_gnu=False)])
    config_file = _check_config_file(argv) if "config" in flags.FLAGS else None
    value = _flag_value(argv, "config")
    parsed = flags.FLAGS(argv)
    if config_file is not None:
      _check_config_value(value)
    return parsed
  except UserError as e:
    print(f"error: {e}", file=sys.stderr, flush=True)
    sys.exit(2)
  except Exception as e:  # pylint: disable=broad-except  (classified below, else raised)
    if config_file is not None:
      if (report := _config_file_error(e, config_file)) is not None:
        print(
          f"error: --config={value} failed; the error in it:\n{report}",
          file=sys.stderr,
          flush=True,
        )
        sys.exit(2)
      if (line := _config_load_error(e, value)) is not None:
        print(f"error: {line}", file=sys.stderr, flush=True)
        sys.exit(2)
    if isinstance(e, flags.Error):  # a bad value or an unknown flag
      msg = re.sub(
        r": \('Non-boolean argument to boolean flag', .*\)$",
        " is not a boolean; valid: true, false",
        str(e),
      )
    elif isinstance(e, (AttributeError, KeyError)):  # ml_collections: no such config field
      while e.args and isinstance(e.args[0], BaseException):  # AttributeError(KeyError(text))
        e = e.args[0]
      msg = f"unknown config field {' '.join(str(e.args[0] if e.args else e).split())}"
    elif isinstance(e, (TypeError, ValueError)):  # ml_collections: a value of the wrong type
      msg = " ".join(str(e).split())
    else:
      raise
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
