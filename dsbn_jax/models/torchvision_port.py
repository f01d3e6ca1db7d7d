"""torchvision ResNet-50 state_dict (``.pth``) -> Flax variables of ``resnet.ResNet50``.

Mirrors the DSBN code's ``_update_initial_weights_dsbn``: conv weights are shared, and every
pretrained BatchNorm (weight, bias, running_mean, running_var) is copied identically into each domain
branch. ``fc.*`` is dropped (the classifier is a new head), ``num_batches_tracked`` is ignored (it only
matters for torch's momentum=None mode). Everything else is strict: a missing, unexpected or
mis-shaped key raises an error naming it. Reading the file needs no torch (``pth_reader``).

``load_pretrained_backbone(config)`` is what training calls: the weights of
``model.pretrained_path`` for the config's backbone and method (one BN copy per DSBN branch).

Weights to use for parity with ALDA: torchvision's ImageNet V1 file ``resnet50-19c8e357.pth`` (or its
zip re-save ``resnet50-0676ba61.pth``); docs/reference.md §4.
"""

import os
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

from dsbn_jax import methods
from dsbn_jax.errors import UserError
from dsbn_jax.models import resnet
from dsbn_jax.models.pth_reader import read_state_dict

WEIGHTS_HINT = (
  "torchvision's ImageNet V1 ResNet-50 weights, resnet50-19c8e357.pth "
  "(https://download.pytorch.org/models/resnet50-19c8e357.pth)"
)
_IGNORED = re.compile(r"^fc\.(weight|bias)$|\.num_batches_tracked$")
_BN_FIELDS = {
  "weight": ("params", "scale"),
  "bias": ("params", "bias"),
  "running_mean": ("batch_stats", "mean"),
  "running_var": ("batch_stats", "var"),
}


def _flax_path(torch_key: str):
  """``layer1.0.downsample.1.running_var`` -> ('batch_stats', ('layer1_0', 'downsample_bn', 'var'))."""
  *mods, field = torch_key.split(".")
  if len(mods) >= 3 and mods[0].startswith("layer"):  # layerX.Y.<module>[.0|.1]
    block = f"{mods[0]}_{mods[1]}"
    rest = mods[2:]
    if rest[0] == "downsample":
      rest = [{"0": "downsample_conv", "1": "downsample_bn"}.get("".join(rest[1:]), "?")]
    mods = [block] + rest
  if len(mods) != 1 + (mods[0].startswith("layer")):
    return None
  is_bn = mods[-1].startswith("bn") or mods[-1] == "downsample_bn"
  if is_bn and field in _BN_FIELDS:
    col, name = _BN_FIELDS[field]
    return col, (*mods, name)
  if not is_bn and field == "weight":
    return "params", (*mods, "kernel")
  return None


def expected_shapes(num_domains: int = 2):
  """Flat ``{(collection, path): shape}`` of ``ResNet50(num_domains)``, from ``jax.eval_shape``."""
  model = resnet.ResNet50(num_domains=num_domains)
  shapes = jax.eval_shape(
    lambda: model.init(jax.random.key(0), jnp.zeros((1, 64, 64, 3)), domain=0, train=False)
  )
  return {
    (col, path): v.shape
    for col in shapes
    for path, v in traverse_util.flatten_dict(shapes[col]).items()
  }


def convert_state_dict(state_dict, num_domains: int = 2, source: str = "state_dict"):
  """Maps a torchvision ResNet-50 state_dict (numpy arrays) to ``{'params', 'batch_stats'}``."""
  want = expected_shapes(num_domains)
  flat, seen, errors = {}, set(), []
  for key, value in state_dict.items():
    if _IGNORED.search(key):
      continue
    target = _flax_path(key)
    if target is None or target not in want:
      errors.append(f"unexpected key {key!r}")
      continue
    value = np.asarray(value, np.float32)
    if target[1][-1] == "kernel":
      value = value.transpose(2, 3, 1, 0)  # OIHW -> HWIO
    else:
      value = np.broadcast_to(value, (num_domains, *value.shape))  # same BN in every domain
    if value.shape != want[target]:
      shape = tuple(state_dict[key].shape)
      errors.append(f"key {key!r} has shape {shape}, expected one giving {want[target]}")
      continue
    flat[target] = value
    seen.add(target)
  errors += [f"missing key for {col}/{'/'.join(p)}" for col, p in sorted(set(want) - seen)]
  if errors:
    more = f" (+{len(errors) - 5} more)" if len(errors) > 5 else ""
    raise UserError(
      f"{source} is not a torchvision ResNet-50 state_dict: {'; '.join(errors[:5])}{more}"
    )
  out = {"params": {}, "batch_stats": {}}
  for (col, path), v in flat.items():
    out[col][path] = jnp.asarray(v)
  return {col: traverse_util.unflatten_dict(d) for col, d in out.items()}


def check_weights_file(path, config_field: str = "model.pretrained_path") -> str:
  """``path`` as a string if it is a file, else a one-line UserError saying what to download."""
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise UserError(
      f"weights file {path!r} (config field {config_field}) not found: download "
      f"{WEIGHTS_HINT} and put it there, or set --config.{config_field}=/path/to/it"
    )
  return path


def load_resnet50(path, num_domains: int = 2, config_field: str = "model.pretrained_path"):
  """Reads a torchvision ResNet-50 ``.pth`` (zip or legacy format, no torch needed).

  Args:
    path: the ``.pth`` file.
    num_domains: DSBN branches; each receives a copy of every pretrained BN.
    config_field: the config field that named ``path``, quoted in the error when it is missing.
  Returns:
    ``{'params': ..., 'batch_stats': ...}`` for ``resnet.ResNet50(num_domains=num_domains)``.
  """
  path = check_weights_file(path, config_field)
  return convert_state_dict(read_state_dict(path), num_domains, source=path)


def load_pretrained_backbone(config) -> dict | None:
  """Host ``{'params', 'batch_stats'}`` of the torchvision ResNet-50 at ``model.pretrained_path``.

  None when the path is empty (random init). Only ``resnet50`` has pretrained weights; every BN
  is copied into each DSBN branch, as the DSBN code does.
  """
  path = config.model.pretrained_path
  if not path:
    return None
  if config.model.backbone != "resnet50":
    raise UserError(
      f"model.pretrained_path is set but model.backbone is "
      f"{config.model.backbone!r}; pretrained weights exist only for resnet50"
    )
  num_domains = methods.resolve(config).num_domains
  return load_resnet50(path, num_domains=num_domains)
