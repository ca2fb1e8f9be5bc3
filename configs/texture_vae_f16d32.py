"""Training / fine-tuning the texture VAE (LDM KL f16d32) (``--mode=train_texture_vae``).

  python main.py --mode=train_texture_vae \
      --config=configs/texture_vae_f16d32.py:data=/data/imagenet/train \
      --workdir=runs/texture_vae

SFD uses the released ``ldm-imagenet256-f16d32-50ep`` weights; this recipe is for
retraining or fine-tuning (``--config.init_from=<converted folder>``). It follows the
LDM autoencoder recipe (docs/method.md §4.3) without its LPIPS and PatchGAN terms (those are
``configs/texture_vae_f16d32_ldm.py`` and ``configs/texture_vae_f16d32_vavae.py``,
docs/texture_vae.md): L1 summed per image plus 1e-6·KL (the LDM scale), Adam lr 1e-4,
β = (0.5, 0.9), global batch 256, 50 ImageNet epochs (≈ 250k steps), fp32. Images: ADM
centre crop 256 (the LDM recipe used a random crop after a short-side resize);
``data.random_flip`` adds horizontal flips. Extra generator terms are registered with
``sfd_jax.training.vae.register_generator_term`` and listed in ``loss.extra_terms``.

Options: ``data`` (image folder of class sub-folders), ``eval`` (evaluation image folder).
"""
from configs import common


def get_config(arg=None):
  return common.texture_vae_config(arg)
