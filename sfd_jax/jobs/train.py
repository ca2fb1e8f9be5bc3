"""``--mode=train``: ``python main.py --config=configs/sfd_xl.py --workdir=DIR``.

SFD training on the training core (``sfd_jax.training.sfd``): resumes from the workdir,
else ``config.init_from``, else a fresh init; logs to TensorBoard; checkpoints
(state, data position, config) every ``config.checkpoint_every_steps`` and on preemption.
"""
from __future__ import annotations

from typing import Any

import ml_collections

from sfd_jax.training import sfd


def check(config: ml_collections.ConfigDict) -> None:
  """The start-up checks (fields, model, batch over the mesh, the dataset)."""
  sfd.check_config(config)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  return sfd.train_and_evaluate(config, workdir)
