"""Class-conditional generation, the math: typed sampling options, labels and noise of
global sample indices, the latent decoder, and one batch inside jit (``generate``).

Determinism: the label of global sample index ``i`` is ``i·num_classes // N`` (balanced,
``i // 50`` for 50k images as the reference) and its noise is drawn from
``fold_in(key(seed), i)``, so any batch split over any number of devices or processes
produces the same images (dopri5's shared step sizes included). Runs that write images
to files are ``sfd_jax.sampling``.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sfd_jax.core.errors import ConfigError
from sfd_jax.diffusion import clocks, guidance, samplers


class SamplingError(ConfigError):
  """A sampling option, or a model / guide / decoder that does not fit the others."""


LABEL_MODES = ("balanced", "random", "fixed", "unconditional")
LAST_STEP_NAMES = ("mean", "euler", "none")


@dataclasses.dataclass(frozen=True)
class SamplingOptions:
  """How to sample; the field names are those of ``config.sample`` / ``config.train_eval``.

  Guidance: ``guidance`` (none | cfg | autoguidance) with ``scale`` — on only for
  ``scale > 1``, the reference's rule — and the optional per-part scales
  ``cfg_scale_tex`` / ``cfg_scale_sem`` (negative: equal to ``scale``, the reference's
  default). Interval: a part is guided only while its clock ``t`` satisfies
  ``cfg_interval_start <= t <= cfg_interval_end`` (t = 0 noise, 1 data) and otherwise
  uses the conditional velocity; ``cfg_interval_mode`` (both | tex | sem) says which
  parts are gated. ``cfg_interval_start = 0`` and ``cfg_interval_end = 1`` never gate (the
  released configs); the lower bound is the reference's ``cfg_interval_start``, the upper
  one corresponds to REPA's guidance window (``guidance_high`` in REPA's reversed time:
  ``cfg_interval_start = 1 − guidance_high``, ``cfg_interval_end = 1 − guidance_low``).

  Labels (``labels``): ``balanced`` (class ``i·K // N`` of global index i: 50 per class
  for 50k, the paper's protocol), ``random`` (uniform, drawn from a hash of
  (``label_seed``, i): deterministic per index, independent of batch and device count;
  the reference's default without ``balanced_sampling``), ``fixed`` (every sample class
  ``label_class``) or ``unconditional`` (the null class K; the model must have one).

  Solver: ``method`` (euler | heun | dopri5 | sde | meanflow), ``num_steps`` (grid points;
  for ``meanflow``, an average-velocity model's jumps: the NFE, docs/fewstep.md),
  dopri5's ``atol`` / ``rtol`` / ``jump_ts`` / ``max_steps``, ``timestep_shift`` (ODE
  grids), the SDE's ``diffusion_form``, ``diffusion_norm``, ``last_step`` (mean | euler |
  none), ``last_step_size`` and ``sde_t_min`` (``samplers.euler_maruyama``). ``seed``:
  noise of global index i is drawn from ``fold_in(key(seed), i)``.
  """
  guidance: str = "none"
  scale: float = 1.0
  cfg_scale_tex: float = -1.0
  cfg_scale_sem: float = -1.0
  cfg_interval_start: float = 0.0
  cfg_interval_end: float = 1.0
  cfg_interval_mode: str = "both"
  labels: str = "balanced"
  label_class: int = 0
  label_seed: int = -1            # -1: seed
  method: str = "euler"
  num_steps: int = 250
  atol: float = 1e-6
  rtol: float = 1e-3
  jump_ts: bool = False
  max_steps: int = 4096
  timestep_shift: float = 0.0
  diffusion_form: str = "SBDM"
  diffusion_norm: float = 1.0
  last_step: str = "mean"
  last_step_size: float = 0.04
  sde_t_min: float = 0.04
  seed: int = 0
  # the clock schedule (None: SFD's two parts from the model's delta_t / semantic_chans);
  # set from the run's config.schedule by prepare() / the trainer, not a config field
  schedule: clocks.Schedule | None = None

  @classmethod
  def from_config(cls, section, where: str = "config.sample") -> "SamplingOptions":
    """The option fields of a config section (``config.sample``, ``config.train_eval``);
    fields the section lacks keep the defaults. Invalid values raise ``SamplingError``
    naming ``<where>.<field>``."""
    given = section.to_dict() if hasattr(section, "to_dict") else dict(section)
    kw = {}
    for f in dataclasses.fields(cls):
      if f.name not in given or f.name == "schedule":   # the schedule is not a field here
        continue
      value, kind = given[f.name], type(f.default)
      try:
        kw[f.name] = (bool(value) if kind is bool else
                      str(value) if kind is str else kind(value))
      except (TypeError, ValueError) as e:
        raise SamplingError(f"{where}.{f.name}={value!r}: expected {kind.__name__}") from e
    opts = cls(**kw)
    opts.validate(where)
    return opts

  @property
  def guided(self) -> bool:
    """Whether guidance is on (a mode other than none, and ``scale > 1``)."""
    return self.guidance != "none" and self.scale > 1.0

  def scales(self) -> tuple[float | None, float | None]:
    """(texture scale, semantic scale); None means ``scale``."""
    return (None if self.cfg_scale_tex < 0 else self.cfg_scale_tex,
            None if self.cfg_scale_sem < 0 else self.cfg_scale_sem)

  def interval(self) -> tuple[float | None, float | None]:
    """(start, end) for ``guidance.combine``; None where the bound never gates."""
    return (self.cfg_interval_start if self.cfg_interval_start > 0 else None,
            self.cfg_interval_end if self.cfg_interval_end < 1 else None)

  def validate(self, where: str = "config.sample") -> None:
    """Raises ``SamplingError`` naming the field of the first invalid value."""
    def bad(field, msg):
      raise SamplingError(f"{where}.{field}={getattr(self, field)!r}: {msg}")

    def one_of(field, allowed):
      if getattr(self, field) not in allowed:
        bad(field, f"expected one of {tuple(allowed)}")

    one_of("guidance", guidance.GUIDANCE_MODES)
    one_of("method", samplers.METHODS)
    one_of("cfg_interval_mode", guidance.INTERVAL_MODES)
    one_of("labels", LABEL_MODES)
    one_of("diffusion_form", samplers.DIFFUSION_FORMS)
    one_of("last_step", LAST_STEP_NAMES)
    for field in ("scale", "cfg_scale_tex", "cfg_scale_sem", "atol", "rtol",
                  "timestep_shift", "diffusion_norm", "cfg_interval_start",
                  "cfg_interval_end", "last_step_size", "sde_t_min"):
      if not np.isfinite(getattr(self, field)):
        bad(field, "must be finite")
    if self.method == "meanflow":
      if self.num_steps < 1:
        bad("num_steps", "counts the jumps of method 'meanflow' and must be >= 1")
    elif self.num_steps < 2:
      bad("num_steps", "counts grid points and must be >= 2")
    if self.atol <= 0:
      bad("atol", "must be positive")
    if self.rtol <= 0:
      bad("rtol", "must be positive")
    if self.max_steps < 1:
      bad("max_steps", "must be positive")
    if self.timestep_shift < 0:
      bad("timestep_shift", "must be >= 0 (0 = off)")
    if self.timestep_shift > 0 and self.method == "sde":
      bad("timestep_shift", "is defined for the ODE grid only, not for method 'sde'")
    if not 0.0 <= self.cfg_interval_start < 1.0:
      bad("cfg_interval_start", "must be in [0, 1)")
    if not self.cfg_interval_start < self.cfg_interval_end <= 1.0:
      bad("cfg_interval_end", f"must be in (cfg_interval_start={self.cfg_interval_start}, 1]")
    if not 0.0 < self.last_step_size < 1.0:
      bad("last_step_size", "must be in (0, 1)")
    if self.sde_t_min < 0:
      bad("sde_t_min", "must be >= 0")
    if self.label_class < 0:
      bad("label_class", "must be a class index >= 0")
    if not self.guided:
      for field in ("cfg_scale_tex", "cfg_scale_sem"):
        if getattr(self, field) >= 0:
          bad(field, f"has no effect: guidance is off (guidance={self.guidance!r}, "
                     f"scale={self.scale}; guidance needs a mode and scale > 1)")
      for field, off in (("cfg_interval_start", 0.0), ("cfg_interval_end", 1.0)):
        if getattr(self, field) != off:
          bad(field, "has no effect: guidance is off")

  def sde_kwargs(self) -> dict[str, Any]:
    return dict(diffusion_form=self.diffusion_form, diffusion_norm=self.diffusion_norm,
                last_step=None if self.last_step == "none" else self.last_step,
                last_step_size=self.last_step_size, sde_t_min=self.sde_t_min)


@dataclasses.dataclass(frozen=True, eq=False)
class LatentDecoder:
  """The texture VAE and the statistics that undo the latent normalisation:
  texture latent = normalised · std / multiplier + mean."""
  vae: Any                     # a TextureVAE (or anything with ``decode``)
  mean: jax.Array
  std: jax.Array
  multiplier: float = 1.0

  def decode(self, texture: jax.Array) -> jax.Array:
    """Normalised texture latents [N, h, w, C] → uint8 images [N, H, W, 3]."""
    return to_uint8(self.vae.decode(texture * self.std / self.multiplier + self.mean))

  def split(self):
    """(static part, arrays) for passing through ``jax.jit``; see ``merge``."""
    graphdef, state = nnx.split(self.vae)
    return (graphdef, self.multiplier), (state, self.mean, self.std)

  @classmethod
  def merge(cls, static, arrays) -> "LatentDecoder":
    (graphdef, multiplier), (state, mean, std) = static, arrays
    return cls(nnx.merge(graphdef, state), mean, std, multiplier)


def balanced_labels(indices: np.ndarray, num_images: int, num_classes: int) -> np.ndarray:
  """Class of global index i: i·K // N (== i // (N/K) when K divides N)."""
  return (np.asarray(indices, np.int64) * num_classes // num_images).astype(np.int32)


_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)


