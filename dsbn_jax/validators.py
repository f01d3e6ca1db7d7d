"""Label-free model selection: validators computed from what a domain-adaptation user has.

The papers' `best` picks the evaluation with the highest accuracy on the *target labels*, which a
real user of unsupervised domain adaptation does not have. Each validator here scores one model
from source labels and unlabelled target predictions only; **higher is always better** (a risk
such as DEV's is negated), so every validator selects the evaluation with the largest score.

- ``source_accuracy``: accuracy (%) on held-out source images (a split of the source domain kept
  out of training).
- ``entropy``: minus the mean entropy of the target predictions (confident predictions score high).
- ``info_max``: information maximisation, the entropy of the mean target prediction minus the mean
  entropy (confident *and* class-balanced predictions score high; in [0, log K]).
- ``snd``: soft neighbourhood density (Saito et al., ICCV 2021): the mean entropy of each target
  prediction's softmax similarity (temperature 0.05) to the other target predictions.
- ``bnm``: batch nuclear norm (Cui et al., CVPR 2020) of the N x K target prediction matrix,
  normalised by its bound sqrt(N * min(N, K)): 1 for confident, class-balanced predictions, 1/K for
  uniform ones.
- ``dev``: deep embedded validation (You et al., ICML 2019): the source validation loss weighted by
  the density ratio p_target(x) / p_source(x), estimated by a logistic-regression domain classifier
  on the features, with the control variate that lowers its variance; the score is minus that risk.

Every function takes numpy arrays and returns a Python float, or raises ``Unscorable`` (a
``ValueError``) with the reason when its input is degenerate: no rows, too few rows for what it
measures (``snd`` and ``info_max`` need two target predictions, ``dev`` two source and two target
rows), or non-finite values. ``scores_and_reasons`` turns that into a ``None`` score and its reason;
``select`` and ``rank_correlation`` skip ``None``.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

import numpy as np

SND_TEMPERATURE = 0.05  # Saito et al.'s default
_EPS = 1e-12


class Unscorable(ValueError):
  """A validator cannot score this input; the message is the reason (one phrase)."""


def _rows(name: str, what: str, a, least: int = 1) -> np.ndarray:
  """``a`` as float64, or ``Unscorable`` when it has fewer than ``least`` rows or a non-finite
  value."""
  a = np.asarray(a, np.float64)
  if a.ndim == 0 or len(a) < least:
    n = 0 if a.ndim == 0 else len(a)
    need = what if least == 1 else f'at least {least} {what}'
    raise Unscorable(f'{name} needs {need} (has {n})')
  if not np.all(np.isfinite(a)):
    raise Unscorable(f'{name}: the {what} hold non-finite values')
  return a


def _entropies(probs: np.ndarray) -> np.ndarray:
  p = np.asarray(probs, np.float64)
  return -np.sum(p * np.log(np.clip(p, _EPS, None)), axis=-1)


def source_accuracy(source_probs: np.ndarray, source_labels: np.ndarray) -> float:
  """Accuracy (%) of the predictions on held-out, labelled source images."""
  p = _rows('source_accuracy', 'held-out source predictions', source_probs)
  return float(100.0 * np.mean(np.argmax(p, axis=-1) == np.asarray(source_labels)))


def entropy(target_probs: np.ndarray) -> float:
  """Minus the mean entropy (nats) of the target predictions [N, K]."""
  return float(-np.mean(_entropies(_rows('entropy', 'target predictions', target_probs))))


def info_max(target_probs: np.ndarray) -> float:
  """H(mean prediction) - mean H(prediction), nats: confident and class-balanced is best.

  Needs two predictions: of one, it is 0 whatever the model (no balance to measure).
  """
  p = _rows('info_max', 'target predictions', target_probs, least=2)
  return float(_entropies(p.mean(axis=0)) - np.mean(_entropies(p)))


SND_MAX_POINTS = 4096  # snd scores an evenly spaced subset of larger target sets (O(N^2) work)


def snd(target_probs: np.ndarray, max_points: int = SND_MAX_POINTS) -> float:
  """Soft neighbourhood density: mean entropy of each row's softmax similarity to the others.

  Above ``max_points`` predictions, an evenly spaced subset of that many is scored (deterministic),
  and the similarity rows are computed a block at a time, so memory stays near 256 x N floats.
  """
  p = _rows('snd', 'target predictions', target_probs, least=2)  # a point needs a neighbour
  if len(p) > max_points:
    p = p[np.linspace(0, len(p) - 1, max_points).round().astype(int)]
  n = p.shape[0]
  f = p / np.maximum(np.linalg.norm(p, axis=1, keepdims=True), _EPS)
  total = 0.0
  for start in range(0, n, 256):
    sim = f[start : start + 256] @ f.T / SND_TEMPERATURE
    rows = np.arange(len(sim))
    sim[rows, start + rows] = -np.inf  # a prediction is not its own neighbour
    sim -= sim.max(axis=1, keepdims=True)
    soft = np.exp(sim)
    soft /= soft.sum(axis=1, keepdims=True)
    total += float(np.sum(_entropies(soft)))
  return total / n


def bnm(target_probs: np.ndarray) -> float:
  """Nuclear norm of the [N, K] predictions over its bound sqrt(N * min(N, K)), in (0, 1]."""
  p = _rows('bnm', 'target predictions', target_probs)
  n, k = p.shape
  return float(np.linalg.svd(p, compute_uv=False).sum() / np.sqrt(n * min(n, k)))


def density_ratio(source_features: np.ndarray, target_features: np.ndarray) -> np.ndarray:
  """w(x) = p_target(x) / p_source(x) at the source features, from a domain classifier.

  A logistic regression (L2, C=1, on standardised features) tells target (1) from source (0);
  w = (N_s / N_t) * P(target | x) / P(source | x), which is 1 everywhere when the two sets are
  indistinguishable.
  """
  from sklearn import linear_model, preprocessing  # pylint: disable=g-import-not-at-top

  xs, xt = np.asarray(source_features, np.float64), np.asarray(target_features, np.float64)
  x = np.concatenate([xs, xt])
  y = np.concatenate([np.zeros(len(xs)), np.ones(len(xt))])
  scaler = preprocessing.StandardScaler().fit(x)
  clf = linear_model.LogisticRegression(C=1.0, max_iter=1000, random_state=0)
  clf.fit(scaler.transform(x), y)
  p_target = clf.predict_proba(scaler.transform(xs))[:, 1]
  p_target = np.clip(p_target, 1e-6, 1 - 1e-6)
  return (len(xs) / len(xt)) * p_target / (1.0 - p_target)


def dev_risk(weights: np.ndarray, losses: np.ndarray) -> float:
  """DEV's control-variate estimate of the target risk from weights w and source losses l.

  mean(w l) + eta * mean(w) - eta, with eta = -Cov(w l, w) / Var(w) (eta = 0 when w is constant).
  """
  w, l = np.asarray(weights, np.float64), np.asarray(losses, np.float64)
  wl = w * l
  var = np.var(w, ddof=1) if len(w) > 1 else 0.0
  eta = -np.cov(wl, w, ddof=1)[0, 1] / var if var > _EPS else 0.0
  return float(np.mean(wl) + eta * np.mean(w) - eta)


def dev(
  source_features: np.ndarray, source_losses: np.ndarray, target_features: np.ndarray
) -> float:
  """Minus the DEV risk of held-out source losses weighted towards the target features.

  Needs two source rows (the control variate's variance) and two target rows (the domain
  classifier's target class).
  """
  xs = _rows('dev', 'held-out source features', source_features, least=2)
  xt = _rows('dev', 'target features', target_features, least=2)
  losses = _rows('dev', 'held-out source losses', source_losses, least=2)
  return -dev_risk(density_ratio(xs, xt), losses)


# Every validator's name; `needs_source` marks those that need the held-out source split.
TARGET_ONLY = ('entropy', 'info_max', 'snd', 'bnm')
NEEDS_SOURCE = ('source_accuracy', 'dev')
NAMES = NEEDS_SOURCE + TARGET_ONLY


def _score(fn, *args) -> tuple[float | None, str | None]:
  """``(fn(*args), None)``, or ``(None, reason)`` when it cannot score (or gives a non-finite
  value)."""
  try:
    value = fn(*args)
  except Unscorable as e:
    return None, str(e)
  if not np.isfinite(value):
    return None, f'{fn.__name__} gave a non-finite score ({value})'
  return value, None


def scores_and_reasons(
  target_probs: np.ndarray,
  target_features: np.ndarray | None = None,
  source_probs: np.ndarray | None = None,
  source_labels: np.ndarray | None = None,
  source_features: np.ndarray | None = None,
) -> tuple[dict[str, float | None], dict[str, str]]:
  """``(scores, skipped)``: every validator computable from what is given (source ones only with
  the source split), ``None`` for one that cannot score this input, and ``skipped`` its reason."""
  calls = {fn.__name__: (fn, target_probs) for fn in (entropy, info_max, snd, bnm)}  # TARGET_ONLY
  if source_probs is not None and source_labels is not None:
    calls['source_accuracy'] = (source_accuracy, source_probs, source_labels)
    if source_features is not None and target_features is not None:
      labels = np.asarray(source_labels)
      p = np.asarray(source_probs, np.float64)[np.arange(len(labels)), labels]
      losses = -np.log(np.clip(p, _EPS, None))
      calls['dev'] = (dev, source_features, losses, target_features)
  out, skipped = {}, {}
  for name, (fn, *args) in calls.items():
    out[name], reason = _score(fn, *args)
    if reason is not None:
      skipped[name] = reason
  return out, skipped


def scores(
  target_probs: np.ndarray,
  target_features: np.ndarray | None = None,
  source_probs: np.ndarray | None = None,
  source_labels: np.ndarray | None = None,
  source_features: np.ndarray | None = None,
) -> dict[str, float | None]:
  """``scores_and_reasons``'s scores alone (``None``: the validator cannot score this input)."""
  return scores_and_reasons(
    target_probs, target_features, source_probs, source_labels, source_features
  )[0]


def select(evals: Sequence[Mapping], name: str) -> Mapping | None:
  """The evaluation a validator picks: the largest ``evals[i]['validators'][name]`` (first on ties).

  None when no evaluation has a score of that validator (absent, or ``None``: it could not score).
  """
  scored = [e for e in evals if e.get('validators', {}).get(name) is not None]
  if not scored:
    return None
  return max(scored, key=lambda e: e['validators'][name])  # max keeps the first of equal scores


def rank_correlation(x: Sequence[float | None], y: Sequence[float | None]) -> float | None:
  """Spearman's rank correlation (ties get their mean rank) over the pairs without a ``None``;
  None below 3 such pairs or if constant."""
  pairs = [(a, b) for a, b in zip(x, y, strict=True) if a is not None and b is not None]
  x, y = (np.asarray([p[i] for p in pairs], np.float64) for i in (0, 1))
  if len(x) < 3:
    return None
  rx, ry = _ranks(x), _ranks(y)
  if np.std(rx) == 0 or np.std(ry) == 0:
    return None
  return float(np.corrcoef(rx, ry)[0, 1])


def _ranks(v: np.ndarray) -> np.ndarray:
  order = np.argsort(v, kind='stable')
  ranks = np.empty(len(v))
  ranks[order] = np.arange(len(v), dtype=np.float64)
  for value in np.unique(v):  # mean rank of ties
    tie = v == value
    ranks[tie] = ranks[tie].mean()
  return ranks
