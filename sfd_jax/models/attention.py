"""Scaled dot-product attention with an automatic choice of kernel.

``attention_impl`` of ``DiTConfig``: ``None``/``""``/``"auto"`` picks per device and
dtype (``select_impl``); ``"xla"``, ``"xla_heads"`` and ``"cudnn"`` force one:

* ``"xla"``: ``jax.nn.dot_product_attention(implementation="xla")`` on ``[N, T, heads,
  hd]``. It vmaps its core over a head-group axis, and XLA's CPU backend turns that into
  batched dots with the batch dimensions in the middle plus layout copies around them.
* ``"xla_heads"``: the same arithmetic written heads-major (``heads_major_attention``):
  q/k/v transposed once to ``[N, heads, T, hd]``, two batched dots with the batch
  dimensions leading, softmax in float32, one transpose back. Same dtypes and precision
  as ``"xla"``; float32 outputs agreed bit for bit in the benchmark runs and gradients to
  float32 rounding (the tests allow 1e-6 / 1e-5). On the 2-core CPU the forward is ≈ 2×
  faster at the tiny/S benchmark sizes (docs/benchmarks.md).
* ``"cudnn"``: the fused flash-attention kernel behind ``jax.nn.dot_product_attention``.

``"auto"`` chooses ``"cudnn"`` on NVIDIA GPUs of compute capability ≥ 8.0 when q/k/v
are bfloat16 or float16 and the head dimension is a multiple of 8 and at most 128 —
cuDNN's constraints; LightningDiT's head_dim 64 (S, B, L, XXL) and 72 (XL) qualify in
bf16. On CPUs it chooses ``"xla_heads"``. Everywhere else (float32 or older GPUs, odd
head sizes, and TPU: the Pallas splash kernel of the pinned JAX wants a different layout
and block sizes, so it is not wired in) it chooses ``"xla"``, the path that has not been
measured against ``"xla_heads"`` on those devices.

The choice is logged once per distinct (device, dtype, head_dim). If the cuDNN path
fails to trace (a jax/cuDNN build without it), it falls back to XLA with a warning.
"""
from __future__ import annotations

import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging

AUTO = ("", "auto", None)
IMPLS = ("xla", "xla_heads", "cudnn")
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def _compute_capability(device: Any) -> float | None:
  cc = getattr(device, "compute_capability", None)
  if cc is None:
    return None
  try:
    return float(cc)
  except (TypeError, ValueError):
    return None


def select_impl(impl: str | None, *, head_dim: int, dtype, device: Any = None) -> str:
  """The attention implementation to use: ``"xla"`` or ``"cudnn"`` (see module doc).

  ``device``: anything with ``platform`` (and on GPU ``compute_capability``, e.g. "9.0");
  default: the first local device.
  """
  if impl not in AUTO:
    if impl not in IMPLS:
      raise ValueError(f"attention_impl {impl!r} not in {IMPLS} (or auto)")
    return impl
  if device is None:
    device = jax.local_devices()[0]
  platform = getattr(device, "platform", "cpu")
  if platform in ("gpu", "cuda"):
    cc = _compute_capability(device)
    if (cc is not None and cc >= 8.0 and jnp.dtype(dtype) in map(jnp.dtype, CUDNN_DTYPES)
        and head_dim % 8 == 0 and head_dim <= 128):
      return "cudnn"
  if platform == "cpu":
    return "xla_heads"
  return "xla"


@functools.lru_cache(maxsize=None)
def _log_choice(requested: str | None, chosen: str, kind: str, dtype: str, head_dim: int):
  logging.info("attention: %s -> %s (device %s, %s, head_dim %d)",
               requested or "auto", chosen, kind, dtype, head_dim)


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                          impl: str | None = None) -> jax.Array:
  """``jax.nn.dot_product_attention`` (layout [N, T, heads, hd], scale 1/√hd) with the
  implementation chosen by ``select_impl``."""
  head_dim = q.shape[-1]
  device = jax.local_devices()[0]
  chosen = select_impl(impl, head_dim=head_dim, dtype=q.dtype, device=device)
  _log_choice(impl, chosen, getattr(device, "device_kind", "?"), jnp.dtype(q.dtype).name,
              head_dim)
  kw = dict(scale=1.0 / math.sqrt(head_dim))
  if chosen == "cudnn" and impl in AUTO:
    try:
      return jax.nn.dot_product_attention(q, k, v, implementation="cudnn", **kw)
    except Exception as e:  # pylint: disable=broad-except
      logging.warning("attention: cuDNN path unavailable (%s); using XLA", e)
      chosen = "xla"
  if chosen == "xla_heads":
    return heads_major_attention(q, k, v, device=device, **kw)
  return jax.nn.dot_product_attention(q, k, v, implementation=chosen, **kw)


def _logits_precision(dtype, device: Any):
  """The dot algorithm ``jax.nn.dot_product_attention`` uses for q·k of a half type where
  the platform has it (bf16 × bf16 → f32 on CPUs, TPUs and GPUs of compute capability
  ≥ 8.0; f16 × f16 → f32 on GPUs); elsewhere the default precision, as jax.nn falls back."""
  platform = getattr(device, "platform", "cpu")
  if dtype == jnp.bfloat16 and (platform in ("cpu", "tpu") or (
      platform in ("gpu", "cuda") and (_compute_capability(device) or 0) >= 8.0)):
    return jax.lax.DotAlgorithmPreset.BF16_BF16_F32
  if dtype == jnp.float16 and platform in ("gpu", "cuda", "rocm"):
    return jax.lax.DotAlgorithmPreset.F16_F16_F32
  return None


def heads_major_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                          scale: float, device: Any = None) -> jax.Array:
  """softmax(q·kᵀ · scale) · v for q/k/v ``[N, T, heads, hd]`` (returned in that layout),
  computed in ``[N, heads, T, hd]``: logits in float32 (or wider), softmax in float32,
  probabilities cast to k's dtype, as ``jax.nn.dot_product_attention``'s XLA path."""
  qh, kh, vh = (jnp.swapaxes(a, 1, 2) for a in (q, k, v))
  logits_dtype = jnp.promote_types(q.dtype, jnp.float32)
  precision = _logits_precision(q.dtype, device or jax.local_devices()[0])
  logits = jnp.einsum("nhtd,nhsd->nhts", qh, kh, precision=precision,
                      preferred_element_type=logits_dtype)
  logits = logits * jnp.array(scale, dtype=logits.dtype)
  probs = jax.nn.softmax(logits.astype(jnp.float32), axis=-1).astype(k.dtype)
  return jnp.swapaxes(jnp.einsum("nhts,nhsd->nhtd", probs, vh), 1, 2)
