"""Semantic-first samplers: fixed-grid Euler / Heun, adaptive dopri5, Euler–Maruyama SDE.

The semantic-first ODE (docs/method.md §8.1) runs over global time τ ∈ [0, 1 + Δt]:

  dx/dτ = m(τ) ⊙ v(x, t_tex(τ), t_sem(τ), y),
  t_tex = max(τ − Δt, 0),   t_sem = min(τ, 1),

with the phase mask m: texture channels (the first C − S) active iff τ ≥ Δt, semantic
channels (the last S) active iff τ ≤ 1, both comparisons in float32 (clocks and mask live
in ``sfd_jax.diffusion.clocks``). Each evaluation uses one scalar τ for the whole batch.
With Δt = 0 it is the plain [0, 1] flow with both clocks equal to τ. Since
dt_part/dτ = m_part(τ), each part follows its own rectified flow on its own clock; the
mask only says when.

Velocity functions have the signature ``fn(x, t_tex, t_sem, y) -> v`` with x, v
``[N, H, W, C]`` (channels last) and times ``[N]``; a ``LightningDiT`` or a function from
:func:`sfd_jax.diffusion.guidance.make_guided_velocity` qualifies. All solvers are pure
JAX (``lax.scan`` or diffrax's while loop; no host callbacks), so they run under
``jax.jit`` with sharded inputs.

Grids follow the reference exactly: ``num_steps`` counts grid *points*
(``torch.linspace(0, 1 + Δt, num_steps)`` in float32, see :func:`torch_linspace`), Euler
takes ``num_steps − 1`` steps with velocity and mask at the left point, and the
optional timestep shift maps τ ↦ (1+Δt)·g(τ/(1+Δt)), g(u) = s·u / (1 + (s−1)·u).

Any clock schedule (``sfd_jax.diffusion.clocks.Schedule``, argument ``schedule``; None =
SFD's from ``delta_t``/``semantic_chans``) runs through the same solvers: the right-hand
side is dx_k/dτ = t_k'(τ)·v_k(x, t(τ), y) over [0, T], the per-part rates replacing the
phase mask (for offset clocks they *are* the mask, bit for bit), learned clocks read their
parameters from ``clock_params``. The schedule's kinks are dopri5's jump times
(``jump_ts``) and, with ``grid_kinks=True``, points of the fixed grids. A velocity function
of a K ≠ 2 part schedule is called as ``fn(x, (t_1, ..., t_K), None, y)``.

The SDE: the reference SFD code has no semantic-first SDE (its sampling script accepts
mode "ODE" only). :func:`euler_maruyama` carries the reference's generic SDE sampler
(SiT's ``Sampler.sample_sde``, ``transport/integrators.py``) over to the two clocks; see
its docstring for the rule and the two places where it had to be made well-defined.
"""
from __future__ import annotations

import math
from fractions import Fraction
from typing import Any, Callable, NamedTuple

import diffrax
import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from sfd_jax.diffusion import clocks as clocks_lib
from sfd_jax.diffusion.clocks import SEMANTIC_CHANS, Schedule, clocks

VelocityFn = Callable[[jax.Array, jax.Array, jax.Array, jax.Array], jax.Array]

METHODS = ("euler", "heun", "dopri5", "sde", "meanflow")
DIFFUSION_FORMS = ("SBDM", "sigma", "linear", "constant", "decreasing",
                   "increasing-decreasing")
LAST_STEPS = ("mean", "euler", None)


class SampleOutput(NamedTuple):
  """What :func:`sample` returns (a pytree, so it can leave ``jax.jit``).

  x: the final state [N, H, W, C].
  nfe: number of velocity-function evaluations (int32 scalar).
  trajectory: states at the grid points [num_steps, N, H, W, C] (index 0 = z) when
    requested, else None. For dopri5 they are interpolated at the output grid; for the
    SDE they are the states after each step (index 0 = z, last = x).
  stats: dopri5 only: accepted / rejected / total steps, the initial step size and
    ``success``; else None.
  """
  x: jax.Array
  nfe: jax.Array
  trajectory: jax.Array | None = None
  stats: dict[str, jax.Array] | None = None


# ----------------------------------------------------------------------------------
# Time grid, clocks, masks
# ----------------------------------------------------------------------------------


