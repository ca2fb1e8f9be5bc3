"""SFD training options on 8 fake CPU devices: gradient accumulation (the same update as
the whole batch at once, on a data×fsdp mesh), NaN / spike skipping, ``init_from`` with
the reference's shape-checked loading and patch-channel expansion, the validation loss
(to TensorBoard), and latents without normalisation."""
import glob
import os
import sys

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx

import sfd_jax  # noqa: F401
from sfd_jax import parallel
from sfd_jax.convert import lightning_dit as dit_conv
from sfd_jax.convert.common import save_params
from sfd_jax.data import pipeline, records, stats as stats_lib
from sfd_jax.diffusion.objective import ObjectiveConfig
from sfd_jax.models.lightning_dit import DiTConfig, LightningDiT
from sfd_jax.training import state as state_lib
from sfd_jax.training import optim, validation
from sfd_jax.training import sfd as train
from tests.conftest import REPO
from tests.util import (assert_trees_close, perturbed_params, tiny_batch, train_one_step,
                        write_tiny_latents)

sys.path.insert(0, str(REPO))
from configs import tiny as tiny_config  # noqa: E402  pylint: disable=wrong-import-position

CFG = DiTConfig(input_size=4, hidden_size=32, depth=2, num_heads=2, repa_projector_dim=32,
                repa_dim=16, repa_depth=1)


def _setup(shape=(2, 4, 1), cfg=CFG):
  mesh = parallel.make_mesh(shape, jax.devices()[:int(np.prod(shape))])
  opt = ml_collections.ConfigDict(dict(lr=1e-3, b1=0.9, b2=0.999, eps=1e-4,
                                       weight_decay=0.0))
  tx, sched = optim.make_optimizer(opt)
  return train.build_setup(cfg, ObjectiveConfig(), mesh, tx, sched, ema_decay=0.9, seed=3)


def test_gradient_accumulation_equals_one_bigtiny_batch():
  """2 micro-batches of 16 rows on a 2×4 (data×fsdp) mesh == one step on all 32."""
  setup = _setup()
  init = perturbed_params(setup)
  batch = tiny_batch(32)
  ref_state, ref_m = train_one_step(setup, init, batch)
  for k in (2,):
    acc_state, acc_m = train_one_step(setup, init, batch, accumulate_steps=k, global_batch_size=32)
    assert acc_m["loss"] == pytest.approx(ref_m["loss"], rel=1e-6)
    assert acc_m["grad_norm"] == pytest.approx(ref_m["grad_norm"], rel=1e-5)
    assert_trees_close(acc_state["params"], ref_state["params"], 1e-5)
    assert_trees_close(acc_state["ema"], ref_state["ema"], 1e-5)
  # ... and not a different update (the micro-batches are not each a full step).
  assert not np.allclose(np.asarray(acc_state["params"]["x_embedder"]["kernel"]),
                         np.asarray(init["x_embedder"]["kernel"]))


def test_accumulation_that_does_not_divide_is_an_error():
  setup = _setup()
  with pytest.raises(ValueError, match=r"config.optimizer.accumulate_steps=4: the global "
                     r"batch 16 must split into 4 micro-batches .* multiple of 32"):
    train.make_train_step(setup, accumulate_steps=4, global_batch_size=16)
  with pytest.raises(ValueError, match=r"accumulate_steps=0 must be >= 1"):
    train.make_train_step(setup, accumulate_steps=0)


def test_skip_nonfinite_and_spikes():
  """(Without the option a NaN step is counted in ``nonfinite``: test_train's NaN guard.)"""
  setup = _setup((8, 1, 1))
  init = perturbed_params(setup)
  bad, good = tiny_batch(8), tiny_batch(8, seed=1)
  bad["latent"][3, 0, 0, 0] = np.nan
  step = train.make_train_step(setup, skip_nonfinite=True)
  sh = parallel.batch_sharding(setup.mesh)
  state, m = step(state_lib.create_train_state(setup, init), jax.device_put(bad, sh))
  state = jax.device_get(state)
  assert state["nonfinite"] == 0 and float(m["skipped"]) == 1.0 and state["step"] == 1
  assert_trees_close(state["params"], init, 0.0)
  assert_trees_close(state["ema"], init, 0.0)
  state, m = step(jax.device_put(state, setup.state_shardings), jax.device_put(good, sh))
  assert float(m["skipped"]) == 0.0 and int(state["step"]) == 2
  state, m = train_one_step(setup, init, good, skip_grad_norm_above=1e-9)     # a "spike"
  assert m["skipped"] == 1.0 and state["nonfinite"] == 0
  assert_trees_close(state["params"], init, 0.0)


