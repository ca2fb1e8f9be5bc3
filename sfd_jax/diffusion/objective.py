"""Semantic-first flow-matching objective (docs/method.md §6).

Path: x_t = t·x₁ + (1 − t)·x₀ with t = 0 noise and t = 1 data; target u = x₁ − x₀.
Semantic-first clocks (``sfd_jax.diffusion.clocks``): τ = t·(1 + Δt), t_sem = min(τ, 1),
t_tex = max(τ − Δt, 0); the texture channels [0:C−S] follow t_tex and the semantic
channels [C−S:C] follow t_sem.
Clamped samples are still supervised on every channel.

The clocks come from a :class:`sfd_jax.diffusion.clocks.Schedule` (``cfg.schedule``; None
= SFD's two parts from ``delta_t``/``semantic_chans``/``semantic_weight``, bit-identical
to the code before schedules existed): every part k follows its own clock t_k(τ) at the
training draw τ = t·T, its channels get the path t_k·x₁ + (1 − t_k)·x₀ and the target
x₁ − x₀, and its MSE weight is the part's ``loss_weight`` (which generalises
``semantic_weight``).

Learned clocks (parts with ``family="learned"``; their parameters φ are the denoiser's
``clock_<part>`` parameters, passed as ``clock_params``) are trained with the same loss,
*schedule-corrected*: inside a learned part's window its MSE is reweighted by
w = p_τ(τ_base(t_k))·t_k'(τ) / (p_τ(τ)·rate), the ratio of the density of its local time
t_k under the base (φ = 0) clock to that under the current clock, clipped to
[0, ``clock_weight_max``]. So moving the clock does not change how much each local noise
level of a part is trained; what φ can change is which *combinations* of per-part times
the denoiser sees, and the gradient prefers the ones that make denoising easier. A
kinetic-energy penalty ``clock_energy_weight``·Σ_k ∫ t_k'(τ)² dτ (minimal for the
uniform clock) keeps the clocks from becoming steep (docs/clocks.md).

Loss terms, each per example and then averaged over the batch:

* ``mse``: mean over all H·W·C elements of w_c·(v̂ − u)², w_c = ``semantic_weight`` on the
  semantic channels and 1 elsewhere (divided by the element count, not the weight sum);
* ``cos``: mean over positions of 1 − cos(v̂, u) over the channel vector (unweighted);
* ``repa``: ``repa_weight`` × (mode ``cos``: mean over tokens of 1 − cos(f, ĝ); ``mse``:
  mean of (f − ĝ)²; ``cos_mse``: their average).

Deviation from the reference (documented, switchable): the reference adds the REPA term
only when the cosine loss is also on, so ``use_cosine_loss=False`` silently drops REPA.
Here REPA is independent; ``repa_requires_cosine=True`` restores the reference behaviour.

Average-velocity training (``name="meanflow"``, :func:`meanflow_losses`, docs/fewstep.md):
the denoiser w_θ(x_τ, τ, ρ, y) predicts, per part k, the *local average velocity* of a
jump from global time τ to ρ ≥ τ along the sampling ODE dx_k/dτ = t_k'(τ)·v_k, so that
x_k(ρ) = x_k(τ) + (t_k(ρ) − t_k(τ))·w_k. With U_k = s_k·w_k the average velocity in τ
(s_k = (t_k(ρ) − t_k(τ))/(ρ − τ), the part's average rate), the MeanFlow identity
U = V − (τ − ρ)·dU/dτ (V_k = t_k'(τ)·v_k, dU/dτ the total derivative along the path) reads

  w_k = w_k + r_k·(v_k − w_k) + (ρ − τ)·dw_k/dτ,   r_k = t_k'(τ)/s_k,

and the regression target is its right-hand side with the conditional velocity
u = x₁ − x₀ for v_k and dw/dτ = ∂_x w·V + ∂_τ w from one ``jax.jvp`` (stop-gradient). At
ρ = τ (r_k = 1) the target is u: the flow-matching loss above, bit for bit. A part that
does not move on [τ, ρ] (s_k = 0) is supervised with u as a clamped part is in flow
matching; a part clamped at τ that moves later (t_k'(τ) = 0) gets r_k = 0. The MSE of a
part is weighted by min(1, 1/r_k²), which keeps the target's noise r_k·(u − v_k) no larger
than flow matching's (r_k > 1 where a part finishes inside [τ, ρ]).
"""
from __future__ import annotations

