"""Classifier-free guidance and autoguidance for SFD's two-part latent (docs/method.md §5.6, §8.3).

Everything here is a pure function of a *velocity function*
``fn(x, t_tex, t_sem, y) -> v`` with ``x``/``v`` of shape ``[N, H, W, C]`` (channels last,
``[texture | semantic]`` with the semantic part the last ``semantic_chans`` channels),
times ``[N]`` and labels ``[N]``. A ``LightningDiT`` module has exactly that call
signature, so a model can be passed wherever a velocity function is expected.

Guidance combines a *reference* velocity ``v_ref`` with a *conditional* one ``v_c`` per
part: ``v = v_ref + s·(v_c − v_ref)`` with a texture scale and a semantic scale, on all
channels of each part (SFD fixed LightningDiT's legacy rule that guided only 3 channels).

* CFG: ``v_c`` is the model with the real labels, ``v_ref`` the model with the null label;
  both come from ONE model call on the doubled batch ``[x; x]`` with labels ``[y; null]``.
* Autoguidance: ``v_c`` is the main model and ``v_ref`` a weaker guide model, both with
  the same (conditional) labels.

Optional interval gating (``interval_start``, ``interval_end``): the guided value is
replaced by ``v_c`` for the texture part when ``t_tex < interval_start`` or
``t_tex > interval_end`` (modes ``both``/``tex``) and for the semantic part when its
``t_sem`` is outside the interval (modes ``both``/``sem``). As in the reference only the
first row's time is looked at (the samplers give every row the same time).
``interval_start=0`` never triggers (times are ≥ 0), which is what the released configs
use; the reference has no upper bound (``interval_end=None``). The upper bound is
REPA's guidance window in this time convention (REPA's t runs from 1 = noise to 0 =
data, so its ``[guidance_low, guidance_high]`` is ``[1 − high, 1 − low]`` here).

``forward_with_cfg`` / ``forward_with_autoguidance`` mirror the reference methods and their
batch layouts (used by the parity tests); ``make_guided_velocity`` builds the velocity
function the samplers integrate.

Any clock schedule (``make_guided_velocity(..., schedule=...)``): each part k is guided
with its own scale (``Part.guidance_scale``, default the sampler's scale) and gated on its
own clock t_k (``interval_parts``: the gated parts, default all); a K ≠ 2 part velocity
function takes ``(x, (t_1, ..., t_K), None, y)``. SFD's two parts without per-part scales
go through the two-part functions above, unchanged.

For a synchronous (Δt = 0) model pass ``semantic_chans=0``: the whole latent is then one
part, guided with the texture scale and gated on ``t_tex`` (= t), as the reference's
non-semantic-first branch does.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp

from sfd_jax.diffusion import clocks
from sfd_jax.diffusion.clocks import SEMANTIC_CHANS

VelocityFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]

GUIDANCE_MODES = ("none", "cfg", "autoguidance")
INTERVAL_MODES = ("both", "tex", "sem")
NULL_LABEL = 1000


def _check_interval_mode(interval_mode: str) -> None:
  if interval_mode not in INTERVAL_MODES:
    raise ValueError(f"interval_mode {interval_mode!r} not in {INTERVAL_MODES}")


def _batch_times(t, n: int) -> jax.Array:
  """A scalar or [n] time as an [n] float32 vector."""
  t = jnp.asarray(t, jnp.float32)
  if t.ndim == 0:
    return jnp.full((n,), t)
  if t.shape != (n,):
    raise ValueError(f"time must be a scalar or have shape ({n},), got {t.shape}")
  return t


def _outside_interval(t, start, end) -> jax.Array:
  """Whether a clock (its first row: every row shares it) lies below ``start`` or above
  ``end`` of the guidance interval (None: that side is open)."""
  t = jnp.ravel(jnp.asarray(t, jnp.float32))[0]
  out = jnp.bool_(False)
  if start is not None:
    out = out | (t < jnp.asarray(start, jnp.float32))
  if end is not None:
    out = out | (t > jnp.asarray(end, jnp.float32))
  return out


def semantic_channel_mask(channels: int, semantic_chans: int) -> jax.Array:
  """[C] bool, True on the last ``semantic_chans`` channels (range-checked)."""
  if not 0 <= semantic_chans <= channels:
    raise ValueError(f"semantic_chans={semantic_chans} must be in [0, {channels}]")
  return clocks.semantic_channel_mask(channels, semantic_chans)


def combine(v_cond: jax.Array, v_ref: jax.Array, t_tex, t_sem, *, scale_tex: float,
            scale_sem: float, interval_start: float | None = None,
            interval_mode: str = "both",
            semantic_chans: int = SEMANTIC_CHANS,
            interval_end: float | None = None) -> jax.Array:
  """Per-part guidance ``v_ref + s·(v_cond − v_ref)`` with optional interval gating.

  Args:
    v_cond, v_ref: [N, H, W, C] conditional / reference (unconditional or guide) velocity.
    t_tex, t_sem: the clocks (scalar or [N]); gating looks at the first entry only.
    scale_tex, scale_sem: guidance scale of the texture / semantic channels.
    interval_start: None disables gating; otherwise a part whose clock is below it uses
      ``v_cond`` (for the parts selected by ``interval_mode``).
    interval_end: None: no upper bound; otherwise a part whose clock is above it uses
      ``v_cond`` (same parts).
    semantic_chans: number of trailing semantic channels (0: one part, texture rules).
  """
  _check_interval_mode(interval_mode)
  sem = semantic_channel_mask(v_cond.shape[-1], semantic_chans)
  v_cond = v_cond.astype(jnp.float32)
  v_ref = v_ref.astype(jnp.float32)
  scale = jnp.where(sem, jnp.asarray(scale_sem, jnp.float32),
                    jnp.asarray(scale_tex, jnp.float32))
  guided = v_ref + scale * (v_cond - v_ref)
  if interval_start is None and interval_end is None:
    return guided
  gate_tex = (_outside_interval(t_tex, interval_start, interval_end)
              & (interval_mode in ("both", "tex")))
  gate_sem = (_outside_interval(t_sem, interval_start, interval_end)
              & (interval_mode in ("both", "sem")))
  use_cond = jnp.where(sem, gate_sem, gate_tex)
  return jnp.where(use_cond, v_cond, guided)


# ----------------------------------------------------------------------------------
# Classifier-free guidance
# ----------------------------------------------------------------------------------


def cfg_velocity(fn: VelocityFn, x: jax.Array, t_tex, t_sem, y: jax.Array, *, scale: float,
                 scale_tex: float | None = None, scale_sem: float | None = None,
                 interval_start: float | None = None, interval_mode: str = "both",
                 null_label: int = NULL_LABEL, semantic_chans: int = SEMANTIC_CHANS,
                 return_model_out: bool = False, interval_end: float | None = None):
  """Classifier-free guided velocity of N rows from one call on the doubled batch.

  ``fn`` is called once on ``[x; x]`` with labels ``[y; null_label]`` and the times
  repeated; ``v = v_u + s·(v_c − v_u)`` per part (``scale_tex``/``scale_sem`` default to
  ``scale``). Returns [N, H, W, C] (and the raw [2N, ...] model output when
  ``return_model_out``).
  """
  n = x.shape[0]
  t_tex, t_sem = _batch_times(t_tex, n), _batch_times(t_sem, n)
  y = jnp.asarray(y, jnp.int32)
  out = fn(jnp.concatenate([x, x], axis=0), jnp.concatenate([t_tex, t_tex]),
           jnp.concatenate([t_sem, t_sem]),
           jnp.concatenate([y, jnp.full_like(y, null_label)]))
  v = combine(out[:n], out[n:], t_tex, t_sem,
              scale_tex=scale if scale_tex is None else scale_tex,
              scale_sem=scale if scale_sem is None else scale_sem,
              interval_start=interval_start, interval_mode=interval_mode,
              semantic_chans=semantic_chans, interval_end=interval_end)
  return (v, out) if return_model_out else v


def forward_with_cfg(fn: VelocityFn, x: jax.Array, t_tex, t_sem, y: jax.Array,
                     scale: float, *, cfg_interval: bool = False,
                     cfg_interval_start: float | None = None, interval_mode: str = "both",
                     semantic_chans: int = SEMANTIC_CHANS, return_model_out: bool = False):
  """The reference's ``forward_with_cfg`` with its 2N-row layout (docs/method.md §5.6).

  ``x`` [2N, ...] holds the N latents twice and ``y`` [2N] the real labels then the null
  labels. Only ``x[:N]`` is used (run as ``[x[:N]; x[:N]]`` with the given 2N labels and
  times); the guided N rows are returned twice, ``[v; v]``. ``cfg_interval`` switches on
  gating at ``cfg_interval_start`` (as ``interval_start`` of :func:`combine`).
  """
  if x.shape[0] % 2:
    raise ValueError(f"forward_with_cfg expects a doubled batch (even rows), got {x.shape}")
  n = x.shape[0] // 2
  half = x[:n]
  t_tex, t_sem = _batch_times(t_tex, 2 * n), _batch_times(t_sem, 2 * n)
  out = fn(jnp.concatenate([half, half], axis=0), t_tex, t_sem, jnp.asarray(y, jnp.int32))
  v = combine(out[:n], out[n:], t_tex, t_sem, scale_tex=scale, scale_sem=scale,
              interval_start=cfg_interval_start if cfg_interval else None,
              interval_mode=interval_mode, semantic_chans=semantic_chans)
  v2 = jnp.concatenate([v, v], axis=0)
  return (v2, out) if return_model_out else v2


# ----------------------------------------------------------------------------------
# Autoguidance
# ----------------------------------------------------------------------------------


def autoguidance_velocity(main_fn: VelocityFn, guide_fn: VelocityFn, x: jax.Array, t_tex,
                          t_sem, y: jax.Array, *, scale: float,
                          scale_tex: float | None = None, scale_sem: float | None = None,
                          interval_start: float | None = None, interval_mode: str = "both",
                          semantic_chans: int = SEMANTIC_CHANS, return_parts: bool = False,
                          interval_end: float | None = None):
  """Autoguidance: ``v = v_guide + s·(v_main − v_guide)`` per part.

  Main and guide see the same (x, t, conditional y). ``scale_tex``/``scale_sem`` default
  to ``scale``. Returns [N, ...] (with ``return_parts`` also ``(v_main, v_guide)``).
  """
  n = x.shape[0]
  t_tex, t_sem = _batch_times(t_tex, n), _batch_times(t_sem, n)
  y = jnp.asarray(y, jnp.int32)
  v_main = main_fn(x, t_tex, t_sem, y)
  v_guide = guide_fn(x, t_tex, t_sem, y)
  v = combine(v_main, v_guide, t_tex, t_sem,
              scale_tex=scale if scale_tex is None else scale_tex,
              scale_sem=scale if scale_sem is None else scale_sem,
              interval_start=interval_start, interval_mode=interval_mode,
              semantic_chans=semantic_chans, interval_end=interval_end)
  return (v, (v_main, v_guide)) if return_parts else v


def forward_with_autoguidance(fn: VelocityFn, x: jax.Array, t_tex, t_sem, y: jax.Array,
                              scale: float, guide: VelocityFn, *, cfg_interval: bool = False,
                              cfg_interval_start: float | None = None,
                              cfg_scale_sem: float | None = None,
                              cfg_scale_tex: float | None = None,
                              interval_mode: str = "both",
                              semantic_chans: int = SEMANTIC_CHANS,
                              return_parts: bool = False):
  """The reference's ``forward_with_autoguidance`` (argument names as there)."""
  return autoguidance_velocity(
      fn, guide, x, t_tex, t_sem, y, scale=scale, scale_tex=cfg_scale_tex,
      scale_sem=cfg_scale_sem, interval_start=cfg_interval_start if cfg_interval else None,
      interval_mode=interval_mode, semantic_chans=semantic_chans, return_parts=return_parts)


