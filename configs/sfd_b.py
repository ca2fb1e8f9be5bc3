"""SFD with LightningDiT-B/1 on ImageNet 256 (reference recipe, SPEC §7).

Options (--config=configs/sfd_b.py:recipe=80ep,variant=XL):
  recipe: original (lr 1e-4, β2 0.999, REPA cos 1.0) | 80ep (lr 2e-4, β2 0.95, REPA cos_mse 0.5)
  variant: override the model size (S, B, L, XL, XXL, 1p6B)
"""
from configs import common


def get_config(arg=None):
  opts = common.parse_arg(arg, recipe="original", variant="B")
  c = common.base_config(opts["variant"], opts["recipe"])
  # The autoguidance guide: trained with the same recipe, used at 60k-120k steps.
  c.num_train_steps = 400_000
  c.checkpoint_every_steps = 10_000
  c.keep_period = 10_000
  return c
