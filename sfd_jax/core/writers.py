"""Metric writers: one interface for TensorBoard (with or without TensorFlow), logs and W&B.

  writer = writers.create_writer(workdir, is_main=jax.process_index() == 0,
                                 wandb=config.get("wandb"))
  writer.write_hparams({"optimizer.lr": 1e-4, ...})
  writer.write_scalars(step, {"loss": 0.1})
  writer.write_images(step, {"samples": grid_uint8})      # [N, H, W, C] or [H, W, C]
  writer.flush(); writer.close()

``kind`` picks the TensorBoard back end, once, at start-up (the choice is logged):

* ``"auto"`` (default): clu's ``metric_writers.create_default_writer`` (TensorFlow
  summaries + absl log lines) when TensorFlow and clu are importable (the ``tf`` extra),
  else ``"tensorboardx"``. They are looked up with ``importlib.util.find_spec`` and never
  imported otherwise.
* ``"clu"``: clu's default writer; needs the ``tf`` extra (``pip install -e '.[tf]'``).
* ``"tensorboardx"``: TensorBoard event files through tensorboardX (no TensorFlow) plus
  the same absl log lines as clu's ``LoggingWriter``.
* ``"log"``: absl log lines only.

Non-main processes (``is_main=False``) and ``workdir=None`` only log. Both TensorBoard
paths write the same tags into ``workdir``: scalars under their names (TensorFlow stores
them as ``tensors``, tensorboardX as ``scalars``; TensorBoard shows both alike), images
under their names (tensorboardX: one grid image per tag), hparams for the HParams tab.

Weights & Biases (``wandb={"enabled": True, "project": ..., "entity": ..., "name": ...,
"mode": "online" | "offline" | "disabled"}``, e.g. ``config.wandb``) is added on the main
process next to TensorBoard; ``wandb`` is imported only then. The W&B run id is kept in
``<workdir>/wandb_run_id``: a resumed run continues the same W&B run
(``wandb.init(id=..., resume="allow")``; offline runs of one id are merged by
``wandb sync``).
"""
from __future__ import annotations

import abc

import importlib.util
import os
import secrets
import string
from typing import Any, Callable, Iterable, Mapping

from absl import logging
import numpy as np

from sfd_jax.core import optional, trees

KINDS = ("auto", "clu", "tensorboardx", "log")


class Writer(abc.ABC):
  """The metric-writer interface (clu's ``MetricWriter`` subset the project uses);
  every back end implements the three ``write_*`` methods."""

  #: one line naming the back end(s), for the start-up log
  description = "writer"
  #: what create_writer resolved: "clu" | "tensorboardx" | "log"
  kind = "custom"

  @abc.abstractmethod
  def write_scalars(self, step: int, scalars: Mapping[str, Any]) -> None:
    """Implemented by every back end."""

  @abc.abstractmethod
  def write_images(self, step: int, images: Mapping[str, Any]) -> None:
    """Implemented by every back end."""

  @abc.abstractmethod
  def write_hparams(self, hparams: Mapping[str, Any]) -> None:
    """Implemented by every back end."""

  def flush(self) -> None:  # noqa: B027  (optional: back ends without a buffer keep it)
    pass

  def close(self) -> None:
    self.flush()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


# ------------------------------------------------------------------------- helpers


def _scalar(v) -> float | int:
  """A Python number from a float / int / 0-d (device) array."""
  if isinstance(v, (bool, int, float)):
    return v
  a = np.asarray(v)
  if a.size != 1:
    raise ValueError(f"scalar expected, got an array of shape {a.shape}")
  return a.reshape(()).item()


def to_uint8_images(value) -> np.ndarray:
  """``[N, H, W, C]`` uint8 from uint8 / float-in-[0, 1] ``[N,H,W,C]``, ``[H,W,C]``, ``[H,W]``."""
  a = np.asarray(value)
  if a.ndim == 2:
    a = a[:, :, None]
  if a.ndim == 3:
    a = a[None]
  if a.ndim != 4 or a.shape[-1] not in (1, 3, 4):
    raise ValueError(f"images must be [N, H, W, C] or [H, W, C] with C in 1/3/4, got "
                     f"{np.asarray(value).shape}")
  if a.dtype != np.uint8:
    if np.issubdtype(a.dtype, np.floating):
      a = np.round(np.clip(a, 0.0, 1.0) * 255.0)
    a = np.clip(a, 0, 255).astype(np.uint8)
  return a