def torch_linspace(start: float, end: float, steps: int, *, fused: bool = True) -> np.ndarray:
  """``torch.linspace(start, end, steps)`` in float32 on the CPU, bit for bit.

  torch's CPU kernel (``aten/src/ATen/native/cpu/RangeFactoriesKernel.cpp``, scalar loop)
  computes ``step = (end − start)/(steps − 1)`` in float32, then ``start + step·i`` for
  i < steps // 2 and ``end − step·(steps − 1 − i)`` otherwise. The kernel is compiled
  with FMA for the AVX2 / AVX-512 dispatch (and on ARM), and the compiler contracts
  each of those expressions into one fused multiply-add: the exact value is rounded to
  float32 *once*. ``fused=True`` (default) reproduces that (checked against torch 2.13
  for every step count 2..2000 on the samplers' intervals, ``tests/fixtures/
  torch_linspace.npz``); ``fused=False`` rounds the product first, as torch does on a CPU
  without FMA (``ATEN_CPU_CAPABILITY=default``). The two differ by one ulp at some points
  of the second half (e.g. 30 points on [0, 1.3]); ``np.linspace(...).astype(float32)``
  differs from both.
  """
  if steps < 1:
    raise ValueError(f"linspace needs steps >= 1, got {steps}")
  start32, end32 = np.float32(start), np.float32(end)
  if steps == 1:
    return np.array([start32], np.float32)
  step = (end32 - start32) / np.float32(steps - 1)
  first = np.arange(steps) < steps // 2
  if not fused:
    i = np.arange(steps, dtype=np.float32)
    lo = start32 + i * step
    hi = end32 - (np.float32(steps - 1) - i) * step
    return np.where(first, lo, hi).astype(np.float32)
  # Exact value of base ± step·k in float64 (step has 24 significant bits and k < 2^29,
  # so the product is exact), rounded once to float32; sums that float64 cannot hold
  # exactly (start far from step in magnitude) are redone in exact rational arithmetic.
  k = np.where(first, np.arange(steps), steps - 1 - np.arange(steps)).astype(np.float64)
  base = np.where(first, np.float64(start32), np.float64(end32))
  prod = np.where(first, 1.0, -1.0) * np.float64(step) * k
  total = base + prod
  bv = total - base                                  # TwoSum: error of base + prod
  err = (base - (total - bv)) + (prod - bv)
  out = total.astype(np.float32)
  for j in np.flatnonzero(err != 0):
    out[j] = _round_to_float32(Fraction(float(base[j])) + Fraction(float(prod[j])))
  return out


def _round_to_float32(x: Fraction) -> np.float32:
  """The float32 nearest to the rational ``x`` (ties to even)."""
  guess = np.float32(float(x))
  cands = [np.nextafter(guess, np.float32(-np.inf)), guess,
           np.nextafter(guess, np.float32(np.inf))]
  def key(c):
    return (abs(Fraction(float(c)) - x), int(np.frombuffer(c.tobytes(), np.uint32)[0]) & 1)
  return min(cands, key=key)


def shift_grid(grid: np.ndarray, shift: float, delta_t: float,
               total: float | None = None) -> np.ndarray:
  """Timestep shift τ ↦ T·g(τ/T), g(u) = s·u/(1 + (s−1)·u), T = 1 + Δt (or ``total``), in
  float32 in the reference's operation order. ``shift <= 0`` leaves the grid unchanged."""
  if shift <= 0:
    return grid
  span = 1.0 + delta_t if total is None else float(total)
  scaled = span != 1.0
  total = np.float32(span)
  u = grid.astype(np.float32)
  if scaled:
    u = u / total
  g = (np.float32(shift) * u) / (np.float32(1.0) + np.float32(shift - 1.0) * u)
  if scaled:
    g = g * total
  return g.astype(np.float32)


def time_grid(num_steps: int, delta_t: float = 0.3, shift: float = 0.0,
              end: float | None = None, total: float | None = None,
              kinks: tuple[float, ...] = ()) -> np.ndarray:
  """The reference's fixed grid over [0, T] (T = 1 + Δt or ``total``; or [0, end]):
  float32 [num_steps], plus the schedule's ``kinks`` when given (sorted, unique)."""
  if num_steps < 2:
    raise ValueError(f"num_steps counts grid points and must be >= 2, got {num_steps}")
  span = 1.0 + delta_t if total is None else float(total)
  end = span if end is None else end
  grid = shift_grid(torch_linspace(0.0, end, num_steps), shift, delta_t, span)
  if kinks:
    grid = np.unique(np.concatenate([grid, np.asarray([k for k in kinks if 0 < k < end],
                                                      np.float32)]))
  return grid


def resolve_schedule(schedule: Schedule | None, delta_t: float, semantic_chans: int,
                     channels: int) -> Schedule:
  """The schedule to integrate: the given one, or SFD's from Δt / semantic channels."""
  if schedule is None:
    return clocks_lib.sfd_schedule(delta_t, semantic_chans, channels)
  if schedule.channels != channels:
    raise ValueError(f"the schedule has {schedule.channels} channels, the latent {channels}")
  return schedule