def _splitmix64(x: np.ndarray) -> np.ndarray:
  """SplitMix64 finaliser on uint64 arrays (wrapping arithmetic)."""
  with np.errstate(over="ignore"):
    x = x + np.uint64(0x9E3779B97F4A7C15)
    x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
    x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
    return x ^ (x >> np.uint64(31))


def random_labels(indices: np.ndarray, num_classes: int, seed: int) -> np.ndarray:
  """Uniform class of global index i, from a hash of (seed, i): the same for any batch
  size, device or process count."""
  key = _splitmix64(np.asarray([int(seed) & 0xFFFFFFFFFFFFFFFF], np.uint64))[0]
  h = _splitmix64(np.asarray(indices, np.int64).astype(np.uint64) ^ key)
  return ((h >> np.uint64(11)) % np.uint64(num_classes)).astype(np.int32)


def sample_labels(indices: np.ndarray, num_images: int, num_classes: int,
                  opts: SamplingOptions, *, has_null: bool = True,
                  where: str = "config.sample") -> np.ndarray:
  """Labels of global indices (``indices`` ≥ ``num_images`` are padding: clipped) for
  ``opts.labels``; ``num_classes`` is the null class."""
  idx = np.minimum(np.asarray(indices, np.int64), num_images - 1)
  if opts.labels == "balanced":
    return balanced_labels(idx, num_images, num_classes)
  if opts.labels == "random":
    seed = opts.seed if opts.label_seed < 0 else opts.label_seed
    return random_labels(idx, num_classes, seed)
  if opts.labels == "fixed":
    if not 0 <= opts.label_class < num_classes:
      raise SamplingError(f"{where}.label_class={opts.label_class}: the model has "
                          f"{num_classes} classes (0..{num_classes - 1})")
    return np.full(idx.shape, opts.label_class, np.int32)
  if not has_null:
    raise SamplingError(f"{where}.labels='unconditional' needs a null class, but the model "
                        "was trained without label dropout (class_dropout_prob = 0)")
  return np.full(idx.shape, num_classes, np.int32)


