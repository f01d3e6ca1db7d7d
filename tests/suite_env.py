"""What the suite shares without importing JAX: the compilation cache and subprocess environments.

The persistent JAX compilation cache: every compiled program (the smoke train and eval steps,
ResNet-50, ...) is written to ``CACHE_DIR`` the first time and loaded from there by every later
test, test process and ``python -m dsbn_jax.*`` subprocess the suite starts (the key holds the
program, the compile options, the devices and the jax/jaxlib version, so a stale entry is never
used). ``CACHE_DIR`` is the entry points' own default (``dsbn_jax.compile_cache.default_dir``:
``$XDG_CACHE_HOME/dsbn_jax/jax_compilation_cache``, ``~/.cache/...`` when that is unset), so that
every clone and worktree on this machine, and every run of the commands, shares it;
``<repo>/.pytest_cache/jax_compilation_cache`` (git-ignored) if that folder cannot be made. It is kept across runs and
pruned to its newest entries past ``CACHE_MAX_BYTES`` (``prune_cache``);
``JAX_COMPILATION_CACHE_DIR`` set in the environment takes its place, and
``DSBN_JAX_TEST_COMPILATION_CACHE=0`` turns the cache off. Deleting the folder empties it (the first
run after that compiles everything: the time a fresh CI machine takes).
"""

import os

from dsbn_jax import compile_cache, launcher  # import no JAX

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _default_cache_dir() -> str:
  path = compile_cache.default_dir()  # the entry points' own default
  if compile_cache.writable_dir(path) is None:
    return path
  return os.path.join(ROOT, ".pytest_cache", "jax_compilation_cache")


CACHE_DIR = os.environ.get(compile_cache.DIR_VAR) or _default_cache_dir()
CACHE_ENABLED = os.environ.get("DSBN_JAX_TEST_COMPILATION_CACHE", "1") != "0"
# Every program, however fast it compiles and however small: the suite compiles many small ones.
# The entry points (dsbn_jax/compile_cache.py) read the same variables; with the cache off, they
# are told so too.
CACHE_ENV = (
  {
    compile_cache.DIR_VAR: CACHE_DIR,
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": "0",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES": "-1",
  }
  if CACHE_ENABLED
  else {compile_cache.SWITCH: "0"}
)
# JAX's own size cap (jax_compilation_cache_max_size) needs the filelock package and locks every
# access; the suite prunes once per session instead.
CACHE_MAX_BYTES = 2 << 30


def prune_cache(max_bytes: int = CACHE_MAX_BYTES) -> None:
  """Deletes the oldest cache entries until the cache holds at most half of ``max_bytes``, when it
  holds more than ``max_bytes`` (entries of older code and jax versions are never read again)."""
  if not CACHE_ENABLED or not os.path.isdir(CACHE_DIR):
    return
  entries = []
  for entry in os.scandir(CACHE_DIR):
    try:
      if entry.is_file():
        st = entry.stat()
        entries.append((st.st_mtime, st.st_size, entry.path))
    except OSError:  # removed meanwhile by another process
      pass
  total = sum(size for _, size, _ in entries)
  if total <= max_bytes:
    return
  for _, size, path in sorted(entries):
    if total <= max_bytes // 2:
      break
    try:
      os.remove(path)
    except OSError:
      pass
    total -= size


# The variables of srun, mpirun and Cloud TPU workers (dsbn_jax/launcher.py reads them): a CI
# machine's own (the suite run inside a SLURM job, say) must never make a test's run join, or
# refuse, a launch. conftest drops them from the test process too (``drop_launcher_env``).
LAUNCHER_PREFIXES = launcher.CLUSTER_ENV_PREFIXES


def drop_launcher_env(environ=os.environ) -> None:
  """Removes the launchers' variables (``LAUNCHER_PREFIXES``) from ``environ``."""
  for k in [k for k in environ if k.startswith(LAUNCHER_PREFIXES)]:
    del environ[k]


def subprocess_env(devices: int, base=None, **extra) -> dict:
  """The environment of a ``python -m dsbn_jax.*`` subprocess on ``devices`` emulated CPU devices.

  ``base`` (default: this process's environment now) without its ``JAX_*`` and ``DSBN_JAX_*``
  variables nor a launcher's (``LAUNCHER_PREFIXES``; a test sets the ones it means, in
  ``extra``), plus the compilation cache's.
  """
  base = os.environ if base is None else base
  env = {
    k: v for k, v in base.items() if not k.startswith(("JAX_", "DSBN_JAX_", *LAUNCHER_PREFIXES))
  }
  env.update(CACHE_ENV)
  env.update(
    XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
    JAX_PLATFORMS="cpu",
    CUDA_VISIBLE_DEVICES="",
    TF_CPP_MIN_LOG_LEVEL="2",
  )
  env.update(extra)
  return env
