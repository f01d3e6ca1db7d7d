"""reporting: Progress (training-only img/s, a line per report in a log, a tqdm bar on a terminal)
and the panels of curves.png."""

import io
import json

import pytest

from dsbn_jax import reporting


class _Clock:
  def __init__(self):
    self.now = 0.0

  def __call__(self):
    return self.now


class _Terminal(io.StringIO):
  def isatty(self):
    return True


@pytest.fixture
def clock(monkeypatch):
  clock = _Clock()
  monkeypatch.setattr(reporting.time, "perf_counter", clock)
  return clock


def test_the_rate_leaves_out_the_first_step_and_evaluations(clock):
  log, synced = io.StringIO(), []
  progress = reporting.Progress(10, 0, 4, sync=synced.append, file=log)
  clock.now = 30.0  # the first step: compilation
  progress.tick(1, "metrics 1")
  assert synced == ["metrics 1"] and progress.rate(1) == 0.0
  for step in (2, 3):
    clock.now += 2.0  # 2 s per training step
    progress.tick(step, f"metrics {step}")
  with progress.excluded("state"):
    clock.now += 100.0  # an evaluation
  assert synced == ["metrics 1", "state"]  # the clock starts once, after the first step
  clock.now += 2.0
  progress.report(4, {"train/loss": 1.5, "train/source_acc": 0.25})
  assert progress.rate(4) == pytest.approx(3 * 4 / 6.0)  # 3 steps of 4 images in 6 s
  # ETA at this session's pace, evaluations included: 6 steps at (106 s / 3 steps)
  assert log.getvalue() == ("step 4/10 (40%) 2.0 img/s ETA 3m32s loss=1.5 source_acc=0.25\n")
  progress.write("step 4: target accuracy 12.00%")
  assert log.getvalue().endswith("\nstep 4: target accuracy 12.00%\n")
  progress.close()


def test_a_terminal_gets_a_tqdm_bar_and_lines_above_it(clock):
  term = _Terminal()
  progress = reporting.Progress(10, 2, 4, file=term)
  clock.now = 1.0
  progress.tick(3, None)
  clock.now = 3.0
  progress.report(4, {"train/loss": 0.5})
  progress.write("evaluating")
  progress.close()
  out = term.getvalue()
  assert "\r" in out and "step 4/10" in out and "2.0 img/s ETA 0m12s" in out and "loss=0.5" in out
  assert "evaluating\n" in out


def test_other_processes_print_nothing(clock, capsys):
  progress = reporting.Progress(10, 0, 4, enabled=False)
  progress.tick(1, None)
  progress.report(1, {})
  progress.close()
  assert capsys.readouterr().out == ""


# ------------------------------------------------------------ curves.png: every method's terms
NOT_PLOTTED = {"grl_coeff", "lambda_t", "target_acc"}  # schedules and a label-reading diagnostic
FIRST = ["target accuracy (evaluation)", "total loss (CE + transfer)", "source cross-entropy"]
PANELS = {  # the comparison methods' panels after FIRST, in CURVES' order
  "cdan": ["CDAN conditional domain loss", "confident target fraction"],
  "cdan_e": [
    "CDAN conditional domain loss",
    "CDAN+E entropy GRL coefficient",
    "confident target fraction",
  ],
  "jan": ["JAN joint MMD"],
  "mada": ["MADA class-wise domain losses (sum)", "confident target fraction"],
  "mcc": ["MCC class confusion (target)"],
  "bnm": ["BNM: − mean singular value (target)"],
}


def test_curves_have_a_panel_for_every_term_a_method_logs():
  """What each method logs is tests/methods_test.py's METRICS (checked there against real steps):
  each of it has a panel but the schedules and the diagnostic."""
  from tests.methods_test import METRICS  # pylint: disable=g-import-not-at-top  (JAX)

  plotted = {k for k, _, _ in reporting.CURVES}
  missing = {
    m: sorted({f"train/{k}" for k in logged - NOT_PLOTTED} - plotted)
    for m, logged in METRICS.items()
  }
  assert not any(missing.values()), missing
  assert set(PANELS) == set(METRICS) - {"source_only", "dann", "alda"}


@pytest.mark.parametrize("method", list(PANELS))
def test_curves_draw_the_comparison_methods_terms(method, tmp_path):
  from tests.methods_test import METRICS  # pylint: disable=g-import-not-at-top  (JAX)

  logged = {"loss", "ce", "lr", "source_acc"} | METRICS[method]
  rows = [{"step": s, **{f"train/{k}": 1.0 / s for k in sorted(logged)}} for s in range(1, 4)]
  path = tmp_path / "metrics.jsonl"
  path.write_text("".join(json.dumps(r) + "\n" for r in rows + [{"step": 3, "eval/accuracy": 9.0}]))
  titles = reporting.plot_curves(str(path), str(tmp_path / "c.png"), method)
  assert titles == FIRST + PANELS[method]
  assert (tmp_path / "c.png").read_bytes()[:4] == b"\x89PNG"
