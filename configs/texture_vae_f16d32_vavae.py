"""VA-VAE f16d32: the LDM GAN recipe plus the VF loss to DINOv2 ViT-L/14
(``--mode=train_texture_vae``).

  OPTS=data=/data/imagenet/train,lpips=weights/lpips_vgg,dinov2=weights/dinov2_vitl14
  python main.py --mode=train_texture_vae \
      --config=configs/texture_vae_f16d32_vavae.py:$OPTS --workdir=runs/vavae

The reference's ``vavae/configs/f16d32_vfdinov2.yaml``: ``configs/texture_vae_f16d32_ldm.py``
plus ``use_vf: dinov2`` with ``reverse_proj`` (a 1×1 projection 32 → 1024 of the sampled
latent, trained with the autoencoder), VF weight 0.1 made adaptive against the nll at the
encoder's last layer (clamped to 1e8), distance-matrix margin 0.25, cosine margin 0.5.
The foundation features are DINOv2 ViT-L/14 patch tokens of the image resized
bilinearly to 224 (16×16 tokens = the latent grid), without ImageNet normalisation, as
the reference feeds timm's ``vit_large_patch14_dinov2.lvd142m``.

Options: ``data``, ``eval``, ``lpips``, ``dinov2`` (converted ViT-L/14: ``python -m
sfd_jax.convert.dinov2 --preset vitl14``), ``vf_features`` (pre-extracted features of
``data``, ``--mode=extract`` with ``extract.recipe=vf``: the step then runs without the
foundation model). See docs/texture_vae.md.
"""
from configs import common


def get_config(arg=None):
  return common.texture_vae_config(arg, recipe="vavae")
