"""Tokenizer (autoencoder) reconstruction metrics: rFID, PSNR, SSIM, LPIPS.

The definitions of the reference's ``evaluate_tokenizer.py`` (yuemingPAN/SFD, from
hustvl/LightningDiT):

* images x in [-1, 1] (uint8 / 127.5 − 1); reconstructions x̂ are the decoder output;
  saved as uint8 with ``clamp(127.5·x̂ + 128, 0, 255)`` (truncation), the originals as
  their own uint8 pixels;
* **PSNR** per image on the uint8 pair, 20·log10(255 / √MSE), averaged over images
  (``inf`` for an exact reconstruction);
* **SSIM** torchmetrics' ``StructuralSimilarityIndexMeasure(data_range=(-1, 1))`` on the
  float images: both clamped to [-1, 1], Gaussian window 11 / σ 1.5, k1 0.01, k2 0.03,
  the per-window map averaged over the windows that lie inside the image (reflect
  padding, then the border cropped) and the channels, per image; averaged over images
  (the reference averages per-batch means, the same for equal batches);
* **LPIPS** (VGG, ``sfd_jax.models.lpips``) of (x̂, x) in float, averaged over images;
* **rFID** the Fréchet distance between the feature statistics of the uint8 originals
  and the uint8 reconstructions (the reference runs pytorch-fid on the two PNG folders:
  use the FID Inception with ``preprocess="pytorch_fid"``).

``ReconstructionMetrics`` accumulates batches; ``per_image_metrics`` is the jittable
per-image part.
"""
from __future__ import annotations

import math
from typing import Callable, Mapping

import jax
import jax.numpy as jnp
import numpy as np

from sfd_jax.metrics import fid as fid_lib

SSIM_KERNEL, SSIM_SIGMA, SSIM_K1, SSIM_K2 = 11, 1.5, 0.01, 0.03


def to_uint8(x_m11: jax.Array) -> jax.Array:
  """Decoder output → uint8 as the reference saves it: clamp(127.5·x + 128, 0, 255)."""
  return jnp.clip(127.5 * x_m11.astype(jnp.float32) + 128.0, 0.0, 255.0).astype(jnp.uint8)


def psnr_uint8(a: jax.Array, b: jax.Array) -> jax.Array:
  """Per-image PSNR [B] of two uint8 NHWC batches (inf where they are equal)."""
  mse = jnp.mean(jnp.square(a.astype(jnp.float32) - b.astype(jnp.float32)), axis=(1, 2, 3))
  return 20.0 * jnp.log10(255.0 / jnp.sqrt(mse))


def _gaussian_window(size: int = SSIM_KERNEL, sigma: float = SSIM_SIGMA) -> np.ndarray:
  d = np.arange((1 - size) / 2, (1 + size) / 2, 1.0)
  g = np.exp(-0.5 * (d / sigma) ** 2)
  g = g / g.sum()
  return np.outer(g, g)


def ssim(preds: jax.Array, target: jax.Array, data_range: tuple[float, float] = (-1.0, 1.0)
         ) -> jax.Array:
  """Per-image SSIM [B] of NHWC float batches, torchmetrics' definition (module docstring)."""
  lo, hi = data_range
  p = jnp.clip(preds.astype(jnp.float32), lo, hi)
  t = jnp.clip(target.astype(jnp.float32), lo, hi)
  rng = hi - lo
  c1, c2 = (SSIM_K1 * rng) ** 2, (SSIM_K2 * rng) ** 2
  if min(p.shape[1], p.shape[2]) < SSIM_KERNEL:
    raise ValueError(f"SSIM needs images of at least {SSIM_KERNEL} pixels, got "
                     f"{p.shape[1]}×{p.shape[2]}")
  c = p.shape[-1]
  window = jnp.asarray(_gaussian_window(), jnp.float32)[:, :, None, None]
  window = jnp.tile(window, (1, 1, 1, 5 * c))

  stack = jnp.concatenate([p, t, p * p, t * t, p * t], axis=-1)
  out = jax.lax.conv_general_dilated(stack, window, (1, 1), "VALID",
                                     dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                     feature_group_count=5 * c,
                                     precision=jax.lax.Precision.HIGHEST)
  mu_p, mu_t, e_pp, e_tt, e_pt = jnp.split(out, 5, axis=-1)
  var_p = jnp.maximum(e_pp - mu_p ** 2, 0.0)
  var_t = jnp.maximum(e_tt - mu_t ** 2, 0.0)
  cov = e_pt - mu_p * mu_t
  num = (2.0 * mu_p * mu_t + c1) * (2.0 * cov + c2)
  den = (mu_p ** 2 + mu_t ** 2 + c1) * (var_p + var_t + c2)
  return jnp.mean(num / den, axis=(1, 2, 3))


def per_image_metrics(images_uint8: jax.Array, recon_m11: jax.Array,
                      lpips: Callable[[jax.Array, jax.Array], jax.Array] | None = None
                      ) -> dict[str, jax.Array]:
  """``recon_uint8`` and the per-image PSNR, SSIM (and LPIPS) of one batch (jittable)."""
  x = images_uint8.astype(jnp.float32) / 127.5 - 1.0
  recon = recon_m11.astype(jnp.float32)
  out = {"recon_uint8": to_uint8(recon)}
  out["psnr"] = psnr_uint8(images_uint8, out["recon_uint8"])
  out["ssim"] = ssim(recon, x)
  if lpips is not None:
    out["lpips"] = lpips(recon, x).astype(jnp.float32)
  return out


class ReconstructionMetrics:
  """Accumulates per-image metrics and the rFID features over batches.

  ``feature_fn(uint8 NHWC) -> {"pool": [B, D], ...}`` (a ``metrics.adm.FeatureExtractor``)
  gives the rFID features; without one, no rFID.
  """

  def __init__(self, feature_fn: Callable[[np.ndarray], Mapping[str, np.ndarray]] | None):
    self.feature_fn = feature_fn
    self.values: dict[str, list[np.ndarray]] = {}
    self.real: list[np.ndarray] = []
    self.fake: list[np.ndarray] = []

  @property
  def count(self) -> int:
    return int(sum(v.shape[0] for v in self.values.get("psnr", [])))

  def add(self, images_uint8: np.ndarray, per_image: Mapping[str, np.ndarray]) -> None:
    """One batch: the originals and ``per_image_metrics``' output (valid rows only)."""
    for k, v in per_image.items():
      if k != "recon_uint8":
        self.values.setdefault(k, []).append(np.asarray(v, np.float64))
    if self.feature_fn is not None:
      self.real.append(np.asarray(self.feature_fn(np.asarray(images_uint8))["pool"],
                                  np.float64))
      self.fake.append(np.asarray(self.feature_fn(np.asarray(per_image["recon_uint8"]))["pool"],
                                  np.float64))

  def result(self) -> dict[str, float]:
    out = {k: float(np.mean(np.concatenate(v))) for k, v in self.values.items()}
    out["num_images"] = self.count
    if self.feature_fn is not None and self.real:
      real, fake = np.concatenate(self.real), np.concatenate(self.fake)
      out["rfid"] = float(fid_lib.fid_from_features(real, fake))
    return out


def finite(metrics: Mapping[str, float]) -> dict[str, float]:
  """The entries that TensorBoard can show (PSNR of an exact reconstruction is inf)."""
  return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and math.isfinite(v)}
