"""DINOv2 ViT with register tokens (facebookresearch/dinov2 ``DinoVisionTransformer``).

SFD uses the frozen hub model ``dinov2_vitb14_reg`` (docs/method.md §2.3): its final-normed patch
tokens are both the SemVAE input and the REPA target. The VA-VAE texture-VAE recipe's
VF loss aligns to ViT-L/14 without registers (preset ``vitl14``, 1024-d). This module reproduces the
reference's ``forward_features`` (docs/method.md §2.3):

* patch embedding: 14×14 convolution with stride 14, no padding; tokens row-major;
* ``[cls, patches] + pos_embed`` where the learned 37×37 position grid (img_size 518)
  is resampled to the input's patch grid with PyTorch's *antialiased* bicubic
  (``F.interpolate(..., mode="bicubic", antialias=True, size=...)``); the cls row is
  kept as is;
* the register tokens are inserted after cls *after* the position embedding was added,
  so they carry none;
* pre-norm blocks ``x + ls1·attn(norm1(x))``, ``x + ls2·mlp(norm2(x))`` with LayerNorm
  eps 1e-6, fused qkv split as (3, heads, head_dim), exact GELU, LayerScale;
* a final LayerNorm; outputs are split into cls / registers / patches.

Images are NHWC here (the reference is NCHW), already ImageNet-normalised (see
``sfd_jax.data.preprocess``). The pre-norm ``TransformerBlock`` defined here is also
the block of the Semantic VAE (``sfd_jax.models.semantic_vae``), which differs only by
its LayerNorm eps, the absence of LayerScale and PyTorch-default initialisation.
"""
from __future__ import annotations

import dataclasses
from typing import Callable

import jax
import jax.numpy as jnp
from flax import nnx

from sfd_jax.models import layers

# (role, fan_in) -> (kernel_init, bias_init); roles: "qkv", "proj", "fc1", "fc2".
LinearInit = Callable[[str, int], tuple[layers.Initializer, layers.Initializer]]


def vit_linear_init(role: str, fan_in: int):
  """timm/DINOv2 ViT initialisation: truncated normal(0.02) weights, zero biases."""
  del role, fan_in
  return nnx.initializers.truncated_normal(0.02), layers.zeros


