"""One run per workdir: a lock file that names its owner.

``main.py`` takes the lock of ``--workdir`` (process 0 of a multi-process job) in the
modes that write there (training, sampling, evaluation, encoding, the demo), after the
start-up checks and before anything is written, and removes it when the run ends (also on
errors and preemption). The lock is ``<workdir>/sfd_jax.lock``, a JSON record of the
owner: host, pid, boot id, process start time, start time (UTC), mode, command, and a
heartbeat rewritten every ``HEARTBEAT_S`` seconds.

A second launch on the same workdir stops with one line naming the owner (a
``WorkdirInUseError``, exit 2) and changes nothing. A lock whose owner is gone is
*stale* and is taken over with a warning:

* same host: the pid is not alive, or is alive but is another process (its start time
  differs), or the machine has rebooted since (another boot id);
* another host: the heartbeat is older than ``STALE_AFTER_S`` seconds.

``force=True`` (``--config.force_unlock=True``) takes over any lock: for the stuck case
(e.g. a heartbeat that looks fresh because of clock skew, after making sure the other run
is gone). Creation is atomic (a hard link); workdirs are local paths (a bucket through
a mount: ``main.py`` refuses a URL workdir).
"""
from __future__ import annotations

import contextlib
import datetime
import json
import os
import socket
import threading
import time
import uuid
from typing import Any

from absl import logging

from sfd_jax.core import errors

LOCK_NAME = "sfd_jax.lock"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 600.0
TAKEOVER_STALE_S = 60.0


class WorkdirInUseError(errors.UserError):
  """Another run owns the workdir."""
  kind = "workdir in use"


def lock_path(workdir: str) -> str:
  return os.path.join(workdir, LOCK_NAME)


def _boot_id() -> str:
  try:
    with open("/proc/sys/kernel/random/boot_id", encoding="utf-8") as f:
      return f.read().strip()
  except OSError:
    return ""


def _proc_start(pid: int) -> str:
  """The start time of process ``pid`` in clock ticks since boot ("" if unknown)."""
  try:
    with open(f"/proc/{pid}/stat", encoding="utf-8") as f:
      stat = f.read()
  except OSError:
    return ""
  fields = stat.rsplit(")", 1)[-1].split()
  return fields[19] if len(fields) > 19 else ""


def _pid_alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  except OSError:
    return False
  return True


def _utc(t: float) -> str:
  return datetime.datetime.fromtimestamp(t, datetime.timezone.utc).strftime(
      "%Y-%m-%d %H:%M:%S UTC")


def owner_record(mode: str = "", command: str = "") -> dict[str, Any]:
  """This process as a lock owner."""
  now = time.time()
  return {"host": socket.gethostname(), "pid": os.getpid(), "boot_id": _boot_id(),
          "proc_start": _proc_start(os.getpid()), "started": _utc(now),
          "started_unix": now, "heartbeat_unix": now, "mode": mode,
          "command": command[:500], "token": uuid.uuid4().hex}


def describe(owner: dict[str, Any], now: float | None = None) -> str:
  """``process 123 on host h (--mode=train, started ..., last heartbeat 5 s ago)``."""
  now = time.time() if now is None else now
  beat = owner.get("heartbeat_unix")
  ago = f", last heartbeat {max(0, now - float(beat)):.0f} s ago" if beat else ""
  mode = f"--mode={owner['mode']}, " if owner.get("mode") else ""
  return (f"process {owner.get('pid', '?')} on host {owner.get('host', '?')} ({mode}started "
          f"{owner.get('started', '?')}{ago})")


def stale_reason(owner: dict[str, Any], now: float | None = None) -> str | None:
  """Why the lock of ``owner`` is stale, or None while its owner may still run."""
  now = time.time() if now is None else now
  if owner.get("host") == socket.gethostname():
    if owner.get("boot_id") and _boot_id() and owner["boot_id"] != _boot_id():
      return "the machine has restarted since"
    try:
      pid = int(owner["pid"])
    except (KeyError, TypeError, ValueError):
      return "it names no process"
    if not _pid_alive(pid):
      return f"process {pid} is not running"
    start = _proc_start(pid)
    if owner.get("proc_start") and start and start != owner["proc_start"]:
      return f"process {pid} is another process now"
    return None
  try:
    age = now - float(owner.get("heartbeat_unix", 0))
  except (TypeError, ValueError):
    return "it has no heartbeat"
  if age > STALE_AFTER_S:
    return f"its last heartbeat is {age:.0f} s old (> {STALE_AFTER_S:.0f} s)"
  return None