def call_velocity(velocity_fn: VelocityFn, x: jax.Array, times, y) -> jax.Array:
  """``velocity_fn`` at per-part times (scalars broadcast to [N]), in x's dtype."""
  n = x.shape[0]
  times = [jnp.full((n,), t) if jnp.ndim(t) == 0 else t for t in times]
  v = velocity_fn(x, *clocks_lib.split_times(times), y)
  if v.shape != x.shape:
    raise ValueError(f"velocity function returned shape {v.shape}, expected {x.shape}")
  return v.astype(x.dtype)


def schedule_velocity(velocity_fn: VelocityFn, x: jax.Array, tau, y, schedule: Schedule,
                      clock_params=None, side: str | None = None) -> jax.Array:
  """t'(τ) ⊙ v(x, t(τ), y) per channel: the ODE's right-hand side for any schedule
  (``side``: which one-sided rate at a kink, see ``Clock.rate_at``)."""
  v = call_velocity(velocity_fn, x, schedule.times(tau, clock_params), y)
  rates = schedule.per_channel(schedule.rates(tau, clock_params, side))
  return v * rates.astype(x.dtype)


def _call(velocity_fn: VelocityFn, x: jax.Array, tau, y, delta_t: float) -> jax.Array:
  """Unmasked velocity at scalar τ (clocks broadcast to [N]), in x's dtype."""
  t_tex, t_sem = clocks(tau, delta_t)
  n = x.shape[0]
  v = velocity_fn(x, jnp.full((n,), t_tex), jnp.full((n,), t_sem), y)
  if v.shape != x.shape:
    raise ValueError(f"velocity function returned shape {v.shape}, expected {x.shape}")
  return v.astype(x.dtype)


# ----------------------------------------------------------------------------------
# Fixed-grid ODE solvers
# ----------------------------------------------------------------------------------


def _scan_grid(step_fn, z: jax.Array, grid: np.ndarray, return_trajectory: bool,
               extra_xs=None):
  """Runs ``x ← step_fn(x, τ_k, Δτ_k, extra_k)`` over the grid in ONE lax.scan."""
  taus = jnp.asarray(grid[:-1])
  dts = jnp.asarray(np.diff(grid).astype(np.float32))   # float32 t1 − t0, as torch

  def body(x, inp):
    tau, dt, extra = inp
    x = step_fn(x, tau, dt, extra)
    return x, (x if return_trajectory else None)

  x, traj = jax.lax.scan(body, z, (taus, dts, extra_xs))
  if return_trajectory:
    traj = jnp.concatenate([z[None], traj], axis=0)
  return x, traj


def euler(velocity_fn: VelocityFn, z: jax.Array, y, *, grid: np.ndarray, delta_t: float,
          semantic_chans: int = SEMANTIC_CHANS, return_trajectory: bool = False,
          schedule: Schedule | None = None, clock_params=None, one_sided: bool = False):
  """torchdiffeq's fixed-grid Euler: x_{k+1} = x_k + Δτ_k · m(τ_k) ⊙ v(x_k, τ_k).

  ``one_sided``: rates of the piece each step starts (for grids holding the kinks).
  Returns (x, trajectory or None, nfe = len(grid) − 1)."""
  sch = resolve_schedule(schedule, delta_t, semantic_chans, z.shape[-1])
  side = "right" if one_sided else None
  rhs = lambda x, tau: schedule_velocity(velocity_fn, x, tau, y, sch, clock_params, side)
  x, traj = _scan_grid(lambda x, tau, dt, _: x + dt * rhs(x, tau), z, grid,
                       return_trajectory)
  return x, traj, len(grid) - 1


def heun(velocity_fn: VelocityFn, z: jax.Array, y, *, grid: np.ndarray, delta_t: float,
         semantic_chans: int = SEMANTIC_CHANS, return_trajectory: bool = False,
         schedule: Schedule | None = None, clock_params=None, one_sided: bool = False):
  """Heun (explicit trapezoid, torchdiffeq's ``heun2``) on the grid; the mask belongs to
  the right-hand side, so each stage uses the mask at its own time.

  k₁ = f(τ_k, x_k), k₂ = f(τ_{k+1}, x_k + Δτ·k₁), x_{k+1} = x_k + Δτ·(k₁ + k₂)/2.
  ``one_sided``: k₁ with the rates of the piece the step starts, k₂ of the piece it ends
  (second order across kinks that are grid points).
  Returns (x, trajectory or None, nfe = 2·(len(grid) − 1))."""
  sch = resolve_schedule(schedule, delta_t, semantic_chans, z.shape[-1])
  s1, s2 = ("right", "left") if one_sided else (None, None)
  rhs = lambda x, tau, side: schedule_velocity(velocity_fn, x, tau, y, sch, clock_params,
                                               side)

  def step(x, tau, dt, tau_next):
    k1 = rhs(x, tau, s1)
    k2 = rhs(x + dt * k1, tau_next, s2)
    return x + dt * (0.5 * (k1 + k2))

  x, traj = _scan_grid(step, z, grid, return_trajectory, extra_xs=jnp.asarray(grid[1:]))
  return x, traj, 2 * (len(grid) - 1)


