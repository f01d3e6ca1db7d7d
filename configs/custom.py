"""Your own images: any root/<domain>/<class>/*.{jpg,png} tree, ALDA + DSBN on ResNet-50.

  python -m dsbn_jax.main --config=configs/custom.py --config.data.manual_dir=/path/to/root \
      --config.data.source=photos --config.data.target=sketches
Classes are the sorted class-folder names (identical in both domains); Office-Home's recipe
(10k steps, lr0 1e-3, 10-crop evaluation) otherwise. Needs torchvision's resnet50-19c8e357.pth in
data/weights/ (or set --config.model.pretrained_path).
"""

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # import configs.*

from configs import data as data_lib  # noqa: E402
from configs import officehome  # noqa: E402


def get_config():
  config = officehome.get_config()
  config.data = data_lib.get_data_config("custom")
  config.sweep.tasks = ()  # set --tasks=src->tgt,... for dsbn_jax.sweep
  return config
