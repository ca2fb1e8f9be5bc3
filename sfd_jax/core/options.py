"""Every config field, declared once: its type, what is allowed and what it means.

The declarations (``FAMILIES``: one table per config family — SFD, SemVAE, texture VAE,
the demo's feature net, encode / extract) serve three things:

* ``check(config)`` refuses, before anything is built, compiled or written, a field the
  family does not declare (a misspelled field in a config file) and a value of the wrong
  type or out of range, with one line naming the field, the value and what is allowed::

    config.optimizer.lr must be a number > 0, got -1.0; peak learning rate

  ``main.py`` runs it in every mode; the trainers, sampling and the data jobs run it too
  when called from Python. Checks that need more than one field, the devices or a file
  (batch divisibility, a checkpoint of the right kind, ...) belong to the parts that own
  them and run right after it (docs/errors.md).
* ``rows(family, config)`` lists the fields (path, value, type, allowed, meaning), e.g.
  for a help or config-printing mode.
* ``markdown()`` writes docs/options.md: ``python -m sfd_jax.core.options > docs/options.md``
  (run in the repository: the defaults are read from its ``configs/`` files).

A field in a ``configs/`` file without a declaration fails ``tests/test_options.py``, and
so does a stale docs/options.md. Choices owned by code elsewhere (samplers, remat
policies, ...) are written out here and tested against the code's constants.
"""
from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import math
import os
import sys
from typing import Any, Callable, Iterable, Mapping, Sequence

from sfd_jax.core.errors import ConfigError
from sfd_jax.core.options_notes import NOTES

# ------------------------------------------------------------------ declarations

INT, FLOAT, BOOL, STR = "int", "float", "bool", "str"
INTS, FLOATS, STRS = "tuple[int]", "tuple[float]", "tuple[str]"
MAPPING = "mapping"       # free keys (XLA options, sweep overrides): not descended into
PAIRS = "pairs"           # a tuple of (name, value) pairs
TUPLE = "tuple"           # a tuple of anything (checked by ``ok``)


@dataclasses.dataclass(frozen=True)
class Field:
  """One config field.

  ``path``: dotted, relative to the block it is declared in (``*`` matches any key, e.g.
  ``parts.*.channels``). ``type``: one of the names above (``FLOAT`` accepts integers;
  a tuple type checks each element). ``choices`` / ``ge`` / ``gt`` / ``le`` / ``lt`` /
  ``none_ok`` / ``ok`` (a predicate with ``allowed`` its text) say what is allowed.
  ``absent``: what the code does when a config leaves the field out (documented even
  when no reference config sets it).
  """
  path: str
  type: str
  meaning: str
  choices: tuple = ()
  ge: float | None = None
  gt: float | None = None
  le: float | None = None
  lt: float | None = None
  none_ok: bool = False
  ok: Callable[[Any], bool] | None = None
  allowed: str = ""
  absent: str = ""

  def under(self, prefix: str) -> "Field":
    return dataclasses.replace(self, path=f"{prefix}.{self.path}" if prefix else self.path)

  # ---- what is allowed, in words
  def allowed_text(self, markdown: bool = False) -> str:
    def q(v):
      return f"`{v}`" if markdown else repr(v)
    if self.allowed:
      text = self.allowed
    elif self.choices:
      text = "one of " + ", ".join(q(c) for c in self.choices)
    else:
      text = _range_text(self)
    if self.none_ok:
      text += " or None"
    return text

  def expected(self) -> str:
    noun = {INT: "an integer", FLOAT: "a number", BOOL: "True or False", STR: "a string",
            INTS: "a tuple of integers", FLOATS: "a tuple of numbers",
            STRS: "a tuple of strings", MAPPING: "a section of name = value entries",
            PAIRS: "a tuple of (name, value) pairs", TUPLE: "a tuple"}[self.type]
    rng = self.allowed_text()
    if self.type == BOOL or (not rng and not self.none_ok):
      return noun
    if self.allowed or self.choices:
      return f"{noun}, {rng}" if self.type in (INTS, FLOATS, STRS) else rng
    if self.type in (INTS, FLOATS):
      return f"{noun}, each {rng}"
    return f"{noun} {rng}" if rng and not rng.startswith(" or") else noun + rng

  # ---- checking one value
  def accepts(self, value) -> bool:
    if value is None:
      return self.none_ok
    if self.type in (INTS, FLOATS, STRS):
      if not isinstance(value, (tuple, list)):
        return False
      elem = dataclasses.replace(self, type={INTS: INT, FLOATS: FLOAT, STRS: STR}[self.type],
                                 ok=None, none_ok=False)
      return (all(elem.accepts(v) for v in value)
              and (self.ok is None or _safe(self.ok, value)))
    if not _type_ok(self.type, value):
      return False
    if self.choices and value not in self.choices:
      return False
    if isinstance(value, (int, float)) and not isinstance(value, bool):
      for bound, good in ((self.ge, lambda b: value >= b), (self.gt, lambda b: value > b),
                          (self.le, lambda b: value <= b), (self.lt, lambda b: value < b)):
        if bound is not None and not good(bound):
          return False
    return self.ok is None or _safe(self.ok, value)


def _safe(fn, value) -> bool:
  try:
    return bool(fn(value))
  except (TypeError, ValueError, AttributeError):
    return False


def _type_ok(kind: str, v) -> bool:
  if kind == INT:
    return isinstance(v, int) and not isinstance(v, bool)
  if kind == FLOAT:
    return (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v))
  if kind == BOOL:
    return isinstance(v, bool)
  if kind == STR:
    return isinstance(v, str)
  if kind == MAPPING:
    return isinstance(v, Mapping) and all(
        isinstance(x, (str, int, float, bool)) or x is None for x in _leaves(v))
  if kind == TUPLE:
    return isinstance(v, (tuple, list))
  if kind == PAIRS:
    return isinstance(v, (tuple, list)) and all(
        isinstance(p, (tuple, list)) and len(p) == 2 and isinstance(p[0], str) for p in v)
  raise AssertionError(kind)


def _leaves(d: Mapping):
  for v in d.values():
    if isinstance(v, Mapping):
      yield from _leaves(v)
    else:
      yield v


def _num(x: float) -> str:
  return f"{x:g}"


def _range_text(f: Field) -> str:
  lo = (f.ge, "[") if f.ge is not None else (f.gt, "(") if f.gt is not None else None
  hi = (f.le, "]") if f.le is not None else (f.lt, ")") if f.lt is not None else None
  if lo and hi:
    return f"in {lo[1]}{_num(lo[0])}, {_num(hi[0])}{hi[1]}"
  if lo:
    return f"{'>=' if lo[1] == '[' else '>'} {_num(lo[0])}"
  if hi:
    return f"{'<=' if hi[1] == ']' else '<'} {_num(hi[0])}"
  return ""


def F(path: str, type_: str, meaning: str, **kw) -> Field:  # pylint: disable=invalid-name
  return Field(path, type_, meaning, **kw)


def block(prefix: str, fields: Iterable[Field]) -> tuple[Field, ...]:
  return tuple(f.under(prefix) for f in fields)


def comma_list(choices: Sequence[str], *, empty: bool = False) -> Callable[[str], bool]:
  """A predicate: a comma-separated list of ``choices`` (``empty``: "" allowed)."""
  def ok(v: str) -> bool:
    items = [s.strip() for s in v.split(",") if s.strip()]
    return (bool(items) or empty) and all(s in choices for s in items)
  return ok


def _int_list(v: str) -> bool:
  items = [s.strip() for s in v.split(",") if s.strip()]
  return all(s.isdigit() and int(s) > 0 for s in items)


DTYPES = ("float32", "bfloat16", "float16")
REMAT_POLICIES = ("none", "full", "dots", "dots_no_batch", "save_attn_out")
TEXTURE_VAE_PRESETS = ("f16d32", "tiny")
DINOV2_PRESETS = ("vitb14_reg", "vitl14", "tiny", "tiny_noreg")

