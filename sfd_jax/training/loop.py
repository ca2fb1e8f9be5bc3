"""The one training loop (every trainer: the SFD DiT, the Semantic VAE, the texture VAE).

``train(task, workdir)`` reads top to bottom:

1. the trainer's ``TrainTask`` gives the setup (mesh, sharded abstract state), the
   jitted step, the data iterator and the periodic hooks;
2. ordered resume, written once: the workdir's latest checkpoint (state *and* data
   iterator position), else ``init_from`` (a converted checkpoint), else a fresh init;
3. the loop: global batch → jitted step → progress hooks → logging (a NaN/Inf metric
   stops the run before anything is saved) → periodic hooks (evaluation) → checkpoint
   every ``checkpoint_every_steps``, at the end and on preemption (SIGTERM or Orbax's
   notice: save, then exit cleanly).
"""
from __future__ import annotations

import dataclasses
import math
import os
import signal
import time
from typing import Any, Callable, Iterator

import jax
import numpy as np
from absl import logging
from jax.sharding import PartitionSpec as P

from sfd_jax import parallel
from sfd_jax.checkpoint import Checkpointer, PreemptionGuard
from sfd_jax.core import paths
from sfd_jax.core import progress as progress_lib
from sfd_jax.core import writers as writers_lib
from sfd_jax.data import global_batch
from sfd_jax.training.state import TrainSetup, create_train_state


class NonFiniteLossError(RuntimeError):
  """Loss or gradient became NaN/Inf; the last good checkpoint is kept as it was."""


def check_finite(state, step: int, ckpt: Checkpointer) -> None:
  """Raises NonFiniteLossError if ``state["nonfinite"]`` counted a NaN/Inf step.

  Called before every save, so a diverged state never overwrites a good checkpoint.
  """
  bad = int(jax.device_get(state["nonfinite"]))
  if bad:
    last = ckpt.latest_step()
    raise NonFiniteLossError(
        f"loss or gradient norm became NaN/Inf in {bad} step(s) before step {step}; "
        f"stopping without saving. Last good checkpoint: "
        f"{'step ' + str(last) if last is not None else 'none'} in {ckpt.directory} "
        "(untouched). Lower the learning rate, enable grad_clip, or check the data.")


def hparams(config) -> dict:
  """Flat ``{"a.b": value}`` of a config's scalar fields (for ``write_hparams``)."""
  def flat(d, prefix=""):
    for k, v in d.items():
      if isinstance(v, dict):
        yield from flat(v, f"{prefix}{k}.")
      elif isinstance(v, (int, float, str, bool)):
        yield f"{prefix}{k}", v
  return dict(flat(config.to_dict() if hasattr(config, "to_dict") else config))


@dataclasses.dataclass
class PeriodicHook:
  """``fn(step, state, writer) -> metrics`` run when ``due(step)``; its time is not
  counted in the training throughput; the metrics join the last logged ones."""
  due: Callable[[int], bool]
  fn: Callable[[int, Any, Any], dict[str, float] | None]


@dataclasses.dataclass
class TrainTask:
  """What a trainer hands the loop."""
  name: str                                  # for log lines ("sfd", "semvae", ...)
  setup: TrainSetup
  step: Callable                             # jitted step(state, batch) -> (state, metrics)
  make_data: Callable[[], Iterator]          # checkpointable iterator (get_state/set_state)
  init_params: Callable[[], Any] | None = None   # init_from: params of the main part
  hooks: list[PeriodicHook] = dataclasses.field(default_factory=list)
  rate_name: str = "images_per_sec"


def default_writer(config, workdir: str, is_main: bool):
  """The run's metric writer: ``config.writer`` ("auto": clu's TensorBoard writer when
  TensorFlow is installed, else tensorboardX; "clu" | "tensorboardx" | "log"), plus
  Weights & Biases when ``config.wandb.enabled``."""
  return writers_lib.create_writer(workdir, is_main=is_main,
                                   kind=str(config.get("writer", "auto") or "auto"),
                                   wandb=config.get("wandb"))


