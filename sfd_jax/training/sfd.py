"""The SFD trainer on the training core: LightningDiT + semantic-first flow matching.

``train_and_evaluate(config, workdir)`` builds the task — mesh and sharded state of one
trainable part (``params``, ``opt_state`` and an ``ema`` copy), the semantic-first loss
(``sfd_jax.diffusion.objective``), the Grain pipeline over stored latents, the periodic
in-training evaluation (``config.train_eval``) — and hands it to
``sfd_jax.training.loop.train`` (resume, logging, checkpoints, preemption, NaN guard).

Options beyond the reference recipe (defaults: off): gradient accumulation and
NaN / spike skipping (``config.optimizer.accumulate_steps``, ``skip_nonfinite``,
``skip_grad_norm_above``; ``training.step``), the validation loss on a held-out latent set
(``config.validation``; ``training.validation``), and ``init_from_mode="shape_check"``
(the reference's ``weight_init``: tensors whose name and shape match are copied, the
patch embedder's input channels are expanded, everything else keeps its random init).
"""
from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any, Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sfd_jax import parallel
from sfd_jax.convert.common import load_params
from sfd_jax.core import checks, errors, options, trees
from sfd_jax.core import jit as jit_lib
from sfd_jax.data import schema as schema_lib
from sfd_jax.data import stats as stats_lib
from sfd_jax.diffusion import clocks as clocks_lib
from sfd_jax.diffusion import objective as obj_lib
from sfd_jax.diffusion.objective import ObjectiveConfig
from sfd_jax.models.lightning_dit import DiTConfig, LightningDiT
from sfd_jax.training import loop, optim, periodic_eval
from sfd_jax.training import state as state_lib
from sfd_jax.training import step as step_lib
from sfd_jax.training.state import Part, TrainSetup

if TYPE_CHECKING:
  import ml_collections

def validate_config(config: ml_collections.ConfigDict, devices=None) -> None:
  """The SFD training config, before anything is built or compiled: every field against
  its declaration (``core.options``), the model and objective it describes, and the
  batch against the mesh (``batch_size`` over the batch axes; with
  ``optimizer.accumulate_steps`` = k, k micro-batches that divide over them).
  ``ConfigError`` / ``ShardingError`` name the field, what it must be and what it is."""
  checks.require_sections(config, ("model", "objective", "optimizer", "data", "mesh"),
                          mode="train", example="configs/sfd_xl.py")
  options.check(config, "sfd")
  model_configs(config)
  mesh = parallel.make_mesh(config.mesh.to_dict(), devices)
  parallel.check_batch(int(config.batch_size), mesh)
  step_lib.check_accumulation(int(config.optimizer.get("accumulate_steps", 1)),
                              int(config.batch_size), mesh)


def model_configs(config: ml_collections.ConfigDict) -> tuple[DiTConfig, ObjectiveConfig]:
  """(DiTConfig, ObjectiveConfig) of a run config; a field that does not describe a
  LightningDiT / the objective is a ``ConfigError`` naming the section."""
  try:
    model_cfg = DiTConfig.from_config(config)
  except (ValueError, TypeError, KeyError) as e:
    raise errors.ConfigError(f"config.model does not describe a LightningDiT: {e}") from e
  try:
    obj_cfg = ObjectiveConfig.from_config(config)
  except clocks_lib.ScheduleError as e:
    raise errors.ConfigError(str(e)) from e
  except (ValueError, TypeError, KeyError) as e:
    text = str(e)
    if "delta_t must be in" in text:
      text = f"config.objective.{text}"
    raise errors.ConfigError(f"config.objective: {text}") from e
  return model_cfg, obj_cfg


