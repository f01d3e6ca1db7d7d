"""Does domain-specific BN (DSBN) add anything over shared BN? BN statistics of finished runs.

For each finished training workdir of `alda` (one shared BN branch; source and target batches go
through the backbone in separate calls, so the *training-time* batch statistics are per domain, but
the running statistics used at evaluation are an average over both domains' batches) and
`alda_dsbn` (two branches: 0 = source, 1 = target, each with its own scale/bias and running
mean/var; evaluation uses branch 1), the script loads the latest checkpoint and measures:

- **acc running**: target accuracy (%) on the protocol's held-out target split (`data.eval_split`
  is forced to '', whatever the run was trained with; `digits_m/test` for Digits -> Digits-M) with
  the stored running statistics of the evaluated branch (shared branch 0 for `alda`, target
  branch 1 for `alda_dsbn`), through the training loop's own `dsbn_jax.evaluation` (`evaluate`,
  `eval_step`).
  Loading is checked first: the accuracy recomputed on the split the run itself evaluated on
  (its stored `data.eval_split`, or the protocol's split when that is '') must equal
  `results.json` `last_accuracy` within 1e-6 (an assertion), and the checkpoint must be the
  final step.
- **exact statistics** ("AdaBN"): the per-layer mean and unbiased variance of each BN layer's
  input over the *whole* target train split (one batch; the eval preprocessing, which for digits
  is also exactly what training fed), with every earlier layer normalised by its own exact
  statistics: one forward pass in train mode through the evaluated branch. They are read off the
  running-statistics update `new = (1 - m)·old + m·batch` of `dsbn_jax/models/dsbn.py` after the
  branch's running statistics were set to zero, so `batch = new / m` is exact to float32 rounding
  (`batch_stat_from_update`); `m` is each layer's own `momentum` (recorded while tracing the
  forward pass, which also gives the layers' order). The same is done for the source train split
  through branch 0, for reference.
- **acc AdaBN**: the same target-test accuracy with the evaluated branch's running mean/var
  replaced by the exact target-train statistics (scale/bias unchanged). For `alda` it shows what
  target-specific statistics alone would give; for `alda_dsbn` whether the target branch's running
  statistics had converged (equal accuracy = yes).
- **run vs exact** (mean, var; max and median over layers): `||running - exact|| / ||exact||` per
  layer, for the evaluated branch against the exact target statistics (convergence / mismatch).
- **src weight**: the median over layers of the weight `a` of the least-squares fit
  `running_mean ~ a·exact_source_mean + (1 - a)·exact_target_mean` of the evaluated branch. It is
  about 0.5 when the running mean averages both domains (shared BN, batches alternate), about 0
  when it is target-only (DSBN's target branch).
- **branches src vs tgt** (`alda_dsbn` only; medians over layers): `||x_src - x_tgt|| / ||x_tgt||`
  between branch 0 and branch 1 for the running mean, running var, scale (gamma) and bias (beta):
  how domain-specific the two branches became.

The JSON (`--out`, default `<workdir>/dsbn_diagnostics.json`) holds every figure per run and per
layer, in forward order: the above, the accuracies on each evaluated split with both statistics,
`running_vs_exact_source` (evaluated branch vs the exact source statistics),
`exact_target_vs_source` (how far apart the two domains' exact statistics are at that layer; for
`alda_dsbn` each through its own branch), and for `alda_dsbn` the source branch's own convergence
(`source_branch_running_vs_exact_source`).

  python benchmarks/dsbn_diagnostics.py [--workdir runs/accuracy_digits] [--methods alda,alda_dsbn]
  python benchmarks/dsbn_diagnostics.py --runs WORKDIR1,WORKDIR2 --out PATH

`--workdir` is a sweep root laid out `<root>/<method>/<source>-<target>/seed<k>/` (runs without a
`results.json` are skipped as unfinished); `--runs` lists single training workdirs instead (then
`--out` is required). Run from the repository root: the runs' `data.data_dir` is usually relative
to it. The exact statistics need the whole target train split in one forward pass: fine for the
digits (627 images of 32x32), too much memory for ResNet-50 on a large Office domain.
"""

