"""Sampling and evaluation jobs end to end on tiny random networks (CPU)."""
import json
import os
import random
import sys

import jax
import numpy as np
import pytest
from flax import nnx
from PIL import Image

import sfd_jax  # noqa: F401
from sfd_jax.diffusion import generation
from sfd_jax.jobs import evaluate, sample
from sfd_jax.convert import lightning_dit as dit_conv
from sfd_jax.convert import texture_vae as tvae_conv
from sfd_jax.convert.common import save_params
from sfd_jax.data import stats as stats_lib
from sfd_jax.models.lightning_dit import DiTConfig, LightningDiT
from sfd_jax.models.texture_vae import TextureVAE, TextureVAEConfig
from tests.conftest import REPO

sys.path.insert(0, str(REPO))
from configs import tiny as tiny_config  # noqa: E402  pylint: disable=wrong-import-position

DIT = DiTConfig(input_size=4, hidden_size=64, depth=2, num_heads=4, use_repa=False)
VAE = TextureVAEConfig(ch=32, ch_mult=(1, 2), num_res_blocks_enc=1, num_res_blocks_dec=1,
                       attn_resolutions=(), z_channels=32, embed_dim=32, resolution=8)


def _random_params(module, seed, scale=0.05):
  params = nnx.to_pure_dict(nnx.state(module, nnx.Param))
  leaves, tree = jax.tree.flatten(params)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.device_get(jax.tree.unflatten(
      tree, [l + scale * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)]))


@pytest.fixture(scope="module")
def assets(tmp_path_factory):
  root = tmp_path_factory.mktemp("sample_assets")
  main = LightningDiT(DIT, rngs=nnx.Rngs(0))
  save_params(root / "main", _random_params(main, 1), dit_conv.config_to_meta(DIT))
  guide_cfg = DiTConfig(input_size=4, hidden_size=64, depth=1, num_heads=4, use_repa=False)
  guide = LightningDiT(guide_cfg, rngs=nnx.Rngs(1))
  save_params(root / "guide", _random_params(guide, 2), dit_conv.config_to_meta(guide_cfg))
  bad_cfg = DiTConfig(input_size=4, hidden_size=64, depth=1, num_heads=4, use_repa=False,
                      in_channels=40, semantic_chans=8)
  bad = LightningDiT(bad_cfg, rngs=nnx.Rngs(1))
  save_params(root / "bad_guide", _random_params(bad, 3), dit_conv.config_to_meta(bad_cfg))
  vae = TextureVAE(VAE, rngs=nnx.Rngs(0))
  tvae_conv.save_converted(root / "vae", _random_params(vae, 4, scale=0.02), VAE)
  rng = np.random.default_rng(0)
  stats_lib.LatentStats(rng.normal(size=32).astype(np.float32),
                        (0.5 + rng.random(32)).astype(np.float32),
                        np.zeros(16, np.float32), np.ones(16, np.float32)).save(
                            root / "stats.npz")
  return root


def _config(assets, **kw):
  c = tiny_config.get_config()
  c.sample.checkpoint = str(assets / "main")
  c.sample.guide_checkpoint = str(assets / "guide")
  c.sample.guidance = "autoguidance"
  c.sample.scale = 1.5
  c.sample.texture_vae = str(assets / "vae")
  c.sample.stats = str(assets / "stats.npz")
  c.sample.num_images = 16
  c.sample.batch_size = 8
  for k, v in kw.items():
    c.sample[k] = v
  return c


def _pngs(d, n):
  return np.stack([np.asarray(Image.open(os.path.join(d, f"{i:06d}.png"))) for i in range(n)])


@pytest.fixture(scope="module")
def sampled(assets, tmp_path_factory):
  wd = tmp_path_factory.mktemp("sample_run")
  result = sample.run(_config(assets), str(wd))
  return wd, result


def test_sampling_job_outputs(sampled):
  wd, result = sampled
  imgs = _pngs(wd / "samples", 16)
  assert imgs.shape == (16, 8, 8, 3) and imgs.dtype == np.uint8
  assert imgs.std() > 0
  arr = np.load(result["npz"])["arr_0"]
  assert arr.shape == (16, 8, 8, 3) and arr.dtype == np.uint8
  order = list(range(16))
  random.seed(42)
  random.shuffle(order)
  np.testing.assert_array_equal(arr, imgs[order])   # the reference's shuffled packing
  # On CPU the sampling program is compiled with Eigen dots (core/jit.py), and says so.
  from sfd_jax.core import jit as jit_lib  # pylint: disable=import-outside-toplevel
  with open(wd / "sample_info.json") as f:
    info = json.load(f)
  assert info["compiler_options"] == dict(jit_lib.CPU_INFERENCE_OPTIONS)


