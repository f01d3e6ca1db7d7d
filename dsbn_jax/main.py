"""Command line: ``python -m dsbn_jax.main --config=configs/officehome.py [--workdir=runs/x]``.

Overrides: ``--config.method=alda --config.data.source=Art --config.data.target=Clipart``. Problems
the user can fix (missing dataset or weights, unknown domain, workdir of another run...) print one
line and exit with status 2.
"""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402

from dsbn_jax import methods  # noqa: E402  (light: no JAX)
from dsbn_jax.cli import (
  define_config_flag,
  define_flag,
  parse_flags,
  quiet_library_logs,
  run_cli,  # noqa: E402
)

_CONFIG = define_config_flag()
_WORKDIR = define_flag(
  flags.DEFINE_string,
  "workdir",
  None,
  "Run directory (default: runs/<dataset>/<method>/<source>-<target>/"
  "seed<seed>); an existing run there is resumed.",
  path=True,
)


def default_workdir(config) -> str:
  d = config.data
  method = methods.resolve(config).display_name  # alda with model.bn=dsbn: alda_dsbn
  return os.path.join("runs", d.dataset, method, f"{d.source}-{d.target}", f"seed{config.seed}")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  quiet_library_logs()
  from dsbn_jax import compile_cache, config_check, sharding, train  # heavy: after flags

  compile_cache.enable()  # before anything compiles

  run_cli(sharding.maybe_initialize_distributed)  # dsbn_jax/launcher.py, before any device
  config = _CONFIG.value
  run_cli(config_check.validate, config)  # every field, before the workdir is created or touched
  workdir = _WORKDIR.value or default_workdir(config)
  logging.info("workdir %s", workdir)
  results = run_cli(train.train_and_evaluate, config, workdir)
  print(
    f"{results['method']} {results['source']} -> {results['target']}: target accuracy "
    f"best {results['best_accuracy']:.2f}% (step {results['best_step']}), last "
    f"{results['last_accuracy']:.2f}%; results in {os.path.join(workdir, 'results.json')}"
  )


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main, flags_parser=parse_flags)
