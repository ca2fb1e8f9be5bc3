"""Sampling options of ``config.sample`` (per-part scales, guidance interval, labels, SDE
options, checkpoint / guide steps) through the sampling job and ``main.py --mode=sample``,
each matching the direct library call (``diffusion.guidance`` + ``diffusion.samplers``)
bit for bit on CPU."""
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import sfd_jax  # noqa: F401
from sfd_jax import checkpoint
from sfd_jax.checkpoint import Checkpointer
from sfd_jax.convert import lightning_dit as dit_conv
from sfd_jax.convert.common import assign, save_params
from sfd_jax.core import jit as jit_lib
from sfd_jax import sampling
from sfd_jax.diffusion import generation, guidance, samplers
from sfd_jax.jobs import sample
from sfd_jax.models.lightning_dit import DiTConfig, LightningDiT
from tests.conftest import REPO, child_env

sys.path.insert(0, str(REPO))
from configs import tiny as tiny_config  # noqa: E402  pylint: disable=wrong-import-position

MAIN = DiTConfig(input_size=4, hidden_size=32, depth=2, num_heads=2, use_repa=False,
                 num_classes=10)
GUIDE = DiTConfig(input_size=4, hidden_size=32, depth=1, num_heads=2, use_repa=False,
                  num_classes=10)
N = 8


def _random_params(cfg, seed, scale=0.1):
  module = LightningDiT(cfg, rngs=nnx.Rngs(seed))
  params = nnx.to_pure_dict(nnx.state(module, nnx.Param))
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed + 100), len(leaves))
  return jax.device_get(jax.tree.unflatten(
      tree, [l + scale * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)]))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
  root = tmp_path_factory.mktemp("sampling_options")
  save_params(root / "main", _random_params(MAIN, 1), dit_conv.config_to_meta(MAIN))
  save_params(root / "guide", _random_params(GUIDE, 2), dit_conv.config_to_meta(GUIDE))
  return root


def _config(assets, **kw):
  c = tiny_config.get_config()
  c.model.num_classes = 10
  c.sample.checkpoint = str(assets / "main")
  c.sample.guide_checkpoint = str(assets / "guide")
  c.sample.num_images = N
  c.sample.batch_size = N
  c.sample.num_steps = 6
  c.sample.texture_vae = ""           # write latents (.npy): exact floats to compare
  for k, v in kw.items():
    c.sample[k] = v
  return c


def _latents(d, n=N):
  return np.stack([np.load(os.path.join(d, f"{i:06d}.npy")) for i in range(n)])


def _direct(assets, labels, *, mode="none", scale=1.0, method="euler", num_steps=6,
            seed=0, **kw):
  """The library call the options stand for: guidance.make_guided_velocity +
  samplers.sample on noise_for(indices, seed) (weights as jit arguments, as the job)."""
  main = dit_conv.load_converted(str(assets / "main"))
  guide = dit_conv.load_converted(str(assets / "guide")) if mode == "autoguidance" else None
  g_main, p_main = nnx.split(main)
  g_guide, p_guide = nnx.split(guide) if guide is not None else (None, None)
  guide_kw = {k: kw.pop(k) for k in ("scale_tex", "scale_sem", "interval_start",
                                     "interval_end", "interval_mode") if k in kw}

  def run(pm, pg, idx, y, key):
    m = nnx.merge(g_main, pm)
    g = nnx.merge(g_guide, pg) if pg is not None else None
    fn = guidance.make_guided_velocity(m, g, mode=mode, scale=scale, **guide_kw)
    z = generation.noise_for(idx, seed, (4, 4, 48))
    return samplers.sample(fn, z, y, method=method, num_steps=num_steps, delta_t=0.3,
                           semantic_chans=16, key=key, **kw).x

  key = jax.random.fold_in(jax.random.key(seed + 1), 0)   # batch 0's key
  # Compiled with the sample job's XLA options (on CPU: Eigen dots), so bit for bit.
  options = dict(jit_lib.inference_options()) or None
  out = jax.jit(run, compiler_options=options)(p_main, p_guide, jnp.arange(N, dtype=jnp.int32),
                                               jnp.asarray(labels, jnp.int32), key)
  return np.asarray(out)


def _run_job(assets, tmp_path, name, **kw):
  wd = tmp_path / name
  result = sample.run(_config(assets, **kw), str(wd), devices=jax.devices()[:1])
  return _latents(wd / "samples"), np.load(result["labels"])


def test_per_part_scales_and_random_labels(assets, tmp_path):
  got, labels = _run_job(assets, tmp_path, "ag", guidance="autoguidance", scale=1.5,
                         cfg_scale_tex=2.0, cfg_scale_sem=1.2, labels="random",
                         label_seed=7)
  np.testing.assert_array_equal(labels, generation.random_labels(np.arange(N), 10, 7))
  want = _direct(assets, labels, mode="autoguidance", scale=1.5, scale_tex=2.0,
                 scale_sem=1.2)
  np.testing.assert_array_equal(got, want)
  # The per-part scales change the result (vs. one common scale).
  common = _direct(assets, labels, mode="autoguidance", scale=1.5)
  assert not np.array_equal(got, common)


