"""A three-part clock schedule (texture, semantic, an extra part; one learned clock) on the
training core: trains, resumes bit-identically after SIGTERM, samples; old configs load."""
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import sfd_jax  # noqa: F401
from sfd_jax.diffusion import clocks, generation
from sfd_jax.training import sfd as train
from tests.conftest import REPO
from tests.util import final_state, preempted_at

sys.path.insert(0, str(REPO))
from configs import tiny as tiny_config  # noqa: E402  pylint: disable=wrong-import-position


def write_three_part(directory, n=48, grid=4, repa_dim=16, num_classes=10, seed=0):
  from sfd_jax.data import records, stats as stats_lib
  from sfd_jax.data.schema import LatentSchema
  schema = LatentSchema(grid=grid, texture_channels=4, semantic_channels=2,
                        repa_dim=repa_dim, extra_parts=(("hidden", 2),))
  rng = np.random.default_rng(seed)
  protos = rng.normal(size=(num_classes, grid, grid, 8)).astype(np.float32)
  examples = []
  for i in range(n):
    lat = protos[i % num_classes] + 0.1 * rng.normal(size=(grid, grid, 8)).astype(np.float32)
    rep = rng.normal(size=(grid, grid, repa_dim)).astype(np.float16)
    ex = {"label": np.int64(i % num_classes), "repa": rep, "repa_flip": rep[:, ::-1].copy()}
    for name, sl in (("texture", slice(0, 4)), ("semantic", slice(4, 6)),
                     ("hidden", slice(6, 8))):
      ex[name], ex[name + "_flip"] = lat[..., sl], lat[:, ::-1, sl].copy()
    examples.append(ex)
  records.write_examples(directory, examples, schema, records_per_shard=20)
  stats_lib.compute_stats(records.LatentRecords(directory)).save(
      stats_lib.stats_path(directory))
  return str(directory)


@pytest.fixture(scope="module")
def data3(tmp_path_factory):
  return write_three_part(tmp_path_factory.mktemp("latents3"))


def config3(data, **kw):
  c = tiny_config.get_config(f"data={data},steps=8")
  c.model.update(in_channels=8, semantic_chans=2)
  c.checkpoint_every_steps = 4
  c.log_every_steps = 4
  c.schedule = ml_collections.ConfigDict(dict(
      total=1.3, order=("texture", "semantic", "hidden"),
      parts=dict(texture=dict(channels=4, family="offset", start=0.3),
                 semantic=dict(channels=2, family="learned", start=0.0, bins=4,
                               loss_weight=2.0),
                 hidden=dict(channels=2, family="shift", start=0.0, rate=1 / 1.3,
                             shift=2.0))))
  for k, v in kw.items():
    c[k] = v
  return c


def test_three_part_schedule_trains_resumes_exactly_and_samples(data3, tmp_path):
  cfg = config3(data3)
  model_cfg, obj_cfg = train.model_configs(cfg)
  assert model_cfg.time_parts == ("texture", "semantic", "hidden")
  assert model_cfg.learned_clocks == (("semantic", 4),)
  assert obj_cfg.schedule.names == ("texture", "semantic", "hidden")

  straight = tmp_path / "straight"
  res = train.train_and_evaluate(cfg, str(straight))
  assert res["step"] == 8 and np.isfinite(res["metrics"]["loss"])
  assert "clock_energy" in res["metrics"]
  step, ref, _ = final_state(str(straight), cfg)
  phi = np.asarray(ref["params"]["clock_semantic"])
  assert step == 8 and phi.shape == (4,) and np.abs(phi).max() > 0   # learned, saved

  term = tmp_path / "sigterm"
  with preempted_at(train, "make_data_iterator", 3):
    out = train.train_and_evaluate(config3(data3), str(term))
  assert out["step"] == 3
  train.train_and_evaluate(cfg, str(term))
  _, again, _ = final_state(str(term), cfg)
  for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(again)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  # samples with the trained (EMA) weights and their learned clock
  setup = train.build(cfg)
  model = setup.model(jax.device_get(ref["ema"]))
  sch = obj_cfg.schedule
  opts = generation.SamplingOptions(method="heun", num_steps=6, schedule=sch)
  x, nfe = jax.jit(lambda i, lab, k: generation.generate(model, None, None, i, lab, k, opts))(
      jnp.arange(4), jnp.arange(4), jax.random.key(0))
  assert x.shape == (4, 4, 4, 8) and np.all(np.isfinite(np.asarray(x))) and int(nfe) == 10
  opts = generation.SamplingOptions(method="euler", guidance="cfg", scale=2.0,
                                    num_steps=5, schedule=sch)
  x2, _ = generation.generate(model, None, None, jnp.arange(4), jnp.arange(4),
                              jax.random.key(0), opts)
  assert np.all(np.isfinite(np.asarray(x2)))


def test_schedule_mismatching_the_data_is_a_clear_error(data3):
  from sfd_jax.core import errors
  c = config3(data3)
  c.schedule.order = ("semantic", "texture", "hidden")
  with pytest.raises(errors.DataError, match="do not match config.schedule"):
    train.check_data(c, train.model_configs(c)[0])
  c = config3(data3)
  c.schedule.parts.texture.rate = 0.0
  with pytest.raises(errors.ConfigError, match="config.schedule.parts.texture"):
    train.model_configs(c)


def test_old_configs_load_as_today():
  c = tiny_config.get_config("")
  assert "schedule" not in c
  model_cfg, obj_cfg = train.model_configs(c)
  assert obj_cfg.schedule is None and model_cfg.time_parts == ()
  assert model_cfg.num_time_embedders == 2
  assert clocks.from_config(c) == clocks.sfd_schedule(0.3, 16, 48, 2.0)
  sync = tiny_config.get_config("delta_t=0")
  assert train.model_configs(sync)[0].num_time_embedders == 1
