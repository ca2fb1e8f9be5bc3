"""``--mode=encode``: images → the stored latent dataset the SFD trainer reads.

  python main.py --mode=encode --config=configs/encode_imagenet.py --workdir=/data/in1k_sfd

What each record holds, how noise is drawn and how the job shards and resumes:
``sfd_jax.data.encode``. Networks come from converted folders (``config.encode.texture_vae``,
``.dinov2``, ``.semvae``; see docs/encode.md) or, with ``config.encode.random_init``, are
random instances of the ``*_preset`` architectures (the SemVAE input width then follows
the DINOv2 width).
"""
from __future__ import annotations

from typing import Any

import ml_collections
from flax import nnx

from sfd_jax.convert.networks import load_network
from sfd_jax.data import encode
from sfd_jax.data import images as images_lib

KINDS = ("texture_vae", "dinov2", "semvae")


def build_networks(config: ml_collections.ConfigDict) -> tuple[nnx.Module, nnx.Module,
                                                                nnx.Module]:
  """(texture VAE, DINOv2, SemVAE) as named by ``config.encode``."""
  e = config.encode
  kw = dict(random_init=bool(e.random_init), dtype=e.dtype)
  dino = load_network("dinov2", e.dinov2, preset=e.dinov2_preset, seed=config.seed,
                      field="config.encode.dinov2", **kw)
  tvae = load_network("texture_vae", e.texture_vae, preset=e.texture_vae_preset,
                      seed=config.seed + 1, field="config.encode.texture_vae", **kw)
  semvae = load_network("semvae", e.semvae, preset=e.semvae_preset, seed=config.seed + 2,
                        overrides={"input_dim": dino.config.embed_dim},
                        field="config.encode.semvae", **kw)
  return tvae, dino, semvae


def check(config: ml_collections.ConfigDict) -> None:
  images_lib.validate_job_config(config, "encode")


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Encodes ``config.data`` into the latent dataset ``workdir``; returns ``{"complete",
  "num_records", "skipped", "stats"}`` (totals and stats only on process 0 once every
  shard is finished)."""
  images_lib.validate_job_config(config, "encode")
  e = config.encode
  names = ({k: e[k] for k in KINDS} if not e.random_init else
           {k: f"random_init:{e[k + '_preset']}" for k in KINDS})
  return encode.encode_images(config, workdir, build_networks(config), names)
