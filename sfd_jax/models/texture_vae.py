"""Texture VAE: the LDM KL autoencoder ("SD-VAE" f16d32) in Flax NNX (docs/method.md §4).

SFD encodes images into its 32-channel texture latent with an LDM/VQGAN-style KL
autoencoder (``Encoder`` → ``quant_conv`` → diagonal Gaussian posterior;
``post_quant_conv`` → ``Decoder``). This module reproduces the reference
architecture of ``tokenizer/autoencoder.py`` (yuemingPAN/SFD, identical in
hustvl/LightningDiT) in NHWC layout:

* ``ResnetBlock``: GroupNorm(32, eps 1e-6) → swish → conv3×3 → GroupNorm → swish →
  (dropout) → conv3×3, plus a 1×1 ``nin_shortcut`` where the width changes.
* ``AttnBlock``: single-head attention over all h·w positions with 1×1 ``q``, ``k``,
  ``v`` and ``proj_out`` convolutions, scale C^-1/2, residual.
* ``Downsample``: zero-pad right/bottom by one, 3×3 stride-2 VALID convolution.
* ``Upsample``: nearest-neighbour ×2, 3×3 convolution.

Module attribute names follow the LDM state-dict keys (``encoder.down[l].block[b].conv1``,
``decoder.up[l].attn[b].q``, ``encoder.mid.attn_1`` …), so the converter in
``sfd_jax.convert.texture_vae`` is a one-to-one walk over the modules. ``decoder.up[l]``
is *level* l (0 = full resolution), as in the reference, and the decoder runs the levels
from the highest index down to 0.

Images are NHWC in [-1, 1]; latents are NHWC. Every parameter is created through
``sfd_jax.models.layers`` and carries logical axis names. ``dtype`` is the compute dtype
(e.g. ``jnp.bfloat16``); parameters stay in ``param_dtype`` (float32). GroupNorm
statistics, the attention softmax and the posterior are computed in float32. The posterior
is ``sfd_jax.models.distributions.DiagonalGaussian`` (re-exported here).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping, Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from sfd_jax.models import layers
# The NHWC posterior (sfd_jax.models.distributions), re-exported under its old home.
from sfd_jax.models.distributions import LOGVAR_MAX, LOGVAR_MIN, DiagonalGaussian

PRESETS = ("f16d32", "tiny")  # classmethods of TextureVAEConfig


@dataclasses.dataclass(frozen=True)
class TextureVAEConfig:
  """Hyper-parameters of the LDM KL autoencoder.

  The reference (LDM ``ddconfig``) has a single ``num_res_blocks`` and builds
  ``num_res_blocks`` ResNet blocks per encoder level but ``num_res_blocks + 1`` per
  decoder level; here both counts are explicit (``from_ldm`` maps one to the other).

  Attributes:
    ch: base width; level l has width ``ch * ch_mult[l]``.
    ch_mult: width multipliers per resolution level (one level per entry; every level
      but the last halves the resolution in the encoder).
    num_res_blocks_enc: ResNet blocks per encoder level.
    num_res_blocks_dec: ResNet blocks per decoder level.
    attn_resolutions: feature-map sizes (relative to ``resolution``) at which every
      ResNet block of a level is followed by an attention block.
    z_channels: channels of the latent the decoder consumes (and of the mean/logvar
      halves of the encoder output when ``double_z``).
    embed_dim: channels of the latent after ``quant_conv`` (the posterior's width).
    resolution: nominal input size; only used to place the attention blocks.
    in_channels: image channels fed to the encoder.
    out_channels: image channels produced by the decoder.
    dropout: dropout rate inside the ResNet blocks (0 in every released model).
    double_z: whether the encoder outputs mean and log-variance (2·z_channels).
    num_groups: GroupNorm groups.
    norm_eps: GroupNorm epsilon.
  """
  ch: int = 128
  ch_mult: tuple[int, ...] = (1, 1, 2, 2, 4)
  num_res_blocks_enc: int = 2
  num_res_blocks_dec: int = 3
  attn_resolutions: tuple[int, ...] = (16,)
  z_channels: int = 32
  embed_dim: int = 32
  resolution: int = 256
  in_channels: int = 3
  out_channels: int = 3
  dropout: float = 0.0
  double_z: bool = True
  num_groups: int = 32
  norm_eps: float = 1e-6

  def __post_init__(self):
    object.__setattr__(self, "ch_mult", tuple(int(m) for m in self.ch_mult))
    object.__setattr__(self, "attn_resolutions", tuple(int(r) for r in self.attn_resolutions))
    if not self.ch_mult:
      raise ValueError("TextureVAEConfig.ch_mult must have at least one level")
    for m in (1,) + self.ch_mult:
      if (self.ch * m) % self.num_groups:
        raise ValueError(f"TextureVAEConfig: width ch*mult = {self.ch * m} is not divisible "
                         f"by num_groups = {self.num_groups}")
    if self.num_res_blocks_enc < 1 or self.num_res_blocks_dec < 1:
      raise ValueError("TextureVAEConfig: num_res_blocks_enc/dec must be >= 1, got "
                       f"{self.num_res_blocks_enc}/{self.num_res_blocks_dec}")
    if self.resolution % self.downsample_factor:
      raise ValueError(f"TextureVAEConfig: resolution {self.resolution} is not divisible by "
                       f"the downsampling factor {self.downsample_factor}")
    if not 0.0 <= self.dropout < 1.0:
      raise ValueError(f"TextureVAEConfig.dropout must be in [0, 1), got {self.dropout}")

  @property
  def num_levels(self) -> int:
    return len(self.ch_mult)

  @property
  def downsample_factor(self) -> int:
    """Spatial reduction image → latent (16 for f16d32)."""
    return 2 ** (len(self.ch_mult) - 1)

  @property
  def latent_resolution(self) -> int:
    return self.resolution // self.downsample_factor

  @classmethod
  def f16d32(cls) -> "TextureVAEConfig":
    """SFD's texture VAE (``ldm-imagenet256-f16d32-50ep.ckpt``), docs/method.md §4.2."""
    return cls(ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks_enc=2, num_res_blocks_dec=3,
               attn_resolutions=(16,), z_channels=32, embed_dim=32, resolution=256)

  @classmethod
  def tiny(cls) -> "TextureVAEConfig":
    """The ``config["ddconfig"]`` of ``parity/texture_vae.npz`` (embed_dim 4)."""
    return cls.from_ldm(
        {"ch": 32, "ch_mult": [1, 2, 2], "num_res_blocks": 1, "attn_resolutions": [8],
         "z_channels": 4, "resolution": 32, "in_channels": 3, "out_ch": 3,
         "dropout": 0.0, "double_z": True}, embed_dim=4)

  @classmethod
  def preset(cls, name: str) -> "TextureVAEConfig":
    """The config named ``name`` (one of ``PRESETS``)."""
    if name not in PRESETS:
      raise ValueError(f"unknown texture VAE preset '{name}' (expected one of {PRESETS})")
    return getattr(cls, name)()

  @classmethod
  def from_ldm(cls, ddconfig: Mapping[str, Any], embed_dim: int) -> "TextureVAEConfig":
    """Builds the config from an LDM ``ddconfig`` dict and ``embed_dim``.

    The LDM decoder has ``num_res_blocks + 1`` blocks per level.
    """
    nrb = int(ddconfig["num_res_blocks"])
    return cls(ch=int(ddconfig["ch"]), ch_mult=tuple(ddconfig["ch_mult"]),
               num_res_blocks_enc=nrb, num_res_blocks_dec=nrb + 1,
               attn_resolutions=tuple(ddconfig.get("attn_resolutions", ())),
               z_channels=int(ddconfig["z_channels"]), embed_dim=int(embed_dim),
               resolution=int(ddconfig["resolution"]),
               in_channels=int(ddconfig.get("in_channels", 3)),
               out_channels=int(ddconfig.get("out_ch", 3)),
               dropout=float(ddconfig.get("dropout", 0.0)),
               double_z=bool(ddconfig.get("double_z", True)))

  def to_dict(self) -> dict[str, Any]:
    """JSON-friendly dict (tuples become lists)."""
    return {k: (list(v) if isinstance(v, tuple) else v)
            for k, v in dataclasses.asdict(self).items()}

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "TextureVAEConfig":
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(d) - names)
    if unknown:
      raise ValueError(f"TextureVAEConfig.from_dict: unknown field(s) {unknown}")
    return cls(**dict(d))


