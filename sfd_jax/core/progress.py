"""Progress reporting without clu or TensorFlow.

* :class:`Progress`: the training-loop hook (clu ``periodic_actions.ReportProgress``'s
  replacement): ``hook(step)`` after every step; every ``every_steps`` steps (or
  ``every_secs`` seconds, and at the last step) it logs steps/s, images/s, % done and ETA
  and writes ``steps_per_sec`` / ``uptime`` scalars to the metric writer, as clu does.

    hook = progress.Progress(total, writer, every_steps=100, batch_size=256, start_step=start)
    for step in range(start + 1, total + 1):
      ...
      hook(step)

* :func:`track`: progress of a long job (sample, eval, encode, extract, export, demo
  stages): a progress bar with ETA when stderr is a terminal (tqdm if installed, else a
  ``\\r`` line), periodic absl log lines otherwise (every 10 % or 30 s, optionally every
  ``every_units`` units, and a final line).
* :class:`Profile`: a JAX profiler trace of a few steps (clu's ``Profile`` without TF).

    for batch in progress.track(batches, "sample", unit="batch"):
      ...
    with progress.track(50_000, "encode", unit="img") as bar:
      bar.update(len(images))

  ``SFD_PROGRESS=bar|log|off`` overrides the terminal detection.
"""
from __future__ import annotations

import contextlib
import collections
import os
import sys
import time
from typing import Any, Iterable

from absl import logging


def format_secs(secs: float) -> str:
  """123456.7 -> "1d10h17m"; 450 -> "7m30s"; 42.3 -> "42s"."""
  secs = float(secs)
  if secs != secs or secs == float("inf"):
    return "?"
  secs = max(0.0, secs)
  days, rest = divmod(int(secs), 86400)
  hours, rest = divmod(rest, 3600)
  mins, s = divmod(rest, 60)
  if days:
    return f"{days}d{hours}h{mins:02d}m"
  if hours:
    return f"{hours}h{mins:02d}m"
  if mins:
    return f"{mins}m{s:02d}s"
  return f"{s}s"


# ------------------------------------------------------------------ training hook


class Progress:
  """Training-progress hook: steps/s, images/s, ETA in the log; ``steps_per_sec`` scalar.

  Args:
    total_steps: the run's last step (for % and ETA; None: rate only).
    writer: optional metric writer (``write_scalars``) for ``steps_per_sec`` and ``uptime``.
    every_steps: report when ``step % every_steps == 0``.
    batch_size: global batch size, for images/s (None: not reported).
    start_step: the step the run starts (or resumes) from.
    every_secs: also report after this many seconds without a report (None: never).

  The first call only sets the time baseline (as clu's hook does), so the first step's
  compilation is not counted in the rate.
  """

  def __init__(self, total_steps: int | None = None, writer=None,
               every_steps: int | None = None, batch_size: int | None = None,
               start_step: int = 0, every_secs: float | None = 60.0):
    self.total_steps = int(total_steps) if total_steps and total_steps > 0 else None
    self.writer = writer
    self.every_steps = int(every_steps) if every_steps else None
    self.batch_size = int(batch_size) if batch_size else None
    self.start_step = int(start_step or 0)
    self.every_secs = every_secs
    self._t0 = time.monotonic()
    self._prev_step: int | None = None
    self._prev_t = 0.0
    self._time_per_part: dict[str, float] = collections.defaultdict(float)
    self.last: dict[str, Any] = {}          # the latest report (steps_per_sec, eta_secs, ...)

  def _due(self, step: int, t: float) -> bool:
    if self.every_steps and step % self.every_steps == 0:
      return True
    if self.total_steps is not None and step >= self.total_steps:
      return True
    return bool(self.every_secs) and t - self._prev_t >= self.every_secs

  def __call__(self, step: int, t: float | None = None) -> bool:
    """Call after every step; True when it reported."""
    t = time.monotonic() if t is None else t
    step = int(step)
    if self._prev_step is None:
      self._prev_step, self._prev_t = step, t
      return False
    if step == self._prev_step or not self._due(step, t):
      return False
    self._report(step, t)
    self._prev_step, self._prev_t = step, t
    return True

  def _report(self, step: int, t: float) -> None:
    steps_per_sec = (step - self._prev_step) / max(t - self._prev_t, 1e-9)
    msg = f"{steps_per_sec:.2f} steps/s"
    info: dict[str, Any] = {"step": step, "steps_per_sec": steps_per_sec}
    if self.batch_size:
      info["images_per_sec"] = steps_per_sec * self.batch_size
      msg += f", {info['images_per_sec']:.1f} images/s"
    if self.total_steps:
      eta = (self.total_steps - step) / max(steps_per_sec, 1e-9)
      info["eta_secs"] = eta
      msg += (f", {100 * step / self.total_steps:.1f}% ({step}/{self.total_steps}), "
              f"ETA: {format_secs(eta)}")
    uptime = time.monotonic() - self._t0
    if self._time_per_part:
      msg += " ({} : {})".format(format_secs(uptime), ", ".join(
          f"{100 * dt / max(uptime, 1e-9):.1f}% {name}"
          for name, dt in sorted(self._time_per_part.items())))
    self.last = info
    logging.info("[%d] progress: %s", step, msg)
    if self.writer is not None:
      self.writer.write_scalars(step, {"steps_per_sec": steps_per_sec, "uptime": uptime})

  @contextlib.contextmanager
  def timed(self, name: str):
    """Wall time spent in a named part (e.g. "eval"), shown as a share of the uptime.

    Block on the part's device work inside the block (``jax.block_until_ready``) for a
    faithful figure; nothing here touches JAX.
    """
    t = time.monotonic()
    try:
      yield
    finally:
      self._time_per_part[name] += time.monotonic() - t