def meanflow(velocity_fn, z: jax.Array, y, *, grid: np.ndarray, schedule: Schedule,
             clock_params=None, return_trajectory: bool = False):
  """Few-step sampling with an average-velocity model (``objective.name="meanflow"``).

  One evaluation per grid interval [τ_i, τ_{i+1}]: the model, called as
  ``velocity_fn(x, t_a, t_b, y, interval=h)`` with the part times at τ_i and the per-part
  intervals h_k = t_k(τ_{i+1}) − t_k(τ_i), returns each part's local average velocity
  w_k, and every part jumps by its own clock's advance:
  x_k ← x_k + (t_k(τ_{i+1}) − t_k(τ_i))·w_k. A part whose clock does not move on the
  interval (before its start, after its end) stays exactly where it is, so the
  schedule's kinks are respected inside a jump without being grid points.
  Returns (x, trajectory or None, nfe = len(grid) − 1)."""
  n = z.shape[0]

  def step(x, tau, _, tau_next):
    now = schedule.times(tau, clock_params)
    then = schedule.times(tau_next, clock_params)
    gaps = tuple(b - a for a, b in zip(now, then))
    times = [jnp.full((n,), t) for t in now]
    w = velocity_fn(x, *clocks_lib.split_times(times), y, interval=gaps)
    if w.shape != x.shape:
      raise ValueError(f"velocity function returned shape {w.shape}, expected {x.shape}")
    return x + schedule.per_channel(gaps).astype(x.dtype) * w.astype(x.dtype)

  x, traj = _scan_grid(step, z, grid, return_trajectory, extra_xs=jnp.asarray(grid[1:]))
  return x, traj, len(grid) - 1


# ----------------------------------------------------------------------------------
# Adaptive dopri5 (diffrax)
# ----------------------------------------------------------------------------------


def rms_norm(tree) -> jax.Array:
  """Root mean square over every element of a pytree (torchdiffeq's error norm)."""
  leaves = jax.tree.leaves(tree)
  total = sum(jnp.sum(jnp.square(jnp.abs(a).astype(jnp.float32))) for a in leaves)
  count = sum(a.size for a in leaves)
  return jnp.sqrt(total / count)


def initial_step_size(fn: Callable[[jax.Array, jax.Array], jax.Array], t0, y0: jax.Array, *,
                      rtol, atol, order: int = 4) -> jax.Array:
  """Hairer's initial step (torchdiffeq's ``_select_initial_step``), 2 evaluations of fn.

  scale = atol + |y₀|·rtol, d₀ = RMS(y₀/scale), d₁ = RMS(f₀/scale),
  h₀ = 0.01·d₀/d₁ (1e-6 if d₀ or d₁ < 1e-5), d₂ = RMS((f(t₀+h₀, y₀+h₀f₀) − f₀)/scale)/h₀,
  h₁ = (0.01/max(d₁, d₂))^(1/(order+1)) (max(1e-6, h₀·1e-3) if max(d₁, d₂) ≤ 1e-15);
  returns min(100·h₀, h₁). torchdiffeq passes order 4 for dopri5.
  """
  t0 = jnp.asarray(t0, jnp.float32)
  scale = atol + jnp.abs(y0) * rtol
  d0 = rms_norm(y0 / scale)

  # The two evaluations run as a 2-iteration scan so fn is traced (and compiled) once.
  def body(carry, i):
    f0, h0 = carry
    f = fn(jnp.where(i == 0, t0, t0 + h0), jnp.where(i == 0, y0, y0 + h0 * f0))
    d1 = rms_norm(f / scale)
    small = (d0 < 1e-5) | (d1 < 1e-5)
    h0_new = jnp.where(small, 1e-6, 0.01 * d0 / jnp.where(small, 1.0, d1))
    return (jnp.where(i == 0, f, f0), jnp.where(i == 0, h0_new, h0)), f

  (f0, h0), (_, f1) = jax.lax.scan(
      body, (jnp.zeros_like(y0), jnp.zeros((), jnp.float32)), jnp.arange(2))
  d1 = rms_norm(f0 / scale)
  d2 = rms_norm((f1 - f0) / scale) / h0
  dmax = jnp.maximum(d1, d2)
  tiny = dmax <= 1e-15
  h1 = jnp.where(tiny, jnp.maximum(1e-6, h0 * 1e-3),
                 (0.01 / jnp.where(tiny, 1.0, dmax)) ** (1.0 / (order + 1)))
  return jnp.minimum(100 * h0, h1).astype(jnp.float32)