def noise_for(indices: jax.Array, seed: int, shape: tuple[int, ...]) -> jax.Array:
  base = jax.random.key(seed)
  size = int(np.prod(shape))
  return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(base, i), (size,))
                  .reshape(shape))(indices)


def to_uint8(images: jax.Array) -> jax.Array:
  """[-1, 1] → uint8 as the reference: clamp(127.5·x + 128, 0, 255) then truncate."""
  return jnp.clip(127.5 * images.astype(jnp.float32) + 128.0, 0, 255).astype(jnp.uint8)


def guided_velocity(model, guide, opts: SamplingOptions) -> guidance.VelocityFn:
  """The velocity function ``opts`` describes (``guidance.make_guided_velocity``; for
  ``method="meanflow"`` the average velocity of a jump, ``make_guided_average_velocity``)."""
  scale_tex, scale_sem = opts.scales()
  start, end = opts.interval()
  make = (guidance.make_guided_average_velocity if opts.method == "meanflow" else
          guidance.make_guided_velocity)
  return make(
      model, guide, mode=opts.guidance, scale=opts.scale, scale_tex=scale_tex,
      scale_sem=scale_sem, interval_start=start, interval_end=end,
      interval_mode=opts.cfg_interval_mode, schedule=opts.schedule)


def generate(model, guide, decoder: LatentDecoder | None, indices: jax.Array,
             labels: jax.Array, key: jax.Array, opts: SamplingOptions):
  """Samples one batch (call inside jit); returns (uint8 images or latents, NFE).

  Noise of row ``r`` comes from global index ``indices[r]``. With a ``decoder`` the
  texture channels are decoded to uint8 [N, H, W, 3]; without one the normalised latents
  are returned.
  """
  cfg = model.cfg
  sch = opts.schedule
  fn = guided_velocity(model, guide, opts)
  z = noise_for(indices, opts.seed, (cfg.input_size, cfg.input_size, cfg.in_channels))
  # Δt and the semantic channel count come from the model's config (fn.cfg), unless the
  # run has a clock schedule (opts.schedule; learned clocks read from the weights).
  sched_kw = {} if sch is None else dict(
      schedule=sch, clock_params=clocks.params_from_model(model, sch))
  out = samplers.sample(fn, z, labels, method=opts.method, num_steps=opts.num_steps,
                        atol=opts.atol, rtol=opts.rtol, shift=opts.timestep_shift, key=key,
                        jump_ts=opts.jump_ts, max_steps=opts.max_steps, **opts.sde_kwargs(),
                        **sched_kw)
  if sch is None:
    texture = slice(0, cfg.in_channels - cfg.semantic_chans)
  else:
    texture = sch.channel_slice("texture" if "texture" in sch.names else sch.names[0])
  if decoder is None:
    return out.x, out.nfe
  return decoder.decode(out.x[..., texture]), out.nfe


