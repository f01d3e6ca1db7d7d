"""Process-level control of a training run: one live run per workdir, and a graceful stop.

- ``WorkdirLock``: an exclusive ``fcntl.flock`` on ``<workdir>/.lock``, held while a run trains.
  A second start in the same workdir is refused with one line naming the running process. The
  kernel drops the lock when its holder exits, however it exits (crash, ``kill -9``), so a dead run
  never leaves a stale lock behind (the pid written in the file is only for the message).
- ``GracefulStop``: on SIGINT (Ctrl-C) or SIGTERM (what SLURM, Kubernetes and preemptible cloud VMs
  send before killing), the run finishes its current step, writes a checkpoint there and exits
  with ``EXIT_STOPPED`` (75, ``EX_TEMPFAIL``: "try again later"), which a scheduler can tell apart
  from a failure (1: a crash, 2: bad input) and answer by requeueing the same command, which
  resumes. A second signal aborts at once. With several processes, every process stops at the
  same step: the flags are combined (any process signalled) at agreed steps.
"""

import fcntl
import os
import signal
import socket
import threading
import time

import jax
import numpy as np

from dsbn_jax.errors import UserError

EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped on request, resumable; not a failure
_SIGNALS = (signal.SIGINT, signal.SIGTERM)


class Stopped(Exception):
  """Raised once a signalled run has saved its checkpoint; ``cli.run_cli`` exits EXIT_STOPPED."""

  def __init__(self, step: int, signal_name: str):
    super().__init__(f"stopped at step {step} ({signal_name}), checkpoint saved; run the same "
                     "command to resume")
    self.step = step


class WorkdirLock:
  """Exclusive lock on a workdir for the lifetime of one run (``acquire`` / ``release``)."""

  FILE = ".lock"

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, self.FILE)
    self._f = None

  def acquire(self) -> None:
    f = open(self.path, "a+", encoding="utf-8")  # pylint: disable=consider-using-with
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      f.seek(0)
      holder = f.read().strip() or "another process"
      f.close()
      raise UserError(f"workdir {os.path.dirname(self.path) or '.'} is in use by a running run "
                      f"({holder}); wait for it to finish or stop it, or choose another "
                      "--workdir") from None
    f.seek(0)
    f.truncate()
    f.write(f"pid {os.getpid()} on {socket.gethostname()}, started "
            f"{time.strftime('%Y-%m-%d %H:%M:%S')}\n")
    f.flush()
    self._f = f

  def release(self) -> None:
    if self._f is not None:
      self._f.close()  # closing the file drops the flock
      self._f = None


class GracefulStop:
  """Context manager: while inside, SIGINT/SIGTERM request a stop instead of killing the process.

  ``requested(step)`` says whether to stop after ``step``. A single process answers from its own
  flag at every step; several processes combine their flags (an all-gather, which waits for the
  device queue) only at steps where ``sync`` is true, so that all of them stop at the same step.
  """

  def __init__(self):
    self.signal_name = None
    self._old = {}

  def _handle(self, signum, frame):  # pylint: disable=unused-argument
    name = signal.Signals(signum).name
    if self.signal_name is not None:  # the second signal: abort now, the old way
      self._restore()
      if signum == signal.SIGINT:
        raise KeyboardInterrupt
      os.kill(os.getpid(), signum)
      return
    self.signal_name = name
    if jax.process_index() == 0:
      print(f"\n{name}: stopping after the current step and saving a checkpoint (send it again "
            "to abort without saving)", flush=True)

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():  # Python's rule for handlers
      for s in _SIGNALS:
        self._old[s] = signal.signal(s, self._handle)
    return self

  def _restore(self):
    for s, old in self._old.items():
      signal.signal(s, old)
    self._old = {}

  def __exit__(self, *exc):
    self._restore()

  def requested(self, sync: bool = True) -> bool:
    if jax.process_count() == 1:
      return self.signal_name is not None
    if not sync:
      return False
    from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
    flags = multihost_utils.process_allgather(np.int32(self.signal_name is not None))
    if np.any(flags) and self.signal_name is None:
      self.signal_name = "a signal to another process"
    return bool(np.any(flags))
