"""The SFD training job: ``python main.py --config=configs/sfd_xl.py --workdir=DIR``.

Reads top to bottom: build the mesh and the (sharded) state, resume from the workdir if
a checkpoint exists (else ``init_from`` or a fresh init), build the data iterator at the
restored position, then loop: global batch → jitted step → periodic logging, checkpoint,
preemption check. See ``sfd_jax.train_step`` for the update itself.
"""
from __future__ import annotations

import dataclasses
import os
import signal
import time
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from clu import metric_writers, periodic_actions

from sfd_jax import checkpoint as ckpt_lib
from sfd_jax import optim, parallel
from sfd_jax import train_eval
from sfd_jax import train_step as ts
from sfd_jax.data import global_batch, pipeline
from sfd_jax.diffusion.objective import ObjectiveConfig
from sfd_jax.models.lightning_dit import DiTConfig


NonFiniteLossError = ckpt_lib.NonFiniteLossError


_MODEL_FIELDS = {f.name for f in dataclasses.fields(DiTConfig)}
_OBJ_FIELDS = {f.name for f in dataclasses.fields(ObjectiveConfig)}


def model_config(config: ml_collections.ConfigDict) -> DiTConfig:
  """DiTConfig from ``config.model`` (variant table + overrides)."""
  m = config.model.to_dict()
  variant = m.pop("variant")
  unknown = set(m) - _MODEL_FIELDS
  if unknown:
    raise ValueError(f"config.model has unknown fields {sorted(unknown)}")
  m["attention_impl"] = m.get("attention_impl") or None
  m["delta_t"] = config.objective.delta_t     # the clocks of model and objective agree
  if variant == "custom":
    return DiTConfig(**m)
  return DiTConfig.variant(variant, **m)


def objective_config(config: ml_collections.ConfigDict) -> ObjectiveConfig:
  o = config.objective.to_dict()
  unknown = set(o) - _OBJ_FIELDS
  if unknown:
    raise ValueError(f"config.objective has unknown fields {sorted(unknown)}")
  o["semantic_chans"] = config.model.semantic_chans
  o["use_repa"] = bool(o.get("use_repa", True) and config.model.use_repa)
  return ObjectiveConfig(**o)


def build(config: ml_collections.ConfigDict, devices=None) -> ts.TrainSetup:
  """Mesh, optimizer and sharded train setup from a config (validates divisibility)."""
  mesh = parallel.make_mesh(config.mesh.to_dict(), devices)
  parallel.check_batch(config.batch_size, mesh)
  tx, schedule = optim.make_optimizer(config.optimizer)
  setup = ts.build_setup(model_config(config), objective_config(config), mesh, tx, schedule,
                         rules=[tuple(r) for r in config.sharding_rules],
                         ema_decay=config.ema_decay, seed=config.seed,
                         strict_sharding=config.get("strict_sharding", False))
  for note in setup.sharding_notes:
    logging.warning("sharding: %s", note)
  return setup


def make_data_iterator(config: ml_collections.ConfigDict, seed: int):
  d = config.data
  if not d.path:
    raise ValueError("config.data.path is empty: point it at a dataset directory "
                     "(see docs/data.md)")
  per_process = config.batch_size // jax.process_count()
  return pipeline.build_pipeline(
      d.path, batch_size=per_process, seed=seed, stats=d.stats or None,
      latent_multiplier=d.latent_multiplier, flip=d.flip,
      repa=bool(config.objective.use_repa and config.model.use_repa),
      repa_dtype=d.repa_dtype, num_workers=d.num_workers, read_threads=d.read_threads,
      prefetch_batches=d.prefetch_batches)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) training; returns the last logged metrics."""
  ckpt_lib.makedirs(workdir)
  setup = build(config)
  mesh = setup.mesh
  is_main = jax.process_index() == 0
  logging.info("mesh %s on %d devices (%d processes)", dict(mesh.shape), mesh.size,
               jax.process_count())

  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, "checkpoints"),
                               max_to_keep=config.keep_checkpoints,
                               keep_period=config.keep_period or None)
  data_it = make_data_iterator(config, config.seed)
  resumed = ckpt.resume(setup.abstract_state, data_it)
  if resumed is not None:
    state, start = resumed
  else:
    start = 0
    init_params = None
    if config.init_from:
      from sfd_jax.convert.common import load_params  # pylint: disable=import-outside-toplevel
      init_params, _ = load_params(config.init_from, "lightning_dit")
      logging.info("initialising from converted checkpoint %s", config.init_from)
    state = ts.create_train_state(setup, init_params)
  if is_main:
    rows = parallel.sharding_table(state["params"], min_size=1 << 16)
    logging.info("parameter sharding (arrays >= 64k elements):\n%s",
                 parallel.format_sharding_table(rows))

  writer = metric_writers.create_default_writer(workdir, just_logging=not is_main)
  if start == 0:
    writer.write_hparams(ckpt_lib.hparams(config))
  total = int(config.num_train_steps)
  hooks = [periodic_actions.ReportProgress(num_train_steps=total, writer=writer,
                                           every_steps=config.log_every_steps)]
  if is_main and config.get("profile_steps", 0):
    hooks.append(periodic_actions.Profile(logdir=workdir, num_profile_steps=config.profile_steps,
                                          first_profile=min(start + 10, total)))

  step_fn = ts.make_train_step(setup)
  evaluator = train_eval.PeriodicEvaluator(config, setup, workdir) if train_eval.enabled(
      config) else None
  spec = jax.sharding.PartitionSpec(parallel.BATCH_AXES)
  cfg_dict = config.to_dict()
  last_metrics: dict[str, Any] = {}
  t_log = time.time()
  step = start
  with ckpt_lib.PreemptionGuard() as guard:
    while step < total:
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        batch = global_batch.to_global(next(data_it), mesh, spec)
        state, metrics = step_fn(state, batch)
      step += 1
      for h in hooks:
        h(step)
      if step % config.log_every_steps == 0 or step == total:
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not all(np.isfinite(list(m.values()))):
          ckpt_lib.check_finite(state, step, ckpt)
        dt = time.time() - t_log
        m["images_per_sec"] = config.log_every_steps * config.batch_size / max(dt, 1e-9)
        t_log = time.time()
        writer.write_scalars(step, m)
        last_metrics = m
      if evaluator is not None and train_eval.due(config, step, total):
        t_eval = time.time()
        last_metrics.update({f"train_eval/{k}": v
                             for k, v in evaluator(step, state, writer).items()})
        t_log += time.time() - t_eval            # images/s counts training time only
      if step == config.get("debug_preempt_at_step", -1):
        os.kill(os.getpid(), signal.SIGTERM)     # tests: a real SIGTERM at this step
      preempt = guard.requested or ckpt.reached_preemption(step)
      if step % config.checkpoint_every_steps == 0 or step == total or preempt:
        ckpt_lib.check_finite(state, step, ckpt)
        ckpt.save(step, state, data_it.get_state(), cfg_dict)
      if step == config.get("debug_kill_at_step", -1):
        ckpt.wait()                              # tests: SIGKILL after the last save
        os.kill(os.getpid(), signal.SIGKILL)
      if preempt:
        logging.warning("preempted (%s): saved step %d, exiting", guard.signal_name or "orbax",
                        step)
        break
  ckpt.close()
  writer.flush()
  data_it.close()
  return {"step": step, "metrics": last_metrics, "state": state}

