"""The clock schedule (sfd_jax/diffusion/clocks.py): families, SFD bit-identity, config."""
import ml_collections
import numpy as np
import pytest
import jax
import jax.numpy as jnp

from sfd_jax.diffusion import clocks as C


# The two-part functions as they were before the schedule existed (verbatim copies).
def old_clocks(tau, delta_t):
  tau = jnp.asarray(tau, jnp.float32)
  return jnp.maximum(tau - jnp.float32(delta_t), 0.0), jnp.minimum(tau, 1.0)


def old_training_clocks(t, delta_t):
  t = jnp.asarray(t, jnp.float32)
  if delta_t == 0:
    return t, t
  return old_clocks(t * jnp.float32(1.0 + delta_t), delta_t)


def old_phase_mask(tau, delta_t, channels, semantic_chans=16):
  tau = jnp.asarray(tau, jnp.float32)
  sem = jnp.arange(channels) >= channels - semantic_chans
  on = jnp.where(sem, tau <= jnp.float32(1.0), tau >= jnp.float32(delta_t))
  return on.astype(jnp.float32)


def _bits(a):
  return np.asarray(a, np.float32).view(np.uint32)


@pytest.mark.parametrize("delta_t", [0.0, 0.1, 0.3, 0.5, 1.0])
def test_sfd_schedule_is_bit_identical_to_old_clocks(delta_t):
  rng = np.random.default_rng(0)
  t = np.concatenate([rng.uniform(size=500), [0.0, 1.0, 0.5, 1e-7, 1 - 1e-7]]).astype(
      np.float32)
  sch = C.sfd_schedule(delta_t, 16, 48)
  new = sch.training_times(t)
  old = old_training_clocks(t, delta_t)
  for a, b in zip(new, old):
    np.testing.assert_array_equal(_bits(a), _bits(b))
  taus = np.concatenate([np.linspace(0, 1 + delta_t, 301, dtype=np.float32),
                         np.float32([delta_t, 1.0, 1 + delta_t])])
  for tau in taus:
    for a, b in zip(C.clocks(tau, delta_t), old_clocks(tau, delta_t)):
      np.testing.assert_array_equal(_bits(a), _bits(b))
    np.testing.assert_array_equal(_bits(C.phase_mask(tau, delta_t, 48, 16)),
                                  _bits(old_phase_mask(tau, delta_t, 48, 16)))
    # the rates are the phase mask, per part
    r_tex, r_sem = sch.rates(tau)
    m = old_phase_mask(tau, delta_t, 48, 16)
    assert float(r_tex) == float(m[0]) and float(r_sem) == float(m[-1])


def test_kinks_and_active():
  sch = C.sfd_schedule(0.3, 16, 48)
  assert sch.kinks == (np.float64(0.3), 1.0)
  assert sch.total == pytest.approx(1.3)
  act = sch.active(jnp.float32(0.1))
  assert (bool(act[0]), bool(act[1])) == (False, True)
  act = sch.active(jnp.float32(1.2))
  assert (bool(act[0]), bool(act[1])) == (True, False)
  assert C.sfd_schedule(0.0, 16, 48).kinks == ()
  assert C.sfd_schedule(0.0, 16, 48).synchronous
  assert not sch.synchronous


FAMILIES = [
    C.Clock("offset", start=0.2),
    C.Clock("rate", start=0.1, rate=2.0),
    C.Clock("power", start=0.0, rate=1.0 / 1.2, power=2.0),
    C.Clock("shift", start=0.1, rate=1.0, shift=3.0),
    C.Clock("piecewise_linear", knots=((0.0, 0.0), (0.4, 0.7), (0.9, 0.8), (1.2, 1.0))),
    C.Clock("learned", start=0.0, rate=1.0 / 1.2, bins=5),
]


@pytest.mark.parametrize("clock", FAMILIES, ids=lambda c: c.family)
def test_clock_monotone_bounded_and_rate_is_derivative(clock):
  total = 1.2
  params = (jnp.asarray([0.5, -1.0, 0.3, 2.0, 0.0]) if clock.learned else None)
  taus = np.linspace(0, total, 2401, dtype=np.float32)
  t = np.asarray(clock.time(taus, total, params))
  assert t.min() >= 0 and t.max() <= 1
  assert np.all(np.diff(t) >= -1e-7)
  assert t[0] == pytest.approx(0.0, abs=1e-6) and t[-1] == pytest.approx(1.0, abs=1e-6)
  # rate = derivative away from kinks (central differences)
  h = 1e-3
  mid = np.linspace(0.01, total - 0.01, 97).astype(np.float32)
  kinks = np.asarray(clock.kinks())
  mid = mid[np.min(np.abs(mid[:, None] - kinks[None]), axis=1) > 3 * h]
  fd = (np.asarray(clock.time(mid + h, total, params), np.float64)
        - np.asarray(clock.time(mid - h, total, params), np.float64)) / (2 * h)
  r = np.asarray(clock.rate_at(mid, total, params))
  np.testing.assert_allclose(r, fd, atol=2e-3, rtol=2e-3)
  if clock.family != "piecewise_linear":
    # inverse on the window
    tt = np.linspace(0.05, 0.95, 19, dtype=np.float32)
    back = clock.time(clock.inverse(tt, params), total, params)
    np.testing.assert_allclose(np.asarray(back), tt, atol=1e-5)


