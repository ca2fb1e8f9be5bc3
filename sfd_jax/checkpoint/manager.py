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

``Checkpointer.resume`` takes the newest checkpoint that restores: one that cannot be read
(truncated or missing files, unreadable metadata) is reported by step and reason and moved
to ``<directory>.corrupt/<step>`` — never deleted, and out of Orbax's reach, so a later
save of the same step cannot collide with it or garbage-collect it. Errors are
``core.errors`` user errors (``CheckpointError``; ``ResourceError`` for a full disk or a
permission problem), printed as one line by the entry points.
"""
from __future__ import annotations

import json
import logging as std_logging
import re
import signal
import threading
from typing import Any, Callable

import jax
import orbax.checkpoint as ocp
from absl import logging
from etils import epath
from jax.experimental import multihost_utils

from sfd_jax.core import errors, paths
from sfd_jax.core.errors import CheckpointError

ITEMS = ("state", "data", "config")


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
    if step not in self.all_steps() and self._step_dir(step).exists():
      # a directory Orbax does not list (an unfinished copy, a checkpoint that was set
      # aside elsewhere): never overwrite it
      moved = self.set_aside(step, "the directory existed but was not a listed checkpoint "
                             "when this step was saved again")
      logging.warning("%s/%d existed but was not a restorable checkpoint; moved it to %s",
                      self.directory, step, moved)
    args = ocp.args.Composite(
        state=ocp.args.StandardSave(state),
        data=ocp.args.JsonSave(data_state or {}),
        config=ocp.args.JsonSave(_jsonable(config)))
    return self.manager.save(step, args=args, force=force)

  def read_config(self, step: int) -> dict:
    """The ``config`` item of ``step`` ({} for checkpoints written without one)."""
    return saved_config(self.manager, self.directory, step)

  def _attempt(self, step: int, fn):
    """``fn()`` for one checkpoint: (result, None), or (None, reason) when it fails for
    a reason other than the file system's (those raise a ResourceError)."""
    asyncio_log = std_logging.getLogger("asyncio")
    level = asyncio_log.level
    asyncio_log.setLevel(std_logging.CRITICAL)   # tensorstore's failed futures are noise here
    try:
      return fn(), None
    except errors.UserError:
      raise
    except Exception as e:  # pylint: disable=broad-except
      err = errors.as_resource_error(e, where=f"{self.directory}/{step}")
      if err is not None:
        raise err from e
      why = errors.reason(e, limit=200)
      array = re.findall(r"'path': '([^'/][^']*?)/?'", str(e))
      return None, (f"array {array[-1]}: {why}" if array else why)
    finally:
      asyncio_log.setLevel(level)

  def resume(self, abstract_state: Any, data_it, what: str = "",
             check_config: Callable[[dict, int], None] | None = None
             ) -> tuple[Any, int] | None:
    """(state, step) of the newest checkpoint that restores, with ``data_it`` moved to its
    saved position; None when there is no checkpoint yet (a fresh run).

    ``check_config(saved_config, step)`` runs before a checkpoint's state is read (it
    raises to refuse the resume). A newest checkpoint that cannot be read (truncated or
    missing files, unreadable metadata) is reported with its step and reason and moved
    aside into ``<directory>.corrupt/<step>`` (never deleted), and the next older one is
    tried. When none restores, a ``CheckpointError`` names every step and reason and
    nothing is moved.
    """
    steps = sorted(self.all_steps(), reverse=True)
    if not steps:
      return None
    prefix = f"{what}: " if what else ""
    failed: list[tuple[int, str]] = []
    for step in steps:
      saved, why = self._attempt(step, lambda s=step: self.read_config(s))
      if why is not None:
        failed.append((step, f"its saved config cannot be read ({why})"))
        continue
      if check_config is not None:
        check_config(saved, step)
      missing = [f for f in ("state", "state/_METADATA")
                 if not (self._step_dir(step) / f).exists()]
      if missing:
        failed.append((step, f"{self._step_dir(step) / missing[0]} is missing"))
        continue
      restored, why = self._attempt(step, lambda s=step: self.manager.restore(
          s, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract_state),
                                     data=ocp.args.JsonRestore())))
      if why is not None:
        failed.append((step, why))
        continue
      for bad, reason in failed:
        moved = self.set_aside(bad, reason)
        logging.warning("%scheckpoint %s/%d cannot be restored (%s); moved it to %s (kept, "
                        "not deleted) and resuming from step %d instead", prefix,
                        self.directory, bad, reason, moved, step)
      logging.info("%sresuming from %s/%d", prefix, self.directory, step)
      data_state = dict(restored["data"] or {})
      if data_state:
        try:
          data_it.set_state(data_state)
        except (ValueError, KeyError, TypeError) as e:
          raise errors.ConfigError(
              f"{self.directory}/{step}: the saved data position does not fit this run's "
              f"data pipeline ({e}); resume with the settings it was saved with, or use a "
              "new --workdir") from e
      return restored["state"], step
    detail = "; ".join(f"step {s}: {r}" for s, r in failed)
    raise CheckpointError(
        f"none of the {len(failed)} checkpoint(s) in {self.directory} can be restored "
        f"({detail}); they were left as they are. Move them out of the way (or use another "
        "--workdir) to start afresh")

  def _step_dir(self, step: int):
    return epath.Path(self.directory) / str(step)

  def set_aside(self, step: int, reason: str) -> str:
    """Moves ``<directory>/<step>`` to ``<directory>.corrupt/<step>[.N]`` (with a
    ``.reason.txt`` beside it) so that Orbax never lists, deletes or overwrites it.
    Returns the new path. Multi-process: process 0 moves, everyone waits for it."""
    src = self._step_dir(step)
    root = epath.Path(f"{self.directory}.corrupt")
    dst = root / str(step)
    n = 0
    while dst.exists():
      n += 1
      dst = root / f"{step}.{n}"
    if jax.process_index() == 0:
      try:
        root.mkdir(parents=True, exist_ok=True)
        src.rename(dst)
        (root / f"{dst.name}.reason.txt").write_text(reason + "\n")
      except Exception as e:  # pylint: disable=broad-except
        err = errors.as_resource_error(e, where=str(src))
        msg = (f"checkpoint {src} cannot be used ({reason}) and could not be moved aside to "
               f"{dst} ({errors.reason(e)}); move it away yourself and rerun")
        raise (errors.ResourceError(msg) if err is not None else CheckpointError(msg)) from e
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"sfd_jax_set_aside_{step}")
    self.manager.reload()
    return str(dst)

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


def saved_config(manager: ocp.CheckpointManager, directory: str, step: int) -> dict:
  """The ``config`` item of checkpoint ``step`` ({} for a checkpoint saved without one)."""
  if not (epath.Path(paths.abspath(directory)) / str(step) / "config").is_dir():
    return {}
  config = manager.restore(step, args=ocp.args.Composite(config=ocp.args.JsonRestore()))
  config = config["config"]
  if config is not None and not isinstance(config, dict):
    raise ValueError(f"the saved config is a {type(config).__name__}, not a JSON object")
  return dict(config or {})


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
