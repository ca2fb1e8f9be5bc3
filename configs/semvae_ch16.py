"""Training the Semantic VAE on DINOv2-B/14-reg patch features (``--mode=train_semvae``).

  python main.py --mode=extract --config=configs/encode_imagenet.py --workdir=/data/in1k_dino
  python main.py --mode=train_semvae --config=configs/semvae_ch16.py:data=/data/in1k_dino \
      --workdir=runs/semvae_ch16

The reference recipe (``semvae_train/ch16.yaml`` + ``train.py``, docs/method.md §3.4): transformer
VAE 768 → 16 channels per token (hidden 768, 6 heads, 4 blocks), loss MSE + token-axis
cosine + 1e-7·KL, AdamW lr 5e-5 (β 0.9/0.999, eps 1e-8, weight decay 0.01, no
clipping), linear warm-up from 0.01× over 500 steps, constant, cosine to 0.1× over the
last 199,500 of 1,000,000 steps, batch 64, bf16 compute. The reference evaluates every
2000 steps on 500 validation images (``data.eval_path``: features of the first 500
validation images, ``--mode=extract`` with ``split=val`` and ``data.max_images=500``).

Options: ``data`` (training feature dir), ``eval`` (evaluation feature dir).
"""
from configs import common


def get_config(arg=None):
  return common.semvae_config(arg)