# ------------------------------------------------------------------ shared blocks

MODEL_DTYPES = (
    F("dtype", STR, "compute dtype", choices=DTYPES),
    F("param_dtype", STR, "parameter dtype", choices=DTYPES),
)

RUN = (
    F("seed", INT, "seed of the parameter init, the noise / time / label-dropout stream "
      "(fold_in(key(seed), step)) and the data order", ge=0),
)

LOOP = (
    F("batch_size", INT, "global batch (all processes together)", gt=0),
    F("num_train_steps", INT, "the number of optimizer steps to train for", gt=0),
    F("log_every_steps", INT, "steps between logged metrics", gt=0),
    F("checkpoint_every_steps", INT, "steps between checkpoints (also at the last step and "
      "on preemption)", gt=0),
    F("keep_checkpoints", INT, "most recent checkpoints kept", gt=0, none_ok=True),
    F("keep_period", INT, "also keep every keep_period-th step forever (0 = none)", ge=0,
      none_ok=True),
    F("profile_steps", INT, "steps traced by the profiler, from step start + 10 (0 = off)",
      ge=0, absent="0 (off)"),
    F("init_from", STR, "converted weights folder (python -m sfd_jax.convert.*) a fresh "
      "run starts from (\"\" = random init)"),
    F("allow_config_change", STR, "resume with changed fields that change what the state "
      "means: \"\" refuses (listing them), \"all\", or fields / sections, e.g. "
      "\"objective.delta_t,model.depth\"", ok=lambda v: True,
      allowed="\"\", \"all\" or comma-separated fields / sections"),
    F("writer", STR, "metric writer: auto (clu with TensorFlow, else tensorboardX), clu, "
      "tensorboardx or log (log lines only)", choices=("auto", "clu", "tensorboardx", "log")),
    F("force_unlock", BOOL, "take over the workdir's lock even if its owner looks alive "
      "(after making sure no other run uses the workdir; docs/errors.md)"),
    F("wandb.enabled", BOOL, "also log to Weights & Biases (pip install 'sfd-jax[wandb]')"),
    F("wandb.project", STR, "W&B project"),
    F("wandb.entity", STR, "W&B entity (\"\" = the default)"),
    F("wandb.name", STR, "W&B run name (\"\" = W&B's)"),
    F("wandb.mode", STR, "W&B mode", choices=("online", "offline", "disabled")),
)

MESH = (
    F("mesh.data", INT, "devices on the pure data-parallel axis (-1: all remaining)", ge=-1),
    F("mesh.fsdp", INT, "devices on the FSDP axis (batch and weights sharded; -1: all "
      "remaining)", ge=-1),
    F("mesh.tensor", INT, "devices on the tensor-parallel axis (-1: all remaining)", ge=-1),
    F("strict_sharding", BOOL, "a weight dimension that does not divide its mesh axes is an "
      "error (False: it is replicated, with a warning)", absent="False"),
    F("compiler_options", MAPPING, "XLA options of the init, train step and evaluation "
      "programs (name = value; empty: XLA's defaults)", absent="{}"),
)


def adamw_fields(prefix: str, what: str) -> tuple[Field, ...]:
  """``config.optimizer`` (or ``disc_optimizer``): AdamW and its schedule."""
  return block(prefix, (
      F("name", STR, f"optimizer of {what} (AdamW; Adam = weight_decay 0)",
        choices=("adamw",)),
      F("lr", FLOAT, "peak learning rate", gt=0),
      F("b1", FLOAT, "Adam β1", ge=0, lt=1),
      F("b2", FLOAT, "Adam β2", ge=0, lt=1),
      F("eps", FLOAT, "Adam ε", gt=0),
      F("weight_decay", FLOAT, "decoupled weight decay", ge=0),
      F("grad_clip", FLOAT, "clip the global gradient norm to this (0 = no clipping)", ge=0),
      F("schedule", STR, "learning-rate schedule: constant (after an optional linear "
        "warm-up) or warmup_constant_cosine (warm-up, constant, cosine tail)",
        choices=("constant", "warmup_constant_cosine")),
      F("warmup_steps", INT, "linear warm-up steps", ge=0),
      F("warmup_init_factor", FLOAT, "warm-up starts at this × lr",
        ge=0, absent="0 (constant), 0.01 (warmup_constant_cosine)"),
      F("total_steps", INT, "warmup_constant_cosine: the schedule's length", gt=0,
        absent="needed by warmup_constant_cosine"),
      F("decay_steps", INT, "warmup_constant_cosine: the cosine tail's length (the last "
        "steps of total_steps)", ge=0, absent="needed by warmup_constant_cosine"),
      F("final_factor", FLOAT, "warmup_constant_cosine: the tail ends at this × lr", ge=0,
        absent="0.1"),
  ))


SFD_OPTIMIZER_EXTRA = (
    F("optimizer.accumulate_steps", INT, "gradient accumulation: the global batch in k "
      "micro-batches (rows j::k) whose gradients are averaged; batch_size must be a "
      "multiple of k × the batch-axis devices", gt=0, absent="1"),
    F("optimizer.skip_nonfinite", BOOL, "a step with a NaN/Inf loss or gradient norm leaves "
      "params, optimizer state and EMA unchanged (metric 'skipped') instead of stopping",
      absent="False"),
    F("optimizer.skip_grad_norm_above", FLOAT, "> 0: also skip steps whose gradient norm "
      "exceeds this (loss spikes)", ge=0, absent="0 (off)"),
)

PLAN = block("plan", (
    F("topology", STR, "TPU slice to compile for, GENERATION:AxB[xC] (v4, v5p: 3-D; v5e, "
      "v6e: 2-D)", ok=lambda v: ":" in v and "x" in v.split(":", 1)[1],
      allowed="GENERATION:AxB[xC], e.g. v5p:2x2x2"),
    F("num_slices", INT, "slices joined over DCN (multi-slice)", gt=0),
    F("programs", STR, "programs to compile: auto (what the config runs) or a list",
      ok=comma_list(("auto", "train", "sample", "vae_train", "encode")),
      allowed="auto or a comma-separated list of train, sample, vae_train, encode"),
    F("batch_sizes", STR, "global batches of the train step to compile (\"\": the "
      "config's batch_size)", ok=_int_list, allowed="\"\" or comma-separated integers > 0"),
    F("remat_policies", STR, "DiT remat policies to compile (\"\": model.remat_policy)",
      ok=comma_list(REMAT_POLICIES, empty=True),
      allowed="\"\" or comma-separated remat policies"),
    F("search_max_batch", BOOL, "per policy / program, search the largest global batch "
      "that fits a chip"),
    F("search_compiles", INT, "compiles a search may add after the first", ge=0),
    F("search_limit", INT, "largest global batch a search tries", gt=0),
    F("search_tolerance", FLOAT, "stop when the fitting and failing batches are this close "
      "(relative)", gt=0),
    F("hbm_gib", FLOAT, "HBM per chip to plan against (0: what the TPU compiler makes "
      "available)", ge=0),
    F("guide_variant", STR, "autoguidance: the guide's model size (its weights are not "
      "read)", choices=("S", "B", "L", "XL", "XXL", "1p6B")),
    F("decoder_preset", STR, "sample.texture_vae set: the decoder's architecture",
      choices=TEXTURE_VAE_PRESETS),
    F("feature_tokens", INT, "SemVAE configs: tokens per example (DINOv2 at 224 px)", gt=0),
    F("attention_baseline", STR, "with the splash kernel chosen, also compile with this "
      "attention (\"\": no)", choices=("", "xla", "xla_heads", "cudnn")),
))

# ------------------------------------------------------------------ the SFD family

VARIANTS = ("S", "B", "L", "XL", "XXL", "1p6B", "1p0B", "custom")
ATTENTION = ("", "auto", "xla", "xla_heads", "cudnn", "splash")

