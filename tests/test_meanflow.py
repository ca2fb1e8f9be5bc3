"""Average-velocity (MeanFlow) training and sampling over the multi-clock path.

* the JVP target equals V − (τ − ρ)·dU/dτ with dU/dτ from central finite differences along
  the path, per part, for offset (SFD), rate and learned clocks;
* at ρ = τ the objective is the flow-matching loss bit for bit (compiled separately);
* a flow-matching LightningDiT's weights load into the average-velocity model as the same
  function (the interval embedders start at zero);
* the few-step sampler: parts move only while their clock does, and with the kinks on the
  grid a flow-matching model's jumps are the one-sided Euler steps.
"""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sfd_jax.diffusion import clocks as C
from sfd_jax.diffusion import guidance
from sfd_jax.diffusion import objective as obj
from sfd_jax.diffusion import samplers as S
from sfd_jax.models.lightning_dit import DiTConfig, LightningDiT


def _model(schedule: C.Schedule, *, interval=True, seed=0, randomize=0.15, **kw):
  """A tiny LightningDiT for ``schedule`` whose every weight is random (the zero-initialised
  output layers too, so every input moves the output)."""
  cfg = DiTConfig(input_size=4, hidden_size=48, depth=2, num_heads=2, num_classes=10,
                  in_channels=schedule.channels, semantic_chans=schedule.parts[-1].channels,
                  interval_embedding=interval,
                  time_parts=() if schedule.num_parts == 2 else schedule.names, **kw)
  model = LightningDiT(cfg, rngs=nnx.Rngs(seed))
  if randomize:
    state = nnx.state(model, nnx.Param)
    rng = np.random.default_rng(seed)
    pure = jax.tree.map(lambda a: jnp.asarray(a + randomize * rng.normal(size=a.shape),
                                              a.dtype), nnx.to_pure_dict(state))
    nnx.replace_by_pure_dict(state, pure)
    nnx.update(model, state)
  return model


SFD = C.sfd_schedule(0.3, 4, 12, 2.0)
RATE = C.Schedule((C.Part("texture", 8, C.Clock("rate", start=0.2, rate=1.25)),
                   C.Part("semantic", 4, C.Clock("rate", start=0.0, rate=2.0))), total=1.0)
LEARNED = C.Schedule((C.Part("texture", 8, C.Clock("offset", start=0.3)),
                      C.Part("semantic", 4, C.Clock("learned", start=0.0, rate=1.0, bins=4))),
                     total=1.3)
PHI = {"semantic": jnp.asarray([0.5, -0.3, 0.2, 0.1], jnp.float32)}

# (τ, ρ) pairs away from every kink (so the finite differences do not straddle one): both
# parts moving, a part that starts inside the jump, one that finishes inside it, one that
# is already done, one that has not started by ρ.
CASES = {
    "sfd": (SFD, None, [0.1, 0.1, 0.5, 0.2, 0.95, 1.1, 0.6],
            [0.25, 0.9, 0.8, 1.25, 1.2, 1.28, 1.05]),
    "rate": (RATE, None, [0.1, 0.3, 0.45, 0.6], [0.4, 0.8, 0.9, 0.95]),
    "learned": (LEARNED, PHI, [0.1, 0.4, 0.6, 0.35], [0.45, 0.7, 1.2, 0.9]),
}
FD_EPS = 2e-3
FD_TOL = 1e-3   # of the part's largest |U| per example; float32 central differences