# ----------------------------------------------------------------------------------
# Factory used by the samplers
# ----------------------------------------------------------------------------------


def _model_default(model, attr: str, fallback):
  cfg = getattr(model, "cfg", None)
  if cfg is None:
    return fallback
  if attr == "semantic_chans":
    return cfg.semantic_chans if getattr(cfg, "semantic_first", True) else 0
  return getattr(cfg, attr, fallback)


def _times_n(t_a, t_b, n: int):
  """(t_a, t_b) of a velocity call as per-part [n] vectors."""
  return tuple(_batch_times(t, n) for t in clocks.join_times(t_a, t_b))


def combine_parts(v_cond: jax.Array, v_ref: jax.Array, times, schedule: clocks.Schedule, *,
                  scales, interval_start: float | None = None, gated=None,
                  interval_end: float | None = None) -> jax.Array:
  """Per-part ``v_ref + s_k·(v_cond − v_ref)``; a gated part whose clock (first row) is
  below ``interval_start`` or above ``interval_end`` uses ``v_cond``."""
  v_cond = v_cond.astype(jnp.float32)
  v_ref = v_ref.astype(jnp.float32)
  scale = schedule.per_channel([jnp.asarray(s, jnp.float32) for s in scales])
  guided = v_ref + scale * (v_cond - v_ref)
  if interval_start is None and interval_end is None:
    return guided
  gated = [True] * schedule.num_parts if gated is None else gated
  use = [_outside_interval(t, interval_start, interval_end) & bool(g)
         for t, g in zip(times, gated)]
  return jnp.where(schedule.per_channel(use), v_cond, guided)


