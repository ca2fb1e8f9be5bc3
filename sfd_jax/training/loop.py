"""The one training loop of every trainer (the SFD DiT, the two autoencoders, the demo's
feature net).

``train(task, workdir)`` reads top to bottom:

1. the trainer's ``TrainTask`` gives the setup (mesh, sharded abstract state), the
   jitted step, the data iterator and the periodic hooks;
2. ordered resume, written once: the workdir's latest checkpoint (state *and* data
   iterator position), else ``init_from`` (a converted checkpoint), else a fresh init.
   The checkpoint's saved config is compared with the current one first: a change of a
   field that changes what the saved state means (``TrainTask.protected``: model,
   objective, loss, optimizer structure, batch, seed, data normalisation) is refused,
   naming the fields, unless ``config.allow_config_change`` lists them (or is "all");
   other changes (steps, logging, evaluation cadence, ...) are logged. A newest
   checkpoint that cannot be read is moved aside and the next older one is used
   (``Checkpointer.resume``);
3. the loop: global batch → jitted step → progress hooks → logging (a NaN/Inf metric
   stops the run before anything is saved) → periodic hooks (evaluation) → checkpoint
   every ``checkpoint_every_steps``, at the end and on preemption (SIGTERM or Orbax's
   notice: save, then exit cleanly).
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import time
from typing import Any, Callable, Iterator, Mapping

import jax
import numpy as np
from absl import logging
from jax.sharding import PartitionSpec as P

from sfd_jax import parallel
from sfd_jax.checkpoint import Checkpointer, PreemptionGuard
from sfd_jax.core import errors, options, trees
from sfd_jax.core import progress as progress_lib
from sfd_jax.core import writers as writers_lib
from sfd_jax.data import global_batch
from sfd_jax.training.state import TrainSetup, create_train_state


class NonFiniteLossError(errors.UserError, RuntimeError):
  """Loss or gradient became NaN/Inf; the last good checkpoint is kept as it was."""
  kind = "training diverged"


# Config fields (and sections) whose change on resume changes what the saved state means.
PROTECTED = ("model", "objective", "schedule", "loss", "optimizer.name", "optimizer.schedule",
             "optimizer.grad_clip", "batch_size", "seed", "data.stats",
             "data.latent_multiplier", "data.flip", "data.image_size")
# ... except these, which change how the same state is computed, not what it is.
COMPUTE_ONLY = ("model.dtype", "model.param_dtype", "model.remat_policy", "model.scan_blocks",
                "model.attention_impl")
_ALLOW_ALL = ("all", "*", "true", "1", "yes")


def _matches(field: str, prefixes) -> bool:
  return any(field == p or field.startswith(p + ".") for p in prefixes)


def config_changes(saved: Mapping[str, Any], current: Mapping[str, Any]
                   ) -> dict[str, tuple[Any, Any]]:
  """``{field: (saved, current)}`` of the fields that differ (``...`` marks a missing one)."""
  a, b = (trees.flatten(json.loads(json.dumps(c, default=str)), ".")
          for c in (saved, current))
  return {k: (a.get(k, ...), b.get(k, ...)) for k in sorted(set(a) | set(b))
          if a.get(k, ...) != b.get(k, ...)}


def allowed_changes(config) -> tuple[str, ...] | None:
  """``config.allow_config_change`` as field prefixes; None = everything allowed."""
  value = config.get("allow_config_change", "") if hasattr(config, "get") else ""
  if isinstance(value, bool):
    return None if value else ()
  text = str(value or "").strip()
  if text.lower() in _ALLOW_ALL:
    return None
  return tuple(f.strip().removeprefix("config.") for f in text.split(",") if f.strip())


def check_resume_config(saved: Mapping[str, Any], config, *, step: int, where: str,
                        protected=PROTECTED, name: str = "") -> None:
  """Refuses a resume whose config changes a protected field (``ConfigError`` listing
  them, with the saved and the current values); logs every other change."""
  prefix = f"{name}: " if name else ""
  if not saved:
    logging.warning("%s%s/%d has no saved config: the config cannot be compared",
                    prefix, where, step)
    return
  current = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  changes = config_changes(saved, current)
  allow = allowed_changes(config)
  refused, allowed, benign = {}, {}, {}
  for field, (old, new) in changes.items():
    if old is ... or new is ...:   # a field one of the configs does not have
      benign[field] = (old, new)
    elif _matches(field, protected) and not _matches(field, COMPUTE_ONLY):
      if allow is None or _matches(field, allow):
        allowed[field] = (old, new)
      else:
        refused[field] = (old, new)
    else:
      benign[field] = (old, new)

  def show(d):
    return ", ".join(f"{k}: {'(none)' if o is ... else repr(o)} -> "
                     f"{'(none)' if n is ... else repr(n)}" for k, (o, n) in d.items())
  if refused:
    raise errors.ConfigError(
        f"cannot resume {where}/{step}: the config changes what the saved state means "
        f"({show(refused)}; saved -> now). Rerun with the saved values, train in a new "
        f"--workdir, or pass --config.allow_config_change={','.join(refused)} to continue "
        "anyway")
  if allowed:
    logging.warning("%sresuming %s/%d with changed fields (allowed by "
                    "config.allow_config_change): %s", prefix, where, step, show(allowed))
  if benign:
    logging.info("%sconfig changes since %s/%d: %s", prefix, where, step, show(benign))


def validate_config(config) -> None:
  """Every field of ``config`` against its declaration (``core.options``: types, ranges,
  no undeclared field), checked before anything is built; ``ConfigError`` names the
  field."""
  options.check(config)


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
        "(untouched). Lower the learning rate (config.optimizer.lr), enable "
        "config.optimizer.grad_clip, or check the data (labels < config.model.num_classes, "
        "finite latents and statistics)")


def hparams(config) -> dict:
  """Flat ``{"a.b": value}`` of a config's scalar fields (for ``write_hparams``)."""
  flat = trees.flatten(config.to_dict() if hasattr(config, "to_dict") else config, ".")
  return {k: v for k, v in flat.items() if isinstance(v, (int, float, str, bool))}


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
  protected: tuple[str, ...] = PROTECTED     # config fields a resume may not change