DIT_MODEL = block("model", (
    F("variant", STR, "LightningDiT size (S, B, L, XL, XXL = the reference's 1p0B, 1p6B); "
      "custom: the size fields below as given", choices=VARIANTS),
    F("input_size", INT, "latent grid side (16 for ImageNet 256 at f16)", gt=0),
    F("patch_size", INT, "patch side on the latent grid", gt=0, absent="1"),
    F("in_channels", INT, "latent channels [texture | semantic]", gt=0),
    F("semantic_chans", INT, "semantic channels (the last ones; 0 = texture only)", ge=0),
    F("hidden_size", INT, "width", gt=0, absent="the variant's"),
    F("depth", INT, "blocks", gt=0, absent="the variant's"),
    F("num_heads", INT, "attention heads (hidden_size must divide by it)", gt=0,
      absent="the variant's"),
    F("mlp_ratio", FLOAT, "MLP width / hidden_size", gt=0, absent="4.0"),
    F("num_classes", INT, "class labels (the null label for guidance is num_classes)", gt=0),
    F("class_dropout_prob", FLOAT, "label dropout in training (the null label; needed for "
      "CFG)", ge=0, lt=1),
    F("use_repa", BOOL, "REPA projector on the tokens after block repa_depth"),
    F("repa_depth", INT, "REPA tap after this block (from 1)", gt=0),
    F("repa_dim", INT, "REPA target width (DINOv2-B: 768)", gt=0),
    F("repa_projector_dim", INT, "REPA projector's hidden width", gt=0, absent="2048"),
    F("use_qknorm", BOOL, "RMSNorm (LayerNorm without use_rmsnorm) of q and k"),
    F("use_swiglu", BOOL, "SwiGLU MLP (off: GELU-tanh MLP)"),
    F("use_rope", BOOL, "2-D rotary embedding in attention"),
    F("use_rmsnorm", BOOL, "RMSNorm in the blocks (off: LayerNorm without affine)"),
    F("wo_shift", BOOL, "adaLN without shifts"),
    F("dtype", STR, "matmul compute dtype (parameters stay param_dtype)", choices=DTYPES),
    F("param_dtype", STR, "parameter dtype", choices=DTYPES),
    F("scan_blocks", BOOL, "lax.scan over the blocks (same parameters as unrolled; faster "
      "compiles)"),
    F("remat_policy", STR, "rematerialisation of the blocks in the backward pass",
      choices=REMAT_POLICIES),
    F("attention_impl", STR, "attention kernel; \"\" / auto picks per backend (a compute "
      "choice: may change on resume)", choices=ATTENTION),
))

OBJECTIVE = block("objective", (
    F("delta_t", FLOAT, "the semantic clock lead Δt (0.3 in SFD, 0 = synchronous)", ge=0,
      le=1),
    F("semantic_weight", FLOAT, "MSE weight of the semantic channels", ge=0),
    F("time_sampler", STR, "training time distribution",
      choices=("logit_normal", "uniform")),
    F("logit_mean", FLOAT, "logit-normal mean"),
    F("logit_std", FLOAT, "logit-normal std", gt=0),
    F("use_cosine_loss", BOOL, "add the velocity cosine loss"),
    F("use_repa", BOOL, "add the REPA loss (with model.use_repa)"),
    F("repa_mode", STR, "REPA loss: cosine, MSE or both", choices=("cos", "mse", "cos_mse")),
    F("repa_weight", FLOAT, "REPA loss weight", ge=0),
    F("repa_requires_cosine", BOOL, "True = the reference's trap: REPA dropped without the "
      "cosine loss"),
    F("clock_energy_weight", FLOAT, "learned clocks: weight of the kinetic-energy penalty "
      "Σ_k ∫ t_k'(τ)² dτ", ge=0, absent="0.1"),
    F("clock_correction", BOOL, "learned clocks: reweight each learned part's MSE so its "
      "local-time density stays that of its base clock", absent="True"),
    F("clock_weight_max", FLOAT, "learned clocks: clip of those weights", gt=0,
      absent="10.0"),
    F("name", STR, "training objective: flow_matching (the paper) or meanflow (average "
      "velocity, for few-step sampling; docs/fewstep.md)", choices=("flow_matching", "meanflow"),
      absent="flow_matching"),
    F("meanflow.equal_fraction", FLOAT, "meanflow: share of examples trained at ρ = τ "
      "(plain flow matching)", ge=0, le=1, absent="0.75"),
    F("meanflow.adaptive_p", FLOAT, "meanflow: adaptive loss weight 1/(mse + c)^p (0: off)",
      ge=0, absent="0.0"),
    F("meanflow.adaptive_c", FLOAT, "meanflow: the c of that weight", gt=0, absent="1e-3"),
))

SCHEDULE = block("schedule", (
    F("total", FLOAT, "T, the end of the global time τ", gt=0,
      absent="the latest clock end"),
    F("order", STRS, "the parts in latent channel order",
      absent="texture, semantic (other part names need it)"),
    F("parts.*.channels", INT, "channels of the part", gt=0),
    F("parts.*.family", STR, "clock family (its fields: docs/clocks.md)",
      choices=("offset", "rate", "power", "shift", "piecewise_linear", "learned")),
    F("parts.*.start", FLOAT, "τ where the clock leaves 0", ge=0),
    F("parts.*.rate", FLOAT, "rate, power, shift, learned: clock speed", gt=0),
    F("parts.*.power", FLOAT, "power: exponent", ge=1),
    F("parts.*.shift", FLOAT, "shift: time shift factor", gt=0),
    F("parts.*.bins", INT, "learned: piecewise-constant rate bins", gt=0),
    F("parts.*.knots", TUPLE, "piecewise_linear: (τ, t) knots, t from 0 to 1",
      ok=lambda v: all(len(k) == 2 and all(_type_ok(FLOAT, x) for x in k) for k in v),
      allowed="a sequence of (τ, t) pairs"),
    F("parts.*.loss_weight", FLOAT, "MSE weight of the part", ge=0),
    F("parts.*.guidance_scale", FLOAT, "the part's own guidance scale (None: sample.scale)",
      ge=0, none_ok=True),
))

SFD_DATA = block("data", (
    F("path", STR, "latent dataset (dataset.json, shards, stats.npz; --mode=encode)"),
    F("stats", STR, "latent statistics file (\"\" = <path>/stats.npz)"),
    F("latent_multiplier", FLOAT, "latents × this after normalisation (SFD: 1.0)", gt=0),
    F("normalize", BOOL, "per-channel mean/std normalisation (False: stored latents × "
      "latent_multiplier; no statistics needed)"),
    F("flip", BOOL, "random horizontal flips (the stored flipped views)"),
    F("num_workers", INT, "Grain worker processes per host (0: read in-process)", ge=0),
    F("read_threads", INT, "reader threads per worker", gt=0),
    F("prefetch_batches", INT, "batches prefetched per host", ge=0),
    F("repa_dtype", STR, "REPA targets on the device (float16 = stored, exact; bfloat16 "
      "rounds)", choices=DTYPES),
))

VALIDATION = block("validation", (
    F("path", STR, "held-out latent dataset (training format; \"\" = none)"),
    F("every_steps", INT, "steps between validation losses (0 = off; also the last step)",
      ge=0),
    F("num_examples", INT, "first N records (0 = all)", ge=0),
    F("batch_size", INT, "global batch (a multiple of the batch-axis devices)", gt=0),
    F("times", FLOATS, "training times t of the loss (0 noise, 1 data)", ge=0, le=1),
    F("seed", INT, "noise of example i: fold_in(key(seed), i)", ge=0),
    F("weights", STR, "weights evaluated", choices=("params", "ema")),
))

