"""Diagonal Gaussian posteriors of the two autoencoders.

``DiagonalGaussian`` is the diffusers/LDM ``DiagonalGaussianDistribution``: moments split
in half along one axis (mean first), log-variance clamped to [LOGVAR_MIN, LOGVAR_MAX],
std = exp(logvar/2), KL per sample = ½·Σ(μ² + σ² − 1 − log σ²) over all non-batch axes.
Its ``sample`` draws ε with the mean's shape (the texture VAE's NHWC latent).

``TokenGaussian`` is the same posterior in the Semantic VAE's token layout [B, L, C]
(L = h·w row-major tokens). The reference lays its posterior out as [B, C, h, w], so ε is
drawn (or given) in that layout and rearranged (``eps_nchw_to_tokens``): a given ε tensor
means the same thing as in the reference. Sampling needs a square token grid.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
from flax import struct

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0


def token_grid(num_tokens: int) -> int:
  """Side h = w of the square token grid; raises for a non-square token count."""
  side = math.isqrt(num_tokens)
  if side * side != num_tokens:
    raise ValueError(f"SemVAE: {num_tokens} tokens do not form a square h×w grid; the "
                     "reference posterior is laid out as [B, C, h, w] with h = w")
  return side


def eps_nchw_to_tokens(eps_nchw: jax.Array) -> jax.Array:
  """ε in the reference layout [B, C, h, w] → token layout [B, h·w, C] (row-major)."""
  b, c, h, w = eps_nchw.shape
  return jnp.transpose(eps_nchw, (0, 2, 3, 1)).reshape(b, h * w, c)


def tokens_to_nchw(tokens: jax.Array) -> jax.Array:
  """[B, h·w, C] → [B, C, h, w] (``b (h w) c -> b c h w``, square grid)."""
  b, l, c = tokens.shape
  side = token_grid(l)
  return jnp.transpose(tokens.reshape(b, side, side, c), (0, 3, 1, 2))


@struct.dataclass
class DiagonalGaussian:
  """Diagonal Gaussian posterior (logvar already clamped); float32 from ``from_moments``."""
  mean: jax.Array
  logvar: jax.Array

  @classmethod
  def from_moments(cls, moments: jax.Array, axis: int = -1):
    """Splits ``moments`` in half along ``axis`` (mean first) and clamps the log-variance."""
    mean, logvar = jnp.split(moments.astype(jnp.float32), 2, axis=axis)
    return cls(mean=mean, logvar=jnp.clip(logvar, LOGVAR_MIN, LOGVAR_MAX))

  @property
  def std(self) -> jax.Array:
    return jnp.exp(0.5 * self.logvar)

  @property
  def var(self) -> jax.Array:
    return jnp.exp(self.logvar)

  def mode(self) -> jax.Array:
    return self.mean

  def sample(self, key: jax.Array | None = None, *, eps: jax.Array | None = None) -> jax.Array:
    """mean + std·eps, with eps given or drawn from N(0, I) with ``key``."""
    if (key is None) == (eps is None):
      raise ValueError("DiagonalGaussian.sample: pass exactly one of `key` or `eps`")
    if eps is None:
      eps = jax.random.normal(key, self.mean.shape, jnp.float32)
    elif tuple(eps.shape) != tuple(self.mean.shape):
      raise ValueError(f"DiagonalGaussian.sample: eps has shape {tuple(eps.shape)}, "
                       f"expected {tuple(self.mean.shape)}")
    return self.mean + self.std * eps.astype(jnp.float32)

  def kl(self) -> jax.Array:
    """KL(q ‖ N(0, I)) per sample: ½·Σ(μ² + σ² − 1 − log σ²) over all non-batch axes."""
    terms = jnp.square(self.mean) + self.var - 1.0 - self.logvar
    return 0.5 * jnp.sum(terms, axis=tuple(range(1, terms.ndim)))


@struct.dataclass
class TokenGaussian(DiagonalGaussian):
  """The posterior in token layout [B, L, C] with ε in the reference's [B, C, h, w]."""

  def draw_eps(self, key: jax.Array) -> jax.Array:
    """Standard normal ε drawn in the reference's [B, C, h, w] layout, returned as tokens."""
    b, l, c = self.mean.shape
    side = token_grid(l)
    return eps_nchw_to_tokens(jax.random.normal(key, (b, c, side, side), self.mean.dtype))

  def sample(self, key: jax.Array | None = None, *,  # pyright: ignore
             eps_nchw: jax.Array | None = None) -> jax.Array:
    """mean + std·ε, with ε from ``key`` (drawn NCHW) or given as ``eps_nchw``."""
    if (key is None) == (eps_nchw is None):
      raise ValueError("DiagonalGaussian.sample: pass exactly one of key / eps_nchw")
    eps = self.draw_eps(key) if eps_nchw is None else eps_nchw_to_tokens(eps_nchw)
    return self.mean + self.std * eps.astype(self.mean.dtype)
