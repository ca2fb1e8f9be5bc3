"""LightningDiT denoiser with SFD's two clocks (docs/method.md §5, §12), as Flax NNX modules.

Tensor layout inside JAX is channels-last: latents ``[N, H, W, C]`` with the SFD channel
order ``[texture 32 | semantic 16]``; tokens ``[N, H·W, D]`` in row-major order.

Block parameters are always *stacked* along a leading ``layers`` axis (one ``Block``
module created under ``nnx.vmap``). The forward either unrolls a Python loop over the
stack or runs ``jax.lax.scan`` over it (``scan_blocks``), in two segments split at the
REPA tap so the projector can read the ``repa_depth``-th block's output. Both modes share
one parameter tree, so checkpoints do not depend on the switch.

Fixed tables (2-D sin-cos position embedding, RoPE angles) are recomputed from the
config at trace time; they are constants, never parameters.
"""
from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from sfd_jax.core.errors import ConfigError, ConverterInputError
from sfd_jax.models import attention as attn_lib
from sfd_jax.models import layers as L

# ----------------------------------------------------------------------------------
# Configuration and variant table
# ----------------------------------------------------------------------------------

# name -> (depth, hidden, heads). SwiGLU hidden is int(2/3 · 4·D) for every variant.
VARIANTS: dict[str, tuple[int, int, int]] = {
    "S": (12, 384, 6),
    "B": (12, 768, 12),
    "L": (24, 1024, 16),
    "XL": (28, 1152, 16),
    "XXL": (24, 1536, 24),   # "1p0B" in the reference
    "1p6B": (28, 1792, 28),
}
VARIANT_ALIASES = {"1p0B": "XXL", "1P0B": "XXL", "1p6b": "1p6B"}

REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "save_attn_out")