def test_balanced_labels_and_noise_are_per_index():
  np.testing.assert_array_equal(generation.balanced_labels(np.arange(50_000), 50_000, 1000),
                                np.arange(50_000) // 50)
  a = generation.noise_for(jax.numpy.arange(4), 3, (2, 2, 3))
  b = generation.noise_for(jax.numpy.arange(2, 6), 3, (2, 2, 3))
  np.testing.assert_array_equal(a[2:], b[:2])


@pytest.mark.parametrize("ndev", [1, 2])
def test_images_identical_for_any_device_count(assets, sampled, tmp_path, ndev):
  wd, _ = sampled   # 8 devices
  other = tmp_path / f"dev{ndev}"
  sample.run(_config(assets), str(other), devices=jax.devices()[:ndev])
  np.testing.assert_array_equal(_pngs(other / "samples", 16), _pngs(wd / "samples", 16))


def test_resume_skips_finished_and_rewrites_missing(assets, sampled, tmp_path):
  wd, _ = sampled
  d = tmp_path / "resume"
  (d / "samples").mkdir(parents=True)
  ref = wd / "samples"
  for i in range(8):   # the first batch "finished" earlier
    (d / "samples" / f"{i:06d}.png").write_bytes((ref / f"{i:06d}.png").read_bytes())
  mtimes = [os.path.getmtime(d / "samples" / f"{i:06d}.png") for i in range(8)]
  sample.run(_config(assets), str(d))
  assert mtimes == [os.path.getmtime(d / "samples" / f"{i:06d}.png") for i in range(8)]
  np.testing.assert_array_equal(_pngs(d / "samples", 16), _pngs(ref, 16))


def test_bad_checkpoint_and_guide_errors(assets, tmp_path):
  with pytest.raises(generation.SamplingError, match="nope"):
    sample.run(_config(assets, checkpoint=str(tmp_path / "nope")), str(tmp_path / "a"))
  with pytest.raises(generation.SamplingError, match="guide model has in_channels=40"):
    sample.run(_config(assets, guide_checkpoint=str(assets / "bad_guide")),
               str(tmp_path / "b"))


def test_eval_job_end_to_end(assets, sampled, tmp_path):
  """Random-weight Inception on CPU: checks the wiring (files, metrics present), and that
  FID of the samples against themselves is ~0."""
  from sfd_jax.metrics import adm
  from sfd_jax.models import inception as inc
  net = inc.InceptionV3(rngs=nnx.Rngs(0), num_classes=8)
  save_params(tmp_path / "inception",
              jax.device_get(nnx.to_pure_dict(nnx.state(net, (nnx.Param, nnx.BatchStat)))),
              {})
  wd, result = sampled
  c = _config(assets)
  c.eval.inception = str(tmp_path / "inception")
  c.eval.reference_npz = result["npz"]     # the samples themselves: FID ≈ 0
  c.eval.batch_size = 8
  c.eval.grid_images = 16
  info = evaluate.run(c, str(wd))
  m = info["metrics"]
  assert set(m) == {"fid", "sfid", "inception_score", "precision", "recall"}
  assert abs(m["fid"]) < 1e-3 and m["precision"] == 1.0 and m["recall"] == 1.0
  assert (wd / "eval" / "metrics.json").exists() and (wd / "eval" / "grid.png").exists()
  assert list((wd / "eval").glob("events.out.tfevents.*"))
  del adm
  # Eval only: the same npz scored without a model (no checkpoint, no texture VAE)
  # gives the same metrics.
  c.eval.samples_npz = result["npz"]
  c.sample.checkpoint = c.sample.texture_vae = ""
  only = evaluate.run(c, str(tmp_path / "eval_only"))
  assert only["metrics"] == m
  assert (tmp_path / "eval_only" / "eval" / "grid.png").exists()
  assert not (tmp_path / "eval_only" / "samples").exists()
  c.eval.samples_npz = str(tmp_path / "missing.npz")
  with pytest.raises(evaluate.EvalError, match="samples_npz=.*missing.npz.* does not exist"):
    evaluate.run(c, str(tmp_path / "x"))