def read_owner(path: str) -> dict[str, Any] | None:
  """The lock's record; None if there is no lock; ``{}`` if it cannot be read."""
  try:
    with open(path, encoding="utf-8") as f:
      return json.load(f)
  except FileNotFoundError:
    return None
  except (OSError, ValueError):
    return {}


def _write_new(path: str, record: dict[str, Any]) -> bool:
  """Creates ``path`` with ``record`` atomically; False if it exists."""
  tmp = f"{path}.{record['token']}.tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(record, f, indent=1)
  try:
    os.link(tmp, path)
    return True
  except FileExistsError:
    return False
  finally:
    os.unlink(tmp)


def _replace(path: str, record: dict[str, Any]) -> None:
  tmp = f"{path}.{record['token']}.tmp"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(record, f, indent=1)
  os.replace(tmp, path)


class WorkdirLock:
  """The lock of one workdir, held by this process (``acquire`` / ``release``)."""

  def __init__(self, workdir: str, *, mode: str = "", command: str = "", force: bool = False):
    self.workdir = workdir
    self.path = lock_path(workdir)
    self.record = owner_record(mode, command)
    self.force = force
    self._stop = threading.Event()
    self._thread: threading.Thread | None = None
    self.took_over: dict[str, Any] | None = None

  # ---------------------------------------------------------------- taking it
  def acquire(self) -> "WorkdirLock":
    errors.check_writable(self.workdir, "the workdir")
    self._acquire_local()
    self._thread = threading.Thread(target=self._beat, name="sfd_jax_workdir_lock",
                                    daemon=True)
    self._thread.start()
    return self

  def _refuse(self, owner: dict[str, Any]) -> WorkdirInUseError:
    return WorkdirInUseError(
        f"{self.workdir} is in use by {describe(owner)}; nothing was changed. Wait for "
        "that run to end or use another --workdir; if it is gone but its lock "
        f"({LOCK_NAME}) is not taken over by itself, rerun with --config.force_unlock=True")

  def _acquire_local(self) -> None:
    for _ in range(3):
      if _write_new(self.path, self.record):
        return
      owner = read_owner(self.path)
      if owner is None:
        continue                              # released meanwhile: try again
      reason = ("--config.force_unlock" if self.force else
                "it cannot be read" if not owner else stale_reason(owner))
      if reason is None:
        raise self._refuse(owner)
      self._take_over(owner, reason)
      return
    raise WorkdirInUseError(f"{self.workdir}: the lock {self.path} keeps changing (other "
                            "runs are starting in this workdir); start one run at a time")

  def _take_over(self, owner: dict[str, Any], reason: str) -> None:
    """Replaces the stale lock of ``owner``, unless another launch does the same."""
    mutex = self.path + ".takeover"
    try:
      fd = os.open(mutex, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
    except FileExistsError:
      try:
        if time.time() - os.path.getmtime(mutex) < TAKEOVER_STALE_S:
          raise WorkdirInUseError(
              f"{self.workdir}: another run is taking over its stale lock ({describe(owner)})"
              "; nothing was changed") from None
        os.unlink(mutex)
      except FileNotFoundError:
        pass
      return self._take_over(owner, reason)
    os.close(fd)
    try:
      now = read_owner(self.path)
      if now and owner and now.get("token") != owner.get("token") and not self.force:
        raise self._refuse(now)             # a new owner came first
      with contextlib.suppress(FileNotFoundError):
        os.unlink(self.path)
      if not _write_new(self.path, self.record):
        raise self._refuse(read_owner(self.path) or {})
    finally:
      with contextlib.suppress(FileNotFoundError):
        os.unlink(mutex)
    self.took_over = owner
    logging.warning("took over the lock of %s from %s: %s", self.workdir,
                    describe(owner) if owner else "an unreadable lock file", reason)

  # ---------------------------------------------------------------- holding it
  def _mine(self) -> bool:
    owner = read_owner(self.path)
    return bool(owner) and owner.get("token") == self.record["token"]

  def _beat(self) -> None:
    while not self._stop.wait(HEARTBEAT_S):
      try:
        if not self._mine():
          logging.warning("the lock of %s is no longer this run's (%s): another run may be "
                          "writing there", self.workdir,
                          describe(read_owner(self.path) or {}))
          return
        self.record["heartbeat_unix"] = time.time()
        _replace(self.path, self.record)
      except Exception as e:  # pylint: disable=broad-except
        logging.warning("cannot refresh the lock of %s: %s", self.workdir, errors.reason(e))

  def release(self) -> None:
    """Stops the heartbeat and removes the lock if it is still this run's."""
    self._stop.set()
    if self._thread is not None:
      self._thread.join(timeout=5)
    try:
      if self._mine():
        os.unlink(self.path)
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("cannot remove the lock %s: %s", self.path, errors.reason(e))