@dataclasses.dataclass(frozen=True)
class DiTConfig:
  """Architecture and computation options of a LightningDiT.

  The architecture switches are the reference constructor's; SFD turns all of them on
  (the defaults). Off, they become what the reference builds instead (hustvl/LightningDiT
  ``models/lightningdit.py``, identical in the SFD repository):

  * ``use_rmsnorm=False``: block and final norms are LayerNorm without affine parameters
    (eps 1e-6); a QK-norm is then a LayerNorm *with* weight and bias (PyTorch's default
    eps 1e-5) instead of an RMSNorm;
  * ``use_qknorm=False``: no normalisation of q and k;
  * ``use_swiglu=False``: the MLP is Linear(D → mlp_ratio·D) → tanh-approximated GELU →
    Linear (``fc1``/``fc2``) instead of SwiGLU of width int(2/3·mlp_ratio·D);
  * ``use_rope=False``: no rotary embedding (the absolute sin-cos table stays);
  * ``wo_shift=True``: adaLN without shifts (4 chunks: scale, gate ×2) in the blocks.

  LightningDiT's released ImageNet models (``lightningdit_xl_vavae_f16d32`` 64 / 800
  epochs) are XL/1 with ``use_qknorm=False``, SwiGLU, RoPE, RMSNorm, 32 input channels,
  ``delta_t=0`` (one timestep embedder) and no REPA projector.
  """

  input_size: int = 16            # latent grid side (16 for ImageNet 256 at f16)
  patch_size: int = 1
  in_channels: int = 48           # [texture | semantic]
  hidden_size: int = 1152
  depth: int = 28
  num_heads: int = 16
  mlp_ratio: float = 4.0
  num_classes: int = 1000
  class_dropout_prob: float = 0.1
  semantic_chans: int = 16
  delta_t: float = 0.3            # > 0: two half-width timestep embedders; 0: one full-width
  use_repa: bool = True
  repa_depth: int = 2             # tap after this block (counted from 1)
  repa_dim: int = 768             # DINOv2-B feature width (projector output)
  repa_projector_dim: int = 2048
  use_qknorm: bool = True
  use_swiglu: bool = True
  use_rope: bool = True
  use_rmsnorm: bool = True
  wo_shift: bool = False
  # computation
  dtype: str = "float32"          # compute dtype of matmuls (e.g. "bfloat16")
  param_dtype: str = "float32"
  scan_blocks: bool = False
  remat_policy: str = "none"      # one of REMAT_POLICIES
  # None/"auto" (models/attention.py), "xla", "xla_heads", "cudnn", "splash"
  attention_impl: str | None = None
  # clock schedule (docs/clocks.md): the parts with their own timestep embedder, in
  # channel order (empty: the rule above — two embedders iff semantic_first), and the
  # parts with a learned clock: ((name, bins), ...) -> parameters clock_<name> [bins]
  time_parts: tuple[str, ...] = ()
  learned_clocks: tuple[tuple[str, int], ...] = ()
  # average-velocity (MeanFlow) models: a second set of timestep embedders, same layout
  # as the first, for each part's interval h_k = t_k(ρ) − t_k(τ) (the target time ρ of a
  # jump); their output layers start at zero, so a flow-matching checkpoint loads as the
  # same function (diffusion/objective.py, docs/fewstep.md)
  interval_embedding: bool = False

  def __post_init__(self):
    if self.hidden_size % self.num_heads:
      raise ValueError(f"hidden_size {self.hidden_size} not divisible by num_heads "
                       f"{self.num_heads}")
    if self.use_rope and (self.hidden_size // self.num_heads) % 4:
      raise ValueError("head_dim must be a multiple of 4 for 2-D RoPE, got "
                       f"{self.hidden_size // self.num_heads}")
    if not 0.0 <= self.delta_t <= 1.0:
      raise ValueError(f"delta_t must be in [0, 1], got {self.delta_t}")
    if self.remat_policy not in REMAT_POLICIES:
      raise ValueError(f"remat_policy {self.remat_policy!r} not in {REMAT_POLICIES}")
    if self.use_repa and not 1 <= self.repa_depth <= self.depth:
      raise ValueError(f"repa_depth {self.repa_depth} must be in [1, depth={self.depth}]")
    if self.in_channels < self.semantic_chans:
      raise ValueError("semantic_chans larger than in_channels")
    object.__setattr__(self, "time_parts", tuple(str(n) for n in self.time_parts))
    object.__setattr__(self, "learned_clocks",
                       tuple((str(n), int(b)) for n, b in self.learned_clocks))
    for n in self.time_parts + tuple(n for n, _ in self.learned_clocks):
      if not n.isidentifier():
        raise ValueError(f"part name {n!r} must be an identifier")
    if len(self.time_parts) > 2 and self.hidden_size < len(self.time_parts):
      raise ValueError(f"hidden_size {self.hidden_size} is smaller than the number of "
                       f"timestep embedders {len(self.time_parts)}")

  @property
  def head_dim(self) -> int:
    return self.hidden_size // self.num_heads

  @property
  def mlp_hidden(self) -> int:
    """Hidden width of the SwiGLU MLP: int(2/3 · int(mlp_ratio·D))."""
    return int(2 / 3 * int(self.hidden_size * self.mlp_ratio))

  @property
  def gelu_hidden(self) -> int:
    """Hidden width of the GELU MLP (``use_swiglu=False``): int(mlp_ratio·D)."""
    return int(self.hidden_size * self.mlp_ratio)

  @property
  def adaln_chunks(self) -> int:
    return 4 if self.wo_shift else 6

  @property
  def semantic_first(self) -> bool:
    """The reference's condition for two clocks: Δt > 0 and semantic channels."""
    return self.delta_t > 0 and self.semantic_chans > 0

  @property
  def num_time_embedders(self) -> int:
    """1 (one full-width embedder), 2 (SFD's semantic/texture pair) or one per part."""
    if self.time_parts:
      return len(self.time_parts)
    return 2 if self.semantic_first else 1

  def time_embedder_widths(self) -> tuple[int, ...]:
    """Widths in concatenation order (last part first): D//K each, the remainder last."""
    k, d = self.num_time_embedders, self.hidden_size
    return tuple([d // k] * (k - 1) + [d - (k - 1) * (d // k)])

  @property
  def num_tokens(self) -> int:
    return (self.input_size // self.patch_size) ** 2

  @property
  def out_channels(self) -> int:
    return self.in_channels

  @classmethod
  def variant(cls, name: str, **overrides) -> "DiTConfig":
    key = VARIANT_ALIASES.get(name, name)
    key = key.split("/")[0]
    if key not in VARIANTS:
      raise ValueError(f"unknown LightningDiT variant {name!r}; known: "
                       f"{', '.join(VARIANTS)} (aliases {', '.join(VARIANT_ALIASES)})")
    depth, hidden, heads = VARIANTS[key]
    return cls(**{"depth": depth, "hidden_size": hidden, "num_heads": heads, **overrides})

  @classmethod
  def from_config(cls, config) -> "DiTConfig":
    """From a run config: ``config.model`` (``variant`` table + overrides; ``"custom"``
    = the fields as given) with Δt taken from ``config.objective.delta_t`` so that the
    clocks of model and objective agree."""
    m = config.model.to_dict()
    variant = m.pop("variant")
    unknown = set(m) - {f.name for f in dataclasses.fields(cls)}
    if unknown:
      raise ConfigError(f"config.model has unknown fields {sorted(unknown)}")
    m["attention_impl"] = m.get("attention_impl") or None
    m["delta_t"] = config.objective.delta_t
    m["interval_embedding"] = config.objective.get("name", "flow_matching") == "meanflow"
    m.update(_schedule_layout(config))
    if variant == "custom":
      return cls(**m)
    return cls.variant(variant, **m)

  @classmethod
  def from_reference_kwargs(cls, kw: dict[str, Any], **overrides) -> "DiTConfig":
    """Builds a config from the reference constructor's keyword arguments
    (``LightningDiT(input_size=…, in_channels=…, use_qknorm=…, semfirst_delta_t=…)``;
    absent flags take the constructor's defaults, i.e. off)."""
    known = {"input_size", "patch_size", "in_channels", "hidden_size", "depth", "num_heads",
             "mlp_ratio", "class_dropout_prob", "num_classes", "learn_sigma", "use_qknorm",
             "use_swiglu", "use_rope", "use_rmsnorm", "wo_shift", "use_checkpoint",
             "use_repa", "repa_dino_version", "repa_depth", "repa_projector_dim",
             "semantic_chans", "semfirst_delta_t", "semfirst_infer_interval_mode"}
    unknown = set(kw) - known
    if unknown:
      raise ValueError(f"unknown reference LightningDiT arguments {sorted(unknown)}; known: "
                       f"{sorted(known)}")
    if kw.get("learn_sigma", False):
      raise ValueError("learn_sigma=True (a doubled output with a variance half) is not "
                       "supported; SFD and LightningDiT use learn_sigma=False")
    return cls(
        input_size=kw["input_size"], patch_size=kw.get("patch_size", 1),
        in_channels=kw["in_channels"], hidden_size=kw["hidden_size"], depth=kw["depth"],
        num_heads=kw["num_heads"], mlp_ratio=kw.get("mlp_ratio", 4.0),
        num_classes=kw.get("num_classes", 1000),
        class_dropout_prob=kw.get("class_dropout_prob", 0.1),
        semantic_chans=kw.get("semantic_chans", 0) or 0,
        delta_t=kw.get("semfirst_delta_t", 0.0) or 0.0,
        use_repa=bool(kw.get("use_repa", False)),
        repa_depth=kw.get("repa_depth") or 2,
        repa_projector_dim=kw.get("repa_projector_dim", 2048),
        use_qknorm=bool(kw.get("use_qknorm", False)),
        use_swiglu=bool(kw.get("use_swiglu", False)),
        use_rope=bool(kw.get("use_rope", False)),
        use_rmsnorm=bool(kw.get("use_rmsnorm", False)),
        wo_shift=bool(kw.get("wo_shift", False)), **overrides)

  @classmethod
  def from_reference_config(cls, train_config: dict[str, Any], **overrides) -> "DiTConfig":
    """From a reference training / inference YAML (its ``model`` and ``data`` sections,
    as the reference's scripts read them: ``model_type`` such as "LightningDiT-XL/1",
    ``in_chans`` (default 4), ``use_qknorm``, ``use_swiglu``, ``use_rope``,
    ``use_rmsnorm``, ``wo_shift``, ``use_repa``, ``repa_feat_depth``, ``semantic_chans``,
    ``semfirst_delta_t``, ``class_dropout_prob``; ``data.num_classes``; the latent grid
    is ``data.image_size // 16`` (default 256 → 16) unless ``input_size`` is given)."""
    m = dict(train_config.get("model", train_config))
    data = dict(train_config.get("data", {}))
    model_type = m.get("model_type")
    if not model_type:
      raise ConverterInputError("the reference training config has no model.model_type "
                                "(e.g. 'LightningDiT-XL/1')")
    name, _, patch = str(model_type).replace("LightningDiT-", "").partition("/")
    key = VARIANT_ALIASES.get(name, name)
    if key not in VARIANTS:
      raise ConverterInputError(f"the reference training config's model.model_type "
                                f"{model_type!r}: unknown size {name!r} (known: "
                                f"{', '.join(VARIANTS)})")
    depth, hidden, heads = VARIANTS[key]
    kw = {"input_size": overrides.pop("input_size", int(data.get("image_size", 256)) // 16),
          "patch_size": int(patch or 1), "hidden_size": hidden, "depth": depth,
          "num_heads": heads, "in_channels": m.get("in_chans", 4),
          "num_classes": data.get("num_classes", 1000),
          "repa_depth": m.get("repa_feat_depth")}
    for k in ("class_dropout_prob", "learn_sigma", "use_qknorm", "use_swiglu", "use_rope",
              "use_rmsnorm", "wo_shift", "use_repa", "semantic_chans", "semfirst_delta_t",
              "mlp_ratio"):
      if k in m:
        kw[k] = m[k]
    return cls.from_reference_kwargs(kw, **overrides)


def _schedule_layout(config) -> dict[str, Any]:
  """``time_parts`` / ``learned_clocks`` from a run config's ``schedule`` section (none:
  {}: SFD's rule from ``delta_t``). Parts with identical clocks share one full-width embedder. (The
  schedule itself is ``sfd_jax.diffusion.clocks``; the model only needs its layout.)"""
  sec = config.get("schedule") if hasattr(config, "get") else None
  if sec is None or not sec.get("parts"):
    return {}
  parts = sec.parts.to_dict() if hasattr(sec.parts, "to_dict") else dict(sec.parts)
  order = sec.get("order") or [n for n in ("texture", "semantic") if n in parts] \
      or list(parts)
  order = [order] if isinstance(order, str) else list(order)
  if sorted(order) != sorted(parts):
    raise ConfigError(f"config.schedule.order={order} must name each of config.schedule."
                      f"parts ({sorted(parts)}) exactly once")
  clock_keys = ("family", "start", "rate", "power", "shift", "knots", "bins")
  clock = lambda f: tuple((k, str(f.get(k))) for k in clock_keys)
  shared = len({clock(dict(parts[n])) for n in order}) == 1
  learned = tuple((n, int(dict(parts[n]).get("bins", 8))) for n in order
                  if dict(parts[n]).get("family") == "learned")
  time_parts = (order[0],) if shared else tuple(order)
  return {"time_parts": time_parts, "learned_clocks": learned}


# ----------------------------------------------------------------------------------
# Fixed tables
# ----------------------------------------------------------------------------------


@functools.lru_cache(maxsize=None)
def sincos_pos_embed(dim: int, grid: int) -> np.ndarray:
  """MAE/DiT 2-D sin-cos table [grid², dim]: first dim/2 encode the column (w), the
  second dim/2 the row (h); each half is [sin(p·ω) | cos(p·ω)], ω_k = 10000^(−k/(dim/4))."""
  if dim % 4:
    raise ValueError(f"sin-cos position embedding needs dim % 4 == 0, got {dim}")
  quarter = dim // 4
  omega = 1.0 / 10000 ** (np.arange(quarter, dtype=np.float64) / quarter)
  hh, ww = np.meshgrid(np.arange(grid, dtype=np.float64), np.arange(grid, dtype=np.float64),
                       indexing="ij")

  def one_d(pos):
    out = pos.reshape(-1)[:, None] * omega[None]
    return np.concatenate([np.sin(out), np.cos(out)], axis=1)

  return np.concatenate([one_d(ww), one_d(hh)], axis=1).astype(np.float32)


@functools.lru_cache(maxsize=None)
def rope_tables(head_dim: int, grid: int) -> tuple[np.ndarray, np.ndarray]:
  """EVA-02 2-D RoPE (interleaved pairs): cos/sin tables [grid², head_dim].

  Row angles fill the first head_dim/2 entries, column angles the second; each angle is
  repeated twice consecutively. θ_i = 10000^(−2i/(head_dim/2)), i < head_dim/4.
  """
  dim = head_dim // 2
  theta = 1.0 / 10000 ** (np.arange(0, dim, 2)[: dim // 2].astype(np.float32) / dim)
  pos = np.arange(grid, dtype=np.float32) / grid * grid
  ang = np.repeat(np.einsum("i,f->if", pos, theta), 2, axis=-1)          # [grid, dim]
  rows = np.broadcast_to(ang[:, None, :], (grid, grid, dim))
  cols = np.broadcast_to(ang[None, :, :], (grid, grid, dim))
  full = np.concatenate([rows, cols], axis=-1).reshape(grid * grid, head_dim)
  return np.cos(full).astype(np.float32), np.sin(full).astype(np.float32)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
  """x [N, T, heads, hd]; rotation on adjacent pairs (x₂ᵢ, x₂ᵢ₊₁) → (−x₂ᵢ₊₁, x₂ᵢ)."""
  pairs = x.reshape(*x.shape[:-1], -1, 2)
  rotated = jnp.stack([-pairs[..., 1], pairs[..., 0]], axis=-1).reshape(x.shape)
  cos = cos[None, :, None, :].astype(x.dtype)
  sin = sin[None, :, None, :].astype(x.dtype)
  return x * cos + rotated * sin


def timestep_features(t: jax.Array, dim: int = 256, max_period: float = 10000.0) -> jax.Array:
  """[cos(t·f) | sin(t·f)], f_k = exp(−ln(max_period)·k/(dim/2)); t in [0, 1], no ×1000."""
  half = dim // 2
  freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
  args = t.astype(jnp.float32)[:, None] * freqs[None]
  return jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
  return x * (1 + scale[:, None, :]) + shift[:, None, :]


# ----------------------------------------------------------------------------------
# Modules
# ----------------------------------------------------------------------------------


def _dtype(name: str):
  return jnp.dtype(name)


class TimestepEmbedder(nnx.Module):
  """Sinusoidal features (256) → Linear → SiLU → Linear (``zero_output``: the last
  Linear starts at zero, so the embedder's output is 0 until it is trained)."""

  def __init__(self, width: int, *, cfg: DiTConfig, rngs: nnx.Rngs, freq_dim: int = 256,
               zero_output: bool = False):
    self.freq_dim = freq_dim
    kw = dict(dtype=_dtype(cfg.dtype), param_dtype=_dtype(cfg.param_dtype), rngs=rngs,
              kernel_init=L.normal(0.02))
    self.mlp_0 = L.Dense(freq_dim, width, ("freq", "embed"), **kw)
    if zero_output:
      kw["kernel_init"] = L.zeros
    self.mlp_2 = L.Dense(width, width, ("mlp", "embed"), **kw)

  def __call__(self, t: jax.Array) -> jax.Array:
    h = self.mlp_0(timestep_features(t, self.freq_dim))
    return self.mlp_2(jax.nn.silu(h))


def _norm(cfg: DiTConfig, dim: int, rngs: nnx.Rngs) -> nnx.Module:
  """Block / final norm: RMSNorm (learnable weight, eps 1e-6) or, with
  ``use_rmsnorm=False``, LayerNorm without affine parameters (eps 1e-6)."""
  if cfg.use_rmsnorm:
    return L.RMSNorm(dim, param_dtype=_dtype(cfg.param_dtype))
  return L.LayerNorm(dim, rngs=rngs, epsilon=1e-6, use_bias=False, use_scale=False,
                     param_dtype=_dtype(cfg.param_dtype))


def _qk_norm(cfg: DiTConfig, rngs: nnx.Rngs) -> nnx.Module | None:
  """QK-norm over head_dim: RMSNorm (eps 1e-6), or PyTorch's default LayerNorm (weight
  and bias, eps 1e-5) with ``use_rmsnorm=False``; None without QK-norm."""
  if not cfg.use_qknorm:
    return None
  if cfg.use_rmsnorm:
    return L.RMSNorm(cfg.head_dim, param_dtype=_dtype(cfg.param_dtype))
  return L.LayerNorm(cfg.head_dim, rngs=rngs, epsilon=1e-5,
                     param_dtype=_dtype(cfg.param_dtype))


class Attention(nnx.Module):
  """Fused qkv → QK-norm → 2-D RoPE → SDPA → output projection (norm and RoPE optional)."""

  def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
    d, dt, pdt = cfg.hidden_size, _dtype(cfg.dtype), _dtype(cfg.param_dtype)
    self.num_heads, self.head_dim = cfg.num_heads, cfg.head_dim
    self.impl = cfg.attention_impl
    self.qkv = L.Dense(d, 3 * d, ("embed", "qkv"), dtype=dt, param_dtype=pdt, rngs=rngs)
    self.q_norm = _qk_norm(cfg, rngs)
    self.k_norm = _qk_norm(cfg, rngs)
    self.proj = L.Dense(d, d, ("heads", "embed"), dtype=dt, param_dtype=pdt, rngs=rngs)

  def __call__(self, x: jax.Array, rope: tuple[jax.Array, jax.Array] | None,
               sharding: jax.sharding.Sharding | None = None) -> jax.Array:
    """``sharding``: the activations' sharding (places the splash kernel per device)."""
    n, t, _ = x.shape
    qkv = self.qkv(x).reshape(n, t, 3, self.num_heads, self.head_dim)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    if self.q_norm is not None:
      q, k = self.q_norm(q), self.k_norm(k)
    if rope is not None:
      q, k = apply_rope(q, *rope), apply_rope(k, *rope)
    out = attn_lib.dot_product_attention(q, k, v.astype(q.dtype), impl=self.impl,
                                         sharding=sharding)
    # The residual the "save_attn_out" remat policy keeps (everything else is recomputed).
    out = checkpoint_name(out, "attn_out")
    return self.proj(out.reshape(n, t, -1))


class SwiGLU(nnx.Module):
  """Fused w12 (gate first half, value second half) → SiLU(gate)·value → w3."""

  def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
    d, h = cfg.hidden_size, cfg.mlp_hidden
    kw = dict(dtype=_dtype(cfg.dtype), param_dtype=_dtype(cfg.param_dtype), rngs=rngs)
    self.hidden = h
    self.w12 = L.Dense(d, 2 * h, ("embed", "mlp"), **kw)
    self.w3 = L.Dense(h, d, ("mlp", "embed"), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    x12 = self.w12(x)
    return self.w3(jax.nn.silu(x12[..., : self.hidden]) * x12[..., self.hidden:])


class GeluMLP(nnx.Module):
  """timm ``Mlp``: fc1 → tanh-approximated GELU → fc2 (``use_swiglu=False``)."""

  def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
    d, h = cfg.hidden_size, cfg.gelu_hidden
    kw = dict(dtype=_dtype(cfg.dtype), param_dtype=_dtype(cfg.param_dtype), rngs=rngs)
    self.fc1 = L.Dense(d, h, ("embed", "mlp"), **kw)
    self.fc2 = L.Dense(h, d, ("mlp", "embed"), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.fc2(jax.nn.gelu(self.fc1(x), approximate=True))


class Block(nnx.Module):
  """LightningDiT block: adaLN(6) modulation (4 without shifts) around attention and
  the MLP (SwiGLU or GELU)."""

  def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
    d, pdt = cfg.hidden_size, _dtype(cfg.param_dtype)
    self.wo_shift = cfg.wo_shift
    self.norm1 = _norm(cfg, d, rngs)
    self.attn = Attention(cfg, rngs=rngs)
    self.norm2 = _norm(cfg, d, rngs)
    self.mlp = SwiGLU(cfg, rngs=rngs) if cfg.use_swiglu else GeluMLP(cfg, rngs=rngs)
    self.adaLN_modulation = L.Dense(d, cfg.adaln_chunks * d, ("embed", "adaln"),
                                    dtype=_dtype(cfg.dtype), param_dtype=pdt,
                                    kernel_init=L.zeros, rngs=rngs)

  def __call__(self, x: jax.Array, c: jax.Array, rope,
               sharding: jax.sharding.Sharding | None = None) -> jax.Array:
    mod = self.adaLN_modulation(jax.nn.silu(c)).astype(jnp.float32)
    # [N, 6D] -> [N, 6, D] then index (not jnp.split): with the 6D axis sharded over
    # "tensor", XLA's CPU SPMD partitioner mis-partitions the gradient of split slices on
    # a data×fsdp×tensor mesh (found by tests/test_train.py); the reshape avoids it.
    if self.wo_shift:
      mod = mod.reshape(mod.shape[0], 4, -1)
      sc_a, g_a, sc_m, g_m = (mod[:, i] for i in range(4))
      sh_a = sh_m = jnp.zeros_like(sc_a)
    else:
      mod = mod.reshape(mod.shape[0], 6, -1)
      sh_a, sc_a, g_a, sh_m, sc_m, g_m = (mod[:, i] for i in range(6))
    h = self.attn(modulate(self.norm1(x), sh_a, sc_a), rope, sharding)
    x = x + g_a[:, None, :] * h
    h = self.mlp(modulate(self.norm2(x), sh_m, sc_m))
    return x + g_m[:, None, :] * h


class FinalLayer(nnx.Module):
  def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
    d, pdt, dt = cfg.hidden_size, _dtype(cfg.param_dtype), _dtype(cfg.dtype)
    out = cfg.patch_size ** 2 * cfg.out_channels
    self.norm_final = _norm(cfg, d, rngs)
    self.linear = L.Dense(d, out, ("embed", "channels"), dtype=dt, param_dtype=pdt,
                          kernel_init=L.zeros, rngs=rngs)
    self.adaLN_modulation = L.Dense(d, 2 * d, ("embed", "adaln"), dtype=dt, param_dtype=pdt,
                                    kernel_init=L.zeros, rngs=rngs)

  def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array:
    mod = self.adaLN_modulation(jax.nn.silu(c)).astype(jnp.float32)
    mod = mod.reshape(mod.shape[0], 2, -1)   # see Block: reshape, not jnp.split
    shift, scale = mod[:, 0], mod[:, 1]
    return self.linear(modulate(self.norm_final(x), shift, scale))


class RepaProjector(nnx.Module):
  """Linear(D→P) → SiLU → Linear(P→P) → SiLU → Linear(P→repa_dim)."""

  def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
    p = cfg.repa_projector_dim
    kw = dict(dtype=_dtype(cfg.dtype), param_dtype=_dtype(cfg.param_dtype), rngs=rngs)
    self.l0 = L.Dense(cfg.hidden_size, p, ("embed", "repa"), **kw)
    self.l2 = L.Dense(p, p, ("repa", "repa"), **kw)
    self.l4 = L.Dense(p, cfg.repa_dim, ("repa", "channels"), **kw)

  def __call__(self, x: jax.Array) -> jax.Array:
    return self.l4(jax.nn.silu(self.l2(jax.nn.silu(self.l0(x)))))


def _remat_policy(name: str):
  cp = jax.checkpoint_policies
  return {
      "full": cp.nothing_saveable,
      "dots": cp.dots_saveable,
      "dots_no_batch": cp.dots_with_no_batch_dims_saveable,
      "save_attn_out": cp.save_only_these_names("attn_out"),
  }[name]


class LightningDiT(nnx.Module):
  """SFD's LightningDiT.

  Call: ``model(x, t_tex, t_sem, y)`` with x ``[N, H, W, C]``, times ``[N]`` and labels
  ``[N]`` (``num_classes`` is the null label). A synchronous model (``delta_t == 0``) has a
  single clock and uses ``t_tex`` (pass the same values for both). A model of a K-part
  schedule (``cfg.time_parts``, K ≥ 3) is called as ``model(x, (t_1, ..., t_K), None, y)``.
  Returns the velocity
  ``[N, H, W, C]``; with ``return_repa=True`` also the REPA projection ``[N, T, repa_dim]``.
  ``label_drop_key`` turns on label dropout (training).
  """

  def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
    self.cfg = cfg
    d, pdt, dt = cfg.hidden_size, _dtype(cfg.param_dtype), _dtype(cfg.dtype)
    p = cfg.patch_size
    self.x_embedder = L.Dense(p * p * cfg.in_channels, d, ("channels", "embed"), dtype=dt,
                              param_dtype=pdt, rngs=rngs)
    k = cfg.num_time_embedders
    if k == 2:
      self.t_embedder_sem = TimestepEmbedder(d // 2, cfg=cfg, rngs=rngs)
      self.t_embedder_tex = TimestepEmbedder(d - d // 2, cfg=cfg, rngs=rngs)
    elif k == 1:
      self.t_embedder = TimestepEmbedder(d, cfg=cfg, rngs=rngs)
    else:   # one per part, created (and concatenated) last part first, as the pair above
      for name, width in zip(reversed(cfg.time_parts), cfg.time_embedder_widths()):
        setattr(self, f"t_embedder_{name}", TimestepEmbedder(width, cfg=cfg, rngs=rngs))
    rows = cfg.num_classes + int(cfg.class_dropout_prob > 0)
    self.y_embedding = nnx.Param(
        L.normal(0.02)(rngs.params(), (rows, d), pdt), out_sharding=("vocab", "embed"))

    @nnx.split_rngs(splits=cfg.depth)
    @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
    def make_blocks(r):
      return Block(cfg, rngs=r)

    self.blocks = make_blocks(rngs)
    self.final_layer = FinalLayer(cfg, rngs=rngs)
    if cfg.use_repa:
      self.repa_projector = RepaProjector(cfg, rngs=rngs)
    for name, bins in cfg.learned_clocks:   # φ of a learned clock (0: the base clock)
      setattr(self, f"clock_{name}", nnx.Param(jnp.zeros((bins,), jnp.float32),
                                               out_sharding=(None,)))
    if cfg.interval_embedding:   # created last: the other parameters draw the same init
      for name, width in zip(self._embedder_names(), cfg.time_embedder_widths()):
        setattr(self, f"r_embedder{name}", TimestepEmbedder(width, cfg=cfg, rngs=rngs,
                                                             zero_output=True))

  def _embedder_names(self) -> tuple[str, ...]:
    """Suffixes of the timestep embedders in concatenation order (last part first)."""
    k = self.cfg.num_time_embedders
    if k == 2:
      return ("_sem", "_tex")
    if k == 1:
      return ("",)
    return tuple(f"_{n}" for n in reversed(self.cfg.time_parts))

  def _embed_times(self, prefix: str, times) -> jax.Array:
    """Per-part times (channel order) through the ``prefix`` embedders, concatenated."""
    k = self.cfg.num_time_embedders
    if k == 1:
      times = times[:1]
    elif len(times) != k:
      raise ValueError(f"the model has {k} clock parts {self.cfg.time_parts}, got "
                       f"{len(times)} times")
    return jnp.concatenate([getattr(self, f"{prefix}{n}")(t) for n, t in
                            zip(self._embedder_names(), reversed(times))], -1)

  # -- pieces ----------------------------------------------------------------------

  def embed_inputs(self, x: jax.Array) -> jax.Array:
    cfg = self.cfg
    n, h, w, c = x.shape
    p = cfg.patch_size
    if h != cfg.input_size or w != cfg.input_size or c != cfg.in_channels:
      raise ValueError(f"LightningDiT expects x of shape [N, {cfg.input_size}, "
                       f"{cfg.input_size}, {cfg.in_channels}], got {x.shape}")
    tok = x.reshape(n, h // p, p, w // p, p, c).transpose(0, 1, 3, 2, 4, 5)
    tok = tok.reshape(n, (h // p) * (w // p), p * p * c)
    return self.x_embedder(tok)

  def embed_condition(self, t_tex, t_sem, y, label_drop_key=None, interval=None):
    """Times: (t_tex, t_sem) for two parts, or ``t_tex`` a tuple of one time per part
    (channel order) and ``t_sem`` None. ``interval`` (models with
    ``interval_embedding``): one interval h_k per part (channel order; scalars or [N];
    None = 0), embedded like the times and added to their embedding."""
    cfg = self.cfg
    times = tuple(t_tex) if isinstance(t_tex, (tuple, list)) else (t_tex, t_sem)
    t_emb = self._embed_times("t_embedder", times)
    if cfg.interval_embedding:
      n = jnp.shape(times[0])[0]
      gaps = (0.0,) * len(times) if interval is None else tuple(interval)
      gaps = tuple(jnp.broadcast_to(jnp.asarray(g, jnp.float32), (n,)) for g in gaps)
      t_emb = t_emb + self._embed_times("r_embedder", gaps)
    elif interval is not None:
      raise ValueError("this LightningDiT has no interval embedding (a flow-matching "
                       "model); build it with interval_embedding=True")
    y = jnp.asarray(y, jnp.int32)
    if label_drop_key is not None and cfg.class_dropout_prob > 0:
      drop = jax.random.uniform(label_drop_key, y.shape) < cfg.class_dropout_prob
      y = jnp.where(drop, cfg.num_classes, y)
    y_emb = jnp.take(self.y_embedding[...], y, axis=0)
    return t_emb.astype(jnp.float32) + y_emb.astype(jnp.float32), t_emb, y_emb

  def unpatchify(self, tok: jax.Array) -> jax.Array:
    cfg = self.cfg
    n, p, g = tok.shape[0], cfg.patch_size, cfg.input_size // cfg.patch_size
    x = tok.reshape(n, g, g, p, p, cfg.out_channels).transpose(0, 1, 3, 2, 4, 5)
    return x.reshape(n, g * p, g * p, cfg.out_channels)

  def _run_blocks(self, x, c, rope, start: int, stop: int, collect=None, constrain=None,
                  sharding=None):
    """Applies blocks[start:stop] to x (scanned or unrolled)."""
    if stop <= start:
      return x
    graphdef, state = nnx.split(self.blocks)
    cfg = self.cfg

    def one(x, block_state):
      blk = nnx.merge(graphdef, block_state)
      return constrain(blk(x, c, rope, sharding))

    if cfg.remat_policy != "none":
      one = jax.checkpoint(one, policy=_remat_policy(cfg.remat_policy))
    seg = jax.tree.map(lambda a: a[start:stop], state)
    if cfg.scan_blocks and collect is None:
      x, _ = jax.lax.scan(lambda h, s: (one(h, s), None), x, seg)
      return x
    for i in range(stop - start):
      x = one(x, jax.tree.map(lambda a, i=i: a[i], seg))
      if collect is not None:
        collect.append(x)
    return x

  # -- forward ---------------------------------------------------------------------

  def __call__(self, x: jax.Array, t_tex: jax.Array, t_sem: jax.Array | None, y: jax.Array,
               *, label_drop_key: jax.Array | None = None, return_repa: bool = False,
               return_intermediates: bool = False,
               activation_sharding: jax.sharding.Sharding | None = None, interval=None):
    """See the class docstring. ``activation_sharding`` (e.g. batch over the data axes)
    pins the token states at every block boundary; without it, under FSDP, XLA follows
    the weight sharding and keeps the *whole* batch on every device. ``interval``: the
    per-part intervals of an average-velocity model (see ``embed_condition``)."""
    cfg = self.cfg
    if t_sem is None and not isinstance(t_tex, (tuple, list)):
      t_sem = t_tex

    def constrain(h):
      if activation_sharding is None:
        return h
      return jax.lax.with_sharding_constraint(h, activation_sharding)

    x_emb = self.embed_inputs(x)
    pos = jnp.asarray(sincos_pos_embed(cfg.hidden_size, cfg.input_size // cfg.patch_size))
    h = constrain(x_emb.astype(jnp.float32) + pos[None])
    c, t_emb, y_emb = self.embed_condition(t_tex, t_sem, y, label_drop_key, interval)
    rope = None
    if cfg.use_rope:
      cos, sin = rope_tables(cfg.head_dim, cfg.input_size // cfg.patch_size)
      rope = (jnp.asarray(cos), jnp.asarray(sin))

    collect = [] if return_intermediates else None
    want_repa = (return_repa or return_intermediates) and cfg.use_repa
    split = cfg.repa_depth if want_repa else 0
    h = self._run_blocks(h, c, rope, 0, split, collect, constrain, activation_sharding)
    repa = constrain(self.repa_projector(h).astype(jnp.float32)) if want_repa else None
    h = self._run_blocks(h, c, rope, split, cfg.depth, collect, constrain,
                         activation_sharding)
    tok = self.final_layer(h, c).astype(jnp.float32)
    v = self.unpatchify(tok)
    if return_intermediates:
      inter = {"x_embed": x_emb, "y_emb": y_emb, "final_layer": tok, "repa": repa}
      if cfg.num_time_embedders == 2:
        half = cfg.hidden_size // 2
        inter["t_emb_sem"], inter["t_emb_tex"] = t_emb[:, :half], t_emb[:, half:]
      else:
        inter["t_emb"] = t_emb
      for i, b in enumerate(collect):
        inter[f"block{i}"] = b
      return v, inter
    if return_repa:
      return v, repa
    return v


def param_count_table(include_repa: bool = False) -> dict[str, int]:
  """Parameter count of every variant (abstract evaluation, nothing allocated)."""
  out = {}
  for name in VARIANTS:
    cfg = DiTConfig.variant(name, use_repa=include_repa)
    model = nnx.eval_shape(lambda c=cfg: LightningDiT(c, rngs=nnx.Rngs(0)))
    out[name] = L.param_count(model)
  return out