def test_interval_start_end_mode_and_fixed_labels(assets, tmp_path):
  got, labels = _run_job(assets, tmp_path, "cfg", guidance="cfg", scale=2.0,
                         cfg_interval_start=0.3, cfg_interval_end=0.7,
                         cfg_interval_mode="tex", labels="fixed", label_class=3)
  np.testing.assert_array_equal(labels, np.full(N, 3))
  want = _direct(assets, labels, mode="cfg", scale=2.0, interval_start=0.3,
                 interval_end=0.7, interval_mode="tex")
  np.testing.assert_array_equal(got, want)
  assert not np.array_equal(got, _direct(assets, labels, mode="cfg", scale=2.0))


def test_sde_options_and_unconditional_labels(assets, tmp_path):
  got, labels = _run_job(assets, tmp_path, "sde", method="sde", num_steps=7,
                         diffusion_form="sigma", diffusion_norm=0.5, last_step="euler",
                         last_step_size=0.05, sde_t_min=0.1, labels="unconditional")
  np.testing.assert_array_equal(labels, np.full(N, 10))     # the null class
  want = _direct(assets, labels, method="sde", num_steps=7, diffusion_form="sigma",
                 diffusion_norm=0.5, last_step="euler", last_step_size=0.05,
                 sde_t_min=0.1)
  np.testing.assert_array_equal(got, want)


