"""The SFD trainer on the training core: LightningDiT + semantic-first flow matching.

``train_and_evaluate(config, workdir)`` builds the task — mesh and sharded state of one
trainable part (``params``, ``opt_state`` and an ``ema`` copy), the semantic-first loss
(``sfd_jax.diffusion.objective``), the Grain pipeline over stored latents, the periodic
in-training evaluation (``config.train_eval``) — and hands it to
``sfd_jax.training.loop.train`` (resume, logging, checkpoints, preemption, NaN guard).
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable

import jax
import optax
from absl import logging
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sfd_jax import parallel
from sfd_jax.diffusion import objective as obj_lib
from sfd_jax.diffusion.objective import ObjectiveConfig
from sfd_jax.models.lightning_dit import DiTConfig, LightningDiT
from sfd_jax.training import loop, optim, periodic_eval
from sfd_jax.training import state as state_lib
from sfd_jax.training import step as step_lib
from sfd_jax.training.loop import NonFiniteLossError  # noqa: F401  (re-exported)
from sfd_jax.training.state import Part, TrainSetup, create_train_state  # noqa: F401

if TYPE_CHECKING:
  import ml_collections

__all__ = ["NonFiniteLossError", "build", "build_setup", "create_train_state",
           "loss_and_metrics", "make_data_iterator", "make_train_step", "train_and_evaluate"]


def build_setup(model_cfg: DiTConfig, obj_cfg: ObjectiveConfig, mesh: Mesh,
                tx: optax.GradientTransformation, schedule: optax.Schedule, *,
                rules=parallel.DEFAULT_RULES, ema_decay: float = 0.9999, seed: int = 0,
                strict_sharding: bool = False) -> TrainSetup:
  """Sharded setup of a LightningDiT with an EMA copy (``params``/``opt_state``/``ema``)."""
  part = Part(build=lambda: LightningDiT(model_cfg, rngs=nnx.Rngs(seed)), tx=tx,
              schedule=schedule, ema_key="ema")
  return state_lib.build_setup([part], mesh, rules=rules, seed=seed,
                               strict_sharding=strict_sharding, model_cfg=model_cfg,
                               obj_cfg=obj_cfg, ema_decay=ema_decay)


def build(config: ml_collections.ConfigDict, devices=None) -> TrainSetup:
  """Mesh, optimizer and sharded train setup from a config (validates divisibility)."""
  mesh = parallel.make_mesh(config.mesh.to_dict(), devices)
  parallel.check_batch(config.batch_size, mesh)
  tx, schedule = optim.make_optimizer(config.optimizer)
  setup = build_setup(DiTConfig.from_config(config), ObjectiveConfig.from_config(config),
                      mesh, tx, schedule,
                      rules=config.get("sharding_rules") or parallel.DEFAULT_RULES,
                      ema_decay=config.ema_decay, seed=config.seed,
                      strict_sharding=config.get("strict_sharding", False))
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

  def apply_fn(xt, t_tex, t_sem, y, drop_key):
    out = model(xt, t_tex, t_sem, y, label_drop_key=drop_key, return_repa=want_repa,
                activation_sharding=act)
    return out if want_repa else (out, None)

  loss, metrics = obj_lib.training_losses(apply_fn, batch["latent"], batch["label"], key,
                                          obj_cfg, repa_target=repa_target)
  metrics.pop("per_example")
  return loss, metrics


def make_train_step(setup: TrainSetup, donate: bool = True, *, norms_every: int = 1,
                    total_steps: int | None = None) -> Callable:
  """``step(state, batch) -> (state, metrics)``: the core's step with the SFD loss
  (``norms_every``/``total_steps``: see ``sfd_jax.training.step.make_train_step``)."""
  return step_lib.make_train_step(
      setup, lambda model, batch, key, _: loss_and_metrics(setup, model, batch, key),
      donate=donate, norms_every=norms_every, total_steps=total_steps)


def make_data_iterator(config: ml_collections.ConfigDict, seed: int):
  d = config.data
  if not d.path:
    raise ValueError("config.data.path is empty: point it at a dataset directory "
                     "(see docs/data.md)")
  from sfd_jax.data import pipeline  # pylint: disable=import-outside-toplevel  (Grain)
  per_process = config.batch_size // jax.process_count()
  return pipeline.build_pipeline(
      d.path, batch_size=per_process, seed=seed, stats=d.stats or None,
      latent_multiplier=d.latent_multiplier, flip=d.flip,
      repa=bool(config.objective.use_repa and config.model.use_repa),
      repa_dtype=d.repa_dtype, num_workers=d.num_workers, read_threads=d.read_threads,
      prefetch_batches=d.prefetch_batches)


def _init_from(config) -> Callable[[], Any] | None:
  if not config.init_from:
    return None

  def load():
    from sfd_jax.convert.common import load_params  # pylint: disable=import-outside-toplevel
    logging.info("initialising from converted checkpoint %s", config.init_from)
    return load_params(config.init_from, "lightning_dit")[0]
  return load


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       writer=None) -> dict[str, Any]:
  """Runs (or resumes) SFD training; returns ``{"step", "metrics", "state"}``."""
  setup = build(config)
  hooks = []
  if periodic_eval.enabled(config):
    evaluator = periodic_eval.PeriodicEvaluator(config, setup, workdir)
    total = int(config.num_train_steps)
    hooks.append(loop.PeriodicHook(
        due=lambda s: periodic_eval.due(config, s, total),
        fn=lambda s, state, w: {f"train_eval/{k}": v
                                for k, v in evaluator(s, state, w).items()}))
  task = loop.TrainTask(name="sfd", setup=setup, step=make_train_step(
                            setup, norms_every=int(config.log_every_steps),
                            total_steps=int(config.num_train_steps)),
                        make_data=lambda: make_data_iterator(config, config.seed),
                        init_params=_init_from(config), hooks=hooks)
  return loop.train(task, config, workdir, writer=writer)
