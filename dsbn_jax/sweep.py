"""Sweeps: every task x method x seed of a config, resumable, summarised in the paper's layout.

``python -m dsbn_jax.sweep --config=configs/office31.py --workdir=runs/office31`` runs the tasks,
methods, BN choices and seeds of ``config.sweep`` (override with ``--tasks=A->W,D->A
--methods=alda,dann --bn=shared,dsbn --seeds=0,1,2``): every method with every BN choice ('auto',
the default, is the method name's BN: ``--methods=source_only,alda_dsbn`` alone runs those two;
``source_only``, which has no DSBN form, runs once, with shared BN, beside other BN choices).
Runs and table rows are named by the pair's display name (``methods.Method.display_name``: ``alda``
with shared BN, ``alda_dsbn`` with DSBN, the names they had before ``model.bn``). Each run lives in
``<workdir>/<display name>/<source>-<target>/seed<k>``; finished runs (``results.json`` present)
are skipped, interrupted ones resume from their checkpoint. The summary is
``<workdir>/results.md`` (for Office-31 and Office-Home first the paper's table layout: a row per
method run, the paper's tasks in its column order and Avg, best accuracy, mean ± std over seeds,
'–' for a task not run, and below it the published rows, not run here, with their sources --
``dsbn_jax/published.py``, docs/reference.md §11; then best and last target accuracy per task of
the sweep and on average, mean ± std over seeds; then, for each method run with both BN choices,
DSBN minus shared BN paired by seed, and whether it was positive for every seed; then, for runs with validator scores, one table
per label-free validator: the target accuracy of the evaluation it selects, its gap to best and to
last, and the rank correlation of its score with the target accuracy -- docs/model_selection.md),
``<workdir>/summary.json``,
``<workdir>/results.png`` and, with validator scores, ``<workdir>/selection.png`` (each validator's
pick beside best and last).
"""

import json
import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from absl import app, flags, logging  # noqa: E402

from dsbn_jax import compile_cache, published, reporting  # noqa: E402
from dsbn_jax.cli import define_config_flag, define_flag, parse_flags, quiet_library_logs, run_cli  # noqa: E402
from dsbn_jax.errors import UserError  # noqa: E402
from dsbn_jax.methods import BN_SETTINGS, DSBN_SUFFIX, METHODS, NAMES, resolve_name  # noqa: E402

_CONFIG = define_config_flag()
_WORKDIR = define_flag(
  flags.DEFINE_string,
  "workdir",
  None,
  "Sweep directory (default runs/sweep_<dataset>).",
  path=True,
)
_TASKS = flags.DEFINE_list("tasks", None, "Tasks 'source->target' (default: config.sweep.tasks).")
_METHODS = flags.DEFINE_list("methods", None, "Methods (default: config.sweep.methods).")
_BN = flags.DEFINE_list(
  "bn", None, "BN choices, each method with each: auto, shared, dsbn (default: config.sweep.bn)."
)
_SEEDS = flags.DEFINE_list("seeds", None, "Seeds (default: config.sweep.seeds).")


def task_domains(task: str) -> tuple[str, str]:
  """``'source->target'`` -> ``(source, target)``; a one-line UserError for another shape."""
  parts = str(task).split("->")
  if len(parts) != 2 or not all(p.strip() for p in parts):
    raise UserError(
      f"invalid task {task!r} (--tasks or config.sweep.tasks); valid: "
      "'source->target', e.g. 'Art->Clipart'"
    )
  return parts[0], parts[1]


def parse_seeds(values) -> list[int]:
  """``--seeds`` / ``config.sweep.seeds`` as integers; a one-line UserError for anything else."""
  try:
    return [int(s) for s in values]
  except (TypeError, ValueError):
    raise UserError(
      f"invalid seeds {list(values)} (--seeds or config.sweep.seeds); valid: "
      "integers, e.g. --seeds=0,1,2"
    ) from None


