"""The command line: ``sfd-jax`` (console script), ``python -m sfd_jax`` and ``python
main.py`` are the same app.

  sfd-jax --config=configs/sfd_xl.py --workdir=runs/sfd_xl [--mode=train]
  sfd-jax --config=configs/sfd_xl.py:recipe=80ep --config.optimizer.lr=2e-4 ...
  sfd-jax --config=configs/sfd_xl.py --mode=config     # the resolved config, then exit
  sfd-jax --help                                       # flags and modes

Modes (``MODES``; one job module each, ``sfd_jax/jobs/``, in the table ``JOBS``): train
(default), sample, eval, export, encode, extract, train_semvae, train_texture_vae,
eval_tokenizer, demo, plan (compile for a TPU topology without TPUs: HBM per chip, what
fits; docs/scale.md); ``config`` prints the resolved config and runs nothing. Every run
writes the resolved config to ``<workdir>/config.json`` (atomically) and logs it; a run
that stops at a user error before it changed anything puts back what was there.

Before a job runs, in every mode: every config field is checked against its declaration
(``sfd_jax.core.options``, docs/options.md), then the job's own start-up checks (its
``check`` function next to ``run``; ``check_semvae`` next to ``run_semvae``), and in the
modes that write to the workdir (``LOCKED_MODES``) process 0 takes the workdir's lock
(``sfd_jax.core.workdir_lock``: a second run on the same workdir stops with one line)
before ``config.json`` is written. A mistake is one line and exit status 2
(docs/errors.md). Launched as several processes (TPU pod, SLURM, or
JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/JAX_PROCESS_ID
set), it initialises ``jax.distributed`` first; on one process it runs as is.

``main.py`` is ``from sfd_jax.cli import run; run()``. Config files are paths
(``configs/`` in the repository); a config that imports its package (``from configs import
common``) is imported from the directory above that package, wherever ``sfd-jax`` runs.
"""
from __future__ import annotations

import contextlib
import importlib
import json
import os
import sys
from typing import Callable

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from sfd_jax.core import errors, options, paths, runner, trees, workdir_lock
from sfd_jax.core.errors import ConfigError
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
    "plan": ("plan", "run"),
}
# mode -> what it does, for --help (every mode of JOBS has a line; tests check it).
MODES: dict[str, str] = {
    "train": "train the SFD denoiser (LightningDiT) on a latent dataset",
    "sample": "sample images from a checkpoint: numbered PNGs and samples_N.npz",
    "eval": "sample (or read samples_N.npz) and score FID, sFID, IS, precision/recall",
    "export": "a training checkpoint -> standalone weights (+ the reference's layout)",
    "encode": "images -> the composite-latent dataset the trainer reads",
    "extract": "images -> DINOv2 features for training the Semantic VAE",
    "train_semvae": "train the Semantic VAE on extracted features",
    "train_texture_vae": "train the texture VAE (the LDM or VA-VAE recipe)",
    "eval_tokenizer": "rFID, PSNR, SSIM, LPIPS of a texture VAE on held-out images",
    "demo": "the whole pipeline on scikit-learn's digits, on a CPU, in minutes",
    "plan": "compile the config's programs for a TPU topology (no TPU needed): HBM, fit",
    "config": "print the resolved config (one 'field = value' line each) and exit",
}
CONFIG_FILE = "config.json"   # the resolved config, in every workdir

# modes that write into --workdir: one run at a time (export only reads a run)
LOCKED_MODES = ("train", "sample", "eval", "encode", "extract", "train_semvae",
                "train_texture_vae", "eval_tokenizer", "demo", "plan")

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file (path[:args])",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for checkpoints, logs, outputs")
_MODE = flags.DEFINE_enum("mode", "train", [*JOBS, "config"], "job to run")
_HELP_FLAGS = ("-h", "-?", "--help", "--helpshort")


def usage(prog: str) -> str:
  """The ``--help`` text: the three flags, the modes, examples."""
  if prog.endswith(".py"):
    prog = f"python {prog}"
  width = max(map(len, MODES))
  modes = "\n".join(f"      {m:<{width}}  {MODES.get(m, '')}".rstrip()
                    for m in [*JOBS, "config"])
  return f"""\
usage: {prog} --config=FILE[:ARGS] --workdir=DIR [--mode=MODE] [--config.FIELD=VALUE ...]

Semantic-First Diffusion (SFD) in JAX: every run reads a config file and writes into a
workdir (checkpoints, logs, outputs, and config.json: the resolved config); rerunning the
same command resumes.

flags:
  --config=FILE[:ARGS]  config file, e.g. configs/sfd_xl.py, configs/sfd_xl.py:recipe=80ep,
                        configs/demo.py (required)
  --config.FIELD=VALUE  override one field, e.g. --config.optimizer.lr=2e-4;
                        --mode=config lists every field with its value
  --workdir=DIR         the run's directory, a local path or a mounted bucket (required,
                        except for --mode=config)
  --mode=MODE           what to run (default: train):
{modes}
  --verbosity=1         print the traceback with a one-line error
  --helpfull            every flag, also those of absl and JAX

examples:
  {prog} --config=configs/demo.py --mode=demo --workdir=runs/demo
  {prog} --config=configs/sfd_xl.py --workdir=runs/sfd_xl --config.data.path=data/in256
  {prog} --config=configs/sfd_xl.py --mode=config --config.objective.delta_t=0.5

docs: README.md and docs/ in the repository (docs/errors.md: what an error line means)
"""


def config_lines(config) -> list[str]:
  """``field = value`` for every leaf of ``config`` (sorted, values as Python literals):
  what ``--mode=config`` prints and the log shows; ``--config.<field>=<value>`` sets one."""
  flat = trees.flatten(config.to_dict() if hasattr(config, "to_dict") else config, ".")
  return [f"{k} = {v!r}" for k, v in flat.items()]