METHODS = ("euler", "heun", "dopri5", "sde", "meanflow")
SAMPLING_SHARED = (
    F("method", STR, "solver (meanflow: jumps of an average-velocity model)",
      choices=METHODS),
    F("num_steps", INT, "grid points (euler / heun / sde; meanflow: jumps)", gt=0),
    F("atol", FLOAT, "dopri5: absolute tolerance", gt=0),
    F("rtol", FLOAT, "dopri5: relative tolerance", gt=0),
    F("timestep_shift", FLOAT, "ODE grid shift (0 = none; not for sde)", ge=0),
    F("scale", FLOAT, "guidance scale (guided only above 1)", ge=0),
    F("seed", INT, "noise seed (noise of index i is fixed for any batch / device count)",
      ge=0),
    F("cfg_scale_tex", FLOAT, "texture channels' scale (-1 = scale)", ge=-1),
    F("cfg_scale_sem", FLOAT, "semantic channels' scale (-1 = scale)", ge=-1),
    F("cfg_interval_start", FLOAT, "guide a part only while its clock t >= this", ge=0,
      lt=1),
    F("cfg_interval_end", FLOAT, "... and t <= this (t: 0 noise, 1 data)", ge=0, le=1),
    F("cfg_interval_mode", STR, "parts the interval gates", choices=("both", "tex", "sem")),
    F("labels", STR, "class labels: balanced (i·K//N), random (hash of label_seed, i), "
      "fixed (label_class) or unconditional (the null class)",
      choices=("balanced", "random", "fixed", "unconditional")),
    F("label_class", INT, "labels=fixed: the class", ge=0),
    F("label_seed", INT, "labels=random: hash seed (-1 = seed)", ge=-1),
    F("jump_ts", BOOL, "dopri5: tell the step controller about τ = Δt and τ = 1"),
    F("max_steps", INT, "dopri5: step limit", gt=0),
    F("diffusion_form", STR, "sde: diffusion coefficient w(t)",
      choices=("SBDM", "sigma", "linear", "constant", "decreasing", "increasing-decreasing")),
    F("diffusion_norm", FLOAT, "sde: norm of w(t)", ge=0),
    F("last_step", STR, "sde: the noise-free last step", choices=("mean", "euler", "none")),
    F("last_step_size", FLOAT, "sde: size of that last step", gt=0, lt=1),
    F("sde_t_min", FLOAT, "sde: no noise while a part's clock is below this", ge=0, le=1),
    F("compiler_options", MAPPING, "XLA options of the sampling program (empty: on CPU, "
      "Eigen dots; core/jit.py)"),
)

SAMPLE = block("sample", (
    F("checkpoint", STR, "the model: a converted / exported LightningDiT folder or an SFD "
      "training workdir (its EMA weights)"),
    F("guide_checkpoint", STR, "autoguidance: the guide (same two kinds)"),
    F("checkpoint_step", INT, "training workdir: the step to load (-1 = latest)", ge=-1),
    F("guide_step", INT, "guide's training workdir: the step (-1 = latest; e.g. 70000)",
      ge=-1),
    F("guidance", STR, "none, cfg (null label) or autoguidance (guide model)",
      choices=("none", "cfg", "autoguidance")),
    F("dtype", STR, "denoiser compute dtype (weights as stored)",
      choices=("float32", "bfloat16")),
    F("num_images", INT, "images to sample", gt=0),
    F("batch_size", INT, "global batch (fixed index ranges: any device count gives the "
      "same images)", gt=0),
    F("stats", STR, "latent statistics for decoding (\"\" = data.stats / data.path)"),
    F("texture_vae", STR, "converted texture VAE folder or texture-VAE training workdir "
      "(decode; \"\" = write latents)"),
) + SAMPLING_SHARED)

EVAL = block("eval", (
    F("inception", STR, "converted FID Inception folder (python -m sfd_jax.convert.inception)"),
    F("reference_npz", STR, "ADM reference batch, e.g. VIRTUAL_imagenet256_labeled.npz"),
    F("preprocess", STR, "Inception resize: adm (the ADM evaluator's TF-graph resize) or "
      "pytorch_fid", choices=("adm", "pytorch_fid")),
    F("batch_size", INT, "images per Inception call (split over the local devices)", gt=0),
    F("grid_images", INT, "samples in the grid PNG (class order)", ge=0),
    F("samples_npz", STR, "score this ADM-format .npz (uint8 arr_0) without sampling"),
    F("step", INT, "TensorBoard step of the metrics", ge=0, absent="0"),
))

TRAIN_EVAL = block("train_eval", (
    F("every_steps", INT, "steps between in-training evaluations (0 = off; also the last "
      "step)", ge=0),
    F("num_images", INT, "images per evaluation (a trend, not a reportable FID)", gt=0),
    F("batch_size", INT, "global batch (a multiple of the batch-axis devices)", gt=0),
    F("guidance", STR, "none or cfg (autoguidance needs a second model: --mode=sample)",
      choices=("none", "cfg")),
    F("grid_images", INT, "samples in the logged grid", ge=0),
    F("features", STR, "FID features: \"\" (grid only), inception or demo",
      choices=("", "inception", "demo")),
    F("features_path", STR, "the converted feature network folder"),
    F("preprocess", STR, "Inception resize (see eval.preprocess)",
      choices=("adm", "pytorch_fid")),
    F("feature_batch_size", INT, "images per feature call", gt=0),
    F("reference", STR, "ADM-format .npz: reference images arr_0 and/or mu / sigma"),
) + SAMPLING_SHARED)

EXPORT = block("export", (
    F("step", INT, "training step to export (-1 = latest)", ge=-1),
    F("weights", STR, "weight set: ema or params (raw)", choices=("ema", "params")),
    F("dtype", STR, "stored dtype", choices=DTYPES),
    F("formats", STR, "what to write", ok=comma_list(("orbax", "safetensors", "npz")),
      allowed="a comma-separated subset of orbax, safetensors, npz"),
    F("dst", STR, "output folder (\"\" = <workdir>/export/<step>-<weights>-<dtype>)"),
    F("overwrite", BOOL, "replace an earlier export in dst"),
))

SFD_TOP = RUN + (
    F("ema_decay", FLOAT, "EMA decay (EMA from a copy of the init, every step)", ge=0,
      le=1),
    F("init_from_mode", STR, "exact: init_from must match the model; shape_check: copy "
      "tensors whose name and shape match (the reference's weight_init)",
      choices=("exact", "shape_check")),
    F("init_from_patch_channels", INT, "shape_check: input channels of the old patch "
      "embedder copied (-1 = all)", ge=-1),
    F("sharding_rules", PAIRS, "(logical axis, mesh axis or None) pairs; empty = "
      "parallel.DEFAULT_RULES", allowed="any"),
)

DEMO = block("demo", (
    F("dataset", STR, "scikit-learn's digits (shipped with scikit-learn)",
      choices=("digits",)),
    F("image_size", INT, "digits upsampled to this side (RGB)", gt=0),
    F("holdout_every", INT, "every n-th image is held out (the real-data FID floor)", gt=1),
    F("delta_ts", FLOATS, "Δt of each trained denoiser (SFD vs the synchronous baseline)",
      ge=0, le=1),
    F("samples_per_class", INT, "final sampling: images per class", gt=0),
    F("grid_per_class", INT, "grid columns per class", gt=0),
    F("clock_sweep.seeds", INTS, "seeds of each schedule (config.seed and sample.seed)",
      ge=0),
    F("clock_sweep.order", STRS, "the schedules, in report order"),
    F("clock_sweep.schedules", MAPPING, "schedule name → sweep overrides (fields of the "
      "objective or a config.schedule section)"),
    F("fewstep.seeds", INTS, "seeds of each few-step setting (config.seed and sample.seed)",
      ge=0),
    F("fewstep.order", STRS, "the few-step settings, in report order"),
    F("fewstep.schedules", MAPPING, "setting name → sweep overrides (objective and "
      "train_eval fields)"),
    F("fewstep.nfe.*", TUPLE, "setting → the sampler and the NFEs it is sampled at",
      ok=lambda v: (len(v) == 2 and v[0] in METHODS
                    and all(_type_ok(INT, n) and n > 0 for n in v[1])),
      allowed="(method, (NFE, ...))"),
    F("fewstep.labels", MAPPING, "setting name → its label in the report"),
))

