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
from sfd_jax.core import errors, paths, trees

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
  directory = paths.abspath(directory)
  if "://" not in directory and not os.path.isdir(directory):
    raise CheckpointError(f"no checkpoint directory {directory} (expected a training workdir "
                          "or its checkpoints/ folder)")
  return ocp.CheckpointManager(directory, item_names=ITEMS,
                               options=ocp.CheckpointManagerOptions(create=False))


def _pick_step(mngr: ocp.CheckpointManager, directory: str, step: int | None) -> int:
  steps = sorted(mngr.all_steps())
  if not steps:
    raise CheckpointError(f"no checkpoint in {directory}: point it at a training run "
                          "(a workdir with checkpoints/<step>/) or train one first")
  step = steps[-1] if step is None else int(step)
  if step not in steps:
    raise CheckpointError(f"{directory} has no checkpoint at step {step}; available "
                          f"steps: {steps}")
  return step


def _restore(mngr: ocp.CheckpointManager, directory: str, step: int, what: str, args):
  """``mngr.restore`` with every failure naming the checkpoint and what was read."""
  try:
    return mngr.restore(step, args=args)
  except Exception as e:  # pylint: disable=broad-except  (orbax / tensorstore / json)
    err = errors.as_resource_error(e, where=f"{directory}/{step}")
    if err is not None:
      raise err from e
    raise CheckpointError(f"checkpoint {directory}/{step}: cannot read {what} "
                          f"({errors.reason(e)}); use another step (available: "
                          f"{sorted(mngr.all_steps())}) or another run") from e


def _read_config(mngr: ocp.CheckpointManager, directory: str, step: int) -> dict:
  from etils import epath  # pylint: disable=import-outside-toplevel
  if not (epath.Path(paths.abspath(directory)) / str(step) / "config").is_dir():
    return {}
  out = _restore(mngr, directory, step, "its saved config",
                 ocp.args.Composite(config=ocp.args.JsonRestore()))
  return dict(out["config"] or {})


def _step_and_config(directory: str, step: int | None) -> tuple[int, dict]:
  """(the chosen step, its saved config — empty when it has none)."""
  mngr = _manager(directory)
  try:
    step = _pick_step(mngr, directory, step)
    return step, _read_config(mngr, directory, step)
  finally:
    mngr.close()


def read_config(directory: str, step: int | None = None) -> dict:
  """The ``config`` item of a training checkpoint (empty dict if it has none)."""
  return _step_and_config(directory, step)[1]


def restore_state_only(directory: str, abstract_state: Any, step: int | None = None):
  """Restores only the ``state`` item (into the abstract, sharded target).

  Returns ``(state, step, run config)``.
  """
  mngr = _manager(directory)
  try:
    step = _pick_step(mngr, directory, step)
    out = _restore(mngr, directory, step, "the train state (does the config describe the "
                   "model it was trained with?)",
                   ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state)))
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
    out = _restore(mngr, directory, step, f"'{weights}'", ocp.args.Composite(
        state=ocp.args.PyTreeRestore(target, restore_args=as_numpy, partial_restore=True)))
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
  step, run_config = _step_and_config(ckdir, step)
  if run_config:
    try:
      model_cfg = DiTConfig.from_config(ml_collections.ConfigDict(run_config))
    except (ValueError, TypeError, KeyError, AttributeError) as e:
      raise CheckpointError(f"{ckdir}/{step}: its saved config does not describe a "
                            f"LightningDiT ({e}); is it a run of another trainer?") from e
  elif config is not None:
    logging.warning("%s/%d has no saved config: using the given config's model", ckdir, step)
    model_cfg = DiTConfig.from_config(config)
  else:
    raise CheckpointError(f"{ckdir}/{step} has no saved config; pass the config")
  abstract = nnx.to_pure_dict(nnx.state(
      nnx.eval_shape(lambda: LightningDiT(model_cfg, rngs=nnx.Rngs(0))), nnx.Param))
  params, step = restore_weights(ckdir, abstract, weights=weights, step=step)
  return params, model_cfg, step, run_config