def check_decoder(main, decoder: LatentDecoder | None, field: str = "config.sample",
                  texture_channels: int | None = None) -> None:
  """The texture VAE and the statistics must fit the model's texture channels (those of
  the schedule's texture part when given)."""
  if decoder is None:
    return
  tex = (main.in_channels - main.semantic_chans if texture_channels is None
         else texture_channels)
  vae_ch = getattr(getattr(decoder.vae, "config", None), "embed_dim", None)
  if vae_ch is not None and vae_ch != tex:
    raise SamplingError(
        f"{field}.texture_vae: the texture VAE decodes {vae_ch}-channel latents, but the "
        f"model has {tex} texture channels (in_channels {main.in_channels} - semantic_chans "
        f"{main.semantic_chans}); use the texture VAE the latents were encoded with")
  if decoder.mean.ndim and int(decoder.mean.shape[-1]) != tex:   # () without normalisation
    raise SamplingError(
        f"{field}.stats: the latent statistics have {int(decoder.mean.shape[-1])} texture "
        f"channels, the model {tex}; use the stats.npz of the model's training data")


def check_method(main, opts: SamplingOptions, field: str = "config.sample",
                 what: str = "the model") -> None:
  """``method="meanflow"`` needs an average-velocity model (interval embedders)."""
  if opts.method == "meanflow" and not getattr(main, "interval_embedding", False):
    raise SamplingError(
        f"{field}.method='meanflow' needs an average-velocity model (trained with "
        f"config.objective.name='meanflow'), but {what} is a flow-matching model: sample "
        "it with euler, heun, dopri5 or sde, or fine-tune it with objective.name='meanflow' "
        "(docs/fewstep.md)")


def check_guide(main, guide) -> None:
  """The guide must share the main model's latent layout and clocks."""
  for name in ("in_channels", "semantic_chans", "input_size", "patch_size", "delta_t",
               "num_classes"):
    a, b = getattr(main, name), getattr(guide, name)
    if a != b:
      raise SamplingError(f"guide model has {name}={b} but the main model has {name}={a}: "
                          "the guide must use the same latent layout and clocks")
