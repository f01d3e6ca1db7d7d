"""Sweeps: the tables from finished runs (Office: the paper's layout and the published rows),
skipping finished runs, refusing a changed config."""

import json
import os
import subprocess
import sys

import pytest

from dsbn_jax import published, sweep
from dsbn_jax.errors import UserError
from tests import cli_driver, suite_env

ROOT = suite_env.ROOT


def _write_results(workdir, seed, best, last):
  with open(os.path.join(workdir, "results.json"), "w", encoding="utf-8") as f:
    json.dump({"seed": seed, "best_accuracy": best, "last_accuracy": last}, f)


def _fake_run(root, method, task, seed, best, last):
  workdir = sweep.run_dir(str(root), method, task, seed)
  os.makedirs(workdir)
  _write_results(workdir, seed, best, last)


def test_summary_pairs_each_methods_dsbn_and_shared_runs_by_seed(tmp_path):
  """DSBN minus shared BN per seed: alda's DSBN runs are 2 and 4 points better on a->b and 1 and
  3 on b->a (per-seed Avg +1.5, +3.5: every seed positive); dann's +1 and -3 (mixed); source_only
  alone has no row."""
  tasks, seeds = ["a->b", "b->a"], [0, 1]
  for name, ab, ba in [
    ("alda", (60.0, 62.0), (70.0, 71.0)),
    ("alda_dsbn", (62.0, 66.0), (71.0, 74.0)),
    ("dann", (50.0, 50.0), (50.0, 50.0)),
    ("dann_dsbn", (51.0, 47.0), (51.0, 47.0)),
    ("source_only", (40.0, 40.0), (40.0, 40.0)),
  ]:
    for seed in seeds:
      _fake_run(tmp_path, name, "a->b", seed, ab[seed], ab[seed] - 1)
      _fake_run(tmp_path, name, "b->a", seed, ba[seed], ba[seed] - 1)
  names = ["source_only", "alda", "alda_dsbn", "dann", "dann_dsbn"]
  text = sweep.write_summary(str(tmp_path), tasks, names, seeds)["markdown"]
  effect = text.split("### DSBN minus shared BN (points), paired by seed")[1]
  best = effect.split("#### last")[0]
  assert "| alda | +3.0 ± 1.4 | +2.0 ± 1.4 | +2.5 ± 1.4 | all + |" in best, best
  assert "| dann | -1.0 ± 2.8 | -1.0 ± 2.8 | -1.0 ± 2.8 | mixed |" in best, best
  assert "source_only" not in effect
  # No method run with both: no such table.
  assert "DSBN minus" not in sweep.write_summary(str(tmp_path), tasks, ["alda"], seeds)["markdown"]


def test_summary_tables_mean_and_sample_std_per_task_and_average(tmp_path):
  tasks, seeds = ["a->b", "b->a"], [0, 1]
  for seed, (ab, ba) in enumerate([(60.0, 70.0), (64.0, 80.0)]):
    _fake_run(tmp_path, "m", "a->b", seed, ab + 1, ab)
    _fake_run(tmp_path, "m", "b->a", seed, ba + 1, ba)
  out = sweep.write_summary(str(tmp_path), tasks, ["m", "missing"], seeds)
  last = out["markdown"].split("last evaluation")[1]
  # a->b: 60, 64 -> 62.0 ± 2.8 (sample std); b->a: 70, 80 -> 75.0 ± 7.1; per-seed avg 65, 72
  assert "| m | 62.0 ± 2.8 | 75.0 ± 7.1 | 68.5 ± 4.9 |" in last, last
  assert "| missing | – | – |" in last
  assert (tmp_path / "results.png").read_bytes()[:4] == b"\x89PNG"
  summary = json.loads((tmp_path / "summary.json").read_text())
  assert [r["last_accuracy"] for r in summary["m"]["b->a"]] == [70.0, 80.0]


def _argv(root, data_dir, *overrides, config="configs/smoke.py"):
  return [
    f"--config={config}",
    f"--workdir={root}",
    "--methods=source_only",
    "--seeds=0",
    f"--config.data.data_dir={data_dir}",
    *overrides,
  ]


def _sweep(root, data_dir, *overrides):
  """The command in this process, on one device (tests/cli_driver.py)."""
  argv = _argv(root, data_dir, *overrides, config=cli_driver.SMOKE)
  with cli_driver.mesh_of(1):
    return cli_driver.run("sweep", ["sweep", *argv])