def check_data(config: ml_collections.ConfigDict, model_cfg: DiTConfig) -> None:
  """The dataset of ``config.data`` against the model, before anything is compiled:
  latent grid, channels, REPA features and width, label range (when ``dataset.json``
  records it), and the normalisation statistics (present, finite, std > 0, one per
  channel). ``DataError`` / ``ConfigError`` name the file and the config field."""
  d = config.data
  if not d.path:
    raise errors.ConfigError("config.data.path is empty: point it at a dataset directory "
                             "(see docs/data.md)")
  info = schema_lib.read_dataset_info(d.path)
  sch = info.schema
  where = os.path.join(d.path, schema_lib.DATASET_FILE)
  if sch.grid != model_cfg.input_size:
    raise errors.DataError(
        f"{where}: latents on a {sch.grid}×{sch.grid} grid, but config.model.input_size is "
        f"{model_cfg.input_size}; set --config.model.input_size={sch.grid} or use a dataset "
        "encoded for this model")
  section = config.get("schedule")
  if section is not None and section.get("parts"):
    clock_sch = clocks_lib.from_config(config)
    data_parts = sch.latent_parts()
    want = tuple((p.name, p.channels) for p in clock_sch.parts)
    if data_parts != want:
      raise errors.DataError(
          f"{where}: the dataset's latent parts {list(data_parts)} (name, channels) do not "
          f"match config.schedule's {list(want)}; the schedule must name the stored parts "
          "in their order (texture, semantic, then the extra parts)")
  elif sch.extra_parts:
    raise errors.DataError(
        f"{where}: the dataset has extra latent parts {list(sch.extra_parts)}; give them "
        "clocks in a config.schedule section (docs/clocks.md)")
  if sch.latent_channels != model_cfg.in_channels:
    raise errors.DataError(
        f"{where}: latents of {sch.texture_channels} texture + {sch.semantic_channels} "
        f"semantic = {sch.latent_channels} channels, but config.model.in_channels is "
        f"{model_cfg.in_channels}; set --config.model.in_channels={sch.latent_channels} "
        "(and model.semantic_chans) or use a dataset encoded for this model")
  if sch.semantic_channels != model_cfg.semantic_chans and not (
      section is not None and section.get("parts")):
    raise errors.DataError(
        f"{where}: {sch.semantic_channels} semantic channels, but config.model."
        f"semantic_chans is {model_cfg.semantic_chans}; set --config.model.semantic_chans="
        f"{sch.semantic_channels}")
  repa = bool(config.objective.use_repa and config.model.use_repa)
  if repa and not sch.has_repa:
    raise errors.DataError(
        f"{where}: the dataset stores no REPA features, but config.objective.use_repa and "
        "config.model.use_repa are on; set --config.objective.use_repa=False or encode the "
        "data with encode.store_repa=True")
  if repa and sch.repa_dim != model_cfg.repa_dim:
    raise errors.DataError(
        f"{where}: REPA features of width {sch.repa_dim}, but config.model.repa_dim is "
        f"{model_cfg.repa_dim}; set --config.model.repa_dim={sch.repa_dim}")
  if d.flip and not sch.has_flip:
    raise errors.DataError(f"{where}: the dataset stores no flipped views, but "
                           "config.data.flip is True; set --config.data.flip=False")
  labels = info.metadata.get("labels") if isinstance(info.metadata, dict) else None
  if isinstance(labels, dict) and "max" in labels:
    lo, hi = int(labels.get("min", 0)), int(labels["max"])
    if lo < 0 or hi >= model_cfg.num_classes:
      raise errors.DataError(
          f"{where}: class labels {lo}..{hi}, but config.model.num_classes is "
          f"{model_cfg.num_classes} (labels must be in [0, {model_cfg.num_classes})); set "
          f"--config.model.num_classes={hi + 1} or fix the dataset's labels")
  stats_lib.load_stats(d.stats or d.path, sch)


def build_setup(model_cfg: DiTConfig, obj_cfg: ObjectiveConfig, mesh: Mesh,
                tx: optax.GradientTransformation, schedule: optax.Schedule, *,
                rules=parallel.DEFAULT_RULES, ema_decay: float = 0.9999, seed: int = 0,
                strict_sharding: bool = False,
                compiler_options: Mapping[str, Any] | None = None) -> TrainSetup:
  """Sharded setup of a LightningDiT with an EMA copy (``params``/``opt_state``/``ema``);
  ``compiler_options``: XLA options of its init / step / eval programs."""
  part = Part(build=lambda: LightningDiT(model_cfg, rngs=nnx.Rngs(seed)), tx=tx,
              schedule=schedule, ema_key="ema")
  return state_lib.build_setup([part], mesh, rules=rules, seed=seed,
                               strict_sharding=strict_sharding, model_cfg=model_cfg,
                               obj_cfg=obj_cfg, ema_decay=ema_decay,
                               compiler_options=compiler_options)