class _CountingController(diffrax.AbstractAdaptiveStepSizeController):
  """Wraps a step-size controller and counts Dopri5's vector-field evaluations per step.

  The controller sees every attempted step (accepted or rejected) and its state is never
  rolled back, so it can keep the count inside the compiled loop. Dopri5 is FSAL: an
  attempt costs 6 evaluations, plus 1 when the first stage has to be (re)computed, which
  diffrax does on the very first step and on every attempt after a jump until one is
  accepted (rule of diffrax's ``AbstractRungeKutta.step`` and ``_integrate``; the tests
  check the total against a host-side counter). Needs an explicit ``dt0``.
  """

  controller: diffrax.AbstractAdaptiveStepSizeController
  evals_per_step: int = eqx.field(static=True, default=6)

  @property
  def rtol(self):
    return self.controller.rtol

  @property
  def atol(self):
    return self.controller.atol

  @property
  def norm(self):  # pyright: ignore[reportIncompatibleMethodOverride]
    return self.controller.norm

  def wrap(self, direction):
    return _CountingController(self.controller.wrap(direction), self.evals_per_step)

  def init(self, terms, t0, t1, y0, dt0, args, func, error_order):
    if dt0 is None:
      raise ValueError("_CountingController needs an explicit dt0 (diffrax's own initial "
                       "step selection is not counted)")
    t1, inner = self.controller.init(terms, t0, t1, y0, dt0, args, func, error_order)
    return t1, (inner, jnp.asarray(0, jnp.int32), jnp.asarray(True))

  def adapt_step_size(self, t0, t1, y0, y1_candidate, args, y_error, error_order,
                      controller_state):
    inner, count, first_stage = controller_state
    keep, next_t0, next_t1, made_jump, inner, result = self.controller.adapt_step_size(
        t0, t1, y0, y1_candidate, args, y_error, error_order, inner)
    count = count + self.evals_per_step + first_stage.astype(jnp.int32)
    first_stage = jnp.where(keep, jnp.asarray(made_jump, bool), first_stage)
    return keep, next_t0, next_t1, made_jump, (inner, count, first_stage), result


def dopri5(velocity_fn: VelocityFn, z: jax.Array, y, *, delta_t: float,
           semantic_chans: int = SEMANTIC_CHANS, rtol: float = 1e-3, atol: float = 1e-6,
           jump_ts: bool = False, max_steps: int = 4096, save_grid: np.ndarray | None = None,
           throw: bool = False, schedule: Schedule | None = None, clock_params=None):
  """Adaptive Dormand–Prince 5(4) over [0, 1 + Δt] with diffrax.

  ``PIDController(rtol, atol)`` with the RMS norm over the whole batch (one shared step
  sequence, as torchdiffeq) and torchdiffeq's initial step (:func:`initial_step_size`;
  diffrax 0.7's own selection silently falls back to 0.01 for wrapped terms).
  ``jump_ts=True`` tells the controller about the mask discontinuities at τ = Δt and
  τ = 1 (the reference does not; its steps get rejected there instead). Unlike
  torchdiffeq, diffrax clips the last step at the end point.

  Returns (x, trajectory at ``save_grid`` or None, nfe, stats). nfe counts every
  evaluation: 2 for the initial step, then 6 or 7 per attempted step. With
  ``throw=False`` a failed solve (e.g. ``max_steps`` reached) is reported in
  ``stats["success"]`` instead of raising.
  """
  sch = resolve_schedule(schedule, delta_t, semantic_chans, z.shape[-1])
  t_end = sch.total

  def rhs(tau, x):
    return schedule_velocity(velocity_fn, x, tau, y, sch, clock_params)

  dt0 = initial_step_size(rhs, 0.0, z, rtol=rtol, atol=atol)
  pid = diffrax.PIDController(rtol=rtol, atol=atol, norm=rms_norm)
  if jump_ts:
    jumps = list(sch.kinks)
    if jumps:
      pid = diffrax.ClipStepSizeController(pid, jump_ts=jnp.asarray(jumps, jnp.float32))
  if save_grid is not None:
    saveat = diffrax.SaveAt(ts=jnp.asarray(save_grid), controller_state=True)
  else:
    saveat = diffrax.SaveAt(t1=True, controller_state=True)
  sol = diffrax.diffeqsolve(
      diffrax.ODETerm(lambda tau, x, _: rhs(tau, x)), diffrax.Dopri5(),
      t0=jnp.float32(0.0), t1=jnp.float32(t_end), dt0=dt0, y0=z, saveat=saveat,
      stepsize_controller=_CountingController(pid), max_steps=max_steps, throw=throw)
  _, step_evals, _ = sol.controller_state
  stats = {"num_steps": sol.stats["num_steps"],
           "num_accepted_steps": sol.stats["num_accepted_steps"],
           "num_rejected_steps": sol.stats["num_rejected_steps"],
           "initial_step": dt0,
           "success": sol.result == diffrax.RESULTS.successful}
  nfe = step_evals + 2
  if save_grid is not None:
    return sol.ys[-1], sol.ys, nfe, stats
  return sol.ys[0], None, nfe, stats


