"""Reading a training run: its checkpoint folder, saved config, weights, whole state.

Used by sampling, evaluation, export and the trainers (which restore through
``Checkpointer``). Weights are read straight into host memory (NumPy) without a mesh
or the optimizer state, so any single machine can read a run.
"""
from __future__ import annotations

import os
from typing import Any, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx

from sfd_jax.checkpoint.manager import ITEMS, CheckpointError
from sfd_jax.core import paths, trees

WEIGHTS = ("ema", "params")


def checkpoint_dir(path: str) -> str:
  """``<workdir>/checkpoints`` for a workdir; the path itself if it holds step folders."""
  path = os.path.abspath(path)
  sub = os.path.join(path, "checkpoints")
  return sub if os.path.isdir(sub) else path


def is_run(path: str) -> bool:
  """True when ``path`` is a training workdir or checkpoints folder with a step."""
  ckdir = checkpoint_dir(path)
  return os.path.isdir(ckdir) and any(d.isdigit() for d in os.listdir(ckdir))


def _manager(directory: str) -> ocp.CheckpointManager:
  return ocp.CheckpointManager(paths.abspath(directory), item_names=ITEMS)


def _pick_step(mngr: ocp.CheckpointManager, directory: str, step: int | None) -> int:
  steps = sorted(mngr.all_steps())
  if not steps:
    raise CheckpointError(f"no checkpoint in {directory}")
  step = steps[-1] if step is None else int(step)
  if step not in steps:
    raise CheckpointError(f"{directory} has no checkpoint at step {step}; available "
                          f"steps: {steps}")
  return step


def _read_config(mngr: ocp.CheckpointManager, directory: str, step: int) -> dict:
  from etils import epath  # pylint: disable=import-outside-toplevel
  if not (epath.Path(paths.abspath(directory)) / str(step) / "config").is_dir():
    return {}
  return dict(mngr.restore(step, args=ocp.args.Composite(
      config=ocp.args.JsonRestore()))["config"] or {})


def read_config(directory: str, step: int | None = None) -> dict:
  """The ``config`` item of a training checkpoint (empty dict if it has none)."""
  mngr = _manager(directory)
  try:
    return _read_config(mngr, directory, _pick_step(mngr, directory, step))
  finally:
    mngr.close()


def restore_state_only(directory: str, abstract_state: Any, step: int | None = None):
  """Restores only the ``state`` item (into the abstract, sharded target).

  Returns ``(state, step, run config)``.
  """
  mngr = _manager(directory)
  try:
    step = _pick_step(mngr, directory, step)
    out = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state)))
    return out["state"], step, _read_config(mngr, directory, step)
  finally:
    mngr.close()


def restore_weights(directory: str, abstract_params: Mapping[str, Any], *,
                    weights: str = "ema", step: int | None = None) -> tuple[dict, int]:
  """One weight set (``state[weights]``) of a checkpoint as a nested NumPy dict.

  ``abstract_params``: the model's pure-dict parameter shapes (every path and shape is
  checked). Returns ``(params, step)``.
  """
  if weights not in WEIGHTS:
    raise CheckpointError(f"weights={weights!r}; expected one of {WEIGHTS}")
  mngr = _manager(directory)
  try:
    step = _pick_step(mngr, directory, step)
    target = {weights: abstract_params}
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
    try:
      out = mngr.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
          target, restore_args=as_numpy, partial_restore=True)))
    except (ValueError, KeyError, TypeError) as e:
      raise CheckpointError(f"{directory}/{step}: cannot read '{weights}': {e}") from e
  finally:
    mngr.close()
  params = trees.to_numpy(out["state"][weights])
  trees.check_shapes(params, abstract_params, f"{directory}/{step} '{weights}'",
                     error=CheckpointError)
  return params, step


# ------------------------------------------------------------------ the DiT


def restore_dit(path: str, *, weights: str = "ema", step: int | None = None, config=None):
  """A LightningDiT weight set of a training run.

  The architecture comes from the run's saved config (``config`` is the fallback for
  checkpoints without one). Returns ``(params, DiTConfig, step, run config)``.
  """
  import ml_collections  # pylint: disable=import-outside-toplevel
  from sfd_jax.models.lightning_dit import DiTConfig, LightningDiT  # pylint: disable=import-outside-toplevel
  ckdir = checkpoint_dir(path)
  if not os.path.isdir(ckdir):
    raise CheckpointError(f"no checkpoint directory {ckdir}")
  mngr = _manager(ckdir)
  try:
    step = _pick_step(mngr, ckdir, step)
    run_config = _read_config(mngr, ckdir, step)
  finally:
    mngr.close()
  if run_config:
    model_cfg = DiTConfig.from_config(ml_collections.ConfigDict(run_config))
  elif config is not None:
    logging.warning("%s/%d has no saved config: using the given config's model", ckdir, step)
    model_cfg = DiTConfig.from_config(config)
  else:
    raise CheckpointError(f"{ckdir}/{step} has no saved config; pass the config")
  abstract = nnx.to_pure_dict(nnx.state(
      nnx.eval_shape(lambda: LightningDiT(model_cfg, rngs=nnx.Rngs(0))), nnx.Param))
  params, step = restore_weights(ckdir, abstract, weights=weights, step=step)
  return params, model_cfg, step, run_config


def available_steps(path: str) -> list[int]:
  """The checkpointed steps of a training workdir / checkpoints folder, ascending."""
  ckdir = checkpoint_dir(path)
  if not os.path.isdir(ckdir):
    return []
  return sorted(int(d) for d in os.listdir(ckdir)
                if d.isdigit() and os.path.isdir(os.path.join(ckdir, d)))


def load_dit(path: str, field: str = "config.sample.checkpoint", *,
             step: int | None = None, weights: str = "ema"):
  """A LightningDiT from a converted/exported dir (``meta.json``) or from a training
  run's weights (only that subtree is read: ``weights`` = ema | params).

  ``step``: the training step of a run (None: the latest); e.g. an autoguidance guide at
  70K from the same guide run as the 120K one. A converted directory has no steps, so a
  step there is an error naming ``field``.
  """
  from sfd_jax.convert import lightning_dit as dit_conv  # pylint: disable=import-outside-toplevel
  from sfd_jax.convert.common import assign  # pylint: disable=import-outside-toplevel
  from sfd_jax.models.lightning_dit import LightningDiT  # pylint: disable=import-outside-toplevel
  if not path:
    raise CheckpointError(f"{field} is empty: give a converted checkpoint directory or a "
                          "training workdir")
  path = os.path.abspath(path)
  if os.path.exists(os.path.join(path, "meta.json")):
    if step is not None:
      raise CheckpointError(f"{field}={path} is a converted checkpoint (one weight set, no "
                            f"training steps): a step ({step}) can only be chosen for a "
                            "training workdir")
    return dit_conv.load_converted(path)
  if not is_run(path):
    raise CheckpointError(f"{field}={path}: neither a converted checkpoint (meta.json) nor "
                          "a training run (checkpoints/<step>/)")
  if step is not None and step not in available_steps(path):
    raise CheckpointError(f"{field}={path} has no checkpoint at step {step}; available "
                          f"steps: {available_steps(path)}")
  params, model_cfg, step, _ = restore_dit(path, weights=weights, step=step)
  model = LightningDiT(model_cfg, rngs=nnx.Rngs(0))
  assign(model, params, name=f"{checkpoint_dir(path)}/{step} {weights}")
  logging.info("loaded %s weights of %s/%d", weights, checkpoint_dir(path), step)
  return model
