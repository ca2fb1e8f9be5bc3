"""Train-step metrics: param/update norms only on logging steps, state unchanged."""
import jax
import ml_collections
import numpy as np
import pytest

import sfd_jax  # noqa: F401
from sfd_jax import parallel
from sfd_jax.diffusion.objective import ObjectiveConfig
from sfd_jax.models.lightning_dit import DiTConfig
from sfd_jax.training import state as state_lib
from sfd_jax.training import optim
from sfd_jax.training import sfd as ts

CFG = DiTConfig(input_size=4, hidden_size=32, depth=2, num_heads=2, num_classes=10,
                repa_projector_dim=32, repa_dim=16)


def _run(norms_every, total_steps=None, steps=4):
  mesh = parallel.make_mesh({"data": 1, "fsdp": 1, "tensor": 1}, jax.devices()[:1])
  opt = ml_collections.ConfigDict(dict(lr=1e-3, b1=0.9, b2=0.999, eps=1e-8, weight_decay=0.0))
  tx, sched = optim.make_optimizer(opt)
  setup = ts.build_setup(CFG, ObjectiveConfig(), mesh, tx, sched, ema_decay=0.9, seed=3)
  state = state_lib.create_train_state(setup)
  step = ts.make_train_step(setup, norms_every=norms_every, total_steps=total_steps)
  rng = np.random.RandomState(0)
  batch = {"latent": rng.randn(4, 4, 4, 48).astype(np.float32),
           "label": np.arange(4).astype(np.int32),
           "repa": rng.randn(4, 16, 16).astype(np.float32)}
  out = []
  for _ in range(steps):
    state, m = step(state, batch)
    out.append({k: float(v) for k, v in jax.device_get(m).items()})
  return jax.device_get(state), out


def test_norms_only_on_logging_steps_and_state_bit_identical():
  ref_state, ref_m = _run(1)
  state, m = _run(2, total_steps=3, steps=4)
  for a, b in zip(jax.tree.leaves(state), jax.tree.leaves(ref_state)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  for i, (got, want) in enumerate(zip(m, ref_m)):
    done = i + 1
    assert got["loss"] == want["loss"] and got["grad_norm"] == want["grad_norm"]
    for k in ("param_norm", "update_norm"):
      if done % 2 == 0 or done == 3:
        assert want[k] > 0 and got[k] == pytest.approx(want[k], rel=1e-6), (done, k)
      else:
        assert got[k] == 0.0, (done, k)


def test_norms_every_validated():
  with pytest.raises(ValueError, match="norms_every"):
    from sfd_jax.training import step as step_lib
    step_lib.make_train_step(None, lambda *a: None, norms_every=0)
