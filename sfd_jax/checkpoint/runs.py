"""Reading a training run: its checkpoint folder, saved config, weights, whole state, and
the networks a path names (a converted folder or a run).

Used by sampling, evaluation, export and the trainers (which restore through
``Checkpointer``). Weights are read straight into host memory (NumPy) without a mesh
or the optimizer state, so any single machine can read a run.
"""
from __future__ import annotations

import os
from typing import Any, Callable, Mapping

import jax
import numpy as np
import orbax.checkpoint as ocp
from absl import logging
from flax import nnx

from sfd_jax.checkpoint.manager import ITEMS, saved_config
from sfd_jax.convert import common
from sfd_jax.convert import lightning_dit as dit_conv
from sfd_jax.convert import texture_vae as tvae_conv
from sfd_jax.core import errors, files, options, paths, trees
from sfd_jax.core.errors import CheckpointError
from sfd_jax.models.lightning_dit import DiTConfig, LightningDiT
from sfd_jax.models.texture_vae import TextureVAE, TextureVAEConfig

WEIGHTS = ("ema", "params")
_DIT = "a converted or exported LightningDiT folder or an SFD training workdir"
_TVAE = "a converted texture VAE folder or a texture-VAE training workdir"


def checkpoint_dir(path: str) -> str:
  """``<workdir>/checkpoints`` for a workdir; the path itself if it holds step folders."""
  path = os.path.abspath(path)
  sub = os.path.join(path, "checkpoints")
  return sub if os.path.isdir(sub) else path


def is_run(path: str) -> bool:
  """True when ``path`` is a training workdir or checkpoints folder with a step."""
  ckdir = checkpoint_dir(path)
  return os.path.isdir(ckdir) and any(d.isdigit() for d in os.listdir(ckdir))


def available_steps(path: str) -> list[int]:
  """The checkpointed steps of a training workdir / checkpoints folder, ascending."""
  ckdir = checkpoint_dir(path)
  if not os.path.isdir(ckdir):
    return []
  return sorted(int(d) for d in os.listdir(ckdir)
                if d.isdigit() and os.path.isdir(os.path.join(ckdir, d)))


RUN_NAMES = {"sfd": "an SFD (LightningDiT) training run",
             "semvae": "a SemVAE training run",
             "texture_vae": "a texture-VAE training run",
             "feature_net": "a feature-net training run (the demo's)",
             "encode": "a run of an encode / extract config"}


def run_kind(run_config: Mapping[str, Any]) -> str:
  """The family of a run's saved config (``core.options.family_of``; ``texture_vae_gan``
  for the GAN recipe)."""
  fam = options.family_of(dict(run_config))
  loss = run_config.get("loss") or {}
  if fam == "texture_vae" and isinstance(loss, Mapping) and loss.get("name") == "ldm":
    return "texture_vae_gan"
  return fam


def run_name(kind: str) -> str:
  if kind == "texture_vae_gan":
    return "a texture-VAE GAN training run (loss.name='ldm')"
  return RUN_NAMES.get(kind, "a training run")


def what_is(path: str) -> str | None:
  """What ``path`` holds, in words: a converted network folder (by its ``meta.json``), a
  training run (by its saved config: SFD, SemVAE, texture VAE, GAN recipe, feature net),
  a dataset, a sampling workdir, a file, an empty folder; None when it does not exist or
  nothing is recognised."""
  if not path or not os.path.exists(path):
    return None
  if os.path.isfile(path):
    ext = os.path.splitext(path)[1].lower()
    return {".npz": "an .npz file", ".safetensors": "a .safetensors file",
            ".pt": "a PyTorch file", ".pth": "a PyTorch file", ".ckpt": "a PyTorch file",
            ".json": "a JSON file"}.get(ext, "a file")
  meta_path = os.path.join(path, "meta.json")
  if os.path.exists(meta_path):
    try:
      meta = files.read_json(meta_path, what="converted checkpoint metadata",
                             error=CheckpointError)
    except errors.UserError:
      return "a folder with an unreadable meta.json"
    return common.kind_name(common.meta_kind(meta))
  if is_run(path):
    try:
      run_config = read_config(checkpoint_dir(path))
    except errors.UserError:
      run_config = {}
    return run_name(run_kind(run_config)) if run_config else "a training run without a saved config"
  return common.describe_folder(path)