def canonical_task(config, task: str) -> tuple[str, str]:
  """``task``'s ``(source, target)`` by their canonical domain names of ``config.data``
  (``A->W``, ``Amazon->Webcam`` and ``amazon->webcam`` are one office31 task); a one-line
  UserError for an unknown domain."""
  from dsbn_jax.datasets import catalog  # pylint: disable=g-import-not-at-top  (TF: when needed)

  source, target = (catalog.canonical_domain(config.data, d) for d in task_domains(task))
  return source, target


def run_dir(root: str, method: str, task: str, seed: int) -> str:
  source, target = task_domains(task)
  return os.path.join(root, method, f"{source}-{target}", f"seed{seed}")


def sweep_methods(config, methods, bn=None) -> list[str]:
  """The display names of the sweep's (method, BN) pairs, methods outer: each of ``methods`` with
  each of ``bn`` (None: ``config.sweep.bn``; 'auto': the method name's BN, or ``config.model.bn``
  when set). A one-line UserError for an unknown method or BN choice, or a ``_dsbn`` name with
  'shared'."""
  bad = [m for m in methods if m not in NAMES]
  if bad:
    raise UserError(
      f"invalid method {bad[0]!r} (--methods or config.sweep.methods); valid: {', '.join(NAMES)}"
    )
  bn = list(bn or config.sweep.get("bn", ("auto",)))
  bad = [b for b in bn if b not in BN_SETTINGS]
  if bad:
    raise UserError(
      f"invalid BN choice {bad[0]!r} (--bn or config.sweep.bn); valid: {', '.join(BN_SETTINGS)}"
    )
  model_bn = config.model.get("bn", "auto")
  pairs = []
  for m in methods:
    for b in bn:
      if b == "dsbn" and len(set(bn)) > 1 and m in METHODS and not METHODS[m].uses_target:
        continue  # source_only with its shared BN alone: with DSBN it is no method (resolve_name)
      if b == "auto":
        pairs.append(resolve_name(m, model_bn, method_field="--methods").display_name)
      else:
        pairs.append(resolve_name(m, b, method_field="--methods", bn_field="--bn").display_name)
  return pairs


RESULT_KEYS = ("seed", "best_accuracy", "last_accuracy")  # what the summary reads of a run


def _read_results(path: str):
  """``(results, None)`` of a run's ``results.json`` (``(None, None)``: not there, the run is not
  finished), or ``(None, why)`` for a file that is not JSON or lacks what the summary reads."""
  if not os.path.exists(path):
    return None, None
  try:
    results = reporting.read_json(path, errors="replace")
    missing = [
      k
      for k in RESULT_KEYS
      if not isinstance(results.get(k), (int, float)) or isinstance(results.get(k), bool)
    ]
    if missing:
      raise TypeError(f"no number {missing[0]!r}")
  except (ValueError, TypeError) as e:  # JSONDecodeError too
    return None, " ".join(str(e).split())
  return results, None


def _load_results(path: str):
  """A run's ``results.json``, None if there is none; a damaged one (truncated, edited) is a
  ``UserError`` naming it."""
  results, why = _read_results(path)
  if why:
    raise UserError(
      f"{path} is damaged ({why}); delete it and run the sweep again: that run then "
      "evaluates its last checkpoint again and writes it anew"
    )
  return results


def _finished(path: str) -> bool:
  """Whether the run of ``path`` (its results.json) is finished. A damaged results.json (cut short
  by a crash of a copy, edited) is not: one ``warning:`` line, and the run resumes from its
  checkpoint, which evaluates the final state again and writes the file anew."""
  results, why = _read_results(path)
  if why:
    print(
      f"warning: {path} is damaged ({why}); the run is resumed from its checkpoint to write "
      "it again",
      file=sys.stderr,
      flush=True,
    )
  return results is not None


