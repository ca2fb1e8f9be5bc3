"""Scaled dot-product attention with an automatic choice of kernel.

``attention_impl`` of ``DiTConfig``: ``None``/``""``/``"auto"`` picks per device and
dtype (``select_impl``); ``"xla"``, ``"xla_heads"``, ``"cudnn"`` and ``"splash"`` force one:

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
* ``"splash"``: the Pallas TPU splash-attention kernel of the pinned JAX
  (``jax.experimental.pallas.ops.tpu.splash_attention``, ``splash_attention`` below):
  a fused flash-attention forward and backward that never holds the [T, T] logits in
  HBM. Full (non-causal) mask, blocks of 512/256/128 along the sequence (the sequence
  length must be a multiple of 128: 256 tokens for ImageNet 256 at f16/p1). The kernel
  takes any head dimension as its full minor block (XL's 72 compiles on v4, v5e, v5p and
  v6e), so nothing is padded. Under a mesh it runs per device inside ``shard_map``
  (batch over the batch mesh axes, heads over ``tensor`` when they divide); off TPU it
  runs in Pallas interpret mode (slow: tests and debugging only). Memory: for the
  backward pass it keeps q, k, v, the output and the softmax statistics, the latter 128
  lanes wide in float32 ([heads, T, 128] per example); for XL at 32 rows per chip that is
  1.8 GiB more HBM per chip than the XLA path (docs/scale.md, plan of XL on v5p:2x2x2).

``"auto"`` chooses ``"cudnn"`` on NVIDIA GPUs of compute capability ≥ 8.0 when q/k/v
are bfloat16 or float16 and the head dimension is a multiple of 8 and at most 128 —
cuDNN's constraints; LightningDiT's head_dim 64 (S, B, L, XXL) and 72 (XL) qualify in
bf16. On TPUs it chooses ``"splash"`` when the kernel supports the shapes
(``splash_unsupported``: sequence a multiple of 128, head_dim ≤ 256, bf16/f32; not bf16
under ``jax_default_matmul_precision="highest"``, whose f32 contraction Mosaic rejects
for bf16 operands) and the
mesh is known — passed as the activation sharding (the trainer does), set with
``use_mesh`` (the sampling program) or with ``jax.set_mesh`` (the in-training
evaluation) — so that the kernel can be placed per device; otherwise ``"xla"``. On CPUs
it chooses ``"xla_heads"``. Everywhere else (float32 or
older GPUs, odd head sizes) it chooses ``"xla"``, the path that has not been measured
against ``"xla_heads"`` on those devices.

The device is the one the program is compiled for: the mesh's (so a TPU program
compiled ahead of time on a CPU host gets the TPU choice), else the first local device.
The choice is logged once per distinct
(device, dtype, head_dim). If the cuDNN path fails to trace (a jax/cuDNN build without
it), it falls back to XLA with a warning.
"""
from __future__ import annotations

import concurrent.futures
import contextlib
import functools
import math
import threading
from typing import Any

import jax
import jax.numpy as jnp
from absl import logging

AUTO = ("", "auto", None)
IMPLS = ("xla", "xla_heads", "cudnn", "splash")
CUDNN_DTYPES = (jnp.bfloat16, jnp.float16)


def _compute_capability(device: Any) -> float | None:
  cc = getattr(device, "compute_capability", None)
  if cc is None:
    return None
  try:
    return float(cc)
  except (TypeError, ValueError):
    return None


