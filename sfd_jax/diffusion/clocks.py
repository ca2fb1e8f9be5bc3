"""Semantic-first clocks and channel masks, shared by the objective, samplers and guidance.

The latent is ``[texture | semantic]`` along its last axis, the semantic part being the
last ``semantic_chans`` channels. Global time τ ∈ [0, 1 + Δt] drives two clocks

  t_tex = max(τ − Δt, 0),   t_sem = min(τ, 1),

(SPEC §6, §8.1); training draws t ∈ [0, 1] and uses τ = t·(1 + Δt). The phase mask says
which part moves at τ: texture iff τ ≥ Δt, semantic iff τ ≤ 1. All in float32.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

SEMANTIC_CHANS = 16


def semantic_channel_mask(channels: int, semantic_chans: int) -> jax.Array:
  """[C] bool, True on the last ``semantic_chans`` channels (no range check)."""
  return jnp.arange(channels) >= channels - semantic_chans


def clocks(tau, delta_t: float) -> tuple[jax.Array, jax.Array]:
  """Global time τ → (t_tex, t_sem) = (max(τ − Δt, 0), min(τ, 1)), in float32.

  t_tex is computed from the unclamped τ (float32 ``τ − Δt``, as the reference)."""
  tau = jnp.asarray(tau, jnp.float32)
  return jnp.maximum(tau - jnp.float32(delta_t), 0.0), jnp.minimum(tau, 1.0)


def training_clocks(t, delta_t: float) -> tuple[jax.Array, jax.Array]:
  """Training time t ∈ [0, 1] → ``clocks(t·(1 + Δt), Δt)``. Δt = 0 gives (t, t) as is."""
  t = jnp.asarray(t, jnp.float32)
  if delta_t == 0:
    return t, t
  return clocks(t * jnp.float32(1.0 + delta_t), delta_t)


def phase_mask(tau, delta_t: float, channels: int,
               semantic_chans: int = SEMANTIC_CHANS) -> jax.Array:
  """Float32 [C] mask: texture channels iff τ ≥ Δt, semantic (last S) iff τ ≤ 1."""
  tau = jnp.asarray(tau, jnp.float32)
  sem = semantic_channel_mask(channels, semantic_chans)
  on = jnp.where(sem, tau <= jnp.float32(1.0), tau >= jnp.float32(delta_t))
  return on.astype(jnp.float32)
