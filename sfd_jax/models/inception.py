"""The FID Inception-v3 network (pytorch-fid's ``InceptionV3(use_fid_inception=True)``) in Flax NNX.

This is the network of the FID weights file ``pt_inception-2015-12-05-6726825d.pth``, which
holds the weights of TensorFlow's 2015 ``classify_image_graph_def.pb`` (the graph the ADM
evaluator of openai/guided-diffusion runs) under torchvision ``Inception3`` names. Attribute
names here mirror those names (``Conv2d_1a_3x3``, ``Mixed_5b.branch1x1``, ...), so the
converter maps ``<path>.conv.weight`` / ``<path>.bn.*`` one to one.

Layout is NHWC. Every ``BasicConv2d`` is conv (no bias) -> BatchNorm (eps 1e-3, inference
statistics) -> ReLU. The FID variants of the blocks are used: the pool branches of the
A, C and first E block average over a 3x3 window *excluding* the zero padding
(``count_include_pad=False``, as TensorFlow does), and the last E block (``Mixed_7c``) uses a
3x3 max pool. Block boundaries (pytorch-fid ``output_blocks``): block 0 ends after MaxPool 1
(64 channels, 73x73), block 1 after MaxPool 2 (192, 35x35), block 2 after ``Mixed_6e``
(768, 17x17), block 3 is the global average pool (2048, the FID "pool3" features).

Input preprocessing (``preprocess``):

* ``"pytorch_fid"`` (default; what the parity fixture pins): images in [0, 1] (or uint8,
  divided by 255), bilinear resize to 299x299 as ``F.interpolate(..., mode="bilinear",
  align_corners=False)`` without antialiasing (half-pixel centres, source coordinates
  clamped at 0; an exact identity at 299), then x -> 2x - 1.
* ``"adm"``: what the TensorFlow graph of the ADM evaluator does to the uint8 batch it is
  fed: TensorFlow-1 ``ResizeBilinear`` with ``align_corners=False`` and *no* half-pixel
  centres (source coordinate = dst * in / out), on pixel values in [0, 255], then
  (x - 128) / 128. For 256x256 samples the two resamplers differ by a half-pixel shift,
  which moves FID slightly; use ``"adm"`` for numbers meant to be compared with published
  ADM-evaluator numbers. (This rule is TensorFlow 1's documented ``resize_bilinear``; that
  the 2015 graph applies it, then ``Sub 128`` / ``Mul 1/128``, is taken from the graph as
  reproduced by torch-fidelity; it has not been checked against the graph here.)

Outputs (a dict, all float32):

* ``pool``: [B, 2048] pool3 features (FID, precision/recall).
* ``spatial``: [B, 2023] sFID features, see below.
* ``logits``: [B, 1008] ``pool @ fc.weight.T`` *without* the fc bias when the model has the
  classifier (``num_classes``), else ``None``. The ADM evaluator's Inception Score takes the
  softmax of exactly this product (it reads the graph's ``softmax/logits/MatMul``, i.e.
  before the bias add); the FID weights file stores the graph's softmax weights as
  ``fc.weight`` (1008 classes, class 0 unused) and its biases as ``fc.bias``.
* ``block0_mean``, ``block1_mean``, ``block2_mean``: spatial means of the block 0/1/2 outputs
  ([B, 64], [B, 192], [B, 768]), to localise a mismatch against the reference.

sFID features. The ADM evaluator takes the graph tensor ``mixed_6/conv:0`` and keeps
``[..., :7]``, flattened per image in NHWC order. The 2015 graph names its mixed blocks
``mixed`` .. ``mixed_10`` = torchvision ``Mixed_5b, 5c, 5d, 6a, 6b, 6c, 6d, 6e, 7a, 7b, 7c``,
so ``mixed_6`` is ``Mixed_6d``; inside a 17x17 block ``conv`` is the 1x1 branch (the
converted weights map ``mixed_6/conv/conv2d_params`` to ``Mixed_6d.branch1x1.conv``). The
tensor ``mixed_6/conv`` is the output of that conv unit, i.e. after its BatchNorm and ReLU:
[B, 17, 17, 192]. Its first 7 channels flattened give 17*17*7 = 2023 features per image, the
dimension of ``mu_s`` in ADM reference batches. Here: ``Mixed_6d.branch1x1`` output (after
BN + ReLU), channels [:7], reshaped (B, 17*17*7) in (h, w, c) order.

**Exact sFID parity with the TensorFlow graph is unverified**: the parity fixture only
covers pool3 and the block means of pytorch-fid, not this tap, and the graph itself is not
available here (it is post-ReLU only if the graph's ``mixed_6/conv`` node is the ReLU of
that unit, which is how the 2015 graph names its conv units).
"""
from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sfd_jax.models.layers import Conv, Dense