def run_sweep(config, root: str, tasks, methods, seeds, bn=None) -> dict:
  """Checks every run first (nothing is written if one is bad), runs what is not finished yet,
  then writes and returns the summary (None on processes other than 0 of a multi-process run).
  ``methods`` x ``bn`` (None: ``config.sweep.bn``) are the pairs of ``sweep_methods``."""
  import jax  # pylint: disable=g-import-not-at-top

  from dsbn_jax import config_check, run_control, train  # heavy imports (TF, JAX): when needed

  methods = sweep_methods(config, methods, bn)  # display names from here on
  _check_unique(config, tasks, methods, parse_seeds(seeds))
  runs = []
  for method, task, seed in [(m, t, s) for m in methods for t in tasks for s in parse_seeds(seeds)]:
    workdir = run_dir(root, method, task, seed)
    cfg = config.copy_and_resolve_references()
    with cfg.unlocked():
      cfg.method, cfg.seed = method, seed
      cfg.model.bn = "auto"  # the display name says the BN
      cfg.data.source, cfg.data.target = task_domains(task)
    config_check.validate(cfg)
    # New, empty, or a (finished or interrupted) run of *this* config only, before any run starts.
    train.guard_workdir(workdir, cfg, resolved=False)
    finished = _finished(os.path.join(workdir, "results.json"))
    runs.append((method, task, seed, workdir, cfg, finished))
  # Before any run starts: a root (and run folders) that can be created and written.
  run_control.check_writable(root, flag="sweep --workdir")
  _check_root(root, NAMES)
  for *_, workdir, _, finished in runs:
    if not finished:
      run_control.check_writable(workdir)
  os.makedirs(root, exist_ok=True)
  main_process = jax.process_index() == 0  # several with a launcher (dsbn_jax/launcher.py)
  for i, (method, task, seed, workdir, cfg, finished) in enumerate(runs):
    if finished:
      logging.info("[%d/%d] %s %s seed %d: finished, skipped", i + 1, len(runs), method, task, seed)
      continue
    if main_process:
      print(f"[sweep {i + 1}/{len(runs)}] {method} {task} seed {seed} -> {workdir}", flush=True)
    train.train_and_evaluate(cfg, workdir)
  if not main_process:  # process 0 writes the summary (every process would write the same files)
    return None
  return write_summary(
    root, tasks, methods, seeds, config.data.dataset, lambda t: canonical_task(config, t)
  )


def _check_unique(config, tasks, methods, seeds) -> None:
  """Each seed, method and task once (tasks compared by their canonical domains: ``A->W`` and
  ``amazon->webcam`` are one office31 task): a run listed twice would count twice in the tables'
  mean ± std. One line naming every duplicate; nothing is written before."""

  def task_key(task):
    try:
      return canonical_task(config, task)
    except UserError:  # an invalid task: refused below, with the run it belongs to
      return task

  found = []
  for what, values, key in (
    ("seeds", seeds, int),
    ("methods", methods, str),
    ("tasks", tasks, task_key),
  ):
    groups = {}
    for v in values:
      groups.setdefault(key(v), []).append(repr(v) if what == "tasks" else str(v))
    for group in (g for g in groups.values() if len(g) > 1):
      times = "twice" if len(group) == 2 else f"{len(group)} times"
      named = group[0] if len(set(group)) == 1 else " = ".join(group)
      found.append(f"{what[:-1]} {named} {times} (--{what} or config.sweep.{what})")
  if found:
    raise UserError(
      f"the sweep lists a run more than once: {'; '.join(found)}; give each seed, method and "
      "task once (a run counted twice would skew the mean ± std; nothing was run)"
    )


# What write_summary (re)writes; selection.png only for runs with validator scores.
SUMMARY_FILES = ("results.md", "summary.json", "results.png", "selection.png")


def _check_root(root: str, methods) -> None:
  """A sweep root is new, empty, or a sweep's: its method folders and summary files only (the
  summary files of another tool in a folder without runs would be replaced)."""
  from dsbn_jax import train

  if os.path.exists(root) and not os.path.isdir(root):
    raise UserError(f"sweep --workdir={root} is a file, not a folder; choose a new --workdir")
  if not os.path.isdir(root):
    return
  runs = [n for n in os.listdir(root) if n in methods and os.path.isdir(os.path.join(root, n))]
  foreign = train.foreign_entries(root, ours=runs + list(SUMMARY_FILES) if runs else runs)
  if foreign:
    raise UserError(
      f"sweep --workdir={root} is not empty and is not a sweep's (it holds "
      f"{', '.join(foreign[:3])}{' ...' if len(foreign) > 3 else ''}); choose a new "
      "or empty --workdir (nothing was changed in this one)"
    )