@dataclasses.dataclass(frozen=True)
class DinoV2Config:
  """Constructor arguments of the reference ``DinoVisionTransformer`` that matter here.

  ``layerscale_init`` None means no LayerScale (the hub's ``init_values`` None);
  DINOv2 hub models use 1.0, which only decides that LayerScale exists.
  """
  img_size: int = 518
  patch_size: int = 14
  in_chans: int = 3
  embed_dim: int = 768
  depth: int = 12
  num_heads: int = 12
  mlp_ratio: float = 4.0
  num_register_tokens: int = 4
  layerscale_init: float | None = 1.0
  interpolate_antialias: bool = True
  interpolate_offset: float = 0.0
  norm_eps: float = 1e-6

  def __post_init__(self):
    if self.img_size % self.patch_size:
      raise ValueError(f"DinoV2Config.img_size {self.img_size} is not a multiple of "
                       f"patch_size {self.patch_size}")
    if self.embed_dim % self.num_heads:
      raise ValueError(f"DinoV2Config.embed_dim {self.embed_dim} is not divisible by "
                       f"num_heads {self.num_heads}")
    if not self.interpolate_antialias:
      raise ValueError("DinoV2Config.interpolate_antialias=False (the non-register hub "
                       "models) is not supported; the *_reg models SFD uses set True")

  @property
  def grid_size(self) -> int:
    """Side of the learned position grid (518 / 14 = 37)."""
    return self.img_size // self.patch_size

  @property
  def mlp_hidden(self) -> int:
    return int(self.embed_dim * self.mlp_ratio)

  @classmethod
  def vitb14_reg(cls) -> "DinoV2Config":
    """Hub ``dinov2_vitb14_reg``: ViT-B/14, 4 registers (what SFD uses)."""
    return cls(embed_dim=768, depth=12, num_heads=12)

  @classmethod
  def vitl14(cls) -> "DinoV2Config":
    """ViT-L/14 without registers (1024-d, 24 blocks, 16 heads): the VA-VAE's VF model.

    The reference aligns to timm's ``vit_large_patch14_dinov2.lvd142m`` (the DINOv2
    ViT-L/14 weights, ``dinov2_vitl14_pretrain.pth``); timm resamples the 37×37
    position grid with antialiased bicubic to the target size, which is this module's
    resampling (``interpolate_antialias`` True, ``interpolate_offset`` 0). The hub's
    ``dinov2_vitl14`` would interpolate without antialias at a 0.1 offset instead.
    """
    return cls(embed_dim=1024, depth=24, num_heads=16, num_register_tokens=0)

  @classmethod
  def tiny_noreg(cls) -> "DinoV2Config":
    """A tiny register-free ViT for tests of the VF-loss path (width 64, 2 blocks)."""
    return cls(embed_dim=64, depth=2, num_heads=4, num_register_tokens=0)

  @classmethod
  def tiny(cls) -> "DinoV2Config":
    """The configuration of the parity fixture ``dinov2.npz``."""
    return cls(embed_dim=64, depth=2, num_heads=4)

  # facebookresearch/dinov2 ``vision_transformer.vit_*`` sizes (width, depth, heads).
  ARCHS = {"vit_small": (384, 12, 6), "vit_base": (768, 12, 12), "vit_large": (1024, 24, 16)}

  @classmethod
  def from_reference_kwargs(cls, kw: dict) -> "DinoV2Config":
    """From the reference ``DinoVisionTransformer`` constructor's keyword arguments
    (``img_size``, ``patch_size``, ``in_chans``, ``embed_dim``, ``depth``, ``num_heads``,
    ``mlp_ratio``, ``init_values`` (LayerScale; None = none), ``num_register_tokens``,
    ``interpolate_antialias``, ``interpolate_offset``; training-only ones such as
    ``drop_path_rate`` are ignored), optionally with ``arch_name`` (``vit_small`` /
    ``vit_base`` / ``vit_large``) for the sizes as the hub's ``_make_dinov2_model``.
    Absent arguments take the constructor's defaults. Variants this port does not
    implement (``ffn_layer`` other than "mlp", i.e. ViT-g's SwiGLU; biases off; chunked
    blocks) are errors."""
    kw = dict(kw)
    arch = kw.pop("arch_name", None)
    if arch is not None:
      if arch not in cls.ARCHS:
        raise ValueError(f"DINOv2 arch_name {arch!r}: supported {sorted(cls.ARCHS)} "
                         "(vit_giant2 uses a SwiGLU FFN, not implemented)")
      kw.setdefault("embed_dim", cls.ARCHS[arch][0])
      kw.setdefault("depth", cls.ARCHS[arch][1])
      kw.setdefault("num_heads", cls.ARCHS[arch][2])
    if kw.pop("ffn_layer", "mlp") != "mlp":
      raise ValueError("DINOv2 ffn_layer other than 'mlp' (SwiGLU, ViT-g) is not supported")
    for flag in ("qkv_bias", "ffn_bias", "proj_bias"):
      if not kw.pop(flag, True):
        raise ValueError(f"DINOv2 {flag}=False is not supported")
    if int(kw.pop("block_chunks", 0) or 0) > 1:
      raise ValueError("DINOv2 block_chunks > 1 (keys blocks.<chunk>.<i>) is not supported; "
                       "the hub models use block_chunks=0")
    for ignored in ("drop_path_rate", "drop_path_uniform", "embed_layer", "act_layer",
                    "block_fn", "pretrained", "weights"):
      kw.pop(ignored, None)
    init = kw.pop("init_values", None)
    out = dict(img_size=kw.pop("img_size", 224), patch_size=kw.pop("patch_size", 16),
               in_chans=kw.pop("in_chans", 3), embed_dim=kw.pop("embed_dim", 768),
               depth=kw.pop("depth", 12), num_heads=kw.pop("num_heads", 12),
               mlp_ratio=kw.pop("mlp_ratio", 4.0),
               num_register_tokens=kw.pop("num_register_tokens", 0),
               layerscale_init=None if init is None else float(init),
               interpolate_antialias=kw.pop("interpolate_antialias", False),
               interpolate_offset=kw.pop("interpolate_offset", 0.1))
    if kw:
      raise ValueError(f"unknown DINOv2 constructor arguments {sorted(kw)}")
    return cls(**out)

  @classmethod
  def from_hub_name(cls, name: str) -> "DinoV2Config":
    """``dinov2_vit{s,b,l}14[_reg]`` as torch.hub builds them (518 px, patch 14,
    LayerScale 1.0; ``_reg``: 4 registers, antialiased position resampling, offset 0)."""
    sizes = {"s": "vit_small", "b": "vit_base", "l": "vit_large"}
    base = name.removeprefix("dinov2_").removesuffix("_reg")
    if not (base.startswith("vit") and base.endswith("14") and base[3:-2] in sizes):
      raise ValueError(f"DINOv2 hub name {name!r}: expected dinov2_vit{{s,b,l}}14[_reg]")
    reg = name.endswith("_reg")
    return cls.from_reference_kwargs(dict(
        arch_name=sizes[base[3:-2]], img_size=518, patch_size=14, init_values=1.0,
        num_register_tokens=4 if reg else 0, interpolate_antialias=reg,
        interpolate_offset=0.0 if reg else 0.1))

  @classmethod
  def preset(cls, name: str) -> "DinoV2Config":
    presets = {"vitb14_reg": cls.vitb14_reg, "vitl14": cls.vitl14, "tiny": cls.tiny,
               "tiny_noreg": cls.tiny_noreg}
    if name not in presets:
      raise ValueError(f"unknown DINOv2 preset '{name}' (expected one of {sorted(presets)})")
    return presets[name]()