def _schedule_guided(model, guide, schedule: clocks.Schedule, *, mode: str, scale: float,
                     scale_tex, scale_sem, interval_start, interval_mode, interval_parts,
                     null_label: int, interval_end=None) -> VelocityFn:
  defaults = [scale] * schedule.num_parts
  if schedule.num_parts == 2:
    defaults = [scale if scale_tex is None else scale_tex,
                scale if scale_sem is None else scale_sem]
  scales = [d if p.guidance_scale is None else p.guidance_scale
            for d, p in zip(defaults, schedule.parts)]
  if interval_parts is None:
    if schedule.num_parts == 2:
      interval_parts = {"both": schedule.names, "tex": schedule.names[:1],
                        "sem": schedule.names[1:]}[interval_mode]
    else:
      interval_parts = schedule.names
  unknown = set(interval_parts) - set(schedule.names)
  if unknown:
    raise ValueError(f"interval_parts {sorted(unknown)} are not parts of the schedule "
                     f"{schedule.names}")
  gated = [n in interval_parts for n in schedule.names]
  kw = dict(scales=scales, interval_start=interval_start, gated=gated,
            interval_end=interval_end)

  def call(fn, x, times, y):
    return fn(x, *clocks.split_times(times), y)

  if mode == "cfg":
    def cfg_fn(x, t_a, t_b, y):
      n = x.shape[0]
      times = _times_n(t_a, t_b, n)
      y = jnp.asarray(y, jnp.int32)
      out = call(model, jnp.concatenate([x, x], axis=0),
                 tuple(jnp.concatenate([t, t]) for t in times),
                 jnp.concatenate([y, jnp.full_like(y, null_label)]))
      return combine_parts(out[:n], out[n:], times, schedule, **kw)
    return cfg_fn

  def ag_fn(x, t_a, t_b, y):
    times = _times_n(t_a, t_b, x.shape[0])
    y = jnp.asarray(y, jnp.int32)
    return combine_parts(call(model, x, times, y), call(guide, x, times, y), times,
                         schedule, **kw)
  return ag_fn


