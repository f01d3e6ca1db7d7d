"""CDAN, CDAN+E, JAN, MADA, MCC and BNM on 8 devices, padded, in one fused backbone pass, equal
1 device with the reference's two calls: every param, BN statistic and metric.

One run per method compares both transformations at once: 1 device, two backbone calls, the
unpadded batch of 12 + 12 rows against 8 devices, ``model.fused_pass``, the batch padded to 16 + 16
rows (4 garbage rows per domain, masked), after 3 steps. What the two transformations touch does
not overlap -- the padding and the device count change where rows sit and which are masked, the
fused pass how the backbone is called -- and the method's loss is the same function of the step's
outputs in both runs; a fault in either would move some param, BN statistic or metric, and two
faults cancelling each other in every one of them to 1e-5 is not a chance event. So one
comparison proves both equalities, at half the programs to compile of two separate ones (each
transformation alone is tested for the older methods: tests/any_batch_test.py,
tests/train_step_test.py::test_fused_pass_equals_two_calls). The losses' own padding behaviour
(junk rows change nothing, get no gradient) is tests/method_losses_test.py's.

Each method also runs the checks of tests/methods_test.py's stepping test: the metrics it logs,
a discriminator exactly when it has one, and the BN branches it moves (one BN choice per method,
alternating, so that shared BN and DSBN each meet adversarial and discrepancy methods).
"""

import time

import numpy as np
import pytest
from flax import traverse_util

from dsbn_jax import methods, sharding
from tests.any_batch_test import _batches, _config, _host_state, _max_abs_difference, _pad, _train
from tests.methods_test import METRICS

DEVICES, BATCH = 8, 12  # 12 rows per domain -> 16 on 8 devices: 4 padded rows per domain
CASES = {  # method -> (model.bn, loss.cdan_randomized)
  "cdan": ("dsbn", True),  # CDAN's randomized map: the model's fixed matrices, through the step
  "cdan_e": ("shared", False),  # the multilinear map
  "jan": ("dsbn", False),
  "mada": ("shared", False),
  "mcc": ("dsbn", False),
  "bnm": ("shared", False),
}
TERM = {"cdan": "cdan", "cdan_e": "cdan", "jan": "jmmd", "mada": "mada", "mcc": "mcc", "bnm": "bnm"}


def test_the_cases_are_the_methods_registered_besides_the_first_three():
  assert set(CASES) == set(methods.METHODS) - {"source_only", "dann", "alda"}


def _method_config(method: str, fused: bool):
  bn, randomized = CASES[method]
  cfg = _config(method, fused, BATCH)
  cfg.model.bn, cfg.loss.cdan_randomized, cfg.model.random_dim = bn, randomized, 24
  return cfg


@pytest.mark.parametrize("method", list(CASES))
def test_8_devices_padded_and_fused_equal_1_device_with_two_calls(method):
  t0 = time.perf_counter()
  reference_cfg, cfg = _method_config(method, False), _method_config(method, True)
  resolved = methods.resolve(cfg)
  state = _host_state(reference_cfg)  # the same model and weights: fused_pass is not the model's
  batches = _batches(BATCH)
  rows = sharding.padded_batch_size(BATCH, DEVICES)
  assert rows > BATCH  # really padded
  reference = _train(reference_cfg, state, batches, 1)
  run = _train(cfg, state, [_pad(b, rows, seed=i) for i, b in enumerate(batches)], DEVICES)
  worst = _max_abs_difference(run, reference)
  print(f"{method}: max |diff| {worst:.2e} ({time.perf_counter() - t0:.1f} s)")
  assert worst <= 1e-5, f"{method}: max |diff| {worst:.2e}"

  variables, metrics = reference
  assert set(metrics[-1]) == {
    f"train/{k}" for k in {"loss", "ce", "lr", "source_acc"} | METRICS[method]
  }
  assert all(np.isfinite(float(v)) for m in metrics for v in m.values())
  assert all(float(m[f"train/{TERM[method]}"]) != 0.0 for m in metrics)  # the term is live
  has_disc = any(k[:2] == ("params", "disc") for k in variables)
  assert has_disc == (resolved.spec.discriminator != "none")
  assert any(k[:2] == ("params", "random_map") for k in variables) == resolved.randomized
  # The BN branches it moves: each one (with DSBN the target's own: the target goes through).
  initial = traverse_util.flatten_dict({"batch_stats": state.batch_stats})
  stats = [k for k in initial if k[1] == "backbone"]
  moved = [
    max(float(np.abs(variables[k][d] - initial[k][d]).max()) for k in stats) > 1e-7
    for d in range(resolved.num_domains)
  ]
  assert all(moved), moved
