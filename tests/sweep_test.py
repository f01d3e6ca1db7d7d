"""Sweeps: the table from finished runs, skipping finished runs, refusing a changed config."""

import json
import os
import subprocess
import sys

from dsbn_jax import sweep
from tests import cli_driver, suite_env

ROOT = suite_env.ROOT


def _fake_run(root, method, task, seed, best, last):
  workdir = sweep.run_dir(str(root), method, task, seed)
  os.makedirs(workdir)
  with open(os.path.join(workdir, "results.json"), "w", encoding="utf-8") as f:
    json.dump({"seed": seed, "best_accuracy": best, "last_accuracy": last}, f)


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
