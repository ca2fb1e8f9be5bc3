"""The objective through the clock schedule: SFD bit-identical to the code before it,
three parts, learned clocks (gradients, correction weights)."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sfd_jax.diffusion import clocks as C
from sfd_jax.diffusion import objective as obj


def _old_training_losses(apply_fn, x1, y, key, cfg):
  """The pre-schedule objective (velocity and cosine terms), verbatim in its ops."""
  n = x1.shape[0]
  k_noise, k_time, k_drop = jax.random.split(key, 3)
  x0 = jax.random.normal(k_noise, x1.shape, jnp.float32)
  t = obj.sample_times(k_time, n, cfg)
  t = jnp.asarray(t, jnp.float32)
  if cfg.delta_t == 0:
    t_tex, t_sem = t, t
  else:
    tau = t * jnp.float32(1.0 + cfg.delta_t)
    t_tex, t_sem = jnp.maximum(tau - jnp.float32(cfg.delta_t), 0.0), jnp.minimum(tau, 1.0)
  sem = jnp.arange(x1.shape[-1]) >= x1.shape[-1] - cfg.semantic_chans
  tt = jnp.where(sem[None], t_sem[:, None], t_tex[:, None])[:, None, None, :]
  xt, ut = tt * x1 + (1 - tt) * x0, x1 - x0
  pred, _ = apply_fn(xt, t_tex, t_sem, y, k_drop)
  pred = pred.astype(jnp.float32)
  w = jnp.where(sem, cfg.semantic_weight, 1.0)
  mse = jnp.mean(w * jnp.square(pred - ut), axis=(1, 2, 3))
  cos = jnp.mean(1.0 - obj.cosine_similarity(pred, ut, axis=-1), axis=(1, 2))
  total = jnp.mean(mse) + jnp.mean(cos)
  return total, dict(mse=mse, cos=cos, xt=xt, t_tex=t_tex, t_sem=t_sem, pred=pred)


def _apply(xt, t_a, t_b, y, key):
  times = C.join_times(t_a, t_b)
  # a nonlinear function of x and of every part's time
  s = sum((i + 1.0) * jnp.sin(3.0 * ti) for i, ti in enumerate(times))
  return jnp.tanh(xt) * (1.0 + s[:, None, None, None]) + 0.1 * y[:, None, None, None], None


@pytest.mark.parametrize("delta_t,sampler", [(0.3, "logit_normal"), (0.0, "logit_normal"),
                                             (0.5, "uniform")])
def test_sfd_through_schedule_is_bit_identical(delta_t, sampler):
  cfg = obj.ObjectiveConfig(delta_t=delta_t, semantic_chans=4, semantic_weight=2.0,
                            time_sampler=sampler, use_repa=False)
  x1 = jax.random.normal(jax.random.key(1), (16, 4, 4, 12))
  y = jnp.arange(16) % 10
  for seed in range(3):
    key = jax.random.key(seed)
    # compiled: the same outputs (the loss) from the same draws, bit for bit
    new_loss = jax.jit(lambda k: obj.training_losses(_apply, x1, y, k, cfg)[0])(key)
    old_loss = jax.jit(lambda k: _old_training_losses(_apply, x1, y, k, cfg)[0])(key)
    assert np.asarray(new_loss).tobytes() == np.asarray(old_loss).tobytes()
    # op by op: every per-example tensor
    _, m = obj.training_losses(_apply, x1, y, key, cfg)
    _, o = _old_training_losses(_apply, x1, y, key, cfg)
    pe = m["per_example"]
    for name in ("mse", "cos", "xt", "t_tex", "t_sem", "pred"):
      assert np.asarray(pe[name]).tobytes() == np.asarray(o[name]).tobytes(), name
    # an explicit SFD schedule in the config gives the same bits as the default
    cfg2 = obj.ObjectiveConfig(delta_t=0.0, semantic_chans=0, semantic_weight=0.0,
                               time_sampler=sampler, use_repa=False,
                               schedule=C.sfd_schedule(delta_t, 4, 12, 2.0))
    loss2 = jax.jit(lambda k: obj.training_losses(_apply, x1, y, k, cfg2)[0])(key)
    assert np.asarray(loss2).tobytes() == np.asarray(old_loss).tobytes()


def _three_part(learned=False):
  sem_clock = C.Clock("learned", bins=4) if learned else C.Clock("offset")
  return C.Schedule((C.Part("texture", 2, C.Clock("offset", start=0.3)),
                     C.Part("extra", 1, C.Clock("rate", start=0.0, rate=2.0),
                            loss_weight=0.5),
                     C.Part("semantic", 3, sem_clock, loss_weight=2.0)), total=1.3)


def test_three_part_paths_and_weights():
  sch = _three_part()
  cfg = obj.ObjectiveConfig(use_repa=False, use_cosine_loss=False, schedule=sch)
  x1 = jax.random.normal(jax.random.key(1), (8, 2, 2, 6))
  t = jnp.linspace(0.05, 0.95, 8)
  x0 = jax.random.normal(jax.random.key(2), x1.shape)
  seen = {}

  def apply_fn(xt, ts, none, y, key):
    assert none is None and len(ts) == 3
    seen["times"] = ts
    return jnp.zeros_like(xt), None
  _, m = obj.training_losses(apply_fn, x1, jnp.zeros(8, jnp.int32), jax.random.key(0), cfg,
                             x0=x0, t=t)
  tau = np.asarray(t, np.float64) * 1.3
  want = [np.clip(tau - 0.3, 0, 1), np.clip(2 * tau, 0, 1), np.clip(tau, 0, 1)]
  for got, w in zip(seen["times"], want):
    np.testing.assert_allclose(np.asarray(got), w, atol=1e-6)
  xt = np.asarray(m["per_example"]["xt"])
  tc = np.stack([want[0]] * 2 + [want[1]] + [want[2]] * 3, -1)[:, None, None, :]
  np.testing.assert_allclose(xt, tc * np.asarray(x1) + (1 - tc) * np.asarray(x0), atol=1e-5)
  u = np.asarray(x1 - x0)
  wts = np.array([1, 1, 0.5, 2, 2, 2])
  np.testing.assert_allclose(np.asarray(m["per_example"]["mse"]),
                             np.mean(wts * u ** 2, axis=(1, 2, 3)), rtol=1e-5)


def test_learned_clock_gets_gradients_and_correction_is_one_at_init():
  sch = _three_part(learned=True)
  cfg = obj.ObjectiveConfig(use_repa=False, schedule=sch, clock_energy_weight=0.1)
  x1 = jax.random.normal(jax.random.key(1), (32, 2, 2, 6))
  y = jnp.zeros(32, jnp.int32)
  t = jax.nn.sigmoid(jax.random.normal(jax.random.key(3), (32,)))
  corr = obj.clock_correction(sch, t, sch.training_times(t), None, cfg)
  np.testing.assert_allclose(np.asarray(corr[2]), 1.0, rtol=2e-4)

  def loss(phi):
    return obj.training_losses(_apply, x1, y, jax.random.key(0), cfg,
                               clock_params={"semantic": phi})[0]
  g = jax.grad(loss)(jnp.zeros(4))
  assert np.all(np.isfinite(np.asarray(g))) and np.abs(np.asarray(g)).max() > 0
  # the energy term alone pulls φ back to uniform
  phi = jnp.asarray([1.0, 0.0, 0.0, -1.0])
  ge = jax.grad(lambda p: sch.kinetic_energy({"semantic": p}))(phi)
  assert float(ge[0]) > 0 > float(ge[3])
  # non-uniform φ: the corrected weights keep the local-time density of the base clock
  phi = jnp.asarray([0.8, -0.3, 0.2, -0.7])
  n = 200_000
  tdraw = jax.nn.sigmoid(jax.random.normal(jax.random.key(5), (n,)))
  ts = sch.training_times(tdraw, {"semantic": phi})
  w = obj.clock_correction(sch, tdraw, ts, {"semantic": phi}, cfg)[2]
  base = sch.training_times(tdraw)[2]
  inside = (np.asarray(tdraw) * 1.3 < 1.0)
  bins = np.linspace(0, 1, 6)
  h_new, _ = np.histogram(np.asarray(ts[2])[inside], bins, weights=np.asarray(w)[inside])
  h_base, _ = np.histogram(np.asarray(base)[inside], bins)
  np.testing.assert_allclose(h_new / n, h_base / n, atol=0.01)
