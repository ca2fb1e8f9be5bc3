"""sfd_jax entry point: ``python main.py`` is the ``sfd-jax`` console script and
``python -m sfd_jax``; ``python main.py --help`` lists the flags and modes.

  python main.py --config=configs/sfd_xl.py --workdir=runs/sfd_xl [--mode=train]
  python main.py --config=configs/sfd_xl.py:recipe=80ep --config.optimizer.lr=2e-4 ...
  python main.py --config=configs/sfd_xl.py --mode=config    # the resolved config
"""
from sfd_jax.cli import JOBS, main, run  # noqa: F401  (main: tests call it directly)

if __name__ == "__main__":
  run()