from __future__ import annotations

import argparse
import glob
import json
import os
import shlex
import statistics
import sys

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402

ACCURACY_TOL = 1e-6  # |recomputed - results.json last_accuracy|, in % points


def parse_args(argv=None) -> argparse.Namespace:
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument(
    "--workdir",
    default="runs/accuracy_digits",
    help="sweep root <root>/<method>/<source>-<target>/seed<k>/",
  )
  p.add_argument(
    "--methods",
    default="alda,alda_dsbn",
    help="methods (sub-folders of --workdir) to process, comma-separated",
  )
  p.add_argument(
    "--runs", default="", help="comma-separated training workdirs; replaces the --workdir search"
  )
  p.add_argument("--out", default="", help="JSON path (default <workdir>/dsbn_diagnostics.json)")
  args = p.parse_args(argv)
  if args.runs and not args.out:
    p.error("--runs needs --out")
  args.out = args.out or os.path.join(args.workdir, "dsbn_diagnostics.json")
  return args


# ----------------------------------------------------------------------------------------------
# Exact (AdaBN) statistics: helpers independent of any run
# ----------------------------------------------------------------------------------------------


def batch_stat_from_update(old, new, momentum: float) -> np.ndarray:
  """The batch statistic ``b`` of one running update ``new = (1 - m)·old + m·b`` (float64).

  With ``old = 0`` this is ``new / m``: exact up to the float32 rounding of ``m·b``. With other
  ``old`` the subtraction cancels digits when ``new`` is close to ``(1 - m)·old``.
  """
  old64, new64 = np.asarray(old, np.float64), np.asarray(new, np.float64)
  return (new64 - (1.0 - momentum) * old64) / momentum


def _get(tree, path):
  for k in path:
    tree = tree[k]
  return tree