def flat_hparams(hparams: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """``{"a.b": v}`` with bool / int / float / str values (others as ``str``; None dropped)."""
  out: dict[str, Any] = {}
  tree = hparams.to_dict() if hasattr(hparams, "to_dict") else hparams
  for key, v in trees.flatten(tree, ".").items():
    key = prefix + key
    if v is None or isinstance(v, Mapping):
      continue
    elif isinstance(v, (bool, int, float, str)):
      out[key] = v
    elif isinstance(v, np.generic):
      out[key] = v.item()
    else:
      out[key] = str(v)
  return out


def _cfg_get(cfg, key, default=None):
  if cfg is None:
    return default
  if hasattr(cfg, "get"):                     # dict, ConfigDict
    return cfg.get(key, default)
  return getattr(cfg, key, default)


def tensorflow_available() -> bool:
  """True when TensorFlow and clu can be imported (looked up, not imported): clu's writers
  are usable (both come with the 'tf' extra)."""
  try:
    return all(importlib.util.find_spec(m) is not None for m in ("tensorflow", "clu"))
  except (ImportError, ValueError):
    return False


def tensorboardx_available() -> bool:
  try:
    return importlib.util.find_spec("tensorboardX") is not None
  except (ImportError, ValueError):
    return False


# ------------------------------------------------------------------------- writers


class LoggingWriter(Writer):
  """absl INFO lines, in the format of clu's ``LoggingWriter``."""

  description = "absl log"

  def write_scalars(self, step, scalars):
    values = []
    for k, v in sorted(scalars.items()):
      v = _scalar(v)
      values.append(f"{k}={v:.6g}" if isinstance(v, float) else f"{k}={v}")
    logging.info("[%d] %s", step, ", ".join(values))

  def write_images(self, step, images):
    logging.info("[%d] Got images: %s.", step,
                 {k: tuple(np.shape(v)) for k, v in images.items()})

  def write_hparams(self, hparams):
    logging.info("[Hyperparameters] %s", dict(hparams))

  def flush(self):
    logging.flush()


class TensorBoardXWriter(Writer):
  """TensorBoard event files in ``logdir`` through tensorboardX (no TensorFlow needed)."""

  def __init__(self, logdir: str, *, flush_secs: int = 30):
    try:
      from tensorboardX import SummaryWriter  # pylint: disable=import-outside-toplevel
    except ImportError as e:
      raise ImportError("the TensorFlow-free TensorBoard writer needs tensorboardX "
                        "(pip install tensorboardX)") from e
    self.logdir = os.fspath(logdir)
    self._tb = SummaryWriter(logdir=self.logdir, flush_secs=flush_secs)
    self.description = f"tensorboardX event files in {self.logdir}"

  def write_scalars(self, step, scalars):
    for k, v in scalars.items():
      self._tb.add_scalar(k, float(_scalar(v)), global_step=int(step))

  def write_images(self, step, images):
    for k, v in images.items():
      a = to_uint8_images(v)
      if a.shape[0] == 1:
        self._tb.add_image(k, a[0], global_step=int(step), dataformats="HWC")
      else:                                   # one grid image, as tensorboardX does
        self._tb.add_images(k, a, global_step=int(step), dataformats="NHWC")

  def write_hparams(self, hparams):
    from tensorboardX.summary import hparams as hparams_summary  # pylint: disable=import-outside-toplevel
    exp, ssi, sei = hparams_summary(flat_hparams(hparams), {})
    fw = self._tb._get_file_writer()  # pylint: disable=protected-access
    for s in (exp, ssi, sei):           # into logdir itself, as clu's writer does
      fw.add_summary(s)

  def flush(self):
    self._tb.flush()

  def close(self):
    self._tb.close()


class CluWriter(Writer):
  """clu's ``metric_writers.create_default_writer`` (TensorFlow summaries + log lines)."""

  def __init__(self, logdir: str | None, *, just_logging: bool = False,
               asynchronous: bool = True):
    metric_writers = optional.require(
        "clu.metric_writers", extra="tf", purpose="the clu metric writer (config.writer='clu')",
        alternative="or set --config.writer=tensorboardx")
    self._w = metric_writers.create_default_writer(logdir, just_logging=just_logging,
                                                   asynchronous=asynchronous)
    self.logdir = None if just_logging or logdir is None else os.fspath(logdir)
    self.description = ("clu log writer" if self.logdir is None else
                        f"clu (TensorFlow summaries) in {self.logdir}")

  def write_scalars(self, step, scalars):
    self._w.write_scalars(int(step), {k: _scalar(v) for k, v in scalars.items()})

  def write_images(self, step, images):
    self._w.write_images(int(step), {k: to_uint8_images(v) for k, v in images.items()})

  def write_hparams(self, hparams):
    self._w.write_hparams(flat_hparams(hparams))

  def flush(self):
    self._w.flush()

  def close(self):
    self._w.close()


WANDB_ID_FILE = "wandb_run_id"


def new_wandb_id() -> str:
  """A fresh W&B run id: 8 characters of [a-z0-9], as W&B makes them."""
  alphabet = string.ascii_lowercase + string.digits
  return "".join(secrets.choice(alphabet) for _ in range(8))


def wandb_run_id(directory: str | None, new_id: Callable[[], str] = new_wandb_id) -> str | None:
  """The W&B run id kept in ``directory`` (the workdir); on the first start ``new_id()``,
  written there. None without a directory (every start is then a new W&B run)."""
  if not directory:
    return None
  path = os.path.join(directory, WANDB_ID_FILE)
  if os.path.exists(path):
    with open(path, encoding="utf-8") as f:
      run_id = f.read().strip()
    if run_id:
      return run_id
  run_id = str(new_id())
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    f.write(run_id + "\n")
  os.replace(tmp, path)
  return run_id


class WandbWriter(Writer):
  """Weights & Biases run: scalars and images with ``wandb.log``, hparams as run config.

  With a ``directory`` (the workdir) the run id is kept in ``<directory>/wandb_run_id``
  and every later start in that directory resumes the same W&B run."""

  def __init__(self, *, project: str | None = None, entity: str | None = None,
               name: str | None = None, mode: str | None = None,
               directory: str | None = None):
    wandb = optional.require("wandb", extra="wandb", purpose="config.wandb.enabled=True",
                             alternative="or set --config.wandb.enabled=False")
    self._wandb = wandb
    if directory:
      os.makedirs(directory, exist_ok=True)
    self.run_id = wandb_run_id(directory)
    kw = {k: v for k, v in dict(project=project, entity=entity, name=name, mode=mode,
                                dir=directory, id=self.run_id).items() if v}
    if self.run_id:
      kw["resume"] = "allow"
    self._run = wandb.init(**kw)
    self.description = (f"wandb (project={project or '-'}, mode={mode or 'online'}, "
                        f"run {self._run.id})")

  def write_scalars(self, step, scalars):
    self._run.log({k: _scalar(v) for k, v in scalars.items()}, step=int(step))

  def write_images(self, step, images):
    logged = {}
    for k, v in images.items():
      a = to_uint8_images(v)
      if a.shape[-1] == 1:
        a = a[..., 0]
      imgs = [self._wandb.Image(x) for x in a]
      logged[k] = imgs[0] if len(imgs) == 1 else imgs
    self._run.log(logged, step=int(step))

  def write_hparams(self, hparams):
    self._run.config.update(flat_hparams(hparams), allow_val_change=True)

  def close(self):
    self._run.finish()


class MultiWriter(Writer):
  """Writes to every writer in turn."""

  def __init__(self, writers: Iterable[Writer]):
    self.writers = list(writers)
    self.description = " + ".join(w.description for w in self.writers) or "no writer"

  def write_scalars(self, step, scalars):
    for w in self.writers:
      w.write_scalars(step, scalars)

  def write_images(self, step, images):
    for w in self.writers:
      w.write_images(step, images)

  def write_hparams(self, hparams):
    for w in self.writers:
      w.write_hparams(hparams)

  def flush(self):
    for w in self.writers:
      w.flush()

  def close(self):
    for w in self.writers:
      w.close()


# ------------------------------------------------------------------------- factory


def resolve_kind(kind: str = "auto") -> tuple[str, str]:
  """(kind, reason): the TensorBoard back end ``kind`` stands for on this install."""
  if kind not in KINDS:
    raise ValueError(f"writer kind {kind!r}: expected one of {KINDS}")
  if kind != "auto":
    return kind, "requested"
  if tensorflow_available():
    return "clu", "TensorFlow and clu are installed"
  if tensorboardx_available():
    return "tensorboardx", "TensorFlow is not installed"
  return "log", "neither TensorFlow nor tensorboardX is installed"


def create_writer(workdir: str | None, *, is_main: bool = True, kind: str = "auto",
                  wandb: Any = None, asynchronous: bool = True) -> Writer:
  """The run's metric writer (see the module docstring); logs which one it picked.

  Args:
    workdir: directory for the TensorBoard event files (None: log lines only).
    is_main: False on non-main processes: they only log.
    kind: "auto" | "clu" | "tensorboardx" | "log".
    wandb: optional W&B settings (dict or ConfigDict): enabled, project, entity, name, mode.
    asynchronous: clu path only: clu's ``AsyncMultiWriter`` (writes in a thread).
  """
  resolved, reason = resolve_kind(kind)
  if not is_main or workdir is None:
    resolved, reason = "log", ("not the main process" if not is_main else "no workdir")
  if resolved == "clu":
    writers: list[Writer] = [CluWriter(workdir, asynchronous=asynchronous)]
  elif resolved == "tensorboardx":
    writers = [LoggingWriter(), TensorBoardXWriter(workdir)]
  else:
    if reason.startswith("neither"):
      logging.warning("no TensorBoard writer: pip install tensorboardX")
    writers = [LoggingWriter()]
  if is_main and _cfg_get(wandb, "enabled", False):
    writers.append(WandbWriter(project=_cfg_get(wandb, "project"),
                               entity=_cfg_get(wandb, "entity"),
                               name=_cfg_get(wandb, "name"), mode=_cfg_get(wandb, "mode"),
                               directory=None if workdir is None or "://" in str(workdir)
                               else os.fspath(workdir)))
  writer = writers[0] if len(writers) == 1 else MultiWriter(writers)
  writer.kind = resolved
  logging.info("metric writer: %s (%s: %s)", writer.description, resolved, reason)
  return writer
