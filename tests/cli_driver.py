"""Runs an entry point (``dsbn_jax.main``, ``.sweep``, ``.predict``) as its command line does, minus
the process start: argv parsed by the entry point's absl flags (``parse_flags``, which ``app.run``
calls), then its ``main``. Exit status, stdout and stderr are returned as a subprocess would give
them, so that a test of a command needs no new process (each of which imports TensorFlow and JAX).

Flag state is global to the process: each call clears what the previous one parsed (the values,
and the ``--config.*`` override flags its ``--config`` defined). The entry points share their
common flags (``cli.define_flag``), so main, sweep and predict can run one after another.
"""

import contextlib
import dataclasses
import importlib
import io
import os
import sys
import traceback


@dataclasses.dataclass
class Result:
  returncode: object  # the exit status (an int), or "exception" when main raised (a traceback)
  stdout: str
  stderr: str


def _reset_flags() -> None:
  from absl import flags  # pylint: disable=g-import-not-at-top

  flags.FLAGS.unparse_flags()
  for name in [n for n in flags.FLAGS if n.startswith("config.")]:
    delattr(flags.FLAGS, name)  # the override flags the previous call's --config defined


def parse(entry: str, argv):
  """Only the flag parsing of ``run``: returns absl's FLAGS as ``main`` would read them (a bad
  flag is the SystemExit(2) of the entry point's ``parse_flags``)."""
  from absl import flags  # pylint: disable=g-import-not-at-top

  module = importlib.import_module(f"dsbn_jax.{entry}")
  saved_argv = sys.argv
  sys.argv = list(argv)
  try:
    _reset_flags()
    module.parse_flags(sys.argv)
  finally:
    sys.argv = saved_argv
  return flags.FLAGS


def run(entry: str, argv) -> Result:
  """``python -m dsbn_jax.<entry> argv[1:]`` in this process (``argv[0]`` is the program name)."""
  from absl import flags  # pylint: disable=g-import-not-at-top

  module = importlib.import_module(f"dsbn_jax.{entry}")
  saved_argv = sys.argv
  sys.argv = list(argv)  # ml_collections' config flag reads its overrides from here
  _reset_flags()
  out, err, rc = io.StringIO(), io.StringIO(), 0
  try:
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
      try:
        module.parse_flags(sys.argv)
        module.main(sys.argv[:1])
      except SystemExit as e:
        rc = e.code if e.code is not None else 0
      except Exception:  # pylint: disable=broad-except  (a traceback: reported, not raised)
        traceback.print_exc()
        rc = "exception"
  finally:
    sys.argv = saved_argv
    flags.FLAGS.unparse_flags()
  return Result(rc, out.getvalue(), err.getvalue())


@contextlib.contextmanager
def mesh_of(devices: int):
  """Within: runs build their mesh over this process's first ``devices`` devices (the suite
  emulates 8), as ``python -m dsbn_jax.main`` does on a host with that many."""
  import jax  # pylint: disable=g-import-not-at-top

  from dsbn_jax import sharding  # pylint: disable=g-import-not-at-top

  make_mesh = sharding.make_mesh
  sharding.make_mesh = lambda d=None: make_mesh(jax.devices()[:devices] if d is None else d)
  try:
    yield
  finally:
    sharding.make_mesh = make_mesh


@contextlib.contextmanager
def environ(**variables):
  """Within: these environment variables set (the test hooks ``DSBN_JAX_*_AT_STEP``)."""
  saved = {k: os.environ.get(k) for k in variables}
  os.environ.update({k: str(v) for k, v in variables.items()})
  try:
    yield
  finally:
    for k, v in saved.items():
      if v is None:
        os.environ.pop(k, None)
      else:
        os.environ[k] = v


SMOKE = os.path.join(
  os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "smoke.py"
)


def run_main(
  workdir, data_dir, *overrides, devices: int = 1, env=None, config: str = SMOKE
) -> Result:
  """``python -m dsbn_jax.main --config=configs/smoke.py --workdir=... --config.data.data_dir=...
  [overrides]`` in this process, on ``devices`` devices, with ``env`` set."""
  argv = [
    "main",
    f"--config={config}",
    f"--workdir={workdir}",
    f"--config.data.data_dir={data_dir}",
    *overrides,
  ]
  with mesh_of(devices), environ(**(env or {})):
    return run("main", argv)