def _cell(rows, key):
  return reporting.mean_std([r[key] for r in rows]) if rows else "–"


def write_summary(
  root: str, tasks, methods, seeds, dataset: str | None = None, domains=task_domains
) -> dict:
  """``results.md`` (for an Office-31 or Office-Home sweep first the paper's layout with the
  published rows, ``_paper_layout``; then the best and last tables), ``summary.json`` and
  ``results.png`` from the runs. ``dataset``: ``config.data.dataset``; ``domains``: a task's
  ``(source, target)`` (``run_sweep`` passes the canonical domain names; the default splits the
  task as written, which the layout matches by canonical or the papers' short names)."""
  summary = {}
  for m in methods:
    for t in tasks:
      rows = [
        _load_results(os.path.join(run_dir(root, m, t, int(s)), "results.json")) for s in seeds
      ]
      summary.setdefault(m, {})[t] = [r for r in rows if r is not None]
  lines = _paper_layout(summary, tasks, methods, dataset, domains)
  for key, title in (
    ("best_accuracy", "best over evaluations (the papers' protocol)"),
    ("last_accuracy", "last evaluation (final model)"),
  ):
    lines += [f"### Target accuracy (%), {title}", ""]
    lines += _accuracy_table(summary, methods, tasks, key, _shown(tasks))
    lines.append("")
  seeds_txt = ", ".join(str(s) for s in seeds)
  lines.append(f"mean ± std over seeds {seeds_txt} (sample std); runs in `{root}`.")
  lines += _bn_effect_table(summary, tasks, methods)
  chosen = _chosen(summary, tasks, methods)
  lines += _selection_tables(chosen, tasks, methods, _unscored(summary, tasks, methods))
  text = "\n".join(lines) + "\n"
  reporting.write_atomic(os.path.join(root, "results.md"), text)  # a full disk: one line (cli)
  reporting.write_atomic(
    os.path.join(root, "summary.json"),
    json.dumps(
      {m: {t: [_summary_row(r) for r in rs] for t, rs in v.items()} for m, v in summary.items()},
      indent=2,
    ),
  )
  _plot(summary, tasks, methods, os.path.join(root, "results.png"))
  if chosen:
    _plot_selection(summary, chosen, tasks, methods, os.path.join(root, "selection.png"))
  return {"markdown": text, "runs": summary}


def _shown(tasks) -> list[str]:
  return [t.replace("->", "→") for t in tasks]


def _table_head(columns) -> list[str]:
  return ["| " + " | ".join(columns) + " |", "|---" * len(columns) + "|"]


def _accuracy_table(by_method: dict, methods, columns, key: str, shown) -> list[str]:
  """Markdown: a row per method, a column per ``columns`` (headed ``shown``), each cell the mean ±
  std over seeds of ``key`` ('–': no run), then Avg: the mean ± std over seeds of each seed's
  average over every column (the seeds that finished them all)."""
  lines = _table_head(["method", *shown, "Avg"])
  for m in methods:
    cells = [_cell(by_method[m][c], key) for c in columns]
    avg = reporting.mean_std(_seed_averages(by_method[m], columns, key))
    lines.append("| " + " | ".join([m, *cells, avg]) + " |")
  return lines


