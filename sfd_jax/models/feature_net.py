"""A small supervised CNN: the demo's stand-in for DINOv2 and for the FID Inception.

No pretrained network can be downloaded on the demo machine, so the demo trains this
network on its own images (a classifier: its last feature map is semantic). It plays
two parts:

* **semantic encoder** — ``tokens(x)`` gives a G×G grid of D-wide, LayerNorm'ed patch
  tokens (row-major, like DINOv2's ``x_norm_patchtokens``) on the same grid as the
  texture latent: the Semantic VAE compresses them and the DiT's REPA head aligns to them.
* **FID feature network** — ``__call__(uint8 images)`` returns the ``FeatureExtractor``
  contract of ``sfd_jax.metrics.adm``: ``pool`` (mean token, D), ``spatial`` (the first
  ``spatial_channels`` channels of every token) and ``logits`` (classifier, for an
  Inception-Score-like number).

Saved like the converted networks (``meta.json`` kind ``demo_feature_net``;
``sfd_jax.convert.feature_net``).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Mapping

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

KIND = "demo_feature_net"


@dataclasses.dataclass(frozen=True)
class FeatureNetConfig:
  image_size: int = 16
  widths: tuple[int, ...] = (32, 64, 64)   # one 3×3 conv each; every stage after the first halves
  embed_dim: int = 64                      # token width (the "DINOv2 width" of the demo)
  num_classes: int = 10
  spatial_channels: int = 4

  def __post_init__(self):
    if self.image_size % self.downsample:
      raise ValueError(f"FeatureNetConfig.image_size {self.image_size} is not divisible by "
                       f"the downsampling factor {self.downsample}")

  @property
  def downsample(self) -> int:
    return 2 ** (len(self.widths) - 1)

  @property
  def grid(self) -> int:
    return self.image_size // self.downsample

  def to_dict(self) -> dict[str, Any]:
    return dataclasses.asdict(self)

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "FeatureNetConfig":
    d = dict(d)
    d["widths"] = tuple(d["widths"])
    return cls(**d)


class DemoFeatureNet(nnx.Module):
  """Conv stack → 1×1 projection → LayerNorm tokens; mean-pooled linear classifier."""

  def __init__(self, cfg: FeatureNetConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    convs, cin = [], 3
    for i, w in enumerate(cfg.widths):
      convs.append(nnx.Conv(cin, w, (3, 3), strides=1 if i == 0 else 2, padding=1, rngs=rngs))
      cin = w
    self.convs = nnx.List(convs)
    self.proj = nnx.Conv(cin, cfg.embed_dim, (1, 1), rngs=rngs)
    self.norm = nnx.LayerNorm(cfg.embed_dim, rngs=rngs)
    self.head = nnx.Linear(cfg.embed_dim, cfg.num_classes, rngs=rngs)

  def tokens(self, x: jax.Array) -> jax.Array:
    """Images in [-1, 1], [B, S, S, 3] → tokens [B, G·G, D] (row-major)."""
    if x.shape[1:] != (self.cfg.image_size, self.cfg.image_size, 3):
      raise ValueError(f"DemoFeatureNet expects [B, {self.cfg.image_size}, "
                       f"{self.cfg.image_size}, 3] images, got {x.shape}")
    h = x.astype(jnp.float32)
    for conv in self.convs:
      h = jax.nn.gelu(conv(h))
    h = self.norm(self.proj(h))
    return h.reshape(h.shape[0], -1, h.shape[-1])

  def logits(self, x: jax.Array) -> jax.Array:
    return self.head(self.tokens(x).mean(axis=1))

  def __call__(self, images_u8: jax.Array) -> dict[str, jax.Array]:
    x = images_u8.astype(jnp.float32) / 127.5 - 1.0
    tok = self.tokens(x)
    pool = tok.mean(axis=1)
    spatial = tok[..., :self.cfg.spatial_channels].reshape(tok.shape[0], -1)
    return {"pool": pool, "spatial": spatial, "logits": self.head(pool)}


def train_feature_net(images_u8: np.ndarray, labels: np.ndarray, cfg: FeatureNetConfig, *,
                      steps: int, batch_size: int = 128, lr: float = 2e-3, seed: int = 0,
                      log_every: int = 100, log=print) -> tuple[DemoFeatureNet, float]:
  """Cross-entropy training with random ±1 px shifts; returns (net, train accuracy)."""
  net = DemoFeatureNet(cfg, rngs=nnx.Rngs(seed))
  opt = nnx.Optimizer(net, optax.adamw(lr, weight_decay=1e-4), wrt=nnx.Param)
  x_all = images_u8.astype(np.float32) / 127.5 - 1.0
  rng = np.random.default_rng(seed)

  @nnx.jit
  def step(net, opt, x, y):
    def loss_fn(net):
      logits = net.logits(x)
      return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(net)
    opt.update(net, grads)
    return loss

  for i in range(steps):
    idx = rng.integers(0, len(x_all), batch_size)
    x = x_all[idx]
    dy, dx = rng.integers(-1, 2, 2)
    x = np.roll(x, (int(dy), int(dx)), axis=(1, 2))
    loss = step(net, opt, jnp.asarray(x), jnp.asarray(labels[idx]))
    if (i + 1) % log_every == 0 or i + 1 == steps:
      log(f"  feature net step {i + 1}/{steps}: loss {float(loss):.4f}")
  acc = accuracy(net, images_u8, labels)
  return net, acc


def accuracy(net: DemoFeatureNet, images_u8: np.ndarray, labels: np.ndarray,
             batch_size: int = 512) -> float:
  fn = nnx.jit(lambda n, x: n(x)["logits"].argmax(-1))
  pred = np.concatenate([np.asarray(fn(net, jnp.asarray(images_u8[i:i + batch_size])))
                         for i in range(0, len(images_u8), batch_size)])
  return float(np.mean(pred == labels))
