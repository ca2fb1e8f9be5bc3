"""sfd_jax entry point: ``python main.py`` is the ``sfd-jax`` console script.

  python main.py --config=configs/sfd_xl.py --workdir=runs/sfd_xl [--mode=train]
  python main.py --config=configs/sfd_xl.py:recipe=80ep --config.optimizer.lr=2e-4 ...

Modes (``sfd_jax.cli.JOBS``, one module each in ``sfd_jax/jobs/``): train (default),
sample, eval, export, encode, extract, train_semvae, train_texture_vae, demo.
"""
from sfd_jax.cli import JOBS, main, run  # noqa: F401  (main: tests call it directly)

if __name__ == "__main__":
  run()