@pytest.mark.parametrize("case", sorted(CASES))
def test_jvp_target_is_the_meanflow_identity(case):
  sch, phi, taus, rhos = CASES[case]
  model = _model(sch, use_repa=False)
  cfg = obj.ObjectiveConfig(semantic_chans=sch.parts[-1].channels, name="meanflow",
                            schedule=sch, use_repa=False)
  n, total = len(taus), sch.total
  x1 = jax.random.normal(jax.random.key(1), (n, 4, 4, sch.channels))
  x0 = jax.random.normal(jax.random.key(2), x1.shape)
  y = jnp.arange(n) % 10
  t = jnp.asarray(taus, jnp.float32) / total
  r = jnp.asarray(rhos, jnp.float32) / total

  def apply_fn(x, a, b, y, key, interval=None):
    return model(x, a, b, y, interval=interval), None

  _, metrics = obj.meanflow_losses(apply_fn, x1, y, jax.random.key(0), cfg, x0=x0, t=t, r=r,
                                   clock_params=phi)
  target = metrics["per_example"]["target"]
  tau, rho = t * total, r * total
  end = sch.times(rho, phi)

  def average_velocity(s):
    """U(x(s), s, ρ) per channel: s_k(s, ρ)·w_k on the path through x0, x1."""
    now = sch.times(s, phi)
    xs, _ = obj.interpolate_parts(x0, x1, now, sch)
    w = model(xs, *C.split_times(now), y, interval=tuple(e - a for e, a in zip(end, now)))
    rate = sch.per_channel([(e - a) / (rho - s) for e, a in zip(end, now)])
    return rate[:, None, None, :] * w

  d_u = (average_velocity(tau + FD_EPS) - average_velocity(tau - FD_EPS)) / (2 * FD_EPS)
  now = sch.times(tau, phi)
  rates = sch.per_channel(sch.rates(tau, phi))[:, None, None, :]
  expected = rates * (x1 - x0) - (tau - rho)[:, None, None, None] * d_u    # V − (τ−ρ)·dU/dτ
  avg_rate = sch.per_channel([(e - a) / (rho - tau) for e, a in zip(end, now)])
  got = avg_rate[:, None, None, :] * target                                # U-space target
  checked = 0
  for part in sch.parts:
    sl = sch.channel_slice(part.name)
    a, b = np.asarray(got[..., sl]), np.asarray(expected[..., sl])
    scale = np.abs(b).max(axis=(1, 2, 3))
    err = np.abs(a - b).max(axis=(1, 2, 3))
    assert np.all(err <= FD_TOL * np.maximum(scale, 1e-6)), (part.name, err, scale)
    checked += int(np.sum(scale > 0.5))
  assert checked >= n          # most (example, part) pairs carry a non-trivial target


def _apply_of(model):
  def apply_fn(x, a, b, y, key, interval=None):
    kw = {} if interval is None else {"interval": interval}
    return model(x, a, b, y, label_drop_key=key, return_repa=True, **kw)
  return apply_fn


@pytest.mark.parametrize("delta_t", [0.3, 0.0])
def test_equal_times_is_flow_matching_bit_for_bit(delta_t):
  sch = C.sfd_schedule(delta_t, 4, 12, 2.0)
  mf_model = _model(sch, randomize=0.0, repa_dim=8, repa_projector_dim=16, delta_t=delta_t)
  fm_model = _model(sch, interval=False, randomize=0.0, repa_dim=8, repa_projector_dim=16,
                    delta_t=delta_t)
  fm_cfg = obj.ObjectiveConfig(delta_t=delta_t, semantic_chans=4)
  mf_cfg = obj.ObjectiveConfig(delta_t=delta_t, semantic_chans=4, name="meanflow",
                               meanflow={"equal_fraction": 1.0})
  x1 = jax.random.normal(jax.random.key(1), (8, 4, 4, 12))
  y = jnp.arange(8) % 10
  repa = jax.random.normal(jax.random.key(2), (8, 16, 8))
  for seed in range(2):
    key = jax.random.key(seed)
    fm = jax.jit(lambda k: obj.training_losses(_apply_of(fm_model), x1, y, k, fm_cfg,
                                               repa_target=repa))(key)
    mf = jax.jit(lambda k: obj.meanflow_losses(_apply_of(mf_model), x1, y, k, mf_cfg,
                                               repa_target=repa))(key)
    assert np.asarray(mf[0]).tobytes() == np.asarray(fm[0]).tobytes()
    for name in ("loss_mse", "loss_cos", "loss_repa"):
      assert np.asarray(mf[1][name]).tobytes() == np.asarray(fm[1][name]).tobytes(), name
    for name in ("mse", "cos", "repa", "pred", "xt", "t"):
      np.testing.assert_array_equal(mf[1]["per_example"][name], fm[1]["per_example"][name])
    np.testing.assert_array_equal(mf[1]["per_example"]["target"], fm[1]["per_example"]["ut"])


def test_time_pairs():
  cfg = obj.ObjectiveConfig(name="meanflow", meanflow={"equal_fraction": 0.75})
  key = jax.random.key(0)
  t, r = obj.sample_time_pairs(key, 4096, cfg)
  assert np.all(np.asarray(t) <= np.asarray(r))
  equal = np.asarray(t) == np.asarray(r)
  assert abs(equal.mean() - 0.75) < 0.03
  # the ρ = τ examples draw exactly flow matching's times
  np.testing.assert_array_equal(np.asarray(t)[equal],
                                np.asarray(obj.sample_times(key, 4096, cfg))[equal])
  with pytest.raises(ValueError, match="equal_fraction"):
    obj.ObjectiveConfig(name="meanflow", meanflow={"equal_fraction": 1.5})
  with pytest.raises(ValueError, match="name"):
    obj.ObjectiveConfig(name="consistency")


