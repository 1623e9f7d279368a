"""One writer per run directory: an exclusive lock every tool that writes one takes first.

  with workdir_lock.hold("runs/sft", hint="use another --workdir"):
    ...                                   # train, merge, import: the only writer of runs/sft

The lock is `<dir>/.llm_jax.lock` (the eval job's outputs: `.llm_jax-eval.lock`; a synth output:
`<stem>.lock` beside it), locked with flock(2) on a descriptor held while the writer works, and
holding one JSON line: the holder's host, pid, start time and command. A second writer is refused
before it does any work, with one line naming the holder (`Busy`, exit status 75). The kernel
drops the flock when its process dies however it dies (kill -9 included), so a lock file left
behind by a dead process on this host is taken over with a one-line warning. On a clean exit the
file is removed. Readers (chat, serve, export, eval reading checkpoints) take no lock.

NFS and several hosts: Linux maps flock to NFS byte-range locks, which every client sees; a
filesystem whose locks are host-local (some FUSE mounts, NFS mounted with `nolock`) cannot show
another host's lock, so a holder also refreshes the file's modification time every
`HEARTBEAT_S`: a record of another host is taken over only when it has not been refreshed for
`STALE_AFTER_S`. Where flock is not supported at all the record alone decides (best effort, said
once in the log). In a multi-process JAX job only process 0 takes the lock (`jax_processes=True`)
and tells the others whether it got it, so they stop with it instead of waiting for it.
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import shlex
import socket
import sys
import threading
import time
from typing import Iterator, Optional

from absl import logging

LOCK_NAME = ".llm_jax.lock"  # a run directory's writer (train, merge, import)
EVAL_LOCK_NAME = ".llm_jax-eval.lock"  # the eval job's outputs (eval_<step>.json, eval/)
HEARTBEAT_S = 60.0
STALE_AFTER_S = 600.0
EXIT_STATUS = 75  # EX_TEMPFAIL: "try again later", for scripts that wait for the holder


class Busy(OSError):
  """Another process writes the directory; the message names it. CLIs exit with status 75."""
  exit_code = EXIT_STATUS


def _display(path: str) -> str:
  """The path as a user would type it: relative to the current directory when inside it."""
  path = os.path.abspath(path)
  try:
    rel = os.path.relpath(path)
  except ValueError:
    return path
  return path if rel.startswith("..") else rel


def command_line() -> str:
  """This process's command, as typed (`python -m llm_jax.main --config=...`), at most 300 chars."""
  argv = list(getattr(sys, "orig_argv", None) or [sys.executable, *sys.argv])
  if argv and (argv[0] == sys.executable or os.path.basename(argv[0]).startswith("python")):
    argv[0] = os.path.basename(argv[0])
  text = " ".join(" ".join(shlex.quote(a) for a in argv).split())  # one line
  return text if len(text) <= 300 else text[:297] + "..."


def _when(started: float) -> str:
  t = time.localtime(started)
  same_day = time.strftime("%Y-%m-%d", t) == time.strftime("%Y-%m-%d")
  return time.strftime("%H:%M" if same_day else "%Y-%m-%d %H:%M", t)


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:  # another user's process
    return True
  return True


def _read_record(fd: int) -> Optional[dict]:
  try:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 65536)
  except OSError:
    return None
  try:
    record = json.loads(raw.decode("utf-8", "replace").strip() or "null")
  except ValueError:
    return None
  return record if isinstance(record, dict) and "pid" in record else None


def _holder(record: Optional[dict]) -> str:
  if not record:
    return "another process (it has not written its name yet)"
  return (f"pid {record.get('pid')} on host {record.get('host')} since "
          f"{_when(float(record.get('started', 0)))} ({record.get('command', '?')})")


