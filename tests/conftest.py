"""Test set-up: 8 emulated CPU devices (set before jax is imported), strict rank promotion."""

import os

os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                           " --xla_force_host_platform_device_count=8").strip()
os.environ.setdefault("CUDA_VISIBLE_DEVICES", "")  # CPU-only suite, even on a GPU host
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

# TensorFlow and triton (which torch/torchvision load) bundle clashing LLVM symbols: importing
# triton after TensorFlow segfaults the process. The suite uses both, so torch's stack loads first.
import torch  # noqa: E402,F401
import torchvision  # noqa: E402,F401
try:
  import triton  # noqa: E402,F401
except ImportError:
  pass

import jax  # noqa: E402

jax.config.update("jax_platforms", "cpu")
jax.config.update("jax_numpy_rank_promotion", "raise")