def _sweep_subprocess(root, data_dir, *overrides):
  """The command as a new process."""
  cmd = [sys.executable, "-m", "dsbn_jax.sweep", *_argv(root, data_dir, *overrides)]
  return subprocess.run(
    cmd, cwd=ROOT, env=suite_env.subprocess_env(1), capture_output=True, text=True, timeout=600
  )


def test_sweep_runs_then_skips_finished_runs_and_refuses_a_changed_config(
  tmp_path, digits_data_dir
):
  """The first two commands run in this process; the refusal as the real command."""
  root, data_dir = tmp_path / "sweep", digits_data_dir
  first = _sweep(root, data_dir)
  assert first.returncode == 0, first.stderr[-2000:]
  assert "| source_only |" in first.stdout and (root / "results.md").exists()
  results = root / "source_only" / "digits-digits_m" / "seed0" / "results.json"
  before = results.read_bytes()
  again = _sweep(root, data_dir)
  assert again.returncode == 0 and "[sweep 1/1]" not in again.stdout  # skipped, not re-run
  assert results.read_bytes() == before
  changed = _sweep_subprocess(root, data_dir, "--config.optim.lr0=0.5")
  assert changed.returncode == 2, changed.stderr[-2000:]
  last = changed.stderr.strip().splitlines()[-1]
  assert last.startswith("error: workdir") and "optim.lr0: 0.01 -> 0.5" in last, last
  assert results.read_bytes() == before


def _foreign_folder(folder) -> dict:
  """A folder of someone else's files (what issue 13 found overwritten); returns its bytes."""
  folder.mkdir(parents=True)
  (folder / "results.json").write_text('{"mine": 1}')
  (folder / "curves.png").write_bytes(b"\x89PNG not ours")
  (folder / "metrics.jsonl").write_text("".join(f'{{"step": {i}}}\n' for i in range(10)))
  return _bytes(folder)


def _bytes(root) -> dict:
  return {
    os.path.relpath(os.path.join(d, f), root): open(os.path.join(d, f), "rb").read()
    for d, _, files in os.walk(root)
    for f in files
  }


def test_sweep_refuses_a_foreign_root_or_run_folder_before_any_run(tmp_path):
  """A folder of someone else's files as the sweep root, or as one run's folder: one line, before
  the first run starts, every byte kept (issue 13)."""
  import importlib.util  # pylint: disable=g-import-not-at-top

  import pytest  # pylint: disable=g-import-not-at-top

  from dsbn_jax.errors import UserError  # pylint: disable=g-import-not-at-top

  spec = importlib.util.spec_from_file_location("smoke", os.path.join(ROOT, "configs", "smoke.py"))
  smoke = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(smoke)
  config = smoke.get_config()
  args = (["digits->digits_m"], ["alda_dsbn"], [0])
  root = tmp_path / "root"
  before = _foreign_folder(root)
  with pytest.raises(
    UserError,
    match=r"sweep --workdir=.* is not empty and is not a sweep's \(it "
    r"holds curves.png, metrics.jsonl, results.json\)",
  ):
    sweep.run_sweep(config, str(root), *args)
  assert _bytes(root) == before
  root2 = tmp_path / "root2"  # a sweep's layout, but the run's folder holds someone's files
  before = _foreign_folder(root2 / "alda_dsbn" / "digits-digits_m" / "seed0")
  with pytest.raises(UserError, match="is not empty and is not a run's"):
    sweep.run_sweep(config, str(root2), *args)
  assert _bytes(root2) == {
    os.path.join("alda_dsbn", "digits-digits_m", "seed0", k): v for k, v in before.items()
  }


def sweep_config():
  from configs import smoke  # pylint: disable=g-import-not-at-top

  return smoke.get_config()


