"""Target evaluation: the eval step, its forward pass over batches, and the accuracies.

Every place that evaluates or classifies with a model goes through here: the training loop
(``train._Run.run_eval``, which keeps the run's bookkeeping: best, history, best checkpoint),
``predict`` (a folder of images -> CSV) and ``benchmarks/dsbn_diagnostics.py``.

- ``eval_step``: pure; target-domain probabilities with BN in eval mode, through the target branch
  for DSBN methods, 10-crop averaged (``image_classification_test`` of the ALDA code).
- ``jit_eval_step``: it, compiled once over a mesh (batches sharded, state and outputs replicated).
- ``predict_batches``: the forward pass over an iterable of host batches, one host output per batch.
- ``evaluate``: every image of an evaluation set exactly once -> accuracy, per-class accuracy
  (None for a class without images), their mean, the confusion matrix.
- ``eval_state``: the state ``eval_step`` reads, from variables read off a checkpoint.
"""

import functools
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import struct

from dsbn_jax import device_augment, methods, reporting, sharding


class EvalState(struct.PyTreeNode):
  """What ``eval_step`` reads of a state (a ``train_step.TrainState`` has it too)."""

  apply_fn: Callable = struct.field(pytree_node=False)
  params: Any = None
  batch_stats: Any = None


def eval_state(apply_fn, params, batch_stats, mesh) -> EvalState:
  """A checkpoint's host ``params``/``batch_stats`` as a state for ``jit_eval_step`` on ``mesh``."""
  return sharding.replicate(EvalState(apply_fn, params, batch_stats), mesh)


def eval_step(state, batch, *, cfg, domain: int | None = None) -> dict:
  """Predictions with BN in eval mode through BN branch ``domain`` (None: the target's branch).

  ``batch``: ``{'image': f32[B,H,W,3] or f32[B,C,H,W,3] (C crops), or the square-resized
  u8[B,S,S,3] that ``device_augment.eval_images`` crops and normalises here, 'label': i32[B],
  'mask': bool[B]}``. With crops, the prediction is the argmax of the mean softmax over the C crops
  (``image_classification_test``) and the features are the mean over the crops. Returns per-example
  'probs' f32[B,K], 'features' f32[B,D] (what the classifier reads: the bottleneck's output),
  'pred'/'label' i32[B], 'mask' bool[B], and the masked counts 'num_correct'/'num_valid' (i32).
  """
  if domain is None:
    domain = methods.resolve(cfg).target_branch
  images = batch["image"]
  b = images.shape[0]
  if images.dtype == jnp.uint8:  # the resized images: crops and normalisation here
    images = device_augment.eval_images(images, cfg.data)
    keep = batch["mask"].astype(jnp.bool_).reshape((b,) + (1,) * (images.ndim - 1))
    images = jnp.where(keep, images, 0.0)  # padding rows zero, as the host path pads them
  if images.ndim == 5:  # fold the crop axis into the batch: eval-mode BN makes rows independent
    images = images.reshape((-1, *images.shape[2:]))
  features, logits = state.apply_fn(
    {"params": state.params, "batch_stats": state.batch_stats}, images, domain=domain, train=False
  )
  probs_BxCxK = jax.nn.softmax(logits, axis=-1).reshape((b, -1, logits.shape[-1]))
  probs_BxK = jnp.mean(probs_BxCxK, axis=1)
  features_BxD = jnp.mean(features.reshape((b, -1, features.shape[-1])), axis=1)
  pred_B = jnp.argmax(probs_BxK, axis=-1).astype(jnp.int32)
  mask_B = batch["mask"].astype(jnp.bool_)
  return {
    "probs": probs_BxK,
    "features": features_BxD.astype(jnp.float32),
    "pred": pred_B,
    "label": batch["label"],
    "mask": mask_B,
    "num_correct": jnp.sum((pred_B == batch["label"]) & mask_B, dtype=jnp.int32),
    "num_valid": jnp.sum(mask_B, dtype=jnp.int32),
  }


