"""``python -m sfd_jax``: the same app as ``sfd-jax`` and ``python main.py``."""
from sfd_jax.cli import run

if __name__ == "__main__":
  run()
