"""A small supervised CNN: the demo's stand-in for DINOv2 and for the FID Inception.

No pretrained network can be downloaded on the demo machine, so the demo trains this
network on its own images (a classifier, ``sfd_jax.training.vae`` kind ``feature_net``:
its last feature map is semantic). It plays two parts:

* **semantic encoder** — it has DINOv2's interface for the data jobs (``--mode=extract``
  and ``--mode=encode`` code): ``patch_features(x)`` of ImageNet-normalised images gives
  a G×G grid of D-wide, LayerNorm'ed patch tokens (row-major, like DINOv2's
  ``x_norm_patchtokens``) on the same grid as the texture latent, ``patch_grid`` and
  ``config.embed_dim`` / ``config.patch_size``;
* **FID feature network** — ``__call__(uint8 images)`` returns the ``FeatureExtractor``
  contract of ``sfd_jax.metrics.adm``: ``pool`` (mean token, D), ``spatial`` (the first
  ``spatial_channels`` channels of every token) and ``logits`` (classifier, for an
  Inception-Score-like number).
"""
from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from sfd_jax.models import layers
from sfd_jax.models.layers import IMAGENET_MEAN, IMAGENET_STD


@dataclasses.dataclass(frozen=True)
class FeatureNetConfig:
  image_size: int = 16
  widths: tuple[int, ...] = (32, 64, 64)   # one 3×3 conv each; every stage after the first halves
  embed_dim: int = 64                      # token width (the "DINOv2 width" of the demo)
  num_classes: int = 10
  spatial_channels: int = 4

  def __post_init__(self):
    if self.image_size % self.patch_size:
      raise ValueError(f"FeatureNetConfig.image_size {self.image_size} is not divisible by "
                       f"the downsampling factor {self.patch_size}")

  @property
  def patch_size(self) -> int:
    """Pixels per token side (the downsampling factor)."""
    return 2 ** (len(self.widths) - 1)

  @property
  def grid(self) -> int:
    return self.image_size // self.patch_size


class DemoFeatureNet(nnx.Module):
  """Conv stack → 1×1 projection → LayerNorm tokens; mean-pooled linear classifier."""

  def __init__(self, config: FeatureNetConfig, *, rngs: nnx.Rngs, dtype=None,
               param_dtype=jnp.float32):
    self.config = config
    kw = dict(rngs=rngs, dtype=dtype, param_dtype=param_dtype)
    convs, cin = [], 3
    for i, w in enumerate(config.widths):
      convs.append(layers.Conv(cin, w, (3, 3), strides=1 if i == 0 else 2, padding=1, **kw))
      cin = w
    self.convs = nnx.List(convs)
    self.proj = layers.Conv(cin, config.embed_dim, (1, 1), **kw)
    self.norm = layers.LayerNorm(config.embed_dim, **kw)
    self.head = layers.Dense(config.embed_dim, config.num_classes, ("embed", None),
                             kernel_init=nnx.initializers.lecun_normal(), **kw)

  def patch_grid(self, height: int, width: int) -> tuple[int, int]:
    p = self.config.patch_size
    if height % p or width % p:
      raise ValueError(f"image {height}×{width} is not a multiple of the {p}-pixel tokens")
    return height // p, width // p

  def patch_features(self, x: jax.Array) -> jax.Array:
    """ImageNet-normalised images [B, S, S, 3] → tokens [B, G·G, D] (row-major)."""
    size = self.config.image_size
    if x.shape[1:] != (size, size, 3):
      raise ValueError(f"DemoFeatureNet expects [B, {size}, {size}, 3] images, got {x.shape}")
    h = x.astype(jnp.float32)
    for conv in self.convs:
      h = jax.nn.gelu(conv(h))
    h = self.norm(self.proj(h))
    return h.reshape(h.shape[0], -1, h.shape[-1]).astype(jnp.float32)

  def logits(self, x: jax.Array) -> jax.Array:
    return self.head(self.patch_features(x).mean(axis=1)).astype(jnp.float32)

  def __call__(self, images_u8: jax.Array) -> dict[str, jax.Array]:
    x = images_u8.astype(jnp.float32) / 255.0
    tok = self.patch_features((x - jnp.asarray(IMAGENET_MEAN)) / jnp.asarray(IMAGENET_STD))
    pool = tok.mean(axis=1)
    spatial = tok[..., :self.config.spatial_channels].reshape(tok.shape[0], -1)
    return {"pool": pool, "spatial": spatial, "logits": self.head(pool)}
