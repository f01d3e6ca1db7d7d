"""Helpers shared by the parity tests: torch <-> numpy layouts and a perturbed torchvision model."""

import numpy as np
import torch
import torchvision


def nhwc_to_nchw(x) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(np.asarray(x, np.float32).transpose(0, 3, 1, 2)))


def perturbed_resnet50(seed: int = 0) -> torch.nn.Module:
  """Random-init torchvision ResNet-50 whose every BN has non-trivial affine params and statistics.

  A fresh BN (gamma 1, beta 0, mean 0, var 1) is the identity in eval mode, which would let a swapped
  mean/var or scale/bias mapping pass; random values make every field count. The residual-branch
  gammas are kept small so activations stay O(1) through 16 blocks (absolute tolerances mean
  something).
  """
  torch.manual_seed(seed)
  model = torchvision.models.resnet50()
  g = torch.Generator().manual_seed(seed + 1)
  with torch.no_grad():
    for name, m in model.named_modules():
      if isinstance(m, torch.nn.BatchNorm2d):
        c = m.num_features
        hi = 0.4 if name.endswith("bn3") else 1.2
        m.weight.copy_(torch.rand(c, generator=g) * (hi - 0.2) + 0.2)
        m.bias.copy_(torch.rand(c, generator=g) * 0.4 - 0.2)
        m.running_mean.copy_(torch.rand(c, generator=g) * 0.4 - 0.2)
        m.running_var.copy_(torch.rand(c, generator=g) * 1.5 + 0.5)
  return model


def bn_modules(model: torch.nn.Module):
  """``{flax path tuple: BatchNorm2d}`` for every BN of a torchvision ResNet."""
  out = {}
  for name, m in model.named_modules():
    if isinstance(m, torch.nn.BatchNorm2d):
      parts = name.split(".")
      if parts[0].startswith("layer"):
        rest = ["downsample_bn"] if parts[2] == "downsample" else parts[2:]
        parts = [f"{parts[0]}_{parts[1]}", *rest]
      out[tuple(parts)] = m
  return out
