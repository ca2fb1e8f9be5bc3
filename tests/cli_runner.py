"""Runs many sfd_jax command lines quickly (tests only): ``python -m tests.cli_runner
CASES.json RESULTS.json``.

The heavy imports (JAX, Flax, Orbax, Grain, the package) happen once; each case then runs
in a forked child process exactly as ``python main.py ...`` / ``python -m module ...``
would (``runpy`` with ``__name__ == "__main__"``), with its own stdout/stderr files and
exit status. JAX's backend is never started in this parent, so forking is safe. After each
case the parent hashes the ``protect`` paths, so a test can check that no case changed
data saved before it.

A case: ``{"name", "target": "main.py" | "pkg.module", "args": [...], "env": {...},
"fsize": bytes (optional RLIMIT_FSIZE of the child), "timeout": seconds}``.
"""
from __future__ import annotations

import hashlib
import json
import os
import pathlib
import resource
import runpy
import signal
import sys
import time

REPO = pathlib.Path(__file__).resolve().parents[1]


def tree_hash(path: str) -> str:
  """sha256 over the names and bytes of every file under ``path`` (or of one file)."""
  h = hashlib.sha256()
  p = pathlib.Path(path)
  if not p.exists():
    return "missing"
  files = [p] if p.is_file() else sorted(q for q in p.rglob("*"))
  for q in files:
    rel = str(q.relative_to(p)) if q != p else q.name
    h.update(rel.encode() + (b"/" if q.is_dir() else b""))
    if q.is_file():
      h.update(q.read_bytes())
  return h.hexdigest()


def _preload() -> None:
  # pylint: disable=import-outside-toplevel,unused-import
  import jax  # noqa: F401
  import sfd_jax.jobs.encode  # noqa: F401
  import sfd_jax.jobs.evaluate  # noqa: F401
  import sfd_jax.jobs.export  # noqa: F401
  import sfd_jax.jobs.extract  # noqa: F401
  import sfd_jax.jobs.sample  # noqa: F401
  import sfd_jax.jobs.train  # noqa: F401
  import sfd_jax.jobs.train_vae  # noqa: F401
  import sfd_jax.core.runner  # noqa: F401
  import sfd_jax.checkpoint.export  # noqa: F401
  from ml_collections import config_flags  # noqa: F401
  from absl import app  # noqa: F401
  import logging  # pylint: disable=import-outside-toplevel
  # an import-time logging call may have configured the root logger (basicConfig); a real
  # command line starts without that handler
  logging.getLogger().handlers.clear()


def _child(case: dict, out: str, err: str) -> None:
  import warnings  # pylint: disable=import-outside-toplevel
  fd_out = os.open(out, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
  fd_err = os.open(err, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
  os.dup2(fd_out, 1)
  os.dup2(fd_err, 2)
  os.environ.update(case.get("env", {}))
  if case.get("fsize"):
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(case["fsize"]), int(case["fsize"])))
  # runpy re-executes modules the parent imported already; the warning is an artifact.
  warnings.filterwarnings("ignore", category=RuntimeWarning, module="runpy")
  target = case["target"]
  code = 0
  try:
    if target.endswith(".py"):
      path = str(REPO / target)
      sys.argv = [path, *case["args"]]
      runpy.run_path(path, run_name="__main__")
    else:
      sys.argv = [target, *case["args"]]
      runpy.run_module(target, run_name="__main__", alter_sys=True)
  except SystemExit as e:
    code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
    if not isinstance(e.code, (int, type(None))):
      sys.stderr.write(f"{e.code}\n")
  except BaseException:  # pylint: disable=broad-except  (as the interpreter would)
    import traceback  # pylint: disable=import-outside-toplevel
    traceback.print_exc()
    code = 1
  try:
    sys.stdout.flush()
    sys.stderr.flush()
  finally:
    os._exit(code)  # pylint: disable=protected-access


def run(cases: list[dict], workdir: str, protect: list[str]) -> list[dict]:
  os.chdir(REPO)
  _preload()
  results = []
  for i, case in enumerate(cases):
    out, err = os.path.join(workdir, f"{i}.out"), os.path.join(workdir, f"{i}.err")
    sys.stdout.flush()
    sys.stderr.flush()
    t0 = time.time()
    pid = os.fork()
    if pid == 0:
      _child(case, out, err)
    deadline = t0 + float(case.get("timeout", 240))
    status = None
    while status is None:
      done, st = os.waitpid(pid, os.WNOHANG)
      if done:
        status = st
      elif time.time() > deadline:
        os.kill(pid, signal.SIGKILL)
        _, status = os.waitpid(pid, 0)
      else:
        time.sleep(0.02)
    rc = os.waitstatus_to_exitcode(status)
    results.append({"name": case["name"], "rc": rc, "seconds": time.time() - t0,
                    "stdout": pathlib.Path(out).read_text(errors="replace"),
                    "stderr": pathlib.Path(err).read_text(errors="replace"),
                    "hashes": {p: tree_hash(p) for p in protect}})
  return results


def main() -> None:
  spec = json.loads(pathlib.Path(sys.argv[1]).read_text())
  results = run(spec["cases"], spec["workdir"], spec.get("protect", []))
  pathlib.Path(sys.argv[2]).write_text(json.dumps(results))


if __name__ == "__main__":
  main()