def dit_config(path: str, field: str = "config.sample.checkpoint"):
  """The ``DiTConfig`` of what ``load_dit(path)`` would load, without reading weights
  (``meta.json`` of a converted dir, or the saved config of a run)."""
  import ml_collections  # pylint: disable=import-outside-toplevel
  from sfd_jax.core import files  # pylint: disable=import-outside-toplevel
  from sfd_jax.models.lightning_dit import DiTConfig  # pylint: disable=import-outside-toplevel
  if not path:
    raise CheckpointError(f"{field} is empty: give a converted checkpoint directory or a "
                          "training workdir")
  path = os.path.abspath(path)
  meta_path = os.path.join(path, "meta.json")
  if os.path.exists(meta_path):
    meta = files.read_json(meta_path, what=f"{field} metadata", error=CheckpointError)
    try:
      return DiTConfig(**meta["config"])
    except (KeyError, TypeError, ValueError) as e:
      raise CheckpointError(f"{field}={path}: meta.json does not describe a LightningDiT "
                            f"({e!r})") from e
  if not is_run(path):
    raise CheckpointError(f"{field}={path}: neither a converted checkpoint (meta.json) nor "
                          "a training run (checkpoints/<step>/)")
  ckdir = checkpoint_dir(path)
  run_config = read_config(ckdir)
  if not run_config:
    raise CheckpointError(f"{ckdir}: the latest checkpoint has no saved config")
  try:
    return DiTConfig.from_config(ml_collections.ConfigDict(run_config))
  except (ValueError, TypeError, KeyError, AttributeError) as e:
    raise CheckpointError(f"{ckdir}: its saved config does not describe a LightningDiT "
                          f"({e}); is it a run of another trainer?") from e


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


# ------------------------------------------------------------------ the texture VAE


def _str_keys(tree):
  if isinstance(tree, Mapping):
    return {str(k): _str_keys(v) for k, v in tree.items()}
  return tree


def load_texture_vae(path: str, *, weights: str = "params", step: int | None = None,
                     field: str = "checkpoint"):
  """A ``TextureVAE`` from a converted folder (``meta.json``) or a texture-VAE training run.

  For a run, the architecture comes from its saved config (``config.model``) and
  ``weights`` ("params" or "ema") is read; a VA-VAE run's ``linear_proj`` and a GAN run's
  discriminator are not. Returns ``(model, description)``.
  """
  from sfd_jax.convert import texture_vae as tvae_conv  # pylint: disable=import-outside-toplevel
  from sfd_jax.convert.common import assign  # pylint: disable=import-outside-toplevel
  from sfd_jax.models.texture_vae import TextureVAE, TextureVAEConfig  # pylint: disable=import-outside-toplevel
  if not path:
    raise CheckpointError(f"{field} is empty: give a converted texture VAE folder or a "
                          "texture-VAE training workdir")
  path = os.path.abspath(path)
  if os.path.exists(os.path.join(path, "meta.json")):
    return tvae_conv.load_converted_texture_vae(path), path
  if not is_run(path):
    raise CheckpointError(f"{field}={path}: neither a converted checkpoint (meta.json) nor "
                          "a training run (checkpoints/<step>/)")
  ckdir = checkpoint_dir(path)
  step, run_config = _step_and_config(ckdir, step)
  fields = {k: v for k, v in dict(run_config.get("model") or {}).items()
            if k not in ("dtype", "param_dtype")}
  if not fields:
    raise CheckpointError(f"{ckdir}/{step} has no saved model config")
  cfg = TextureVAEConfig.from_dict(fields)
  model = nnx.eval_shape(lambda: TextureVAE(cfg, rngs=nnx.Rngs(0)))
  # Orbax stores list indices (encoder.down[0]) as string keys
  abstract = _str_keys(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  params, step = restore_weights(ckdir, abstract, weights=weights, step=step)
  assign(model, params, name=f"{ckdir}/{step} {weights}")
  return model, f"{ckdir} step {step} ({weights})"
