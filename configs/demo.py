"""The embedded demo: SFD end to end on scikit-learn's handwritten digits, on one CPU.

  python main.py --config=configs/demo.py --mode=demo --workdir=runs/demo   (or: make demo)
  --config=configs/demo.py:fast=1     the seconds-long variant the test suite runs
  --config=configs/demo.py:clocks=1   the clock-schedule sweep (make demo-clocks): synchronous,
                                      SFD Δt 0.3, a rate clock and a learned clock × 3 seeds

Images: the 1,797 8×8 digits (17 grey levels) upsampled to 16×16 RGB; every 6th image
is held out. Networks (all trained by the demo, nothing downloaded):
  feature net (stand-in for DINOv2 and for the FID Inception) → 4×4 tokens of width 64;
  texture VAE f4 → 4×4×4 texture latent; Semantic VAE 64 → 4 channels per token;
  composite latent 4×4×8 = [texture 4 | semantic 4];
  LightningDiT width 64, depth 4, patch 1, REPA on the feature tokens after block 2,
  trained with Δt = 0.3 (SFD) and Δt = 0 (synchronous baseline) for the same steps.
The whole file is also a valid training config: the demo fills the data/VAE paths from
its workdir, so ``--mode=train|sample|eval`` work on the demo's stages afterwards.
"""
import ml_collections

from configs import common


def get_config(arg=None):
  opts = common.parse_arg(arg, fast="0", clocks="0", seeds="3")
  fast = opts["fast"] not in ("0", "", "false", "False")
  clocks = opts["clocks"] not in ("0", "", "false", "False")

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
  d.feature_net = ml_collections.ConfigDict(dict(
      steps=200, batch_size=64, lr=2e-3, widths=(32, 64, 64), embed_dim=64))
  d.texture_vae = ml_collections.ConfigDict(dict(
      steps=300, batch_size=32, lr=2e-3, ch=16, ch_mult=(1, 2, 2), z_channels=4,
      kl_weight=1e-6))
  d.semvae = ml_collections.ConfigDict(dict(
      steps=300, batch_size=64, lr=1e-3, bottleneck_dim=4, hidden_dim=64, num_heads=4,
      num_blocks=2, kl_weight=1e-6))

  if fast:                            # the test suite's variant: every stage, tiny budgets
    d.feature_net.update(steps=20, batch_size=32)
    d.texture_vae.update(steps=12, batch_size=8)
    d.semvae.update(steps=12, batch_size=16)
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
  return c


def clock_sweep(num_seeds: int) -> ml_collections.ConfigDict:
  """The schedules of ``make demo-clocks``; each trained and sampled with seeds
  0..num_seeds-1 (``config.seed`` and ``config.sample.seed``). A schedule is either
  today's fields (``delta_t``) or a ``config.schedule`` section (docs/clocks.md)."""
  s = ml_collections.ConfigDict()
  s.seeds = tuple(range(num_seeds))
  s.order = ("sync", "sfd", "rate", "learned")
  s.schedules = ml_collections.ConfigDict(dict(
      sync=dict(delta_t=0.0),                      # synchronous, one timestep embedder
      sfd=dict(delta_t=0.3),                       # SFD: semantic 0.3 ahead
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
