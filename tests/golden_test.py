"""Golden numbers: any change to what training computes, or to the input pipeline's pixels, fails.

Recorded once from the code into ``tests/golden/*.json``:

- ``smoke_3_steps.json``: configs/smoke.py trained on one CPU device (the session's ``smoke_run``
  of conftest.py: the command's own code, in-process): the metrics of its first 3 train steps (metrics.jsonl, without
  the timing) and a checksum of its step-3 checkpoint: per top-level entry of ``params``,
  ``batch_stats`` and ``opt_state``, the float64 sum, sum of |x| and sum of x^2 and the count.
- ``input_batches.json``: the first train batch of the smoke data (Digits -> Digits-M, 32 px, no
  crop), and the first train batch (random resized crop 224 + flip) and first eval batch (10
  crops of 224) of the custom-dataset config on a generated tree of PNG images: the labels
  exactly, and per image the sum, sum of |x| and sum of x^2 of its pixels.

Compared with rtol 1e-5 (a sum with atol 1e-5 x its sum of |x|): numbers of the same code on the
same platform agree far better; anything that changes a computation (a loss term, an
initialiser, the data order, a crop box, a resize filter) moves them by much more.

To regenerate after an intended change (review the diff of the JSON files before committing):

  DSBN_JAX_REGENERATE_GOLDEN=1 .venv/bin/python -m pytest tests/golden_test.py

which writes the files from the current code (the tests then pass on what they wrote).
"""

import json
import os

import jax
import numpy as np

from dsbn_jax import checkpointing, input_pipeline
from tests import data_fixtures as fx

GOLDEN_DIR = os.path.join(os.path.dirname(os.path.abspath(__file__)), "golden")
REGENERATE = os.environ.get("DSBN_JAX_REGENERATE_GOLDEN") == "1"
RTOL = 1e-5
STEPS = 3


def _moments(x) -> dict:
  x = np.asarray(x, np.float64)
  return {
    "n": int(x.size),
    "sum": float(x.sum()),
    "abs_sum": float(np.abs(x).sum()),
    "sq_sum": float((x * x).sum()),
  }


def _tree_checksum(tree) -> dict:
  """{"<collection>/<top-level entry>": moments over all its leaves}."""
  out = {}
  for collection in ("params", "batch_stats", "opt_state"):
    flat = jax.tree_util.tree_leaves_with_path(tree[collection])
    groups = {}
    for path, leaf in flat:
      key = jax.tree_util.keystr(path[:1]) if path else ""
      groups.setdefault(f"{collection}{key}", []).append(np.ravel(np.asarray(leaf, np.float64)))
    for name, parts in groups.items():
      out[name] = _moments(np.concatenate(parts))
  return out


def _batch_checksum(batch: dict) -> dict:
  """Labels exactly, and the moments of every image (the leading axis) of a batch."""
  return {
    "labels": np.asarray(batch["label"]).tolist(),
    "shape": list(np.shape(batch["image"])),
    "images": [_moments(image) for image in batch["image"]],
  }


def _compare(got, want, where="") -> list:
  """Differences between two golden trees (an empty list when they agree)."""
  if isinstance(want, dict):
    if not isinstance(got, dict) or set(got) != set(want):
      return [f"{where}: keys {sorted(got) if isinstance(got, dict) else got} != {sorted(want)}"]
    if set(want) == {"n", "sum", "abs_sum", "sq_sum"}:  # moments
      bad = []
      if got["n"] != want["n"]:
        bad.append(f"{where}: {got['n']} values, golden {want['n']}")
      scale = max(want["abs_sum"], got["abs_sum"])
      for key, atol in (("sum", RTOL * scale), ("abs_sum", 0.0), ("sq_sum", 0.0)):
        if not np.isclose(got[key], want[key], rtol=RTOL, atol=atol):
          bad.append(f"{where}.{key}: {got[key]!r}, golden {want[key]!r}")
      return bad
    return [d for k in sorted(want) for d in _compare(got[k], want[k], f"{where}/{k}")]
  if isinstance(want, list):
    if not isinstance(got, list) or len(got) != len(want):
      return [f"{where}: {got!r} != golden {want!r}"]
    if all(isinstance(v, int) for v in want):  # labels, shapes: exact
      return [] if got == want else [f"{where}: {got} != golden {want}"]
    return [d for i, (g, w) in enumerate(zip(got, want)) for d in _compare(g, w, f"{where}[{i}]")]
  if isinstance(want, float) or isinstance(got, float):
    return (
      [] if np.isclose(got, want, rtol=RTOL, atol=0.0) else [f"{where}: {got!r}, golden {want!r}"]
    )
  return [] if got == want else [f"{where}: {got!r} != golden {want!r}"]