def build(config: ml_collections.ConfigDict, devices=None) -> TrainSetup:
  """Mesh, optimizer and sharded train setup from a config (validates divisibility)."""
  mesh = parallel.make_mesh(config.mesh.to_dict(), devices)
  parallel.check_batch(config.batch_size, mesh)
  tx, schedule = optim.make_optimizer(config.optimizer)
  model_cfg, obj_cfg = model_configs(config)
  setup = build_setup(model_cfg, obj_cfg, mesh, tx, schedule,
                      rules=config.get("sharding_rules") or parallel.DEFAULT_RULES,
                      ema_decay=config.ema_decay, seed=config.seed,
                      strict_sharding=config.get("strict_sharding", False),
                      compiler_options=dict(jit_lib.compiler_options(config)))
  for note in setup.sharding_notes:
    logging.warning("sharding: %s", note)
  return setup


def loss_and_metrics(setup: TrainSetup, model: LightningDiT, batch: dict[str, jax.Array],
                     key: jax.Array):
  """The semantic-first loss of one global batch and its metrics."""
  obj_cfg = setup.obj_cfg
  repa_target = batch.get("repa") if obj_cfg.repa_active else None
  want_repa = repa_target is not None and setup.model_cfg.use_repa
  act = NamedSharding(setup.mesh, P(parallel.BATCH_AXES))

  presampled = "_x0" in batch            # gradient accumulation: drawn for the whole batch

  def apply_fn(xt, t_tex, t_sem, y, drop_key, interval=None):
    out = model(xt, t_tex, t_sem, y, label_drop_key=None if presampled else drop_key,
                return_repa=want_repa, activation_sharding=act, interval=interval)
    return out if want_repa else (out, None)

  clock_params = None
  if obj_cfg.schedule is not None and obj_cfg.schedule.learned_parts:
    clock_params = clocks_lib.params_from_model(model, obj_cfg.schedule)
  common = dict(repa_target=repa_target, x0=batch.get("_x0"), t=batch.get("_t"),
                clock_params=clock_params)
  if obj_cfg.name == "meanflow":
    loss, metrics = obj_lib.meanflow_losses(apply_fn, batch["latent"], batch["label"], key,
                                            obj_cfg, r=batch.get("_r"), **common)
  else:
    loss, metrics = obj_lib.training_losses(apply_fn, batch["latent"], batch["label"], key,
                                            obj_cfg, **common)
  metrics.pop("per_example")
  return loss, metrics


def presample(setup: TrainSetup, batch: dict[str, jax.Array], key: jax.Array):
  """The batch with the randomness ``loss_and_metrics`` draws from ``key`` for the whole
  batch (noise ``_x0``, times ``_t``, label dropout applied to ``label``), so that
  micro-batches of it give exactly the loss terms of the whole batch."""
  cfg, model_cfg = setup.obj_cfg, setup.model_cfg
  x1 = batch["latent"]
  k_noise, k_time, k_drop = jax.random.split(key, 3)       # as objective.training_losses
  out = dict(batch)
  out["_x0"] = jax.random.normal(k_noise, x1.shape, jnp.float32)
  if cfg.name == "meanflow":
    out["_t"], out["_r"] = obj_lib.sample_time_pairs(k_time, x1.shape[0], cfg)
  else:
    out["_t"] = obj_lib.sample_times(k_time, x1.shape[0], cfg)
  y = jnp.asarray(batch["label"], jnp.int32)
  if model_cfg.class_dropout_prob > 0:                     # as LightningDiT.embed_condition
    drop = jax.random.uniform(k_drop, y.shape) < model_cfg.class_dropout_prob
    y = jnp.where(drop, model_cfg.num_classes, y)
  out["label"] = y
  return out