def test_sweep_methods_pairs_each_method_with_each_bn_by_display_name():
  """Methods outer, BN choices inner; 'auto' is the name's BN (or model.bn when set)."""
  config = sweep_config()
  assert sweep.sweep_methods(config, ["source_only", "alda_dsbn"]) == ["source_only", "alda_dsbn"]
  pairs = sweep.sweep_methods(config, ["dann", "alda"], ["shared", "dsbn"])
  assert pairs == ["dann", "dann_dsbn", "alda", "alda_dsbn"]
  assert sweep.sweep_methods(config, ["alda_dsbn"], ["auto", "dsbn"]) == ["alda_dsbn"] * 2
  # source_only has no DSBN form: beside other BN choices it runs once, with shared BN; asked for
  # alone it is a one-line error.
  pairs = sweep.sweep_methods(config, ["source_only", "alda"], ["shared", "dsbn"])
  assert pairs == ["source_only", "alda", "alda_dsbn"]
  config.model.bn = "dsbn"
  with pytest.raises(UserError, match=r"source_only with DSBN .*model.bn='shared' for source_only"):
    sweep.sweep_methods(config, ["alda", "source_only"])


def test_sweep_over_bn_names_runs_and_rows_by_display_name_and_skips_an_old_finished_run(
  tmp_path, digits_data_dir, monkeypatch
):
  """``--methods=source_only,alda --bn=shared,dsbn`` runs three pairs (source_only: shared BN) in folders (and table rows)
  named as before model.bn; a finished ``alda_dsbn`` run whose config.json predates model.bn
  (no ``model.bn``, no ``sweep.bn``) is the same run, skipped; contradicting or unknown BN choices
  and a pair listed twice are one line, before anything runs."""
  from dsbn_jax import train  # pylint: disable=g-import-not-at-top

  root = tmp_path / "sweep"
  old = sweep_config()
  old.method, old.data.data_dir = "alda_dsbn", digits_data_dir
  old.data.source, old.data.target = "digits", "digits_m"
  saved = json.loads(old.to_json_best_effort())
  del saved["model"]["bn"], saved["sweep"]["bn"]  # what a run before model.bn wrote
  _fake_run(root, "alda_dsbn", "digits->digits_m", 0, 61.0, 60.0)
  (root / "alda_dsbn" / "digits-digits_m" / "seed0" / "config.json").write_text(json.dumps(saved))
  ran = []

  def fake_train(cfg, workdir):
    ran.append((os.path.relpath(workdir, root), cfg.method, cfg.model.bn))
    _fake_run(root, cfg.method, "digits->digits_m", cfg.seed, 51.0, 50.0)
    return {}

  monkeypatch.setattr(train, "train_and_evaluate", fake_train)

  def run(*flags):
    argv = ["sweep", f"--config={cli_driver.SMOKE}", f"--workdir={root}", "--seeds=0", *flags]
    with cli_driver.mesh_of(1):
      return cli_driver.run("sweep", [*argv, f"--config.data.data_dir={digits_data_dir}"])

  result = run("--methods=source_only,alda", "--bn=shared,dsbn")
  assert result.returncode == 0, result.stderr[-3000:]
  names = ["source_only", "alda"]  # alda_dsbn: finished before, skipped; source_only: shared only
  assert ran == [(os.path.join(n, "digits-digits_m", "seed0"), n, "auto") for n in names]
  table = (root / "results.md").read_text()
  assert [line.split(" | ")[0] for line in table.splitlines() if line.startswith("| ")][:4] == [
    "| method",
    "| source_only",
    "| alda",
    "| alda_dsbn",
  ]
  assert "| alda_dsbn | 60.0 |" in table.split("last evaluation")[1]
  for flags, pieces in [
    (["--methods=alda_dsbn", "--bn=shared"], ["--bn='shared'", "--methods='alda_dsbn'", "'alda'"]),
    (["--methods=alda", "--bn=both"], ["'both'", "--bn or config.sweep.bn", "auto, shared, dsbn"]),
    (["--methods=alda,alda_dsbn", "--bn=dsbn"], ["method alda_dsbn twice"]),
  ]:
    ran.clear()
    result = run(*flags)
    errors = [line for line in result.stderr.splitlines() if line.startswith("error: ")]
    assert result.returncode == 2 and len(errors) == 1, result.stderr[-3000:]
    assert all(p in errors[0] for p in pieces) and not ran, errors[0]


# ------------------------------------------------ the paper's layout (Office-31, Office-Home)
def _table(markdown: str, header_start: str) -> list[list[str]]:
  """The table of ``markdown`` whose header starts with ``header_start``: rows of cells (the
  header first, the |---| line dropped)."""
  lines = markdown.splitlines()
  start = next(i for i, line in enumerate(lines) if line.startswith(header_start))
  rows = []
  for line in lines[start:]:
    if not line.startswith("|"):
      break
    if not line.startswith("|---"):
      rows.append([c.strip() for c in line.strip().strip("|").split("|")])
  return rows