class Attention(nnx.Module):
  """Multi-head self-attention with a fused qkv projection split as (3, heads, head_dim).

  The layout of both DINOv2's ``attn.qkv`` and ``nn.MultiheadAttention.in_proj``
  (rows [q; k; v], heads contiguous within each); softmax(q·kᵀ/√head_dim)·v, then the
  output projection.
  """

  def __init__(self, dim: int, num_heads: int, *, rngs: nnx.Rngs,
               linear_init: LinearInit = vit_linear_init, dtype=None,
               param_dtype=jnp.float32):
    if dim % num_heads:
      raise ValueError(f"Attention: width {dim} is not divisible by {num_heads} heads")
    self.num_heads = num_heads
    k_init, b_init = linear_init("qkv", dim)
    self.qkv = layers.Dense(dim, 3 * dim, ("embed", "qkv"), rngs=rngs, kernel_init=k_init,
                            bias_init=b_init, dtype=dtype, param_dtype=param_dtype)
    k_init, b_init = linear_init("proj", dim)
    self.proj = layers.Dense(dim, dim, ("heads", "embed"), rngs=rngs, kernel_init=k_init,
                             bias_init=b_init, dtype=dtype, param_dtype=param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    b, t, d = x.shape
    qkv = self.qkv(x).reshape(b, t, 3, self.num_heads, d // self.num_heads)
    out = jax.nn.dot_product_attention(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2])
    return self.proj(out.reshape(b, t, d))


class Mlp(nnx.Module):
  """fc1 → exact (erf) GELU → fc2."""

  def __init__(self, dim: int, hidden: int, *, rngs: nnx.Rngs,
               linear_init: LinearInit = vit_linear_init, dtype=None,
               param_dtype=jnp.float32):
    k_init, b_init = linear_init("fc1", dim)
    self.fc1 = layers.Dense(dim, hidden, ("embed", "mlp"), rngs=rngs, kernel_init=k_init,
                            bias_init=b_init, dtype=dtype, param_dtype=param_dtype)
    k_init, b_init = linear_init("fc2", hidden)
    self.fc2 = layers.Dense(hidden, dim, ("mlp", "embed"), rngs=rngs, kernel_init=k_init,
                            bias_init=b_init, dtype=dtype, param_dtype=param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))