def default_writer(config, workdir: str, is_main: bool):
  """The run's metric writer: ``config.writer`` ("auto": clu's TensorBoard writer when
  TensorFlow is installed, else tensorboardX; "clu" | "tensorboardx" | "log"), plus
  Weights & Biases when ``config.wandb.enabled``."""
  return writers_lib.create_writer(workdir, is_main=is_main,
                                   kind=str(config.get("writer", "auto") or "auto"),
                                   wandb=config.get("wandb"))


def resume_or_init(task: TrainTask, ckpt: Checkpointer, data_it, config) -> tuple[Any, int]:
  """(state, start step): the newest checkpoint that restores (its saved config checked
  against ``config``), else ``init_from``, else fresh."""
  def check(saved, step):
    check_resume_config(saved, config, step=step, where=ckpt.directory,
                        protected=task.protected, name=task.name)
  resumed = ckpt.resume(task.setup.abstract_state, data_it, task.name, check_config=check)
  if resumed is not None:
    return resumed
  given = task.init_params() if task.init_params is not None else None
  return create_train_state(task.setup, given), 0


def train(task: TrainTask, config, workdir: str, *, writer=None) -> dict[str, Any]:
  """Runs (or resumes) ``task`` in ``workdir``; returns ``{"step", "metrics", "state"}``.

  ``writer``: a metric writer (``write_scalars``, ``write_images``, ``write_hparams``,
  ``flush``); default: ``default_writer`` plus a progress hook (steps/s, images/s, ETA).
  """
  validate_config(config)
  errors.check_writable(workdir, "the workdir")
  mesh = task.setup.mesh
  is_main = jax.process_index() == 0
  total, every = int(config.num_train_steps), int(config.log_every_steps)
  batch_size = int(config.batch_size)
  ckpt_dir = os.path.join(workdir, "checkpoints")
  try:
    ckpt = Checkpointer(ckpt_dir, max_to_keep=config.keep_checkpoints,
                        keep_period=config.keep_period or None)
  except Exception as e:  # pylint: disable=broad-except
    err = errors.as_resource_error(e, where=ckpt_dir)
    if err is None:
      raise
    raise err from e
  data_it = task.make_data()
  try:
    return _train(task, config, workdir, writer, ckpt, data_it, mesh, is_main, total, every,
                  batch_size)
  except BaseException as e:
    # Settle the background work (async checkpoint saves, data workers) before the error
    # leaves: a save in flight completes, nothing half-written is left behind, and no
    # thread prints after the error has been reported.
    _shutdown_quietly(ckpt, data_it)
    err = errors.as_resource_error(e, where=workdir, keeps=_kept(ckpt))
    if err is not None and not isinstance(e, errors.UserError):
      raise err from e
    raise


def _kept(ckpt: Checkpointer) -> str:
  """What survives an error: the finished checkpoints (as the file system lists them)."""
  from etils import epath  # pylint: disable=import-outside-toplevel
  try:
    steps = [int(p.name) for p in epath.Path(ckpt.directory).iterdir() if p.name.isdigit()]
  except Exception:  # pylint: disable=broad-except
    return ""
  if not steps:
    return "no checkpoint was written yet"
  return (f"the checkpoints up to step {max(steps)} in {ckpt.directory} are intact; the "
          "rerun resumes from there")


def _shutdown_quietly(ckpt: Checkpointer, data_it) -> None:
  for fn in (ckpt.close, getattr(data_it, "close", None)):
    if fn is None:
      continue
    try:
      fn()
    except Exception as e:  # pylint: disable=broad-except
      logging.info("while stopping after an error: %s", errors.reason(e))


def _train(task: TrainTask, config, workdir: str, writer, ckpt: Checkpointer, data_it, mesh,
           is_main: bool, total: int, every: int, batch_size: int) -> dict[str, Any]:
  state, start = resume_or_init(task, ckpt, data_it, config)
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
  writer.write_hparams(hparams(config))        # on every start: a resume logs them too
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
      preempt = guard.requested or ckpt.reached_preemption(step)
      if step % config.checkpoint_every_steps == 0 or step == total or preempt:
        check_finite(state, step, ckpt)
        ckpt.save(step, state, data_it.get_state(), cfg_dict)
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