def config_json(config) -> str:
  """The resolved config as JSON (tuples as lists; other non-JSON values as strings)."""
  tree = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  return json.dumps(tree, indent=2, sort_keys=True, default=str) + "\n"


def _first_missing(directory: str) -> str | None:
  """The topmost directory of ``directory``'s path that does not exist yet (None: all do)."""
  missing = None
  while directory and not os.path.exists(directory):
    missing, directory = directory, os.path.dirname(directory)
  return missing


def _atomic_write(path: str, data: bytes) -> None:
  """Writes ``path`` through a temporary file in its directory and a rename: the file is
  either the old one or the whole new one, never half written; no temporary file is left."""
  tmp = f"{path}.tmp-{os.getpid()}"
  try:
    with open(tmp, "wb") as f:
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    try:
      os.remove(tmp)
    except OSError:
      pass
    raise


def _listing(directory: str) -> dict[str, int]:
  """``{name: mtime_ns}`` of the entries of ``directory`` other than the config file and
  the workdir's lock (a directory's mtime changes when an entry is added to or removed
  from it)."""
  try:
    with os.scandir(directory) as it:
      return {e.name: e.stat(follow_symlinks=False).st_mtime_ns for e in it
              if e.name not in (CONFIG_FILE, workdir_lock.LOCK_NAME)}
  except OSError:
    return {}


def write_config(config, workdir: str, mode: str,
                 created: str | None = None) -> Callable[[], None]:
  """Logs the resolved config and writes it to ``<workdir>/config.json`` (atomically,
  process 0 only). Returns ``undo()``, which puts back what was there before (the earlier
  ``config.json``, or none and no workdir) when the run has changed nothing else in the
  workdir: a run that stops at a user error before doing anything leaves the workdir as it
  found it, and one that stops later keeps the config its outputs were made with. A workdir
  that cannot be written is left to the job to report. ``created``: the outermost
  directory of ``workdir`` that did not exist before the run (when something, e.g. the
  workdir's lock, made it before this call)."""
  path = os.path.join(workdir, CONFIG_FILE)
  logging.info("sfd_jax %s: resolved config (written to %s):\n  %s", mode, path,
               "\n  ".join(config_lines(config)))
  if jax.process_index() != 0:
    return lambda: None
  created = created if created is not None else _first_missing(workdir)
  try:
    old = None
    if os.path.isfile(path):
      with open(path, "rb") as f:
        old = f.read()
    before = _listing(workdir)
    os.makedirs(workdir, exist_ok=True)
    _atomic_write(path, config_json(config).encode("utf-8"))
  except OSError as e:
    logging.warning("sfd_jax %s: cannot write %s (%s)", mode, path, errors.reason(e))
    return lambda: None

  def undo() -> None:
    if _listing(workdir) != before:           # the run made or changed something: keep it
      return
    try:
      if old is None:
        os.remove(path)
      else:
        _atomic_write(path, old)
      if created is not None:                 # the directories this run created, if empty
        d = workdir
        while True:
          os.rmdir(d)
          if d == created:
            break
          d = os.path.dirname(d)
    except OSError:
      pass
  return undo


def check_workdir(workdir: str) -> None:
  """Refuses a URL workdir (``gs://...``) with one line: the jobs read and write their
  workdir with local file operations; a bucket is used through a mount."""
  if "://" in workdir:
    raise ConfigError(
        f"--workdir={workdir}: a URL is not accepted as a workdir; mount the bucket (e.g. "
        "gcsfuse to /mnt/gcs on every host) and give the mounted path, e.g. "
        "--workdir=/mnt/gcs/runs/NAME")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  config, workdir, mode = _CONFIG.value, _WORKDIR.value, _MODE.value
  if config is None:
    raise ConfigError("--config is required: the path of a config file, e.g. "
                      "--config=configs/sfd_xl.py (see --help)")
  if mode == "config":
    sys.stdout.write("\n".join(config_lines(config)) + "\n")
    return
  if workdir is None:
    raise ConfigError("--workdir is required: the run's directory, e.g. --workdir=runs/NAME "
                      "(see --help)")
  options.check(config)              # every field, before anything else (docs/options.md)
  check_workdir(workdir)
  distributed.maybe_initialize()
  workdir = paths.abspath(workdir)
  logging.info("sfd_jax %s: process %d/%d, %d local / %d global devices (%s)", mode,
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count(), jax.devices()[0].platform)
  module, fn = JOBS[mode]
  job = importlib.import_module(f"sfd_jax.jobs.{module}")
  check = getattr(job, fn.replace("run", "check", 1), None)
  if check is not None:
    check(config)                    # the job's start-up checks: nothing written yet
  created, undo = _first_missing(workdir), lambda: None
  try:
    with _workdir_lock(workdir, mode, config):
      undo = write_config(config, workdir, mode, created)
      getattr(job, fn)(config, workdir)
  except BaseException as e:
    if errors.user_error(e) is not None:      # stopped at a user error: nothing changed
      undo()                                  # (after the lock is gone)
    raise


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
  args = argv[1:argv.index("--")] if "--" in argv else argv[1:]
  if any(a in _HELP_FLAGS for a in args):
    sys.stdout.write(usage(runner.program_name(argv[0] if argv else None)))
    sys.exit(0)
  root = _config_import_root(argv)
  if root and root not in sys.path:
    sys.path.insert(0, root)
  runner.run_main(main, argv=argv)   # user errors: one line, exit 2 (docs/errors.md)


if __name__ == "__main__":
  run()
