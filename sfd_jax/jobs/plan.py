"""``--mode=plan``: ``python main.py --config=configs/sfd_xl.py --mode=plan --workdir=DIR
--config.plan.topology=v5p:4x4x4``.

Compiles, for the TPU topology of ``config.plan`` and without TPUs, data or weights, the
programs the config would run (SFD configs: the DiT train step and the sampling
program; VAE configs: the VAE / GAN step; encode configs: the encode program), then
writes ``plan.json`` / ``plan.md`` in the workdir and prints the table: HBM per chip
against the chip's, matmul FLOPs against the analytic count, collectives, compile time,
and per remat policy the largest global batch that fits (``sfd_jax.planning.plan``;
docs/scale.md). Needs the TPU compiler: ``pip install "libtpu==0.0.42.*"`` (the libtpu
jax 0.10.2 pins; ``bash .ci/run tpu-compiler`` installs the one the installed jax pins).

Fields of ``config.plan`` (all optional): ``topology`` (e.g. v5p:2x2x2, v5e:4x4,
v6e:2x4, v4:2x2x2), ``num_slices``, ``programs`` (auto | train,sample | vae_train |
encode), ``batch_sizes`` / ``remat_policies`` (comma-separated; default the config's),
``search_max_batch``, ``search_compiles``, ``search_limit``, ``search_tolerance``,
``hbm_gib`` (0: the chip's), ``guide_variant`` (autoguidance guide size),
``decoder_preset``, ``feature_tokens`` (SemVAE input tokens), ``attention_baseline``.
"""
from __future__ import annotations

from typing import Any

import ml_collections

from sfd_jax.core import errors
from sfd_jax.planning import plan


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  errors.check_writable(workdir, "the plan's workdir")
  return plan.make_plan(config, workdir)