def select_impl(impl: str | None, *, head_dim: int, dtype, device: Any = None,
                seq_len: int | None = None, mesh_known: bool = False) -> str:
  """The attention implementation to use (see the module doc).

  ``device``: anything with ``platform`` (and on GPU ``compute_capability``, e.g. "9.0");
  default: the first local device. ``seq_len`` and ``mesh_known`` (a mesh to place the
  kernel per device is available) decide ``"splash"`` on TPU.
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
  if platform == "tpu" and mesh_known and seq_len is not None and splash_unsupported(
      seq_len=seq_len, head_dim=head_dim, dtype=dtype) is None:
    return "splash"
  if platform == "cpu":
    return "xla_heads"
  return "xla"


@functools.lru_cache(maxsize=None)
def _log_choice(requested: str | None, chosen: str, kind: str, dtype: str, head_dim: int):
  logging.info("attention: %s -> %s (device %s, %s, head_dim %d)",
               requested or "auto", chosen, kind, dtype, head_dim)


_PLACEMENT = threading.local()


@contextlib.contextmanager
def use_mesh(mesh):
  """Attention calls traced inside are placed on ``mesh`` (batch over its batch axes)
  unless they are given a sharding: the sampling programs, whose model calls carry
  none. Unlike ``jax.set_mesh`` it changes nothing else (eager constants of libraries
  such as diffrax stay on the default device, also with compile-only devices)."""
  previous = getattr(_PLACEMENT, "mesh", None)
  _PLACEMENT.mesh = mesh
  try:
    yield mesh
  finally:
    _PLACEMENT.mesh = previous


def target_mesh(sharding: Any = None):
  """The mesh a traced attention call is placed on: ``sharding``'s (a NamedSharding),
  else ``use_mesh``'s, else the ``jax.set_mesh`` context's abstract mesh, else None."""
  mesh = getattr(sharding, "mesh", None)
  if mesh is not None:
    return mesh
  mesh = getattr(_PLACEMENT, "mesh", None)
  if mesh is not None:
    return mesh
  context = jax.sharding.get_abstract_mesh()
  return None if context.empty else context


def target_device(mesh: Any = None) -> Any:
  """The device (kind) a program is compiled for: the mesh's first device (an abstract
  mesh's ``abstract_device``), else the first local device."""
  if isinstance(mesh, jax.sharding.Mesh) and mesh.devices.size:
    return mesh.devices.flat[0]
  abstract = getattr(mesh, "abstract_device", None) if mesh is not None else None
  if abstract is not None:
    return abstract
  return jax.local_devices()[0]


def dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *,
                          impl: str | None = None, sharding: Any = None) -> jax.Array:
  """``jax.nn.dot_product_attention`` (layout [N, T, heads, hd], scale 1/√hd) with the
  implementation chosen by ``select_impl``.

  ``sharding``: the activations' ``NamedSharding`` (batch over its first dimension's mesh
  axes), which places the splash kernel per device; without it the ``jax.set_mesh``
  context's mesh is used, if any.
  """
  head_dim = q.shape[-1]
  mesh = target_mesh(sharding)
  device = target_device(mesh)
  chosen = select_impl(impl, head_dim=head_dim, dtype=q.dtype, device=device,
                       seq_len=q.shape[1], mesh_known=mesh is not None)
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
  if chosen == "splash":
    return splash_attention(q, k, v, mesh=mesh, batch_axes=_batch_axes(sharding, mesh),
                            interpret=getattr(device, "platform", "cpu") != "tpu", **kw)
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


# ------------------------------------------------------------------ splash attention

SPLASH_BLOCKS = (512, 256, 128)   # sequence tile sizes tried, largest first
SPLASH_MAX_HEAD_DIM = 256
SPLASH_DTYPES = (jnp.bfloat16, jnp.float32)
BATCH_MESH_AXES = ("data", "fsdp")  # = sfd_jax.parallel.BATCH_AXES (models import no parts)
HEAD_MESH_AXIS = "tensor"


def splash_block(seq_len: int) -> int | None:
  """The sequence tile of the splash kernel for ``seq_len`` (None: no tile divides it)."""
  for block in SPLASH_BLOCKS:
    if seq_len >= block and seq_len % block == 0:
      return block
  return None


def splash_unsupported(*, seq_len: int, head_dim: int, dtype) -> str | None:
  """Why the splash kernel cannot take these shapes, or None when it can."""
  if splash_block(seq_len) is None:
    return f"sequence length {seq_len} is not a multiple of 128"
  if head_dim > SPLASH_MAX_HEAD_DIM:
    return f"head_dim {head_dim} > {SPLASH_MAX_HEAD_DIM}"
  if jnp.dtype(dtype) not in map(jnp.dtype, SPLASH_DTYPES):
    return f"dtype {jnp.dtype(dtype).name} (bfloat16 or float32 only)"
  precision = str(jax.config.jax_default_matmul_precision or "").lower()
  if jnp.dtype(dtype) == jnp.bfloat16 and precision in ("highest", "float32"):
    # the kernel's bf16 dots would then ask Mosaic for an f32 contraction it rejects
    return f"bfloat16 under jax_default_matmul_precision={precision!r}"
  return None


