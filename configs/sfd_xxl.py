"""SFD with LightningDiT-XXL/1 on ImageNet 256 (reference recipe, docs/method.md §7).

Options (``--config=configs/sfd_xxl.py:recipe=80ep,variant=XL``): ``recipe`` (original |
80ep) and ``variant`` (model size, default XXL); see ``common.sfd_config``.
"""
from configs import common


def get_config(arg=None):
  c = common.sfd_config(arg, variant="XXL")
  # 1.0B parameters: 16 GB devices need FSDP over 8 and rematerialisation.
  c.model.remat_policy = "dots_no_batch"
  return c
