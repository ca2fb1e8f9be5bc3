"""The command line: ``sfd-jax`` (console script) and ``python main.py`` are the same app.

  sfd-jax --config=configs/sfd_xl.py --workdir=runs/sfd_xl [--mode=train]
  sfd-jax --config=configs/sfd_xl.py:recipe=80ep --config.optimizer.lr=2e-4 ...

Modes (one job module each, ``sfd_jax/jobs/``): train (default), sample, eval, export,
encode (images → latent dataset), extract (SemVAE training features), train_semvae,
train_texture_vae, demo.

Before a job runs, in every mode: every config field is checked against its declaration
(``sfd_jax.core.options``, docs/options.md), then the job's own start-up checks (its
``check`` function next to ``run``; ``check_semvae`` next to ``run_semvae``), and in the
modes that write to the workdir (``LOCKED_MODES``) process 0 takes the workdir's lock
(``sfd_jax.core.workdir_lock``: a second run on the same workdir stops with one line).
A mistake is one line and exit status 2 (docs/errors.md). Launched as several
processes (TPU pod, SLURM, or JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/JAX_PROCESS_ID
set), it initialises ``jax.distributed`` first; on one process it runs as is.

``main.py`` is ``from sfd_jax.cli import run; run()``. Config files are paths
(``configs/`` in the repository); a config that imports its package (``from configs import
common``) is imported from the directory above that package, wherever ``sfd-jax`` runs.
"""
from __future__ import annotations

import contextlib
import importlib
import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from sfd_jax.core import options, paths, runner, workdir_lock
from sfd_jax.parallel import distributed, multihost

# mode -> (job module under sfd_jax.jobs, its entry function fn(config, workdir))
JOBS: dict[str, tuple[str, str]] = {
    "train": ("train", "run"),
    "sample": ("sample", "run"),
    "eval": ("evaluate", "run"),
    "export": ("export", "run"),
    "encode": ("encode", "run"),
    "extract": ("extract", "run"),
    "train_semvae": ("train_vae", "run_semvae"),
    "train_texture_vae": ("train_vae", "run_texture_vae"),
    "eval_tokenizer": ("eval_tokenizer", "run"),
    "demo": ("demo", "run"),
}

# modes that write into --workdir: one run at a time (export only reads a run)
LOCKED_MODES = ("train", "sample", "eval", "encode", "extract", "train_semvae",
                "train_texture_vae", "eval_tokenizer", "demo")

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file (path[:args])",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for checkpoints, logs, outputs")
_MODE = flags.DEFINE_enum("mode", "train", list(JOBS), "job to run")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config, workdir, mode = _CONFIG.value, _WORKDIR.value, _MODE.value
  if config is None:
    raise app.UsageError("--config is required")
  if workdir is None:
    raise app.UsageError("--workdir is required")
  options.check(config)              # every field, before anything else (docs/options.md)
  distributed.maybe_initialize()
  workdir = paths.abspath(workdir)   # gs:// workdirs stay URLs (train/export; sample/eval: local)
  logging.info("sfd_jax %s: process %d/%d, %d local / %d global devices (%s)", mode,
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count(), jax.devices()[0].platform)
  module, fn = JOBS[mode]
  job = importlib.import_module(f"sfd_jax.jobs.{module}")
  check = getattr(job, fn.replace("run", "check", 1), None)
  if check is not None:
    check(config)                    # the job's start-up checks: nothing written yet
  with _workdir_lock(workdir, mode, config):
    getattr(job, fn)(config, workdir)


@contextlib.contextmanager
def _workdir_lock(workdir: str, mode: str, config):
  """The workdir's lock for the job (``LOCKED_MODES``; taken by process 0, its outcome
  shared with the other processes, so that all of them stop when it is refused)."""
  if mode not in LOCKED_MODES:
    yield
    return
  lock, err = None, None
  if jax.process_index() == 0:
    try:
      lock = workdir_lock.WorkdirLock(
          workdir, mode=mode, command=" ".join(sys.argv),
          force=bool(config.get("force_unlock", False))).acquire()
    except Exception as e:  # pylint: disable=broad-except  (reported below, on every process)
      err = e
  if not multihost.process0_flag(err is None):
    raise err if err is not None else workdir_lock.WorkdirInUseError(
        f"{workdir}: process 0 could not take the workdir's lock (its error line says why)")
  try:
    yield
  finally:
    if lock is not None:
      lock.release()


def _config_import_root(argv: list[str]) -> str | None:
  """The directory to import a config file's package from (``configs/x.py`` does
  ``from configs import common``): above the config's directory and every parent that is
  a package. ``python main.py`` has it on ``sys.path`` already (main.py's directory); the
  console script does not."""
  path = None
  for i, arg in enumerate(argv[1:], 1):
    if arg.startswith("--config="):
      path = arg[len("--config="):]
    elif arg == "--config" and i + 1 < len(argv):
      path = argv[i + 1]
  if not path:
    return None
  path = path.split(":", 1)[0]
  if not os.path.isfile(os.path.join(os.path.dirname(os.path.abspath(path)), "__init__.py")):
    return None
  return paths.package_root(path)


def run(argv: list[str] | None = None) -> None:
  """Entry point of ``sfd-jax`` and ``main.py``."""
  argv = sys.argv if argv is None else argv
  root = _config_import_root(argv)
  if root and root not in sys.path:
    sys.path.insert(0, root)
  flags.mark_flags_as_required(["config", "workdir"])
  runner.run_main(main, argv=argv)   # user errors: one line, exit 2 (docs/errors.md)


if __name__ == "__main__":
  run()
