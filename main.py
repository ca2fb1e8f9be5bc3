"""sfd_jax entry point.

  python main.py --config=configs/sfd_xl.py --workdir=runs/sfd_xl [--mode=train]
  python main.py --config=configs/sfd_xl.py:recipe=80ep --config.optimizer.lr=2e-4 ...

Modes: train (default), sample, eval, export, encode (images → latent dataset),
extract (SemVAE training features), train_semvae, train_texture_vae. Launched as several
processes (TPU pod, SLURM, or JAX_COORDINATOR_ADDRESS/JAX_NUM_PROCESSES/JAX_PROCESS_ID
set), it initialises ``jax.distributed`` first; on one process it runs as is.
"""

from absl import app, flags, logging
from ml_collections import config_flags

_CONFIG = config_flags.DEFINE_config_file("config", None, "config file (path[:args])",
                                          lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "directory for checkpoints, logs, outputs")
_MODE = flags.DEFINE_enum("mode", "train", ["train", "sample", "eval", "export", "encode",
                                           "extract", "train_semvae", "train_texture_vae",
                                           "demo"],
                          "job to run")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  from sfd_jax import distributed  # pylint: disable=import-outside-toplevel
  distributed.maybe_initialize()
  import jax  # pylint: disable=import-outside-toplevel
  config, workdir, mode = _CONFIG.value, _WORKDIR.value, _MODE.value
  if config is None:
    raise app.UsageError("--config is required")
  if workdir is None:
    raise app.UsageError("--workdir is required")
  from sfd_jax.checkpoint import abspath  # pylint: disable=import-outside-toplevel
  workdir = abspath(workdir)   # gs:// workdirs stay URLs (train/export; sample/eval: local)
  logging.info("sfd_jax %s: process %d/%d, %d local / %d global devices (%s)", mode,
               jax.process_index(), jax.process_count(), jax.local_device_count(),
               jax.device_count(), jax.devices()[0].platform)
  if mode == "train":
    from sfd_jax import train  # pylint: disable=import-outside-toplevel
    train.train_and_evaluate(config, workdir)
  elif mode == "sample":
    from sfd_jax import sample  # pylint: disable=import-outside-toplevel
    sample.run(config, workdir)
  elif mode == "eval":
    from sfd_jax import evaluate  # pylint: disable=import-outside-toplevel
    evaluate.run(config, workdir)
  elif mode == "export":
    from sfd_jax import export  # pylint: disable=import-outside-toplevel
    export.run(config, workdir)
  elif mode == "encode":
    from sfd_jax import encode  # pylint: disable=import-outside-toplevel
    encode.run(config, workdir)
  elif mode == "extract":
    from sfd_jax import extract_features  # pylint: disable=import-outside-toplevel
    extract_features.run(config, workdir)
  elif mode in ("train_semvae", "train_texture_vae"):
    from sfd_jax import vae_train  # pylint: disable=import-outside-toplevel
    vae_train.train_model(config, workdir, mode[len("train_"):])
  elif mode == "demo":
    from sfd_jax.demo import pipeline  # pylint: disable=import-outside-toplevel
    pipeline.run(config, workdir)


if __name__ == "__main__":
  flags.mark_flags_as_required(["config", "workdir"])
  app.run(main)
