"""SFD with LightningDiT-B/1 on ImageNet 256 (reference recipe, docs/method.md §7).

Options (``--config=configs/sfd_b.py:recipe=80ep,variant=XL``): ``recipe`` (original |
80ep) and ``variant`` (model size, default B); see ``common.sfd_config``.
"""
from configs import common


def get_config(arg=None):
  c = common.sfd_config(arg, variant="B")
  # The autoguidance guide: trained with the same recipe, used at 60k-120k steps.
  c.num_train_steps = 400_000
  c.checkpoint_every_steps = 10_000
  c.keep_period = 10_000
  return c
