"""Training / fine-tuning the texture VAE (LDM KL f16d32) (``--mode=train_texture_vae``).

  python main.py --mode=train_texture_vae \
      --config=configs/texture_vae_f16d32.py:data=/data/imagenet/train \
      --workdir=runs/texture_vae

SFD uses the released ``ldm-imagenet256-f16d32-50ep`` weights; this recipe is for
retraining or fine-tuning (``--config.init_from=<converted folder>``). It follows the
LDM autoencoder recipe (SPEC §4.3) without its LPIPS and PatchGAN terms: L1 summed per
image plus 1e-6·KL (the LDM scale), Adam lr 1e-4, β = (0.5, 0.9), global batch 256,
50 ImageNet epochs (≈ 250k steps), fp32. Images: ADM centre crop 256 (the LDM recipe
used a random crop after a short-side resize); ``data.random_flip`` adds horizontal
flips. Extra generator terms are registered with
``sfd_jax.vae_train.register_generator_term`` and listed in ``loss.extra_terms``.

Options: ``data`` (image folder of class sub-folders), ``eval`` (evaluation image folder).
"""
import ml_collections

from configs import common
from configs import semvae_ch16


def get_config(arg=None):
  opts = common.parse_arg(arg, data="data/imagenet/train", eval="")
  c = ml_collections.ConfigDict()
  semvae_ch16.add_run_fields(c, batch_size=256, num_train_steps=250_000,
                             checkpoint_every_steps=5_000, keep_period=50_000)

  # --- model (sfd_jax.models.texture_vae.TextureVAEConfig fields) ---------------------
  c.model = ml_collections.ConfigDict()
  c.model.ch = 128
  c.model.ch_mult = (1, 1, 2, 2, 4)
  c.model.num_res_blocks_enc = 2
  c.model.num_res_blocks_dec = 3
  c.model.attn_resolutions = (16,)
  c.model.z_channels = 32
  c.model.embed_dim = 32
  c.model.resolution = 256
  c.model.in_channels = 3
  c.model.out_channels = 3
  c.model.dropout = 0.0
  c.model.double_z = True
  c.model.num_groups = 32
  c.model.norm_eps = 1e-6
  c.model.dtype = "float32"       # the LDM recipe trains in fp32
  c.model.param_dtype = "float32"

  # --- loss (sfd_jax.diffusion.vae_losses.texture_vae_loss) --------------------------
  c.loss = ml_collections.ConfigDict()
  c.loss.kl_weight = 1e-6
  c.loss.pixel_reduction = "sum"  # per-image pixel sum: the scale the LDM KL weight refers to
  c.loss.extra_terms = ""         # comma-separated names registered in vae_train

  # --- optimizer: Adam = AdamW without weight decay -----------------------------------
  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "adamw"
  c.optimizer.lr = 1e-4
  c.optimizer.b1 = 0.5
  c.optimizer.b2 = 0.9
  c.optimizer.eps = 1e-8
  c.optimizer.weight_decay = 0.0
  c.optimizer.grad_clip = 0.0
  c.optimizer.schedule = "constant"
  c.optimizer.warmup_steps = 0

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
  c.eval.every_steps = 5000
  return c