# ------------------------------------------------------------------ the autoencoders

VAE_TOP = RUN + (
    F("ema_decay", FLOAT, "> 0: EMA of the autoencoder (state key 'ema')", ge=0, le=1,
      absent="0 (no EMA)"),
)
VAE_EVAL = block("eval", (
    F("every_steps", INT, "steps between evaluations on data.eval_path (0 = off)", ge=0),
    F("max_examples", INT, "evaluation examples (0 = the whole set)", ge=0),
))
VAE_DATA_LOADER = (
    F("num_workers", INT, "Grain worker processes per host (0: read in-process)", ge=0),
    F("read_threads", INT, "reader threads per worker", gt=0),
    F("prefetch_batches", INT, "batches prefetched per host", gt=0),
)

SEMVAE = block("model", (
    F("input_dim", INT, "feature width (DINOv2-B: 768)", gt=0),
    F("bottleneck_dim", INT, "latent channels per token", gt=0),
    F("hidden_dim", INT, "transformer width", gt=0),
    F("num_heads", INT, "attention heads", gt=0),
    F("num_blocks", INT, "transformer blocks (encoder and decoder each)", gt=0),
    F("mlp_ratio", FLOAT, "MLP width / hidden_dim", gt=0),
    F("norm_eps", FLOAT, "LayerNorm ε", gt=0),
) + MODEL_DTYPES) + block("loss", (
    F("mse_weight", FLOAT, "MSE weight", ge=0),
    F("l1_weight", FLOAT, "L1 weight", ge=0),
    F("cos_weight", FLOAT, "cosine-loss weight", ge=0),
    F("kl_weight", FLOAT, "KL weight", ge=0),
    F("cos_axis", STR, "cosine over tokens (the reference's dim=1) or channels",
      choices=("token", "channel")),
)) + block("data", (
    F("path", STR, "training feature dataset (--mode=extract)"),
    F("eval_path", STR, "evaluation feature dataset (\"\" = none)"),
) + VAE_DATA_LOADER)

TEXTURE_MODEL = block("model", (
    F("ch", INT, "base width", gt=0),
    F("ch_mult", INTS, "width multipliers per level (len - 1 downsamplings)", gt=0),
    F("num_res_blocks_enc", INT, "ResNet blocks per encoder level", gt=0),
    F("num_res_blocks_dec", INT, "ResNet blocks per decoder level", gt=0),
    F("attn_resolutions", INTS, "feature-map sides with attention", gt=0),
    F("z_channels", INT, "channels before the quant conv", gt=0),
    F("embed_dim", INT, "latent channels", gt=0),
    F("resolution", INT, "image side the architecture is named for", gt=0),
    F("in_channels", INT, "image channels in", gt=0),
    F("out_channels", INT, "image channels out", gt=0),
    F("dropout", FLOAT, "dropout in the ResNet blocks (the trainer needs 0)", ge=0, lt=1),
    F("double_z", BOOL, "the encoder outputs mean and log-variance"),
    F("num_groups", INT, "GroupNorm groups", gt=0),
    F("norm_eps", FLOAT, "GroupNorm ε", gt=0),
) + MODEL_DTYPES)

GAN_LOSS = (
    F("logvar_init", FLOAT, "ldm: the (never trained) output log-variance"),
    F("perceptual_weight", FLOAT, "ldm: LPIPS weight inside the reconstruction term (0 = "
      "no LPIPS)", ge=0),
    F("lpips", STR, "ldm: converted LPIPS folder (python -m sfd_jax.convert.lpips)"),
    F("lpips_random_init", BOOL, "tests only: random LPIPS weights"),
    F("lpips_random_width", FLOAT, "tests only: VGG widths × this (random LPIPS)", gt=0),
    F("use_gan", BOOL, "ldm: train the PatchGAN discriminator and add its loss"),
    F("disc_start", INT, "first (reference-counted) step with the adversarial terms", ge=0),
    F("disc_weight", FLOAT, "× the adaptive weight ‖∇nll‖/(‖∇g‖ + 1e-4) (≤ 1e4)", ge=0),
    F("disc_factor", FLOAT, "adversarial factor once disc_start is reached", ge=0),
    F("disc_loss", STR, "discriminator loss", choices=("hinge", "vanilla")),
    F("disc_num_layers", INT, "PatchGAN layers", gt=0),
    F("disc_ndf", INT, "PatchGAN base width", gt=0),
    F("step_counter", STR, "reference: batch b is step 2b (generator) / 2b + 1 "
      "(discriminator); batch: both b", choices=("reference", "batch")),
    F("use_vf", BOOL, "VF loss (VA-VAE): align a projection of the latent with DINOv2 "
      "features"),
    F("vf_weight", FLOAT, "VF weight (× the adaptive weight with adaptive_vf)", ge=0),
    F("adaptive_vf", BOOL, "VF weight from the gradient-norm ratio at the encoder's last "
      "layer"),
    F("distmat_margin", FLOAT, "VF distance-matrix margin", ge=0),
    F("cos_margin", FLOAT, "VF cosine margin", ge=0),
    F("distmat_weight", FLOAT, "VF distance-matrix term weight", ge=0),
    F("cos_weight", FLOAT, "VF cosine term weight", ge=0),
    F("vf_source", STR, "VF features: dinov2 (computed in the step) or features "
      "(data.vf_features)", choices=("dinov2", "features")),
    F("vf_dinov2", STR, "converted DINOv2 folder (python -m sfd_jax.convert.dinov2 "
      "--preset vitl14)"),
    F("vf_dinov2_preset", STR, "its architecture (vf_random_init: the random one)",
      choices=DINOV2_PRESETS),
    F("vf_random_init", BOOL, "tests only: random DINOv2 weights"),
    F("vf_dim", INT, "VF feature width (DINOv2-L: 1024)", gt=0),
    F("vf_image_size", INT, "DINOv2 input side (0 = 14 × the latent grid)", ge=0),
)

TEXTURE_LOSS = block("loss", (
    F("name", STR, "l1_kl (L1 + KL) or ldm (LPIPSWithDiscriminator: L1 + LPIPS, KL, "
      "PatchGAN, optional VF loss)", choices=("l1_kl", "ldm")),
    F("kl_weight", FLOAT, "KL weight", ge=0),
    F("pixel_reduction", STR, "l1_kl: per-image pixel sum (the LDM KL scale) or mean",
      choices=("sum", "mean")),
    F("extra_terms", STR, "l1_kl: comma-separated generator terms registered with "
      "training.vae.register_generator_term"),
) + GAN_LOSS)

IMAGE_SOURCE = (
    F("source", STR, "images: folder (class sub-folders) or tfds", choices=("folder", "tfds")),
    F("path", STR, "image folder of class sub-folders"),
    F("tfds_name", STR, "TFDS dataset"),
    F("tfds_split", STR, "TFDS split"),
    F("tfds_data_dir", STR, "TFDS data dir (\"\" = TFDS default)"),
    F("tfds_manual_dir", STR, "the downloaded archives, to prepare TFDS once"),
)

TEXTURE_DATA = block("data", IMAGE_SOURCE + (
    F("eval_path", STR, "evaluation image folder (\"\" = none)"),
    F("image_size", INT, "ADM centre crop side", gt=0),
    F("random_flip", BOOL, "random horizontal flips"),
    F("vf_features", STR, "pre-extracted VF features of data.path (--mode=extract with "
      "extract.recipe=vf; loss.vf_source=features)", absent="\"\""),
) + VAE_DATA_LOADER)

