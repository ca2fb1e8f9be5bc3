"""Analytic FLOP count of the LightningDiT forward (and of the programs built on it).

Counting rules (one multiply-accumulate = 2 FLOP; matrix products only — norms, RoPE,
softmax and other elementwise work are left out):

* per block and token: qkv 2·D·3D + output projection 2·D² + SwiGLU 2·D·2H + 2·H·D
  (= 24·D² for H = 8D/3), plus attention 4·T·D (scores and weighted sum, all heads);
* per block and *image*: the adaLN modulation Linear D→6D (it acts on the condition
  vector, not on tokens); per image once more: the final adaLN (D→2D) and the timestep
  embedders (256→D/2→D/2 twice for the semantic-first model);
* per token once: the patch embedder (p²·C_in→D), the final Linear (D→p²·C_out) and,
  when requested, the REPA projector (D→P→P→R);
* train step = 3 × forward (forward + backward, model FLOPs; recomputation under a
  remat policy is extra hardware work and is not counted, as is usual for MFU);
* one velocity evaluation of a sampler = the forward without the REPA head, twice with
  CFG (conditional and unconditional rows in one batch), main + guide with
  autoguidance (``velocity_flops``).

``bench/flops.py`` prints the table and checks it against XLA's count;
``sfd_jax.planning`` compares it with the matmul FLOPs of the compiled TPU programs.
"""
from __future__ import annotations

import dataclasses

TIMESTEP_FREQ_DIM = 256   # sinusoidal features of the timestep embedders


@dataclasses.dataclass(frozen=True)
class FlopCount:
  """Forward FLOPs of one image, by part."""
  blocks_linear: float      # qkv, projection, SwiGLU of all blocks, all tokens
  attention: float          # scores and weighted sum of all blocks, all tokens
  adaln: float              # block and final adaLN modulations (per image)
  embedders: float          # patch embedder + final Linear (per token), t-embedders
  repa: float               # REPA projector (0 when not counted)

  @property
  def total(self) -> float:
    return self.blocks_linear + self.attention + self.adaln + self.embedders + self.repa

  @property
  def train_step(self) -> float:
    """Forward + backward model FLOPs of one training example (3 × forward)."""
    return 3.0 * self.total

  def as_dict(self) -> dict[str, float]:
    return {**dataclasses.asdict(self), "total": self.total, "train_step": self.train_step}


def forward_flops(cfg, *, repa: bool = True) -> FlopCount:
  """Analytic forward FLOPs per image of a ``DiTConfig`` (see the module docstring).

  Args:
    cfg: ``sfd_jax.models.lightning_dit.DiTConfig``.
    repa: count the REPA projector (training forward); only if ``cfg.use_repa``.
  """
  d, h, t = cfg.hidden_size, cfg.mlp_hidden, cfg.num_tokens
  p2 = cfg.patch_size ** 2
  per_token_linear = 2 * (d * 3 * d + d * d + d * 2 * h + h * d)
  blocks_linear = cfg.depth * t * per_token_linear
  attention = cfg.depth * t * 4 * t * d
  adaln = cfg.depth * 2 * d * 6 * d + 2 * d * 2 * d
  if cfg.semantic_first:
    widths = (d // 2, d - d // 2)
  else:
    widths = (d,)
  t_embed = sum(2 * (TIMESTEP_FREQ_DIM * w + w * w) for w in widths)
  embedders = t * 2 * (p2 * cfg.in_channels * d + d * p2 * cfg.out_channels) + t_embed
  repa_flops = 0
  if repa and cfg.use_repa:
    p, r = cfg.repa_projector_dim, cfg.repa_dim
    repa_flops = t * 2 * (d * p + p * p + p * r)
  return FlopCount(float(blocks_linear), float(attention), float(adaln), float(embedders),
                   float(repa_flops))



def velocity_flops(cfg, guidance: str = "none", guide_cfg=None, guided: bool = True) -> float:
  """Forward FLOPs per image of one velocity evaluation of a sampler (see the module
  doc); ``guided=False`` when guidance is off (``scale <= 1``)."""
  one = forward_flops(cfg, repa=False).total
  if not guided or guidance == "none":
    return one
  if guidance == "cfg":
    return 2.0 * one
  if guide_cfg is None:
    raise ValueError("autoguidance FLOPs need the guide's config")
  return one + forward_flops(guide_cfg, repa=False).total
