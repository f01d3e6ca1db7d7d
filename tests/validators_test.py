"""Label-free validators on hand-made inputs whose scores are known in closed form."""

import math

import numpy as np
import pytest

from dsbn_jax import validators

K = 4


def _one_hot(labels, k=K):
  return np.eye(k)[np.asarray(labels)]


UNIFORM = np.full((8, K), 1.0 / K)
BALANCED = _one_hot([0, 1, 2, 3, 0, 1, 2, 3])  # confident, every class twice
COLLAPSED = _one_hot([2] * 8)  # confident, one class only


def test_source_accuracy():
  probs = _one_hot([0, 1, 2, 3])
  assert validators.source_accuracy(probs, [0, 1, 0, 0]) == 50.0


def test_entropy_is_minus_log_k_for_uniform_and_zero_for_confident():
  assert validators.entropy(UNIFORM) == pytest.approx(-math.log(K))
  assert validators.entropy(BALANCED) == pytest.approx(0.0, abs=1e-9)
  assert validators.entropy(COLLAPSED) == pytest.approx(0.0, abs=1e-9)


def test_info_max_rewards_confident_and_balanced_only():
  assert validators.info_max(BALANCED) == pytest.approx(math.log(K))
  assert validators.info_max(COLLAPSED) == pytest.approx(0.0, abs=1e-9)
  assert validators.info_max(UNIFORM) == pytest.approx(0.0, abs=1e-9)
  half = np.array([[0.5, 0.5, 0, 0], [0, 0, 0.5, 0.5]])  # H(mean) = log 4, mean H = log 2
  assert validators.info_max(half) == pytest.approx(math.log(4) - math.log(2))


def test_snd_of_identical_predictions_is_log_of_neighbour_count():
  # Every other prediction is an equally close neighbour: the softmax over the n-1 is uniform.
  assert validators.snd(UNIFORM) == pytest.approx(math.log(7))
  assert validators.snd(COLLAPSED) == pytest.approx(math.log(7))


def test_snd_of_two_tight_clusters():
  # Rows 0-1 and 2-3 are one-hot on classes 0 and 1: each row's only close neighbour (cosine 1
  # against 0, at temperature 0.05) takes almost all of its softmax: entropy close to 0, and
  # exactly the closed form below.
  probs = _one_hot([0, 0, 1, 1])
  a = math.exp(1 / 0.05)
  p = np.array([a, 1, 1]) / (a + 2)
  assert validators.snd(probs) == pytest.approx(-np.sum(p * np.log(p)))


def test_bnm_is_one_for_confident_balanced_and_one_over_k_for_uniform():
  assert validators.bnm(BALANCED) == pytest.approx(1.0)
  assert validators.bnm(UNIFORM) == pytest.approx(1.0 / K)
  # collapsed: rank 1, one singular value sqrt(8), bound sqrt(8 * 4)
  assert validators.bnm(COLLAPSED) == pytest.approx(math.sqrt(8) / math.sqrt(32))


def test_dev_of_indistinguishable_domains_is_the_mean_source_loss():
  rng = np.random.default_rng(0)
  feats = rng.normal(size=(20, 3))
  losses = rng.uniform(0, 2, 20)
  w = validators.density_ratio(feats, feats)
  np.testing.assert_allclose(w, 1.0, atol=1e-6)
  assert validators.dev(feats, losses, feats) == pytest.approx(-losses.mean(), abs=1e-5)


def test_dev_weights_the_source_points_that_look_like_the_target():
  # Half the source sits where the target is (x = +3, loss 1), half far away (x = -3, loss 0):
  # the weighted risk is close to the near half's loss, not the plain mean 0.5.
  rng = np.random.default_rng(1)
  near, far = rng.normal(3, 0.3, (50, 1)), rng.normal(-3, 0.3, (50, 1))
  target = rng.normal(3, 0.3, (100, 1))
  losses = np.concatenate([np.ones(50), np.zeros(50)])
  risk = validators.dev_risk(validators.density_ratio(np.concatenate([near, far]), target), losses)
  assert 0.9 < risk < 1.1


def test_dev_risk_control_variate():
  w = np.array([1.0, 3.0])
  l = np.array([2.0, 1.0])
  # wl = [2, 3]; sample Cov(wl, w) = 1, Var(w) = 2 -> eta = -0.5;
  # mean(wl) + eta * mean(w) - eta = 2.5 - 1 + 0.5
  assert validators.dev_risk(w, l) == pytest.approx(2.0)
  assert validators.dev_risk(w, l) != pytest.approx(np.mean(w * l))  # the control variate acts
  assert validators.dev_risk(np.ones(3), l[:1].repeat(3)) == pytest.approx(2.0)  # constant w


def test_scores_computes_source_validators_only_with_the_source_split():
  assert set(validators.scores(BALANCED)) == set(validators.TARGET_ONLY)
  feats = np.random.default_rng(0).normal(size=(8, 2))
  full = validators.scores(BALANCED, feats, BALANCED, np.array([0, 1, 2, 3, 0, 1, 2, 3]), feats)
  assert set(full) == set(validators.NAMES)
  assert full['source_accuracy'] == 100.0
  assert full['dev'] == pytest.approx(0.0, abs=1e-5)  # every source loss is -log 1 = 0


def test_select_takes_the_largest_score_first_on_ties():
  evals = [
    {'step': 1, 'validators': {'entropy': -1.0}},
    {'step': 2, 'validators': {'entropy': -0.5}},
    {'step': 3, 'validators': {'entropy': -0.5}},
    {'step': 4},
  ]
  assert validators.select(evals, 'entropy')['step'] == 2
  assert validators.select(evals, 'snd') is None


def test_rank_correlation():
  assert validators.rank_correlation([1, 2, 3, 4], [10, 20, 30, 40]) == pytest.approx(1.0)
  assert validators.rank_correlation([1, 2, 3, 4], [4, 3, 2, 1]) == pytest.approx(-1.0)
  assert validators.rank_correlation([1, 2, 2, 3], [1, 2, 3, 4]) == pytest.approx(
    np.corrcoef([0, 1.5, 1.5, 3], [0, 1, 2, 3])[0, 1]
  )
  assert validators.rank_correlation([1, 2], [1, 2]) is None
  assert validators.rank_correlation([1, 1, 1], [1, 2, 3]) is None