def test_init_from_shape_check_expands_patch_channels(tmp_path):
  """A texture-only (32-channel, Δt = 0) LightningDiT starts an SFD model (48 channels,
  two clocks): matching tensors copied, the patch embedder's 32 input channels copied
  into the first 32 of 48 (rest zero), the rest keeps its random init."""
  tex_cfg = DiTConfig(input_size=4, hidden_size=32, depth=2, num_heads=2, use_repa=False,
                      in_channels=32, semantic_chans=0, delta_t=0.0)
  tex = LightningDiT(tex_cfg, rngs=nnx.Rngs(7))
  src = jax.device_get(nnx.to_pure_dict(nnx.state(tex, nnx.Param)))
  src["x_embedder"]["kernel"] = np.random.RandomState(0).randn(32, 32).astype(np.float32)
  save_params(tmp_path / "tex", src, dit_conv.config_to_meta(tex_cfg))
  setup = _setup((8, 1, 1))
  c = tiny_config.get_config()
  c.model.update(hidden_size=32, num_heads=2, repa_projector_dim=32)
  c.init_from = str(tmp_path / "tex")
  c.init_from_mode = "shape_check"
  logs = []
  given = train.init_params_from(
      dit_conv.load_params(str(tmp_path / "tex"), "lightning_dit")[0],
      setup.abstract_state["params"], mode="shape_check", log=logs.append)
  assert any("expanded 'x_embedder/kernel' from 32 to 48" in l for l in logs)
  assert any("'t_embedder' is not a parameter" in l for l in logs)
  assert any("'t_embedder_sem' not in the checkpoint" in l for l in logs)
  state = jax.device_get(state_lib.create_train_state(setup, given))
  fresh = jax.device_get(state_lib.create_train_state(setup))
  k = state["params"]["x_embedder"]["kernel"]
  np.testing.assert_array_equal(k[:32], src["x_embedder"]["kernel"])
  np.testing.assert_array_equal(k[32:], 0)
  np.testing.assert_array_equal(state["params"]["blocks"]["attn"]["qkv"]["kernel"],
                                src["blocks"]["attn"]["qkv"]["kernel"])
  np.testing.assert_array_equal(state["params"]["y_embedding"], src["y_embedding"])
  for name in ("t_embedder_sem", "t_embedder_tex", "repa_projector"):
    assert_trees_close(state["params"][name], fresh["params"][name], 0.0)   # random init kept
  assert_trees_close(state["ema"], state["params"], 0.0)
  # The reference's code copies 16 channels only (its weight_init); reproducible:
  given16 = train.init_params_from(
      {"x_embedder": {"kernel": src["x_embedder"]["kernel"]}},
      {"x_embedder": setup.abstract_state["params"]["x_embedder"]}, mode="shape_check",
      patch_channels=16, log=lambda _: None)
  np.testing.assert_array_equal(given16["x_embedder"]["kernel"][16:], 0)
  # Exact mode (default) keeps today's strict behaviour.
  c.init_from_mode = "exact"
  with pytest.raises(ValueError, match="parameter names"):
    train._init_from(c, setup)()  # pylint: disable=protected-access
  with pytest.raises(ValueError, match="init_from_mode='loose'"):
    c.init_from_mode = "loose"
    train._init_from(c, setup)  # pylint: disable=protected-access


@pytest.fixture(scope="module")
def data_dirs(tmp_path_factory):
  train_dir = write_tiny_latents(tmp_path_factory.mktemp("train_latents"))
  held_out = write_tiny_latents(tmp_path_factory.mktemp("val_latents"), n=12, seed=1)
  return train_dir, held_out


class _Writer:
  def __init__(self):
    self.scalars = {}

  def write_scalars(self, step, scalars):
    self.scalars.setdefault(step, {}).update(scalars)