def test_learned_clock_monotone_for_any_params_and_zero_is_rate_clock():
  clock = C.Clock("learned", start=0.3, rate=1.0, bins=6)
  taus = np.linspace(0, 1.3, 500, dtype=np.float32)
  base = C.Clock("rate", start=0.3, rate=1.0)
  np.testing.assert_allclose(np.asarray(clock.time(taus, 1.3, None)),
                             np.asarray(base.time(taus, 1.3)), atol=1e-6)
  for seed in range(5):
    phi = jax.random.normal(jax.random.key(seed), (6,)) * 3
    t = np.asarray(clock.time(taus, 1.3, phi))
    assert np.all(np.diff(t) >= 0) and t[0] == 0 and t[-1] == pytest.approx(1.0)
  sch = C.Schedule((C.Part("a", 1, clock),), 1.3)
  assert float(sch.kinetic_energy()) == pytest.approx(1.0, rel=1e-6)
  assert float(sch.kinetic_energy({"a": jnp.arange(6.0)})) > 1.0


def _config(**sched):
  c = ml_collections.ConfigDict()
  c.model = ml_collections.ConfigDict(dict(in_channels=8, semantic_chans=4))
  c.objective = ml_collections.ConfigDict(dict(delta_t=0.3, semantic_weight=2.0))
  if sched:
    c.schedule = ml_collections.ConfigDict(sched)
  return c


def test_from_config_defaults_to_todays_fields():
  sch = C.from_config(_config())
  assert sch == C.sfd_schedule(0.3, 4, 8, 2.0)
  assert sch.names == ("texture", "semantic") and sch.loss_weights == (1.0, 2.0)
  c = _config()
  c.schedule = ml_collections.ConfigDict()     # an empty section = no section
  assert C.from_config(c) == sch


def test_from_config_section_three_parts():
  with pytest.raises(C.ScheduleError, match="config.schedule.order must list"):
    C.from_config(_config(parts=dict(texture=dict(channels=4), extra=dict(channels=4))))
  sch = C.from_config(_config(order=("texture", "extra", "semantic"), parts=dict(
      texture=dict(channels=3, family="offset", start=0.3),
      extra=dict(channels=1, family="rate", start=0.0, rate=2.0),
      semantic=dict(channels=4, family="learned", bins=4, loss_weight=2.0))))
  assert sch.names == ("texture", "extra", "semantic")
  assert sch.total == pytest.approx(1.3)
  assert sch.learned_parts == (("semantic", 4),)
  np.testing.assert_array_equal(sch.part_of_channel(), [0, 0, 0, 1, 2, 2, 2, 2])
  v = sch.per_channel([jnp.float32(1), jnp.float32(2), jnp.float32(3)])
  np.testing.assert_array_equal(np.asarray(v), [1, 1, 1, 2, 3, 3, 3, 3])


@pytest.mark.parametrize("parts,msg", [
    (dict(texture=dict(channels=4), semantic=dict(channels=3)), "in_channels is 8"),
    (dict(texture=dict(channels=4, family="warp"), semantic=dict(channels=4)),
     "config.schedule.parts.texture.family='warp'"),
    (dict(texture=dict(channels=4, rate=0.0, family="rate"), semantic=dict(channels=4)),
     "config.schedule.parts.texture.rate must be a number > 0"),
    (dict(texture=dict(channels=4, family="offset", power=2.0), semantic=dict(channels=4)),
     "do not belong to family 'offset'"),
    (dict(texture=dict(channels=4, family="piecewise_linear", knots=((0, 0), (1, 0.5))),
          semantic=dict(channels=4)), "end at t=1"),
    (dict(texture=dict(channels=4, family="piecewise_linear",
                       knots=((0, 0), (0.5, 0.7), (0.4, 1.0))),
          semantic=dict(channels=4)), "non-decreasing"),
    (dict(texture=dict(channels=0), semantic=dict(channels=8)), "channels must be"),
    (dict(texture=dict(channels=4, family="learned", bins=0), semantic=dict(channels=4)),
     "bins must be"),
])
def test_from_config_errors_name_the_field(parts, msg):
  with pytest.raises(C.ScheduleError, match=msg.replace("(", r"\(").replace(")", r"\)")):
    C.from_config(_config(parts=parts))


def test_from_config_total_too_short():
  with pytest.raises(C.ScheduleError, match="config.schedule.total=1"):
    C.from_config(_config(total=1.0, parts=dict(texture=dict(channels=4, start=0.3),
                                                semantic=dict(channels=4))))