import dataclasses
from typing import Callable, Mapping

import jax
import jax.numpy as jnp

from sfd_jax.core.errors import ConfigError
from sfd_jax.diffusion import clocks

TIME_SAMPLERS = ("logit_normal", "uniform")
OBJECTIVES = ("flow_matching", "meanflow")


@dataclasses.dataclass(frozen=True)
class MeanFlowConfig:
  """Options of the average-velocity objective (``config.objective.meanflow``).

  equal_fraction: share of examples trained at ρ = τ (plain flow matching); the others
    draw two times and jump from the earlier to the later (the MeanFlow paper: 0.75).
  adaptive_p, adaptive_c: per-example weight sg(1/(mse + c)^p) of the MSE term (the
    paper's adaptive loss weighting; p = 0: off, the paper uses p = 1, c = 1e-3).
  """

  equal_fraction: float = 0.75
  adaptive_p: float = 0.0
  adaptive_c: float = 1e-3

  def __post_init__(self):
    if not 0.0 <= self.equal_fraction <= 1.0:
      raise ValueError(f"meanflow.equal_fraction must be in [0, 1], got {self.equal_fraction}")
    if self.adaptive_p < 0 or self.adaptive_c <= 0:
      raise ValueError(f"meanflow.adaptive_p must be >= 0 and adaptive_c > 0, got "
                       f"{self.adaptive_p}, {self.adaptive_c}")
REPA_MODES = ("cos", "mse", "cos_mse")
COS_EPS = 1e-8  # torch.nn.functional.cosine_similarity's eps


@dataclasses.dataclass(frozen=True)
class ObjectiveConfig:
  delta_t: float = 0.3
  semantic_chans: int = 16
  semantic_weight: float = 2.0
  time_sampler: str = "logit_normal"
  logit_mean: float = 0.0
  logit_std: float = 1.0
  use_cosine_loss: bool = True
  use_repa: bool = True
  repa_mode: str = "cos"
  repa_weight: float = 1.0
  repa_requires_cosine: bool = False
  schedule: clocks.Schedule | None = None    # None: SFD's two parts from the fields above
  clock_energy_weight: float = 0.1           # learned clocks only (see the docstring)
  clock_correction: bool = True
  clock_weight_max: float = 10.0
  name: str = "flow_matching"                # or "meanflow" (average velocity, few steps)
  meanflow: MeanFlowConfig = MeanFlowConfig()

  def schedule_for(self, channels: int) -> clocks.Schedule:
    """The schedule of a latent with ``channels`` channels."""
    if self.schedule is not None:
      if self.schedule.channels != channels:
        raise ValueError(f"the schedule has {self.schedule.channels} channels, the latent "
                         f"{channels}")
      return self.schedule
    return clocks.sfd_schedule(self.delta_t, self.semantic_chans, channels,
                               self.semantic_weight)

  def __post_init__(self):
    if not 0.0 <= self.delta_t <= 1.0:
      raise ValueError(f"delta_t must be in [0, 1], got {self.delta_t}")
    if self.time_sampler not in TIME_SAMPLERS:
      raise ValueError(f"time_sampler {self.time_sampler!r} not in {TIME_SAMPLERS}")
    if self.repa_mode not in REPA_MODES:
      raise ValueError(f"repa_mode {self.repa_mode!r} not in {REPA_MODES}")
    if self.name not in OBJECTIVES:
      raise ValueError(f"name {self.name!r} not in {OBJECTIVES}")
    if isinstance(self.meanflow, Mapping):
      object.__setattr__(self, "meanflow", MeanFlowConfig(**self.meanflow))

  @classmethod
  def from_config(cls, config) -> "ObjectiveConfig":
    """From a run config: ``config.objective`` fields, ``semantic_chans`` of
    ``config.model``; REPA is on only when both ``objective.use_repa`` (default True) and
    ``model.use_repa`` are. An unknown ``config.objective`` field is an error naming it."""
    o = config.objective.to_dict()
    unknown = set(o) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise ConfigError(f"config.objective has unknown fields {sorted(unknown)}")
    o["semantic_chans"] = config.model.semantic_chans
    o["use_repa"] = bool(o.get("use_repa", True) and config.model.use_repa)
    if "schedule" in o:
      raise ConfigError("config.objective.schedule is not a field: the schedule is the "
                        "top-level section config.schedule")
    section = config.get("schedule") if hasattr(config, "get") else None
    if section is not None and section.get("parts"):
      o["schedule"] = clocks.from_config(config)
    return cls(**o)

  @property
  def repa_active(self) -> bool:
    return self.use_repa and (self.use_cosine_loss or not self.repa_requires_cosine)