def _published_rows(dataset: str) -> list[list[str]]:
  """What the published block must print for ``dataset``: every row of dsbn_jax/published.py, in
  order, its source's footnote number (in order of first use) after its name."""
  sources = list(dict.fromkeys(r.source for r in published.ROWS[dataset]))
  return [
    [f"{r.name} [{sources.index(r.source) + 1}]", *map(published.fmt, r.cells), r.ours or "–"]
    for r in published.ROWS[dataset]
  ]


def test_office31_results_open_with_the_papers_layout_and_the_published_rows(tmp_path):
  """The sweep's tasks in any order and spelling (canonical or short names) land in the paper's
  columns; a task listed but not finished, and a task not listed, are '–'; Avg only for the seeds
  that finished all six; then the published rows, marked, each with its source."""
  tasks = ["W->A", "amazon->webcam", "A->D", "D->W", "webcam->dslr", "D->A"]
  best = {  # method -> sweep task -> best accuracy per seed (seeds 0, 1)
    "source_only": {"W->A": (60.0, 62.0), "amazon->webcam": (70.0, 74.0), "A->D": (65.0, 65.0)},
    "alda_dsbn": {"W->A": (72.0, 73.0), "amazon->webcam": (95.0,), "A->D": (94.0, 96.0)},
    # every task: seed 0 averages 80.0, seed 1 81.67 -> 80.8 ± 1.2
    "alda": dict(zip(tasks, [(70.0, 70.0), (80.0, 82.0), (80.0, 84.0), (90.0, 92.0),
                             (100.0, 100.0), (60.0, 62.0)])),
  }  # fmt: skip
  for m, by_task in best.items():
    for t, values in by_task.items():
      for seed, b in enumerate(values):
        _fake_run(tmp_path, m, t, seed, b, b - 5)
  text = sweep.write_summary(str(tmp_path), tasks, list(best), [0, 1], "office31")["markdown"]
  ours = _table(text, "| method | A→W")
  assert ours == [
    ["method", "A→W", "D→W", "W→D", "A→D", "D→A", "W→A", "Avg"],
    ["source_only", "72.0 ± 2.8", "–", "–", "65.0 ± 0.0", "–", "61.0 ± 1.4", "–"],
    ["alda_dsbn", "95.0", "–", "–", "95.0 ± 1.4", "–", "72.5 ± 0.7", "–"],
    ["alda", "81.0 ± 1.4", "91.0 ± 1.4", "100.0 ± 0.0", "82.0 ± 2.8", "61.0 ± 1.4", "70.0 ± 0.0",
     "80.8 ± 1.2"],
  ]  # fmt: skip
  pub = _table(text, "| published (not run here) |")
  assert pub[0] == ["published (not run here)", *published.TASKS["office31"], "Avg", "ours"]
  assert pub[1:] == _published_rows("office31")
  # Spot checks typed from docs/reference.md §11 (published_test.py checks every number).
  assert ["ALDA + DSBN (the paper) [3]", "96.4", "97.5", "100.0", "96.4", "72.1", "73.8",
          "89.4", "alda_dsbn"] in pub  # fmt: skip
  assert ["ALDA [1]", "95.6 ± 0.5", "97.7 ± 0.1", "100.0 ± 0.0", "94.0 ± 0.4", "72.2 ± 0.4",
          "72.5 ± 0.2", "88.7", "alda"] in pub  # fmt: skip
  assert ["MCC [4]", *["–"] * 6, "89.4", "mcc"] in pub and ["ADDA [1]"] == [
    r[0] for r in pub if r[-1] == "–"
  ]
  assert "- [1] the ALDA paper's Office-31 table" in text and "- [5] TLlib's README" in text
  assert "**not run here**" in text
  # Then the tables of before, over the sweep's own tasks in its order (last: best - 5).
  layout_end = text.index("### Target accuracy (%), best over evaluations")
  assert text.index("in the paper's layout") < text.index("| published (not run here)") < layout_end
  last = _table(text.split("last evaluation")[1], "| method |")
  assert last[0] == ["method", "W→A", "amazon→webcam", "A→D", "D→W", "webcam→dslr", "D→A", "Avg"]
  assert last[1] == ["source_only", "56.0 ± 1.4", "67.0 ± 2.8", "60.0 ± 0.0", "–", "–", "–", "–"]


