"""Shared pieces of the SFD configs (data only; imports nothing from sfd_jax).

Every config file exposes ``get_config(arg: str | None)``; ``arg`` is a comma-separated
list of ``key=value`` options (e.g. ``configs/sfd_xl.py:recipe=80ep,variant=B``). Any field
can also be overridden on the command line: ``--config.optimizer.lr=2e-4``.
"""
import ml_collections

RECIPES = ("original", "80ep")


def parse_arg(arg, **defaults):
  """'a=1,b=x' -> dict with defaults; unknown keys are an error naming them."""
  out = dict(defaults)
  if arg:
    for item in arg.split(","):
      if not item:
        continue
      if "=" not in item:
        raise ValueError(f"config argument {item!r}: expected key=value")
      k, v = item.split("=", 1)
      if k not in defaults:
        raise ValueError(f"unknown config argument {k!r}; known: {sorted(defaults)}")
      out[k] = v
  return out


def base_config(variant: str, recipe: str = "original") -> ml_collections.ConfigDict:
  """The reference SFD recipe (SPEC §7) for a LightningDiT variant."""
  if recipe not in RECIPES:
    raise ValueError(f"unknown recipe {recipe!r}; known: {RECIPES}")
  c = ml_collections.ConfigDict()
  c.seed = 0                      # parameter init, noise/time/label-dropout stream, data order

  # --- model (sfd_jax.models.lightning_dit.DiTConfig) --------------------------------
  c.model = ml_collections.ConfigDict()
  c.model.variant = variant       # S, B, L, XL, XXL (= reference 1p0B), 1p6B
  c.model.input_size = 16         # latent grid (ImageNet 256 at f16)
  c.model.in_channels = 48        # [texture 32 | semantic 16]
  c.model.semantic_chans = 16
  c.model.num_classes = 1000
  c.model.class_dropout_prob = 0.1
  c.model.use_repa = True
  c.model.repa_depth = 2          # REPA tap after this block (from 1)
  c.model.repa_dim = 768          # DINOv2-B feature width
  c.model.dtype = "bfloat16"      # matmul compute dtype; params stay float32
  c.model.param_dtype = "float32"
  c.model.scan_blocks = True      # lax.scan over blocks (same params as unrolled)
  c.model.remat_policy = "none"   # none | full | dots | dots_no_batch | save_attn_out
  c.model.attention_impl = ""     # "" = auto, "xla", "cudnn"

  # --- objective (sfd_jax.diffusion.objective.ObjectiveConfig) ----------------------
  c.objective = ml_collections.ConfigDict()
  c.objective.delta_t = 0.3       # semantic clock lead Δt in [0, 1]; 0 = synchronous
  c.objective.semantic_weight = 2.0
  c.objective.time_sampler = "logit_normal"   # or "uniform"
  c.objective.logit_mean = 0.0
  c.objective.logit_std = 1.0
  c.objective.use_cosine_loss = True
  c.objective.use_repa = True
  c.objective.repa_mode = "cos"   # cos | mse | cos_mse
  c.objective.repa_weight = 1.0
  c.objective.repa_requires_cosine = False    # True = reference trap (REPA dropped w/o cos)

  # --- optimizer (sfd_jax.optim) ---------------------------------------------------
  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "adamw"
  c.optimizer.lr = 1e-4
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.999
  c.optimizer.eps = 1e-8
  c.optimizer.weight_decay = 0.0
  c.optimizer.grad_clip = 0.0     # 0 = no clipping (reference)
  c.optimizer.schedule = "constant"
  c.optimizer.warmup_steps = 0
  c.ema_decay = 0.9999            # EMA from a copy of the init, every step

  # --- schedule of the run -----------------------------------------------------------
  c.batch_size = 256              # global batch
  c.num_train_steps = 4_000_000   # 800 epochs of ImageNet at batch 256
  c.log_every_steps = 100
  c.checkpoint_every_steps = 10_000
  c.keep_checkpoints = 3          # most recent kept ...
  c.keep_period = 80_000          # ... plus every keep_period-th step forever (0 = none)
  c.profile_steps = 5             # steps traced by the profiler hook (0 = off)
  c.init_from = ""                # converted checkpoint dir (sfd_jax.convert.lightning_dit)
  c.debug_preempt_at_step = -1    # testing: send ourselves SIGTERM after this step
  c.debug_kill_at_step = -1       # testing: SIGKILL ourselves after this step (saves done)

  # --- data (sfd_jax.data.pipeline.build_pipeline) ---------------------------------
  c.data = ml_collections.ConfigDict()
  c.data.path = "data/imagenet256_sfd"    # dataset dir: dataset.json, shards, stats.npz
  c.data.stats = ""               # stats file (default <path>/stats.npz)
  c.data.latent_multiplier = 1.0  # SFD: 1.0 (never the 0.18215 script default)
  c.data.flip = True
  c.data.num_workers = 8          # Grain worker processes per host
  c.data.read_threads = 4
  c.data.prefetch_batches = 2
  c.data.repa_dtype = "float32"

  # --- parallelism (sfd_jax.parallel) ----------------------------------------------
  c.mesh = ml_collections.ConfigDict()
  c.mesh.data = 1
  c.mesh.fsdp = -1                # -1: all remaining devices (FSDP by default)
  c.mesh.tensor = 1
  c.sharding_rules = [            # logical axis -> mesh axis (None = replicated)
      ("layers", None), ("embed", "fsdp"), ("mlp", "tensor"), ("qkv", "tensor"),
      ("heads", "tensor"), ("adaln", "tensor"), ("repa", ("fsdp", "tensor")), ("vocab", None),
      ("freq", None), ("channels", None), ("norm", None), ("conv_h", None),
      ("conv_w", None), ("conv_in", None), ("conv_out", "fsdp"),
  ]
  c.strict_sharding = False       # True: a weight dim that does not divide is an error

  # --- sampling / evaluation (filled by the sampling issue) ---------------------------
  c.sample = ml_collections.ConfigDict()
  c.sample.checkpoint = ""        # workdir, training checkpoint dir or converted dir
  c.sample.guide_checkpoint = ""
  c.sample.method = "dopri5"      # euler | heun | dopri5 | sde
  c.sample.num_steps = 250
  c.sample.atol = 1e-6
  c.sample.rtol = 1e-3
  c.sample.timestep_shift = 0.0
  c.sample.guidance = "autoguidance"  # none | cfg | autoguidance
  c.sample.scale = 1.5
  c.sample.num_images = 50_000
  c.sample.batch_size = 64        # global; fixed index ranges -> device-count independent
  c.sample.stats = ""             # latent stats for decoding (default: data.stats / data.path)
  c.sample.seed = 0
  c.sample.texture_vae = ""       # converted texture VAE dir (decode); "" = write latents

  # --- evaluation (sfd_jax.evaluate) -------------------------------------------------
  c.eval = ml_collections.ConfigDict()
  c.eval.inception = ""           # converted FID Inception dir (python -m sfd_jax.convert.inception)
  c.eval.reference_npz = ""       # ADM reference batch, e.g. VIRTUAL_imagenet256_labeled.npz
  c.eval.preprocess = "adm"       # adm (TF-graph resize, as the ADM evaluator) | pytorch_fid
  c.eval.batch_size = 200         # images per Inception call (split over local devices)
  c.eval.grid_images = 64         # samples in the grid PNG (class order)

  # --- periodic evaluation during training (sfd_jax.train_eval) --------------------
  c.train_eval = ml_collections.ConfigDict()
  c.train_eval.every_steps = 0    # 0 = off; also runs at the last step when on
  c.train_eval.num_images = 1000  # small N: a trend, not a reportable FID
  c.train_eval.batch_size = 64    # global; a multiple of the batch-axis devices
  c.train_eval.method = "euler"
  c.train_eval.num_steps = 50
  c.train_eval.atol = 1e-6
  c.train_eval.rtol = 1e-3
  c.train_eval.timestep_shift = 0.0
  c.train_eval.guidance = "cfg"   # none | cfg (autoguidance needs a second model)
  c.train_eval.scale = 1.5
  c.train_eval.seed = 0
  c.train_eval.grid_images = 64
  c.train_eval.features = ""      # "" (grid only) | inception | demo
  c.train_eval.features_path = "" # converted network directory
  c.train_eval.preprocess = "adm" # inception resize mode (see c.eval.preprocess)
  c.train_eval.feature_batch_size = 200
  c.train_eval.reference = ""     # ADM-format .npz: images arr_0 and/or mu/sigma

  # --- export (sfd_jax.export; --mode=export) ---------------------------------------
  c.export = ml_collections.ConfigDict()
  c.export.step = -1              # training step to export (-1 = latest)
  c.export.weights = "ema"        # ema | params (raw weights)
  c.export.dtype = "float32"      # stored dtype: float32 | bfloat16 | float16
  c.export.formats = "orbax,safetensors"  # subset of orbax, safetensors, npz
  c.export.dst = ""               # "" = <workdir>/export/<step>-<weights>-<dtype>
  c.export.overwrite = False      # replace an earlier export in dst

  if recipe == "80ep":            # later release: configs/sfd/lightningdit_xl/train_80ep_lr2e-4
    c.optimizer.lr = 2e-4
    c.optimizer.b2 = 0.95
    c.objective.repa_mode = "cos_mse"
    c.objective.repa_weight = 0.5
    c.num_train_steps = 400_000
  return c