def exact_statistics(model, variables, images, domain: int) -> list[dict]:
  """Per-BN-layer exact statistics of ``images`` (one batch) through branch ``domain``.

  One train-mode forward pass, so each layer sees its input normalised by the exact statistics of
  the earlier layers, with that branch's running statistics zeroed first (``batch_stat_from_update``
  then reads the batch statistics back exactly). Returns, in the order the layers are called,
  ``{'path': (...), 'momentum': m, 'n': values per channel, 'mean': f64[C], 'var': f64[C]}``; the
  variance is the unbiased one, the estimator the running variance tracks.
  """
  import flax.linen as nn
  import jax

  from dsbn_jax.models.dsbn import DomainSpecificBatchNorm

  calls = []

  def record(next_fun, args, kwargs, context):
    if isinstance(context.module, DomainSpecificBatchNorm) and context.method_name == "__call__":
      x = args[0]
      calls.append(
        {
          "path": tuple(context.module.path),
          "momentum": float(context.module.momentum),
          "n": int(x.size // x.shape[-1]),
        }
      )
    return next_fun(*args, **kwargs)

  def zero_row(leaf):  # every batch_stats leaf is a DSBN mean/var of shape (num_domains, C)
    leaf = np.array(leaf, copy=True)
    leaf[domain] = 0.0
    return leaf

  zeroed = jax.tree.map(zero_row, variables["batch_stats"])

  def forward(params, batch_stats, x):
    with nn.intercept_methods(record):
      _, upd = model.apply(
        {"params": params, "batch_stats": batch_stats},
        x,
        domain=domain,
        train=True,
        mutable=["batch_stats"],
      )
    return upd["batch_stats"]

  # A fresh jit each call: the interceptor records while tracing.
  new = jax.device_get(jax.jit(forward)(variables["params"], zeroed, images))
  paths = [c["path"] for c in calls]
  if len(set(paths)) != len(paths):
    raise RuntimeError(f"a BN layer ran twice in one forward pass: {paths}")
  for c in calls:
    stats = _get(new, c["path"])
    c["mean"] = batch_stat_from_update(0.0, stats["mean"][domain], c["momentum"])
    c["var"] = batch_stat_from_update(0.0, stats["var"][domain], c["momentum"])
  return calls


def with_statistics(batch_stats, layers: list[dict], domain: int):
  """A copy of ``batch_stats`` with row ``domain`` of every layer set to ``layers``' mean/var."""
  import jax

  out = jax.tree.map(lambda v: np.array(v, copy=True), batch_stats)
  for layer in layers:
    node = _get(out, layer["path"])
    for k in ("mean", "var"):
      node[k][domain] = layer[k].astype(node[k].dtype)
  return out


def relative_distance(a, b) -> float:
  """``||a - b|| / ||b||`` in float64 (``b`` is the reference)."""
  a64, b64 = np.asarray(a, np.float64).ravel(), np.asarray(b, np.float64).ravel()
  return float(np.linalg.norm(a64 - b64) / max(np.linalg.norm(b64), 1e-30))


def mix_weight(x, src, tgt) -> float:
  """Least-squares ``a`` in ``x ~ a·src + (1 - a)·tgt`` (0: x is tgt, 1: x is src)."""
  d = np.asarray(src, np.float64) - np.asarray(tgt, np.float64)
  return float(np.dot(np.asarray(x, np.float64) - tgt, d) / max(np.dot(d, d), 1e-30))


# ----------------------------------------------------------------------------------------------
# One run
# ----------------------------------------------------------------------------------------------


def find_runs(root: str, methods: list[str]) -> list[str]:
  """Finished runs ``<root>/<method>/<task>/seed<k>/`` (with results.json), sorted."""
  runs = []
  for method in methods:
    for d in sorted(glob.glob(os.path.join(root, method, "*", "seed*"))):
      if not os.path.exists(os.path.join(d, "config.json")):
        continue
      if not os.path.exists(os.path.join(d, "results.json")):
        print(f"skipping {d}: no results.json (unfinished)", file=sys.stderr)
        continue
      runs.append(d)
  return runs


def _data_config(data, eval_split: str):
  import ml_collections

  data = ml_collections.ConfigDict(data.to_dict())
  data.eval_split = eval_split
  return data


def load_split(data, domain: str, split: str) -> tuple[np.ndarray, np.ndarray]:
  """All images (eval preprocessing; 10-crop folded into the batch) and labels of a split."""
  from dsbn_jax import input_pipeline

  images, labels = [], []
  for batch in input_pipeline.make_eval_data(_data_config(data, split), domain=domain):
    mask = batch["mask"]
    images.append(batch["image"][mask])
    labels.append(batch["label"][mask])
  images = np.concatenate(images)
  return images.reshape((-1, *images.shape[-3:])), np.concatenate(labels)


def diagnose_run(workdir: str) -> dict:
  import jax

  from dsbn_jax import evaluation, input_pipeline, methods, predict, sharding
  from dsbn_jax.datasets import catalog
  from dsbn_jax.models import heads

  config, _, step, state = predict.read_run(workdir)
  with open(os.path.join(workdir, "results.json"), encoding="utf-8") as f:
    results = json.load(f)
  if step != results["steps"]:
    raise AssertionError(
      f"{workdir}: latest checkpoint is step {step}, results.json is for step {results['steps']}"
    )
  spec = methods.resolve(config)
  tgt_branch, src_branch = spec.target_branch, 0
  model = heads.create_model(config)
  data = config.data
  protocol = catalog.resolve_domain(_data_config(data, ""), data.target)
  src_info = catalog.resolve_domain(_data_config(data, ""), data.source)
  run_split = data.get("eval_split") or protocol.eval_split
  print(
    f"{workdir}: {config.method} {data.source}->{data.target} seed {config.seed}, step {step}; "
    f"target test split {protocol.eval_split!r} ({protocol.num_eval}), exact statistics over "
    f"{protocol.train_split!r} ({protocol.num_train}); run evaluated on {run_split!r}",
    file=sys.stderr,
    flush=True,
  )

  # Exact statistics: target train split through the evaluated branch, source train through 0.
  variables = {"params": state["params"], "batch_stats": state["batch_stats"]}
  tgt_images, _ = load_split(data, data.target, protocol.train_split)
  src_images, _ = load_split(data, data.source, src_info.train_split)
  exact_t = exact_statistics(model, variables, tgt_images, tgt_branch)
  exact_s = exact_statistics(model, variables, src_images, src_branch)
  assert [l["path"] for l in exact_t] == [l["path"] for l in exact_s]

  # Accuracies, with the training loop's own jitted eval step and evaluate().
  mesh = sharding.make_mesh(jax.local_devices()[:1])
  eval_fn = evaluation.jit_eval_step(mesh, config)
  states = {
    k: evaluation.eval_state(model.apply, state["params"], batch_stats, mesh)
    for k, batch_stats in (
      ("running", state["batch_stats"]),
      ("adabn", with_statistics(state["batch_stats"], exact_t, tgt_branch)),
    )
  }
  accuracy = {}
  for split in dict.fromkeys([protocol.eval_split, run_split]):
    eval_data = input_pipeline.make_eval_data(_data_config(data, split))  # the target's split
    accuracy[split] = {
      k: evaluation.evaluate(eval_fn, s, eval_data, mesh, config.model.num_classes)["accuracy"]
      for k, s in states.items()
    }
  check = accuracy[run_split]["running"]
  if not abs(check - results["last_accuracy"]) <= ACCURACY_TOL:  # the loading check
    raise AssertionError(
      f"{workdir}: recomputed accuracy on {run_split!r} {check!r} != "
      f"results.json last_accuracy {results['last_accuracy']!r}"
    )

  layers = []
  for lt, ls in zip(exact_t, exact_s):
    bs = _get(state["batch_stats"], lt["path"])
    ps = _get(state["params"], lt["path"])
    run_mean, run_var = bs["mean"][tgt_branch], bs["var"][tgt_branch]
    layer = {
      "name": "/".join(lt["path"]),
      "channels": int(run_mean.shape[0]),
      "momentum": lt["momentum"],
      "n_per_channel": {"target": lt["n"], "source": ls["n"]},
      "running_vs_exact": {
        "mean": relative_distance(run_mean, lt["mean"]),
        "var": relative_distance(run_var, lt["var"]),
      },
      "running_vs_exact_source": {
        "mean": relative_distance(run_mean, ls["mean"]),
        "var": relative_distance(run_var, ls["var"]),
      },
      "exact_target_vs_source": {
        "mean": relative_distance(lt["mean"], ls["mean"]),
        "var": relative_distance(lt["var"], ls["var"]),
      },
      "running_mean_source_weight": mix_weight(run_mean, ls["mean"], lt["mean"]),
      "running_var_source_weight": mix_weight(run_var, ls["var"], lt["var"]),
    }
    if spec.dsbn:
      layer["branches_source_vs_target"] = {
        "mean": relative_distance(bs["mean"][src_branch], bs["mean"][tgt_branch]),
        "var": relative_distance(bs["var"][src_branch], bs["var"][tgt_branch]),
        "scale": relative_distance(ps["scale"][src_branch], ps["scale"][tgt_branch]),
        "bias": relative_distance(ps["bias"][src_branch], ps["bias"][tgt_branch]),
      }
      layer["source_branch_running_vs_exact_source"] = {
        "mean": relative_distance(bs["mean"][src_branch], ls["mean"]),
        "var": relative_distance(bs["var"][src_branch], ls["var"]),
      }
    layers.append(layer)

  test = accuracy[protocol.eval_split]
  return {
    "workdir": workdir,
    "method": config.method,
    "source": data.source,
    "target": data.target,
    "seed": int(config.seed),
    "step": int(step),
    "evaluated_branch": tgt_branch,
    "test_split": protocol.eval_split,
    "num_test": protocol.num_eval,
    "stats_split": protocol.train_split,
    "num_stats_images": int(tgt_images.shape[0]),
    "accuracy_running": test["running"],
    "accuracy_adabn": test["adabn"],
    "accuracy_by_split": accuracy,
    "check": {
      "split": run_split,
      "recomputed": check,
      "results_last_accuracy": results["last_accuracy"],
    },
    "layers": layers,
  }


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------


def _med(layers, *keys) -> float:
  return statistics.median(_get(l, keys) for l in layers)


def _max_med(layers, *keys) -> str:
  return f"{max(_get(l, keys) for l in layers):.3f} / {_med(layers, *keys):.3f}"


def table(runs: list[dict], cmd: str) -> str:
  rows = [
    "| method | task | seed | step | acc running (%) | acc AdaBN (%) | run vs exact mean "
    "(max / med) | run vs exact var (max / med) | src weight (med) | branches src vs tgt "
    "(med): mean / var / gamma / beta |",
    "|---|---|---|---|---|---|---|---|---|---|",
  ]
  for r in runs:
    ls = r["layers"]
    branches = "-"
    if "branches_source_vs_target" in ls[0]:
      branches = " / ".join(
        f"{_med(ls, 'branches_source_vs_target', k):.3f}" for k in ("mean", "var", "scale", "bias")
      )
    rows.append(
      f"| {r['method']} | {r['source']}->{r['target']} | {r['seed']} | {r['step']} | "
      f"{r['accuracy_running']:.2f} | {r['accuracy_adabn']:.2f} | "
      f"{_max_med(ls, 'running_vs_exact', 'mean')} | {_max_med(ls, 'running_vs_exact', 'var')} | "
      f"{_med(ls, 'running_mean_source_weight'):.2f} | {branches} |"
    )
  return "\n".join(rows) + f"\n\nTarget test split; command: `{cmd}`"


def layer_table(r: dict) -> str:
  dsbn = "branches_source_vs_target" in r["layers"][0]
  rows = [
    f"{r['method']} {r['source']}->{r['target']} seed {r['seed']}: per layer (run vs exact "
    "mean/var | exact tgt vs src mean/var | src weight of running mean"
    + (" | branches src vs tgt mean/var/gamma/beta)" if dsbn else ")")
  ]
  for l in r["layers"]:
    run, dom = l["running_vs_exact"], l["exact_target_vs_source"]
    line = (
      f"  {l['name']:<24} {run['mean']:.4f} {run['var']:.4f} | {dom['mean']:.4f} "
      f"{dom['var']:.4f} | {l['running_mean_source_weight']:+.3f}"
    )
    if "branches_source_vs_target" in l:
      line += " | " + " ".join(f"{v:.4f}" for v in l["branches_source_vs_target"].values())
    rows.append(line)
  return "\n".join(rows)


def main(args) -> dict:
  from dsbn_jax.cli import quiet_library_logs

  quiet_library_logs()
  cmd = (
    "python benchmarks/dsbn_diagnostics.py " + " ".join(shlex.quote(a) for a in sys.argv[1:])
  ).strip()
  if args.runs:
    workdirs = [d for d in args.runs.split(",") if d]
    for d in workdirs:
      if not os.path.exists(os.path.join(d, "results.json")):
        raise SystemExit(f"error: {d} has no results.json (not a finished training workdir)")
  else:
    workdirs = find_runs(args.workdir, [m for m in args.methods.split(",") if m])
    if not workdirs:
      raise SystemExit(f"error: no finished runs of {args.methods} under {args.workdir}")
  runs = [diagnose_run(d) for d in workdirs]
  result = {"command": cmd, "accuracy_tolerance": ACCURACY_TOL, "runs": runs}
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  with open(args.out, "w", encoding="utf-8") as f:
    json.dump(result, f, indent=1)
  print()
  for r in runs:
    print(layer_table(r) + "\n")
  print(table(runs, cmd))
  print(f"\nwrote {args.out}")
  return result


if __name__ == "__main__":
  main(parse_args())