def jit_eval_step(mesh, cfg, domain: int | None = None):
  """``eval(state, global_batch) -> outputs`` through BN branch ``domain`` (None: the target's);
  outputs replicated so every host can read them."""
  rep = sharding.replicated(mesh)
  return jax.jit(
    functools.partial(eval_step, cfg=cfg, domain=domain),
    in_shardings=(rep, sharding.data_sharding(mesh)),
    out_shardings=rep,
  )


def predict_batches(eval_fn, state, batches: Iterable[dict], mesh) -> Iterator[dict]:
  """The forward pass over ``batches`` (this process's rows of each, host arrays): yields the host
  outputs of ``eval_fn`` (``eval_step``'s: 'probs', 'pred', 'label', 'mask', ...) per batch, in
  order. Batch k + 1 is dispatched before batch k's outputs are read, so the devices compute it
  while the host reads, and the caller uses, batch k (two batches in flight at most)."""
  pending = None
  for batch in batches:
    out = eval_fn(state, sharding.to_global(batch, mesh))
    if pending is not None:
      yield jax.device_get(pending)
    pending = out
  if pending is not None:
    yield jax.device_get(pending)


def summarize(confusion) -> dict:
  """Accuracy (%), per-class accuracy (None for a class without images: no accuracy to speak of,
  not 0 %), its mean over the classes with images, from a ``[true, predicted]`` count matrix."""
  confusion = np.asarray(confusion, np.int64)
  total = int(confusion.sum())
  counts = confusion.sum(1)
  per_class = [
    100.0 * (float(confusion[k, k]) / float(n)) if n else None for k, n in enumerate(counts)
  ]
  present = [a for a in per_class if a is not None]
  return {
    "accuracy": 100.0 * confusion.diagonal().sum() / max(total, 1),
    "per_class_accuracy": per_class,
    "mean_class_accuracy": sum(present) / len(present) if present else None,
    "confusion": confusion.tolist(),
    "num_images": total,
  }


def evaluate(eval_fn, state, eval_data, mesh, num_classes: int, say=None) -> dict:
  """Accuracy (%) over every image of ``eval_data`` exactly once (``summarize``), and the outputs
  the validators read: 'probs' f32[N,K], 'features' f32[N,D] and 'labels' i32[N] of the N real
  images, in evaluation order.

  ``eval_data``: ``input_pipeline.make_eval_data``'s (batches with a 'mask' for the padding, its
  ``len`` and ``num_examples``). ``say``: where an evaluation that lasts more than a minute reports
  its progress (batches, img/s, ETA; about every 30 s), e.g. a 10-crop evaluation of a whole
  Office domain on a CPU.
  """
  confusion = np.zeros((num_classes, num_classes), np.int64)
  kept = {"probs": [], "features": [], "label": []}
  t0 = t_said = time.perf_counter()
  n = len(eval_data)
  for i, out in enumerate(predict_batches(eval_fn, state, eval_data, mesh)):
    mask = np.asarray(out["mask"], bool)
    np.add.at(confusion, (np.asarray(out["label"])[mask], np.asarray(out["pred"])[mask]), 1)
    for k, rows in kept.items():
      rows.append(np.asarray(out[k])[mask])
    now = time.perf_counter()
    if say is not None and now - t0 > 60 and now - t_said > 30 and i + 1 < n:
      t_said, rate = now, (i + 1) / (now - t0)
      say(
        f"evaluating: batch {i + 1}/{n}, {rate * eval_data.num_examples / n:.1f} img/s, ETA "
        f"{reporting.fmt_duration((n - i - 1) / rate)}"
      )
  result = summarize(confusion)
  if result["num_images"] != eval_data.num_examples:
    raise RuntimeError(
      f"evaluated {result['num_images']} images, expected {eval_data.num_examples}"
    )
  result["probs"], result["features"], result["labels"] = (
    np.concatenate(kept[k]) for k in ("probs", "features", "label")
  )
  return result
