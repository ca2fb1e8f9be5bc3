"""Clock schedules: named latent parts, each with its own clock t_k(τ) over global time τ.

The composite latent is a concatenation of *parts* along its last (channel) axis, in a
fixed order — SFD's is ``[texture 32 | semantic 16]``. A :class:`Schedule` gives every
part a clock t_k(τ) ∈ [0, 1] (0 = noise, 1 = data) over one global time τ ∈ [0, T],
monotone non-decreasing, with its rate t_k'(τ). The objective, the samplers, guidance and
the model all ask the same object:

* ``training_times(t)``: per-part times of a training draw t ∈ [0, 1] (τ = t·T);
* ``times(τ)`` / ``rates(τ)`` / ``active(τ)``: per-part times, rates and "is moving" at a
  sampling τ (the samplers integrate dx_k/dτ = t_k'(τ)·v_k(x, t(τ), y));
* ``kinks``: the τ where some rate jumps (fixed-grid points, dopri5 jump times);
* ``part_of_channel``: the part index of every channel.

Clock families (``config.schedule.parts.<name>.family``):

* ``offset``: t = clip(τ − start, 0, 1). SFD: semantic start 0, texture start Δt,
  T = 1 + Δt. All starts 0 (T = 1) is synchronous diffusion.
* ``rate``: t = clip(rate·(τ − start), 0, 1) (a part that runs faster or slower).
* ``power``: t = u^power, u the ``rate`` clock (a smooth warp; power ≥ 1 keeps t' finite).
* ``shift``: t = s·u / (1 + (s − 1)·u), u the ``rate`` clock (the timestep-shift warp:
  s > 1 spends longer near the noise end, s < 1 near the data end).
* ``piecewise_linear``: knots ((τ₀, 0), …, (τ_n, 1)) with τ and t non-decreasing.
* ``learned``: a piecewise-linear clock on the window of a ``rate`` clock whose ``bins``
  equal-width pieces have heights softmax(φ) (monotone by construction, t = 0 at the
  window start and 1 at its end for any φ; φ = 0 is the plain ``rate`` clock). φ lives
  in the denoiser as the parameter ``clock_<part>`` and is trained with it
  (``sfd_jax.diffusion.objective``, docs/clocks.md).

SFD's clocks bit for bit: an ``offset``/``rate`` clock skips the clamp that cannot act
inside [0, T] (start = 0: no lower clamp; start + 1/rate ≥ T: no upper clamp), so the
semantic clock is ``min(τ, 1)`` and the texture clock ``max(τ − Δt, 0)`` with the float32
operations of ``clocks``, and the rates are ``phase_mask`` (texture iff τ ≥ Δt, semantic
iff τ ≤ 1); ``clocks``, ``phase_mask`` and ``semantic_channel_mask`` are SFD's two-part
schedule written out.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from sfd_jax.core.errors import ConfigError

SEMANTIC_CHANS = 16
FAMILIES = ("offset", "rate", "power", "shift", "piecewise_linear", "learned")
_FIELDS = {
    "offset": {"start"},
    "rate": {"start", "rate"},
    "power": {"start", "rate", "power"},
    "shift": {"start", "rate", "shift"},
    "piecewise_linear": {"knots"},
    "learned": {"start", "rate", "bins"},
}
_PART_FIELDS = {"channels", "family", "loss_weight", "guidance_scale"}


class ScheduleError(ConfigError):
  """A clock schedule that is not well-formed (message names the config field; a
  ``ConfigError``, so the entry points print it as one line)."""


# ----------------------------------------------------------------------------------
# One clock
# ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Clock:
  """One part's clock. ``family`` and its numbers (see the module docstring).

  ``start``/``rate`` define the window [start, start + 1/rate] of the linear-based
  families; ``knots`` the piecewise-linear one (tuples of (τ, t)); ``bins`` the learned
  one's pieces. Evaluation is in float32; τ may be a scalar or an array.
  """

  family: str = "offset"
  start: float = 0.0
  rate: float = 1.0
  power: float = 1.0
  shift: float = 1.0
  knots: tuple[tuple[float, float], ...] = ()
  bins: int = 0

  @property
  def end(self) -> float:
    if self.family == "piecewise_linear":
      return float(self.knots[-1][0])
    return self.start + 1.0 / self.rate

  @property
  def begin(self) -> float:
    if self.family == "piecewise_linear":
      return float(self.knots[0][0])
    return self.start

  @property
  def learned(self) -> bool:
    return self.family == "learned"

  def kinks(self) -> tuple[float, ...]:
    """τ where the rate may jump (window ends, knots, learned bin edges)."""
    if self.family == "piecewise_linear":
      return tuple(float(k[0]) for k in self.knots)
    if self.family == "learned":
      w = 1.0 / self.rate
      return tuple(self.start + w * j / self.bins for j in range(self.bins + 1))
    return (self.begin, self.end)

  # -- the linear base u(τ) and its rate ------------------------------------------

  def _u(self, tau, total: float):
    """clip(rate·(τ − start), 0, 1), skipping clamps that cannot act on [0, total]."""
    u = tau - jnp.float32(self.start) if self.start != 0 else tau
    if self.rate != 1.0:
      u = u * jnp.float32(self.rate)
    if self.start > 0:
      u = jnp.maximum(u, 0.0)
    if self.end < total:
      u = jnp.minimum(u, 1.0)
    return u

  def _window(self, tau, total: float):
    """τ inside the (closed) window, with the comparisons of ``phase_mask``."""
    on = jnp.ones(jnp.shape(tau), bool)
    if self.begin > 0:
      on = on & (tau >= jnp.float32(self.begin))
    if self.end < total:
      on = on & (tau <= jnp.float32(self.end))
    return on

  def time(self, tau, total: float, params: jax.Array | None = None) -> jax.Array:
    tau = jnp.asarray(tau, jnp.float32)
    f = self.family
    if f in ("offset", "rate"):
      return self._u(tau, total)
    if f == "power":
      return self._u(tau, total) ** jnp.float32(self.power)
    if f == "shift":
      u = self._u(tau, total)
      s = jnp.float32(self.shift)
      return (s * u) / (1.0 + (s - 1.0) * u)
    if f == "piecewise_linear":
      xs = jnp.asarray([k[0] for k in self.knots], jnp.float32)
      ys = jnp.asarray([k[1] for k in self.knots], jnp.float32)
      return jnp.interp(tau, xs, ys)
    # learned: heights softmax(φ) on equal bins of u
    u = jnp.clip(self._u(tau, total), 0.0, 1.0)
    cum, heights = _learned_tables(params, self.bins)
    pos = u * self.bins
    j = jnp.clip(jnp.floor(pos).astype(jnp.int32), 0, self.bins - 1)
    return cum[j] + heights[j] * (pos - j.astype(jnp.float32))

  def rate_at(self, tau, total: float, params: jax.Array | None = None,
              side: str | None = None) -> jax.Array:
    """t'(τ). At a kink: ``side="right"`` the rate of the piece starting at τ, ``"left"``
    of the piece ending there; None (default): for the linear-based families the closed
    window of ``phase_mask`` (a part is on at both window ends), else "right"."""
    if side not in (None, "left", "right"):
      raise ValueError(f"side must be None, 'left' or 'right', got {side!r}")
    tau = jnp.asarray(tau, jnp.float32)
    f = self.family
    b, e = jnp.float32(self.begin), jnp.float32(self.end)
    if side is None:
      on = self._window(tau, total)
    elif side == "right":
      on = (tau >= b) & (tau < e)
    else:
      on = (tau > b) & (tau <= e)
    if f in ("offset", "rate"):
      return jnp.where(on, jnp.float32(self.rate), jnp.float32(0.0))
    if f == "power":
      u = self._u(tau, total)
      p = jnp.float32(self.power)
      d = p * u ** (p - 1.0) * jnp.float32(self.rate)
      return jnp.where(on, d, 0.0).astype(jnp.float32)
    if f == "shift":
      u = self._u(tau, total)
      s = jnp.float32(self.shift)
      d = s / jnp.square(1.0 + (s - 1.0) * u) * jnp.float32(self.rate)
      return jnp.where(on, d, 0.0).astype(jnp.float32)
    if f == "piecewise_linear":
      xs = np.asarray([k[0] for k in self.knots], np.float64)
      ys = np.asarray([k[1] for k in self.knots], np.float64)
      dx = np.diff(xs)
      slopes = np.where(dx > 0, np.diff(ys) / np.where(dx > 0, dx, 1.0), 0.0)
      j = jnp.searchsorted(jnp.asarray(xs[1:-1], jnp.float32), tau,
                           side="left" if side == "left" else "right")
      d = jnp.asarray(slopes, jnp.float32)[j]
      inside = on if side is not None else (tau >= b) & (tau < e)
      return jnp.where(inside, d, 0.0)
    u = self._u(tau, total)
    _, heights = _learned_tables(params, self.bins)
    pos = u * self.bins
    j = jnp.ceil(pos) - 1.0 if side == "left" else jnp.floor(pos)
    j = jnp.clip(j.astype(jnp.int32), 0, self.bins - 1)
    d = heights[j] * jnp.float32(self.bins * self.rate)
    inside = on if side is not None else (tau >= b) & (tau < e)
    return jnp.where(inside, d, 0.0)

  def inverse(self, t, params: jax.Array | None = None) -> jax.Array:
    """τ with t(τ) = t on the window (linear-based families and ``learned`` only)."""
    t = jnp.asarray(t, jnp.float32)
    f = self.family
    if f in ("offset", "rate"):
      u = t
    elif f == "power":
      u = t ** (1.0 / jnp.float32(self.power))
    elif f == "shift":
      s = jnp.float32(self.shift)
      u = t / (s - (s - 1.0) * t)
    elif f == "learned":
      cum, heights = _learned_tables(params, self.bins)
      j = jnp.clip(jnp.searchsorted(cum[1:], t, side="right"), 0, self.bins - 1)
      frac = (t - cum[j]) / jnp.maximum(heights[j], 1e-12)
      u = (j.astype(jnp.float32) + jnp.clip(frac, 0.0, 1.0)) / self.bins
    else:
      xs = jnp.asarray([k[0] for k in self.knots], jnp.float32)
      ys = jnp.asarray([k[1] for k in self.knots], jnp.float32)
      return jnp.interp(t, ys, xs)
    return jnp.float32(self.start) + u / jnp.float32(self.rate)


def _learned_tables(params, bins: int) -> tuple[jax.Array, jax.Array]:
  """(cumulative heights [bins + 1] starting at 0, heights [bins]) of softmax(φ)."""
  if params is None:
    phi = jnp.zeros((bins,), jnp.float32)
  else:
    phi = jnp.asarray(params, jnp.float32)
    if phi.shape != (bins,):
      raise ValueError(f"learned clock expects {bins} parameters, got shape {phi.shape}")
  heights = jax.nn.softmax(phi)
  cum = jnp.concatenate([jnp.zeros((1,), jnp.float32), jnp.cumsum(heights)])
  return cum.at[-1].set(1.0), heights


# ----------------------------------------------------------------------------------
# A schedule: named parts with clocks
# ----------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Part:
  """One channel group of the composite latent and its clock.

  ``loss_weight`` multiplies the part's MSE (SFD: texture 1, semantic ``semantic_weight``);
  ``guidance_scale`` (None: the sampler's scale) is the part's CFG / autoguidance scale.
  """

  name: str
  channels: int
  clock: Clock = Clock()
  loss_weight: float = 1.0
  guidance_scale: float | None = None


@dataclasses.dataclass(frozen=True)
class Schedule:
  """Parts in latent order and the global time span T (see the module docstring)."""

  parts: tuple[Part, ...]
  total: float = 1.0

  def __post_init__(self):
    if not self.parts:
      raise ScheduleError("a schedule needs at least one part")
    names = [p.name for p in self.parts]
    if len(set(names)) != len(names):
      raise ScheduleError(f"part names must be unique, got {names}")
    if not self.total > 0:
      raise ScheduleError(f"config.schedule.total must be > 0, got {self.total}")

  # -- layout ----------------------------------------------------------------------

  @property
  def names(self) -> tuple[str, ...]:
    return tuple(p.name for p in self.parts)

  @property
  def channels(self) -> int:
    return sum(p.channels for p in self.parts)

  @property
  def num_parts(self) -> int:
    return len(self.parts)

  def part_of_channel(self) -> np.ndarray:
    """int32 [C]: the part index of every channel."""
    return np.repeat(np.arange(self.num_parts), [p.channels for p in self.parts]).astype(
        np.int32)

  def channel_slice(self, name: str) -> slice:
    start = 0
    for p in self.parts:
      if p.name == name:
        return slice(start, start + p.channels)
      start += p.channels
    raise KeyError(f"no part {name!r} in the schedule ({self.names})")

  def per_channel(self, values: Sequence[Any]) -> jax.Array:
    """Per-part values (scalars, or arrays of a common shape [...]) → [..., C]."""
    vals = [jnp.asarray(v) for v in values]
    if self.num_parts == 2:   # two parts: phase_mask's select, op for op
      c = self.channels
      sem = semantic_channel_mask(c, self.parts[1].channels)
      return jnp.where(sem, vals[1][..., None], vals[0][..., None])
    stacked = jnp.stack(vals, axis=-1)
    return jnp.take(stacked, jnp.asarray(self.part_of_channel()), axis=-1)

  @property
  def loss_weights(self) -> tuple[float, ...]:
    return tuple(p.loss_weight for p in self.parts)

  @property
  def synchronous(self) -> bool:
    """All parts share one clock (then the model has one timestep embedder)."""
    return all(p.clock == self.parts[0].clock for p in self.parts)

  @property
  def learned_parts(self) -> tuple[tuple[str, int], ...]:
    """((name, bins), ...) of the parts with a learned clock."""
    return tuple((p.name, p.clock.bins) for p in self.parts if p.clock.learned)

  # -- clocks ----------------------------------------------------------------------

  def _params(self, params: Mapping[str, jax.Array] | None, part: Part):
    if not part.clock.learned:
      return None
    if params is None or part.name not in params:
      return None       # φ = 0: the base rate clock (init)
    return params[part.name]

  def times(self, tau, params=None) -> tuple[jax.Array, ...]:
    """Per-part clocks t_k(τ) (float32, τ's shape)."""
    return tuple(p.clock.time(tau, self.total, self._params(params, p)) for p in self.parts)

  def rates(self, tau, params=None, side: str | None = None) -> tuple[jax.Array, ...]:
    """Per-part rates t_k'(τ) (float32, τ's shape); ``side`` at kinks: see
    :meth:`Clock.rate_at` (None: ``phase_mask``'s closed windows)."""
    return tuple(p.clock.rate_at(tau, self.total, self._params(params, p), side)
                 for p in self.parts)

  def active(self, tau, params=None) -> tuple[jax.Array, ...]:
    """Per-part bool: the part moves at τ (rate > 0)."""
    return tuple(r > 0 for r in self.rates(tau, params))

  def training_times(self, t, params=None) -> tuple[jax.Array, ...]:
    """Training draw t ∈ [0, 1] → per-part times at τ = t·T (T = 1: τ = t as is)."""
    t = jnp.asarray(t, jnp.float32)
    tau = t if self.total == 1.0 else t * jnp.float32(self.total)
    return self.times(tau, params)

  @property
  def kinks(self) -> tuple[float, ...]:
    """Sorted τ in (0, T) where some part's rate may jump."""
    ks = sorted({float(k) for p in self.parts for k in p.clock.kinks()})
    out = []
    for k in ks:                     # one kink for values equal up to rounding
      if 0.0 < k < self.total and not (out and k - out[-1] < 1e-9):
        out.append(k)
    return tuple(out)

  # -- learned-clock helpers -------------------------------------------------------

  def kinetic_energy(self, params=None) -> jax.Array:
    """Σ over learned parts of ∫ t_k'(τ)² dτ (analytic; the plain rate clock gives
    ``rate``, the minimum over all monotone clocks on the same window)."""
    total = jnp.float32(0.0)
    for p in self.parts:
      if p.clock.learned:
        _, h = _learned_tables(self._params(params, p), p.clock.bins)
        width = 1.0 / (p.clock.rate * p.clock.bins)
        total = total + jnp.sum(jnp.square(h / width)) * width
    return total


# ----------------------------------------------------------------------------------
# Construction
# ----------------------------------------------------------------------------------


def sfd_schedule(delta_t: float = 0.3, semantic_chans: int = SEMANTIC_CHANS,
                 channels: int = 48, semantic_weight: float = 1.0) -> Schedule:
  """SFD's two parts: texture (first C − S channels, start Δt) and semantic (last S,
  start 0), T = 1 + Δt. Δt = 0 is the synchronous schedule over [0, 1]."""
  if not 0.0 <= delta_t <= 1.0:
    raise ScheduleError(f"delta_t must be in [0, 1], got {delta_t}")
  if not 0 <= semantic_chans <= channels:
    raise ScheduleError(f"semantic_chans={semantic_chans} must be in [0, {channels}]")
  return Schedule(
      parts=(Part("texture", channels - semantic_chans, Clock("offset", start=delta_t)),
             Part("semantic", semantic_chans, Clock("offset", start=0.0),
                  loss_weight=semantic_weight)),
      total=1.0 + delta_t)


def _get(d, key, default=None):
  if hasattr(d, "get"):
    return d.get(key, default)
  return getattr(d, key, default)


def _to_dict(d) -> dict:
  if hasattr(d, "to_dict"):
    return d.to_dict()
  return dict(d)


def parse_clock(fields: Mapping[str, Any], where: str) -> Clock:
  """A :class:`Clock` from a part's config fields (one-line errors naming ``where``)."""
  family = fields.get("family", "offset")
  if family not in FAMILIES:
    raise ScheduleError(f"{where}.family={family!r} is not one of {FAMILIES}")
  extra = set(fields) - _FIELDS[family] - _PART_FIELDS
  if extra:
    raise ScheduleError(f"{where}: field(s) {sorted(extra)} do not belong to family "
                        f"{family!r} (its fields: {sorted(_FIELDS[family])})")

  def num(name, default, ok, what):
    v = fields.get(name, default)
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
        or not ok(v):
      raise ScheduleError(f"{where}.{name} must be {what}, got {v!r}")
    return float(v)

  start = num("start", 0.0, lambda v: v >= 0, "a number >= 0")
  rate = num("rate", 1.0, lambda v: v > 0, "a number > 0")
  if family == "offset":
    return Clock("offset", start=start)
  if family == "rate":
    return Clock("rate", start=start, rate=rate)
  if family == "power":
    return Clock("power", start=start, rate=rate,
                 power=num("power", 1.0, lambda v: v >= 1, "a number >= 1"))
  if family == "shift":
    return Clock("shift", start=start, rate=rate,
                 shift=num("shift", 1.0, lambda v: v > 0, "a number > 0"))
  if family == "learned":
    bins = fields.get("bins", 8)
    if isinstance(bins, bool) or not isinstance(bins, int) or bins < 1:
      raise ScheduleError(f"{where}.bins must be an integer >= 1, got {bins!r}")
    return Clock("learned", start=start, rate=rate, bins=bins)
  knots = fields.get("knots")
  try:
    knots = tuple((float(a), float(b)) for a, b in knots)
  except (TypeError, ValueError):
    raise ScheduleError(f"{where}.knots must be a sequence of (tau, t) pairs, got "
                        f"{knots!r}") from None
  if len(knots) < 2:
    raise ScheduleError(f"{where}.knots needs at least 2 (tau, t) pairs, got {len(knots)}")
  taus, ts = [k[0] for k in knots], [k[1] for k in knots]
  if ts[0] != 0.0 or ts[-1] != 1.0:
    raise ScheduleError(f"{where}.knots must start at t=0 and end at t=1, got t={ts}")
  if any(b < a for a, b in zip(taus, taus[1:])) or any(b < a for a, b in zip(ts, ts[1:])):
    raise ScheduleError(f"{where}.knots must be non-decreasing in tau and in t, got "
                        f"{list(knots)}")
  if any(a == b and ta != tb for (a, ta), (b, tb) in zip(knots, knots[1:])):
    raise ScheduleError(f"{where}.knots: t may not jump (two knots at one tau with different "
                        f"t), got {list(knots)}")
  if taus[0] < 0:
    raise ScheduleError(f"{where}.knots: tau must be >= 0, got {taus[0]}")
  return Clock("piecewise_linear", knots=knots)


def from_section(section, *, where: str = "config.schedule") -> Schedule:
  """A schedule from a ``config.schedule`` section::

    schedule.total = 1.3                        # optional; default: the latest clock end
    schedule.order = ("texture", "semantic")   # latent channel order (optional for these two)
    schedule.parts.texture = dict(channels=32, family="offset", start=0.3)
    schedule.parts.semantic = dict(channels=16, family="offset", start=0.0, loss_weight=2.0)
  """
  sec = _to_dict(section)
  unknown = set(sec) - {"parts", "total", "order"}
  if unknown:
    raise ScheduleError(f"{where} has unknown field(s) {sorted(unknown)} (known: parts, "
                        "order, total)")
  parts_sec = sec.get("parts")
  if not parts_sec:
    raise ScheduleError(f"{where}.parts is empty: give each latent part (e.g. texture, "
                        "semantic) its channels and clock")
  order = sec.get("order")
  if not order:
    if len(parts_sec) == 1 or set(parts_sec) == {"texture", "semantic"}:
      order = [n for n in ("texture", "semantic") if n in parts_sec] or list(parts_sec)
    else:
      raise ScheduleError(f"{where}.order must list the parts in latent channel order "
                          f"(config sections are unordered), e.g. {sorted(parts_sec)}")
  order = [order] if isinstance(order, str) else list(order)
  if sorted(order) != sorted(parts_sec):
    raise ScheduleError(f"{where}.order={order} must name each of {where}.parts "
                        f"({sorted(parts_sec)}) exactly once")
  parts = []
  for name in order:
    fields = parts_sec[name]
    w = f"{where}.parts.{name}"
    if not str(name).isidentifier():
      raise ScheduleError(f"{w}: a part name must be an identifier, got {name!r}")
    fields = _to_dict(fields)
    ch = fields.get("channels")
    if isinstance(ch, bool) or not isinstance(ch, int) or ch < 1:
      raise ScheduleError(f"{w}.channels must be an integer >= 1, got {ch!r}")
    lw = fields.get("loss_weight", 1.0)
    if isinstance(lw, bool) or not isinstance(lw, (int, float)) or lw < 0:
      raise ScheduleError(f"{w}.loss_weight must be a number >= 0, got {lw!r}")
    gs = fields.get("guidance_scale")
    if gs is not None and (isinstance(gs, bool) or not isinstance(gs, (int, float))
                           or gs < 0):
      raise ScheduleError(f"{w}.guidance_scale must be None or a number >= 0, got {gs!r}")
    parts.append(Part(str(name), ch, parse_clock(fields, w), float(lw),
                      None if gs is None else float(gs)))
  ends = [p.clock.end for p in parts]
  total = sec.get("total") or max(ends)
  if isinstance(total, bool) or not isinstance(total, (int, float)) or total <= 0:
    raise ScheduleError(f"{where}.total must be a number > 0, got {total!r}")
  for p in parts:
    if p.clock.end > total + 1e-9:
      raise ScheduleError(f"{where}.parts.{p.name}: its clock reaches 1 at tau="
                          f"{p.clock.end:g}, after {where}.total={total:g}")
  return Schedule(tuple(parts), float(total))


def from_config(config) -> Schedule:
  """The run's schedule: ``config.schedule`` when the config has one, else SFD's two
  parts from ``objective.delta_t``, ``objective.semantic_weight``,
  ``model.semantic_chans`` and ``model.in_channels``. With ``config.schedule`` the parts'
  channels must add up to ``model.in_channels``."""
  model = _get(config, "model")
  obj = _get(config, "objective")
  channels = int(_get(model, "in_channels", 48)) if model is not None else 48
  section = _get(config, "schedule")
  if section is not None and _get(section, "parts"):
    sch = from_section(section)
    if model is not None and sch.channels != channels:
      raise ScheduleError(f"config.schedule.parts have {sch.channels} channels in all but "
                          f"config.model.in_channels is {channels}")
    return sch
  delta_t = float(_get(obj, "delta_t", 0.3)) if obj is not None else 0.3
  sw = float(_get(obj, "semantic_weight", 2.0)) if obj is not None else 2.0
  sem = int(_get(model, "semantic_chans", SEMANTIC_CHANS)) if model is not None else 16
  return sfd_schedule(delta_t, sem, channels, sw)


def split_times(times):
  """Per-part times → the velocity-function arguments (t_a, t_b): two parts are passed as
  SFD's (t_tex, t_sem); any other number as (tuple of times, None)."""
  times = tuple(times)
  if len(times) == 2:
    return times
  return times, None


def join_times(t_a, t_b) -> tuple:
  """Inverse of :func:`split_times`."""
  if isinstance(t_a, (tuple, list)):
    return tuple(t_a)
  return (t_a, t_a if t_b is None else t_b)


def params_from_model(model, schedule: Schedule) -> dict[str, jax.Array] | None:
  """The learned clocks' parameters φ held by a denoiser (``clock_<part>``), or None."""
  if not schedule.learned_parts:
    return None
  out = {}
  for name, _ in schedule.learned_parts:
    p = getattr(model, f"clock_{name}", None)
    if p is not None:
      out[name] = getattr(p, "value", p)
  return out


# ----------------------------------------------------------------------------------
# The two-part functions of before (thin wrappers over the SFD schedule)
# ----------------------------------------------------------------------------------


def semantic_channel_mask(channels: int, semantic_chans: int) -> jax.Array:
  """[C] bool, True on the last ``semantic_chans`` channels (no range check)."""
  return jnp.arange(channels) >= channels - semantic_chans


def clocks(tau, delta_t: float) -> tuple[jax.Array, jax.Array]:
  """Global time τ → (t_tex, t_sem) = (max(τ − Δt, 0), min(τ, 1)), in float32."""
  return sfd_schedule(delta_t, 0, 0).times(tau)


def training_clocks(t, delta_t: float) -> tuple[jax.Array, jax.Array]:
  """Training time t ∈ [0, 1] → ``clocks(t·(1 + Δt), Δt)``. Δt = 0 gives (t, t) as is."""
  return sfd_schedule(delta_t, 0, 0).training_times(t)


def phase_mask(tau, delta_t: float, channels: int,
               semantic_chans: int = SEMANTIC_CHANS) -> jax.Array:
  """Float32 [C] mask: texture channels iff τ ≥ Δt, semantic (last S) iff τ ≤ 1."""
  sch = sfd_schedule(delta_t, semantic_chans, channels)
  return sch.per_channel(sch.rates(tau))
