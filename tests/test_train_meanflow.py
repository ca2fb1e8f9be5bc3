"""Average-velocity (MeanFlow) training on the training core, 8 fake CPU devices: the
sharded step equals the single-device one, gradient accumulation equals the whole batch,
a run resumes bit-identically after SIGTERM and samples in 1-2 jumps, a learned clock
trains, a flow-matching checkpoint starts the average-velocity model as the same
function, and the sample job refuses ``method="meanflow"`` for a flow-matching model."""
import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

import sfd_jax  # noqa: F401
from sfd_jax import parallel, sampling
from sfd_jax.checkpoint import export
from sfd_jax.core import errors
from sfd_jax.diffusion import generation
from sfd_jax.diffusion.objective import ObjectiveConfig
from sfd_jax.models.lightning_dit import DiTConfig
from sfd_jax.training import optim
from sfd_jax.training import sfd as train
from sfd_jax.training import state as state_lib
from tests.conftest import REPO
from tests.util import (assert_trees_close, final_state, perturbed_params, preempted_at,
                        tiny_batch, train_one_step, write_tiny_latents)

sys.path.insert(0, str(REPO))
from configs import tiny as tiny_config  # noqa: E402  pylint: disable=wrong-import-position

CFG = DiTConfig(input_size=4, hidden_size=32, depth=2, num_heads=2, repa_projector_dim=32,
                repa_dim=16, repa_depth=1, interval_embedding=True)
MEANFLOW = ObjectiveConfig(name="meanflow", meanflow={"equal_fraction": 0.5})


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return write_tiny_latents(tmp_path_factory.mktemp("latents"))


def _setup(shape, obj=MEANFLOW):
  mesh = parallel.make_mesh(shape, jax.devices()[:int(np.prod(shape))])
  opt = ml_collections.ConfigDict(dict(lr=1e-3, b1=0.9, b2=0.999, eps=1e-4,
                                       weight_decay=0.0))
  tx, sched = optim.make_optimizer(opt)
  return train.build_setup(CFG, obj, mesh, tx, sched, ema_decay=0.9, seed=3)


def test_sharded_step_and_accumulation_equal_the_single_device_step():
  batch = tiny_batch(16)
  ref_setup = _setup((1, 1, 1))
  init = perturbed_params(ref_setup)
  ref_state, ref_m = train_one_step(ref_setup, init, batch)
  assert ref_m["interval_mean"] > 0          # some examples jump (ρ > τ)
  for shape in [(2, 4, 1), (2, 2, 2)]:
    state, m = train_one_step(_setup(shape), init, batch)
    assert m["loss"] == pytest.approx(ref_m["loss"], rel=1e-5), shape
    assert_trees_close(state["params"], ref_state["params"], 1e-5)
  # 2 micro-batches of 8 on a data×fsdp mesh: the same update as the whole batch
  setup = _setup((2, 4, 1))
  acc_state, acc_m = train_one_step(setup, init, batch, accumulate_steps=2, global_batch_size=16)
  assert acc_m["loss"] == pytest.approx(ref_m["loss"], rel=1e-5)
  assert_trees_close(acc_state["params"], ref_state["params"], 1e-5)
  assert not np.allclose(acc_state["params"]["r_embedder_sem"]["mlp_2"]["kernel"],
                         init["r_embedder_sem"]["mlp_2"]["kernel"])


def _config(data, **kw):
  c = tiny_config.get_config(f"data={data},steps=8")
  c.objective.name = "meanflow"
  c.checkpoint_every_steps = 4
  c.log_every_steps = 4
  for k, v in kw.items():
    c[k] = v
  return c