def make_train_step(setup: TrainSetup, donate: bool = True, *, norms_every: int = 1,
                    total_steps: int | None = None, accumulate_steps: int = 1,
                    skip_nonfinite: bool = False, skip_grad_norm_above: float = 0.0,
                    global_batch_size: int | None = None) -> Callable:
  """``step(state, batch) -> (state, metrics)``: the core's step with the SFD loss
  (options: ``sfd_jax.training.step.make_train_step``)."""
  return step_lib.make_train_step(
      setup, lambda model, batch, key, _: loss_and_metrics(setup, model, batch, key),
      donate=donate, norms_every=norms_every, total_steps=total_steps,
      accumulate_steps=accumulate_steps,
      presample={setup.main.part.params_key: lambda b, k: presample(setup, b, k)},
      skip_nonfinite=skip_nonfinite, skip_grad_norm_above=skip_grad_norm_above,
      global_batch_size=global_batch_size)


def step_options(config) -> dict[str, Any]:
  """``make_train_step`` options of the config: norms on logging steps, and
  ``config.optimizer``'s accumulation and skipping."""
  o = config.optimizer
  return {"norms_every": int(config.log_every_steps),
          "total_steps": int(config.num_train_steps),
          "accumulate_steps": int(o.get("accumulate_steps", 1)),
          "skip_nonfinite": bool(o.get("skip_nonfinite", False)),
          "skip_grad_norm_above": float(o.get("skip_grad_norm_above", 0.0) or 0.0),
          "global_batch_size": int(config.batch_size)}


def make_data_iterator(config: ml_collections.ConfigDict, seed: int):
  d = config.data
  if not d.path:
    raise errors.ConfigError("config.data.path is empty: point it at a dataset directory "
                             "(see docs/data.md)")
  from sfd_jax.data import pipeline  # pylint: disable=import-outside-toplevel  (Grain)
  per_process = config.batch_size // jax.process_count()
  return pipeline.build_pipeline(
      d.path, batch_size=per_process, seed=seed, stats=d.stats or None,
      num_classes=int(config.model.num_classes),
      latent_multiplier=d.latent_multiplier, flip=d.flip,
      normalize=bool(d.get("normalize", True)),
      repa=bool(config.objective.use_repa and config.model.use_repa),
      repa_dtype=d.repa_dtype, num_workers=d.num_workers, read_threads=d.read_threads,
      prefetch_batches=d.prefetch_batches)


INIT_FROM_MODES = ("exact", "shape_check")


def init_params_from(params: dict, abstract: dict, *, mode: str = "exact",
                     patch_channels: int = -1, patch_size: int = 1,
                     log=logging.info) -> dict:
  """Initial parameters from a converted checkpoint's ``params`` for a model with the
  (pure-dict) shapes ``abstract``.

  ``mode="exact"``: every parameter must match (returned as is). ``"shape_check"``: the
  reference's ``weight_init`` (``load_weights_with_shape_check``): a parameter whose
  path and shape match is copied; the patch embedder's kernel with a different number
  of input channels is expanded — new weights zero, the first ``patch_channels`` input
  channels copied (-1: all the checkpoint has, e.g. the 32 texture channels of a
  LightningDiT when starting SFD with 48; the reference's code copies 16); anything else
  is skipped (logged) and keeps the random initialisation (the result lacks it).
  """
  if mode not in INIT_FROM_MODES:
    raise errors.ConfigError(f"config.init_from_mode={mode!r}: expected one of "
                             f"{INIT_FROM_MODES}")
  if mode == "exact":
    return params

  def walk(given, target, prefix):
    out = {}
    for k, t in target.items():
      path = f"{prefix}{k}"
      if k not in given:
        log(f"init_from: '{path}' not in the checkpoint, keeps its random init")
        continue
      g = given[k]
      if isinstance(t, dict):
        if isinstance(g, dict):
          sub = walk(g, t, path + "/")
          if sub:
            out[k] = sub
        continue
      g = np.asarray(g)
      if tuple(g.shape) == tuple(t.shape):
        out[k] = g
      elif (path == "x_embedder/kernel" and g.ndim == 2 and g.shape[1] == t.shape[1]
            and g.shape[0] % (patch_size * patch_size) == 0):
        out[k] = _expand_patch_kernel(g, t.shape, patch_size, patch_channels, path, log)
      else:
        log(f"init_from: skipping '{path}': checkpoint shape {tuple(g.shape)}, model shape "
            f"{tuple(t.shape)}")
    for k in set(given) - set(target):
      log(f"init_from: '{prefix}{k}' is not a parameter of the model, skipped")
    return out

  return walk(params, abstract, "")


