"""Process-level control of a training run: a writable workdir, one live run per workdir, and a
graceful stop.

- ``check_writable``: before any data is prepared or anything written, a workdir that is a file,
  lies under a file, or cannot be written (permissions, a read-only filesystem, a full disk) is
  refused in one line, checked with ``os.access`` and a probe file created and removed at once.
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

import errno
import fcntl
import os
import signal
import socket
import tempfile
import threading
import time

import jax
import numpy as np

from dsbn_jax.errors import UserError

EXIT_STOPPED = 75  # EX_TEMPFAIL: stopped on request, resumable; not a failure
_SIGNALS = (signal.SIGINT, signal.SIGTERM)


PROBE_PREFIX = ".dsbn_jax_write_probe"  # the probe file's name starts so (removed at once)


def _write_probe(folder: str) -> None:
  """Creates a file in ``folder`` and removes it: what ``os.access`` cannot tell (a read-only
  filesystem, ACLs, root squash on NFS) fails here."""
  fd, name = tempfile.mkstemp(prefix=PROBE_PREFIX, dir=folder)
  os.close(fd)
  os.remove(name)


def check_writable(folder: str, flag: str = "--workdir", value: str | None = None) -> None:
  """Refuses a ``folder`` a run cannot write, before anything is prepared or written (one line).

  ``folder`` may not exist yet: then its nearest existing parent must be a writable folder (where
  ``os.makedirs`` will create it). Refused: ``folder`` or a parent is a file; the folder is not
  writable by its permissions (``os.access``, which root passes: root may write anywhere), or
  creating a file there fails (the probe: a read-only filesystem, a full disk, root squash, a
  virtual filesystem such as /proc). The messages name ``flag``: ``{flag}={folder}``, or
  ``{flag}={value}`` when ``folder`` is the folder of the file the flag names (``predict --out``).
  """
  name = flag.split()[-1]  # what to choose again: "sweep --workdir" -> --workdir
  given = folder if value is None else value
  path = os.path.abspath(folder)
  existing = path
  while not os.path.exists(existing):
    if os.path.islink(existing):
      raise UserError(
        f"{flag}={given} cannot be created: {existing} is a broken symbolic link; "
        f"choose another {name}"
      )
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    if existing == path and value is None:
      raise UserError(f"{flag}={given} is a file, not a folder; choose a new {name}")
    raise UserError(
      f"{flag}={given} cannot be created: {existing} is a file, not a folder; choose a new {name}"
    )
  where = "" if existing == path and value is None else f" (it would be created in {existing})"
  why = None
  if not os.access(existing, os.W_OK | os.X_OK):
    why = os.strerror(errno.EACCES)
  else:
    try:
      _write_probe(existing)
    except OSError as e:
      if e.errno in (errno.ENOSPC, errno.EDQUOT):
        raise UserError(
          f"disk full ({os.strerror(e.errno)}) in {existing}: {flag}={given} "
          "cannot be written; free some space, then run the same command again "
          "(nothing was written)"
        ) from None
      why = e.strerror or str(e)
      if e.errno == errno.ENOENT:  # the folder exists: a virtual filesystem such as /proc
        why = f"no file can be created there ({why})"
  if why is not None:
    raise UserError(
      f"{flag}={given} is not writable{where}: {why}; choose a writable {name} "
      "or change the folder's permissions (nothing was written)"
    )


class Stopped(Exception):
  """Raised once a signalled run has saved its checkpoint; ``cli.run_cli`` exits EXIT_STOPPED."""

  def __init__(self, step: int, signal_name: str):
    super().__init__(
      f"stopped at step {step} ({signal_name}), checkpoint saved; run the same command to resume"
    )
    self.step = step


class WorkdirLock:
  """Exclusive lock on a workdir for the lifetime of one run (``acquire`` / ``release``).

  ``acquire`` creates the workdir when it does not exist; ``release(discard=True)`` -- a run that
  failed before writing anything -- removes it again when this lock created it and it holds
  nothing else, so a refused start leaves no folder behind. The lock file is unlinked while still
  held: a process that opened it meanwhile finds it locked and refuses, one that comes later
  creates a new one (``acquire`` retries when the folder vanished between its creation and the
  open).
  """

  FILE = ".lock"

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, self.FILE)
    self._f = None
    self._created = False

  def _open(self):
    workdir = os.path.dirname(self.path) or "."
    for _ in range(10):
      created = not os.path.isdir(workdir)
      os.makedirs(workdir, exist_ok=True)
      try:
        return open(self.path, "a+", encoding="utf-8"), created  # pylint: disable=consider-using-with
      except FileNotFoundError:  # removed by a failed start that had created it
        continue
    raise UserError(f"workdir {workdir} keeps disappearing; check what deletes it")

  def acquire(self) -> None:
    f, created = self._open()
    try:
      fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
      f.seek(0)
      holder = f.read().strip() or "another process"
      f.close()
      raise UserError(
        f"workdir {os.path.dirname(self.path) or '.'} is in use by a running run "
        f"({holder}); wait for it to finish or stop it, or choose another "
        "--workdir"
      ) from None
    f.seek(0)
    f.truncate()
    f.write(
      f"pid {os.getpid()} on {socket.gethostname()}, started {time.strftime('%Y-%m-%d %H:%M:%S')}\n"
    )
    f.flush()
    self._f, self._created = f, created

  @property
  def held(self) -> bool:
    return self._f is not None

  def release(self, discard: bool = False) -> None:
    if self._f is None:
      return
    try:
      if discard and self._created:
        try:
          os.remove(self.path)
          os.rmdir(os.path.dirname(self.path) or ".")  # fails when anything else is there
        except OSError:
          pass
    finally:
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
      print(
        f"\n{name}: stopping after the current step and saving a checkpoint (send it again "
        "to abort without saving)",
        flush=True,
      )

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