EVAL_TOKENIZER = block("eval_tokenizer", (
    F("checkpoint", STR, "converted texture VAE folder or texture-VAE training workdir"),
    F("weights", STR, "training workdir: params or ema", choices=("params", "ema")),
    F("step", INT, "training workdir: checkpoint step (-1 = latest)", ge=-1),
    F("images", STR, "held-out image folder (\"\" = data.eval_path)"),
    F("image_size", INT, "ADM centre crop side", gt=0),
    F("max_images", INT, "images evaluated (0 = all)", ge=0),
    F("batch_size", INT, "images per call (split over process 0's local devices)", gt=0),
    F("sample_posterior", BOOL, "encode with a posterior sample (the reference) instead of "
      "its mean"),
    F("seed", INT, "image i's posterior noise: fold_in(key(seed), i)", ge=0),
    F("features", STR, "rFID features: inception, demo or \"\" (no rFID)",
      choices=("inception", "demo", "")),
    F("inception", STR, "converted FID Inception folder"),
    F("features_path", STR, "features=demo: the demo's feature net folder"),
    F("preprocess", STR, "Inception resize", choices=("pytorch_fid", "adm")),
    F("lpips", STR, "converted LPIPS folder"),
    F("grid_images", INT, "originals over reconstructions in reconstructions.png", ge=0),
    F("read_threads", INT, "image decoding threads", gt=0),
    F("random_init", BOOL, "tests: random texture VAE (preset) and LPIPS"),
    F("texture_vae_preset", STR, "random_init: the architecture", choices=TEXTURE_VAE_PRESETS),
    F("lpips_random_width", FLOAT, "random_init: VGG widths × this", gt=0),
    F("tb_step", INT, "TensorBoard step of the metrics", ge=0, absent="0"),
))

FEATURE_NET = block("model", (
    F("image_size", INT, "image side", gt=0),
    F("widths", INTS, "conv widths per stage", gt=0),
    F("embed_dim", INT, "token width (the DINOv2 stand-in's)", gt=0),
    F("num_classes", INT, "classes of the classifier head", gt=0),
    F("spatial_channels", INT, "channels of the spatial feature map", gt=0),
) + MODEL_DTYPES) + block("loss", (
    F("max_shift", INT, "random translation of the images, in pixels", ge=0, absent="1"),
)) + block("data", IMAGE_SOURCE + (
    F("eval_path", STR, "evaluation image folder (\"\" = none)"),
    F("image_size", INT, "image side", gt=0),
    F("random_flip", BOOL, "random horizontal flips"),
) + VAE_DATA_LOADER)

# ------------------------------------------------------------------ encode / extract

ENCODE = block("data", IMAGE_SOURCE + (
    F("max_images", INT, "first N images only (0 = all)", ge=0),
)) + block("encode", (
    F("texture_vae", STR, "converted texture VAE folder (python -m sfd_jax.convert.texture_vae)"),
    F("dinov2", STR, "converted DINOv2 folder (python -m sfd_jax.convert.dinov2)"),
    F("semvae", STR, "converted SemVAE folder (python -m sfd_jax.convert.semantic_vae)"),
    F("random_init", BOOL, "random weights of the presets below (smoke tests)"),
    F("texture_vae_preset", STR, "random_init: texture VAE architecture",
      choices=TEXTURE_VAE_PRESETS),
    F("dinov2_preset", STR, "random_init: DINOv2 architecture",
      choices=DINOV2_PRESETS),
    F("semvae_preset", STR, "random_init: SemVAE architecture", choices=("ch16", "tiny")),
    F("dtype", STR, "compute dtype (the reference: float32)", choices=DTYPES),
    F("image_size", INT, "ADM centre crop side", gt=0),
    F("dino_size", INT, "DINOv2 input side (bicubic, no antialias)", gt=0),
    F("store_repa", BOOL, "store the REPA target features (~89% of the bytes)"),
    F("per_device_batch", INT, "images per device per batch", gt=0),
    F("records_per_shard", INT, "records per ArrayRecord shard", gt=0),
    F("stats_samples", INT, "unflipped records for the per-channel statistics", gt=0),
    F("stats_seed", INT, "seed of the statistics' record choice", ge=0),
)) + block("extract", (
    F("dinov2", STR, "converted DINOv2 folder"),
    F("random_init", BOOL, "random weights of dinov2_preset (smoke tests)"),
    F("dinov2_preset", STR, "random_init: DINOv2 architecture",
      choices=DINOV2_PRESETS),
    F("dtype", STR, "compute dtype", choices=DTYPES),
    F("resize", INT, "semvae: short side resize (bicubic)", gt=0),
    F("crop", INT, "semvae: centre crop side", gt=0),
    F("recipe", STR, "semvae (SemVAE training features) or vf (VA-VAE VF targets)",
      choices=("semvae", "vf")),
    F("image_size", INT, "vf: the texture-VAE trainer's ADM centre crop", gt=0),
    F("vf_size", INT, "vf: bilinear resize before DINOv2", gt=0),
    F("per_device_batch", INT, "images per device per batch", gt=0),
    F("records_per_shard", INT, "records per shard", gt=0),
)) + block("job", (
    F("decode_threads", INT, "host threads decoding images", gt=0),
    F("prefetch_batches", INT, "batches decoded ahead", gt=0),
    F("log_every_batches", INT, "batches between progress lines", gt=0),
    F("compression", STR, "ArrayRecord compression",
      choices=("uncompressed", "snappy", "zstd:1", "zstd:3", "brotli:6")),
    F("debug_stop_after_shards", INT, "testing: stop after writing this many shards (-1 = "
      "never)", ge=-1),
    F("compiler_options", MAPPING, "XLA options of the jitted steps"),
))

# ------------------------------------------------------------------ the families


@dataclasses.dataclass(frozen=True)
class Family:
  """A kind of config: its fields, its sub-configs and where its defaults are shown from.

  ``nested``: prefix → family of a section that is a whole config of another family (the
  demo's trainer configs). ``defaults``: ``(prefix, config file[:options], sub-path)``
  triples; a field's documented default is its value in the first file (at ``sub-path``)
  whose ``prefix`` it starts with and that has it.
  """
  name: str
  title: str
  modes: str
  fields: tuple[Field, ...]
  defaults: tuple[tuple[str, str, str], ...]
  nested: tuple[tuple[str, str], ...] = ()
  intro: str = ""


