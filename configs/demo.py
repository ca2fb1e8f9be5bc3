"""The embedded demo: SFD end to end on scikit-learn's handwritten digits, on one CPU.

  python main.py --config=configs/demo.py --mode=demo --workdir=runs/demo   (or: make demo)
  --config=configs/demo.py:fast=1     the seconds-long variant the test suite runs
  --config=configs/demo.py:clocks=1   the clock-schedule sweep (make demo-clocks): synchronous,
                                      SFD Δt 0.3, a rate clock and a learned clock × 3 seeds
  --config=configs/demo.py:fewstep=1  few-step sampling (make demo-fewstep): flow-matching SFD
                                      at Euler NFE 1-20 against average-velocity (MeanFlow) SFD
                                      and synchronous models at 1-4 jumps × 3 seeds

Images: the 1,797 8×8 digits (17 grey levels) upsampled to 16×16 RGB; every 6th image
is held out. Networks (all trained by the demo with the trainers of the package, nothing
downloaded):
  feature net (stand-in for DINOv2 and for the FID Inception) → 4×4 tokens of width 64;
  texture VAE f4 → 4×4×4 texture latent; Semantic VAE 64 → 4 channels per token;
  composite latent 4×4×8 = [texture 4 | semantic 4];
  LightningDiT width 64, depth 4, patch 1, REPA on the feature tokens after block 2,
  trained with Δt = 0.3 (SFD) and Δt = 0 (synchronous baseline) for the same steps.
``demo.feature_net``, ``demo.texture_vae`` and ``demo.semvae`` are configs of their
trainers (``--mode=train_*``), ``demo.encode`` one of ``--mode=encode`` / ``extract``; the
demo fills in the paths. The whole file is also a valid training config: the demo fills
the data/VAE paths from its workdir, so ``--mode=train|sample|eval`` work on the demo's
stages afterwards.
"""
import ml_collections

from configs import common