# Global training time t ∈ [0,1] → (t_tex, t_sem); Δt = 0 gives (t, t). (Old name.)
semantic_first_times = clocks.training_clocks


def sample_times(key: jax.Array, n: int, cfg: ObjectiveConfig) -> jax.Array:
  if cfg.time_sampler == "logit_normal":
    return jax.nn.sigmoid(cfg.logit_mean + cfg.logit_std * jax.random.normal(key, (n,)))
  return jax.random.uniform(key, (n,))


def interpolate(x0: jax.Array, x1: jax.Array, t_tex: jax.Array, t_sem: jax.Array,
                semantic_chans: int) -> tuple[jax.Array, jax.Array]:
  """Per-part linear path; x [N, H, W, C]. Returns (x_t, u_t)."""
  sem = clocks.semantic_channel_mask(x1.shape[-1], semantic_chans)
  t = jnp.where(sem[None], t_sem[:, None], t_tex[:, None])[:, None, None, :]
  return t * x1 + (1 - t) * x0, x1 - x0


def interpolate_parts(x0: jax.Array, x1: jax.Array, times, schedule: clocks.Schedule):
  """The per-part path for any schedule: ``times`` one [N] array per part."""
  t = schedule.per_channel(times)[:, None, None, :]
  return t * x1 + (1 - t) * x0, x1 - x0


def _time_density_ratio(t_a, t_b, cfg: ObjectiveConfig) -> jax.Array:
  """p(t_a) / p(t_b) of the training time sampler (uniform: 1)."""
  if cfg.time_sampler == "uniform":
    return jnp.ones_like(t_a)
  eps = 1e-6

  def log_p(t):
    t = jnp.clip(t, eps, 1.0 - eps)
    z = (jnp.log(t) - jnp.log1p(-t) - cfg.logit_mean) / cfg.logit_std
    return -0.5 * z * z - jnp.log(t) - jnp.log1p(-t)
  return jnp.exp(log_p(t_a) - log_p(t_b))


def clock_correction(schedule: clocks.Schedule, t: jax.Array, times, clock_params,
                     cfg: ObjectiveConfig) -> list[jax.Array]:
  """Per-part [N] loss weights keeping each learned part's local-time density that of
  its base clock (1 for the other parts and outside a learned part's window)."""
  total = schedule.total
  tau = t * jnp.float32(total)
  out = []
  for part, tk in zip(schedule.parts, times):
    ck = part.clock
    if not ck.learned:
      out.append(jnp.ones_like(t))
      continue
    phi = None if clock_params is None else clock_params.get(part.name)
    rate = ck.rate_at(tau, total, phi)
    tau_base = jnp.float32(ck.start) + tk / jnp.float32(ck.rate)
    ratio = _time_density_ratio(tau_base / jnp.float32(total), t, cfg)
    w = jnp.clip(ratio * rate / jnp.float32(ck.rate), 0.0, cfg.clock_weight_max)
    inside = (tau > jnp.float32(ck.start)) & (tau < jnp.float32(ck.end))
    out.append(jnp.where(inside, w, 1.0))
  return out


