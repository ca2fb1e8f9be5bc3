"""Scaled dot-product attention with an automatic choice of kernel.

``attention_impl`` of ``DiTConfig``: ``None``/``""``/``"auto"`` picks per device and
dtype (``select_impl``), ``"xla"`` and ``"cudnn"`` force one. ``"auto"`` chooses:

* ``"cudnn"`` (the fused flash-attention kernel behind ``jax.nn.dot_product_attention``)
  on NVIDIA GPUs of compute capability ≥ 8.0 when q/k/v are bfloat16 or float16 and the
  head dimension is a multiple of 8 and at most 128 — cuDNN's constraints; LightningDiT's
  head_dim 64 (S, B, L, XXL) and 72 (XL) qualify in bf16;
* ``"xla"`` everywhere else (float32, CPU, older GPUs, odd head sizes, and TPU: the
  Pallas splash kernel of the pinned JAX wants a different layout and block sizes, so it
  is not wired in; XLA's TPU attention is used there).

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
IMPLS = ("xla", "cudnn")
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
  return jax.nn.dot_product_attention(q, k, v, implementation=chosen, **kw)