def _bn_effect_table(summary: dict, tasks, methods) -> list[str]:
  """Markdown ([] without a method run with both BN choices): per method, DSBN minus shared BN in
  points, paired by seed (the same seed's two runs), per task and on each seed's average over the
  tasks, as mean ± std over the seeds run with both; 'sign' says whether that average difference
  was positive for every seed, negative for every seed, or mixed."""
  pairs = [(m, m + DSBN_SUFFIX) for m in methods if m + DSBN_SUFFIX in methods]
  if not pairs:
    return []
  lines = ["", "### DSBN minus shared BN (points), paired by seed", ""]
  for key, title in (("best_accuracy", "best"), ("last_accuracy", "last")):
    lines += [f"#### {title}", ""]
    lines += _table_head(["method", *_shown(tasks), "Avg", "sign (Avg, per seed)"])
    for shared, dsbn in pairs:
      diffs = {}  # task -> the seeds run with both BN choices, each with its difference
      for t in tasks:
        a = {r["seed"]: r[key] for r in summary[shared][t]}
        b = {r["seed"]: r[key] for r in summary[dsbn][t]}
        diffs[t] = [{"seed": s, "diff": b[s] - a[s]} for s in sorted(a.keys() & b.keys())]
      cells = [reporting.mean_std([r["diff"] for r in diffs[t]], signed=True) for t in tasks]
      avg = _seed_averages(diffs, tasks, "diff")
      sign = "–" if not avg else "all +" if min(avg) > 0 else "all −" if max(avg) < 0 else "mixed"
      avg_cell = reporting.mean_std(avg, signed=True)
      lines.append("| " + " | ".join([shared, *cells, avg_cell, sign]) + " |")
    lines.append("")
  return lines


def _paper_layout(summary: dict, tasks, methods, dataset, domains) -> list[str]:
  """Markdown, for an Office-31 or Office-Home sweep ([] otherwise): the best accuracy of each run
  method in the paper's table layout -- its tasks in its column order ('–' for a task this sweep
  did not run), then Avg over all of them -- and below, marked as not run here, the published rows
  of ``dsbn_jax/published.py`` (docs/reference.md §11) with the source of each."""
  labels = published.TASKS.get(dataset)
  if not labels:
    return []
  ran = {}  # paper column -> the sweep's task (its first, should two name one)
  for t in tasks:
    label = published.task_label(dataset, *domains(t))
    if label is not None:
      ran.setdefault(label, t)
  by_label = {m: {c: summary[m][ran[c]] if c in ran else [] for c in labels} for m in methods}
  title = published.TITLES[dataset]
  lines = [
    f"### {title} in the paper's layout: target accuracy (%), best over evaluations",
    "",
    "Our runs: mean ± std over seeds; – : a task this sweep did not run; Avg: each seed's average "
    f"over the {len(labels)} tasks, for the seeds that ran all of them.",
    "",
    *_accuracy_table(by_label, methods, labels, "best_accuracy", labels),
    "",
    "Published, **not run here** (ResNet-50, best over evaluations; typed from "
    "docs/reference.md §11 in `dsbn_jax/published.py`); *ours* names the method of ours each is "
    "the figure of:",
    "",
    *_table_head(["published (not run here)", *labels, published.AVG, "ours"]),
  ]
  sources = []
  for row in published.ROWS[dataset]:
    if row.source not in sources:
      sources.append(row.source)
    cells = [published.fmt(v) for v in row.cells]
    name = f"{row.name} [{sources.index(row.source) + 1}]"
    lines.append("| " + " | ".join([name, *cells, row.ours or "–"]) + " |")
  lines += ["", *(f"- [{i}] {s}." for i, s in enumerate(sources, 1)), ""]
  return lines


def _summary_row(results: dict) -> dict:
  """What summary.json keeps of a run: the seed, best and last, and each validator's choice."""
  row = {k: results[k] for k in RESULT_KEYS}
  selection = results.get("selection")
  if isinstance(selection, dict) and selection:
    row["selection"] = {
      name: {k: v.get(k) for k in ("step", "accuracy", "rank_correlation")}
      for name, v in selection.items()
      if isinstance(v, dict)
    }
  return row


def _selected(results: dict, name: str) -> dict | None:
  """A run's choice by validator ``name``: its target accuracy, the gaps to the run's best and
  last, and the rank correlation of the score with the target accuracy (None: not computed, or it
  could not score any evaluation of the run -- ``_unscored`` says why)."""
  chosen = (results.get("selection") or {}).get(name)
  if not isinstance(chosen, dict) or not isinstance(chosen.get("accuracy"), (int, float)):
    return None
  acc = chosen["accuracy"]
  return {
    "seed": results["seed"],
    "accuracy": acc,
    "gap_best": acc - results["best_accuracy"],
    "gap_last": acc - results["last_accuracy"],
    "rho": chosen.get("rank_correlation"),
  }