def _family_list() -> list[Family]:
  lock_note = ("`force_unlock`: see \"One run per workdir\" in docs/errors.md.")
  return [
      Family("sfd", "SFD: training, sampling, evaluation, export",
             "train, sample, eval, export, demo (with `demo`)",
             SFD_TOP + DIT_MODEL + OBJECTIVE + SCHEDULE
             + adamw_fields("optimizer", "the denoiser") + SFD_OPTIMIZER_EXTRA
             + LOOP + MESH + SFD_DATA
             + VALIDATION + SAMPLE + EVAL + TRAIN_EVAL + EXPORT + PLAN + DEMO,
             defaults=(("demo.clock_sweep.", "configs/demo.py:clocks=1", ""),
                       ("demo.", "configs/demo.py", ""),
                       ("", "configs/sfd_xl.py", "")),
             nested=(("demo.feature_net", "feature_net"), ("demo.texture_vae", "texture_vae"),
                     ("demo.semvae", "semvae"), ("demo.encode", "encode")),
             intro="`configs/sfd_xl.py`, `sfd_b.py`, `sfd_xxl.py` (options `recipe`, "
                   "`variant`), `tiny.py` and `demo.py` (a training config plus the "
                   "`demo` section). Defaults: `configs/sfd_xl.py` (the `demo` section: "
                   "`configs/demo.py`). " + lock_note),
      Family("semvae", "Semantic VAE training", "train_semvae",
             VAE_TOP + SEMVAE + adamw_fields("optimizer", "the SemVAE") + LOOP + MESH
             + VAE_EVAL + PLAN,
             defaults=(("", "configs/semvae_ch16.py", ""),),
             intro="`configs/semvae_ch16.py` (options `data`, `eval`). " + lock_note),
      Family("texture_vae", "Texture VAE training and tokenizer evaluation",
             "train_texture_vae, eval_tokenizer",
             VAE_TOP + TEXTURE_MODEL + TEXTURE_LOSS + adamw_fields("optimizer", "the "
             "autoencoder") + adamw_fields("disc_optimizer", "the discriminator (ldm)")
             + LOOP + MESH + TEXTURE_DATA + VAE_EVAL + EVAL_TOKENIZER + PLAN,
             defaults=(("", "configs/texture_vae_f16d32.py", ""),
                       ("", "configs/texture_vae_f16d32_ldm.py", ""),
                       ("", "configs/texture_vae_f16d32_vavae.py", "")),
             intro="`configs/texture_vae_f16d32.py` (L1 + KL), `texture_vae_f16d32_ldm.py` "
                   "and `texture_vae_f16d32_vavae.py` (the GAN recipes; docs/texture_vae.md)."
                   " Defaults: the L1 + KL config; the GAN fields from the ldm config, "
                   "`data.vf_features` from the vavae config. " + lock_note),
      Family("feature_net", "The demo's feature net", "the demo (`demo.feature_net`)",
             VAE_TOP + FEATURE_NET + adamw_fields("optimizer", "the feature net") + LOOP
             + MESH + VAE_EVAL + PLAN,
             defaults=(("", "configs/demo.py", "demo.feature_net"),),
             intro="A classifier whose tokens stand in for DINOv2 and the FID Inception in "
                   "the demo; its config is `demo.feature_net` of `configs/demo.py`."),
      Family("encode", "Encoding images and extracting features", "encode, extract",
             (F("seed", INT, "image i draws its posterior noise from "
                          "fold_in(key(seed), i)", ge=0),
                        F("force_unlock", BOOL, "take over the workdir's lock even if its "
                          "owner looks alive (docs/errors.md)"),)
             + ENCODE + PLAN,
             defaults=(("", "configs/encode_imagenet.py", ""),),
             intro="`configs/encode_imagenet.py` (options `source`, `split`, `root`, "
                   "`weights`; docs/encode.md). " + lock_note),
  ]


FAMILIES: dict[str, Family] = {f.name: f for f in _family_list()}

# ------------------------------------------------------------------ lookup


class _Index:
  """Fast lookup of a family's fields: exact paths, ``*`` patterns and section prefixes."""

  def __init__(self, fam: Family):
    self.family = fam
    self.exact = {f.path: f for f in fam.fields if "*" not in f.path}
    self.patterns = [f for f in fam.fields if "*" in f.path]
    self.nested = dict(fam.nested)
    self.sections = set()
    for f in fam.fields:
      parts = f.path.split(".")
      for i in range(1, len(parts)):
        self.sections.add(".".join(parts[:i]))
    for prefix in self.nested:
      parts = prefix.split(".")
      for i in range(1, len(parts)):
        self.sections.add(".".join(parts[:i]))

  def field(self, path: str) -> Field | None:
    if path in self.exact:
      return self.exact[path]
    parts = path.split(".")
    for f in self.patterns:
      pat = f.path.split(".")
      if len(pat) == len(parts) and all(a in ("*", b) for a, b in zip(pat, parts)):
        return f
    return None

  def is_section(self, path: str) -> bool:
    if path in self.sections:
      return True
    parts = path.split(".")
    for f in self.patterns:
      pat = f.path.split(".")[:len(parts)]
      if len(pat) == len(parts) and len(f.path.split(".")) > len(parts) and all(
          a in ("*", b) for a, b in zip(pat, parts)):
        return True
    return False

  def children(self, path: str) -> list[str]:
    """Declared names directly under section ``path`` ("" = top level)."""
    depth = 0 if not path else path.count(".") + 1
    names = set()
    for p in list(self.exact) + list(self.nested):
      if not path or p.startswith(path + "."):
        names.add(p.split(".")[depth])
    return sorted(names)


_INDEX: dict[str, _Index] = {}


def index(family: str) -> _Index:
  if family not in _INDEX:
    _INDEX[family] = _Index(FAMILIES[family])
  return _INDEX[family]


def _as_dict(config) -> dict:
  if hasattr(config, "to_dict"):
    return config.to_dict()
  if isinstance(config, Mapping):
    return {k: _as_dict(v) if isinstance(v, Mapping) or hasattr(v, "to_dict") else v
            for k, v in config.items()}
  raise ConfigError(f"a config must be a ConfigDict or a mapping, got {type(config).__name__}")


def family_of(config) -> str:
  """The family a config (ConfigDict, dict or a saved config) belongs to, by its sections:
  ``encode`` / ``extract`` / ``job`` → encode; ``objective`` or a DiT ``model.variant`` →
  sfd; a model with ``input_dim`` → semvae, ``ch`` → texture_vae, ``widths`` →
  feature_net; anything else → sfd."""
  d = config if isinstance(config, Mapping) else _as_dict(config)
  keys = set(d)
  if keys & {"encode", "extract", "job"}:
    return "encode"
  model = d.get("model") if isinstance(d.get("model"), Mapping) else {}
  if "objective" in keys or "variant" in model:
    return "sfd"
  if "input_dim" in model or "bottleneck_dim" in model:
    return "semvae"
  if "ch" in model or "ch_mult" in model:
    return "texture_vae"
  if "widths" in model:
    return "feature_net"
  loss = d.get("loss") if isinstance(d.get("loss"), Mapping) else {}
  if "cos_axis" in loss:
    return "semvae"
  if "pixel_reduction" in loss or "disc_start" in loss:
    return "texture_vae"
  if "max_shift" in loss:
    return "feature_net"
  return "sfd"


TITLES = {"sfd": "an SFD config", "semvae": "a SemVAE training config",
          "texture_vae": "a texture-VAE training config",
          "feature_net": "a feature-net training config",
          "encode": "an encode / extract config"}

# ------------------------------------------------------------------ checking


def check(config, family: str | None = None, *, prefix: str = "config") -> str:
  """Checks every field of ``config`` against the declarations of its family (``family``
  or ``family_of(config)``); returns the family. Raises ``ConfigError`` (one line: the
  field, the value, what is allowed, what the field means) for an undeclared field, a
  value of the wrong type or out of range. Fields a config leaves out are not checked
  (the code's default applies)."""
  tree = _as_dict(config)
  fam = family or family_of(tree)
  if fam not in FAMILIES:
    raise ValueError(f"unknown config family {fam!r}; known: {sorted(FAMILIES)}")
  _walk(tree, index(fam), "", prefix)
  return fam


def _walk(node: Mapping, idx: _Index, path: str, prefix: str) -> None:
  for key, value in node.items():
    sub = f"{path}.{key}" if path else str(key)
    where = f"{prefix}.{sub}"
    if sub in idx.nested:
      if not isinstance(value, Mapping):
        raise ConfigError(f"{where} must be a config section (a config of "
                          f"{TITLES[idx.nested[sub]]}), got {value!r}")
      _walk(value, index(idx.nested[sub]), "", where)
      continue
    field = idx.field(sub)
    if field is not None:
      if isinstance(value, Mapping) and field.type != MAPPING:
        raise ConfigError(f"{where} must be {field.expected()}, got a section "
                          f"({', '.join(map(str, value)) or 'empty'}); {field.meaning}")
      if not field.accepts(value):
        raise ConfigError(f"{where} must be {field.expected()}, got {value!r}"
                          + (f"; {field.meaning}" if field.meaning else ""))
      continue
    if idx.is_section(sub):
      if not isinstance(value, Mapping):
        raise ConfigError(f"{where} must be a section (with fields "
                          f"{', '.join(idx.children(sub)) or 'of its own'}), got {value!r}")
      _walk(value, idx, sub, prefix)
      continue
    known = idx.children(path)
    near = difflib.get_close_matches(str(key), known, n=1)
    parent = f"{prefix}.{path}" if path else prefix
    hint = f" (did you mean '{near[0]}'?)" if near else ""
    listed = (f"; the fields of {parent} are {', '.join(known)}" if len(known) <= 16
              else "")
    raise ConfigError(
        f"{where} is not a field of {TITLES[idx.family.name]}{hint}{listed}; remove it or "
        "correct its name (every field: docs/options.md)")


