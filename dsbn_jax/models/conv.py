"""The backbone's convolution: ``nn.Conv`` as ResNet uses it, with 1x1 convs as matmuls on CPU.

Why: on CPU the convolutions are the train step's gap to PyTorch, and a 1x1 convolution is a
matmul over channels in disguise. Written as one (``dot_general`` over the channel axis; a
stride-2 1x1 is a stride-2 slice, then the matmul, since its window sees one pixel), it runs on
XLA:CPU's matmul path. For ResNet-50's 1x1 shapes at 8 images @ 224, forward + both gradients took
1.3 s instead of 3.2 s with XLA's convolution. The worst case was the kernel gradient of the
stride-2 downsample (56² -> 28², 256 -> 512), which dropped from 264 ms to 36 ms
(``benchmarks/conv_profile.py``, BENCHMARKS.md). The gradients need no custom rule: the transposes
of a matmul are matmuls, and that of the slice is a zero-interleaving pad.

Every other convolution (the 7x7 stem, the 3x3s) stays ``lax.conv_general_dilated``. On this XLA
none of the rewrites tried was measurably faster on CPU: stride-2 input gradients without
``lhs_dilation`` (by explicit zero dilation, which XLA folds back into the conv, or by output
phases), and kernel gradients by per-tap matmuls, im2col or space-to-depth. BENCHMARKS.md has the
numbers.

On GPU/TPU the plain convolution stays: cuDNN and the TPU compiler have their own 1x1 paths, and
nothing was measured there. ``impl`` chooses:

- ``'auto'``: the matmul form when JAX's default backend is CPU at trace time, the plain conv
  otherwise;
- ``'xla'``: always the plain conv;
- ``'matmul'``: always the matmul form, on any backend (for tests and measurements).

The module is the ``nn.Conv`` that ``resnet._conv`` used to configure, param for param: one
``kernel`` in HWIO ``(k, k, in, out)``, float32 ``param_dtype``, no bias, and explicit torchvision
padding ``k // 2`` on both sides. Input and kernel are cast to ``dtype`` for the compute (Flax's
``promote_dtype``). So ported torchvision weights and checkpoints do not change.
"""

from typing import Any, Callable

import flax.linen as nn
import jax
import jax.numpy as jnp
from flax.linen import dtypes
from jax import lax

from dsbn_jax.errors import UserError

IMPLS = ("auto", "xla", "matmul")  # model.conv_impl

_DIMENSION_NUMBERS = ("NHWC", "HWIO", "NHWC")


def conv_xla(x_NHWC, kernel_HWIO, stride: int):
  """The plain convolution, torchvision padding ``k // 2`` on every side."""
  pad = kernel_HWIO.shape[0] // 2
  return lax.conv_general_dilated(
    x_NHWC,
    kernel_HWIO,
    (stride, stride),
    ((pad, pad), (pad, pad)),
    dimension_numbers=_DIMENSION_NUMBERS,
  )


def conv_1x1_matmul(x_NHWC, kernel_HWIO, stride: int):
  """A 1x1 convolution as a channel matmul; a stride keeps every ``stride``-th row and column.

  Output size ``ceil(h / stride)`` = the convolution's ``(h - 1) // stride + 1`` (no padding).
  """
  if kernel_HWIO.shape[:2] != (1, 1):
    raise ValueError(f"conv_1x1_matmul needs a 1x1 kernel, got HWIO {kernel_HWIO.shape}")
  if stride != 1:
    x_NHWC = x_NHWC[:, ::stride, ::stride, :]
  return lax.dot_general(x_NHWC, kernel_HWIO[0, 0], (((3,), (0,)), ((), ())))


def uses_matmul(kernel_size: int, impl: str, backend: str | None = None) -> bool:
  """Whether a ``kernel_size`` convolution runs as a matmul under ``impl`` on ``backend``."""
  if impl not in IMPLS:
    raise UserError(
      f"unknown conv impl {impl!r} (config field model.conv_impl); valid: {', '.join(IMPLS)}"
    )
  if kernel_size != 1 or impl == "xla":
    return False
  return impl == "matmul" or (backend or jax.default_backend()) == "cpu"


def conv2d(x_NHWC, kernel_HWIO, stride: int, impl: str = "auto"):
  """``conv_xla`` or, where ``uses_matmul`` says so, ``conv_1x1_matmul``: the same values."""
  if uses_matmul(kernel_HWIO.shape[0], impl):
    return conv_1x1_matmul(x_NHWC, kernel_HWIO, stride)
  return conv_xla(x_NHWC, kernel_HWIO, stride)


class Conv(nn.Module):
  """Square ``kernel_size`` convolution of an NHWC batch, no bias, torchvision padding."""

  features: int
  kernel_size: int
  stride: int = 1
  kernel_init: Callable = nn.initializers.lecun_normal()
  dtype: Any = None  # compute dtype; None = promoted from the input and the kernel
  param_dtype: Any = jnp.float32
  impl: str = "auto"  # 'auto' | 'xla' | 'matmul' (module doc)

  @nn.compact
  def __call__(self, x_NHWC):
    if x_NHWC.ndim != 4:
      raise ValueError(f"Conv expects NHWC input, got shape {x_NHWC.shape}")
    k = self.kernel_size
    kernel_HWIO = self.param(
      "kernel", self.kernel_init, (k, k, x_NHWC.shape[-1], self.features), self.param_dtype
    )
    x_NHWC, kernel_HWIO = dtypes.promote_dtype(x_NHWC, kernel_HWIO, dtype=self.dtype)
    return conv2d(x_NHWC, kernel_HWIO, self.stride, self.impl)