class LayerScale(nnx.Module):
  """Per-channel learned scale ``x · gamma``."""

  def __init__(self, dim: int, init_value: float, *, param_dtype=jnp.float32):
    self.gamma = nnx.Param(jnp.full((dim,), init_value, param_dtype), out_sharding=("norm",))

  def __call__(self, x: jax.Array) -> jax.Array:
    return x * self.gamma[...].astype(x.dtype)


class TransformerBlock(nnx.Module):
  """Pre-norm block: x + ls1·attn(norm1(x)); x + ls2·mlp(norm2(x)).

  ``layerscale_init`` None builds no LayerScale (``ls1``/``ls2`` are then None).
  """

  def __init__(self, dim: int, num_heads: int, mlp_hidden: int, *, rngs: nnx.Rngs,
               norm_eps: float, layerscale_init: float | None = None,
               linear_init: LinearInit = vit_linear_init, dtype=None,
               param_dtype=jnp.float32):
    kw = dict(dtype=dtype, param_dtype=param_dtype)
    self.norm1 = layers.LayerNorm(dim, epsilon=norm_eps, rngs=rngs, **kw)
    self.attn = Attention(dim, num_heads, rngs=rngs, linear_init=linear_init, **kw)
    self.norm2 = layers.LayerNorm(dim, epsilon=norm_eps, rngs=rngs, **kw)
    self.mlp = Mlp(dim, mlp_hidden, rngs=rngs, linear_init=linear_init, **kw)
    if layerscale_init is None:
      self.ls1 = self.ls2 = None
    else:
      self.ls1 = LayerScale(dim, layerscale_init, param_dtype=param_dtype)
      self.ls2 = LayerScale(dim, layerscale_init, param_dtype=param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    h = self.attn(self.norm1(x))
    x = x + (h if self.ls1 is None else self.ls1(h))
    h = self.mlp(self.norm2(x))
    return x + (h if self.ls2 is None else self.ls2(h))


class DinoV2(nnx.Module):
  """DINOv2 ViT with registers; ``forward_features`` as the reference (NHWC images)."""

  def __init__(self, config: DinoV2Config, *, rngs: nnx.Rngs, dtype=None,
               param_dtype=jnp.float32):
    self.config = config
    self.dtype = dtype
    c, d = config, config.embed_dim
    self.patch_embed = layers.Conv(
        c.in_chans, d, (c.patch_size, c.patch_size), strides=c.patch_size, padding="VALID",
        rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    self.cls_token = nnx.Param(
        1e-6 * jax.random.normal(rngs.params(), (1, d), param_dtype),
        out_sharding=(None, "embed"))
    self.register_tokens = nnx.Param(
        1e-6 * jax.random.normal(rngs.params(), (c.num_register_tokens, d), param_dtype),
        out_sharding=(None, "embed")) if c.num_register_tokens else None
    self.pos_embed = nnx.Param(
        0.02 * jax.random.truncated_normal(rngs.params(), -2.0, 2.0,
                                           (1 + c.grid_size ** 2, d), param_dtype),
        out_sharding=(None, "embed"))
    self.blocks = nnx.List([
        TransformerBlock(d, c.num_heads, c.mlp_hidden, rngs=rngs, norm_eps=c.norm_eps,
                         layerscale_init=c.layerscale_init, dtype=dtype,
                         param_dtype=param_dtype)
        for _ in range(c.depth)])
    self.norm = layers.LayerNorm(d, epsilon=c.norm_eps, rngs=rngs, dtype=dtype,
                                 param_dtype=param_dtype)

  def _compute_dtype(self):
    return self.dtype or self.pos_embed[...].dtype

  def patch_grid(self, height: int, width: int) -> tuple[int, int]:
    """Patch grid (h, w) of an image; raises if a side is not a multiple of the patch."""
    p = self.config.patch_size
    if height % p or width % p:
      raise ValueError(f"DinoV2: image size {height}×{width} is not a multiple of the "
                       f"patch size {p}")
    return height // p, width // p

  def embed_patches(self, images: jax.Array) -> jax.Array:
    """Conv patch embedding alone: NHWC images → [B, h·w, C] (row-major tokens)."""
    x = self.patch_embed(images.astype(self._compute_dtype()))
    return x.reshape(x.shape[0], x.shape[1] * x.shape[2], x.shape[3])

  def interpolate_pos_encoding(self, h: int, w: int) -> jax.Array:
    """Position embedding for an h×w patch grid: [1 + h·w, C] (cls row first).

    The 37×37 grid is resampled as PyTorch's ``F.interpolate(mode="bicubic",
    antialias=True)`` does: Keys kernel a = −0.5 stretched by the downscale factor,
    half-pixel centres, out-of-range taps dropped and weights renormalised — which is
    what ``jax.image.scale_and_translate(..., "bicubic", antialias=True)`` computes.
    With ``interpolate_offset`` 0 the reference passes the target size (scale = out/in);
    otherwise a scale factor (h + offset)/37. The grid is returned unchanged when it
    already matches, as in the reference. Computed in float32.
    """
    c = self.config
    m = c.grid_size
    pos = self.pos_embed[...].astype(jnp.float32)
    if (h, w) == (m, m):
      return pos
    grid = pos[1:].reshape(m, m, -1)
    if c.interpolate_offset:
      scale = jnp.array([(h + c.interpolate_offset) / m, (w + c.interpolate_offset) / m])
    else:
      scale = jnp.array([h / m, w / m])
    grid = jax.image.scale_and_translate(
        grid, (h, w, grid.shape[-1]), (0, 1), scale, jnp.zeros(2), method="bicubic",
        antialias=True, precision=jax.lax.Precision.HIGHEST)
    return jnp.concatenate([pos[:1], grid.reshape(h * w, -1)], axis=0)

  def prepare_tokens(self, images: jax.Array) -> jax.Array:
    """[cls, patches] + pos_embed, then registers after cls: [B, 1 + R + h·w, C]."""
    b, height, width, _ = images.shape
    h, w = self.patch_grid(height, width)
    dt = self._compute_dtype()
    x = self.embed_patches(images)
    cls = jnp.broadcast_to(self.cls_token[...].astype(dt)[None], (b, 1, x.shape[-1]))
    x = jnp.concatenate([cls, x], axis=1) + self.interpolate_pos_encoding(h, w).astype(dt)
    if self.register_tokens is None:
      return x
    regs = self.register_tokens[...].astype(dt)
    regs = jnp.broadcast_to(regs[None], (b,) + regs.shape)
    return jnp.concatenate([x[:, :1], regs, x[:, 1:]], axis=1)

  def forward_features(self, images: jax.Array) -> dict[str, jax.Array]:
    """The reference's ``forward_features`` (without masks) on NHWC images.

    Returns ``x_norm_clstoken`` [B, C], ``x_norm_regtokens`` [B, R, C],
    ``x_norm_patchtokens`` [B, h·w, C] (row-major), ``x_prenorm`` [B, 1 + R + h·w, C].
    """
    x = self.prepare_tokens(images)
    for block in self.blocks:
      x = block(x)
    x_norm = self.norm(x)
    r = self.config.num_register_tokens
    return {
        "x_norm_clstoken": x_norm[:, 0],
        "x_norm_regtokens": x_norm[:, 1:r + 1],
        "x_norm_patchtokens": x_norm[:, r + 1:],
        "x_prenorm": x,
    }

  def patch_features(self, images: jax.Array) -> jax.Array:
    """``x_norm_patchtokens`` alone: the SemVAE input and REPA target, [B, h·w, C]."""
    return self.forward_features(images)["x_norm_patchtokens"]

  def __call__(self, images: jax.Array) -> jax.Array:
    """The reference's default ``forward`` with the identity head: the normed cls token."""
    return self.forward_features(images)["x_norm_clstoken"]
