"""The persistent JAX compilation cache of the entry points (main, sweep, predict) and the tests.

Every program a run compiles (the train and eval steps, the state's initialisation, the small
helpers around them) is written to a folder the first time and loaded from there by every later
run of the same program: a resumed run, the next seed or method of a sweep, ``predict`` after its
training, another clone. JAX's key holds the program, its compile options, the devices and the
jax/jaxlib version, so an entry of other code or another version is never used.

Where (``cache_dir``): ``$JAX_COMPILATION_CACHE_DIR`` when set, else
``$XDG_CACHE_HOME/dsbn_jax/jax_compilation_cache`` (``~/.cache/dsbn_jax/jax_compilation_cache``
without ``XDG_CACHE_HOME``): one per user, shared by every clone. ``DSBN_JAX_COMPILATION_CACHE=0``
turns it off. Every program is kept, however fast it compiled and however small
(``JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS`` / ``..._MIN_ENTRY_SIZE_BYTES`` set in the
environment are kept instead): JAX's default keeps only programs that took 1 s or more to compile,
so a second run would still compile every small one. JAX runs what the cache holds, so the folder
is created private to the user (mode 0700). A folder that cannot be created or written is one
warning line, and the run compiles without a cache.

This module imports nothing heavy: ``tests/suite_env.py`` reads ``default_dir`` before JAX loads.
"""

import os
import sys
import tempfile

SWITCH = "DSBN_JAX_COMPILATION_CACHE"  # "0": no persistent cache
DIR_VAR = "JAX_COMPILATION_CACHE_DIR"
# JAX's own variables for its thresholds; when unset, ``enable`` caches every program.
_THRESHOLDS = (
  ("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "jax_persistent_cache_min_compile_time_secs", 0.0),
  ("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "jax_persistent_cache_min_entry_size_bytes", -1),
)


def default_dir() -> str:
  """``$XDG_CACHE_HOME/dsbn_jax/jax_compilation_cache`` (``~/.cache`` without XDG_CACHE_HOME)."""
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return os.path.join(base, "dsbn_jax", "jax_compilation_cache")


def cache_dir() -> str:
  """The folder the cache uses: ``$JAX_COMPILATION_CACHE_DIR``, else ``default_dir()``."""
  return os.path.expanduser(os.environ.get(DIR_VAR) or default_dir())


def enabled() -> bool:
  return os.environ.get(SWITCH, "1").strip() != "0"


def writable_dir(path: str) -> str | None:
  """Creates ``path`` (private to the user) if needed and checks that a file can be written in
  it; None if so, else why not."""
  try:
    os.makedirs(path, mode=0o700, exist_ok=True)
    with tempfile.TemporaryFile(dir=path):
      pass
  except OSError as e:
    return e.strerror or str(e)
  return None


def enable(warn=None) -> str | None:
  """Turns JAX's persistent compilation cache on at ``cache_dir()`` (before the first compilation
  of the process: a cache already in use elsewhere is reset to this folder); returns the folder,
  or None when off (``DSBN_JAX_COMPILATION_CACHE=0``, or a folder that cannot be written: one
  ``warning:`` line through ``warn``, default stderr)."""
  import jax  # pylint: disable=g-import-not-at-top
  from jax.experimental.compilation_cache import compilation_cache  # pylint: disable=g-import-not-at-top

  path = cache_dir() if enabled() else None
  if path is not None and (why := writable_dir(path)) is not None:
    (warn or _stderr)(
      f"warning: the compilation cache {path} cannot be written ({why}); compiling without it "
      f"(set {DIR_VAR} to a writable folder, or {SWITCH}=0)"
    )
    path = None
  before = (jax.config.jax_enable_compilation_cache, jax.config.jax_compilation_cache_dir)
  jax.config.update("jax_enable_compilation_cache", path is not None)
  if path is not None:
    jax.config.update("jax_compilation_cache_dir", path)
    for variable, option, value in _THRESHOLDS:
      if variable not in os.environ:
        jax.config.update(option, value)
  after = (jax.config.jax_enable_compilation_cache, jax.config.jax_compilation_cache_dir)
  if after != before:  # JAX opens its cache once, at the first compilation: open it again
    compilation_cache.reset_cache()
  return path


def _stderr(line: str) -> None:
  print(line, file=sys.stderr, flush=True)