def resume_or_init(task: TrainTask, ckpt: Checkpointer, data_it) -> tuple[Any, int]:
  """(state, start step): the latest checkpoint, else ``init_from``, else fresh."""
  resumed = ckpt.resume(task.setup.abstract_state, data_it, task.name)
  if resumed is not None:
    return resumed
  given = task.init_params() if task.init_params is not None else None
  return create_train_state(task.setup, given), 0


def train(task: TrainTask, config, workdir: str, *, writer=None) -> dict[str, Any]:
  """Runs (or resumes) ``task`` in ``workdir``; returns ``{"step", "metrics", "state"}``.

  ``writer``: a metric writer (``write_scalars``, ``write_images``, ``write_hparams``,
  ``flush``); default: ``default_writer`` plus a progress hook (steps/s, images/s, ETA).
  """
  paths.makedirs(workdir)
  mesh = task.setup.mesh
  is_main = jax.process_index() == 0
  total, every = int(config.num_train_steps), int(config.log_every_steps)
  batch_size = int(config.batch_size)
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"),
                      max_to_keep=config.keep_checkpoints,
                      keep_period=config.keep_period or None)
  data_it = task.make_data()
  state, start = resume_or_init(task, ckpt, data_it)
  logging.info("%s: %s parameters, mesh %s on %d devices (%d processes), global batch %d, "
               "steps %d → %d", task.name,
               f"{sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state['params'])):,}",
               dict(mesh.shape), mesh.size, jax.process_count(), batch_size, start, total)
  if is_main:
    rows = parallel.sharding_table(state["params"], min_size=1 << 16)
    logging.info("parameter sharding (arrays >= 64k elements):\n%s",
                 parallel.format_sharding_table(rows))

  progress: list[Callable[[int], Any]] = []
  own_writer = writer is None
  if own_writer:
    writer = default_writer(config, workdir, is_main)
    progress.append(progress_lib.Progress(total, writer, every_steps=every,
                                          batch_size=batch_size, start_step=start))
  if start == 0:
    writer.write_hparams(hparams(config))
  if is_main and config.get("profile_steps", 0):
    progress.append(progress_lib.Profile(workdir, num_profile_steps=config.profile_steps,
                                         first_profile=min(start + 10, total)))
  spec = P(parallel.BATCH_AXES)
  cfg_dict = config.to_dict()
  last: dict[str, Any] = {}
  t_log, step, logged_step = time.time(), start, start
  with PreemptionGuard() as guard:
    while step < total:
      with jax.profiler.StepTraceAnnotation("train", step_num=step):
        batch = global_batch.to_global(next(data_it), mesh, spec)
        state, metrics = task.step(state, batch)
      step += 1
      for h in progress:
        h(step)
      if step % every == 0 or step == total:
        m = {k: float(v) for k, v in jax.device_get(metrics).items()}
        if not all(math.isfinite(v) for v in m.values()):
          check_finite(state, step, ckpt)
        m[task.rate_name] = ((step - logged_step) * batch_size
                             / max(time.time() - t_log, 1e-9))
        t_log, logged_step = time.time(), step
        writer.write_scalars(step, m)
        last = m
      for hook in task.hooks:
        if hook.due(step):
          t_hook = time.time()
          last.update(hook.fn(step, state, writer) or {})
          t_log += time.time() - t_hook          # throughput counts training time only
      if step == config.get("debug_preempt_at_step", -1):
        os.kill(os.getpid(), signal.SIGTERM)     # tests: a real SIGTERM at this step
      preempt = guard.requested or ckpt.reached_preemption(step)
      if step % config.checkpoint_every_steps == 0 or step == total or preempt:
        check_finite(state, step, ckpt)
        ckpt.save(step, state, data_it.get_state(), cfg_dict)
      if step == config.get("debug_kill_at_step", -1):
        ckpt.wait()                              # tests: SIGKILL after the last save
        os.kill(os.getpid(), signal.SIGKILL)
      if preempt:
        logging.warning("%s: preempted (%s): saved step %d, exiting", task.name,
                        guard.signal_name or "orbax", step)
        break
  ckpt.close()
  writer.flush()
  if own_writer and hasattr(writer, "close"):
    writer.close()
  if hasattr(data_it, "close"):
    data_it.close()
  return {"step": step, "metrics": last, "state": state}