FID_INPUT_SIZE = 299
FID_NUM_CLASSES = 1008
SPATIAL_CHANNELS = 7
PREPROCESS_MODES = ("pytorch_fid", "adm")

_Pad = int | tuple[int, int]


# --------------------------------------------------------------------------- resampling


def bilinear_resize_matrix(in_size: int, out_size: int, mode: str = "torch") -> np.ndarray:
  """(out_size, in_size) float32 matrix of a 1-D bilinear resampling (no antialiasing).

  Args:
    in_size, out_size: lengths of the input and output axes.
    mode: ``"torch"``: ``F.interpolate(mode="bilinear", align_corners=False)``: source
      coordinate s = (i + 0.5)·in/out − 0.5, clamped below at 0. ``"tf1"``: TensorFlow 1
      ``resize_bilinear(align_corners=False)`` (no half-pixel centres): s = i·in/out.
      In both, the taps are floor(s) and floor(s) + 1 (clamped to the last pixel) with
      weights 1 − frac(s) and frac(s); coordinates are computed in float32 as both
      libraries do. ``in_size == out_size`` gives the identity in both modes.
  """
  if in_size < 1 or out_size < 1:
    raise ValueError(f"resize sizes must be positive, got {in_size} -> {out_size}")
  scale = np.float32(in_size) / np.float32(out_size)
  dst = np.arange(out_size, dtype=np.float32)
  if mode == "torch":
    src = np.maximum(scale * (dst + np.float32(0.5)) - np.float32(0.5), np.float32(0.0))
  elif mode == "tf1":
    src = dst * scale
  else:
    raise ValueError(f"unknown resize mode {mode!r} (expected 'torch' or 'tf1')")
  lo = np.minimum(np.floor(src).astype(np.int64), in_size - 1)
  hi = np.minimum(lo + 1, in_size - 1)
  frac = (src - lo.astype(np.float32)).astype(np.float32)
  mat = np.zeros((out_size, in_size), np.float32)
  rows = np.arange(out_size)
  np.add.at(mat, (rows, lo), np.float32(1.0) - frac)
  np.add.at(mat, (rows, hi), frac)
  return mat


def bilinear_resize(x: jax.Array, size: tuple[int, int], mode: str = "torch") -> jax.Array:
  """Resizes NHWC ``x`` to ``size`` = (H, W) with separable resampling matrices (float32).

  Exact identity (no arithmetic at all) when the size does not change.
  """
  _, h, w, _ = x.shape
  out_h, out_w = size
  x = x.astype(jnp.float32)
  hp = jax.lax.Precision.HIGHEST
  mh = bilinear_resize_matrix(h, out_h, mode)
  if not _is_identity(mh):
    x = jnp.einsum("oh,bhwc->bowc", jnp.asarray(mh), x, precision=hp)
  mw = bilinear_resize_matrix(w, out_w, mode)
  if not _is_identity(mw):
    x = jnp.einsum("pw,bhwc->bhpc", jnp.asarray(mw), x, precision=hp)
  return x


def _is_identity(mat: np.ndarray) -> bool:
  n = mat.shape[0]
  return mat.shape == (n, n) and np.array_equal(mat, np.eye(n, dtype=mat.dtype))


def preprocess_images(images: jax.Array, mode: str = "pytorch_fid") -> jax.Array:
  """NHWC images -> the [B, 299, 299, 3] float32 network input in [-1, 1].

  ``images``: uint8 in [0, 255] or floats in [0, 1], any spatial size. ``mode``:
  ``"pytorch_fid"`` or ``"adm"`` (resampler and normalisation, see the module docstring).
  """
  if images.ndim != 4 or images.shape[-1] != 3:
    raise ValueError(f"InceptionV3 expects NHWC RGB images [B, H, W, 3], got "
                     f"shape {tuple(images.shape)}")
  if mode not in PREPROCESS_MODES:
    raise ValueError(f"preprocess must be one of {PREPROCESS_MODES}, got {mode!r}")
  is_uint8 = images.dtype == jnp.uint8
  x = images.astype(jnp.float32)
  size = (FID_INPUT_SIZE, FID_INPUT_SIZE)
  if mode == "pytorch_fid":
    if is_uint8:
      x = x / 255.0
    return 2.0 * bilinear_resize(x, size, "torch") - 1.0
  if not is_uint8:
    x = x * 255.0
  return (bilinear_resize(x, size, "tf1") - 128.0) * (1.0 / 128.0)