def _wrong(field: str, path: str, what: str, expected: str) -> CheckpointError:
  """``<field>=<path> is a converted texture VAE folder (...); <field> needs <expected>``."""
  if not field:
    return CheckpointError(f"{path} is {what}, not {expected}")
  return CheckpointError(f"{field}={path} is {what}; {field} needs {expected}")


def _converted_meta(folder: str, field: str, kind: str, expected: str) -> dict:
  """The ``meta.json`` of the converted ``folder``; a folder of another network than
  ``kind`` is a ``CheckpointError`` naming it, ``field`` and ``expected``."""
  meta = files.read_json(os.path.join(folder, "meta.json"), what=f"{field} metadata",
                         error=CheckpointError)
  found = common.meta_kind(meta)
  if found is not None and found != kind:
    raise _wrong(field, folder, common.kind_name(found), expected)
  return meta


def source(path: str, field: str, expected: str) -> tuple[str, str]:
  """What ``path`` names: ``("converted", folder)`` (a ``meta.json`` folder) or
  ``("run", checkpoints folder)``; otherwise a ``CheckpointError`` naming ``field`` (and
  what the path is, when that is known)."""
  if not path:
    raise CheckpointError(f"{field} is empty: give {expected}")
  path = os.path.abspath(path)
  if os.path.exists(os.path.join(path, "meta.json")):
    return "converted", path
  if not is_run(path):
    what = what_is(path)
    if what:
      raise _wrong(field, path, what, expected)
    raise CheckpointError(f"{field}={path}: neither a converted checkpoint (meta.json) nor "
                          "a training run (checkpoints/<step>/)")
  return "run", checkpoint_dir(path)


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


def _read(mngr: ocp.CheckpointManager, directory: str, step: int, what: str,
          fn: Callable[[], Any]):
  """``fn()`` (a restore) with every failure naming the checkpoint and what was read."""
  try:
    return fn()
  except Exception as e:  # pylint: disable=broad-except  (orbax / tensorstore / json)
    err = errors.as_resource_error(e, where=f"{directory}/{step}")
    if err is not None:
      raise err from e
    raise CheckpointError(f"checkpoint {directory}/{step}: cannot read {what} "
                          f"({errors.reason(e)}); use another step (available: "
                          f"{sorted(mngr.all_steps())}) or another run") from e


def _step_and_config(mngr: ocp.CheckpointManager, directory: str,
                     step: int | None) -> tuple[int, dict]:
  """(the chosen step, its saved config — empty when it has none)."""
  step = _pick_step(mngr, directory, step)
  return step, _read(mngr, directory, step, "its saved config",
                     lambda: saved_config(mngr, directory, step))


def _read_step_and_config(directory: str, step: int | None) -> tuple[int, dict]:
  """``_step_and_config`` of the checkpoints folder ``directory``."""
  mngr = _manager(directory)
  try:
    return _step_and_config(mngr, directory, step)
  finally:
    mngr.close()


def read_config(directory: str, step: int | None = None) -> dict:
  """The ``config`` item of a training checkpoint (empty dict if it has none)."""
  return _read_step_and_config(directory, step)[1]


def restore_state_only(directory: str, abstract_state: Any, step: int | None = None):
  """Restores only the ``state`` item (into the abstract, sharded target).

  Returns ``(state, step, run config)``.
  """
  mngr = _manager(directory)
  try:
    step, run_config = _step_and_config(mngr, directory, step)
    out = _read(mngr, directory, step, "the train state (does the config describe the "
                "model it was trained with?)", lambda: mngr.restore(step, args=ocp.args.Composite(
                    state=ocp.args.StandardRestore(abstract_state))))
    return out["state"], step, run_config
  finally:
    mngr.close()


def _str_keys(tree):
  """Orbax stores list indices (``encoder.down[0]``) as string keys."""
  if isinstance(tree, Mapping):
    return {str(k): _str_keys(v) for k, v in tree.items()}
  return tree


