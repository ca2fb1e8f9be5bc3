"""The LDM f16d32 texture-VAE recipe with LPIPS and the PatchGAN (``--mode=train_texture_vae``).

  python main.py --mode=train_texture_vae \
      --config=configs/texture_vae_f16d32_ldm.py:data=/data/imagenet/train,lpips=weights/lpips_vgg \
      --workdir=runs/texture_vae_ldm

The reference's ``vavae/configs/f16d32_ldm.yaml`` (``LPIPSWithDiscriminator``): L1 +
LPIPS summed over pixels with the never-trained logvar 0, KL weight 1e-6, a 3-layer
PatchGAN (ndf 64, BatchNorm, hinge loss) whose adaptive weight (× 0.5) switches on at
reference step 5001 (batch 2500 for the discriminator, 2501 for the generator), Adam
lr 1e-4, β = (0.5, 0.9) for both the autoencoder and the discriminator, global batch
256, 50 ImageNet epochs (≈ 250k steps), fp32. Images: ADM centre crop 256.

Options: ``data`` (image folder of class sub-folders), ``eval`` (evaluation image
folder), ``lpips`` (converted LPIPS folder: ``python -m sfd_jax.convert.lpips``).
See docs/texture_vae.md.
"""
from configs import common


def get_config(arg=None):
  return common.texture_vae_config(arg, recipe="ldm")