def test_office_home_layout_has_the_twelve_tasks_in_order_and_dashes_for_tasks_not_run(tmp_path):
  tasks = ["Real_World->Product", "Ar->Cl"]
  for seed, (rp, ac) in enumerate([(80.0, 50.0), (82.0, 52.0), (84.0, 57.0)]):
    _fake_run(tmp_path, "cdan_e_dsbn", "Real_World->Product", seed, rp, rp)
    _fake_run(tmp_path, "cdan_e_dsbn", "Ar->Cl", seed, ac, ac)
  text = sweep.write_summary(str(tmp_path), tasks, ["cdan_e_dsbn"], [0, 1, 2], "office_home")
  text = text["markdown"]
  assert text.startswith("### Office-Home in the paper's layout")
  ours = _table(text, "| method | Ar→Cl")
  order = ["Ar→Cl", "Ar→Pr", "Ar→Rw", "Cl→Ar", "Cl→Pr", "Cl→Rw"]
  order += ["Pr→Ar", "Pr→Cl", "Pr→Rw", "Rw→Ar", "Rw→Cl", "Rw→Pr"]
  assert ours[0] == ["method", *order, "Avg"]
  # Ar→Cl 50, 52, 57 -> 53.0 ± 3.6; Rw→Pr 80, 82, 84 -> 82.0 ± 2.0; ten tasks not in the sweep
  assert ours[1] == ["cdan_e_dsbn", "53.0 ± 3.6", *["–"] * 10, "82.0 ± 2.0", "–"]
  pub = _table(text, "| published (not run here) |")
  assert pub[1:] == _published_rows("office_home")
  assert ["CDAN+E [3]", *["–"] * 12, "65.8", "cdan_e"] in pub
  assert pub[1][:2] == ["ResNet-50 (source only) [1]", "34.9"] and pub[1][-2:] == [
    "46.1",
    "source_only",
  ]


def test_other_datasets_get_no_paper_layout(tmp_path):
  _fake_run(tmp_path, "alda_dsbn", "digits->digits_m", 0, 61.0, 60.0)
  for dataset in ("digits", "custom", None):
    text = sweep.write_summary(str(tmp_path), ["digits->digits_m"], ["alda_dsbn"], [0], dataset)
    assert text["markdown"].startswith("### Target accuracy (%), best over evaluations")
    assert "published" not in text["markdown"]


def test_run_sweep_matches_tasks_to_the_paper_by_canonical_domain(tmp_path, monkeypatch):
  """``--tasks=A->W,Webcam->Amazon`` on Office-31: the sweep passes the dataset and the canonical
  domain names, so both tasks find their column (training replaced by a results.json)."""
  from configs import office31  # pylint: disable=g-import-not-at-top
  from dsbn_jax import train  # pylint: disable=g-import-not-at-top

  config = office31.get_config()
  config.model.pretrained_path = ""  # no weights file to check: nothing trains
  config.data.data_dir = str(tmp_path / "tfds")
  config.data.manual_dir = str(tmp_path / "manual")  # not empty: the config check looks no further
  os.makedirs(config.data.manual_dir)
  (tmp_path / "manual" / "domain_adaptation_images.tar.gz").write_bytes(b"")
  root = tmp_path / "sweep"
  ran = []

  def fake_train(cfg, workdir):
    ran.append((cfg.data.source, cfg.data.target))
    os.makedirs(workdir, exist_ok=True)
    _write_results(workdir, cfg.seed, 90.0 if cfg.data.source == "A" else 70.0, 60.0)

  monkeypatch.setattr(train, "train_and_evaluate", fake_train)
  out = sweep.run_sweep(config, str(root), ["A->W", "Webcam->Amazon"], ["alda_dsbn"], [0])
  assert ran == [("A", "W"), ("Webcam", "Amazon")]
  ours = _table(out["markdown"], "| method | A→W")
  assert ours[1] == ["alda_dsbn", "90.0", "–", "–", "–", "–", "70.0", "–"]
  assert (root / "results.md").read_text() == out["markdown"]
