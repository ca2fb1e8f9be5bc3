"""SFD with LightningDiT-XL/1 on ImageNet 256 (reference recipe, docs/method.md §7).

Options (``--config=configs/sfd_xl.py:recipe=80ep,variant=XL``): ``recipe`` (original |
80ep) and ``variant`` (model size, default XL); see ``common.sfd_config``.
"""
from configs import common


def get_config(arg=None):
  return common.sfd_config(arg, variant="XL")
