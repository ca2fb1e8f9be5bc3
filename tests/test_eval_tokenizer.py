"""Tokenizer evaluation (``--mode=eval_tokenizer``): rFID, PSNR, SSIM, LPIPS.

The metrics of a set against itself (rFID ≈ 0, PSNR inf, SSIM 1, LPIPS 0), SSIM against
a direct evaluation of its formula, and the job end to end on CPU with random networks
(a tiny texture VAE, LPIPS with narrow VGG widths, the demo's feature net for rFID).
"""
import dataclasses
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

import sfd_jax  # noqa: F401  (package set-up)
from configs import common
from sfd_jax.convert import common as convert_common
from sfd_jax.convert import networks
from sfd_jax.convert import lpips as lpips_convert
from sfd_jax.jobs import eval_tokenizer
from sfd_jax.metrics import adm
from sfd_jax.metrics import reconstruction as rec
from sfd_jax.models import feature_net

SIZE = 32


@pytest.fixture(scope="module")
def feature_dir(tmp_path_factory):
  net = feature_net.DemoFeatureNet(feature_net.FeatureNetConfig(image_size=SIZE),
                                   rngs=nnx.Rngs(0))
  return convert_common.save_params(str(tmp_path_factory.mktemp("featnet")),
                            nnx.to_pure_dict(nnx.state(net, nnx.Param)),
                            meta={"kind": "demo_feature_net",
                                  "config": dataclasses.asdict(net.config)}, force=True)


def _images(n, seed=0):
  rng = np.random.default_rng(seed)
  yy, xx = np.mgrid[0:SIZE, 0:SIZE] / SIZE
  out = []
  for _ in range(n):
    phase = rng.uniform(0, 6, size=3)
    img = 127.5 + 90 * np.sin(5 * xx[..., None] + 2 * yy[..., None] + phase)
    out.append(np.clip(img + rng.normal(0, 10, img.shape), 0, 255).astype(np.uint8))
  return np.stack(out)


def _naive_ssim(p, t):
  """torchmetrics' SSIM by its definition, one window at a time (NumPy, float64)."""
  p, t = np.clip(p, -1, 1).astype(np.float64), np.clip(t, -1, 1).astype(np.float64)
  g = rec._gaussian_window()  # pylint: disable=protected-access
  c1, c2 = (0.01 * 2) ** 2, (0.03 * 2) ** 2
  vals = []
  for i in range(p.shape[0] - 10):
    for j in range(p.shape[1] - 10):
      for c in range(p.shape[2]):
        a, b = p[i:i + 11, j:j + 11, c], t[i:i + 11, j:j + 11, c]
        ma, mb = (g * a).sum(), (g * b).sum()
        va, vb = (g * a * a).sum() - ma ** 2, (g * b * b).sum() - mb ** 2
        cov = (g * a * b).sum() - ma * mb
        vals.append((2 * ma * mb + c1) * (2 * cov + c2)
                    / ((ma ** 2 + mb ** 2 + c1) * (va + vb + c2)))
  return float(np.mean(vals))


def test_ssim_matches_its_definition():
  x = jnp.asarray(_images(2)[:, :14, :13] / 127.5 - 1.0, jnp.float32)
  y = jnp.clip(x + 0.3 * jax.random.normal(jax.random.key(0), x.shape), -1.2, 1.2)
  got = np.asarray(rec.ssim(y, x))
  for b in range(2):
    assert got[b] == pytest.approx(_naive_ssim(np.asarray(y[b]), np.asarray(x[b])), abs=1e-5)
  np.testing.assert_allclose(np.asarray(rec.ssim(x, x)), 1.0, atol=1e-6)


def test_metrics_of_a_set_against_itself(feature_dir):
  images = _images(12)
  extractor = adm.FeatureExtractor.from_model(networks.load_feature_net(feature_dir),
                                              batch_size=6)
  lp = lpips_convert.random_lpips(0, width=0.125)
  acc = rec.ReconstructionMetrics(extractor)
  fn = jax.jit(lambda x, r: rec.per_image_metrics(x, r, lp))
  for i in (0, 6):
    x = images[i:i + 6]
    out = jax.device_get(fn(x, jnp.asarray(x, jnp.float32) / 127.5 - 1.0))
    np.testing.assert_array_equal(out["recon_uint8"], x)   # the saving convention is exact
    acc.add(x, out)
  m = acc.result()
  assert m["num_images"] == 12 and m["psnr"] == float("inf")
  assert m["ssim"] == pytest.approx(1.0, abs=1e-6) and m["lpips"] == pytest.approx(0.0, abs=1e-7)
  assert abs(m["rfid"]) < 1e-3
  # a one-step darker copy: PSNR = 20·log10(255) exactly
  out = jax.device_get(fn(images[:6], (jnp.asarray(images[:6], jnp.float32) - 1.0) / 127.5
                          - 1.0))
  clipped = (images[:6] > 0).mean(axis=(1, 2, 3))     # pixels at 0 stay 0
  np.testing.assert_allclose(out["psnr"], 20 * np.log10(255.0 / np.sqrt(clipped)), rtol=1e-5)


def test_eval_tokenizer_job_end_to_end(feature_dir, tmp_path):
  images = tmp_path / "heldout" / "c0"
  os.makedirs(images)
  for i, img in enumerate(_images(10, seed=1)):
    Image.fromarray(img).save(images / f"{i}.png")
  (images / "broken.png").write_bytes(b"no image")
  c = common.texture_vae_config()
  c.eval_tokenizer.update(images=str(images.parent), image_size=SIZE, batch_size=8,
                          random_init=True, texture_vae_preset="tiny",
                          lpips_random_width=0.125, features="demo",
                          features_path=feature_dir, grid_images=4)
  info = eval_tokenizer.run(c, str(tmp_path / "work"))
  out_dir = tmp_path / "work" / "eval_tokenizer"
  with open(out_dir / "metrics.json") as f:
    saved = json.load(f)
  m = saved["metrics"]
  assert m == info["metrics"] and m["num_images"] == 10
  assert set(m) == {"psnr", "ssim", "lpips", "rfid", "num_images"}
  assert np.isfinite(m["psnr"]) and 0 < m["psnr"] < 60
  assert -1 <= m["ssim"] < 1 and m["lpips"] > 0 and m["rfid"] > 0
  assert (out_dir / "reconstructions.png").exists()
  assert list(out_dir.glob("events.out.tfevents.*"))
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=import-outside-toplevel
  acc = event_accumulator.EventAccumulator(str(out_dir))
  acc.Reload()
  tags = set(acc.Tags()["scalars"]) | set(acc.Tags()["tensors"])   # tensorboardX | clu
  assert {"eval_tokenizer/psnr", "eval_tokenizer/rfid"} <= tags, tags
  with Image.open(out_dir / "reconstructions.png") as grid:
    assert grid.size == (4 * SIZE + 5, 2 * SIZE + 3)
  c.eval_tokenizer.images = ""
  with pytest.raises(eval_tokenizer.TokenizerEvalError, match="images is empty"):
    eval_tokenizer.run(c, str(tmp_path / "work3"))