class Profile:
  """Training-loop hook that records a JAX profiler trace of ``num_profile_steps`` steps
  from step ``first_profile`` into ``logdir`` (TensorBoard's profile plugin reads it):
  the TensorFlow-free stand-in for clu's ``periodic_actions.Profile`` (one trace)."""

  def __init__(self, logdir: str, *, num_profile_steps: int = 5, first_profile: int = 10):
    self.logdir = logdir
    self.first = int(first_profile)
    self.num_steps = max(int(num_profile_steps), 1)
    self.active = self.done = False
    self._stop_at = 0

  def __call__(self, step: int) -> None:
    import jax  # pylint: disable=import-outside-toplevel
    if not (self.active or self.done) and step >= self.first:
      self._stop_at = step + self.num_steps
      logging.info("[%d] profiler: tracing steps %d-%d into %s", step, step + 1,
                   self._stop_at, self.logdir)
      jax.profiler.start_trace(self.logdir)
      self.active = True
    elif self.active and step >= self._stop_at:
      jax.profiler.stop_trace()
      self.active, self.done = False, True
      logging.info("[%d] profiler: trace written to %s", step, self.logdir)


# ------------------------------------------------------------------ job tracker


def _isatty(stream) -> bool:
  try:
    return bool(stream.isatty())
  except (AttributeError, ValueError):
    return False


class _LineBar:
  """A ``\\r`` progress line for terminals without tqdm."""

  def __init__(self, stream, desc: str, unit: str, total: int | None):
    self.stream, self.desc, self.unit, self.total = stream, desc, unit, total
    self.postfix = ""
    self._last = 0.0

  def show(self, n: int, elapsed: float, force: bool = False) -> None:
    now = time.monotonic()
    if not force and now - self._last < 0.2:
      return
    self._last = now
    self.stream.write("\r" + _status(self.desc, n, self.total, self.unit, elapsed,
                                      self.postfix) + "\x1b[K")
    self.stream.flush()

  def close(self, n: int, elapsed: float) -> None:
    self.show(n, elapsed, force=True)
    self.stream.write("\n")
    self.stream.flush()


def _status(desc: str, n: int, total: int | None, unit: str, elapsed: float,
            postfix: str = "") -> str:
  rate = n / elapsed if elapsed > 0 else 0.0
  s = f"{desc}: {n}"
  if total:
    s += f"/{total} {unit} ({100 * n / total:.0f}%)"
  else:
    s += f" {unit}"
  s += f", {rate:.3g} {unit}/s, elapsed {format_secs(elapsed)}"
  if total and n < total:
    s += f", ETA {format_secs((total - n) / rate) if rate > 0 else '?'}"
  return s + (f", {postfix}" if postfix else "")


