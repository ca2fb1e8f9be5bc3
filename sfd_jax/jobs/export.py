"""``--mode=export``: a LightningDiT training checkpoint → standalone weights for elsewhere.

  python main.py --config=configs/sfd_xl.py --workdir=runs/sfd_xl --mode=export \\
      [--config.export.step=400000] [--config.export.weights=params] \\
      [--config.export.dtype=bfloat16] [--config.export.formats=orbax,safetensors,npz] \\
      [--config.export.dst=exports/sfd_xl]

Writes into ``dst`` (default ``<workdir>/export/<step>-<weights>-<dtype>``) what
``sfd_jax.checkpoint.export`` describes; an autoencoder or feature-net run is exported
with ``python -m sfd_jax.checkpoint.export --run=WORKDIR --kind=... --dst=DIR``.
"""
from __future__ import annotations

import jax

from sfd_jax.checkpoint import export


def run(config, workdir: str) -> dict:
  """Exports ``config.export.step`` (default latest) of ``workdir``."""
  if jax.process_count() > 1:
    raise export.ExportError(
        "--mode=export runs as a single process, but this one is part of a "
        f"{jax.process_count()}-process launch. Run it on one machine without the "
        "multi-process environment (e.g. `env -u SLURM_NTASKS -u TPU_WORKER_HOSTNAMES "
        "JAX_PLATFORMS=cpu python main.py ... --mode=export`); it needs no accelerator.")
  return export.export_run(config, workdir)
