"""Semantic VAE: a token-wise transformer VAE on DINOv2 patch tokens (docs/method.md §3.2).

Reference: ``SemanticVariationalAutoEncoder(arch="transformer")`` of the SFD
authors' SemVAE code. Features are token sequences [B, L, C_in]
(L = h·w row-major patch tokens); there is no positional embedding.

Encoder: Linear C_in → D, N pre-norm transformer blocks (LayerNorm eps 1e-5,
multi-head attention with biases, exact-GELU MLP of width 4·D, no LayerScale),
LayerNorm, Linear D → 2·C. Decoder: Linear C → D, N blocks, LayerNorm, Linear D → C_in.

Posterior (diffusers ``DiagonalGaussianDistribution`` on the encoder output rearranged
``b (h w) c -> b c h w``): per token, mean = the first C outputs and log-variance the
last C, clamped to [−30, 20]; std = exp(logvar/2); sample = mean + std·ε with ε drawn
in the reference's [B, C, h, w] layout; KL per sample = ½·Σ(μ² + σ² − 1 − log σ²) over
all latent elements. Everything here stays in token layout [B, L, C]; only ε is
generated in NCHW and rearranged (``eps_nchw_to_tokens``) so that a given ε tensor
means the same thing as in the reference (``sfd_jax.models.distributions.TokenGaussian``).

Deviation: for a token count that is not a perfect square the reference silently pads
(or truncates) the sequence to 16×16 before building the posterior; sampling here
raises instead (SFD only ever uses 16×16 = 256 tokens). Encoding, decoding and the
posterior moments work for any L.
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from sfd_jax.models import layers
from sfd_jax.models.dinov2 import TransformerBlock
from sfd_jax.models.distributions import TokenGaussian


@dataclasses.dataclass(frozen=True)
class SemVAEConfig:
  """``semvae_train/ch16.yaml`` (transformer, variational) by default."""
  input_dim: int = 768
  bottleneck_dim: int = 16
  hidden_dim: int = 768
  num_heads: int = 6
  num_blocks: int = 4
  mlp_ratio: float = 4.0
  norm_eps: float = 1e-5

  def __post_init__(self):
    if self.hidden_dim % self.num_heads:
      raise ValueError(f"SemVAEConfig.hidden_dim {self.hidden_dim} is not divisible by "
                       f"num_heads {self.num_heads}")

  @property
  def mlp_hidden(self) -> int:
    return int(self.hidden_dim * self.mlp_ratio)

  @classmethod
  def ch16(cls) -> "SemVAEConfig":
    """The released SemVAE (DINOv2-B/14-reg features, 16 latent channels)."""
    return cls()

  @classmethod
  def tiny(cls) -> "SemVAEConfig":
    """The configuration of the parity fixture ``semvae.npz``."""
    return cls(input_dim=96, bottleneck_dim=8, hidden_dim=64, num_heads=4, num_blocks=2)

  @classmethod
  def from_reference_kwargs(cls, kw: dict) -> "SemVAEConfig":
    """From the reference ``SemanticVariationalAutoEncoder`` constructor's arguments
    (``input_dim``, ``bottleneck_dim``, ``hidden_dim``, ``arch``, ``transformer_heads``,
    ``transformer_blocks``; absent ones take the constructor's defaults 1024 / 32 / 512 /
    "linear" / 6 / 12) or a training YAML's ``model`` section with those names (plus
    ``is_vae``). Only ``arch="transformer"`` with ``is_vae`` is implemented (the released
    SemVAE); its blocks have MLP ratio 4 and LayerNorm eps 1e-5 (fixed in the reference)."""
    kw = dict(kw.get("model", kw))
    arch = kw.pop("arch", "linear")
    if arch != "transformer":
      raise ValueError(f"SemVAE arch={arch!r}: only 'transformer' is implemented (the "
                       "released SemVAE); linear / mlp / resnet are not")
    if not kw.pop("is_vae", True):
      raise ValueError("SemVAE is_vae=False (the plain SemanticAutoEncoder) is not supported")
    for ignored in ("num_layers", "num_res_blocks", "dropout"):
      kw.pop(ignored, None)
    out = dict(input_dim=kw.pop("input_dim", 1024), bottleneck_dim=kw.pop("bottleneck_dim", 32),
               hidden_dim=kw.pop("hidden_dim", 512), num_heads=kw.pop("transformer_heads", 6),
               num_blocks=kw.pop("transformer_blocks", 12))
    if kw:
      raise ValueError(f"unknown SemVAE constructor arguments {sorted(kw)}")
    return cls(**out)

  @classmethod
  def preset(cls, name: str) -> "SemVAEConfig":
    presets = {"ch16": cls.ch16, "tiny": cls.tiny}
    if name not in presets:
      raise ValueError(f"unknown SemVAE preset '{name}' (expected one of {sorted(presets)})")
    return presets[name]()


def torch_default_init(role: str, fan_in: int):
  """PyTorch defaults of the reference modules.

  ``nn.Linear`` (MLP, output projection weight): U(±1/√fan_in) weight and bias.
  ``nn.MultiheadAttention``: xavier-uniform ``in_proj_weight`` and zero biases for
  both ``in_proj`` and ``out_proj`` (its weight keeps the Linear default).
  """
  kernel, bias = layers.torch_linear_init(fan_in)
  if role == "qkv":
    return layers.xavier_uniform, layers.zeros
  if role == "proj":
    return kernel, layers.zeros
  return kernel, bias


class TokenTransformer(nnx.Module):
  """Linear in → pre-norm transformer blocks → LayerNorm → Linear out (per token)."""

  def __init__(self, in_dim: int, out_dim: int, config: SemVAEConfig, *, rngs: nnx.Rngs,
               dtype=None, param_dtype=jnp.float32):
    c, d = config, config.hidden_dim
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    k_init, b_init = layers.torch_linear_init(in_dim)
    self.proj_in = layers.Dense(in_dim, d, ("channels", "embed"), rngs=rngs,
                                kernel_init=k_init, bias_init=b_init, **kw)
    self.blocks = nnx.List([
        TransformerBlock(d, c.num_heads, c.mlp_hidden, rngs=rngs, norm_eps=c.norm_eps,
                         layerscale_init=None, linear_init=torch_default_init, **kw)
        for _ in range(c.num_blocks)])
    self.norm = layers.LayerNorm(d, epsilon=c.norm_eps, rngs=rngs, **kw)
    k_init, b_init = layers.torch_linear_init(d)
    self.proj_out = layers.Dense(d, out_dim, ("embed", "channels"), rngs=rngs,
                                 kernel_init=k_init, bias_init=b_init, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    x = self.proj_in(x)
    for block in self.blocks:
      x = block(x)
    return self.proj_out(self.norm(x))


class SemanticVAE(nnx.Module):
  """Transformer SemVAE; ``__call__`` is the reference's training forward."""

  def __init__(self, config: SemVAEConfig, *, rngs: nnx.Rngs, dtype=None,
               param_dtype=jnp.float32):
    self.config = config
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.encoder = TokenTransformer(config.input_dim, 2 * config.bottleneck_dim, config, **kw)
    self.decoder = TokenTransformer(config.bottleneck_dim, config.input_dim, config, **kw)

  def encode(self, features: jax.Array) -> TokenGaussian:
    """[B, L, C_in] features → posterior over [B, L, bottleneck] (float32 moments)."""
    if features.shape[-1] != self.config.input_dim:
      raise ValueError(f"SemanticVAE.encode: features have {features.shape[-1]} channels, "
                       f"expected input_dim {self.config.input_dim}")
    return TokenGaussian.from_moments(self.encoder(features))

  def decode(self, z: jax.Array) -> jax.Array:
    """[B, L, bottleneck] latents → [B, L, C_in] reconstructed features."""
    return self.decoder(z)

  def __call__(self, features: jax.Array, key: jax.Array | None = None, *,
               eps_nchw: jax.Array | None = None) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Encode, sample (ε from ``key`` or ``eps_nchw``), decode.

    Returns (recon [B, L, C_in], z [B, L, bottleneck], kl [B]) as the reference's
    ``forward`` (``x_recon, z, kl``).
    """
    posterior = self.encode(features)
    z = posterior.sample(key, eps_nchw=eps_nchw)
    return self.decode(z), z, posterior.kl()
