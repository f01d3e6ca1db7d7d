"""reporting.Progress: training-only img/s, a line per report in a log, a tqdm bar on a terminal."""

import io

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
