"""``--mode=export``: a training checkpoint → standalone weights for elsewhere.

  python main.py --config=configs/sfd_xl.py --workdir=runs/sfd_xl --mode=export \\
      [--config.export.step=400000] [--config.export.weights=params] \\
      [--config.export.dtype=bfloat16] [--config.export.formats=orbax,safetensors,npz] \\
      [--config.export.dst=exports/sfd_xl]

Writes into ``dst`` (default ``<workdir>/export/<step>-<weights>-<dtype>``) what
``sfd_jax.convert.export`` describes. The weights are read straight into host memory
(NumPy), without a device mesh or the optimizer state, so an export runs on any single
machine (a CPU is enough).
"""
from __future__ import annotations

import dataclasses
import os

import jax
from absl import logging

from sfd_jax import checkpoint
from sfd_jax.convert.export import ExportError, ExportOptions, export_params
from sfd_jax.models.lightning_dit import DiTConfig


def run(config, workdir: str) -> dict:
  """``--mode=export``: exports ``config.export.step`` (default latest) of ``workdir``.

  The architecture comes from the checkpoint's saved config (what was trained); a
  different model section in the given config is reported, not used.
  """
  if jax.process_count() > 1:
    raise ExportError(
        "--mode=export runs as a single process, but this one is part of a "
        f"{jax.process_count()}-process launch. Run it on one machine without the "
        "multi-process environment (e.g. `env -u SLURM_NTASKS -u TPU_WORKER_HOSTNAMES "
        "JAX_PLATFORMS=cpu python main.py ... --mode=export`); it needs no accelerator.")
  opts = ExportOptions.from_config(config)
  ckpt_dir = checkpoint.checkpoint_dir(workdir)
  params, model_cfg, step, run_cfg = checkpoint.restore_dit(ckpt_dir, weights=opts.weights,
                                                            step=opts.step, config=config)
  try:
    given = DiTConfig.from_config(config)
  except (ValueError, TypeError, AttributeError):
    given = None
  if given is not None and given != model_cfg:
    diff = {f.name: (getattr(given, f.name), getattr(model_cfg, f.name))
            for f in dataclasses.fields(model_cfg)
            if getattr(given, f.name) != getattr(model_cfg, f.name)}
    logging.warning("the given config's model differs from the checkpoint's (given, "
                    "checkpoint): %s; exporting what the checkpoint holds", diff)
  dst = opts.dst or os.path.join(os.path.abspath(workdir), "export",
                                 f"{step}-{opts.weights}-{opts.dtype}")
  info = {"source": f"{ckpt_dir}/{step}", "step": step, "weights": opts.weights,
          "run_config": run_cfg or None}
  manifest = export_params(params, model_cfg, dst, formats=opts.formats, dtype=opts.dtype,
                           overwrite=opts.overwrite, info=info)
  logging.info("exported %s weights of %s/%d (%s) to %s: %s", opts.weights, ckpt_dir, step,
               opts.dtype, dst, ", ".join(manifest["files"]))
  return {"dst": dst, **manifest}