# ----------------------------------------------------------------------------------
# Euler–Maruyama SDE
# ----------------------------------------------------------------------------------


def diffusion_coefficient(t: jax.Array, form: str = "SBDM", norm: float = 1.0) -> jax.Array:
  """w(t) of the reference's ``ICPlan.compute_diffusion`` for the linear path.

  SBDM: norm·(1−t)/t (the score-based-model choice β_t), sigma/linear: norm·(1−t),
  constant: norm, decreasing: ¼·(norm·cos πt + 1)², increasing-decreasing: norm·sin²πt.
  """
  if form == "SBDM":
    return norm * (1.0 - t) / t
  if form in ("sigma", "linear"):
    return norm * (1.0 - t)
  if form == "constant":
    return jnp.full_like(t, norm)
  if form == "decreasing":
    return 0.25 * jnp.square(norm * jnp.cos(math.pi * t) + 1.0)
  if form == "increasing-decreasing":
    return norm * jnp.square(jnp.sin(math.pi * t))
  raise ValueError(f"diffusion_form {form!r} not in {DIFFUSION_FORMS}")


def _sde_drift(v, x, t, w_on, form, norm):
  """SDE drift v + w·score per channel and the diffusion w (0 where not ``w_on``).

  Linear path, velocity model: score = (t·v − x)/(1 − t). ``t`` is [C] (per-part clock
  per channel); entries with ``w_on`` False get w = 0 and a finite placeholder clock.
  """
  t_safe = jnp.where(w_on, t, 0.5)
  w = jnp.where(w_on, diffusion_coefficient(t_safe, form, norm), 0.0)
  score = (t_safe * v - x) / (1.0 - t_safe)
  return v + w * score, w


def euler_maruyama(velocity_fn: VelocityFn, z: jax.Array, y, key: jax.Array, *,
                   num_steps: int, delta_t: float, semantic_chans: int = SEMANTIC_CHANS,
                   diffusion_form: str = "SBDM", diffusion_norm: float = 1.0,
                   last_step: str | None = "mean", last_step_size: float = 0.04,
                   t_min: float = 0.04, return_trajectory: bool = False,
                   schedule: Schedule | None = None, clock_params=None):
  """Semantic-first Euler–Maruyama sampler.

  Reference rule (SiT's ``sample_sde``, linear path, velocity model): the SDE
  dx = [v + w(t)·s(x,t)] dt + √(2·w(t)) dW with score s = (t·v − x)/(1 − t), integrated
  by Euler–Maruyama on ``linspace(t0, 1 − h, num_steps)`` (``num_steps − 1`` noisy steps
  with velocity, score and w at the left point), then one noise-free last step of size
  h = ``last_step_size`` to t = 1: ``mean`` x + (v + w·s)·h (the default), ``euler``
  x + v·h, or None (no last step, grid up to 1). Defaults as the reference: SBDM with
  norm 1, ``mean`` last step, h = 0.04.

  Semantic-first version: the same on the global grid ``linspace(0, 1 + Δt − h,
  num_steps)``, each part with its own clock (t_tex, t_sem at the left point) and phase
  mask (a frozen part gets neither drift nor noise), then the last step at τ = 1 + Δt − h
  for the parts still active (the texture; t_tex = 1 − h there). Two choices make the
  rule well-defined where the reference's is not:

  * The reference starts at t0 = sample_eps = 0 for a velocity model, where SBDM's
    w = (1−t)/t is infinite; here a part's noise and score term are off while its clock
    is below ``t_min`` (plain Euler steps there). The texture clock restarts from 0 at
    τ = Δt, so this matters for both parts.
  * The semantic part reaches t = 1 inside the grid (at τ = 1) and gets no separate last
    step; its steps with t_sem ≥ 1 − h use the last-step rule instead (noise-free), so
    both parts end the same way. At t = 1 the score term is dropped (w·s is 0·∞ there).

  ``key`` draws one standard normal per element and step (``jax.random.split`` by step);
  with JAX's default threefry keys the draws do not depend on how x is sharded.

  Any schedule: a part with rate t_k'(τ) follows the same SDE in its own time, i.e. in τ
  its drift is scaled by t_k' and its noise variance by t_k' (dt_k = t_k'·dτ); for offset
  clocks t_k' is the phase mask and nothing changes. The last step has size h in τ.
  Returns (x, trajectory or None, nfe).
  """
  if diffusion_form not in DIFFUSION_FORMS:
    raise ValueError(f"diffusion_form {diffusion_form!r} not in {DIFFUSION_FORMS}")
  if last_step not in LAST_STEPS:
    raise ValueError(f"last_step {last_step!r} not in {LAST_STEPS}")
  h = 0.0 if last_step is None else float(last_step_size)
  if last_step is not None and not 0.0 < h < 1.0:
    raise ValueError(f"last_step_size must be in (0, 1), got {last_step_size}")
  sch = resolve_schedule(schedule, delta_t, semantic_chans, z.shape[-1])
  grid = time_grid(num_steps, delta_t, end=sch.total - h, total=sch.total)

  def per_channel(tau):
    times = sch.times(tau, clock_params)
    rate = sch.per_channel(sch.rates(tau, clock_params))
    return times, sch.per_channel(times), rate

  def last_rule(v, x, t):
    if last_step == "mean":
      return _sde_drift(v, x, t, t < 1.0, diffusion_form, diffusion_norm)[0]
    return v

  def em_step(x, tau, dt, step_key):
    times, t, rate = per_channel(tau)
    v = call_velocity(velocity_fn, x, times, y)
    active = rate > 0
    dt = dt * rate          # each part's own time step (exactly dt where the rate is 1)
    noisy = (t >= t_min) & (t < 1.0 - h)
    drift, w = _sde_drift(v, x, t, noisy, diffusion_form, diffusion_norm)
    if last_step is not None:
      drift = jnp.where(t >= 1.0 - h, last_rule(v, x, t), drift)
    # Drawn flat: the same numbers as drawing x.shape directly (threefry counts in
    # row-major order) but several times faster for XLA:CPU to compile.
    noise = jax.random.normal(step_key, (x.size,), x.dtype).reshape(x.shape)
    update = drift * dt + jnp.sqrt(2.0 * w * dt) * noise
    return jnp.where(active, x + update, x)

  keys = jax.random.split(key, num_steps - 1)
  x, traj = _scan_grid(em_step, z, grid, return_trajectory, extra_xs=keys)
  nfe = num_steps - 1
  if last_step is not None:
    tau = jnp.asarray(grid[-1])
    times, t, rate = per_channel(tau)
    v = call_velocity(velocity_fn, x, times, y)
    active = rate > 0
    x_last = jnp.where(active, x + (jnp.float32(h) * rate) * last_rule(v, x, t), x)
    if return_trajectory:
      traj = jnp.concatenate([traj, x_last[None]], axis=0)
    x = x_last
    nfe += 1
  return x, traj, nfe


