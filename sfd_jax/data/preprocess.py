"""Image preprocessing of SFD: the ADM centre crop and the two DINOv2 input pipelines.

Three pipelines, kept apart on purpose (docs/method.md §2.1, §2.3, §3.3, §12.13):

* ``adm_center_crop``: guided-diffusion's ``center_crop_arr`` on a PIL image, the crop
  every 256×256 training image of the diffusion model goes through (texture VAE input
  after ``uint8_to_m11``).
* ``dino_extraction_input``: what sits in front of DINOv2 when the diffusion latents
  are extracted. It starts from the [-1, 1] ADM crop, maps it to ImageNet
  normalisation and resizes 256 → 224 with PyTorch's *non-antialiased* bicubic
  (``torch_bicubic_resize``), i.e. the full field of view of the crop.
* ``semvae_training_dino_input``: what produced the SemVAE's *training* features:
  torchvision ``Resize(256, bicubic)`` on the short side of the raw image, then
  ``CenterCrop(224)`` (87.5 % field of view), then ImageNet normalisation.

The SemVAE is therefore applied at extraction time to tokens from a slightly
different pipeline than it was trained on; a faithful port keeps both.

Layouts: PIL in, numpy HWC out for the host-side functions; NHWC float arrays for the
array functions (``torch_bicubic_resize``, ``dino_extraction_input``), which are
jit-compatible.
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from PIL import Image

from sfd_jax.models.layers import IMAGENET_MEAN, IMAGENET_STD


def to_rgb(pil_image: Image.Image) -> Image.Image:
  """Converts any PIL mode (L, P, CMYK, RGBA, ...) to RGB as torchvision's loader does.

  ``ImageFolder``'s default loader calls ``convert("RGB")``; for RGBA this drops the
  alpha channel (no compositing onto a background), which is what the reference did.
  """
  return pil_image if pil_image.mode == "RGB" else pil_image.convert("RGB")


def adm_center_crop(pil_image: Image.Image, image_size: int = 256) -> np.ndarray:
  """ADM (guided-diffusion ``center_crop_arr``) centre crop; returns uint8 [S, S, 3].

  While the short side is at least ``2·image_size`` the image is halved with a BOX
  filter; then it is resized with BICUBIC so the short side is exactly
  ``image_size`` (both sides scaled and rounded), and the central square is cut out.
  The image is converted to RGB first (the reference's ImageFolder loader does that
  before the transform runs).
  """
  img = to_rgb(pil_image)
  while min(img.size) >= 2 * image_size:
    img = img.resize(tuple(s // 2 for s in img.size), resample=Image.Resampling.BOX)
  scale = image_size / min(img.size)
  img = img.resize(tuple(round(s * scale) for s in img.size), resample=Image.Resampling.BICUBIC)
  arr = np.asarray(img, dtype=np.uint8)
  top = (arr.shape[0] - image_size) // 2
  left = (arr.shape[1] - image_size) // 2
  return np.ascontiguousarray(arr[top:top + image_size, left:left + image_size])


def uint8_to_m11(images: np.ndarray | jax.Array) -> jax.Array:
  """uint8 pixels → float32 in [-1, 1] (ToTensor then Normalize(0.5, 0.5))."""
  return (jnp.asarray(images, jnp.float32) / 255.0 - 0.5) / 0.5


def imagenet_normalize(x01):
  """(x − ImageNet mean) / ImageNet std over the last (channel) axis; x in [0, 1].

  numpy in → numpy out (host pipelines), jax in → jax out.
  """
  mean = np.asarray(IMAGENET_MEAN, np.float32)
  std = np.asarray(IMAGENET_STD, np.float32)
  return (x01 - mean) / std


def _cubic_conv_weights(t: np.ndarray, a: float) -> np.ndarray:
  """The 4 cubic-convolution (Keys) weights of the taps at offsets −1, 0, 1, 2 of frac ``t``.

  Evaluated in ``t``'s dtype with PyTorch's operation order
  (``get_cubic_upsample_coefficients``), so float32 input reproduces its rounding.
  """
  a = t.dtype.type(a)
  one = t.dtype.type(1.0)

  def near(x):  # |x| <= 1
    return ((a + 2) * x - (a + 3)) * x * x + 1

  def far(x):  # 1 < |x| < 2
    return ((a * x - 5 * a) * x + 8 * a) * x - 4 * a

  rest = one - t
  return np.stack([far(t + one), near(t), near(rest), far(rest + one)], axis=-1)


@functools.lru_cache(maxsize=64)
def torch_bicubic_matrix(in_size: int, out_size: int,
                         coord_dtype: str = "float32") -> np.ndarray:
  """[out, in] float64 matrix of PyTorch's ``F.interpolate(mode="bicubic")``.

  Non-antialiased, ``align_corners=False``, output size given (scale = in/out):
  output i samples the input at s = (i + 0.5)·in/out − 0.5 with the cubic
  convolution kernel a = −0.75 on the 4 taps floor(s) − 1 … floor(s) + 2; tap indices
  are clamped to [0, in − 1] (edge replication; clamped taps accumulate) and the
  kernel is *not* stretched when downscaling.

  ``coord_dtype`` is the precision of s and of the kernel weights. PyTorch computes
  them in float32 for float32 images; doing the same here ("float32", the default)
  matches its output to ~1e-6 on unit-scale images, whereas the exact rule
  ("float64") differs from it by up to ~6e-5 where the image has hard edges. The
  matrix itself is float64 (the accumulated weights); the array is read-only.
  """
  if in_size < 1 or out_size < 1:
    raise ValueError(f"torch_bicubic_matrix: sizes must be positive, got {in_size}→{out_size}")
  ft = np.dtype(coord_dtype).type
  scale = ft(in_size) / ft(out_size)
  src = scale * (np.arange(out_size).astype(ft) + ft(0.5)) - ft(0.5)
  base = np.floor(src)
  frac = np.clip(src - base, ft(0), ft(1))
  weights = _cubic_conv_weights(frac, a=-0.75)  # [out, 4]
  taps = np.clip(base[:, None].astype(np.int64) + np.arange(-1, 3)[None, :], 0, in_size - 1)
  mat = np.zeros((out_size, in_size), np.float64)
  np.add.at(mat, (np.repeat(np.arange(out_size), 4), taps.ravel()),
            weights.ravel().astype(np.float64))
  mat.setflags(write=False)
  return mat


def torch_bicubic_resize(x_nhwc: jax.Array | np.ndarray, out_h: int, out_w: int) -> jax.Array:
  """PyTorch's non-antialiased bicubic resize (``align_corners=False``) of NHWC images.

  Reproduces ``F.interpolate(x, size=(out_h, out_w), mode="bicubic")`` (antialias
  off); ``jax.image.resize`` does not (it uses a = −0.5 and, with antialias, stretches
  the kernel). The two separable resampling matrices are built in float64 and applied
  with an einsum in float32 (the input's float dtype if wider).
  """
  x = jnp.asarray(x_nhwc)
  if x.ndim != 4:
    raise ValueError(f"torch_bicubic_resize expects NHWC [B, H, W, C], got shape {x.shape}")
  dtype = jnp.promote_types(x.dtype, jnp.float32)
  mh = jnp.asarray(torch_bicubic_matrix(x.shape[1], out_h), dtype)
  mw = jnp.asarray(torch_bicubic_matrix(x.shape[2], out_w), dtype)
  return jnp.einsum("ip,jq,bpqc->bijc", mh, mw, x.astype(dtype),
                    precision=jax.lax.Precision.HIGHEST)


@functools.lru_cache(maxsize=64)
def torch_bilinear_matrix(in_size: int, out_size: int) -> np.ndarray:
  """[out, in] float64 matrix of PyTorch's ``F.interpolate(mode="bilinear")``.

  Non-antialiased, ``align_corners=False``, output size given: output i samples the
  input at s = max((i + 0.5)·in/out − 0.5, 0) (float32, as PyTorch computes it) with
  the taps floor(s) and min(floor(s) + 1, in − 1), weights 1 − frac and frac.
  """
  if in_size < 1 or out_size < 1:
    raise ValueError(f"torch_bilinear_matrix: sizes must be positive, got {in_size}→{out_size}")
  ft = np.float32
  scale = ft(in_size) / ft(out_size)
  src = np.maximum(scale * (np.arange(out_size).astype(ft) + ft(0.5)) - ft(0.5), ft(0))
  i0 = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  i1 = np.minimum(i0 + 1, in_size - 1)
  frac = (src - i0.astype(ft)).astype(np.float64)
  mat = np.zeros((out_size, in_size), np.float64)
  np.add.at(mat, (np.arange(out_size), i0), 1.0 - frac)
  np.add.at(mat, (np.arange(out_size), i1), frac)
  mat.setflags(write=False)
  return mat


def torch_bilinear_resize(x_nhwc: jax.Array | np.ndarray, out_h: int, out_w: int) -> jax.Array:
  """PyTorch's non-antialiased bilinear resize (``align_corners=False``) of NHWC images."""
  x = jnp.asarray(x_nhwc)
  if x.ndim != 4:
    raise ValueError(f"torch_bilinear_resize expects NHWC [B, H, W, C], got shape {x.shape}")
  if (x.shape[1], x.shape[2]) == (out_h, out_w):
    return x
  dtype = jnp.promote_types(x.dtype, jnp.float32)
  mh = jnp.asarray(torch_bilinear_matrix(x.shape[1], out_h), dtype)
  mw = jnp.asarray(torch_bilinear_matrix(x.shape[2], out_w), dtype)
  return jnp.einsum("ip,jq,bpqc->bijc", mh, mw, x.astype(dtype),
                    precision=jax.lax.Precision.HIGHEST)


def vf_foundation_input(x_m11_nhwc: jax.Array | np.ndarray, size: int = 224) -> jax.Array:
  """The VA-VAE's input of its VF foundation model (DINOv2 ViT-L/14).

  The reference (``vavae/ldm/models/foundation_models.py``) resizes the training images
  in [-1, 1] bilinearly to ``size`` (``F.interpolate(mode="bilinear",
  align_corners=False)``) and feeds them to timm's model *without* ImageNet
  normalisation. NHWC in and out.
  """
  x = jnp.asarray(x_m11_nhwc, jnp.float32)
  return torch_bilinear_resize(x, size, size)


def dino_extraction_input(x_m11_nhwc: jax.Array | np.ndarray, size: int = 224) -> jax.Array:
  """DINOv2 input at latent-extraction time from ADM crops in [-1, 1] (docs/method.md §2.3).

  ((x + 1)/2 − mean)/std with the ImageNet statistics, *then* PyTorch's non-antialiased
  bicubic resize to ``size``×``size`` (the order of the reference). NHWC in and out.
  """
  x = imagenet_normalize((jnp.asarray(x_m11_nhwc, jnp.float32) + 1.0) / 2.0)
  return torch_bicubic_resize(x, size, size)


def _torchvision_resize_short_side(pil_image: Image.Image, size: int) -> Image.Image:
  """torchvision ``Resize(size, BICUBIC)`` on a PIL image (PIL's antialiased bicubic).

  The short side becomes ``size`` and the long side ``int(size·long/short)``
  (truncated, as torchvision computes it).
  """
  w, h = pil_image.size
  short, long = (w, h) if w <= h else (h, w)
  new_short, new_long = size, int(size * long / short)
  new_w, new_h = (new_short, new_long) if w <= h else (new_long, new_short)
  if (new_w, new_h) == (w, h):
    return pil_image
  return pil_image.resize((new_w, new_h), resample=Image.Resampling.BICUBIC)


def _torchvision_center_crop(arr: np.ndarray, size: int) -> np.ndarray:
  """torchvision ``CenterCrop(size)`` offsets: int(round((dim − size)/2)) (Python round)."""
  h, w = arr.shape[:2]
  if h < size or w < size:
    raise ValueError(f"center crop of {size} from an image of {h}×{w}: image too small")
  top = int(round((h - size) / 2.0))
  left = int(round((w - size) / 2.0))
  return arr[top:top + size, left:left + size]


def semvae_training_dino_input(pil_image: Image.Image, resize: int = 256,
                               crop: int = 224) -> np.ndarray:
  """DINOv2 input used to extract the SemVAE's *training* features (docs/method.md §3.3).

  RGB conversion → torchvision ``Resize(256, bicubic)`` (short side) →
  ``CenterCrop(224)`` → ToTensor → ImageNet normalisation; float32 HWC [224, 224, 3].
  Not the extraction-time pipeline (see ``dino_extraction_input``).
  """
  img = _torchvision_resize_short_side(to_rgb(pil_image), resize)
  arr = _torchvision_center_crop(np.asarray(img, dtype=np.uint8), crop)
  return imagenet_normalize(arr.astype(np.float32) / 255.0)
