"""sfd_jax entry point.

  python main.py --config=configs/sfd_xl.py --workdir=runs/sfd_xl [--mode=train]
  python main.py --config=configs/sfd_xl.py:recipe=80ep --config.optimizer.lr=2e-4 ...

Modes (one job module each, ``sfd_jax/jobs/``): train (default), sample, eval, export,
encode (images → latent dataset), extract (SemVAE training features), train_semvae,
train_texture_vae, eval_tokenizer (rFID / PSNR / SSIM / LPIPS of a texture VAE), demo.
Launched as several processes (TPU pod, SLURM, or
JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/JAX_PROCESS_ID set), it initialises
``jax.distributed`` first; on one process it runs as is.
"""
import importlib

from absl import app, flags, logging
from ml_collections import config_flags

# mode -> (job module under sfd_jax.jobs, its entry function)
JOBS = {
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

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file (path[:args])",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for checkpoints, logs, outputs")
_MODE = flags.DEFINE_enum("mode", "train", list(JOBS), "job to run")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from sfd_jax.parallel import distributed  # pylint: disable=import-outside-toplevel
  distributed.maybe_initialize()
  import jax  # pylint: disable=import-outside-toplevel
  from sfd_jax.core import paths  # pylint: disable=import-outside-toplevel
  config, workdir, mode = _CONFIG.value, _WORKDIR.value, _MODE.value
  if config is None:
    raise app.UsageError("--config is required")
  if workdir is None:
    raise app.UsageError("--workdir is required")
  workdir = paths.abspath(workdir)   # gs:// workdirs stay URLs (train/export; sample/eval: local)
  logging.info("sfd_jax %s: process %d/%d, %d local / %d global devices (%s)", mode,
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count(), jax.devices()[0].platform)
  module, fn = JOBS[mode]
  getattr(importlib.import_module(f"sfd_jax.jobs.{module}"), fn)(config, workdir)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
