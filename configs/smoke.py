"""Smoke test: a few steps of ALDA+DSBN on Digits -> Digits-M with a tiny setup (tests, CI).

  python -m dsbn_jax.main --config=configs/smoke.py --workdir=/tmp/smoke
Seconds on a CPU; the accuracy means nothing.
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # import configs.*

from configs import digits  # noqa: E402


def get_config():
  config = digits.get_config()
  config.batch_size = 8  # images per domain per step (divisible by 1, 2, 4 and 8 devices)
  config.total_steps = 6  # steps
  config.eval_every_steps = 3  # steps
  config.checkpoint_every_steps = 3  # steps
  config.log_every_steps = 1  # steps
  config.model.feature_dim = 32  # features
  config.model.disc_hidden_dim = 32  # units
  config.data.eval_batch_size = 64  # images per eval step (divisible by the device count)
  return config
