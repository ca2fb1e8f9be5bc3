"""Shared pieces of the configs (data only: imports nothing from sfd_jax, and a config file
imports no config but this one).

Every config file exposes ``get_config(arg: str | None)``; ``arg`` is a comma-separated
list of ``key=value`` options (e.g. ``configs/sfd_xl.py:recipe=80ep,variant=B``). Any field
can also be overridden on the command line: ``--config.optimizer.lr=2e-4``.

Configs that other configs build on keep their bodies here: ``base_config`` / ``sfd_config``
(SFD training), ``semvae_config``, ``texture_vae_config`` (with its GAN recipes) and
``encode_config``; the blocks they repeat are ``adamw`` (optimizer), ``loop_fields`` (run
length, logging, checkpoints), ``sampling_fields`` (guidance, labels and solver options of
sampling sections), ``mesh_config``, ``plan_fields`` (``--mode=plan``), ``vae_run_fields``
and ``texture_gan_loss``.
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


def adamw(**fields) -> ml_collections.ConfigDict:
  """``config.optimizer`` for ``sfd_jax.training.optim``'s AdamW: the SFD defaults, ``fields``
  replacing them or adding schedule fields (in the order given)."""
  o = ml_collections.ConfigDict()
  o.name = "adamw"
  o.lr = 1e-4
  o.b1 = 0.9
  o.b2 = 0.999
  o.eps = 1e-8
  o.weight_decay = 0.0
  o.grad_clip = 0.0               # 0 = no clipping (reference)
  o.schedule = "constant"
  o.warmup_steps = 0
  o.update(fields)
  return o


def loop_fields(c: ml_collections.ConfigDict, *, batch_size: int, num_train_steps: int,
                checkpoint_every_steps: int, keep_period: int,
                profile_steps: int | None = None) -> ml_collections.ConfigDict:
  """Run length, logging, checkpoint and start fields of a training config."""
  c.batch_size = batch_size       # global batch
  c.num_train_steps = num_train_steps
  c.log_every_steps = 100
  c.checkpoint_every_steps = checkpoint_every_steps
  c.keep_checkpoints = 3          # most recent kept ...
  c.keep_period = keep_period     # ... plus every keep_period-th step forever (0 = none)
  if profile_steps is not None:
    c.profile_steps = profile_steps  # steps traced by the profiler hook (0 = off)
  c.init_from = ""                # converted weights folder (sfd_jax.convert.*) to start from
  # resume with changed model/objective/loss/optimizer-structure/batch/seed/normalisation
  # fields: "" refuses (listing them), "all" or "objective.delta_t,model.depth" allows
  c.allow_config_change = ""
  c.writer = "auto"               # auto (clu if TensorFlow is installed, else tensorboardX)
                                  # | clu | tensorboardx | log
  c.force_unlock = False          # take over the workdir's lock (docs/errors.md)
  c.wandb = ml_collections.ConfigDict(dict(enabled=False, project="sfd_jax", entity="",
                                           name="", mode="online"))  # Weights & Biases
  return c


def sampling_fields(s: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
  """The guidance / label / solver fields that ``config.sample`` and ``config.train_eval``
  share beyond method, steps, tolerances and scale (``sfd_jax.diffusion.generation.
  SamplingOptions``); the defaults change nothing (the paper's protocol)."""
  s.cfg_scale_tex = -1.0          # per-part guidance scales; -1 = scale (reference default)
  s.cfg_scale_sem = -1.0
  s.cfg_interval_start = 0.0      # guide a part only while start <= t <= end (t: 0 noise,
  s.cfg_interval_end = 1.0        #   1 data); 0 / 1 = always (released configs)
  s.cfg_interval_mode = "both"    # parts the interval gates: both | tex | sem
  s.labels = "balanced"           # balanced (i·K//N) | random | fixed | unconditional
  s.label_class = 0               # labels=fixed: the class
  s.label_seed = -1               # labels=random: hash seed (-1 = seed)
  s.jump_ts = False               # dopri5: tell the controller about τ = Δt and τ = 1
  s.max_steps = 4096              # dopri5: step limit
  s.diffusion_form = "SBDM"       # sde: SBDM | sigma | linear | constant | decreasing |
  s.diffusion_norm = 1.0          #   increasing-decreasing, and its norm
  s.last_step = "mean"            # sde: mean | euler | none
  s.last_step_size = 0.04         # sde: size of the noise-free last step
  s.sde_t_min = 0.04              # sde: no noise while a part's clock is below this
  return s


def mesh_config(data: int, fsdp: int, tensor: int = 1) -> ml_collections.ConfigDict:
  """``config.mesh``: devices per mesh axis (-1: all remaining devices)."""
  m = ml_collections.ConfigDict()
  m.data = data
  m.fsdp = fsdp
  m.tensor = tensor
  return m


def plan_fields(**fields) -> ml_collections.ConfigDict:
  """``config.plan``: ``--mode=plan`` (compile for a TPU topology without TPUs;
  ``sfd_jax.planning.plan``, docs/scale.md); ``fields`` replace defaults."""
  p = ml_collections.ConfigDict()
  p.topology = "v5p:2x2x2"        # GENERATION:AxB[xC]: v4 / v5p (3-D), v5e / v6e (2-D)
  p.num_slices = 1                # > 1: multi-slice (slices joined over DCN)
  p.programs = "auto"             # auto (what the config runs) | train,sample | vae_train | encode
  p.batch_sizes = ""              # global batches of the train step, e.g. "256,512" ("": config's)
  p.remat_policies = ""           # DiT remat policies to compile, e.g. "none,full" ("": config's)
  p.search_max_batch = True       # per policy / program: the largest global batch that fits
  p.search_compiles = 4           # compiles per search after the first
  p.search_limit = 16384          # largest global batch tried
  p.search_tolerance = 0.05       # stop when the fitting / failing batches are this close
  p.hbm_gib = 0.0                 # HBM per chip (0: what the TPU compiler makes available)
  p.guide_variant = "B"           # autoguidance: the guide's size (the paper's B/1)
  p.decoder_preset = "f16d32"     # sample.texture_vae set: the decoder's architecture
  p.feature_tokens = 256          # SemVAE: tokens per input (DINOv2 at 224 px, patch 14)
  p.attention_baseline = "xla"    # splash chosen: also compile with this one ("": no)
  p.update(fields)
  return p


def vae_run_fields(arg, *, data: str, batch_size: int, num_train_steps: int,
                   checkpoint_every_steps: int, keep_period: int, extra_options=None):
  """``(opts, config)`` of a VAE training config: its options ``data`` (default ``data``),
  ``eval`` and ``extra_options`` (name → default), and a config holding the loop,
  checkpoint, mesh and evaluation fields."""
  opts = parse_arg(arg, data=data, eval="", **(extra_options or {}))
  c = ml_collections.ConfigDict()
  c.seed = 0                      # init, noise stream fold_in(key(seed), step), data order
  loop_fields(c, batch_size=batch_size, num_train_steps=num_train_steps,
              checkpoint_every_steps=checkpoint_every_steps, keep_period=keep_period)
  c.mesh = mesh_config(data=-1, fsdp=1)  # small models: data parallel over all devices
  c.strict_sharding = False
  c.compiler_options = ml_collections.ConfigDict()  # XLA options of init / step / eval
  c.eval = ml_collections.ConfigDict()
  c.eval.every_steps = 2000       # with data.eval_path set
  c.eval.max_examples = 0         # 0 = the whole evaluation set
  c.plan = plan_fields()          # --mode=plan
  return opts, c


def sfd_config(arg, variant: str) -> ml_collections.ConfigDict:
  """``base_config`` from the options of the SFD configs (default model ``variant``):

  recipe: original (lr 1e-4, β2 0.999, REPA cos 1.0) | 80ep (lr 2e-4, β2 0.95, REPA cos_mse 0.5)
  variant: override the model size (S, B, L, XL, XXL, 1p6B)
  """
  opts = parse_arg(arg, recipe="original", variant=variant)
  return base_config(opts["variant"], opts["recipe"])


def base_config(variant: str, recipe: str = "original") -> ml_collections.ConfigDict:
  """The reference SFD recipe (docs/method.md §7) for a LightningDiT variant."""
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
  # Architecture switches of the reference (all on in SFD; off = LightningDiT's other
  # choices: LayerNorm, no QK-norm, GELU MLP, no RoPE; wo_shift: adaLN without shifts).
  c.model.use_qknorm = True
  c.model.use_swiglu = True
  c.model.use_rope = True
  c.model.use_rmsnorm = True
  c.model.wo_shift = False
  c.model.dtype = "bfloat16"      # matmul compute dtype; params stay float32
  c.model.param_dtype = "float32"
  c.model.scan_blocks = True      # lax.scan over blocks (same params as unrolled)
  c.model.remat_policy = "none"   # none | full | dots | dots_no_batch | save_attn_out
  c.model.attention_impl = ""     # "" = auto, "xla", "xla_heads", "cudnn", "splash" (TPU)

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
  # flow_matching (the paper) | meanflow: average-velocity training for 1-4 step sampling
  # (sample.method="meanflow"; docs/fewstep.md)
  c.objective.name = "flow_matching"
  c.objective.meanflow = ml_collections.ConfigDict()
  c.objective.meanflow.equal_fraction = 0.75  # share of examples with ρ = τ (flow matching)
  c.objective.meanflow.adaptive_p = 0.0       # adaptive loss weight 1/(mse + c)^p (0: off)
  c.objective.meanflow.adaptive_c = 1e-3

  c.optimizer = adamw()           # sfd_jax.training.optim
  c.optimizer.accumulate_steps = 1      # gradient accumulation over k micro-batches
  c.optimizer.skip_nonfinite = False    # NaN/Inf loss or gradient: skip the update
  c.optimizer.skip_grad_norm_above = 0.0  # > 0: skip updates with a larger grad norm
  c.ema_decay = 0.9999            # EMA from a copy of the init, every step

  # --- schedule of the run (4M steps = 800 epochs of ImageNet at batch 256) ---------
  loop_fields(c, batch_size=256, num_train_steps=4_000_000, checkpoint_every_steps=10_000,
              keep_period=80_000, profile_steps=5)
  c.init_from_mode = "exact"      # exact | shape_check (the reference's weight_init)
  c.init_from_patch_channels = -1  # shape_check: input channels copied (-1 = all; ref: 16)

  # --- validation loss on held-out latents (sfd_jax.training.validation) -----------
  c.validation = ml_collections.ConfigDict()
  c.validation.path = ""          # held-out latent dataset (training format)
  c.validation.every_steps = 0    # 0 = off; also runs at the last step when on
  c.validation.num_examples = 0   # first N records (0 = all)
  c.validation.batch_size = 64    # global; a multiple of the batch-axis devices
  c.validation.times = (0.1, 0.3, 0.5, 0.7, 0.9)  # training times t (0 noise, 1 data)
  c.validation.seed = 0           # noise of example i: fold_in(key(seed), i)
  c.validation.weights = "params"  # params (as the reference) | ema

  # --- data (sfd_jax.data.pipeline.build_pipeline) ---------------------------------
  c.data = ml_collections.ConfigDict()
  c.data.path = "data/imagenet256_sfd"    # dataset dir: dataset.json, shards, stats.npz
  c.data.stats = ""               # stats file (default <path>/stats.npz)
  c.data.latent_multiplier = 1.0  # SFD: 1.0 (never the 0.18215 script default)
  c.data.normalize = True         # per-channel mean/std; False: stored latents × multiplier
  c.data.flip = True
  c.data.num_workers = 8          # Grain worker processes per host
  c.data.read_threads = 4
  c.data.prefetch_batches = 2
  # REPA targets as fed to the device. float16 (the stored dtype) halves the per-step host
  # batch and is exact: the loss upcasts to float32, so training is bit-identical to
  # "float32" (the reference's). "bfloat16" also halves it but rounds the stored values.
  c.data.repa_dtype = "float16"

  # --- parallelism (sfd_jax.parallel) ----------------------------------------------
  c.mesh = mesh_config(data=1, fsdp=-1)   # -1: all remaining devices (FSDP by default)
  # (logical axis, mesh axis or None = replicated) pairs; empty = parallel.DEFAULT_RULES
  c.sharding_rules = ()
  c.strict_sharding = False       # True: a weight dim that does not divide is an error
  c.compiler_options = ml_collections.ConfigDict()  # XLA options of init / train step / eval

  # --- sampling / evaluation ---------------------------------------------------------
  c.sample = ml_collections.ConfigDict()
  c.sample.checkpoint = ""        # workdir, training checkpoint dir or converted dir
  c.sample.guide_checkpoint = ""
  c.sample.checkpoint_step = -1   # training workdir: step to load (-1 = latest)
  c.sample.guide_step = -1        # guide's training workdir: step (-1 = latest; e.g. 70000)
  c.sample.method = "dopri5"      # euler | heun | dopri5 | sde | meanflow (jumps; num_steps = NFE)
  c.sample.num_steps = 250
  c.sample.atol = 1e-6
  c.sample.rtol = 1e-3
  c.sample.timestep_shift = 0.0
  c.sample.guidance = "autoguidance"  # none | cfg | autoguidance
  c.sample.scale = 1.5
  c.sample.dtype = "float32"      # denoiser compute dtype: float32 | bfloat16 (weights as stored)
  c.sample.num_images = 50_000
  c.sample.batch_size = 64        # global; fixed index ranges -> device-count independent
  c.sample.stats = ""             # latent stats for decoding (default: data.stats / data.path)
  c.sample.seed = 0
  c.sample.texture_vae = ""       # converted texture VAE dir (decode); "" = write latents
  # XLA options of the sampling program; empty = defaults (on CPU: Eigen dots, core/jit.py)
  c.sample.compiler_options = ml_collections.ConfigDict()
  sampling_fields(c.sample)

  # --- evaluation (sfd_jax.jobs.evaluate) --------------------------------------------
  c.eval = ml_collections.ConfigDict()
  c.eval.inception = ""           # converted FID Inception dir (sfd_jax.convert.inception)
  c.eval.reference_npz = ""       # ADM reference batch, e.g. VIRTUAL_imagenet256_labeled.npz
  c.eval.preprocess = "adm"       # adm (TF-graph resize, as the ADM evaluator) | pytorch_fid
  c.eval.batch_size = 200         # images per Inception call (split over local devices)
  c.eval.grid_images = 64         # samples in the grid PNG (class order)
  c.eval.samples_npz = ""         # eval only: score this ADM-format .npz (no sampling)

  # --- periodic evaluation during training (sfd_jax.training.periodic_eval) --------
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
  c.train_eval.compiler_options = ml_collections.ConfigDict()  # as c.sample.compiler_options
  sampling_fields(c.train_eval)

  # --- export (sfd_jax.jobs.export; --mode=export) ----------------------------------
  c.export = ml_collections.ConfigDict()
  c.export.step = -1              # training step to export (-1 = latest)
  c.export.weights = "ema"        # ema | params (raw weights)
  c.export.dtype = "float32"      # stored dtype: float32 | bfloat16 | float16
  c.export.formats = "orbax,safetensors"  # subset of orbax, safetensors, npz
  c.export.dst = ""               # "" = <workdir>/export/<step>-<weights>-<dtype>
  c.export.overwrite = False      # replace an earlier export in dst

  # --- ahead-of-time TPU plan (--mode=plan; docs/scale.md) -------------------------
  c.plan = plan_fields()

  if recipe == "80ep":            # later release: configs/sfd/lightningdit_xl/train_80ep_lr2e-4
    c.optimizer.lr = 2e-4
    c.optimizer.b2 = 0.95
    c.objective.repa_mode = "cos_mse"
    c.objective.repa_weight = 0.5
    c.num_train_steps = 400_000
  return c


def semvae_config(arg=None) -> ml_collections.ConfigDict:
  """``configs/semvae_ch16.py``: the reference SemVAE recipe (options ``data``, ``eval``)."""
  opts, c = vae_run_fields(arg, data="data/imagenet_dino_train", batch_size=64,
                           num_train_steps=1_000_000, checkpoint_every_steps=10_000,
                           keep_period=100_000)

  # --- model (sfd_jax.models.semantic_vae.SemVAEConfig fields) ------------------------
  c.model = ml_collections.ConfigDict(dict(
      input_dim=768, bottleneck_dim=16, hidden_dim=768, num_heads=6, num_blocks=4,
      mlp_ratio=4.0, norm_eps=1e-5,
      dtype="bfloat16",           # compute (the reference trains with bf16 autocast)
      param_dtype="float32"))

  # --- loss (sfd_jax.training.vae_losses.semvae_loss) ------------------------------
  c.loss = ml_collections.ConfigDict()
  c.loss.mse_weight = 1.0
  c.loss.l1_weight = 0.0
  c.loss.cos_weight = 1.0
  c.loss.kl_weight = 1e-7
  c.loss.cos_axis = "token"       # reference: dim=1 cosine (method.md §12.14); "channel": per token

  # --- optimizer (sfd_jax.training.optim): warm-up, constant, cosine tail -----------
  c.optimizer = adamw(lr=5e-5, weight_decay=0.01, schedule="warmup_constant_cosine",
                      warmup_steps=500, warmup_init_factor=0.01, total_steps=1_000_000,
                      decay_steps=199_500, final_factor=0.1)

  # --- data: feature datasets written by --mode=extract -------------------------------
  c.data = ml_collections.ConfigDict()
  c.data.path = opts["data"]
  c.data.eval_path = opts["eval"]
  c.data.num_workers = 4          # Grain worker processes per host (0: in-process)
  c.data.read_threads = 4
  c.data.prefetch_batches = 4
  return c


TEXTURE_VAE_RECIPES = ("l1_kl", "ldm", "vavae")


def texture_vae_config(arg=None, recipe: str = "l1_kl") -> ml_collections.ConfigDict:
  """The f16d32 texture-VAE recipes (options ``data``, ``eval``; GAN recipes also
  ``lpips``; ``vavae`` also ``dinov2`` and ``vf_features``):

  l1_kl  ``configs/texture_vae_f16d32.py``: L1 + KL only (LDM scale, no LPIPS / GAN);
  ldm    ``configs/texture_vae_f16d32_ldm.py``: ``vavae/configs/f16d32_ldm.yaml``, the
         LDM ``LPIPSWithDiscriminator`` recipe (L1 + LPIPS, KL 1e-6, PatchGAN hinge
         loss with the adaptive weight × 0.5 from step 5001);
  vavae  ``configs/texture_vae_f16d32_vavae.py``: ``vavae/configs/f16d32_vfdinov2.yaml``,
         the ldm recipe + VF loss to DINOv2 ViT-L/14 (weight 0.1, adaptive, margins
         0.25 / 0.5).
  """
  if recipe not in TEXTURE_VAE_RECIPES:
    raise ValueError(f"unknown texture VAE recipe {recipe!r}; known: {TEXTURE_VAE_RECIPES}")
  extra = {}
  if recipe != "l1_kl":
    extra["lpips"] = "weights/lpips_vgg"
  if recipe == "vavae":
    extra.update(dinov2="weights/dinov2_vitl14", vf_features="")
  opts, c = vae_run_fields(arg, data="data/imagenet/train", batch_size=256,
                           num_train_steps=250_000, checkpoint_every_steps=5_000,
                           keep_period=50_000, extra_options=extra)
  c.ema_decay = 0.0               # > 0: EMA of the autoencoder (state key "ema")

  # --- model (sfd_jax.models.texture_vae.TextureVAEConfig fields) ---------------------
  c.model = ml_collections.ConfigDict(dict(
      ch=128, ch_mult=(1, 1, 2, 2, 4), num_res_blocks_enc=2, num_res_blocks_dec=3,
      attn_resolutions=(16,), z_channels=32, embed_dim=32, resolution=256, in_channels=3,
      out_channels=3, dropout=0.0, double_z=True, num_groups=32, norm_eps=1e-6,
      dtype="float32",            # the LDM recipe trains in fp32
      param_dtype="float32"))

  # --- loss (sfd_jax.training.vae_losses.texture_vae_loss) --------------------------
  c.loss = ml_collections.ConfigDict()
  c.loss.name = "l1_kl"           # l1_kl | ldm (LPIPSWithDiscriminator, see texture_gan_loss)
  c.loss.kl_weight = 1e-6
  c.loss.pixel_reduction = "sum"  # l1_kl: per-image pixel sum (the LDM KL weight's scale)
  c.loss.extra_terms = ""         # l1_kl: comma-separated names registered in training.vae

  c.optimizer = adamw(b1=0.5, b2=0.9)  # Adam = AdamW without weight decay
  if recipe != "l1_kl":
    texture_gan_loss(c.loss, recipe, lpips=opts["lpips"], dinov2=opts.get("dinov2", ""))
    c.disc_optimizer = adamw(b1=0.5, b2=0.9)  # the reference: same Adam, same lr

  # --- data: images (sfd_jax.data.images.make_source) ----------------------------------
  c.data = ml_collections.ConfigDict()
  c.data.source = "folder"        # folder | tfds
  c.data.path = opts["data"]
  c.data.eval_path = opts["eval"]
  c.data.tfds_name = "imagenet2012"
  c.data.tfds_split = "train"
  c.data.tfds_data_dir = ""
  c.data.tfds_manual_dir = ""
  c.data.image_size = 256         # ADM centre crop
  c.data.random_flip = False
  c.data.num_workers = 16         # JPEG decoding needs workers
  c.data.read_threads = 2
  c.data.prefetch_batches = 2
  if recipe == "vavae":
    c.data.vf_features = opts["vf_features"]  # pre-extracted VF features (loss.vf_source)
    if opts["vf_features"]:
      c.loss.vf_source = "features"
  c.eval.every_steps = 5000
  c.eval_tokenizer = tokenizer_eval_fields(opts["eval"], lpips=opts.get("lpips", ""))
  return c


def tokenizer_eval_fields(images: str = "", *, lpips: str = "") -> ml_collections.ConfigDict:
  """``config.eval_tokenizer``: ``--mode=eval_tokenizer`` (rFID, PSNR, SSIM, LPIPS)."""
  e = ml_collections.ConfigDict()
  e.checkpoint = ""               # converted texture VAE folder or a training workdir
  e.weights = "params"            # run: params | ema
  e.step = -1                     # run: checkpoint step (-1 = latest)
  e.images = images               # held-out image folder ("" = data.eval_path)
  e.image_size = 256              # ADM centre crop
  e.max_images = 0                # 0 = all (the reference: the 50k ImageNet val images)
  e.batch_size = 64               # images per call, split over process 0's local devices
  e.sample_posterior = True       # the reference encodes with posterior.sample()
  e.seed = 0                      # image i's posterior noise: fold_in(key(seed), i)
  e.features = "inception"        # rFID features: inception | demo | "" (no rFID)
  e.inception = ""                # python -m sfd_jax.convert.inception
  e.features_path = ""            # features=demo: the demo's feature net folder
  e.preprocess = "pytorch_fid"    # the reference runs pytorch-fid on PNG folders
  e.lpips = lpips                 # python -m sfd_jax.convert.lpips
  e.grid_images = 8               # originals over reconstructions in reconstructions.png
  e.read_threads = 8
  e.random_init = False           # tests: random texture VAE (preset) and LPIPS
  e.texture_vae_preset = "tiny"
  e.lpips_random_width = 1.0
  return e


def texture_gan_loss(loss: ml_collections.ConfigDict, recipe: str, *, lpips: str = "",
                     dinov2: str = "") -> ml_collections.ConfigDict:
  """Adds the ``LPIPSWithDiscriminator`` fields of ``recipe`` ("ldm" | "vavae") to
  ``config.loss`` (``sfd_jax.training.gan_losses.GANLossConfig`` + the frozen networks)."""
  loss.name = "ldm"               # l1_kl | ldm (sfd_jax.training.texture_gan)
  loss.kl_weight = 1e-6
  loss.logvar_init = 0.0          # the reference's logvar: never trained, stays here
  loss.perceptual_weight = 1.0    # LPIPS inside the rec term (0 = off)
  loss.lpips = lpips              # python -m sfd_jax.convert.lpips --vgg ... --lin ...
  loss.lpips_random_init = False  # tests only
  loss.lpips_random_width = 1.0   # tests only: VGG widths × this (random init)
  loss.use_gan = True
  loss.disc_start = 5001          # reference steps (see step_counter)
  loss.disc_weight = 0.5          # × the adaptive weight ‖∇nll‖/(‖∇g‖ + 1e-4), ≤ 1e4
  loss.disc_factor = 1.0
  loss.disc_loss = "hinge"        # hinge | vanilla
  loss.disc_num_layers = 3
  loss.disc_ndf = 64
  loss.step_counter = "reference"  # batch b = step 2b (generator) / 2b + 1 (discriminator)
  loss.use_vf = recipe == "vavae"
  loss.vf_weight = 0.1
  loss.adaptive_vf = True
  loss.distmat_margin = 0.25 if recipe == "vavae" else 0.0
  loss.cos_margin = 0.5 if recipe == "vavae" else 0.0
  loss.distmat_weight = 1.0
  loss.cos_weight = 1.0
  loss.vf_source = "dinov2"       # dinov2 (in the step) | features (data.vf_features)
  loss.vf_dinov2 = dinov2         # python -m sfd_jax.convert.dinov2 --preset vitl14
  loss.vf_dinov2_preset = "vitl14"
  loss.vf_random_init = False     # tests only
  loss.vf_dim = 1024
  loss.vf_image_size = 224        # DINOv2 input (16×16 patches = the f16 latent grid)
  return loss


def encode_config(arg=None) -> ml_collections.ConfigDict:
  """``configs/encode_imagenet.py``: encode / extract jobs (options ``source``, ``split``,
  ``root``, ``weights``)."""
  opts = parse_arg(arg, source="folder", split="train", root="data/imagenet",
                   weights="weights")
  if opts["split"] not in ("train", "val"):
    raise ValueError(f"split {opts['split']!r}: expected train or val")
  c = ml_collections.ConfigDict()
  c.seed = 42                     # image i draws its posterior noise from fold_in(key(seed), i)
  c.force_unlock = False          # take over the workdir's lock (docs/errors.md)

  # --- images (sfd_jax.data.images.make_source) -------------------------------------
  c.data = ml_collections.ConfigDict()
  c.data.source = opts["source"]  # folder | tfds
  c.data.path = f"{opts['root']}/{opts['split']}"
  c.data.tfds_name = "imagenet2012"
  c.data.tfds_split = "train" if opts["split"] == "train" else "validation"
  c.data.tfds_data_dir = ""       # "" = TFDS default
  c.data.tfds_manual_dir = ""     # ILSVRC2012_img_{train,val}.tar, to prepare TFDS once
  c.data.max_images = 0           # first N images only (0 = all)

  # --- latent encoding (sfd_jax.jobs.encode) --------------------------------------
  w = opts["weights"]
  c.encode = ml_collections.ConfigDict()
  c.encode.texture_vae = f"{w}/texture_vae_f16d32"   # python -m sfd_jax.convert.texture_vae
  c.encode.dinov2 = f"{w}/dinov2_vitb14_reg"         # python -m sfd_jax.convert.dinov2
  c.encode.semvae = f"{w}/semvae_ch16"               # python -m sfd_jax.convert.semantic_vae
  c.encode.random_init = False    # True: random weights of the presets below (smoke tests)
  c.encode.texture_vae_preset = "f16d32"
  c.encode.dinov2_preset = "vitb14_reg"
  c.encode.semvae_preset = "ch16"
  c.encode.dtype = "float32"      # the reference extracts in float32
  c.encode.image_size = 256       # ADM centre crop
  c.encode.dino_size = 224        # DINOv2 input (bicubic 256 -> 224, no antialias)
  c.encode.store_repa = True      # REPA target features (~89% of the bytes)
  c.encode.per_device_batch = 32
  c.encode.records_per_shard = 1000
  c.encode.stats_samples = 10_000  # unflipped records for the per-channel stats
  c.encode.stats_seed = 0

  # --- SemVAE training features (sfd_jax.jobs.extract) ----------------------------
  c.extract = ml_collections.ConfigDict()
  c.extract.dinov2 = c.encode.dinov2
  c.extract.random_init = False
  c.extract.dinov2_preset = "vitb14_reg"
  c.extract.dtype = "float32"
  c.extract.resize = 256          # torchvision Resize(256, bicubic) on the short side
  c.extract.crop = 224            # CenterCrop(224)
  c.extract.recipe = "semvae"     # semvae | vf (VA-VAE VF targets: ADM crop, bilinear, ViT-L/14)
  c.extract.image_size = 256      # vf: the texture-VAE trainer's ADM centre crop
  c.extract.vf_size = 224         # vf: bilinear resize before DINOv2 (16×16 patches)
  c.extract.per_device_batch = 64
  c.extract.records_per_shard = 5000

  # --- shared job settings (sfd_jax.data.images.run_sharded_job) ------------------
  c.job = ml_collections.ConfigDict()
  c.job.decode_threads = 16       # host threads decoding images
  c.job.prefetch_batches = 4
  c.job.log_every_batches = 50    # no terminal: a progress line every 50 batches (0: every 10 %)
  c.job.compression = "uncompressed"
  c.job.debug_stop_after_shards = -1   # testing: stop after writing this many shards
  c.job.compiler_options = ml_collections.ConfigDict()  # XLA options of the jitted steps
  c.plan = plan_fields()          # --mode=plan (the encode program on one host's chips)
  return c
