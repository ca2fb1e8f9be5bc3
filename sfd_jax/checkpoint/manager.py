"""Orbax checkpoints of a training run: composite items, async saves, preemption.

A checkpoint at step ``s`` is ``<workdir>/checkpoints/<s>/`` with three items:

* ``state``: the sharded train state (params, EMA, optimizer, step) — restored straight
  into the abstract, sharded target, so nothing is gathered on one device;
* ``data``: the data iterator's state (JSON), so a resumed run sees the same batches;
* ``config``: the run's config (JSON), for provenance and for ``--mode=export``.

Saves are asynchronous; Orbax writes into a temporary directory and renames it when the
save is complete, so a process killed mid-save (even SIGKILL) leaves the previous
checkpoint intact and the partial one invisible. ``PreemptionGuard`` turns SIGTERM (and
Orbax's multi-host preemption notice) into a clean "save and exit" at the next step.
"""
from __future__ import annotations

import json
import signal
import threading
from typing import Any

import orbax.checkpoint as ocp
from absl import logging

from sfd_jax.core import paths

ITEMS = ("state", "data", "config")


class CheckpointError(RuntimeError):
  pass


class Checkpointer:
  """Thin wrapper over ``ocp.CheckpointManager`` for the train state composite."""

  def __init__(self, directory: str, *, max_to_keep: int | None = 3,
               keep_period: int | None = None, async_save: bool = True):
    self.directory = paths.abspath(directory)
    options = ocp.CheckpointManagerOptions(
        max_to_keep=max_to_keep, keep_period=keep_period,
        enable_async_checkpointing=async_save, create=True,
        cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(self.directory, options=options, item_names=ITEMS)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: Any, data_state: dict | None, config: dict,
           force: bool = True) -> bool:
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state or {}),
        config=ocp.args.JsonSave(_jsonable(config)))
    return self.manager.save(step, args=args, force=force)

  def restore(self, step: int | None, abstract_state: Any) -> tuple[Any, dict, dict]:
    """Restores (state, data_state, config) at ``step`` (default: latest)."""
    step = self.latest_step() if step is None else step
    if step is None:
      raise CheckpointError(f"no checkpoint in {self.directory}")
    try:
      out = self.manager.restore(step, args=ocp.args.Composite(
          state=ocp.args.StandardRestore(abstract_state),
          data=ocp.args.JsonRestore(), config=ocp.args.JsonRestore()))
    except (ValueError, KeyError, TypeError) as e:
      raise CheckpointError(
          f"checkpoint {self.directory}/{step} does not match this run's model/optimizer "
          f"(was it written with another config?): {e}") from e
    return out["state"], dict(out["data"] or {}), dict(out["config"] or {})

  def resume(self, abstract_state: Any, data_it, what: str = "") -> tuple[Any, int] | None:
    """(state, step) of the latest checkpoint, with ``data_it`` moved to its saved
    position; None when there is no checkpoint yet (a fresh run)."""
    step = self.latest_step()
    if step is None:
      return None
    logging.info("%sresuming from %s/%d", f"{what}: " if what else "", self.directory, step)
    state, data_state, _ = self.restore(step, abstract_state)
    if data_state:
      data_it.set_state(data_state)
    return state, step

  def reached_preemption(self, step: int) -> bool:
    try:
      return bool(self.manager.reached_preemption(step))
    except Exception:  # pylint: disable=broad-except
      return False

  def wait(self) -> None:
    self.manager.wait_until_finished()

  def close(self) -> None:
    self.manager.wait_until_finished()
    self.manager.close()


def _jsonable(cfg: Any) -> Any:
  if hasattr(cfg, "to_dict"):
    cfg = cfg.to_dict()
  return json.loads(json.dumps(cfg, default=str))


class PreemptionGuard:
  """Sets ``requested`` on SIGTERM (or SIGINT when ``catch_sigint``); restores the
  previous handlers on exit. Works only in the main thread (elsewhere it is inert)."""

  def __init__(self, catch_sigint: bool = False):
    self.requested = False
    self.signal_name: str | None = None
    self._sigs = [signal.SIGTERM] + ([signal.SIGINT] if catch_sigint else [])
    self._old: dict[int, Any] = {}

  def _handler(self, signum, frame):  # pylint: disable=unused-argument
    self.requested = True
    self.signal_name = signal.Signals(signum).name
    logging.warning("received %s: will save a checkpoint and exit after this step",
                    self.signal_name)

  def __enter__(self):
    if threading.current_thread() is threading.main_thread():
      for s in self._sigs:
        self._old[s] = signal.signal(s, self._handler)
    return self

  def __exit__(self, *exc):
    for s, h in self._old.items():
      signal.signal(s, h)
    return False
