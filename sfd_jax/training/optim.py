"""Optimizers and learning-rate schedules built from a config section.

``config.optimizer`` fields: ``name`` ("adamw"), ``lr``, ``b1``, ``b2``, ``eps``,
``weight_decay``, ``grad_clip`` (0 = off), and ``schedule`` ("constant", or
"warmup_constant_cosine": linear warm-up from ``warmup_init_factor``·lr over
``warmup_steps``, constant, then cosine to ``final_factor``·lr over the last
``decay_steps`` of ``total_steps`` — the Semantic VAE recipe).
"""
from __future__ import annotations

import jax.numpy as jnp
import optax

from sfd_jax.core.errors import ConfigError

SCHEDULES = ("constant", "warmup_constant_cosine")

# The SFD recipe's optimizer (configs/common.py ``adamw()`` builds the same section; a test
# keeps the two equal): for callers without a config, such as the benchmarks.
DEFAULT_ADAMW = {"name": "adamw", "lr": 1e-4, "b1": 0.9, "b2": 0.999, "eps": 1e-8,
                 "weight_decay": 0.0, "grad_clip": 0.0, "schedule": "constant",
                 "warmup_steps": 0}


class _Section(dict):
  """A plain dict read like a ConfigDict section (``opt.lr`` and ``opt.get``)."""

  def __getattr__(self, name):
    try:
      return self[name]
    except KeyError as e:
      raise AttributeError(name) from e


def _section(opt):
  return _Section(opt) if isinstance(opt, dict) and not hasattr(opt, "lr") else opt


def make_schedule(opt) -> optax.Schedule:
  opt = _section(opt)
  lr = float(opt.lr)
  name = opt.get("schedule", "constant")
  if name == "constant":
    warmup = int(opt.get("warmup_steps", 0))
    if warmup > 0:
      return optax.linear_schedule(lr * float(opt.get("warmup_init_factor", 0.0)), lr, warmup)
    return optax.constant_schedule(lr)
  if name == "warmup_constant_cosine":
    warmup = int(opt.warmup_steps)
    total = int(opt.total_steps)
    decay = int(opt.decay_steps)
    final = float(opt.get("final_factor", 0.1))
    init = float(opt.get("warmup_init_factor", 0.01))
    if warmup + decay > total:
      raise ConfigError(f"config.optimizer: warmup_steps {warmup} + decay_steps {decay} "
                        f"exceed total_steps {total}; lower them or raise total_steps")

    def schedule(step):
      step = jnp.asarray(step, jnp.float32)
      warm = lr * (init + (1 - init) * jnp.minimum(step / max(warmup, 1), 1.0))
      start = total - decay
      frac = jnp.clip((step - start) / max(decay, 1), 0.0, 1.0)
      cos = lr * (final + (1 - final) * 0.5 * (1 + jnp.cos(jnp.pi * frac)))
      return jnp.where(step < warmup, warm, jnp.where(step < start, lr, cos))

    return schedule
  raise ConfigError(f"config.optimizer.schedule must be one of {SCHEDULES}, got {name!r}")


def make_optimizer(opt) -> tuple[optax.GradientTransformation, optax.Schedule]:
  """(optax transformation, learning-rate schedule) from ``config.optimizer`` (or a dict
  with the same fields)."""
  opt = _section(opt)
  if opt.get("name", "adamw") != "adamw":
    raise ConfigError(f"config.optimizer.name must be 'adamw' (the only optimizer "
                      f"implemented), got {opt.name!r}")
  schedule = make_schedule(opt)
  tx = optax.adamw(schedule, b1=float(opt.b1), b2=float(opt.b2), eps=float(opt.eps),
                   weight_decay=float(opt.weight_decay))
  clip = float(opt.get("grad_clip", 0.0) or 0.0)
  if clip > 0:
    tx = optax.chain(optax.clip_by_global_norm(clip), tx)
  return tx, schedule
