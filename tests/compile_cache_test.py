"""The persistent compilation cache of the entry points (dsbn_jax/compile_cache.py): a second run
compiles nothing; a folder that cannot be written is one warning and the run goes on; a switch
turns it off."""

import collections

import jax
import pytest
from jax import monitoring

from dsbn_jax import compile_cache
from tests import cli_driver

_BACKEND_COMPILE = "/jax/core/compile/backend_compile_duration"  # a program compiled or loaded
_HITS = "/jax/compilation_cache/cache_hits"  # loaded from the cache
_MISSES = "/jax/compilation_cache/cache_misses"  # compiled and written to it
_OPTIONS = (
  "jax_enable_compilation_cache",
  "jax_compilation_cache_dir",
  "jax_persistent_cache_min_compile_time_secs",
  "jax_persistent_cache_min_entry_size_bytes",
)


@pytest.fixture
def own_cache(monkeypatch):
  """Within: the entry points choose the cache as outside the suite (its thresholds unset); after:
  the suite's cache as it was."""
  saved = {k: getattr(jax.config, k) for k in _OPTIONS}
  for name in (
    compile_cache.SWITCH,
    compile_cache.DIR_VAR,
    "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS",
    "JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES",
  ):
    monkeypatch.delenv(name, raising=False)
  yield monkeypatch
  for k, v in saved.items():
    jax.config.update(k, v)
  from jax.experimental.compilation_cache import compilation_cache  # pylint: disable=g-import-not-at-top

  compilation_cache.reset_cache()


def _counted(run) -> tuple:
  """``run()``'s result and the number of each compile event during it."""
  counts = collections.Counter()

  def event(name, **_):
    counts[name] += 1

  def duration(name, _secs, **__):
    counts[name] += 1

  monitoring.register_event_listener(event)
  monitoring.register_event_duration_secs_listener(duration)
  try:
    result = run()
  finally:
    monitoring.unregister_event_listener(event)
    monitoring.unregister_event_duration_listener(duration)
  return result, counts


def test_a_second_run_compiles_nothing(own_cache, tmp_path, digits_data_dir):
  """Two runs of configs/smoke.py with a new cache folder, each as a new process would start
  (``jax.clear_caches()``: no program in memory): the first writes every program it compiles,
  the second loads every one (with JAX's default, only programs that took 1 s to compile are
  kept: 7 of smoke's 9 would compile again)."""
  own_cache.setenv(compile_cache.DIR_VAR, str(tmp_path / "cache"))
  runs = []
  for name in ("first", "second"):
    jax.clear_caches()
    result, counts = _counted(lambda n=name: cli_driver.run_main(tmp_path / n, digits_data_dir))
    assert result.returncode == 0, result.stderr[-3000:]
    runs.append(counts)
  first, second = runs
  assert first[_MISSES] == first[_BACKEND_COMPILE] > 0 and first[_HITS] == 0, first
  assert second[_HITS] == second[_BACKEND_COMPILE] == first[_BACKEND_COMPILE], second
  assert second[_MISSES] == 0, second
  assert len(list((tmp_path / "cache").iterdir())) >= first[_MISSES]


def test_a_cache_folder_that_cannot_be_written_is_one_warning_and_no_cache(own_cache, tmp_path):
  """What every entry point calls first (main, sweep, predict): one warning line, then the run
  goes on without a cache (no training run here: that costs a cold compilation of everything)."""
  (tmp_path / "file").write_text("not a folder")
  bad = tmp_path / "file" / "cache"  # cannot be created, even by root
  own_cache.setenv(compile_cache.DIR_VAR, str(bad))
  warned = []
  assert compile_cache.enable(warned.append) is None
  assert warned == [
    f"warning: the compilation cache {bad} cannot be written (Not a directory); compiling "
    f"without it (set {compile_cache.DIR_VAR} to a writable folder, or "
    f"{compile_cache.SWITCH}=0)"
  ]
  assert not jax.config.jax_enable_compilation_cache


def test_the_switch_turns_the_cache_off_and_the_default_is_per_user(own_cache, tmp_path):
  own_cache.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert compile_cache.default_dir() == str(tmp_path / "xdg" / "dsbn_jax" / "jax_compilation_cache")
  assert compile_cache.enable() == compile_cache.default_dir()
  assert jax.config.jax_compilation_cache_dir == compile_cache.default_dir()
  assert jax.config.jax_persistent_cache_min_compile_time_secs == 0
  own_cache.setenv(compile_cache.SWITCH, "0")
  warned = []
  assert compile_cache.enable(warned.append) is None and not warned
  assert not jax.config.jax_enable_compilation_cache
