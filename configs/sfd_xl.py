"""SFD with LightningDiT-XL/1 on ImageNet 256 (reference recipe, SPEC §7).

Options (--config=configs/sfd_xl.py:recipe=80ep,variant=XL):
  recipe: original (lr 1e-4, β2 0.999, REPA cos 1.0) | 80ep (lr 2e-4, β2 0.95, REPA cos_mse 0.5)
  variant: override the model size (S, B, L, XL, XXL, 1p6B)
"""
from configs import common


def get_config(arg=None):
  opts = common.parse_arg(arg, recipe="original", variant="XL")
  c = common.base_config(opts["variant"], opts["recipe"])
  return c