def _small_run(*, steps: int, batch: int, lr: float, model: dict, loss: dict, seed: int,
               weight_decay: float = 0.0, images: bool = True) -> ml_collections.ConfigDict:
  """A config of the small-network trainer: Adam(W), warm-up then cosine to 0.1×, one
  checkpoint and one evaluation at the end, data parallel over the local devices.
  ``images``: the data are image folders (False: feature datasets)."""
  _, c = common.vae_run_fields(None, data="", batch_size=batch, num_train_steps=steps,
                               checkpoint_every_steps=steps, keep_period=0)
  c.seed = seed
  c.log_every_steps = max(1, steps // 4)
  c.keep_checkpoints = 1
  c.eval.every_steps = steps
  c.model = ml_collections.ConfigDict(dict(model, dtype="float32", param_dtype="float32"))
  c.loss = ml_collections.ConfigDict(loss)
  warmup = min(50, max(steps // 10, 1))
  c.optimizer = common.adamw(lr=lr, weight_decay=weight_decay,
                             schedule="warmup_constant_cosine", warmup_steps=warmup,
                             warmup_init_factor=0.0, total_steps=steps,
                             decay_steps=steps - warmup, final_factor=0.1)
  c.data = ml_collections.ConfigDict(dict(
      path="", eval_path="", num_workers=0, read_threads=2, prefetch_batches=2))
  if images:
    c.data.update(source="folder", image_size=16, random_flip=False)
  return c


def get_config(arg=None):
  opts = common.parse_arg(arg, fast="0", clocks="0", fewstep="0", seeds="3")
  fast, clocks, fewstep = (opts[k] not in ("0", "", "false", "False")
                           for k in ("fast", "clocks", "fewstep"))
  if clocks and fewstep:
    raise ValueError("configs/demo.py: choose one of clocks=1 and fewstep=1")

  c = common.base_config("S")
  c.model.variant = "custom"
  c.model.update(input_size=4, patch_size=1, in_channels=8, semantic_chans=4, hidden_size=64,
                 depth=4, num_heads=4, num_classes=10, repa_depth=2, repa_dim=64,
                 repa_projector_dim=256, dtype="float32", scan_blocks=False)
  c.objective.delta_t = 0.3           # the demo trains every value of demo.delta_ts
  c.optimizer.update(lr=2e-3, warmup_steps=100, schedule="constant")
  c.ema_decay = 0.99
  c.batch_size = 64
  c.num_train_steps = 800
  c.log_every_steps = 100
  c.checkpoint_every_steps = 400
  c.keep_checkpoints = 2
  c.keep_period = 0
  c.profile_steps = 0
  c.mesh.data, c.mesh.fsdp = -1, 1    # pure data parallel over the local devices
  c.data.path = ""                    # <workdir>/latents (set by the demo)
  c.data.flip = False                 # digits are not mirror-symmetric
  c.data.num_workers = 0
  c.data.read_threads = 1
  c.data.prefetch_batches = 2

  c.sample.update(method="euler", num_steps=20, guidance="cfg", scale=3.0, num_images=500,
                  batch_size=250, checkpoint="", texture_vae="")

  c.train_eval.update(every_steps=200, num_images=300, batch_size=150, method="euler",
                      num_steps=12, guidance="cfg", scale=3.0, grid_images=100,
                      features="demo", feature_batch_size=300)

  d = c.demo = ml_collections.ConfigDict()
  d.dataset = "digits"                # scikit-learn's load_digits (ships with the package)
  d.image_size = 16
  d.holdout_every = 6                 # every 6th image → held-out set (real-data FID floor)
  d.delta_ts = (0.3, 0.0)             # SFD vs the synchronous baseline, same budget
  d.samples_per_class = 50            # final sampling: 10 classes × 50
  d.grid_per_class = 10
  # the networks: configs of sfd_jax.training.vae (kinds feature_net, texture_vae, semvae)
  d.feature_net = _small_run(
      steps=200, batch=64, lr=2e-3, weight_decay=1e-4, seed=0, loss=dict(max_shift=1),
      model=dict(image_size=16, widths=(32, 64, 64), embed_dim=64, num_classes=10,
                 spatial_channels=4))
  d.texture_vae = _small_run(
      steps=300, batch=32, lr=2e-3, seed=1,
      loss=dict(name="l1_kl", kl_weight=1e-6, pixel_reduction="mean", extra_terms=""),
      model=dict(ch=16, ch_mult=(1, 2, 2), num_res_blocks_enc=1, num_res_blocks_dec=1,
                 attn_resolutions=(), z_channels=4, embed_dim=4, resolution=16,
                 num_groups=8))
  d.semvae = _small_run(
      steps=300, batch=64, lr=1e-3, seed=2, images=False,
      loss=dict(mse_weight=1.0, l1_weight=0.0, cos_weight=1.0, kl_weight=1e-6,
                cos_axis="token"),
      model=dict(input_dim=64, bottleneck_dim=4, hidden_dim=64, num_heads=4, num_blocks=2))
  # --mode=encode / extract on the digit folders, with the feature net as DINOv2
  e = d.encode = common.encode_config()
  e.seed = 3
  e.encode.update(image_size=16, dino_size=16, per_device_batch=32, records_per_shard=500,
                  stats_samples=10_000)
  e.extract.update(resize=16, crop=16, per_device_batch=32, records_per_shard=500)
  e.job.update(decode_threads=2, log_every_batches=1000)

  if fast:                            # the test suite's variant: every stage, tiny budgets
    d.feature_net.update(num_train_steps=20, batch_size=32)
    d.texture_vae.update(num_train_steps=12, batch_size=8)
    d.semvae.update(num_train_steps=12, batch_size=16)
    for net in (d.feature_net, d.texture_vae, d.semvae):
      steps = net.num_train_steps
      net.update(checkpoint_every_steps=steps, log_every_steps=steps // 4)
      net.eval.every_steps = steps
      net.optimizer.update(warmup_steps=2, total_steps=steps, decay_steps=steps - 2)
    e.encode.per_device_batch = e.extract.per_device_batch = 4
    d.samples_per_class = 4
    d.grid_per_class = 4
    c.model.update(hidden_size=64, depth=2)
    c.batch_size = 32
    c.num_train_steps = 8
    c.optimizer.warmup_steps = 0
    c.log_every_steps = 4
    c.checkpoint_every_steps = 8
    c.train_eval.update(every_steps=4, num_images=80, batch_size=40, num_steps=4,
                        grid_images=16, feature_batch_size=80)
    c.sample.update(num_steps=4, batch_size=40)
  c.sample.num_images = 10 * d.samples_per_class
  if clocks:
    d.clock_sweep = clock_sweep(int(opts["seeds"]))
  if fewstep:
    d.fewstep = fewstep_sweep(int(opts["seeds"]))
    # a lighter guidance than the default demo's: 1.5 gave the flow-matching model its
    # lowest FID at 20 NFE among 1.5 / 2 / 3 (seed 0), and every setting samples with it
    c.sample.scale = c.train_eval.scale = 1.5
  return c


def fewstep_sweep(num_seeds: int) -> ml_collections.ConfigDict:
  """The settings of ``make demo-fewstep`` (docs/fewstep.md), each trained with the demo's
  budget (the same steps × batch: the same images seen) for seeds 0..num_seeds-1 and
  sampled with CFG at every NFE of ``nfe`` ((method, NFEs); Euler's grid has NFE + 1
  points, ``meanflow`` makes NFE jumps). The average-velocity runs evaluate in training
  with 2 jumps."""
  s = ml_collections.ConfigDict()
  s.seeds = tuple(range(num_seeds))
  s.order = ("sfd", "meanflow_sfd", "meanflow_sync")
  few = dict(method="meanflow", num_steps=2)
  s.schedules = ml_collections.ConfigDict(dict(
      sfd=dict(objective=dict(delta_t=0.3)),
      meanflow_sfd=dict(objective=dict(delta_t=0.3, name="meanflow"), train_eval=few),
      meanflow_sync=dict(objective=dict(delta_t=0.0, name="meanflow"), train_eval=few)))
  s.nfe = ml_collections.ConfigDict(dict(
      sfd=("euler", (1, 2, 4, 8, 20)), meanflow_sfd=("meanflow", (1, 2, 4)),
      meanflow_sync=("meanflow", (1, 2, 4))))
  s.labels = ml_collections.ConfigDict(dict(
      sfd="flow matching, SFD Δt 0.3 (Euler)", meanflow_sfd="MeanFlow, SFD Δt 0.3",
      meanflow_sync="MeanFlow, synchronous"))
  return s


def clock_sweep(num_seeds: int) -> ml_collections.ConfigDict:
  """The schedules of ``make demo-clocks``; each trained and sampled with seeds
  0..num_seeds-1 (``config.seed`` and ``config.sample.seed``). A schedule is a set of
  sweep overrides (``sfd_jax.sweep.apply_overrides``): fields of the objective, or a
  ``config.schedule`` section (docs/clocks.md)."""
  s = ml_collections.ConfigDict()
  s.seeds = tuple(range(num_seeds))
  s.order = ("sync", "sfd", "rate", "learned")
  s.schedules = ml_collections.ConfigDict(dict(
      sync=dict(objective=dict(delta_t=0.0)),      # synchronous, one timestep embedder
      sfd=dict(objective=dict(delta_t=0.3)),       # SFD: semantic 0.3 ahead
      # semantic clock 1.5× as fast (done at τ = 2/3), texture starts at 0.3
      rate=dict(schedule=dict(total=1.3, parts=dict(
          texture=dict(channels=4, family="offset", start=0.3),
          semantic=dict(channels=4, family="rate", start=0.0, rate=1.5,
                        loss_weight=2.0)))),
      # SFD's windows, learned clocks (8 bins each) trained with the denoiser
      learned=dict(schedule=dict(total=1.3, parts=dict(
          texture=dict(channels=4, family="learned", start=0.3, bins=8),
          semantic=dict(channels=4, family="learned", start=0.0, bins=8,
                        loss_weight=2.0)))),
  ))
  return s
