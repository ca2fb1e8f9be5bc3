"""A tiny SFD config for tests and smoke runs on CPU (8×8 latents, 2 blocks, width 64).

Options: ``delta_t`` (default 0.3), ``steps`` (default 20), ``data`` (dataset dir).
"""
from configs import common


def get_config(arg=None):
  opts = common.parse_arg(arg, delta_t="0.3", steps="20", data="")
  c = common.base_config("S")
  c.model.update(variant="custom", depth=2, hidden_size=64, num_heads=4, input_size=4,
                 repa_dim=16, repa_projector_dim=32, dtype="float32", scan_blocks=False)
  c.objective.delta_t = float(opts["delta_t"])
  c.optimizer.lr = 1e-3
  c.ema_decay = 0.99
  c.batch_size = 8
  c.num_train_steps = int(opts["steps"])
  c.log_every_steps = 5
  c.checkpoint_every_steps = 10
  c.keep_period = 0
  c.profile_steps = 0
  c.data.path = opts["data"]
  c.data.num_workers = 0
  c.data.read_threads = 1
  c.mesh.fsdp = -1
  c.sample.method = "euler"
  c.sample.num_steps = 8
  c.sample.guidance = "none"
  c.sample.num_images = 16
  c.sample.batch_size = 8
  return c