def cosine_similarity(a: jax.Array, b: jax.Array, axis: int = -1) -> jax.Array:
  a = a.astype(jnp.float32)
  b = b.astype(jnp.float32)
  num = jnp.sum(a * b, axis=axis)
  # As torch: clamp the *product* of squared norms, so a zero vector (e.g. the
  # zero-initialised output layer at step 0) has a finite (zero) gradient.
  sq = jnp.sum(a * a, axis=axis) * jnp.sum(b * b, axis=axis)
  return num / jnp.sqrt(jnp.maximum(sq, COS_EPS * COS_EPS))


def velocity_losses(pred: jax.Array, target: jax.Array, cfg: ObjectiveConfig,
                    example_weights=None) -> dict[str, jax.Array]:
  """Per-example weighted MSE and cosine velocity loss; pred/target [N, H, W, C].

  The MSE weight of a channel is its part's ``loss_weight`` (SFD: 1 on texture,
  ``semantic_weight`` on semantic), times ``example_weights`` (per part, [N]) if given."""
  pred = pred.astype(jnp.float32)
  sch = cfg.schedule_for(pred.shape[-1])
  w = sch.per_channel([jnp.float32(lw) for lw in sch.loss_weights])
  if example_weights is not None:
    w = w * sch.per_channel(example_weights)[:, None, None, :]
  mse = jnp.mean(w * jnp.square(pred - target), axis=(1, 2, 3))
  cos = jnp.mean(1.0 - cosine_similarity(pred, target, axis=-1), axis=(1, 2))
  return {"mse": mse, "cos": cos}


def repa_loss(proj: jax.Array, target: jax.Array, mode: str, weight: float) -> jax.Array:
  """Per-example REPA term; proj/target [N, T, F] (target: raw DINO tokens)."""
  proj = proj.astype(jnp.float32)
  target = target.astype(jnp.float32)
  cos = jnp.mean(1.0 - cosine_similarity(target, proj, axis=-1), axis=1)
  mse = jnp.mean(jnp.square(target - proj), axis=(1, 2))
  value = {"cos": cos, "mse": mse, "cos_mse": 0.5 * (cos + mse)}[mode]
  return weight * value


ApplyFn = Callable[..., tuple[jax.Array, jax.Array | None]]


def training_losses(apply_fn: ApplyFn, x1: jax.Array, y: jax.Array, key: jax.Array,
                    cfg: ObjectiveConfig, repa_target: jax.Array | None = None,
                    x0: jax.Array | None = None, t: jax.Array | None = None,
                    clock_params=None):
  """SFD training loss for a batch.

  Args:
    apply_fn: ``apply_fn(x_t, t_tex, t_sem, y, label_drop_key) -> (velocity, repa_proj)``
      (``repa_proj`` may be None when REPA is off). For a schedule of K ≠ 2 parts it is
      called as ``apply_fn(x_t, (t_1, ..., t_K), None, y, key)``.
    x1: clean composite latents [N, H, W, C] (normalised).
    y: labels [N].
    key: PRNG key of this step; noise, times and label dropout are split from it (draw
      it as ``fold_in(base_key, step)``; under jit the draws are for the *global* batch,
      so every example — on any device — gets its own noise).
    repa_target: DINO features [N, T, F] or None.
    x0, t: optional fixed noise / times (tests, parity).
    clock_params: ``{part: φ}`` of the learned clocks (None: φ = 0).

  Returns:
    (loss scalar, dict of batch-mean terms and the per-example tensors under "per_example").
  """
  n = x1.shape[0]
  k_noise, k_time, k_drop = jax.random.split(key, 3)
  if x0 is None:
    x0 = jax.random.normal(k_noise, x1.shape, jnp.float32)
  if t is None:
    t = sample_times(k_time, n, cfg)
  sch = cfg.schedule_for(x1.shape[-1])
  times = sch.training_times(t, clock_params)
  xt, ut = interpolate_parts(x0, x1.astype(jnp.float32), times, sch)
  pred, proj = apply_fn(xt, *clocks.split_times(times), y, k_drop)
  learned = bool(sch.learned_parts)
  corr = (clock_correction(sch, t, times, clock_params, cfg)
          if learned and cfg.clock_correction else None)
  terms = velocity_losses(pred, ut, cfg, example_weights=corr)
  return _total_loss(jnp.mean(terms["mse"]), terms, {}, cfg, sch, clock_params, proj,
                     repa_target, {"t": t, "times": times, "xt": xt, "ut": ut, "pred": pred})


