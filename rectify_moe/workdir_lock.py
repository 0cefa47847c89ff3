"""One training job per workdir: `WORKDIR/train.lock`, held with `flock` for the job's life.

The file names the holder (pid, host, start time). A second job on the same workdir fails at once naming the holder;
a lock left by a process that is gone (the kernel drops `flock` locks of dead processes) is taken over with a note.
"""

from __future__ import annotations

import fcntl
import json
import os
import socket
import time
from typing import Optional

from rectify_moe import log

LOCK_NAME = "train.lock"


class WorkdirBusyError(RuntimeError):
  """Another training process holds the workdir; one line naming it."""


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


class WorkdirLock:
  """`with WorkdirLock(workdir):` or `acquire()` / `release()`."""

  def __init__(self, workdir: str):
    self.path = os.path.join(workdir, LOCK_NAME)
    self._fd: Optional[int] = None

  def _holder(self) -> dict:
    try:
      with open(self.path) as f:
        return json.loads(f.read() or "{}")
    except (OSError, ValueError):
      return {}

  def acquire(self) -> "WorkdirLock":
    os.makedirs(os.path.dirname(self.path), exist_ok=True)
    fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
    try:
      fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
      os.close(fd)
      holder = self._holder()
      raise WorkdirBusyError(
          f"Workdir {os.path.dirname(self.path)} is in use by training process pid {holder.get('pid', '?')} on "
          f"{holder.get('host', '?')} (since {holder.get('started', '?')}); wait for it or stop it, or use another "
          "--workdir.") from None
    previous = self._holder()
    if previous.get("pid") and previous.get("pid") != os.getpid():
      same_host = previous.get("host") == socket.gethostname()
      state = "has exited" if same_host and not _pid_alive(int(previous["pid"])) else "no longer holds it"
      log.warning(f"Taking over the stale lock {self.path}: training process pid {previous['pid']} {state}.")
    os.ftruncate(fd, 0)
    os.write(fd, json.dumps({"pid": os.getpid(), "host": socket.gethostname(),
                             "started": time.strftime("%Y-%m-%d %H:%M:%S")}).encode())
    os.fsync(fd)
    self._fd = fd
    return self

  def release(self) -> None:
    if self._fd is None:
      return
    try:
      os.ftruncate(self._fd, 0)
      fcntl.flock(self._fd, fcntl.LOCK_UN)
    finally:
      os.close(self._fd)
      self._fd = None

  def __enter__(self) -> "WorkdirLock":
    return self.acquire()

  def __exit__(self, *exc) -> bool:
    self.release()
    return False