def _expand_patch_kernel(kernel, shape, patch_size, patch_channels, path, log):
  """(p·p·C_old, D) → (p·p·C_new, D): zeros, then the first input channels copied
  (rows are the flattened (p, p, C) patch)."""
  p2, d = patch_size * patch_size, shape[1]
  c_old, c_new = kernel.shape[0] // p2, shape[0] // p2
  n = min(c_old, c_new) if patch_channels < 0 else min(patch_channels, c_old, c_new)
  out = np.zeros((p2, c_new, d), kernel.dtype)
  out[:, :n] = kernel.reshape(p2, c_old, d)[:, :n]
  log(f"init_from: expanded '{path}' from {c_old} to {c_new} input channels (first {n} "
      "copied, the rest zero)")
  return out.reshape(shape)


def _init_from(config, setup: TrainSetup | None = None) -> Callable[[], Any] | None:
  if not config.init_from:
    return None
  mode = str(config.get("init_from_mode", "exact"))
  if mode not in INIT_FROM_MODES:
    raise errors.ConfigError(f"config.init_from_mode={mode!r}: expected one of "
                             f"{INIT_FROM_MODES}")

  def load():
    logging.info("initialising from converted checkpoint %s (%s)", config.init_from, mode)
    params = load_params(config.init_from, "lightning_dit")[0]
    if setup is None:
      return params
    abstract = setup.abstract_state[setup.main.part.params_key]
    if mode == "exact":
      if setup.model_cfg.interval_embedding:
        # a flow-matching checkpoint into an average-velocity model: the interval
        # embedders keep their initial values (output 0: the same function)
        fresh = sorted(k for k in abstract if k.startswith("r_embedder") and k not in params)
        abstract = {k: v for k, v in abstract.items() if k not in fresh}
        if fresh:
          logging.info("init_from: %s not in the checkpoint (a flow-matching model): they "
                       "start at their initial values, so the model starts as the same "
                       "function", ", ".join(fresh))
      trees.check_shapes(params, abstract, f"config.init_from={config.init_from} (exact; "
                         "init_from_mode='shape_check' copies what matches)")
      return params
    return init_params_from(params, abstract, mode=mode, patch_size=setup.model_cfg.patch_size,
                            patch_channels=int(config.get("init_from_patch_channels", -1)))
  return load


def check_config(config: ml_collections.ConfigDict, devices=None) -> None:
  """What ``train_and_evaluate`` checks before it builds anything: ``validate_config``
  and the dataset against the model (``check_data``)."""
  validate_config(config, devices)
  check_data(config, model_configs(config)[0])


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       writer=None) -> dict[str, Any]:
  """Runs (or resumes) SFD training; returns ``{"step", "metrics", "state"}``.

  Everything that can be checked without compiling is checked first: the config
  (``validate_config``), the dataset against the model (``check_data``), the workdir.
  """
  check_config(config)
  setup = build(config)
  hooks = []
  if periodic_eval.enabled(config):
    evaluator = periodic_eval.PeriodicEvaluator(config, setup, workdir)
    total = int(config.num_train_steps)
    hooks.append(loop.PeriodicHook(
        due=lambda s: periodic_eval.due(config, s, total),
        fn=lambda s, state, w: {f"train_eval/{k}": v
                                for k, v in evaluator(s, state, w).items()}))
  from sfd_jax.training import validation  # pylint: disable=import-outside-toplevel  (Grain)
  if validation.enabled(config):
    val = validation.ValidationLoss(config, setup)
    total = int(config.num_train_steps)
    hooks.append(loop.PeriodicHook(due=lambda s: validation.due(config, s, total), fn=val))
  task = loop.TrainTask(name="sfd", setup=setup,
                        step=make_train_step(setup, **step_options(config)),
                        make_data=lambda: make_data_iterator(config, config.seed),
                        init_params=_init_from(config, setup), hooks=hooks)
  return loop.train(task, config, workdir, writer=writer)