def restore_weights(directory: str, abstract_params: Mapping[str, Any], *,
                    weights: str = "ema", step: int | None = None) -> tuple[dict, int]:
  """One weight set (``state[weights]``) of a checkpoint as a nested NumPy dict.

  ``abstract_params``: the model's pure-dict parameter shapes (every path and shape is
  checked; a run may hold more, e.g. a GAN's projection). Returns ``(params, step)``.
  """
  if weights not in WEIGHTS:
    raise CheckpointError(f"weights={weights!r}; expected one of {WEIGHTS}")
  abstract_params = _str_keys(abstract_params)
  mngr = _manager(directory)
  try:
    step = _pick_step(mngr, directory, step)
    target = {weights: abstract_params}
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), target)
    out = _read(mngr, directory, step, f"'{weights}'", lambda: mngr.restore(
        step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
            target, restore_args=as_numpy, partial_restore=True))))
  finally:
    mngr.close()
  params = trees.to_numpy(out["state"][weights])
  trees.check_shapes(params, abstract_params, f"{directory}/{step} '{weights}'",
                     error=CheckpointError)
  return params, step


def abstract_params(build: Callable[[], nnx.Module]) -> dict:
  """The pure-dict parameter shapes of the module ``build()`` makes (nothing allocated)."""
  return nnx.to_pure_dict(nnx.state(nnx.eval_shape(build), nnx.Param))


def model_section(run_config: Mapping[str, Any], where: str, what: str) -> dict:
  """The saved ``config.model`` fields of a run (dtype fields dropped)."""
  fields = {k: v for k, v in dict(run_config.get("model") or {}).items()
            if k not in ("dtype", "param_dtype")}
  if not fields:
    raise CheckpointError(f"{where} has no saved model config; is it a run of the "
                          f"{what} trainer?")
  return fields


# ------------------------------------------------------------------ the DiT


def _dit_config(run_config: dict, where: str, field: str = "") -> DiTConfig:
  import ml_collections  # pylint: disable=import-outside-toplevel  (not needed by benchmarks)
  kind = run_kind(run_config)
  if kind != "sfd":
    raise _wrong(field, where, run_name(kind), _DIT)
  try:
    return DiTConfig.from_config(ml_collections.ConfigDict(run_config))
  except (ValueError, TypeError, KeyError, AttributeError) as e:
    raise CheckpointError(f"{where}: its saved config does not describe a LightningDiT "
                          f"({e}); is it a run of another trainer?") from e


def restore_dit(path: str, *, weights: str = "ema", step: int | None = None, config=None):
  """A LightningDiT weight set of a training run.

  The architecture comes from the run's saved config (``config`` is the fallback for
  checkpoints without one). Returns ``(params, DiTConfig, step, run config)``.
  """
  ckdir = checkpoint_dir(path)
  if not os.path.isdir(ckdir):
    raise CheckpointError(f"no checkpoint directory {ckdir}")
  step, run_config = _read_step_and_config(ckdir, step)
  if run_config:
    model_cfg = _dit_config(run_config, f"{ckdir}/{step}")
  elif config is not None:
    logging.warning("%s/%d has no saved config: using the given config's model", ckdir, step)
    model_cfg = DiTConfig.from_config(config)
  else:
    raise CheckpointError(f"{ckdir}/{step} has no saved config; pass the config")
  abstract = abstract_params(lambda: LightningDiT(model_cfg, rngs=nnx.Rngs(0)))
  params, step = restore_weights(ckdir, abstract, weights=weights, step=step)
  return params, model_cfg, step, run_config


def dit_config(path: str, field: str = "config.sample.checkpoint") -> DiTConfig:
  """The ``DiTConfig`` of what ``load_dit(path)`` would load, without reading weights
  (``meta.json`` of a converted dir, or the saved config of a run)."""
  kind, where = source(path, field, _DIT)
  if kind == "converted":
    meta = _converted_meta(where, field, "lightning_dit", _DIT)
    try:
      return DiTConfig(**meta["config"])
    except (KeyError, TypeError, ValueError) as e:
      raise CheckpointError(f"{field}={where}: meta.json does not describe a LightningDiT "
                            f"({e!r})") from e
  run_config = read_config(where)
  if not run_config:
    raise CheckpointError(f"{where}: the latest checkpoint has no saved config")
  return _dit_config(run_config, where, field)