def _chosen(summary: dict, tasks, methods) -> dict:
  """``{validator: {method: {task: [_selected of each run]}}}`` for the validators some run has."""
  from dsbn_jax import validators  # light: numpy only

  chosen = {
    name: {
      m: {t: [c for r in summary[m][t] if (c := _selected(r, name)) is not None] for t in tasks}
      for m in methods
    }
    for name in validators.NAMES
  }
  return {n: c for n, c in chosen.items() if any(c[m][t] for m in methods for t in tasks)}


def _unscored(summary: dict, tasks, methods) -> dict:
  """``{validator: ["<method> <task> seed <seed>: <reason>", ...]}``: the runs whose selection has
  the validator but no pick (it could not score any evaluation), left out of its table."""
  out = {}
  for m in methods:
    for t in tasks:
      for r in summary[m][t]:
        for name, v in (r.get("selection") or {}).items():
          if isinstance(v, dict) and v.get("step") is None:
            reasons = list((v.get("skipped") or {}).values())
            why = reasons[-1] if reasons else "no score"
            out.setdefault(name, []).append(f"{m} {t.replace('->', '→')} seed {r['seed']}: {why}")
  return out


def _selection_tables(chosen: dict, tasks, methods, unscored: dict | None = None) -> list[str]:
  """Markdown: per validator, the target accuracy (%) of the evaluation it selects (mean ± std over
  seeds per task and method), its gap to best and to last, and the rank correlation of its score
  with the target accuracy over a run's evaluations, and the runs it could not score
  (``_unscored``, left out); then one line per validator over every run."""
  unscored = unscored or {}
  if not chosen and not unscored:
    return []
  lines = [
    "",
    "### Label-free model selection: target accuracy (%) of the evaluation each validator selects",
    "",
    "No target label is read to select; the gaps (percentage points, mean ± std over runs) are "
    "to `best` (selected with the target labels) and to `last`; ρ is Spearman's rank correlation "
    "of the validator's score with the target accuracy over a run's evaluations (mean over runs).",
  ]
  overall = []
  for name, by_method in chosen.items():
    lines += [
      "",
      f"#### `{name}`",
      "",
      *_table_head(["method", *_shown(tasks), "Avg", "gap to best", "gap to last", "ρ"]),
    ]
    every = []
    for m in methods:
      runs = [c for t in tasks for c in by_method[m][t]]
      every += runs
      cells = [_cell(by_method[m][t], "accuracy") for t in tasks]
      avgs = _seed_averages(by_method[m], tasks, "accuracy")
      lines.append(
        f"| {m} | "
        + " | ".join(cells)
        + f" | {reporting.mean_std(avgs)} | {_cell(runs, 'gap_best')} | {_cell(runs, 'gap_last')}"
        + f" | {_mean(c['rho'] for c in runs)} |"
      )
    if name in unscored:
      lines += ["", f"Left out, not scored: {'; '.join(unscored[name])}."]
    overall.append((name, every))
  for name in (n for n in unscored if n not in chosen):
    lines += ["", f"#### `{name}`", "", f"No run scored: {'; '.join(unscored[name])}."]
  if not overall:
    return lines
  lines += [
    "",
    "#### Every validator over every run above",
    "",
    "| validator | runs | gap to best | gap to last | ρ | beats last in |",
    "|---|---|---|---|---|---|",
  ]
  for name, runs in overall:
    wins = sum(c["gap_last"] > 0 for c in runs)
    lines.append(
      f"| `{name}` | {len(runs)} | {_cell(runs, 'gap_best')} | {_cell(runs, 'gap_last')} | "
      f"{_mean(c['rho'] for c in runs)} | {wins} of {len(runs)} runs |"
    )
  return lines


def _mean(values) -> str:
  values = [v for v in values if v is not None]
  return f"{sum(values) / len(values):+.2f}" if values else "–"