def _total_loss(mse_loss, terms, metrics, cfg: ObjectiveConfig, sch: clocks.Schedule,
                clock_params, proj, repa_target, per_example):
  """(loss, metrics) of a batch from its per-example ``terms`` ("mse", "cos") and the
  batch-mean MSE term ``mse_loss``: adds the cosine, clock-energy and REPA terms, the
  batch means to ``metrics`` and the per-example tensors under "per_example"."""
  total = mse_loss
  metrics = {"loss_mse": jnp.mean(terms["mse"]), "loss_cos": jnp.mean(terms["cos"]),
             **metrics}
  if cfg.use_cosine_loss:
    total = total + jnp.mean(terms["cos"])
  if sch.learned_parts:
    energy = sch.kinetic_energy(clock_params)
    metrics["clock_energy"] = energy
    total = total + jnp.float32(cfg.clock_energy_weight) * energy
  if cfg.repa_active and repa_target is not None:
    if proj is None:
      raise ValueError("REPA is on but the model returned no projection (use_repa=False?)")
    terms["repa"] = repa_loss(proj, repa_target, cfg.repa_mode, cfg.repa_weight)
    metrics["loss_repa"] = jnp.mean(terms["repa"])
    total = total + metrics["loss_repa"]
  metrics["loss"] = total
  per_example = {**terms, **per_example}
  times = per_example["times"]
  if len(times) == 2:
    per_example["t_tex"], per_example["t_sem"] = times
  metrics["per_example"] = per_example
  return total, metrics


# ----------------------------------------------------------------------------------
# Average velocity (MeanFlow) over the multi-clock path
# ----------------------------------------------------------------------------------


def sample_time_pairs(key: jax.Array, n: int, cfg: ObjectiveConfig):
  """(t, r) training draws in [0, 1] with t ≤ r (jump from τ = t·T to ρ = r·T).

  t of the ρ = τ examples (``meanflow.equal_fraction`` of them) is exactly
  :func:`sample_times`'s draw from ``key``; the others take the smaller and larger of that
  draw and a second one."""
  t = sample_times(key, n, cfg)
  other = sample_times(jax.random.fold_in(key, 1), n, cfg)
  equal = jax.random.uniform(jax.random.fold_in(key, 2), (n,)) < cfg.meanflow.equal_fraction
  return (jnp.where(equal, t, jnp.minimum(t, other)),
          jnp.where(equal, t, jnp.maximum(t, other)))


def meanflow_target(w, dw, u, times, rates, times_end, span, schedule: clocks.Schedule):
  """The regression target of :func:`meanflow_losses` and its per-part weights.

  w, dw: the prediction and its total τ-derivative along the path [N, H, W, C]; u = x₁ − x₀;
  times / rates / times_end: per-part t_k(τ), t_k'(τ), t_k(ρ) ([N] each); span = ρ − τ.
  Returns (target, per-part weights min(1, 1/r_k²))."""
  f32 = jnp.float32
  equal = span == 0
  ratios, weights, fm = [], [], []
  for tk, rk, ek in zip(times, rates, times_end):
    delta = ek - tk
    moving = delta > 0
    r = jnp.where(moving, rk * span / jnp.where(moving, delta, 1.0), 0.0)
    r = jnp.where(equal, f32(1.0), r).astype(f32)
    ratios.append(r)
    weights.append(jnp.where(r > 1.0, 1.0 / jnp.square(jnp.maximum(r, 1.0)), f32(1.0)))
    fm.append(equal | ~moving)
  ratio = schedule.per_channel(ratios)[:, None, None, :]
  use_u = schedule.per_channel(fm)[:, None, None, :]
  w = w.astype(f32)
  target = w + ratio * (u - w) + span[:, None, None, None] * dw.astype(f32)
  return jax.lax.stop_gradient(jnp.where(use_u, u, target)), weights