# --------------------------------------------------------------------------- layers


class FrozenBatchNorm(nnx.Module):
  """Inference-mode BatchNorm: (x − mean)·rsqrt(var + eps)·scale + bias, in float32.

  ``scale``/``bias`` are ``nnx.Param`` (torch ``bn.weight``/``bn.bias``); the running
  statistics ``mean``/``var`` are non-trainable ``nnx.BatchStat`` variables (torch
  ``bn.running_mean``/``bn.running_var``), filled by the converter.
  """

  def __init__(self, dim: int, *, eps: float = 1e-3, param_dtype=jnp.float32):
    self.eps = eps
    self.scale = nnx.Param(jnp.ones((dim,), param_dtype), out_sharding=("norm",))
    self.bias = nnx.Param(jnp.zeros((dim,), param_dtype), out_sharding=("norm",))
    self.mean = nnx.BatchStat(jnp.zeros((dim,), jnp.float32), out_sharding=("norm",))
    self.var = nnx.BatchStat(jnp.ones((dim,), jnp.float32), out_sharding=("norm",))

  def __call__(self, x: jax.Array) -> jax.Array:
    inv = jax.lax.rsqrt(self.var[...].astype(jnp.float32) + self.eps)
    mul = inv * self.scale[...].astype(jnp.float32)
    add = self.bias[...].astype(jnp.float32) - self.mean[...].astype(jnp.float32) * mul
    return x.astype(jnp.float32) * mul + add


def _pair(v: _Pad) -> tuple[int, int]:
  return (v, v) if isinstance(v, int) else tuple(v)


class BasicConv2d(nnx.Module):
  """torchvision ``BasicConv2d``: conv (no bias, torch-style symmetric padding) -> BN -> ReLU."""

  def __init__(self, in_ch: int, out_ch: int, kernel: _Pad, *, stride: int = 1,
               padding: _Pad = 0, dtype=jnp.float32, param_dtype=jnp.float32,
               precision=None, rngs: nnx.Rngs):
    self.in_ch, self.out_ch = in_ch, out_ch
    self.kernel = _pair(kernel)
    ph, pw = _pair(padding)
    self.dtype = dtype
    self.conv = Conv(in_ch, out_ch, self.kernel, strides=stride,
                     padding=((ph, ph), (pw, pw)), use_bias=False, dtype=dtype,
                     param_dtype=param_dtype, precision=precision, rngs=rngs)
    self.bn = FrozenBatchNorm(out_ch, param_dtype=param_dtype)

  def __call__(self, x: jax.Array) -> jax.Array:
    return jax.nn.relu(self.bn(self.conv(x.astype(self.dtype)))).astype(self.dtype)


def _avg_pool_3x3_same(x: jax.Array) -> jax.Array:
  """avg_pool2d(3, stride 1, padding 1, count_include_pad=False), accumulated in float32."""
  y = nnx.avg_pool(x.astype(jnp.float32), (3, 3), strides=(1, 1), padding=((1, 1), (1, 1)),
                   count_include_pad=False)
  return y.astype(x.dtype)


def _max_pool_3x3(x: jax.Array, stride: int, pad: int) -> jax.Array:
  return nnx.max_pool(x, (3, 3), strides=(stride, stride), padding=((pad, pad), (pad, pad)))


