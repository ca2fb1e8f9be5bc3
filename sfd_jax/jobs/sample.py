"""``--mode=sample``: ``python main.py --config=... --mode=sample --workdir=DIR``.

Fields of ``config.sample``: ``checkpoint`` (a converted/exported directory with
``meta.json``, or a training workdir / checkpoints dir: its EMA weights are used),
``guide_checkpoint`` (autoguidance guide, same two kinds), ``guidance`` (none | cfg |
autoguidance), ``scale``, ``method`` (euler | heun | dopri5 | sde), ``num_steps``, ``atol``,
``rtol``, ``timestep_shift``, ``num_images``, ``batch_size`` (global), ``seed``,
``texture_vae`` (converted texture VAE directory; empty: write latents instead of
images), ``stats`` (latent stats file; default ``config.data.stats`` or
``<config.data.path>/stats.npz``), and the options of ``docs/options.md``: per-part
scales ``cfg_scale_tex`` / ``cfg_scale_sem``, the guidance interval
(``cfg_interval_start`` / ``cfg_interval_end`` / ``cfg_interval_mode``), ``labels``
(balanced | random | fixed | unconditional, ``label_class``, ``label_seed``), the SDE's
``diffusion_form`` / ``diffusion_norm`` / ``last_step`` / ``last_step_size`` /
``sde_t_min``, dopri5's ``jump_ts`` / ``max_steps``, and ``checkpoint_step`` /
``guide_step`` (a step of a training workdir).

Outputs in ``<workdir>/samples`` (``sfd_jax.sampling.sample_to_directory``:
deterministic per global index, resumable, identical for any device count) and
``<workdir>/sample_info.json``.
"""
from __future__ import annotations

from typing import Any

import ml_collections

from sfd_jax import sampling


def check(config: ml_collections.ConfigDict) -> None:
  """The start-up checks (fields, sampling options, batch over the devices)."""
  sampling.check_config(config)


def run(config: ml_collections.ConfigDict, workdir: str, devices=None) -> dict[str, Any]:
  """Runs (or resumes) the sampling job; ``devices`` defaults to all devices."""
  return sampling.sample_from_config(config, workdir, devices)