def _seed_averages(by_task: dict, tasks, key):
  """Per seed, the average over tasks (only seeds that finished every task)."""
  per_seed = {}
  for t in tasks:
    for r in by_task[t]:
      per_seed.setdefault(r["seed"], {})[t] = r[key]
  return [sum(v.values()) / len(tasks) for v in per_seed.values() if len(v) == len(tasks)]


def _plot_selection(summary, chosen, tasks, methods, path: str) -> None:
  """Per method, bars of the mean target accuracy (over tasks and seeds) of best, last and each
  validator's pick (no error bars: the spread across tasks would dwarf the differences; the
  tables have the spread over seeds)."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np

  bars = [("best (target labels)", "best_accuracy"), ("last", "last_accuracy")]
  names = [b[0] for b in bars] + list(chosen)
  width = 0.8 / len(names)
  fig, ax = plt.subplots(figsize=(max(6.0, 1.2 * len(methods) * len(names) / 3 + 2), 4))
  for i, name in enumerate(names):
    values = []
    for m in methods:
      if i < len(bars):
        v = [r[bars[i][1]] for t in tasks for r in summary[m][t]]
      else:
        v = [c["accuracy"] for t in tasks for c in chosen[name][m][t]]
      values.append(np.mean(v) if v else 0.0)
    ax.bar(np.arange(len(methods)) + i * width, values, width, label=name)
  ax.set_xticks(np.arange(len(methods)) + 0.4 - width / 2)
  ax.set_xticklabels(methods)
  ax.set(
    ylabel="target accuracy (%)",
    ylim=(0, 100),
    title="model chosen by each validator (no target labels) vs best and last; mean over tasks and seeds",
  )
  ax.legend(fontsize=7, ncol=2)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def _plot(summary, tasks, methods, path: str) -> None:
  """Bars of the mean target accuracy per task and method, last and best, ± the sample std."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  import numpy as np

  def mean_std(rows, key):  # the sample std, as in the table; no bar for a missing cell
    values = [r[key] for r in rows]
    return (np.mean(values) if values else 0.0, np.std(values, ddof=1) if len(values) > 1 else 0.0)

  width = 0.8 / len(methods)
  panel = max(4.0, 0.35 * len(tasks) * len(methods) + 2)  # inches per panel
  fig, axes = plt.subplots(1, 2, figsize=(2 * panel, 4))
  for ax, key, title in zip(
    axes,
    ("last_accuracy", "best_accuracy"),
    ("last evaluation (final model)", "best over evaluations"),
  ):
    for i, m in enumerate(methods):
      means, stds = zip(*(mean_std(summary[m][t], key) for t in tasks))
      ax.bar(np.arange(len(tasks)) + i * width, means, width, yerr=stds, label=m, capsize=3)
    ax.set_xticks(np.arange(len(tasks)) + 0.4 - width / 2)
    ax.set_xticklabels([t.replace("->", "→") for t in tasks])
    ax.set(ylabel="target accuracy (%)", ylim=(0, 100), title=title)
  axes[0].legend(fontsize=8)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  quiet_library_logs()
  compile_cache.enable()  # before anything compiles
  config = _CONFIG.value
  sw = config.sweep
  tasks = _TASKS.value or list(sw.tasks)
  methods = _METHODS.value or list(sw.methods)
  seeds = run_cli(parse_seeds, _SEEDS.value or list(sw.seeds))
  root = _WORKDIR.value or os.path.join("runs", f"sweep_{config.data.dataset}")
  from dsbn_jax import sharding  # pylint: disable=g-import-not-at-top  (JAX: when needed)

  run_cli(sharding.maybe_initialize_distributed)  # dsbn_jax/launcher.py, before any device
  # creates root once all are valid
  out = run_cli(run_sweep, config, root, tasks, methods, seeds, _BN.value)
  if out is None:  # not process 0
    return
  print("\n" + out["markdown"], flush=True)
  print(
    f"table: {os.path.join(root, 'results.md')}, plot: {os.path.join(root, 'results.png')}",
    file=sys.stderr,
  )


if __name__ == "__main__":
  flags.mark_flag_as_required("config")
  app.run(main, flags_parser=parse_flags)