class FIDInceptionA(nnx.Module):
  """Mixed_5b/5c/5d: [1x1 | 1x1→5x5 | 1x1→3x3→3x3 | avgpool→1x1], 64+64+96+pool_features."""

  def __init__(self, in_ch: int, pool_features: int, **kw):
    u = functools.partial(BasicConv2d, **kw)
    self.branch1x1 = u(in_ch, 64, 1)
    self.branch5x5_1 = u(in_ch, 48, 1)
    self.branch5x5_2 = u(48, 64, 5, padding=2)
    self.branch3x3dbl_1 = u(in_ch, 64, 1)
    self.branch3x3dbl_2 = u(64, 96, 3, padding=1)
    self.branch3x3dbl_3 = u(96, 96, 3, padding=1)
    self.branch_pool = u(in_ch, pool_features, 1)

  def __call__(self, x: jax.Array) -> jax.Array:
    b1 = self.branch1x1(x)
    b5 = self.branch5x5_2(self.branch5x5_1(x))
    b3 = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    bp = self.branch_pool(_avg_pool_3x3_same(x))
    return jnp.concatenate([b1, b5, b3, bp], axis=-1)


class InceptionB(nnx.Module):
  """Mixed_6a (grid reduction 35→17): [3x3/2 | 1x1→3x3→3x3/2 | maxpool/2], 384+96+in."""

  def __init__(self, in_ch: int, **kw):
    u = functools.partial(BasicConv2d, **kw)
    self.branch3x3 = u(in_ch, 384, 3, stride=2)
    self.branch3x3dbl_1 = u(in_ch, 64, 1)
    self.branch3x3dbl_2 = u(64, 96, 3, padding=1)
    self.branch3x3dbl_3 = u(96, 96, 3, stride=2)

  def __call__(self, x: jax.Array) -> jax.Array:
    b3 = self.branch3x3(x)
    bd = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
    return jnp.concatenate([b3, bd, _max_pool_3x3(x, 2, 0)], axis=-1)


class FIDInceptionC(nnx.Module):
  """Mixed_6b..6e: [1x1 | 1x7,7x1 factorised | double factorised | avgpool→1x1], 4x192.

  Returns (block output, branch1x1 output); the latter of Mixed_6d is the sFID tap.
  """

  def __init__(self, in_ch: int, channels_7x7: int, **kw):
    u, c7 = functools.partial(BasicConv2d, **kw), channels_7x7
    self.branch1x1 = u(in_ch, 192, 1)
    self.branch7x7_1 = u(in_ch, c7, 1)
    self.branch7x7_2 = u(c7, c7, (1, 7), padding=(0, 3))
    self.branch7x7_3 = u(c7, 192, (7, 1), padding=(3, 0))
    self.branch7x7dbl_1 = u(in_ch, c7, 1)
    self.branch7x7dbl_2 = u(c7, c7, (7, 1), padding=(3, 0))
    self.branch7x7dbl_3 = u(c7, c7, (1, 7), padding=(0, 3))
    self.branch7x7dbl_4 = u(c7, c7, (7, 1), padding=(3, 0))
    self.branch7x7dbl_5 = u(c7, 192, (1, 7), padding=(0, 3))
    self.branch_pool = u(in_ch, 192, 1)

  def __call__(self, x: jax.Array) -> tuple[jax.Array, jax.Array]:
    b1 = self.branch1x1(x)
    b7 = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
    bd = self.branch7x7dbl_1(x)
    for unit in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4,
                 self.branch7x7dbl_5):
      bd = unit(bd)
    bp = self.branch_pool(_avg_pool_3x3_same(x))
    return jnp.concatenate([b1, b7, bd, bp], axis=-1), b1


class InceptionD(nnx.Module):
  """Mixed_7a (grid reduction 17→8): [1x1→3x3/2 | 1x1→1x7→7x1→3x3/2 | maxpool/2]."""

  def __init__(self, in_ch: int, **kw):
    u = functools.partial(BasicConv2d, **kw)
    self.branch3x3_1 = u(in_ch, 192, 1)
    self.branch3x3_2 = u(192, 320, 3, stride=2)
    self.branch7x7x3_1 = u(in_ch, 192, 1)
    self.branch7x7x3_2 = u(192, 192, (1, 7), padding=(0, 3))
    self.branch7x7x3_3 = u(192, 192, (7, 1), padding=(3, 0))
    self.branch7x7x3_4 = u(192, 192, 3, stride=2)

  def __call__(self, x: jax.Array) -> jax.Array:
    b3 = self.branch3x3_2(self.branch3x3_1(x))
    b7 = self.branch7x7x3_1(x)
    for unit in (self.branch7x7x3_2, self.branch7x7x3_3, self.branch7x7x3_4):
      b7 = unit(b7)
    return jnp.concatenate([b3, b7, _max_pool_3x3(x, 2, 0)], axis=-1)


