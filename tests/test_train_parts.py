"""The training core's multi-part features on toy modules (no VAE, fast compiles).

A part with BatchNorm statistics (``stats_key``), a later part's loss reading an earlier
part's ``carry``, a loss setting another part's statistics (``out["state"]``), frozen
networks passed to the step (``state.freeze``), self-computed gradients
(``step.OwnGradients``) equal to autodiff, and the errors for misuse.
"""
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import sfd_jax  # noqa: F401  (package set-up)
from sfd_jax import parallel
from sfd_jax.models import discriminator as disc_lib
from sfd_jax.models import layers
from sfd_jax.training import state as state_lib
from sfd_jax.training import step as step_lib


class Gen(nnx.Module):
  def __init__(self, rngs):
    self.lin = layers.Dense(4, 4, ("embed", "mlp"), rngs=rngs)

  def __call__(self, x):
    return jnp.tanh(self.lin(x))


class Critic(nnx.Module):
  def __init__(self, rngs):
    self.lin = layers.Dense(4, 1, ("embed", None), rngs=rngs)
    self.norm = disc_lib.BatchNorm(4, rngs=rngs)

  def __call__(self, x):
    return self.lin(self.norm(x))


def _setup():
  mesh = parallel.make_mesh({"data": 1, "fsdp": 2, "tensor": 1}, jax.devices()[:2])
  parts = [state_lib.Part(build=lambda: Gen(nnx.Rngs(0)), tx=optax.sgd(0.1),
                          metrics_prefix="g"),
           state_lib.Part(build=lambda: Critic(nnx.Rngs(1)), tx=optax.sgd(0.1),
                          params_key="c_params", opt_key="c_opt", stats_key="c_stats",
                          metrics_prefix="c")]
  return state_lib.build_setup(parts, mesh, seed=0)


def _losses(setup, own_grads: bool):
  gen_ps, critic_ps = setup.parts

  def gen_loss(model, batch, key, ctx):
    del key
    shift = ctx["frozen"]["shift"](batch["x"])            # a frozen network
    params = nnx.to_pure_dict(nnx.state(model, nnx.Param))

    def f(p):
      y = gen_ps.model(p)(batch["x"]) + shift
      critic = critic_ps.model(ctx["c_params"], ctx["c_stats"])
      score = jnp.mean(critic(y))
      return jnp.mean(jnp.square(y)) - 0.1 * score, (y, nnx.to_pure_dict(
          nnx.state(critic, nnx.BatchStat)))
    (loss, (y, stats)), grads = jax.value_and_grad(f, has_aux=True)(params)
    out = {"state": {"c_stats": stats}, "carry": {"y": jax.lax.stop_gradient(y)}}
    if own_grads:
      out["grads"] = grads
    return loss, {"loss": loss}, out

  def critic_loss(model, batch, key, ctx):
    del key
    loss = jnp.mean(model(batch["x"])) - jnp.mean(model(ctx["carry"]["y"]))
    return loss, {"loss": loss}

  return {"params": step_lib.OwnGradients(gen_loss) if own_grads else gen_loss,
          "c_params": critic_loss}


class Shift(nnx.Module):
  def __init__(self, rngs):
    self.lin = layers.Dense(4, 4, ("embed", "mlp"), rngs=rngs)

  def __call__(self, x):
    return 0.1 * self.lin(x)


def test_parts_with_stats_carry_frozen_and_own_grads():
  setup = _setup()
  assert set(setup.abstract_state) == {"step", "nonfinite", "params", "opt_state", "c_params",
                                       "c_opt", "c_stats"}
  frozen = state_lib.freeze(setup, {"shift": Shift(nnx.Rngs(5))})
  batch = {"x": jax.random.normal(jax.random.key(0), (8, 4))}
  batch = jax.device_put(batch, parallel.batch_sharding(setup.mesh))
  results = []
  for own in (False, True):
    step = step_lib.make_train_step(setup, _losses(setup, own), frozen=frozen, donate=False)
    state = state_lib.create_train_state(setup)
    for _ in range(2):
      state, metrics = step(state, batch)
    results.append((jax.device_get(state), jax.device_get(metrics)))
  (s0, m0), (s1, m1) = results
  assert set(m0) >= {"g/loss", "g/grad_norm", "c/loss", "c/grad_norm"}
  # statistics: generator call (1), critic on x (2) and on the carried y (3), per step
  assert int(s0["c_stats"]["norm"]["count"]) == 6
  assert not np.allclose(s0["c_stats"]["norm"]["mean"], 0.0)
  for a, b in zip(jax.tree.leaves(s0), jax.tree.leaves(s1)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-6, atol=1e-7)


def test_misuse_is_reported():
  setup = _setup()
  with pytest.raises(ValueError, match="unknown parts"):
    step_lib.make_train_step(setup, {"nope": lambda *a: (0.0, {})})

  def bad_state(model, batch, key, ctx):
    return jnp.sum(model(batch["x"])), {}, {"state": {"params": 0}}
  step = step_lib.make_train_step(setup, {"params": bad_state}, donate=False)
  batch = jax.device_put({"x": jnp.ones((8, 4))}, parallel.batch_sharding(setup.mesh))
  with pytest.raises(ValueError, match="only statistics entries"):
    step(state_lib.create_train_state(setup), batch)

  @step_lib.OwnGradients
  def no_grads(model, batch, key, ctx):
    return jnp.sum(model(batch["x"])), {}
  step = step_lib.make_train_step(setup, {"params": no_grads}, donate=False)
  with pytest.raises(ValueError, match="no out\\['grads'\\]"):
    step(state_lib.create_train_state(setup), batch)
