"""``--mode=sample``: ``python main.py --config=... --mode=sample --workdir=DIR``.

Fields of ``config.sample``: ``checkpoint`` (a converted/exported directory with
``meta.json``, or a training workdir / checkpoints dir: its EMA weights are used),
``guide_checkpoint`` (autoguidance guide, same two kinds), ``guidance`` (none | cfg |
autoguidance), ``scale``, ``method`` (euler | heun | dopri5 | sde), ``num_steps``, ``atol``,
``rtol``, ``timestep_shift``, ``num_images``, ``batch_size`` (global), ``seed``,
``texture_vae`` (converted texture VAE directory; empty: write latents instead of
images), ``stats`` (latent stats file; default ``config.data.stats`` or
``<config.data.path>/stats.npz``).

Outputs in ``<workdir>/samples`` (``sfd_jax.diffusion.generation.sample_to_directory``:
deterministic per global index, resumable, identical for any device count) and
``<workdir>/sample_info.json``.
"""
from __future__ import annotations

from typing import Any

import ml_collections

from sfd_jax.diffusion import generation
from sfd_jax.diffusion.generation import SamplingError  # noqa: F401  (re-exported)


def run(config: ml_collections.ConfigDict, workdir: str, devices=None) -> dict[str, Any]:
  """Runs (or resumes) the sampling job; ``devices`` defaults to all devices."""
  return generation.sample_from_config(config, workdir, devices)