# ------------------------------------------------------------------ listing


@dataclasses.dataclass(frozen=True)
class Row:
  """One field as ``rows`` lists it."""
  path: str
  value: Any          # the config's value (or the reference default); ``MISSING`` if absent
  type: str
  allowed: str
  meaning: str
  absent: str


MISSING = type("Missing", (), {"__repr__": lambda self: "(absent)"})()


def _get(d: Mapping, path: str):
  node: Any = d
  for part in path.split("."):
    if not isinstance(node, Mapping) or part not in node:
      return MISSING
    node = node[part]
  return node


def rows(family: str, config=None) -> list[Row]:
  """Every declared field of ``family`` in declaration order, with its value in
  ``config`` (``MISSING`` where it has none or no config is given). ``*`` fields are
  listed once per key the config has (``schedule.parts.texture.start``), or once as
  declared."""
  values = _as_dict(config) if config is not None else {}
  out = []
  for f in FAMILIES[family].fields:
    paths = [f.path]
    if "*" in f.path and values:
      head = f.path.split(".*")[0]
      sec = _get(values, head)
      if isinstance(sec, Mapping) and sec:
        paths = [f.path.replace("*", str(k), 1) for k in sec]
    for p in paths:
      out.append(Row(p, _get(values, p) if values else MISSING, f.type,
                     f.allowed_text(), f.meaning, f.absent))
  for prefix, fam in FAMILIES[family].nested:
    sub = _get(values, prefix) if values else MISSING
    for r in rows(fam, sub if isinstance(sub, Mapping) else None):
      out.append(dataclasses.replace(r, path=f"{prefix}.{r.path}"))
  return out


# ------------------------------------------------------------------ docs/options.md


def load_config_file(spec: str, root: str = "."):
  """The ConfigDict of ``path[:options]`` (a config file of the repository at ``root``,
  imported by path as ``main.py --config`` does)."""
  path, _, arg = spec.partition(":")
  full = os.path.join(root, path)
  top = os.path.dirname(os.path.dirname(os.path.abspath(full)))
  if top not in sys.path:
    sys.path.insert(0, top)
  name = "_sfd_options_" + os.path.splitext(os.path.basename(path))[0]
  mod_spec = importlib.util.spec_from_file_location(name, full)
  module = importlib.util.module_from_spec(mod_spec)
  mod_spec.loader.exec_module(module)
  return module.get_config(arg or None)


def _md_value(v) -> str:
  if v is MISSING:
    return "—"
  if isinstance(v, str):
    return f"`\"{v}\"`" if v == "" else f"`{v}`"
  if isinstance(v, Mapping) and not v:
    return "`{}`"
  if isinstance(v, float):
    return f"`{v:g}`"
  return f"`{v!r}`"


def _cell(text: str) -> str:
  return text.replace("|", "\\|")


def defaults(family: str, root: str = ".") -> dict[str, Any]:
  """``{path: documented default}`` of a family, from its reference config files."""
  fam = FAMILIES[family]
  loaded = []
  for prefix, spec, sub in fam.defaults:
    d = _as_dict(load_config_file(spec, root))
    if sub:
      d = _get(d, sub)
    loaded.append((prefix, d))
  out = {}
  for f in fam.fields:
    if "*" in f.path:
      continue
    for prefix, d in loaded:
      if f.path.startswith(prefix):
        v = _get(d, f.path)
        if v is not MISSING:
          out[f.path] = v
          break
  return out


def _type_md(f: Field) -> str:
  return {MAPPING: "section", PAIRS: "pairs"}.get(f.type, f.type)


def _table(family: str, root: str) -> list[str]:
  """The family's tables, one per top-level section, each followed by its notes."""
  fam = FAMILIES[family]
  defs = defaults(family, root)
  lines: list[str] = []
  section = None
  order: dict[str, int] = {}
  for f in fam.fields:
    order.setdefault(f.path.split(".")[0] if "." in f.path else "", len(order))
  fields = sorted(fam.fields, key=lambda f: order[f.path.split(".")[0] if "." in f.path
                                                 else ""])

  def close(sec):
    if sec is not None:
      lines.extend(_notes(family, sec or "top"))
  for f in fields:
    shown = f.path in defs or f.absent or ("*" in f.path and family == "sfd")
    if not shown:
      continue       # declared for configs that do not carry it here
    top = f.path.split(".")[0] if "." in f.path else ""
    if top != section:
      close(section)
      section = top
      title = f"`config.{top}`" if top else "top level"
      lines += ["", f"### {title}", "", "| field | type | default | allowed | meaning |",
                "|---|---|---|---|---|"]
    if f.path in defs:
      default = _md_value(defs[f.path])
    else:
      default = f"({f.absent})" if f.absent else "—"
    allowed = f.allowed_text(markdown=True) if f.type != BOOL else ""
    if not allowed and f.type in (STR, MAPPING):
      allowed = "any"
    name = f.path.replace("*", "<part>")
    lines.append(f"| `{name}` | {_type_md(f)} | {_cell(default)} | {_cell(allowed)} | "
                 f"{_cell(f.meaning)} |")
  close(section)
  return lines


HEADER = """\
# Config options

<!-- Generated by `python -m sfd_jax.core.options > docs/options.md` from the declarations
in sfd_jax/core/options.py and the defaults of the configs/ files; edit those, not this
page (tests/test_options.py fails when it is stale). -->

Every field of every config family, with its type, its default (its value in the family's
reference config file), what is allowed and what it means. Override any field on the
command line: `--config.<section>.<field>=value`. A field that is not declared here, or a
value outside what is allowed, stops every mode of `main.py` before anything is built or
written, with one line naming the field, the value and what is allowed (docs/errors.md);
checks across fields (batch divisibility by the devices, checkpoints of the right kind,
...) follow right after. A default in parentheses is what the code does when a config
leaves the field out.

The families (chosen from the config's sections):
"""


def markdown(root: str = ".") -> str:
  """docs/options.md."""
  out = [HEADER]
  for fam in FAMILIES.values():
    out.append(f"- [{fam.title}](#{_anchor(fam.title)}) — modes: {fam.modes}")
  for fam in FAMILIES.values():
    out += ["", f"## {fam.title}", "", fam.intro]
    for nested_prefix, nested in fam.nested:
      out.append(f"\n`config.{nested_prefix}` is a config of the family "
                 f"[{FAMILIES[nested].title}](#{_anchor(FAMILIES[nested].title)}).")
    out += _table(fam.name, root)
  out += ["", *NOTES["converters"]]
  return "\n".join(out).rstrip() + "\n"


def _anchor(title: str) -> str:
  keep = "".join(c for c in title.lower() if c.isalnum() or c in " -_")
  return keep.replace(" ", "-")


def _notes(family: str, where: str) -> list[str]:
  text = NOTES.get(f"{family}:{where}")
  return ["", *text] if text else []


def main(argv: Sequence[str] | None = None) -> int:
  """``python -m sfd_jax.core.options [REPO] > docs/options.md``."""
  argv = list(sys.argv[1:] if argv is None else argv)
  root = argv[0] if argv else "."
  if not os.path.isdir(os.path.join(root, "configs")):
    raise ConfigError(f"{os.path.abspath(root)} has no configs/ folder: run this in the "
                      "repository (or give its path)")
  sys.stdout.write(markdown(root))
  return 0


if __name__ == "__main__":
  from sfd_jax.core import runner  # pylint: disable=import-outside-toplevel
  runner.run_cli(main, "python -m sfd_jax.core.options")