def check_golden(name: str, got: dict) -> None:
  """Fails with every difference from ``tests/golden/<name>.json`` (or writes it: see above)."""
  path = os.path.join(GOLDEN_DIR, f"{name}.json")
  got = json.loads(json.dumps(got))  # the JSON round trip the stored numbers went through
  if REGENERATE:
    os.makedirs(GOLDEN_DIR, exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
      json.dump(got, f, indent=1, sort_keys=True)
      f.write("\n")
  with open(path, encoding="utf-8") as f:
    want = json.load(f)
  diffs = _compare(got, want)
  assert not diffs, (
    f"{len(diffs)} number(s) differ from {path} (if the change is intended, "
    "regenerate: see tests/golden_test.py):\n" + "\n".join(diffs[:40])
  )


def _smoke_config(data_dir):
  config = fx.get_config("smoke")
  config.data.data_dir = data_dir
  return config


def test_smoke_first_three_steps_metrics_and_parameters(smoke_run):
  workdir, _ = smoke_run  # configs/smoke.py as the command trains it on a CPU host (conftest.py)
  assert fx.get_config("smoke").checkpoint_every_steps == STEPS
  rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]
  metrics = [
    {k: v for k, v in r.items() if k.startswith("train/") and k != "train/images_per_s"}
    for r in rows
    if "train/loss" in r and r["step"] <= STEPS
  ]
  assert [r["step"] for r in rows if "train/loss" in r][:STEPS] == [1, 2, 3]
  step, state = checkpointing.read_state_arrays(str(workdir), STEPS)
  assert step == STEPS
  check_golden("smoke_3_steps", {"metrics": metrics, "state": _tree_checksum(state)})


def _png_tree(root) -> None:
  """2 domains x 3 classes x 2 PNG images of noise in odd sizes (lossless: the decoded pixels do
  not depend on the image library's version)."""
  rng = np.random.default_rng(1234)
  for domain in ("src", "tgt"):
    for c in ("c0", "c1", "c2"):
      for i in range(2):
        h, w = (int(v) for v in rng.integers(40, 90, 2))
        small = rng.integers(0, 256, (h // 4 + 1, w // 4 + 1, 3), dtype=np.uint8)
        image = np.repeat(np.repeat(small, 4, 0), 4, 1)[:h, :w]  # blocky: resizes see edges
        fx.write_image(os.path.join(root, domain, c, f"{i}.png"), image, "PNG")


def test_input_pipeline_first_batches(digits_data_dir, tmp_path):
  smoke = _smoke_config(digits_data_dir)
  batch = next(
    input_pipeline.make_train_iterator(
      smoke.data,
      global_batch_size=smoke.batch_size,
      seed=smoke.seed,
      process_index=0,
      process_count=1,
    )
  )
  got = {"smoke_train": {d: _batch_checksum(batch[d]) for d in ("source", "target")}}

  data = fx.get_data_config("custom")
  assert (data.resize_size, data.crop_size, data.eval_mode) == (256, 224, "10crop")
  _png_tree(str(tmp_path / "tree"))
  data.manual_dir, data.data_dir = str(tmp_path / "tree"), str(tmp_path / "tfds")
  data.source, data.target = "src", "tgt"
  batch = next(
    input_pipeline.make_train_iterator(
      data, global_batch_size=4, seed=0, process_index=0, process_count=1
    )
  )
  got["office_train_crop224"] = {d: _batch_checksum(batch[d]) for d in ("source", "target")}
  evaluation = next(
    iter(input_pipeline.make_eval_data(data, global_batch_size=2, process_index=0, process_count=1))
  )
  assert evaluation["mask"].all()
  got["office_eval_10crop224"] = _batch_checksum(evaluation)
  check_golden("input_batches", got)


def test_the_golden_comparison_sees_a_change_in_any_number():
  """The comparison itself: a perturbation of 1e-4 (relative) anywhere is a failure."""
  want = {
    "metrics": [{"train/loss": 2.5, "train/ce": 2.25}],
    "state": {"params['a']": {"n": 4, "sum": 0.5, "abs_sum": 3.0, "sq_sum": 2.0}},
    "labels": [1, 2],
  }
  assert _compare(json.loads(json.dumps(want)), want) == []
  for path, value in (
    (("metrics", 0, "train/ce"), 2.25 * (1 + 1e-4)),
    (("state", "params['a']", "sum"), 0.5 + 3e-4),
    (("state", "params['a']", "sq_sum"), 2.0 * (1 + 1e-4)),
    (("labels", 1), 3),
  ):
    got = json.loads(json.dumps(want))
    node = got
    for key in path[:-1]:
      node = node[key]
    node[path[-1]] = value
    assert _compare(got, want), path
  assert _compare({**want, "extra": 1}, want)