def test_validation_loss_is_deterministic_and_batch_independent(data_dirs):
  train_dir, held_out = data_dirs
  c = tiny_config.get_config(f"data={train_dir}")
  c.validation.update(path=held_out, every_steps=5, batch_size=8, times=(0.2, 0.8))
  setup = train.build(c)
  state = state_lib.create_train_state(setup, perturbed_params(setup))
  val = validation.ValidationLoss(c, setup)
  a = val(5, state, _Writer())
  assert val(5, state, _Writer()) == a
  assert set(a) == {"val/loss", "val/loss_t0.20", "val/loss_t0.80", "val/mse_t0.20",
                    "val/mse_t0.80"}
  assert a["val/loss_t0.20"] != a["val/loss_t0.80"]
  c.validation.batch_size = 16                      # 12 examples: padded and masked
  d = validation.ValidationLoss(c, setup)(5, state, _Writer())
  for k in a:
    assert d[k] == pytest.approx(a[k], rel=1e-5)
  c.validation.batch_size = 12
  with pytest.raises(validation.ValidationError, match="batch_size=12 must be a positive "
                     "multiple of the 8 devices"):
    validation.ValidationLoss(c, setup)


def test_training_with_options_logs_validation_to_tensorboard(data_dirs, tmp_path):
  """accumulate_steps, skip_nonfinite and validation in one short run through the
  trainer; val/* scalars land in the TensorBoard event file."""
  train_dir, held_out = data_dirs
  c = tiny_config.get_config(f"data={train_dir},steps=4")
  c.batch_size = 16
  c.optimizer.accumulate_steps = 2
  c.optimizer.skip_nonfinite = True
  c.validation.update(path=held_out, every_steps=2, batch_size=8, times=(0.5,))
  wd = tmp_path / "run"
  out = train.train_and_evaluate(c, str(wd))
  assert out["step"] == 4 and "val/loss" in out["metrics"]
  # tensorboard's own event reader: no TensorFlow needed
  from tensorboard.backend.event_processing import event_file_loader  # pylint: disable=C0415
  tags = {}
  for path in glob.glob(os.path.join(wd, "events.out.tfevents.*")):
    for event in event_file_loader.EventFileLoader(path).Load():
      for v in event.summary.value:
        tags.setdefault(v.tag, []).append(event.step)
  assert sorted(set(tags["val/loss"])) == [2, 4], tags
  assert "val/loss_t0.50" in tags
  assert "skipped" in tags


def test_latents_without_normalisation(tmp_path):
  d = write_tiny_latents(tmp_path / "raw", n=8)
  os.remove(stats_lib.stats_path(d))                  # not needed
  recs = records.LatentRecords(d)
  it = pipeline.build_pipeline(d, batch_size=4, shuffle=False, flip=False, repa=False,
                               normalize=False, latent_multiplier=0.5)
  batch = next(it)
  raw = recs[0]
  np.testing.assert_allclose(batch["latent"][0], 0.5 * np.concatenate(
      [raw["texture"], raw["semantic"]], -1), rtol=1e-6)
  assert it.get_state()["settings"]["normalize"] is False
  with pytest.raises(FileNotFoundError):
    pipeline.build_pipeline(d, batch_size=4)         # normalising needs the stats


def test_decoder_without_normalisation(tmp_path):
  """data.normalize=False: sampling decodes texture = latent / multiplier (no stats)."""
  from sfd_jax.convert import texture_vae as tvae_conv
  from sfd_jax import sampling
  from sfd_jax.diffusion import generation
  from sfd_jax.models.texture_vae import TextureVAE, TextureVAEConfig
  cfg = TextureVAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks_enc=1, num_res_blocks_dec=1,
                         attn_resolutions=(), z_channels=32, embed_dim=32, resolution=8)
  vae = TextureVAE(cfg, rngs=nnx.Rngs(0))
  tvae_conv.save_converted(tmp_path / "vae", jax.device_get(
      nnx.to_pure_dict(nnx.state(vae, nnx.Param))), cfg)
  c = tiny_config.get_config()
  c.sample.texture_vae = str(tmp_path / "vae")
  c.data.path = str(tmp_path / "no_data_here")
  c.data.normalize = False
  c.data.latent_multiplier = 0.25
  dec = sampling.load_decoder(c)
  assert float(dec.mean) == 0.0 and float(dec.std) == 1.0 and dec.multiplier == 0.25
  z = jax.random.normal(jax.random.key(0), (1, 2, 2, 32))
  np.testing.assert_array_equal(np.asarray(dec.decode(z)),
                                np.asarray(generation.to_uint8(dec.vae.decode(z / 0.25))))