class FIDInceptionE(nnx.Module):
  """Mixed_7b (``pool="avg"``, FIDInceptionE_1) and Mixed_7c (``pool="max"``, E_2).

  [1x1 | 1x1→(1x3 ‖ 3x1) | 1x1→3x3→(1x3 ‖ 3x1) | pool→1x1], 320+768+768+192 = 2048.
  """

  def __init__(self, in_ch: int, pool: str, **kw):
    if pool not in ("avg", "max"):
      raise ValueError(f"FIDInceptionE pool must be 'avg' or 'max', got {pool!r}")
    self.pool = pool
    u = functools.partial(BasicConv2d, **kw)
    self.branch1x1 = u(in_ch, 320, 1)
    self.branch3x3_1 = u(in_ch, 384, 1)
    self.branch3x3_2a = u(384, 384, (1, 3), padding=(0, 1))
    self.branch3x3_2b = u(384, 384, (3, 1), padding=(1, 0))
    self.branch3x3dbl_1 = u(in_ch, 448, 1)
    self.branch3x3dbl_2 = u(448, 384, 3, padding=1)
    self.branch3x3dbl_3a = u(384, 384, (1, 3), padding=(0, 1))
    self.branch3x3dbl_3b = u(384, 384, (3, 1), padding=(1, 0))
    self.branch_pool = u(in_ch, 192, 1)

  def __call__(self, x: jax.Array) -> jax.Array:
    b1 = self.branch1x1(x)
    b3 = self.branch3x3_1(x)
    b3 = jnp.concatenate([self.branch3x3_2a(b3), self.branch3x3_2b(b3)], axis=-1)
    bd = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
    bd = jnp.concatenate([self.branch3x3dbl_3a(bd), self.branch3x3dbl_3b(bd)], axis=-1)
    pooled = _avg_pool_3x3_same(x) if self.pool == "avg" else _max_pool_3x3(x, 1, 1)
    bp = self.branch_pool(pooled)
    return jnp.concatenate([b1, b3, bd, bp], axis=-1)


# --------------------------------------------------------------------------- network