def make_guided_velocity(model: VelocityFn, guide: VelocityFn | None = None, *,
                         mode: str = "none", scale: float = 1.0,
                         scale_tex: float | None = None, scale_sem: float | None = None,
                         interval_start: float | None = None, interval_mode: str = "both",
                         null_label: int | None = None,
                         semantic_chans: int | None = None,
                         interval_end: float | None = None,
                         schedule: clocks.Schedule | None = None,
                         interval_parts: tuple[str, ...] | None = None) -> VelocityFn:
  """Returns ``fn(x, t_tex, t_sem, y) -> v`` (N rows in, N rows out) for the samplers.

  Guidance only switches on for ``scale > 1`` (the reference's ``using_cfg``; ``scale``
  must therefore be a Python number); otherwise (or with ``mode="none"``) it is the plain
  conditional model. The guide is ignored unless ``mode="autoguidance"``. ``mode="autoguidance"``
  needs ``guide``. ``null_label`` defaults to ``model.cfg.num_classes`` and
  ``semantic_chans`` to the model's (0 for a synchronous model), else 1000 / 16.
  ``schedule`` (with ``interval_parts``): per-part scales and gates for any clock
  schedule (see the module docstring).

  The returned function carries the model's config as ``fn.cfg`` (so
  ``samplers.sample`` reads Δt and the semantic channel count from it) and closes over
  ``model``; to keep weights out of the compiled
  program, split the model (``nnx.split``) and build the function inside the jitted
  code from ``nnx.merge(graphdef, state)``.
  """
  if mode not in GUIDANCE_MODES:
    raise ValueError(f"guidance mode {mode!r} not in {GUIDANCE_MODES}")
  _check_interval_mode(interval_mode)
  if mode == "autoguidance" and guide is None:
    raise ValueError("guidance mode 'autoguidance' needs a guide model (guide=None)")
  if null_label is None:
    null_label = _model_default(model, "num_classes", NULL_LABEL)
  if semantic_chans is None:
    semantic_chans = _model_default(model, "semantic_chans", SEMANTIC_CHANS)
  kw = dict(scale=scale, scale_tex=scale_tex, scale_sem=scale_sem,
            interval_start=interval_start, interval_mode=interval_mode,
            semantic_chans=semantic_chans, interval_end=interval_end)

  def with_cfg(fn):
    fn.cfg = getattr(model, "cfg", None)
    return fn

  if mode == "none" or scale <= 1.0:
    def plain(x, t_tex, t_sem, y):
      n = x.shape[0]
      if isinstance(t_tex, (tuple, list)):
        return model(x, tuple(_batch_times(t, n) for t in t_tex), None,
                     jnp.asarray(y, jnp.int32))
      return model(x, _batch_times(t_tex, n), _batch_times(t_sem, n),
                   jnp.asarray(y, jnp.int32))
    return with_cfg(plain)

  if schedule is not None and (schedule.num_parts != 2 or interval_parts is not None or any(
      p.guidance_scale is not None for p in schedule.parts)):
    return with_cfg(_schedule_guided(
        model, guide, schedule, mode=mode, scale=scale, scale_tex=scale_tex,
        scale_sem=scale_sem, interval_start=interval_start, interval_mode=interval_mode,
        interval_parts=interval_parts, null_label=null_label, interval_end=interval_end))
  if schedule is not None:
    semantic_chans = schedule.parts[1].channels
    kw["semantic_chans"] = semantic_chans

  if mode == "cfg":
    def cfg_fn(x, t_tex, t_sem, y):
      return cfg_velocity(model, x, t_tex, t_sem, y, null_label=null_label, **kw)
    return with_cfg(cfg_fn)

  def ag_fn(x, t_tex, t_sem, y):
    return autoguidance_velocity(model, guide, x, t_tex, t_sem, y, **kw)
  return with_cfg(ag_fn)


class _WithInterval:
  """``model`` with its ``interval`` argument bound (keeps ``cfg`` for the defaults)."""

  def __init__(self, model, interval):
    self.model, self.interval = model, interval
    self.cfg = getattr(model, "cfg", None)

  def __call__(self, *args, **kwargs):
    return self.model(*args, interval=self.interval, **kwargs)


def make_guided_average_velocity(model, guide=None, **options):
  """:func:`make_guided_velocity` for average-velocity models (``samplers.meanflow``):
  returns ``fn(x, t_a, t_b, y, interval=h)``; guidance combines the conditional and
  reference *average* velocities of the same jump per part, as it does velocities."""
  def fn(x, t_a, t_b, y, interval):
    g = None if guide is None else _WithInterval(guide, interval)
    return make_guided_velocity(_WithInterval(model, interval), g, **options)(x, t_a, t_b, y)
  fn.cfg = getattr(model, "cfg", None)
  return fn
