"""Two whole training steps of CDAN+E and MCC against the PyTorch reference iteration, each with
shared BN and with DSBN: the step, the method's loss written from its official code
(tests/torch_reference.py ``Trainer``), one SGD update, exactly as tests/train_step_test.py checks
ALDA and DANN, with the same tolerances (every loss term and coefficient 1e-5, every param and BN
statistic 1e-4 and within 1% of how far it moved)."""

import pytest

from tests.train_step_test import (
  TINY,
  assert_losses_match,
  assert_variables_match,
  make_config,
  run_both,
)


@pytest.mark.parametrize("method", ["cdan_e", "cdan_e_dsbn", "mcc", "mcc_dsbn"])
def test_two_steps_match_torch_small_resnet(method):
  """make_config's aggressive ramps: the entropy's GRL coefficient calc_coeff(i) is 0 at step 0
  and 0.99 at step 1, D's calc_coeff(i + 1) 0.99 at both; an off-default MCC temperature and
  transfer weight (0.7), so that a mis-read field or a mis-weighted term shows up."""
  cfg = make_config(method, **{**TINY, "stage_sizes": (1, 1)})
  cfg.loss.mcc_temperature = 1.7
  state, jm, tflat, tm, init = run_both(
    cfg, image_size=32, batch_size=6, feature_dim=TINY["num_filters"] * 2 * 4
  )
  if method.startswith("cdan_e"):
    assert [tm[i]["entropy_coeff"] for i in (0, 1)] == [0.0, pytest.approx(0.987, abs=1e-3)]
  print("losses max |dev|:", assert_losses_match(jm, tm, 1e-5))
  print("max |dev|, max dev/move:", assert_variables_match(state, tflat, init, 1e-4))