def meanflow_losses(apply_fn, x1: jax.Array, y: jax.Array, key: jax.Array,
                    cfg: ObjectiveConfig, repa_target: jax.Array | None = None,
                    x0: jax.Array | None = None, t: jax.Array | None = None,
                    r: jax.Array | None = None, clock_params=None):
  """The average-velocity loss of a batch (module docstring; ``name="meanflow"``).

  ``apply_fn(x_t, t_a, t_b, y, label_drop_key, interval) -> (w, repa_proj)`` as in
  :func:`training_losses`, plus ``interval``: per-part h_k = t_k(ρ) − t_k(τ) ([N] each).
  ``t``, ``r``: optional fixed draws (t ≤ r, fractions of the schedule's span T).
  Returns (loss scalar, metrics) like :func:`training_losses`; at ``r == t`` for every
  example the loss and its terms equal :func:`training_losses`' bit for bit.
  """
  n = x1.shape[0]
  k_noise, k_time, k_drop = jax.random.split(key, 3)
  if x0 is None:
    x0 = jax.random.normal(k_noise, x1.shape, jnp.float32)
  if t is None:
    t, r = sample_time_pairs(k_time, n, cfg)
  elif r is None:
    r = t
  sch = cfg.schedule_for(x1.shape[-1])
  total = sch.total
  tau = t if total == 1.0 else t * jnp.float32(total)
  rho = r if total == 1.0 else r * jnp.float32(total)
  times_end = sch.times(rho, clock_params)
  times, rates = jax.jvp(lambda s: sch.times(s, clock_params), (tau,), (jnp.ones_like(tau),))
  xt, ut = interpolate_parts(x0, x1.astype(jnp.float32), times, sch)
  velocity = sch.per_channel(rates)[:, None, None, :] * ut     # dx/dτ of the path

  def average_velocity(x, s):
    tm = sch.times(s, clock_params)
    gaps = tuple(e - a for e, a in zip(times_end, tm))
    return apply_fn(x, *clocks.split_times(tm), y, k_drop, gaps)

  (pred, proj), (dpred, _) = jax.jvp(average_velocity, (xt, tau),
                                     (velocity, jnp.ones_like(tau)))
  target, weights = meanflow_target(pred, dpred, ut, times, rates, times_end, rho - tau, sch)
  learned = bool(sch.learned_parts)
  corr = (clock_correction(sch, t, times, clock_params, cfg)
          if learned and cfg.clock_correction else None)
  terms = velocity_losses(pred, target, cfg, example_weights=corr)
  # The capped weights enter as a correction that is exactly 0 where they are 1 (every
  # ρ = τ example), so those keep flow matching's reduction and its bits.
  extra = [w - 1.0 if corr is None else (w - 1.0) * c for w, c in
           zip(weights, corr or weights)]
  terms["mse"] = terms["mse"] + velocity_losses(pred, target, cfg,
                                                example_weights=extra)["mse"]
  mse = terms["mse"]
  mf = cfg.meanflow
  if mf.adaptive_p > 0:
    adaptive = jax.lax.stop_gradient(
        1.0 / (mse + jnp.float32(mf.adaptive_c)) ** jnp.float32(mf.adaptive_p))
    mse = adaptive * mse
  return _total_loss(jnp.mean(mse), terms, {"interval_mean": jnp.mean(rho - tau)}, cfg,
                     sch, clock_params, proj, repa_target,
                     {"t": t, "r": r, "times": times, "xt": xt, "ut": ut, "pred": pred,
                      "target": target})