def test_trains_resumes_exactly_after_sigterm_and_samples_in_few_jumps(data_dir, tmp_path):
  cfg = _config(data_dir)
  assert train.model_configs(cfg)[0].interval_embedding
  straight = tmp_path / "straight"
  res = train.train_and_evaluate(cfg, str(straight))
  assert res["step"] == 8 and np.isfinite(res["metrics"]["loss"])
  step, ref, setup = final_state(str(straight), cfg)
  term = tmp_path / "sigterm"
  with preempted_at(train, "make_data_iterator", 3):
    out = train.train_and_evaluate(_config(data_dir), str(term))
  assert out["step"] == 3
  train.train_and_evaluate(cfg, str(term))
  _, again, _ = final_state(str(term), cfg)
  for a, b in zip(jax.tree.leaves(ref), jax.tree.leaves(again)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  model = setup.model(ref["ema"])
  for steps in (1, 2):
    opts = generation.SamplingOptions(method="meanflow", num_steps=steps, guidance="cfg",
                                      scale=2.0)
    x, nfe = jax.jit(lambda i, lab, k, o=opts: generation.generate(
        model, None, None, i, lab, k, o))(jnp.arange(8), jnp.arange(8), jax.random.key(0))
    assert int(nfe) == steps and x.shape == (8, 4, 4, 48)
    assert np.all(np.isfinite(np.asarray(x)))
  # the sample job on the training workdir: 2 jumps per image
  c = _config(data_dir)
  c.sample.checkpoint, c.sample.method, c.sample.num_steps = str(straight), "meanflow", 2
  c.sample.guidance, c.sample.num_images, c.sample.batch_size = "cfg", 8, 8
  c.sample.scale = 2.0
  info = sampling.sample_from_config(c, str(tmp_path / "samples"))
  assert info["nfe_per_batch"] == 2 and info["num_images"] == 8, info


def test_learned_clock_trains_with_meanflow(data_dir, tmp_path):
  c = _config(data_dir, num_train_steps=4)
  c.schedule = ml_collections.ConfigDict(dict(
      total=1.3, parts=dict(texture=dict(channels=32, family="offset", start=0.3),
                            semantic=dict(channels=16, family="learned", start=0.0, bins=4,
                                          loss_weight=2.0))))
  res = train.train_and_evaluate(c, str(tmp_path / "learned"))
  assert res["step"] == 4 and "clock_energy" in res["metrics"]
  _, state, _ = final_state(str(tmp_path / "learned"), c)
  assert np.abs(np.asarray(state["params"]["clock_semantic"])).max() > 0


def test_flow_matching_checkpoint_starts_the_meanflow_model(data_dir, tmp_path):
  fm_cfg = tiny_config.get_config(f"data={data_dir},steps=4")
  fm_cfg.checkpoint_every_steps = 4
  train.train_and_evaluate(fm_cfg, str(tmp_path / "fm"))
  _, fm_state, fm_setup = final_state(str(tmp_path / "fm"), fm_cfg)
  converted = str(tmp_path / "fm_converted")
  export.export_params(fm_state["ema"], fm_setup.model_cfg, converted, formats=("orbax",))

  mf_cfg = _config(data_dir, init_from=converted)
  mf_setup = train.build(mf_cfg)
  init = train._init_from(mf_cfg, mf_setup)()    # pylint: disable=protected-access
  state = jax.device_get(state_lib.create_train_state(mf_setup, init))
  assert set(state["params"]) - set(fm_state["ema"]) == {"r_embedder_sem", "r_embedder_tex"}
  fm_model, mf_model = fm_setup.model(fm_state["ema"]), mf_setup.model(state["params"])
  x = jax.random.normal(jax.random.key(0), (4, 4, 4, 48))
  t_tex, t_sem = jnp.asarray([0.0, 0.2, 0.5, 0.9]), jnp.asarray([0.3, 0.5, 0.8, 1.0])
  y = jnp.asarray([0, 3, 7, 10])
  want = np.asarray(fm_model(x, t_tex, t_sem, y))
  got = np.asarray(mf_model(x, t_tex, t_sem, y, interval=(jnp.full(4, 0.4), jnp.full(4, 0.7))))
  np.testing.assert_array_equal(got, want)

  # sampling a flow-matching model with the few-step sampler: one line naming the field
  c = tiny_config.get_config("")
  c.sample.checkpoint = converted
  c.sample.method, c.sample.num_steps = "meanflow", 2
  with pytest.raises(errors.UserError, match=r"config.sample.method='meanflow' needs an "
                     r"average-velocity model .* is a flow-matching model"):
    sampling.prepare(c)
  # ... and the reference (PyTorch) format has no place for the interval embedders
  with pytest.raises(errors.UserError, match="no interval embedders"):
    export.export_params(state["params"], mf_setup.model_cfg, str(tmp_path / "mf_export"),
                         formats=("safetensors",))