class Lock:
  """An exclusive lock on `target` (a directory or an output file) kept in the file `path`."""

  def __init__(self, path: str, target: str, hint: str):
    self.path, self.target, self.hint = os.path.abspath(path), target, hint
    self._fd: Optional[int] = None
    self._stop = threading.Event()
    self._beat: Optional[threading.Thread] = None

  def _refuse(self, record: Optional[dict], detail: str = "") -> Busy:
    who = _holder(record)
    if record and record.get("host") == socket.gethostname() and record.get("pid") == os.getpid():
      who = "this same process (an earlier writer in it has not finished)"
    return Busy(f"{_display(self.target)} is being written by {who}{detail}; wait for it or "
                f"{self.hint}")

  def _open(self) -> int:
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    return os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)

  def acquire(self) -> "Lock":
    for _ in range(20):  # the file may be removed by its holder between our open and flock
      fd = self._open()
      try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        flock = True
      except BlockingIOError:
        record = None
        for _ in range(10):  # the holder writes its record right after taking the lock
          record = _read_record(fd)
          if record:
            break
          time.sleep(0.02)
        os.close(fd)
        detail = ""
        if (record and record.get("host") == socket.gethostname()
            and not _pid_alive(int(record.get("pid", 0)))):
          detail = (", which has exited, but a process it started still holds the lock (`fuser "
                    f"{_display(self.path)}` names it)")
        raise self._refuse(record, detail) from None
      except OSError as e:  # ENOLCK, EOPNOTSUPP...: this filesystem has no flock
        logging.warning("%s: this filesystem does not support file locks (%s); the lock file's "
                        "record alone keeps a second writer out (best effort)",
                        _display(self.path), e.strerror)
        flock = False
      try:
        same_file = os.fstat(fd).st_ino == os.stat(self.path).st_ino
      except FileNotFoundError:
        same_file = False
      if not same_file:  # its holder removed it as we opened it: open the new one
        os.close(fd)
        continue
      try:
        self._take(fd, flock)
      except BaseException:
        os.close(fd)
        raise
      self._fd = fd
      self._stop.clear()
      self._beat = threading.Thread(target=self._heartbeat, name="llm_jax-lock-heartbeat",
                                    daemon=True)
      self._beat.start()
      return self
    raise Busy(f"{_display(self.target)}: could not take {_display(self.path)} (it keeps being "
               "replaced); is another writer starting and stopping?")

  def _take(self, fd: int, flock: bool) -> None:
    """With the flock held (or none available): judge a record left in the file, then write ours."""
    old = _read_record(fd)
    if old:
      here = old.get("host") == socket.gethostname()
      pid = int(old.get("pid", 0))
      age = time.time() - os.fstat(fd).st_mtime
      if here and (pid != os.getpid() and (flock or not _pid_alive(pid))):
        # flock held by us: the holder is gone (its pid may since name another process).
        logging.warning("%s: took over the lock of %s, which is no longer running",
                        _display(self.target), _holder(old))
      elif here and pid == os.getpid() and flock:
        pass  # our own record from an earlier writer in this process that did not clean up
      elif not here and age > STALE_AFTER_S:
        logging.warning("%s: took over the lock of %s, not refreshed for %.0f min (the run is "
                        "gone)", _display(self.target), _holder(old), age / 60)
      else:
        detail = ""
        if not here:
          detail = (f"; that host's lock cannot be checked from here: if that run is gone, "
                    f"delete {_display(self.path)} or wait {STALE_AFTER_S / 60:.0f} min")
        raise self._refuse(old, detail)
    record = {"host": socket.gethostname(), "pid": os.getpid(), "started": time.time(),
              "started_at": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "command": command_line()}
    os.ftruncate(fd, 0)
    os.pwrite(fd, (json.dumps(record) + "\n").encode("utf-8"), 0)
    os.fsync(fd)

  def _heartbeat(self) -> None:
    while not self._stop.wait(HEARTBEAT_S):
      fd = self._fd
      if fd is None:
        return
      try:
        os.utime(fd)
      except OSError:
        pass

  def release(self) -> None:
    fd, self._fd = self._fd, None
    if fd is None:
      return
    self._stop.set()
    try:
      os.unlink(self.path)  # while still locked: a waiting opener sees another inode and retries
    except OSError:
      pass
    os.close(fd)  # drops the flock

  def __enter__(self) -> "Lock":
    return self.acquire() if self._fd is None else self

  def __exit__(self, *exc) -> None:
    self.release()


@contextlib.contextmanager
def hold(directory: str, *, hint: str = "use another --workdir", name: str = LOCK_NAME,
         jax_processes: bool = False) -> Iterator[Optional[Lock]]:
  """Holds the lock of `directory` (created if missing) while the block runs; raises Busy, before
  the block, if another process holds it. `jax_processes`: this is one process of a JAX job
  (jax.distributed already started): process 0 locks, the others learn its outcome."""
  lock = Lock(os.path.join(directory, name), directory, hint)
  if jax_processes:
    import jax  # pylint: disable=g-import-not-at-top (synth never loads JAX)
    if jax.process_count() > 1:
      with _process_0_holds(lock, jax) as held:
        yield held
      return
  with lock:
    yield lock


@contextlib.contextmanager
def hold_file(lock_path: str, target: str, *, hint: str = "use another --out"
              ) -> Iterator[Lock]:
  """Holds the lock file `lock_path` for the output `target` (e.g. a synth run's files)."""
  with Lock(lock_path, target, hint) as lock:
    yield lock


@contextlib.contextmanager
def _process_0_holds(lock: Lock, jax) -> Iterator[Optional[Lock]]:
  import numpy as np  # pylint: disable=g-import-not-at-top
  from jax.experimental import multihost_utils  # pylint: disable=g-import-not-at-top
  message = b""
  if jax.process_index() == 0:
    try:
      lock.acquire()
    except OSError as e:
      message = str(e).encode("utf-8") or b"?"
  size = int(multihost_utils.broadcast_one_to_all(np.int32(len(message))))
  if size:
    buf = np.frombuffer(message, np.uint8) if message else np.zeros(size, np.uint8)
    text = np.asarray(multihost_utils.broadcast_one_to_all(buf)).tobytes().decode("utf-8")
    raise Busy(text if message else f"process 0: {text}")
  try:
    yield lock if jax.process_index() == 0 else None
  finally:
    lock.release()
