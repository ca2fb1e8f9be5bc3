"""Tiny configs of the autoencoder jobs for tests and CPU smoke runs.

  --config=configs/tiny_vae.py:job=semvae,data=DIR        SemVAE training on features DIR
  --config=configs/tiny_vae.py:job=texture_vae,data=DIR   texture VAE on an image folder
  --config=configs/tiny_vae.py:job=texture_gan,data=DIR   the VA-VAE GAN recipe, tiny
      (random LPIPS and DINOv2; vf=none|features|dinov2, vf_features=DIR)
  --config=configs/tiny_vae.py:job=encode,data=DIR        encode / extract an image folder

Sizes of the tiny encode job (all grids 8×8, so the three networks fit together):
  image 32 px → texture VAE ``tiny`` preset (f4, 4 channels) → 8×8×4 texture latent;
  DINOv2 ``tiny`` preset (patch 14, width 64) at 112 px → 8×8 = 64 tokens of 64;
  SemVAE ``tiny`` preset with input width 64 → 8×8×8 semantic latent.
Extraction (SemVAE training features): resize 128 → centre crop 112 → 64 tokens.
Networks have random weights (``random_init``). Shards of 5 records; one image per
device per batch (8 fake CPU devices in the tests).
"""
import ml_collections

from configs import common

JOBS = ("semvae", "texture_vae", "texture_gan", "encode")
VF_SOURCES = ("dinov2", "features", "none")


def _tiny_run(c: ml_collections.ConfigDict, steps: int) -> ml_collections.ConfigDict:
  c.batch_size = 8
  c.num_train_steps = steps
  c.log_every_steps = 1
  c.checkpoint_every_steps = 4
  c.keep_period = 0
  c.data.num_workers = 0
  c.data.read_threads = 1
  c.data.prefetch_batches = 1
  c.eval.every_steps = 0
  c.compiler_options.xla_backend_optimization_level = 0  # fast CPU compiles
  return c


def get_config(arg=None):
  opts = common.parse_arg(arg, job="semvae", data="", steps="8", vf="none",
                          vf_features="")
  job = opts["job"]
  if job not in JOBS:
    raise ValueError(f"tiny_vae: job {job!r} not one of {JOBS}")
  if job == "semvae":
    c = common.semvae_config(f"data={opts['data']}")
    c.model.update(input_dim=32, bottleneck_dim=4, hidden_dim=32, num_heads=2,
                   num_blocks=1, dtype="float32")
    c.optimizer.update(lr=1e-3, warmup_steps=2, total_steps=100, decay_steps=20)
    return _tiny_run(c, int(opts["steps"]))
  if job == "texture_vae":
    c = common.texture_vae_config(f"data={opts['data']}")
    # one level (no resampling) keeps CPU compiles short; the full structure is
    # exercised by the texture VAE's own tests
    c.model.update(ch=16, ch_mult=(1,), num_res_blocks_enc=1, num_res_blocks_dec=1,
                   attn_resolutions=(), z_channels=4, embed_dim=4, resolution=16,
                   num_groups=8)
    c.loss.pixel_reduction = "mean"
    c.optimizer.lr = 1e-3
    c.data.image_size = 16
    return _tiny_run(c, int(opts["steps"]))
  if job == "texture_gan":
    if opts["vf"] not in VF_SOURCES:
      raise ValueError(f"tiny_vae: vf {opts['vf']!r} not one of {VF_SOURCES}")
    c = common.texture_vae_config(f"data={opts['data']},vf_features={opts['vf_features']}",
                                  recipe="vavae")
    # 24 px, one level (f1): the smallest images the 3-layer PatchGAN takes (1×1 logits);
    # LPIPS with VGG widths / 8; VF to 16-wide features of the 24×24 latent grid
    # (vf=features: pre-extracted; vf=dinov2: a tiny register-free DINOv2 at 336 px)
    c.model.update(ch=8, ch_mult=(1,), num_res_blocks_enc=1, num_res_blocks_dec=1,
                   attn_resolutions=(), z_channels=4, embed_dim=4, resolution=24,
                   num_groups=4)
    c.loss.update(lpips="", lpips_random_init=True, lpips_random_width=0.125, disc_start=3,
                  disc_ndf=8, vf_dinov2="", vf_random_init=True,
                  vf_dinov2_preset="tiny_noreg", vf_dim=16 if opts["vf"] == "features" else 64,
                  vf_image_size=0, use_vf=opts["vf"] != "none",
                  vf_source="features" if opts["vf"] == "features" else "dinov2")
    c.optimizer.lr = 1e-3
    c.disc_optimizer.lr = 1e-3
    c.data.image_size = 24
    return _tiny_run(c, int(opts["steps"]))
  c = common.encode_config()
  c.data.path = opts["data"]
  c.encode.update(random_init=True, texture_vae_preset="tiny", dinov2_preset="tiny",
                  semvae_preset="tiny", texture_vae="", dinov2="", semvae="",
                  image_size=32, dino_size=112, per_device_batch=1, records_per_shard=5)
  c.extract.update(random_init=True, dinov2_preset="tiny", dinov2="", resize=128,
                   crop=112, per_device_batch=1, records_per_shard=5)
  c.job.update(decode_threads=2, prefetch_batches=2, log_every_batches=1)
  c.job.compiler_options.xla_backend_optimization_level = 0  # fast CPU compiles
  return c
