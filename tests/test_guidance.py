"""Classifier-free guidance and autoguidance against the reference (parity README §5.1)."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import sfd_jax  # noqa: F401
from sfd_jax.convert.lightning_dit import load_lightning_dit
from sfd_jax.diffusion import guidance as G
from sfd_jax.diffusion import samplers as S
from sfd_jax.models.lightning_dit import DiTConfig
from tests.conftest import parity_dir
from tests.util import assert_close_ref


def nchw(x):
  return np.asarray(x).transpose(0, 3, 1, 2)


def nhwc(x):
  return jnp.asarray(np.asarray(x).transpose(0, 2, 3, 1))


@pytest.fixture(scope="module")
def models(parity):
  z = parity("lightningdit_sfd")
  cfg = json.loads(str(z["config"]))
  path = str(parity_dir() / "lightningdit_sfd.npz")
  main = load_lightning_dit(path, DiTConfig.from_reference_kwargs(cfg["model_kwargs"]))
  guide = load_lightning_dit(path, DiTConfig.from_reference_kwargs(cfg["guide_kwargs"]),
                             prefix="guide/")
  return main, guide


@pytest.fixture(scope="module")
def outputs(parity, models):
  """Every guided output of the fixture. The guidance code runs eagerly around jitted
  model calls (one compile per model and batch size, reused by every variant)."""
  z = parity("lightningdit_sfd")
  main = jax.jit(lambda x, t_tex, t_sem, y: models[0](x, t_tex, t_sem, y))
  guide = jax.jit(lambda x, t_tex, t_sem, y: models[1](x, t_tex, t_sem, y))
  cfg_x, cfg_tt, cfg_ts, cfg_y = (nhwc(z["in/cfg_x"]), z["in/cfg_t_tex"], z["in/cfg_t_sem"],
                                  z["in/cfg_y"])
  ag_x, ag_tt, ag_ts, ag_y = nhwc(z["in/ag_x"]), z["in/ag_t_tex"], z["in/ag_t_sem"], z["in/ag_y"]
  out = {}
  out["cfg"], out["cfg_model_out"] = G.forward_with_cfg(
      main, cfg_x, cfg_tt, cfg_ts, cfg_y, 1.5, return_model_out=True)
  out["cfg_interval"] = G.forward_with_cfg(main, cfg_x, cfg_tt, cfg_ts, cfg_y, 1.5,
                                           cfg_interval=True, cfg_interval_start=0.4)
  out["ag"], (out["ag_main_velocity"], out["ag_guide_velocity"]) = (
      G.forward_with_autoguidance(main, ag_x, ag_tt, ag_ts, ag_y, 1.5, guide,
                                  return_parts=True))
  out["ag_interval"] = G.forward_with_autoguidance(
      main, ag_x, ag_tt, ag_ts, ag_y, 1.5, guide, cfg_interval=True, cfg_interval_start=0.4)
  out["ag_sep_scales"] = G.forward_with_autoguidance(
      main, ag_x, ag_tt, ag_ts, ag_y, 1.5, guide, cfg_interval=True,
      cfg_interval_start=0.0, cfg_scale_sem=2.0, cfg_scale_tex=1.25)
  # The sampler-facing factory on N rows (scalar clocks, as the samplers give them).
  n = ag_x.shape[0]
  out["factory_cfg"] = G.make_guided_velocity(main, mode="cfg", scale=1.5)(
      cfg_x[:n], cfg_tt[0], cfg_ts[0], cfg_y[:n])
  out["factory_ag"] = G.make_guided_velocity(
      main, guide, mode="autoguidance", scale=1.5, scale_tex=1.25, scale_sem=2.0,
      semantic_chans=16)(ag_x, ag_tt[0], ag_ts[0], ag_y)
  out["factory_unguided"] = G.make_guided_velocity(
      main, guide, mode="autoguidance", scale=1.0)(ag_x, ag_tt, ag_ts, ag_y)
  return {k: nchw(v) for k, v in out.items()}


@pytest.mark.parametrize("name", ["cfg", "cfg_interval", "cfg_model_out", "ag",
                                  "ag_interval", "ag_sep_scales", "ag_main_velocity",
                                  "ag_guide_velocity"])
def test_guided_outputs_match_reference(parity, outputs, name):
  z = parity("lightningdit_sfd")
  assert_close_ref(outputs[name], z[f"out/{name}"], name=name)


def test_cfg_layout_and_interval_semantics(outputs):
  n = 4
  cfg, gated, raw = outputs["cfg"], outputs["cfg_interval"], outputs["cfg_model_out"]
  np.testing.assert_array_equal(cfg[:n], cfg[n:])
  # τ = 0.55: t_tex = 0.25 < 0.4 keeps the texture conditional, t_sem = 0.55 is guided.
  np.testing.assert_array_equal(gated[:n, :32], raw[:n, :32])
  np.testing.assert_array_equal(gated[:, 32:], cfg[:, 32:])
  np.testing.assert_array_equal(outputs["ag_interval"][:, :32],
                                outputs["ag_main_velocity"][:, :32])


def test_factory_matches_reference_forms(parity, outputs):
  z = parity("lightningdit_sfd")
  assert_close_ref(outputs["factory_cfg"], z["out/cfg"][:4], name="factory cfg")
  assert_close_ref(outputs["factory_ag"], z["out/ag_sep_scales"], name="factory ag")
  # scale <= 1 switches guidance off: the plain conditional main model.
  assert_close_ref(outputs["factory_unguided"], z["out/ag_main_velocity"],
                   name="factory unguided")


def _recording_fn(calls):
  """A fake velocity function recording its batch sizes and labels."""
  def fn(x, t_tex, t_sem, y):
    calls.append((x.shape[0], np.asarray(y).tolist()))
    sem = jnp.arange(x.shape[-1]) >= x.shape[-1] - 2
    t = jnp.where(sem, t_sem[:, None], t_tex[:, None])[:, None, None, :]
    # Conditional rows get +1, null rows 0: v_c − v_u = 1 everywhere.
    return x * t + (y[:, None, None, None] != 1000).astype(jnp.float32)
  return fn


def test_cfg_is_one_model_call_on_the_doubled_batch():
  calls = []
  x = jnp.ones((3, 2, 2, 6))
  v = G.cfg_velocity(_recording_fn(calls), x, 0.5, 0.8, jnp.array([1, 2, 3]), scale=2.0,
                     scale_sem=3.0, semantic_chans=2)
  assert calls == [(6, [1, 2, 3, 1000, 1000, 1000])]
  # v = v_u + s·1 with v_u = x·t: texture 0.5 + 2, semantic 0.8 + 3.
  np.testing.assert_allclose(v[..., :4], 2.5)
  np.testing.assert_allclose(v[..., 4:], 3.8)


@pytest.mark.parametrize("mode,expect_tex,expect_sem", [("both", "cond", "cond"),
                                                        ("tex", "cond", "guided"),
                                                        ("sem", "guided", "cond")])
def test_interval_modes(mode, expect_tex, expect_sem):
  v_c = jnp.full((2, 1, 1, 6), 1.0)
  v_r = jnp.zeros((2, 1, 1, 6))
  out = G.combine(v_c, v_r, jnp.array([0.1, 0.9]), jnp.array([0.2, 0.9]), scale_tex=2.0,
                  scale_sem=3.0, interval_start=0.3, interval_mode=mode, semantic_chans=2)
  tex = 1.0 if expect_tex == "cond" else 2.0
  sem = 1.0 if expect_sem == "cond" else 3.0
  # Only row 0's clocks decide, for every row (as the reference).
  np.testing.assert_array_equal(out[..., :4], tex)
  np.testing.assert_array_equal(out[..., 4:], sem)
  # Gating off above the start, and never with interval_start = 0.
  out = G.combine(v_c, v_r, 0.5, 0.5, scale_tex=2.0, scale_sem=3.0, interval_start=0.3,
                  interval_mode=mode, semantic_chans=2)
  np.testing.assert_array_equal(out[..., :4], 2.0)
  np.testing.assert_array_equal(out[..., 4:], 3.0)
  out = G.combine(v_c, v_r, 0.0, 0.0, scale_tex=2.0, scale_sem=3.0, interval_start=0.0,
                  interval_mode=mode, semantic_chans=2)
  np.testing.assert_array_equal(out[..., :4], 2.0)


def test_synchronous_model_is_one_part():
  v_c = jnp.full((1, 1, 1, 4), 1.0)
  out = G.combine(v_c, jnp.zeros_like(v_c), 0.2, 0.2, scale_tex=2.0, scale_sem=5.0,
                  interval_start=0.5, semantic_chans=0)
  np.testing.assert_array_equal(out, 1.0)
  out = G.combine(v_c, jnp.zeros_like(v_c), 0.7, 0.7, scale_tex=2.0, scale_sem=5.0,
                  interval_start=0.5, semantic_chans=0)
  np.testing.assert_array_equal(out, 2.0)


def test_argument_validation():
  fn = _recording_fn([])
  with pytest.raises(ValueError, match="guide"):
    G.make_guided_velocity(fn, mode="autoguidance", scale=1.5)
  with pytest.raises(ValueError, match="guidance mode"):
    G.make_guided_velocity(fn, mode="classifier", scale=1.5)
  with pytest.raises(ValueError, match="interval_mode"):
    G.make_guided_velocity(fn, mode="cfg", scale=1.5, interval_mode="all")
  with pytest.raises(ValueError, match="doubled batch"):
    G.forward_with_cfg(fn, jnp.ones((3, 1, 1, 6)), 0.5, 0.5, jnp.zeros(3, jnp.int32), 1.5)


class _FakeModel:
  """Stands in for a LightningDiT: a ``cfg`` and the velocity call signature; returns 1
  for real labels and 0 for the null label, so v_c − v_u = 1."""

  def __init__(self, **overrides):
    self.cfg = DiTConfig(input_size=2, hidden_size=64, depth=1, num_heads=2,
                         use_repa=False, **overrides)
    self.labels = []

  def __call__(self, x, t_tex, t_sem, y):
    self.labels.append(np.asarray(y).tolist())
    real = (y != self.cfg.num_classes).astype(jnp.float32)
    return jnp.zeros_like(x) + real[:, None, None, None]


def test_factory_defaults_come_from_the_model_config():
  x, y = jnp.zeros((2, 2, 2, 48)), jnp.array([1, 2])
  model = _FakeModel(num_classes=10)
  v = G.make_guided_velocity(model, mode="cfg", scale=2.0, scale_sem=9.0)(x, 0.5, 0.5, y)
  assert model.labels == [[1, 2, 10, 10]]          # null label = num_classes
  np.testing.assert_array_equal(v[..., :32], 2.0)  # semantic_chans = 16 from the config
  np.testing.assert_array_equal(v[..., 32:], 9.0)
  # A synchronous (Δt = 0) model is one part: the semantic scale does not apply.
  sync = _FakeModel(delta_t=0.0)
  v = G.make_guided_velocity(sync, mode="cfg", scale=2.0, scale_sem=9.0)(x, 0.5, 0.5, y)
  np.testing.assert_array_equal(v, 2.0)


def _analytic_model(x, t_tex, t_sem, y):
  """Label-dependent smooth field (stands in for a network in the sharding test)."""
  sem = jnp.arange(x.shape[-1]) >= x.shape[-1] - 16
  t = jnp.where(sem, t_sem[:, None], t_tex[:, None])[:, None, None, :]
  bias = jnp.sin(y.astype(jnp.float32))[:, None, None, None]
  return jnp.tanh(x) * (1.0 - t) + bias + 0.1 * jnp.mean(x, axis=(1, 2), keepdims=True)


@pytest.mark.parametrize("mode", ["cfg", "autoguidance"])
def test_guided_sampling_sharded_matches_unsharded(mode):
  """Guided Euler under jit: batch sharded over the 8 fake devices == unsharded."""
  guide = lambda x, t_tex, t_sem, y: 0.5 * _analytic_model(x, t_tex, t_sem, y)
  fn = G.make_guided_velocity(_analytic_model, guide, mode=mode, scale=1.5, scale_sem=2.0,
                              interval_start=0.4, null_label=1000, semantic_chans=16)
  x0 = jax.random.normal(jax.random.key(0), (16 * 4 * 4 * 48,)).reshape(16, 4, 4, 48)
  y = jnp.arange(16, dtype=jnp.int32) * 37
  run = jax.jit(lambda x, y: S.sample(fn, x, y, method="euler", num_steps=6).x)
  ref = run(x0, y)
  mesh = Mesh(np.array(jax.devices()[:8]), ("data",))
  out = run(jax.device_put(x0, NamedSharding(mesh, P("data"))),
            jax.device_put(y, NamedSharding(mesh, P("data"))))
  assert len(out.sharding.device_set) == 8
  np.testing.assert_allclose(np.asarray(out), np.asarray(ref), atol=1e-6, rtol=0)