class Tracker:
  """Progress of a long job; see :func:`track`."""

  def __init__(self, iterable: Iterable | None = None, desc: str = "", unit: str = "it", *,
               total: int | None = None, mode: str = "auto", stream=None,
               every_frac: float = 0.1, every_secs: float = 30.0,
               every_units: int | None = None, enabled: bool = True):
    if total is None and iterable is not None and hasattr(iterable, "__len__"):
      total = len(iterable)
    self.iterable, self.desc, self.unit = iterable, desc or "progress", unit
    self.total = int(total) if total else None
    self.every_frac, self.every_secs = every_frac, every_secs
    self.every_units = int(every_units) if every_units else None
    self._next_units = self.every_units
    self.postfix = ""
    self.stream = sys.stderr if stream is None else stream
    if not enabled:
      mode = "off"
    elif mode == "auto":
      mode = os.environ.get("SFD_PROGRESS", "") or ("bar" if _isatty(self.stream) else "log")
    if mode not in ("bar", "log", "off"):
      raise ValueError(f"progress mode {mode!r}: expected auto, bar, log or off")
    self.mode = mode
    self.n = 0
    self._t0 = time.monotonic()
    self._last_log_t = self._t0
    self._next_frac = every_frac
    self._closed = False
    self._tqdm = self._line = None
    if mode == "bar":
      try:
        import tqdm  # pylint: disable=import-outside-toplevel
        self._tqdm = tqdm.tqdm(total=self.total, desc=self.desc, unit=unit, file=self.stream,
                               dynamic_ncols=True)
      except ImportError:
        self._line = _LineBar(self.stream, self.desc, unit, self.total)
    elif mode == "log":
      logging.info("%s: started%s", self.desc,
                   f" ({self.total} {unit})" if self.total else "")

  @property
  def elapsed(self) -> float:
    return time.monotonic() - self._t0

  @property
  def rate(self) -> float:
    """Units per second since the start."""
    return self.n / max(self.elapsed, 1e-9)

  def set_postfix(self, text: str) -> None:
    """Shown after the counts (the bar's postfix, the end of each log line)."""
    self.postfix = str(text)
    if self._tqdm is not None:
      self._tqdm.set_postfix_str(self.postfix, refresh=False)

  def update(self, n: int = 1) -> None:
    """Counts ``n`` more units done."""
    self.n += int(n)
    if self.mode == "off":
      return
    if self._tqdm is not None:
      self._tqdm.update(int(n))
    elif self._line is not None:
      self._line.postfix = self.postfix
      self._line.show(self.n, self.elapsed)
    else:
      now = time.monotonic()
      frac_due = self.total and self.n < self.total and self.n >= self._next_frac * self.total
      units_due = self.every_units and self.n >= self._next_units
      if frac_due or units_due or now - self._last_log_t >= self.every_secs:
        logging.info("%s", _status(self.desc, self.n, self.total, self.unit, self.elapsed,
                                   self.postfix))
        self._last_log_t = now
        if self.total:
          while self._next_frac * self.total <= self.n:
            self._next_frac += self.every_frac
        if self.every_units:
          while self._next_units <= self.n:
            self._next_units += self.every_units

  def close(self) -> None:
    if self._closed:
      return
    self._closed = True
    elapsed = self.elapsed
    if self._tqdm is not None:
      self._tqdm.close()
    elif self._line is not None:
      self._line.close(self.n, elapsed)
    elif self.mode == "log":
      rate = self.n / elapsed if elapsed > 0 else 0.0
      logging.info("%s: done, %d %s in %s (%.3g %s/s)", self.desc, self.n, self.unit,
                   format_secs(elapsed), rate, self.unit)

  def __iter__(self):
    if self.iterable is None:
      raise TypeError("track(total) has no iterable: call update(n) instead")
    try:
      for item in self.iterable:
        yield item
        self.update(1)
    finally:
      self.close()

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.close()


def track(iterable_or_total: Iterable | int | None = None, desc: str = "", unit: str = "it",
          **kwargs) -> Tracker:
  """A :class:`Tracker` over an iterable (iterate it) or a total count (``update(n)``).

  Keyword arguments: ``total`` (for iterables without ``len``), ``mode`` ("auto" | "bar" |
  "log" | "off"), ``stream`` (default stderr), ``every_frac`` (0.1), ``every_secs`` (30),
  ``every_units`` (log mode: also a line every that many units; None: not),
  ``enabled`` (e.g. ``jax.process_index() == 0``).
  """
  if isinstance(iterable_or_total, int) and not isinstance(iterable_or_total, bool):
    return Tracker(None, desc, unit, total=iterable_or_total, **kwargs)
  return Tracker(iterable_or_total, desc, unit, **kwargs)