# ----------------------------------------------------------------------------------
# Single entry point
# ----------------------------------------------------------------------------------


def model_clocks(velocity_fn, delta_t: float | None = None,
                 semantic_chans: int | None = None) -> tuple[float, int]:
  """(Δt, semantic channels) for ``velocity_fn``: explicit values win, else the model
  config it carries (a ``LightningDiT`` or a ``make_guided_velocity`` function: ``.cfg``;
  a synchronous model has no semantic part), else SFD's 0.3 / 16."""
  cfg = getattr(velocity_fn, "cfg", None)
  if delta_t is None:
    delta_t = float(getattr(cfg, "delta_t", 0.3)) if cfg is not None else 0.3
  if semantic_chans is None:
    if cfg is not None and hasattr(cfg, "semantic_chans"):
      semantic_chans = int(cfg.semantic_chans) if getattr(cfg, "semantic_first", True) else 0
    else:
      semantic_chans = SEMANTIC_CHANS
  return delta_t, semantic_chans


def sample(velocity_fn: VelocityFn, z: jax.Array, y, *, method: str = "dopri5",
           num_steps: int = 250, delta_t: float | None = None,
           semantic_chans: int | None = None, atol: float = 1e-6, rtol: float = 1e-3,
           shift: float = 0.0, key: jax.Array | None = None, jump_ts: bool = False,
           max_steps: int = 4096, return_trajectory: bool = False, throw: bool = False,
           diffusion_form: str = "SBDM", diffusion_norm: float = 1.0,
           last_step: str | None = "mean", last_step_size: float = 0.04,
           sde_t_min: float = 0.04, schedule: Schedule | None = None, clock_params=None,
           grid_kinks: bool = False) -> SampleOutput:
  """Integrates the semantic-first ODE (or SDE) from noise ``z`` [N, H, W, C] to data.

  Args:
    velocity_fn: ``fn(x, t_tex, t_sem, y) -> v`` (e.g. from ``make_guided_velocity``).
    z: initial noise, all channels (semantic included).
    y: labels [N] (passed through to ``velocity_fn``).
    method: ``euler``/``heun`` (fixed grid), ``dopri5`` (adaptive, diffrax), ``sde``
      (Euler–Maruyama, needs ``key``) or ``meanflow`` (jumps of an average-velocity
      model, :func:`meanflow`; ``velocity_fn`` takes ``interval=``).
    num_steps: grid points of ``linspace(0, 1 + Δt, num_steps)``: Euler/Heun take
      num_steps − 1 steps; for dopri5 it only defines the returned trajectory; for
      ``meanflow`` it is the number of jumps (grid of num_steps + 1 points).
    delta_t: semantic lead Δt (0: synchronous model, plain [0, 1] flow); default: the
      model's (``velocity_fn.cfg``, see :func:`model_clocks`), else 0.3.
    semantic_chans: trailing semantic channels (masking; irrelevant when Δt = 0);
      default: the model's, else 16.
    atol, rtol, jump_ts, max_steps, throw: dopri5 options (see :func:`dopri5`).
    shift: timestep shift s of the fixed grid (0 = off; not defined for the SDE).
    key: PRNG key of the SDE noise.
    return_trajectory: also return the states on the grid.
    diffusion_form, diffusion_norm, last_step, last_step_size, sde_t_min: SDE options
      (see :func:`euler_maruyama`).
    schedule: the clock schedule (None: SFD's from ``delta_t``/``semantic_chans``); its
      ``total`` replaces 1 + Δt.
    clock_params: ``{part: φ}`` of its learned clocks.
    grid_kinks: add the schedule's kinks to the Euler/Heun grid and use one-sided rates
      there (keeps their order for clocks with kinks; off = the reference's grid and
      phase mask).
  """
  if method not in METHODS:
    raise ValueError(f"sampling method {method!r} not in {METHODS}")
  delta_t, semantic_chans = model_clocks(velocity_fn, delta_t, semantic_chans)
  if not 0.0 <= delta_t <= 1.0:
    raise ValueError(f"delta_t must be in [0, 1], got {delta_t}")
  if z.ndim != 4:
    raise ValueError(f"z must be [N, H, W, C] (channels last), got shape {z.shape}")
  if schedule is None and not 0 <= semantic_chans <= z.shape[-1]:
    raise ValueError(f"semantic_chans={semantic_chans} must be in [0, {z.shape[-1]}]")
  sch = resolve_schedule(schedule, delta_t, semantic_chans, z.shape[-1])
  sched_kw = dict(schedule=sch, clock_params=clock_params)
  if method == "meanflow":
    if num_steps < 1:
      raise ValueError(f"meanflow counts jumps: num_steps must be >= 1, got {num_steps}")
    grid = time_grid(num_steps + 1, delta_t, shift, total=sch.total,
                     kinks=sch.kinks if grid_kinks else ())
    x, traj, nfe = meanflow(velocity_fn, z, y, grid=grid,
                            return_trajectory=return_trajectory, **sched_kw)
    return SampleOutput(x, jnp.asarray(nfe, jnp.int32), traj)
  if method in ("euler", "heun"):
    grid = time_grid(num_steps, delta_t, shift, total=sch.total,
                     kinks=sch.kinks if grid_kinks else ())
    solver = euler if method == "euler" else heun
    x, traj, nfe = solver(velocity_fn, z, y, grid=grid, delta_t=delta_t,
                          semantic_chans=semantic_chans,
                          return_trajectory=return_trajectory, one_sided=grid_kinks,
                          **sched_kw)
    return SampleOutput(x, jnp.asarray(nfe, jnp.int32), traj)
  if method == "dopri5":
    grid = time_grid(num_steps, delta_t, shift, total=sch.total) if return_trajectory \
        else None
    x, traj, nfe, stats = dopri5(velocity_fn, z, y, delta_t=delta_t,
                                 semantic_chans=semantic_chans, rtol=rtol, atol=atol,
                                 jump_ts=jump_ts, max_steps=max_steps, save_grid=grid,
                                 throw=throw, **sched_kw)
    return SampleOutput(x, nfe, traj, stats)
  if key is None:
    raise ValueError("method 'sde' needs a PRNG key (key=...)")
  if shift > 0:
    raise ValueError("the timestep shift is defined for the ODE grid only, not for 'sde'")
  x, traj, nfe = euler_maruyama(
      velocity_fn, z, y, key, num_steps=num_steps, delta_t=delta_t,
      semantic_chans=semantic_chans, diffusion_form=diffusion_form,
      diffusion_norm=diffusion_norm, last_step=last_step, last_step_size=last_step_size,
      t_min=sde_t_min, return_trajectory=return_trajectory, **sched_kw)
  return SampleOutput(x, jnp.asarray(nfe, jnp.int32), traj)


def describe(output: SampleOutput) -> dict[str, Any]:
  """Host-side summary (ints/bools) of a :class:`SampleOutput` for logging."""
  out = {"nfe": int(output.nfe)}
  if output.stats is not None:
    for k, v in output.stats.items():
      out[k] = bool(v) if k == "success" else (float(v) if k == "initial_step" else int(v))
  return out
