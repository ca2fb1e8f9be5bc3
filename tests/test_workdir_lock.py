"""The workdir lock (sfd_jax/core/workdir_lock.py): who owns a workdir, when a lock is
stale, taking over, releasing, the heartbeat. Two real ``main.py`` trainings on one
workdir and the takeover after ``kill -9`` are in tests/test_user_errors.py."""
import json
import os
import socket
import subprocess
import sys
import time

import pytest

from sfd_jax.core import workdir_lock as wl


def _write(workdir, **fields):
  record = wl.owner_record("train", "main.py ...")
  record.update(fields)
  os.makedirs(workdir, exist_ok=True)
  with open(wl.lock_path(workdir), "w", encoding="utf-8") as f:
    json.dump(record, f)
  return record


def _files(d):
  return sorted(os.listdir(d))


def test_acquire_and_release(tmp_path):
  wd = str(tmp_path / "run")
  lock = wl.WorkdirLock(wd, mode="train", command="main.py").acquire()
  owner = wl.read_owner(wl.lock_path(wd))
  assert owner["pid"] == os.getpid() and owner["host"] == socket.gethostname()
  assert owner["token"] == lock.record["token"] and owner["mode"] == "train"
  lock.release()
  assert _files(wd) == []


def test_a_live_owner_refuses_and_nothing_changes(tmp_path):
  """Our own pid on this host is alive: a second lock is refused, naming host, pid and
  start time, and leaves the lock file as it was."""
  wd = str(tmp_path / "run")
  first = wl.WorkdirLock(wd, mode="train").acquire()
  before = open(wl.lock_path(wd), "rb").read()
  with pytest.raises(wl.WorkdirInUseError) as e:
    wl.WorkdirLock(wd, mode="sample").acquire()
  msg = str(e.value)
  for text in (wd, f"process {os.getpid()}", f"host {socket.gethostname()}", "--mode=train",
               first.record["started"], "--config.force_unlock=True", "nothing was changed"):
    assert text in msg, msg
  assert "\n" not in msg
  assert open(wl.lock_path(wd), "rb").read() == before
  assert _files(wd) == [wl.LOCK_NAME]
  first.release()


def test_a_dead_pid_on_this_host_is_stale(tmp_path):
  wd = str(tmp_path / "run")
  child = subprocess.Popen([sys.executable, "-c", "pass"])
  child.wait()
  _write(wd, pid=child.pid, proc_start="1")
  lock = wl.WorkdirLock(wd).acquire()
  assert lock.took_over["pid"] == child.pid
  assert wl.read_owner(wl.lock_path(wd))["token"] == lock.record["token"]
  lock.release()
  assert _files(wd) == []


def test_a_reused_pid_or_another_boot_is_stale(tmp_path):
  wd = str(tmp_path / "run")
  _write(wd, proc_start="1")                  # our pid, but started at another time
  assert "another process" in wl.stale_reason(wl.read_owner(wl.lock_path(wd)))
  _write(wd, boot_id="another-boot")
  assert "restarted" in wl.stale_reason(wl.read_owner(wl.lock_path(wd)))
  wl.WorkdirLock(wd).acquire().release()


def test_another_host_is_judged_by_its_heartbeat(tmp_path):
  wd = str(tmp_path / "run")
  now = time.time()
  _write(wd, host="elsewhere", pid=1, heartbeat_unix=now - 30)
  with pytest.raises(wl.WorkdirInUseError, match="host elsewhere.*last heartbeat 30 s ago"):
    wl.WorkdirLock(wd).acquire()
  _write(wd, host="elsewhere", pid=1, heartbeat_unix=now - wl.STALE_AFTER_S - 5)
  lock = wl.WorkdirLock(wd).acquire()
  assert lock.took_over["host"] == "elsewhere"
  lock.release()


def test_force_takes_over_a_live_lock(tmp_path):
  wd = str(tmp_path / "run")
  _write(wd, host="elsewhere", pid=1)
  lock = wl.WorkdirLock(wd, force=True).acquire()
  assert lock.took_over["host"] == "elsewhere"
  lock.release()


def test_an_unreadable_lock_is_stale(tmp_path):
  wd = tmp_path / "run"
  wd.mkdir()
  (wd / wl.LOCK_NAME).write_text("{not json")
  wl.WorkdirLock(str(wd)).acquire().release()
  assert _files(wd) == []


def test_a_lock_taken_over_is_not_removed_by_its_old_owner(tmp_path, monkeypatch):
  """After a takeover the old owner's release and heartbeat leave the new lock alone."""
  monkeypatch.setattr(wl, "HEARTBEAT_S", 0.05)
  wd = str(tmp_path / "run")
  old = wl.WorkdirLock(wd).acquire()
  new = wl.WorkdirLock(wd, force=True).acquire()
  time.sleep(0.3)                               # the old heartbeat sees it lost the lock
  old.release()
  assert wl.read_owner(wl.lock_path(wd))["token"] == new.record["token"]
  new.release()
  assert _files(wd) == []


def test_the_heartbeat_refreshes(tmp_path, monkeypatch):
  monkeypatch.setattr(wl, "HEARTBEAT_S", 0.05)
  wd = str(tmp_path / "run")
  lock = wl.WorkdirLock(wd).acquire()
  first = wl.read_owner(wl.lock_path(wd))["heartbeat_unix"]
  time.sleep(0.3)
  assert wl.read_owner(wl.lock_path(wd))["heartbeat_unix"] > first
  lock.release()


def test_a_concurrent_takeover_is_refused(tmp_path):
  """While another launch is taking over a stale lock (its marker is fresh), this one
  stops instead of racing it."""
  wd = str(tmp_path / "run")
  _write(wd, host="elsewhere", pid=1, heartbeat_unix=0)
  open(wl.lock_path(wd) + ".takeover", "w").close()
  with pytest.raises(wl.WorkdirInUseError, match="another run is taking over"):
    wl.WorkdirLock(wd).acquire()
  os.utime(wl.lock_path(wd) + ".takeover", (0, 0))     # a marker left by a killed launch
  wl.WorkdirLock(wd).acquire().release()
  assert _files(wd) == []


def test_a_workdir_under_a_file_is_one_line(tmp_path):
  afile = tmp_path / "afile"
  afile.write_text("x")
  with pytest.raises(Exception, match="a part of the path is a file"):
    wl.WorkdirLock(str(afile / "run")).acquire()
