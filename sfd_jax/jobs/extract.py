"""``--mode=extract``: DINOv2 patch features for training the Semantic VAE (docs/method.md §3.3), or
the VA-VAE's VF-loss targets (``config.extract.recipe = "vf"``).

  python main.py --mode=extract --config=configs/encode_imagenet.py --workdir=/data/in1k_dino

The preprocessing of each recipe, the record format and the sharded, resumable runner:
``sfd_jax.data.encode.extract_features``. The network is ``config.extract.dinov2`` (a
converted folder), or with ``config.extract.random_init`` a random ``dinov2_preset``.
"""
from __future__ import annotations

from typing import Any

import ml_collections

from sfd_jax.convert.networks import load_network
from sfd_jax.data import encode
from sfd_jax.data import images as images_lib


def check(config: ml_collections.ConfigDict) -> None:
  images_lib.validate_job_config(config, "extract")


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Extracts the features of ``config.data`` into the feature dataset ``workdir``;
  returns ``{"complete", "num_records", "skipped"}`` (the totals only on process 0 once
  every shard is finished)."""
  images_lib.validate_job_config(config, "extract")
  e = config.extract
  dino = load_network("dinov2", e.dinov2, random_init=e.random_init,
                      preset=e.dinov2_preset, dtype=e.dtype, seed=config.seed,
                      field="config.extract.dinov2")
  return encode.extract_features(config, workdir, dino)
