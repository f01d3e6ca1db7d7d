"""Test set-up: 8 emulated CPU devices (set before jax is imported), strict rank promotion, the
persistent compilation cache (tests/suite_env.py), the Digits data prepared and the smoke config
trained once per session, and the subprocess runs some tests read started in the background when
the session starts."""

import collections.abc
import gc
import os

from tests import suite_env

os.environ["XLA_FLAGS"] = (
  os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
).strip()
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # CPU-only suite, even on a GPU host
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
suite_env.drop_launcher_env()  # srun's, mpirun's, a TPU VM's: in-process runs are one process
# Before jax is imported (it reads them then); the subprocesses the tests start inherit them
# through suite_env.subprocess_env.
os.environ.update(suite_env.CACHE_ENV)
suite_env.prune_cache()

# TensorFlow and triton (which torch/torchvision load) bundle clashing LLVM symbols: importing
# triton after TensorFlow segfaults the process. The suite uses both, so torch's stack loads first.
import torch  # noqa: E402,F401
import torchvision  # noqa: E402,F401

try:
  import triton  # noqa: E402,F401
except ImportError:
  pass

import jax  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_numpy_rank_promotion", "raise")
if suite_env.CACHE_ENABLED:
  jax.config.update("jax_compilation_cache_dir", suite_env.CACHE_DIR)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0)
  jax.config.update("jax_persistent_cache_min_entry_size_bytes", -1)

# The objects of the imports above (torch, TensorFlow, JAX: about a million) live as long as the
# session: kept out of the garbage collector's full passes, which would otherwise walk them all
# each time (tracing a model allocates enough to trigger several).
gc.freeze()


@pytest.fixture(scope="session")
def digits_data_dir(tmp_path_factory) -> str:
  """A TFDS data_dir holding the prepared Digits and Digits-M datasets (configs/smoke.py's data),
  built once per session and shared by every test (and subprocess) that trains on them. Tests
  only read it; one that must see a preparation happen uses its own data_dir."""
  from dsbn_jax.datasets import catalog  # pylint: disable=g-import-not-at-top
  from tests import data_fixtures  # pylint: disable=g-import-not-at-top

  data_dir = str(tmp_path_factory.mktemp("tfds_digits"))
  data = data_fixtures.get_data_config("digits")
  data.data_dir = data_dir
  info = catalog.get_data_info(data)
  assert (info.source.name, info.target.name) == ("digits", "digits_m")
  return data_dir


@pytest.fixture(scope="session")
def smoke_run(tmp_path_factory, digits_data_dir):
  """configs/smoke.py trained once per session, uninterrupted, on one CPU device: ``(workdir,
  result)``, ``result`` the exit status, stdout and stderr of the command
  (``python -m dsbn_jax.main --config=configs/smoke.py``, run in this process by
  tests/cli_driver.py). The yardstick of the resume tests and the source of the golden numbers;
  read only (copy it to change it)."""
  from tests import cli_driver  # pylint: disable=g-import-not-at-top

  workdir = tmp_path_factory.mktemp("smoke_run") / "run"
  result = cli_driver.run_main(workdir, digits_data_dir)
  assert result.returncode == 0, result.stderr[-3000:]
  return workdir, result


# Test modules whose ``background_jobs(session, root, data_dir)`` name subprocess runs to start
# when the session starts (see background_runs).
_BACKGROUND_MODULES = ("predict_checkpoint_test", "train_test")


@pytest.fixture(scope="session", autouse=True)
def background_runs(request, tmp_path_factory):
  """Futures of the subprocess runs the selected tests will read (``kill -9`` crashes, signals,
  two processes: what only a real ``python -m dsbn_jax.main`` process shows), by
  ``"<module>:<name>"``; started when the session starts, so that they run while the in-process
  tests before the ones reading them do (the in-process tests leave about half of this 2-core
  machine idle: imports, tracing and Python are single-threaded). One at a time when many other
  tests are selected, else two. Nothing starts when no module of ``_BACKGROUND_MODULES`` is
  selected. Under pytest-xdist (``bash run.sh test``: every worker collects every module, and
  ``--dist loadfile`` gives each module to one worker), a module's runs start when the first of
  them is read, one at a time (the other worker keeps the other core busy): ``_LazyRuns``."""
  import concurrent.futures  # pylint: disable=g-import-not-at-top
  import importlib  # pylint: disable=g-import-not-at-top

  items = request.session.items
  tests_dir = os.path.dirname(os.path.abspath(__file__))
  paths = [str(getattr(item, "path", "")) for item in items]
  jobs = {}
  for name in _BACKGROUND_MODULES:
    if os.path.join(tests_dir, f"{name}.py") in paths:
      module = importlib.import_module(f"tests.{name}")
      data_dir = request.getfixturevalue("digits_data_dir")
      root = tmp_path_factory.mktemp(f"{name}_subprocess_runs")
      for job, fn in module.background_jobs(request.session, root, data_dir).items():
        jobs[f"{name}:{job}"] = fn
  if not jobs:
    yield {}
    return
  others = sum(not any(p.endswith(f"{m}.py") for m in _BACKGROUND_MODULES) for p in paths)
  xdist = bool(os.environ.get("PYTEST_XDIST_WORKER"))
  pool = concurrent.futures.ThreadPoolExecutor(max_workers=1 if others > 50 or xdist else 2)
  if xdist:
    yield _LazyRuns(pool, jobs)
  else:
    yield {name: pool.submit(fn) for name, fn in jobs.items()}
  pool.shutdown(wait=True, cancel_futures=True)


class _LazyRuns(collections.abc.Mapping):
  """``background_runs`` under pytest-xdist: the runs of a module start when one of them is first
  read (``runs[key]``); ``values()`` are the started ones."""

  def __init__(self, pool, jobs: dict):
    self.pool, self.jobs, self.futures = pool, jobs, {}

  def __getitem__(self, key):
    if key not in self.futures:
      module = key.split(":")[0] + ":"
      for name, fn in self.jobs.items():
        if name.startswith(module) and name not in self.futures:
          self.futures[name] = self.pool.submit(fn)
    return self.futures[key]

  def __iter__(self):
    return iter(self.jobs)

  def __len__(self):
    return len(self.jobs)

  def values(self):
    return list(self.futures.values())
