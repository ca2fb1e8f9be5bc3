"""``--mode=train_semvae`` / ``--mode=train_texture_vae``: the two autoencoders.

  python main.py --mode=train_semvae --config=configs/semvae_ch16.py --workdir=runs/semvae
  python main.py --mode=train_texture_vae --config=configs/texture_vae_f16d32.py --workdir=runs/tvae

On the training core (``sfd_jax.training.vae``); export a run as a converted-weights
folder with ``python -m sfd_jax.checkpoint.export --run=WORKDIR --kind=... --dst=...``.
"""
from __future__ import annotations

from typing import Any

import ml_collections

from sfd_jax.training import vae


def check_semvae(config: ml_collections.ConfigDict) -> None:
  vae.validate_config(config, "semvae")


def check_texture_vae(config: ml_collections.ConfigDict) -> None:
  vae.validate_config(config, "texture_vae")


def run_semvae(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  return vae.train_model(config, workdir, "semvae")


def run_texture_vae(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  return vae.train_model(config, workdir, "texture_vae")
