"""Guidance per clock part: scales and interval gates from each part's own clock."""
import jax
import jax.numpy as jnp
import numpy as np

from sfd_jax.diffusion import clocks as C
from sfd_jax.diffusion import guidance as G

SCHED = C.Schedule((C.Part("texture", 2, C.Clock("offset", start=0.3)),
                    C.Part("extra", 1, C.Clock("rate", rate=2.0), guidance_scale=1.0),
                    C.Part("semantic", 2, C.Clock("offset"), guidance_scale=4.0)), 1.3)


def model(x, times, none, y):
  assert none is None and len(times) == 3
  s = sum(t[:, None, None, None] * (i + 1) for i, t in enumerate(times))
  return x * 0.5 + s + (y[:, None, None, None] == 10) * 1.0   # null label shifts by 1


def test_cfg_per_part_scales_and_gates():
  x = jax.random.normal(jax.random.key(0), (3, 2, 2, 5))
  y = jnp.array([1, 2, 3])
  times = (jnp.full((3,), 0.1), jnp.full((3,), 0.6), jnp.full((3,), 0.4))
  fn = G.make_guided_velocity(model, mode="cfg", scale=3.0, null_label=10, schedule=SCHED)
  v = np.asarray(fn(x, times, None, y))
  cond = np.asarray(model(x, times, None, y))
  # v = u + s·(c − u) = c + 1 − s (u = c + 1): texture s=3 (the sampler's), extra 1,
  # semantic 4
  np.testing.assert_allclose(v - cond, np.broadcast_to(1 - np.array([3, 3, 1, 4, 4.0]),
                                                       v.shape), atol=1e-6)
  # gates: parts whose own clock is below 0.5 use the conditional velocity
  fn = G.make_guided_velocity(model, mode="cfg", scale=3.0, null_label=10, schedule=SCHED,
                              interval_start=0.5)
  v = np.asarray(fn(x, times, None, y))
  gated = np.array([True, True, False, True, True])      # t = 0.1, 0.6, 0.4 per part
  np.testing.assert_allclose(v[..., gated], cond[..., gated], atol=1e-6)
  np.testing.assert_allclose(v[..., 2], cond[..., 2], atol=1e-6)   # extra: scale 1 anyway
  fn = G.make_guided_velocity(model, mode="cfg", scale=3.0, null_label=10, schedule=SCHED,
                              interval_start=0.5, interval_parts=("semantic",))
  v = np.asarray(fn(x, times, None, y))
  np.testing.assert_allclose(v[..., 3:], cond[..., 3:], atol=1e-6)
  np.testing.assert_allclose(v[..., :2] - cond[..., :2], -2.0, atol=1e-6)


def test_two_part_schedule_is_todays_guidance():
  def m2(x, t_tex, t_sem, y):
    return x * t_tex[:, None, None, None] + t_sem[:, None, None, None] + (y == 10)[
        :, None, None, None] * 0.3
  x = jax.random.normal(jax.random.key(1), (2, 2, 2, 6))
  y = jnp.array([0, 4])
  sch = C.sfd_schedule(0.3, 2, 6)
  for kw in (dict(), dict(interval_start=0.5, interval_mode="tex")):
    a = G.make_guided_velocity(m2, mode="cfg", scale=2.5, null_label=10, semantic_chans=2,
                               **kw)
    b = G.make_guided_velocity(m2, mode="cfg", scale=2.5, null_label=10, schedule=sch, **kw)
    t1, t2 = jnp.full((2,), 0.2), jnp.full((2,), 0.7)
    assert np.asarray(a(x, t1, t2, y)).tobytes() == np.asarray(b(x, t1, t2, y)).tobytes()