def test_flow_matching_weights_load_as_the_same_function():
  """Parameters of a flow-matching model + the interval embedders' initial values: the
  average-velocity model equals the flow-matching one for every interval."""
  fm = _model(SFD, interval=False, seed=3)
  mf = _model(SFD, interval=True, seed=4, randomize=0.0)
  mf_state = nnx.state(mf, nnx.Param)
  pure = nnx.to_pure_dict(mf_state)
  fm_pure = nnx.to_pure_dict(nnx.state(fm, nnx.Param))
  assert set(pure) - set(fm_pure) == {"r_embedder_sem", "r_embedder_tex"}
  for name in ("r_embedder_sem", "r_embedder_tex"):
    assert not np.any(pure[name]["mlp_2"]["kernel"]) and not np.any(pure[name]["mlp_2"]["bias"])
    assert np.any(pure[name]["mlp_0"]["kernel"])        # the first layer can learn at once
  pure.update(fm_pure)
  nnx.replace_by_pure_dict(mf_state, pure)
  nnx.update(mf, mf_state)
  x = jax.random.normal(jax.random.key(0), (3, 4, 4, 12))
  t_tex, t_sem = jnp.asarray([0.0, 0.4, 0.9]), jnp.asarray([0.3, 0.7, 1.0])
  y = jnp.asarray([1, 2, 10])
  want = fm(x, t_tex, t_sem, y)
  for gaps in ((0.0, 0.0), (jnp.asarray([0.5, 0.2, 0.1]), jnp.asarray([0.7, 0.3, 0.0]))):
    np.testing.assert_array_equal(mf(x, t_tex, t_sem, y, interval=gaps), want)
  with pytest.raises(ValueError, match="no interval embedding"):
    fm(x, t_tex, t_sem, y, interval=(0.1, 0.1))


def test_sampler_moves_parts_with_their_clocks():
  """One jump per interval; a part whose clock does not move stays bit for bit."""
  model = _model(SFD, seed=1)
  fn = guidance.make_guided_average_velocity(model)
  z = jax.random.normal(jax.random.key(0), (2, 4, 4, 12))
  y = jnp.asarray([1, 2])
  grid = np.asarray([0.0, 0.2, 1.0, 1.3], np.float32)
  out = S.meanflow(fn, z, y, grid=grid, schedule=SFD, return_trajectory=True)
  traj = np.asarray(out[1])
  assert out[2] == 3 and traj.shape == (4, 2, 4, 4, 12)
  tex, sem = slice(0, 8), slice(8, 12)
  np.testing.assert_array_equal(traj[1][..., tex], traj[0][..., tex])   # τ < Δt: texture waits
  assert not np.allclose(traj[1][..., sem], traj[0][..., sem])
  np.testing.assert_array_equal(traj[3][..., sem], traj[2][..., sem])   # τ > 1: semantic done
  assert not np.allclose(traj[3][..., tex], traj[2][..., tex])
  res = S.sample(fn, z, y, method="meanflow", num_steps=1, schedule=SFD)
  assert int(res.nfe) == 1 and res.x.shape == z.shape and np.all(np.isfinite(res.x))


def test_flow_matching_model_jumps_are_one_sided_euler_on_a_kink_grid():
  """With interval embedders at zero, w is the flow-matching velocity at τ_i, so on a grid
  holding the kinks every jump is an Euler step with the rates of the piece it starts."""
  model = _model(SFD, seed=2)
  state = nnx.state(model, nnx.Param)
  pure = nnx.to_pure_dict(state)
  for name in ("r_embedder_sem", "r_embedder_tex"):
    pure[name]["mlp_2"] = jax.tree.map(jnp.zeros_like, pure[name]["mlp_2"])
  nnx.replace_by_pure_dict(state, pure)
  nnx.update(model, state)
  z = jax.random.normal(jax.random.key(0), (2, 4, 4, 12))
  y = jnp.asarray([3, 4])
  mf = S.sample(guidance.make_guided_average_velocity(model, mode="cfg", scale=2.0), z, y,
                method="meanflow", num_steps=6, schedule=SFD, grid_kinks=True)
  eu = S.sample(guidance.make_guided_velocity(model, mode="cfg", scale=2.0), z, y,
                method="euler", num_steps=7, schedule=SFD, grid_kinks=True)
  assert int(mf.nfe) == int(eu.nfe) == 8
  np.testing.assert_allclose(mf.x, eu.x, rtol=1e-5, atol=1e-5)
