"""Your own images: any root/<domain>/<class>/*.{jpg,png} tree, ALDA + DSBN on ResNet-50.

  python -m dsbn_jax.main --config=configs/custom.py --config.data.manual_dir=/path/to/root \
      --config.data.source=photos --config.data.target=sketches
Classes are the sorted class-folder names (identical in both domains); the Office recipe of
configs/officehome.py (10k steps, lr0 1e-3, 10-crop evaluation: the defaults of
dsbn_jax/config_defaults.py) otherwise. Needs torchvision's resnet50-19c8e357.pth in data/weights/
(or set --config.model.pretrained_path).
"""

from dsbn_jax import config_defaults


def get_config():
  config = config_defaults.get_config("custom")
  config.model.pretrained_path = "./data/weights/resnet50-19c8e357.pth"
  config.total_steps = 10000  # steps (Office-Home's)
  config.optim.lr0 = 1e-3  # Office-Home's
  config.sweep.tasks = ()  # set --tasks=src->tgt,... for dsbn_jax.sweep
  config.sweep.methods = ("source_only", "dann", "alda", "alda_dsbn")
  config.sweep.bn = ("auto",)  # each method with its name's BN: alda shared, alda_dsbn DSBN
  config.sweep.seeds = (0, 1, 2)
  return config