def load_dit(path: str, field: str = "config.sample.checkpoint", *,
             step: int | None = None, weights: str = "ema") -> LightningDiT:
  """A LightningDiT from a converted/exported dir (``meta.json``) or from a training
  run's weights (only that subtree is read: ``weights`` = ema | params).

  ``step``: the training step of a run (None: the latest); e.g. an autoguidance guide at
  70K from the same guide run as the 120K one. A converted directory has no steps, so a
  step there is an error naming ``field``.
  """
  kind, where = source(path, field, _DIT)
  if kind == "converted":
    if step is not None:
      raise CheckpointError(f"{field}={where} is a converted checkpoint (one weight set, no "
                            f"training steps): a step ({step}) can only be chosen for a "
                            "training workdir")
    dit_config(where, field)                 # a converted folder of another network: named
    return dit_conv.load_converted(where)
  if step is not None and step not in available_steps(where):
    raise CheckpointError(f"{field}={os.path.abspath(path)} has no checkpoint at step "
                          f"{step}; available steps: {available_steps(where)}")
  params, model_cfg, step, _ = restore_dit(where, weights=weights, step=step)
  model = LightningDiT(model_cfg, rngs=nnx.Rngs(0))
  common.assign(model, params, name=f"{where}/{step} {weights}")
  logging.info("loaded %s weights of %s/%d", weights, where, step)
  return model


# ------------------------------------------------------------------ the texture VAE


def check_texture_vae(path: str, field: str = "checkpoint") -> str:
  """What ``load_texture_vae(path)`` would read — ``"file"``, ``"converted"`` or ``"run"``
  — checked without reading weights: a converted folder of another network or a run of
  another trainer is a ``CheckpointError`` that names it and ``field``."""
  if not path:
    raise CheckpointError(f"{field} is empty: give {_TVAE}")
  if os.path.isfile(path):
    return "file"
  if not is_run(path):
    if os.path.exists(os.path.join(path, "meta.json")):
      _converted_meta(os.path.abspath(path), field, tvae_conv.KIND, _TVAE)
    return "converted"
  run_config = read_config(checkpoint_dir(path))
  kind = run_kind(run_config) if run_config else "texture_vae"
  if kind not in ("texture_vae", "texture_vae_gan"):
    raise _wrong(field, os.path.abspath(path), run_name(kind), _TVAE)
  return "run"


def load_texture_vae(path: str, cfg: TextureVAEConfig | None = None, *, dtype=None,
                     weights: str = "params", step: int | None = None,
                     field: str = "checkpoint") -> TextureVAE:
  """A ``TextureVAE`` from a reference checkpoint file (``.ckpt``/``.pt``/``.npz``/
  ``.safetensors``; ``cfg`` its architecture, default f16d32), a converted folder
  (``meta.json``) or a texture-VAE training run (architecture from its saved config,
  ``weights`` "params" or "ema" at ``step``; a VA-VAE run's ``linear_proj`` and a GAN
  run's discriminator are not read). ``dtype``: the compute dtype."""
  kind = check_texture_vae(path, field)
  if kind == "file":
    return tvae_conv.load_reference_file(path, cfg, dtype=dtype)
  if kind == "converted":
    return tvae_conv.load_converted_texture_vae(path, dtype=dtype)
  where = checkpoint_dir(path)
  step, run_config = _read_step_and_config(where, step)
  model_cfg = TextureVAEConfig.from_dict(model_section(run_config, f"{where}/{step}",
                                                      "texture VAE"))
  model = nnx.eval_shape(lambda: TextureVAE(model_cfg, rngs=nnx.Rngs(0), dtype=dtype))
  params, step = restore_weights(where, nnx.to_pure_dict(nnx.state(model, nnx.Param)),
                                 weights=weights, step=step)
  common.assign(model, params, name=f"{where}/{step} {weights}")
  return model