def _conv(cin: int, cout: int, k: int, *, rngs: nnx.Rngs, dtype, param_dtype,
          strides: int = 1, padding: Any = None) -> nnx.Conv:
  """k×k convolution with PyTorch's default init (U(±1/√fan_in) weight and bias)."""
  if padding is None:
    padding = ((k // 2, k // 2), (k // 2, k // 2))
  init, bias_init = layers.torch_linear_init(cin * k * k)
  return layers.Conv(cin, cout, (k, k), strides=strides, padding=padding, rngs=rngs,
                     kernel_init=init, bias_init=bias_init, dtype=dtype,
                     param_dtype=param_dtype)


def _norm(c: int, cfg: TextureVAEConfig, *, rngs: nnx.Rngs, dtype, param_dtype) -> nnx.GroupNorm:
  return layers.GroupNorm(c, num_groups=cfg.num_groups, epsilon=cfg.norm_eps, rngs=rngs,
                          dtype=dtype, param_dtype=param_dtype)


class ResnetBlock(nnx.Module):
  """GN → swish → conv3 → GN → swish → dropout → conv3, plus the (1×1) shortcut."""

  def __init__(self, cin: int, cout: int, cfg: TextureVAEConfig, *, rngs: nnx.Rngs,
               dtype=None, param_dtype=jnp.float32):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.norm1 = _norm(cin, cfg, **kw)
    self.conv1 = _conv(cin, cout, 3, **kw)
    self.norm2 = _norm(cout, cfg, **kw)
    self.dropout = nnx.Dropout(cfg.dropout, rngs=rngs if cfg.dropout > 0 else None)
    self.conv2 = _conv(cout, cout, 3, **kw)
    self.nin_shortcut = _conv(cin, cout, 1, **kw) if cin != cout else None

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.conv1(nnx.swish(self.norm1(x)))
    h = self.conv2(self.dropout(nnx.swish(self.norm2(h))))
    if self.nin_shortcut is not None:
      x = self.nin_shortcut(x)
    return x + h


class AttnBlock(nnx.Module):
  """Single-head self-attention over all spatial positions (LDM ``AttnBlock``)."""

  def __init__(self, c: int, cfg: TextureVAEConfig, *, rngs: nnx.Rngs, dtype=None,
               param_dtype=jnp.float32):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.norm = _norm(c, cfg, **kw)
    self.q = _conv(c, c, 1, **kw)
    self.k = _conv(c, c, 1, **kw)
    self.v = _conv(c, c, 1, **kw)
    self.proj_out = _conv(c, c, 1, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, h, w, c = x.shape
    y = self.norm(x)
    # One head of width C over h·w tokens: [B, T, 1, C]; softmax(q·kᵀ/√C) in float32.
    q, k, v = (f(y).reshape(b, h * w, 1, c) for f in (self.q, self.k, self.v))
    out = jax.nn.dot_product_attention(q, k, v, scale=c ** -0.5)
    return x + self.proj_out(out.reshape(b, h, w, c))


class Downsample(nnx.Module):
  """Zero-pad right and bottom by one, then a 3×3 stride-2 convolution without padding."""

  def __init__(self, c: int, *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
    self.conv = _conv(c, c, 3, strides=2, padding="VALID", rngs=rngs, dtype=dtype,
                      param_dtype=param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.conv(jnp.pad(x, ((0, 0), (0, 1), (0, 1), (0, 0))))


class Upsample(nnx.Module):
  """Nearest-neighbour ×2 upsampling, then a 3×3 convolution."""

  def __init__(self, c: int, *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32):
    self.conv = _conv(c, c, 3, rngs=rngs, dtype=dtype, param_dtype=param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.conv(jnp.repeat(jnp.repeat(x, 2, axis=1), 2, axis=2))


class Level(nnx.Module):
  """One resolution level: ResNet blocks (each optionally followed by attention) and an
  optional resampler (``downsample`` in the encoder, ``upsample`` in the decoder)."""

  def __init__(self, cin: int, cout: int, num_blocks: int, use_attn: bool,
               resample: str | None, cfg: TextureVAEConfig, *, rngs: nnx.Rngs,
               dtype=None, param_dtype=jnp.float32):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.block = nnx.List([ResnetBlock(cin if i == 0 else cout, cout, cfg, **kw)
                           for i in range(num_blocks)])
    self.attn = nnx.List([AttnBlock(cout, cfg, **kw) for _ in range(num_blocks)]
                         if use_attn else [])
    self.downsample = Downsample(cout, **kw) if resample == "down" else None
    self.upsample = Upsample(cout, **kw) if resample == "up" else None

  def __call__(self, x: jax.Array) -> jax.Array:
    for i, block in enumerate(self.block):
      x = block(x)
      if len(self.attn):
        x = self.attn[i](x)
    if self.downsample is not None:
      x = self.downsample(x)
    if self.upsample is not None:
      x = self.upsample(x)
    return x


class Mid(nnx.Module):
  """ResNet → attention → ResNet at the lowest resolution."""

  def __init__(self, c: int, cfg: TextureVAEConfig, *, rngs: nnx.Rngs, dtype=None,
               param_dtype=jnp.float32):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.block_1 = ResnetBlock(c, c, cfg, **kw)
    self.attn_1 = AttnBlock(c, cfg, **kw)
    self.block_2 = ResnetBlock(c, c, cfg, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.block_2(self.attn_1(self.block_1(x)))


class Encoder(nnx.Module):
  """Image [B, H, W, in] → moments [B, H/f, W/f, 2·z_channels] (or z_channels)."""

  def __init__(self, cfg: TextureVAEConfig, *, rngs: nnx.Rngs, dtype=None,
               param_dtype=jnp.float32):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.conv_in = _conv(cfg.in_channels, cfg.ch, 3, **kw)
    levels, cin, res = [], cfg.ch, cfg.resolution
    for lvl, mult in enumerate(cfg.ch_mult):
      cout = cfg.ch * mult
      last = lvl == cfg.num_levels - 1
      levels.append(Level(cin, cout, cfg.num_res_blocks_enc, res in cfg.attn_resolutions,
                          None if last else "down", cfg, **kw))
      cin, res = cout, (res if last else res // 2)
    self.down = nnx.List(levels)
    self.mid = Mid(cin, cfg, **kw)
    self.norm_out = _norm(cin, cfg, **kw)
    self.conv_out = _conv(cin, 2 * cfg.z_channels if cfg.double_z else cfg.z_channels, 3, **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.conv_in(x)
    for level in self.down:
      h = level(h)
    h = self.mid(h)
    return self.conv_out(nnx.swish(self.norm_out(h)))


class Decoder(nnx.Module):
  """Latent [B, h, w, z_channels] → image [B, h·f, w·f, out] (no tanh, no clamp)."""

  def __init__(self, cfg: TextureVAEConfig, *, rngs: nnx.Rngs, dtype=None,
               param_dtype=jnp.float32):
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    cin = cfg.ch * cfg.ch_mult[-1]
    self.conv_in = _conv(cfg.z_channels, cin, 3, **kw)
    self.mid = Mid(cin, cfg, **kw)
    levels, res = {}, cfg.latent_resolution
    for lvl in reversed(range(cfg.num_levels)):
      cout = cfg.ch * cfg.ch_mult[lvl]
      levels[lvl] = Level(cin, cout, cfg.num_res_blocks_dec, res in cfg.attn_resolutions,
                          "up" if lvl else None, cfg, **kw)
      cin, res = cout, (res * 2 if lvl else res)
    # Indexed by level (up[0] = full resolution), executed from the top level down.
    self.up = nnx.List([levels[lvl] for lvl in range(cfg.num_levels)])
    self.norm_out = _norm(cin, cfg, **kw)
    self.conv_out = _conv(cin, cfg.out_channels, 3, **kw)

  def __call__(self, z: jax.Array) -> jax.Array:
    h = self.mid(self.conv_in(z))
    for lvl in reversed(range(len(self.up))):
      h = self.up[lvl](h)
    return self.conv_out(nnx.swish(self.norm_out(h)))


class TextureVAE(nnx.Module):
  """LDM ``AutoencoderKL``: encoder + quant_conv → posterior; post_quant_conv + decoder.

  Example::

    vae = TextureVAE(TextureVAEConfig.f16d32(), rngs=nnx.Rngs(0))
    posterior = vae.encode(images)              # images NHWC in [-1, 1]
    z = posterior.sample(key)                   # [B, 16, 16, 32]
    recon = vae.decode(z)                       # [B, 256, 256, 3]
  """

  def __init__(self, cfg: TextureVAEConfig, *, rngs: nnx.Rngs, dtype=None,
               param_dtype=jnp.float32):
    if not cfg.double_z:
      raise ValueError("TextureVAE needs double_z=True: the posterior takes its mean and "
                       "log-variance from the encoder's 2·z_channels outputs")
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.config = cfg
    self.encoder = Encoder(cfg, **kw)
    self.decoder = Decoder(cfg, **kw)
    self.quant_conv = _conv(2 * cfg.z_channels, 2 * cfg.embed_dim, 1, **kw)
    self.post_quant_conv = _conv(cfg.embed_dim, cfg.z_channels, 1, **kw)

  def encode_moments(self, images: jax.Array) -> jax.Array:
    """quant_conv(encoder(images)): [B, h, w, 2·embed_dim], mean channels first."""
    return self.quant_conv(self.encoder(images))

  def encode(self, images: jax.Array) -> DiagonalGaussian:
    """Images NHWC → diagonal Gaussian posterior over the NHWC latent (float32)."""
    return DiagonalGaussian.from_moments(self.encode_moments(images), axis=-1)

  def decode(self, z: jax.Array) -> jax.Array:
    """Latent NHWC [B, h, w, embed_dim] → images NHWC (nominally in [-1, 1])."""
    return self.decoder(self.post_quant_conv(z))

  def __call__(self, images: jax.Array, key: jax.Array | None = None, *,
               eps: jax.Array | None = None,
               sample_posterior: bool = True) -> tuple[jax.Array, DiagonalGaussian]:
    """Training forward: encode, sample (with ``key`` or ``eps``) or take the mean, decode.

    Returns (reconstruction, posterior).
    """
    posterior = self.encode(images)
    z = posterior.sample(key, eps=eps) if sample_posterior else posterior.mode()
    return self.decode(z), posterior


class ProjectedTextureVAE(TextureVAE):
  """The VA-VAE's training-time autoencoder: a ``TextureVAE`` plus ``linear_proj``.

  ``linear_proj`` is the reference's ``reverse_proj`` 1×1 convolution without bias from
  the latent (embed_dim) to the vision-foundation width (1024 for DINOv2 ViT-L/14),
  trained with the autoencoder (``proj_fix`` False) and used only by the VF loss on the
  *sampled* latent. The other parameters are exactly those of ``TextureVAE``, so
  dropping ``linear_proj`` gives a plain texture VAE (what export writes).
  """

  def __init__(self, cfg: TextureVAEConfig, vf_dim: int, *, rngs: nnx.Rngs, dtype=None,
               param_dtype=jnp.float32):
    super().__init__(cfg, rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    init, _ = layers.torch_linear_init(cfg.embed_dim)
    self.linear_proj = layers.Conv(cfg.embed_dim, int(vf_dim), (1, 1), padding="VALID",
                                   use_bias=False, kernel_init=init, rngs=rngs, dtype=dtype,
                                   param_dtype=param_dtype)


def parameter_counts(cfg: TextureVAEConfig) -> dict[str, int]:
  """Parameter counts of an abstract (never allocated) model, by part."""
  model = nnx.eval_shape(lambda: TextureVAE(cfg, rngs=nnx.Rngs(0)))
  counts = {name: layers.param_count(getattr(model, name))
            for name in ("encoder", "decoder", "quant_conv", "post_quant_conv")}
  counts["total"] = sum(counts.values())
  return counts


__all__: Sequence[str] = (
    "TextureVAEConfig", "DiagonalGaussian", "ResnetBlock", "AttnBlock", "Downsample",
    "Upsample", "ProjectedTextureVAE", "Level", "Mid", "Encoder", "Decoder", "TextureVAE",
    "parameter_counts", "LOGVAR_MIN", "LOGVAR_MAX", "PRESETS")