def test_main_py_sample_flags(assets, tmp_path):
  """The options as command-line flags of ``main.py --mode=sample`` (one CPU device, as
  the direct call: with the batch split over 8 devices XLA's CPU matmuls of 1-row shards
  round differently in the last bits of the float latents)."""
  wd = tmp_path / "cli"
  flags = {"checkpoint": assets / "main", "guide_checkpoint": assets / "guide",
           "num_images": N, "batch_size": N, "num_steps": 6, "texture_vae": "",
           "guidance": "autoguidance", "scale": 1.8, "cfg_scale_sem": 1.3,
           "cfg_interval_end": 0.8, "cfg_interval_mode": "sem", "labels": "random",
           "method": "sde", "last_step": "none"}
  env = child_env(XLA_FLAGS="--xla_force_host_platform_device_count=1")
  proc = subprocess.run(
      [sys.executable, str(REPO / "main.py"), f"--config={REPO}/configs/tiny.py",
       "--mode=sample", f"--workdir={wd}", "--config.model.num_classes=10",
       *[f"--config.sample.{k}={v}" for k, v in flags.items()]],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  labels = generation.random_labels(np.arange(N), 10, 0)     # label_seed -1: seed 0
  np.testing.assert_array_equal(np.load(wd / "samples" / f"labels_{N}.npy"), labels)
  want = _direct(assets, labels, mode="autoguidance", scale=1.8, scale_sem=1.3,
                 interval_end=0.8, interval_mode="sem", method="sde", last_step=None)
  np.testing.assert_array_equal(_latents(wd / "samples"), want)


def test_sample_reads_clocks_from_model():
  """samplers.sample without delta_t / semantic_chans uses the model's config."""
  cfg = DiTConfig(input_size=4, hidden_size=32, depth=1, num_heads=2, use_repa=False,
                  delta_t=0.2, semantic_chans=8, in_channels=24)
  model = LightningDiT(cfg, rngs=nnx.Rngs(0))
  assign(model, _random_params(cfg, 3))        # non-zero output layer
  fn = guidance.make_guided_velocity(model)
  assert fn.cfg is cfg
  z = jax.random.normal(jax.random.key(0), (2, 4, 4, 24))
  y = jnp.zeros(2, jnp.int32)
  a = samplers.sample(fn, z, y, method="euler", num_steps=5).x
  b = samplers.sample(fn, z, y, method="euler", num_steps=5, delta_t=0.2,
                      semantic_chans=8).x
  np.testing.assert_array_equal(a, b)
  c = samplers.sample(fn, z, y, method="euler", num_steps=5, delta_t=0.3,
                      semantic_chans=8).x          # explicit arguments still win
  assert not np.array_equal(a, c)
  assert samplers.model_clocks(lambda *a: a) == (0.3, 16)
  sync = DiTConfig(input_size=4, hidden_size=32, depth=1, num_heads=2, delta_t=0.0,
                   use_repa=False)
  assert samplers.model_clocks(LightningDiT(sync, rngs=nnx.Rngs(0))) == (0.0, 0)


def test_labels():
  idx = np.arange(1000)
  a = generation.random_labels(idx, 10, 3)
  np.testing.assert_array_equal(a[500:], generation.random_labels(idx[500:], 10, 3))
  assert a.min() == 0 and a.max() == 9 and np.bincount(a).min() > 70
  assert not np.array_equal(a, generation.random_labels(idx, 10, 4))
  opts = generation.SamplingOptions(labels="fixed", label_class=12)
  with pytest.raises(generation.SamplingError, match=r"config.sample.label_class=12"):
    generation.sample_labels(idx, 1000, 10, opts)
  with pytest.raises(generation.SamplingError, match="null class"):
    generation.sample_labels(idx, 1000, 10, generation.SamplingOptions(
        labels="unconditional"), has_null=False)
  # Default: balanced, padding indices clipped to the last class.
  np.testing.assert_array_equal(
      generation.sample_labels(np.arange(12), 10, 5, generation.SamplingOptions()),
      [0, 0, 1, 1, 2, 2, 3, 3, 4, 4, 4, 4])


@pytest.mark.parametrize("field,value,match", [
    ("labels", "uniform", r"config.sample.labels='uniform': expected one of"),
    ("cfg_interval_mode", "all", r"config.sample.cfg_interval_mode='all'"),
    ("method", "rk4", r"config.sample.method='rk4'"),
    ("diffusion_form", "cosine", r"config.sample.diffusion_form='cosine'"),
    ("last_step", "tweedie", r"config.sample.last_step='tweedie'"),
    ("cfg_interval_end", 0.1, r"config.sample.cfg_interval_end=0.1: must be in \(cfg_"),
    ("cfg_interval_start", 1.0, r"config.sample.cfg_interval_start=1.0"),
    ("last_step_size", 0.0, r"config.sample.last_step_size=0.0"),
    ("num_steps", 1, r"config.sample.num_steps=1"),
])
def test_option_errors_name_the_field(field, value, match):
  c = tiny_config.get_config()
  c.sample.guidance = "cfg"
  c.sample.scale = 1.5
  c.sample.cfg_interval_start = 0.2
  c.sample[field] = value
  with pytest.raises(generation.SamplingError, match=match):
    generation.SamplingOptions.from_config(c.sample)


def test_options_without_guidance_are_errors():
  c = tiny_config.get_config()     # guidance none
  c.sample.cfg_scale_sem = 2.0
  with pytest.raises(generation.SamplingError, match=r"cfg_scale_sem=2.0: has no effect"):
    generation.SamplingOptions.from_config(c.sample)
  c = tiny_config.get_config()
  c.train_eval.guidance = "cfg"
  c.train_eval.scale = 1.0       # guidance needs scale > 1
  c.train_eval.cfg_interval_end = 0.5
  with pytest.raises(generation.SamplingError, match=r"config.train_eval.cfg_interval_end"):
    generation.SamplingOptions.from_config(c.train_eval, "config.train_eval")
  c.sample.method = "sde"
  c.sample.timestep_shift = 0.3
  with pytest.raises(generation.SamplingError, match=r"timestep_shift=0.3: is defined for "
                     "the ODE grid only"):
    generation.SamplingOptions.from_config(c.sample)
  # The defaults are valid and change nothing.
  opts = generation.SamplingOptions.from_config(tiny_config.get_config().sample)
  assert opts.scales() == (None, None) and opts.interval() == (None, None)
  assert opts.labels == "balanced"


def _fake_run(workdir, steps_params):
  """A training workdir whose checkpoints hold only EMA weights (all load_dit reads)."""
  c = _guide_config()
  ckpt = Checkpointer(os.path.join(workdir, "checkpoints"), max_to_keep=None)
  for step, params in steps_params:
    ckpt.save(step, {"ema": params, "step": np.int32(step)}, {}, c.to_dict())
  ckpt.close()


def test_guide_and_checkpoint_step_from_a_workdir(assets, tmp_path):
  cfg = DiTConfig.from_config(_guide_config())
  p10, p20 = _random_params(cfg, 10), _random_params(cfg, 20)
  run = tmp_path / "guide_run"
  _fake_run(str(run), [(10, p10), (20, p20)])
  assert checkpoint.available_steps(str(run)) == [10, 20]

  def params(model):
    return jax.device_get(nnx.to_pure_dict(nnx.state(model, nnx.Param)))

  def same(a, b):
    return all(np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))

  c = _config(assets, guidance="autoguidance", scale=1.5, guide_checkpoint=str(run),
              guide_step=10)
  model, guide, _, _ = sampling.prepare(c)
  assert same(params(guide), p10)
  c.sample.guide_step = -1                   # latest
  assert same(params(sampling.prepare(c)[1]), p20)
  c.sample.checkpoint, c.sample.checkpoint_step = str(run), 10
  assert same(params(sampling.prepare(c)[0]), p10)
  c.sample.guide_step = 15
  with pytest.raises(generation.SamplingError, match=r"no checkpoint at step 15; available "
                     r"steps: \[10, 20\]"):
    sampling.prepare(c)
  c = _config(assets, guidance="autoguidance", scale=1.5, guide_step=10)   # converted dir
  with pytest.raises(generation.SamplingError, match="is a converted checkpoint"):
    sampling.prepare(c)
  c = _config(assets, guide_step=10)           # guidance none: no guide to pick a step of
  with pytest.raises(generation.SamplingError, match="config.sample.guide_step=10: no guide"):
    sampling.prepare(c)
  del model


def _guide_config():
  c = tiny_config.get_config()
  c.model.update(hidden_size=32, depth=1, num_heads=2, use_repa=False, num_classes=10)
  return c
