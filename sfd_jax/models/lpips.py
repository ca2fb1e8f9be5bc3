"""LPIPS (learned perceptual image patch similarity, VGG16 variant) in Flax NNX.

The perceptual term of the texture VAE's LDM / VA-VAE training loss and a tokenizer
evaluation metric. The network is the one of the ``lpips`` package (v0.1, ``net="vgg"``)
and of taming-transformers' stripped copy (``taming/modules/losses/lpips.py``):

1. a fixed scaling layer ``(x - shift) / scale`` on images in [-1, 1], with
   shift = (-.030, -.088, -.188) and scale = (.458, .448, .450);
2. torchvision's VGG16 ``features`` (3×3 convolutions, padding 1, ReLU, 2×2 max-pool of
   stride 2) tapped after the ReLUs at indices 3, 8, 15, 22, 29 (relu1_2, relu2_2,
   relu3_3, relu4_3, relu5_3), each before the next pooling;
3. per tap k: unit-normalise the features over channels, n(f) = f / (‖f‖₂ + 1e-10) (the
   epsilon is added to the norm, outside the square root), square the difference of the
   two images' normalised features, apply the *linear head* k (a 1×1 convolution to one
   channel without bias) and average over the spatial positions;
4. the distance is the sum of the five stage terms, ((((l0 + l1) + l2) + l3) + l4).

The heads' ``Dropout(0.5)`` exists only in training mode of the reference; this module
is always the evaluation-mode network (the expected value of the dropped-out one).

Images are NHWC here (the reference is NCHW). Parameters: ``convs[i]`` is the i-th VGG16
convolution (torchvision ``features`` indices ``VGG16_CONV_INDICES``), ``lins[k]`` the
k-th head. Weights come from ``sfd_jax.convert.lpips`` (torchvision's VGG16 state dict +
the lpips package's ``vgg.pth`` heads); the network is frozen in every use.
"""
from __future__ import annotations

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from sfd_jax.models import layers

# torchvision vgg16().features: index of each 3×3 conv and its (in, out) channels.
VGG16_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
VGG16_CONV_CHANNELS = ((3, 64), (64, 64), (64, 128), (128, 128), (128, 256), (256, 256),
                       (256, 256), (256, 512), (512, 512), (512, 512), (512, 512),
                       (512, 512), (512, 512))
# Convolutions per tapped stage (relu1_2 ... relu5_3); a 2×2 max-pool precedes stages 1-4.
STAGE_SIZES = (2, 2, 3, 3, 3)
CHANNELS = (64, 128, 256, 512, 512)
TAP_NAMES = ("relu1_2", "relu2_2", "relu3_3", "relu4_3", "relu5_3")
SHIFT = (-0.030, -0.088, -0.188)
SCALE = (0.458, 0.448, 0.450)
NORM_EPS = 1e-10


def _kaiming_fan_out(key, shape, dtype=jnp.float32):
  """torchvision's VGG init: kaiming-normal, fan_out, ReLU gain (HWIO kernel)."""
  fan_out = shape[0] * shape[1] * shape[3]
  return jax.random.normal(key, shape, dtype) * jnp.sqrt(2.0 / fan_out).astype(dtype)


def _abs_normal(key, shape, dtype=jnp.float32):
  """Non-negative head weights for random initialisation (the trained heads are ≥ 0)."""
  return jnp.abs(jax.random.normal(key, shape, dtype)) / shape[2]


def normalize_channels(x: jax.Array, eps: float = NORM_EPS) -> jax.Array:
  """x / (‖x‖₂ over the channel axis + eps), as lpips' ``normalize_tensor``."""
  return x / (jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True)) + eps)


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """``nn.MaxPool2d(2, 2)`` on NHWC (odd sides are floored, as in PyTorch)."""
  return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")


class LPIPS(nnx.Module):
  """LPIPS-VGG distance between two NHWC image batches in [-1, 1].

  Example::

    lp = sfd_jax.convert.lpips.load_lpips("weights/lpips_vgg")
    d = lp(images, reconstructions)       # [B] float32
  """

  def __init__(self, *, rngs: nnx.Rngs, dtype=None, param_dtype=jnp.float32,
               width: float = 1.0):
    """``width`` < 1 scales every VGG width (a cheap stand-in for CPU tests only; the
    converted LPIPS is always width 1)."""
    self.dtype = dtype
    self.width = float(width)
    scaled = lambda c: c if c == 3 else max(1, int(round(c * self.width)))  # noqa: E731
    self.convs = nnx.List([
        layers.Conv(scaled(cin), scaled(cout), (3, 3), padding=((1, 1), (1, 1)), rngs=rngs,
                    kernel_init=_kaiming_fan_out, dtype=dtype, param_dtype=param_dtype)
        for cin, cout in VGG16_CONV_CHANNELS])
    self.lins = nnx.List([
        layers.Conv(scaled(c), 1, (1, 1), padding="VALID", use_bias=False, rngs=rngs,
                    kernel_init=_abs_normal, dtype=dtype, param_dtype=param_dtype)
        for c in CHANNELS])

  def scale_input(self, images: jax.Array) -> jax.Array:
    """The scaling layer: (x - shift) / scale per RGB channel, in float32."""
    shift = jnp.asarray(SHIFT, jnp.float32)
    scale = jnp.asarray(SCALE, jnp.float32)
    return (images.astype(jnp.float32) - shift) / scale

  def features(self, images: jax.Array) -> list[jax.Array]:
    """The five VGG16 taps (relu1_2 ... relu5_3) of NHWC images in [-1, 1]."""
    h = self.scale_input(images)
    if self.dtype is not None:
      h = h.astype(self.dtype)
    taps, i = [], 0
    for stage, size in enumerate(STAGE_SIZES):
      if stage:
        h = max_pool_2x2(h)
      for _ in range(size):
        h = jax.nn.relu(self.convs[i](h))
        i += 1
      taps.append(h)
    return taps

  def stage_distances(self, x0: jax.Array, x1: jax.Array) -> list[jax.Array]:
    """Per stage k: spatial mean of lin_k((n(f0) - n(f1))²), each [B] float32."""
    out = []
    for k, (f0, f1) in enumerate(zip(self.features(x0), self.features(x1))):
      diff = jnp.square(normalize_channels(f0.astype(jnp.float32))
                        - normalize_channels(f1.astype(jnp.float32)))
      out.append(jnp.mean(self.lins[k](diff.astype(f0.dtype)).astype(jnp.float32),
                          axis=(1, 2, 3)))
    return out

  def __call__(self, x0: jax.Array, x1: jax.Array) -> jax.Array:
    """LPIPS distance per image pair: [B] float32 (the reference returns [B, 1, 1, 1])."""
    terms = self.stage_distances(x0, x1)
    total = terms[0]
    for t in terms[1:]:
      total = total + t
    return total


__all__: Sequence[str] = ("LPIPS", "VGG16_CONV_INDICES", "CHANNELS", "TAP_NAMES",
                          "normalize_channels")