@functools.lru_cache(maxsize=None)
def _splash_kernel(heads: int, seq_len: int, interpret: bool):
  """The splash kernel (full mask) for ``heads`` local heads of one example."""
  from jax.experimental.pallas.ops.tpu import splash_attention as sa  # pylint: disable=import-outside-toplevel
  block = splash_block(seq_len)
  sizes = sa.BlockSizes(block_q=block, block_kv=block, block_kv_compute=block,
                        block_q_dkv=block, block_kv_dkv=block, block_kv_dkv_compute=block,
                        block_q_dq=block, block_kv_dq=block)
  mask = sa.MultiHeadMask([sa.FullMask((seq_len, seq_len)) for _ in range(heads)])

  def make():
    return sa.make_splash_mha(mask, block_sizes=sizes, head_shards=1, q_seq_shards=1,
                              interpret=interpret)

  # The kernel's mask tables are concrete arrays made eagerly. Under a trace (and a
  # ``jax.set_mesh`` of compile-only devices) they cannot be, so they are made on a
  # fresh thread, whose JAX trace and mesh contexts are the defaults.
  with concurrent.futures.ThreadPoolExecutor(1) as pool:
    return pool.submit(make).result()


def _batch_axes(sharding: Any, mesh: Any) -> tuple[str, ...]:
  """Mesh axes of the batch dimension: the sharding's first entry, else the mesh's
  batch axes (``BATCH_MESH_AXES``)."""
  spec = getattr(sharding, "spec", None)
  if spec is not None:
    first = spec[0] if len(spec) else None
    if first is None:
      return ()
    return tuple(first) if isinstance(first, (tuple, list)) else (first,)
  names = getattr(mesh, "axis_names", ()) or ()
  return tuple(a for a in BATCH_MESH_AXES if a in names)


def splash_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float,
                     mesh: Any = None, batch_axes: tuple[str, ...] = (),
                     interpret: bool = False) -> jax.Array:
  """softmax(q·kᵀ · scale) · v with the splash kernel, q/k/v ``[N, T, heads, hd]``.

  q is scaled before the kernel (it applies none); the kernel computes the logits and
  the softmax in float32 and returns q's dtype. With ``mesh``, the call runs per device
  in ``shard_map``: batch over ``batch_axes``, heads over ``tensor`` when that axis is
  larger than 1 and divides the heads (everything else of q/k/v whole on each device).
  ``interpret``: Pallas interpret mode (CPU).
  """
  reason = splash_unsupported(seq_len=q.shape[1], head_dim=q.shape[-1], dtype=q.dtype)
  if reason is not None:
    raise ValueError(f"attention_impl 'splash': {reason}")

  def local(q, k, v):
    kernel = _splash_kernel(q.shape[2], q.shape[1], bool(interpret))
    qh = jnp.swapaxes(q * jnp.asarray(scale, q.dtype), 1, 2)
    kh, vh = jnp.swapaxes(k, 1, 2), jnp.swapaxes(v, 1, 2)
    return jnp.swapaxes(jax.vmap(kernel)(qh, kh, vh.astype(q.dtype)), 1, 2)

  if mesh is None:
    return local(q, k, v)
  from jax.sharding import PartitionSpec as P  # pylint: disable=import-outside-toplevel
  shape = dict(zip(mesh.axis_names, mesh.axis_sizes if hasattr(mesh, "axis_sizes")
                   else mesh.devices.shape))
  batch = tuple(a for a in batch_axes if shape.get(a, 1) > 1)
  if batch and q.shape[0] % math.prod(shape[a] for a in batch):
    batch = ()
  heads = HEAD_MESH_AXIS if (shape.get(HEAD_MESH_AXIS, 1) > 1 and
                             q.shape[2] % shape[HEAD_MESH_AXIS] == 0) else None
  spec = P(batch or None, None, heads, None)
  return jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec,
                       check_vma=False)(q, k, v)
