"""Smoke test: a few steps of ALDA+DSBN on Digits -> Digits-M with a tiny setup (tests, CI).

  python -m dsbn_jax.main --config=configs/smoke.py --workdir=/tmp/smoke
Seconds on a CPU; the accuracy means nothing. The Digits recipe of configs/digits.py
(``dsbn_jax.config_defaults.get_config('digits')``), smaller and a few steps long.
"""

from dsbn_jax import config_defaults


def get_config():
  config = config_defaults.get_config("digits")
  config.method = "alda_dsbn"
  config.batch_size = 8  # images per domain per step
  config.total_steps = 6  # steps
  config.eval_every_steps = 3  # steps
  config.checkpoint_every_steps = 3  # steps
  config.log_every_steps = 1  # steps
  config.model.feature_dim = 32  # features
  config.model.disc_hidden_dim = 32  # units
  config.data.eval_batch_size = 64  # images per eval step
  config.sweep.methods = ("source_only", "alda_dsbn")  # as configs/digits.py
  return config