class InceptionV3(nnx.Module):
  """pytorch-fid's FID Inception-v3 (see the module docstring for outputs and conventions).

  Args:
    num_classes: width of the classifier ``fc`` (1008 in the FID weights), or ``None`` for
      a feature-only network (``logits`` is then ``None``).
    preprocess: ``"pytorch_fid"`` or ``"adm"`` (resampler and input normalisation).
    dtype: compute dtype of the convolutions (e.g. ``jnp.bfloat16``); BatchNorm, pooling
      sums, resizing and all outputs are float32.
    param_dtype: storage dtype of the weights.
    precision: matmul/conv precision; default ``HIGHEST`` for float32 compute (keeps GPUs
      off TF32), the backend default otherwise.

  Use float32 with ``HIGHEST`` for metric numbers: on an H100 the parity fixture's pool3
  error is 4e-5 that way, but 4e-2 with TF32 (``precision=DEFAULT``) and 0.25 with bf16
  compute (relative to max |pool3|; the fixture's random network amplifies rounding more
  than trained weights would, but both are far outside the 1e-3 budget).
  """

  def __init__(self, *, num_classes: int | None = FID_NUM_CLASSES,
               preprocess: str = "pytorch_fid", dtype=jnp.float32,
               param_dtype=jnp.float32, precision=None, rngs: nnx.Rngs):
    if preprocess not in PREPROCESS_MODES:
      raise ValueError(f"preprocess must be one of {PREPROCESS_MODES}, got {preprocess!r}")
    if precision is None and jnp.dtype(dtype) == jnp.float32:
      precision = jax.lax.Precision.HIGHEST
    self.num_classes = num_classes
    self.preprocess = preprocess
    self.dtype = dtype
    self.precision = precision
    kw = dict(dtype=dtype, param_dtype=param_dtype, precision=precision, rngs=rngs)
    self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2, **kw)
    self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3, **kw)
    self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1, **kw)
    self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1, **kw)
    self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3, **kw)
    self.Mixed_5b = FIDInceptionA(192, 32, **kw)
    self.Mixed_5c = FIDInceptionA(256, 64, **kw)
    self.Mixed_5d = FIDInceptionA(288, 64, **kw)
    self.Mixed_6a = InceptionB(288, **kw)
    self.Mixed_6b = FIDInceptionC(768, 128, **kw)
    self.Mixed_6c = FIDInceptionC(768, 160, **kw)
    self.Mixed_6d = FIDInceptionC(768, 160, **kw)
    self.Mixed_6e = FIDInceptionC(768, 192, **kw)
    self.Mixed_7a = InceptionD(768, **kw)
    self.Mixed_7b = FIDInceptionE(1280, "avg", **kw)
    self.Mixed_7c = FIDInceptionE(2048, "max", **kw)
    if num_classes is not None:
      self.fc = Dense(2048, num_classes, ("embed", "vocab"), use_bias=False,
                      param_dtype=param_dtype, precision=jax.lax.Precision.HIGHEST,
                      rngs=rngs)

  def normalize_input(self, images: jax.Array) -> jax.Array:
    """NHWC images -> the 299x299 network input in [-1, 1]; see ``preprocess_images``."""
    return preprocess_images(images, self.preprocess)

  def __call__(self, images: jax.Array) -> dict[str, jax.Array]:
    """Features of a batch of NHWC images (uint8 or [0, 1] floats); see the module doc."""
    x = self.normalize_input(images)
    x = self.Conv2d_2b_3x3(self.Conv2d_2a_3x3(self.Conv2d_1a_3x3(x)))
    x = _max_pool_3x3(x, 2, 0)
    block0 = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    x = self.Conv2d_4a_3x3(self.Conv2d_3b_1x1(x))
    x = _max_pool_3x3(x, 2, 0)
    block1 = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    x = self.Mixed_5d(self.Mixed_5c(self.Mixed_5b(x)))
    x = self.Mixed_6a(x)
    x, _ = self.Mixed_6b(x)
    x, _ = self.Mixed_6c(x)
    x, tap = self.Mixed_6d(x)
    x, _ = self.Mixed_6e(x)
    block2 = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    x = self.Mixed_7c(self.Mixed_7b(self.Mixed_7a(x)))
    pool = jnp.mean(x.astype(jnp.float32), axis=(1, 2))
    spatial = tap[..., :SPATIAL_CHANNELS].astype(jnp.float32)
    return {
        "pool": pool,
        "spatial": spatial.reshape(spatial.shape[0], -1),
        "block0_mean": block0,
        "block1_mean": block1,
        "block2_mean": block2,
        "logits": self.fc(pool) if self.num_classes is not None else None,
    }


def basic_conv_units(model: nnx.Module) -> list[tuple[str, BasicConv2d]]:
  """(torch-style dotted path, unit) of every ``BasicConv2d`` in ``model``, sorted by path."""
  units = []
  for path, node in nnx.iter_graph(model):
    if isinstance(node, BasicConv2d):
      units.append((".".join(str(p) for p in path), node))
  return sorted(units, key=lambda t: t[0])


@functools.lru_cache(maxsize=None)
def conv_unit_specs() -> tuple[tuple[str, int, int, tuple[int, int]], ...]:
  """(path, in_ch, out_ch, (kh, kw)) of every ``BasicConv2d``, sorted by path (cached)."""
  return tuple((path, u.in_ch, u.out_ch, u.kernel)
               for path, u in basic_conv_units(abstract_inception(num_classes=None)))


def abstract_inception(**kwargs: Any) -> InceptionV3:
  """An ``InceptionV3`` with abstract (shape-only) variables: no memory, no random init."""
  return nnx.eval_shape(lambda: InceptionV3(rngs=nnx.Rngs(0), **kwargs))


def spatial_feature_dim(input_size: int = FID_INPUT_SIZE) -> int:
  """Length of the flattened sFID feature: 17·17·7 = 2023 for the 299x299 network input."""
  side = input_size
  for k, s in ((3, 2), (3, 1), (3, 2), (3, 1), (3, 2), (3, 2)):  # 1a, 2a, pool1, 4a, pool2, 6a
    side = (side - k) // s + 1
  return side * side * SPATIAL_CHANNELS


__all__ = (
    "InceptionV3", "BasicConv2d", "FrozenBatchNorm", "bilinear_resize", "preprocess_images",
    "bilinear_resize_matrix", "basic_conv_units", "conv_unit_specs", "abstract_inception",
    "spatial_feature_dim", "FID_INPUT_SIZE", "FID_NUM_CLASSES", "PREPROCESS_MODES")
