"""The texture VAE's GAN recipe on the training core (``--mode=train_texture_vae``,
``config.loss.name = "ldm"``), on a tiny VA-VAE: random LPIPS (VGG widths / 8), a
3-layer PatchGAN (ndf 8), VF loss to pre-extracted features.

Both losses move; the discriminator's loss is 0 before ``disc_start`` (reference steps:
batch b is 2b + 1 for the discriminator, 2b for the generator) and the adversarial factor
switches on one batch later; the BatchNorm statistics are updated three times per batch;
a run preempted by SIGTERM and one killed by SIGKILL (through main.py) resume to exactly
the parameters, optimizer states, discriminator and statistics of an uninterrupted run.
Plus the pieces around it: the feature source, the VF input resize, the ViT-L/14
preset and the register-free DINOv2 conversion.
"""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import sfd_jax  # noqa: F401  (package set-up)
from configs import texture_vae_f16d32_ldm, texture_vae_f16d32_vavae, tiny_vae
from sfd_jax.checkpoint import export, runs
from sfd_jax.convert import common, networks
from sfd_jax.core import trees
from sfd_jax.convert import dinov2 as dino_convert
from sfd_jax.data import features as features_lib
from sfd_jax.data import vae_pipeline
from sfd_jax.data import preprocess
from sfd_jax.models import dinov2, texture_vae
from sfd_jax.training import vae as vae_train
from tests.util import main_killed_after, preempted_at
from tests.conftest import REPO
from tests.test_vae_train import Recorder, _images_dir

STEPS, PREEMPT, KILL = 4, 2, 3   # checkpoints every 2 steps (tiny config: 4)
DEVICES = 8   # all of conftest's fake devices: main.py (the SIGKILL run) uses them all,
              # and XLA's CPU kernels round differently with another device count
NUM_SOURCE_IMAGES = 25      # _images_dir: 24 images and one unreadable file
VF_DIM = 16


def _features_dir(root):
  """One 24×24-token record per source image; token 0 holds the source index."""
  rng = np.random.default_rng(2)
  feats = rng.normal(size=(NUM_SOURCE_IMAGES, 24 * 24, VF_DIM)).astype(np.float16)
  feats[:, 0, 0] = np.arange(NUM_SOURCE_IMAGES)
  d = os.path.join(root, "vf_features")
  features_lib.write_feature_dataset(d, feats, [0] * NUM_SOURCE_IMAGES, records_per_shard=10)
  return d


@pytest.fixture(scope="module")
def dirs(tmp_path_factory):
  root = str(tmp_path_factory.mktemp("gan"))
  data, feats = _images_dir(root), _features_dir(root)
  c = tiny_vae.get_config(f"job=texture_gan,data={data},vf=features,vf_features={feats}")
  model = networks.random_network(
      functools.partial(texture_vae.ProjectedTextureVAE, vf_dim=VF_DIM),
      vae_train.model_config(c, "texture_vae"), None, 3)
  init = common.save_params(os.path.join(root, "init"), trees.to_numpy(
      nnx.to_pure_dict(nnx.state(model, nnx.Param))), meta={"kind": "texture_vae"})
  out = {"root": root, "data": data, "features": feats, "init": init}
  # one compiled setup for every run of the module (they share model, loss and mesh)
  out["setup"] = vae_train.build_setup(_config(out), "texture_vae", jax.devices()[:DEVICES])
  return out


def _config(dirs, **overrides):
  c = tiny_vae.get_config(f"job=texture_gan,data={dirs['data']},steps={STEPS},vf=features,"
                          f"vf_features={dirs['features']}")
  c.mesh.update(data=DEVICES // 2, fsdp=2)
  c.checkpoint_every_steps = 100  # saves at the end and on preemption only
  c.init_from = dirs["init"]
  for k, v in overrides.items():
    setattr(c, k, v)
  return c


def _train(dirs, name, writer=None, **overrides):
  return vae_train.train_model(_config(dirs, **overrides), os.path.join(dirs["root"], name),
                               "texture_vae", writer=writer or Recorder(),
                               setup=dirs["setup"])


def _same_state(a, b):
  assert sorted(a) == sorted(b)
  for x, y in zip(jax.tree.leaves(jax.device_get(a)), jax.tree.leaves(jax.device_get(b))):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_gan_trains_and_resume_is_exact(dirs):
  rec = Recorder()
  straight = _train(dirs, "straight", rec)
  assert straight["step"] == STEPS
  state = straight["state"]
  assert {"params", "opt_state", "disc_params", "disc_opt_state", "disc_stats"} <= set(state)
  assert "linear_proj" in state["params"]
  m = [rec.scalars[s] for s in range(1, STEPS + 1)]
  assert all(np.isfinite(v) for row in m for v in row.values())
  # disc_start 3 in reference steps: d-loss from batch 1 (its step 3), g-term from batch 2
  # (step 4)
  assert m[0]["disc/disc_loss"] == 0.0 and all(r["disc/disc_loss"] > 0 for r in m[1:])
  assert [r["ae/disc_factor"] for r in m] == [0.0, 0.0] + [1.0] * (STEPS - 2)
  for name in ("ae/loss", "ae/nll_loss", "ae/vf_loss", "disc/loss"):
    assert len({r[name] for r in m[1:]}) == STEPS - 1, (name, [r[name] for r in m])
  assert all(r["ae/d_weight"] > 0 and r["ae/vf_weight"] > 0 for r in m)
  assert m[-1]["disc/grad_norm"] > 0 and m[-1]["ae/grad_norm"] > 0
  # BatchNorm statistics: generator call, real batch, reconstructions: 3 updates a batch
  counts = jax.tree.leaves(jax.tree.map(
      lambda x: int(x) if x.ndim == 0 else None, jax.device_get(state["disc_stats"])))
  assert counts and set(counts) == {3 * STEPS}

  # SIGTERM after PREEMPT steps (saved there), then resumed to STEPS.
  with preempted_at(vae_pipeline, "make_train_iterator", PREEMPT):
    first = _train(dirs, "sigterm")
  assert first["step"] == PREEMPT
  rec2 = Recorder()
  second = _train(dirs, "sigterm", rec2)
  assert second["step"] == STEPS and min(rec2.scalars) == PREEMPT + 1
  _same_state(second["state"], state)
  for s in range(PREEMPT + 1, STEPS + 1):
    assert rec2.scalars[s]["ae/loss"] == rec.scalars[s]["ae/loss"]
    assert rec2.scalars[s]["disc/loss"] == rec.scalars[s]["disc/loss"]

  # SIGKILL after step KILL (step 2 saved), through main.py.
  kill = os.path.join(dirs["root"], "sigkill")
  cfg = (f"--config={REPO}/configs/tiny_vae.py:job=texture_gan,data={dirs['data']},"
         f"steps={STEPS},vf=features,vf_features={dirs['features']}")
  proc = main_killed_after(
      ["--mode=train_texture_vae", cfg, f"--workdir={kill}",
       f"--config.mesh.data={DEVICES // 2}", "--config.mesh.fsdp=2",
       "--config.checkpoint_every_steps=2", f"--config.init_from={dirs['init']}"],
      KILL, os.path.join(kill, "checkpoints", "2"))
  assert proc.returncode == -9, proc.stderr[-3000:]
  steps = sorted(int(p) for p in os.listdir(os.path.join(kill, "checkpoints")) if p.isdigit())
  assert steps == [2], steps
  resumed = _train(dirs, "sigkill")
  assert resumed["step"] == STEPS
  _same_state(resumed["state"], state)

  # Export writes the autoencoder alone (no discriminator, no VF projection).
  dst = export.export_converted(_config(dirs), kill, "texture_vae",
                                os.path.join(dirs["root"], "export"))
  loaded = networks.load_network("texture_vae", dst)
  assert not hasattr(loaded, "linear_proj")
  # --mode=eval_tokenizer reads the run directly (the autoencoder part of "params")
  from_run = runs.load_texture_vae(kill, weights="params")
  want = {k: v for k, v in jax.device_get(state["params"]).items() if k != "linear_proj"}
  _same_state(nnx.to_pure_dict(nnx.state(from_run, nnx.Param)), want)
  _same_state(nnx.to_pure_dict(nnx.state(loaded, nnx.Param)), want)
  with pytest.raises(ValueError, match="no 'ema'"):
    export.export_converted(_config(dirs), kill, "texture_vae",
                            os.path.join(dirs["root"], "export_ema"), weights="ema")


def test_feature_source_follows_the_images(dirs):
  """Each batch element carries the features of its own source image."""
  c = _config(dirs)
  it = vae_pipeline.make_train_iterator(c, "texture_vae", process_index=0, process_count=1)
  source, transform = vae_pipeline.source_and_transform("texture_vae", c)
  crops = {}
  for i in range(len(source)):
    out = transform(source[i])
    if out is not None:
      crops[i] = out["image"]
  for _ in range(2):
    batch = next(it)
    assert batch["vf_features"].shape == (8, 24 * 24, VF_DIM)
    for img, feat in zip(batch["image"], batch["vf_features"]):
      idx = int(feat[0, 0])
      np.testing.assert_array_equal(img, crops[idx])
  bad = _config(dirs)
  bad.data.random_flip = True
  with pytest.raises(ValueError, match="unflipped"):
    vae_train.build_setup(bad, "texture_vae", jax.devices()[:DEVICES])


def test_vf_input_is_torch_bilinear():
  """The VF model's input: bilinear without antialias (torch's align_corners=False).

  JAX's own linear resize is the same rule with other coordinate rounding (this one
  follows PyTorch's float32 source coordinates): equal to ~1e-5.
  """
  x = jax.random.uniform(jax.random.key(0), (1, 256, 256, 3), minval=-1.0, maxval=1.0)
  for size in (224, 336):
    got = preprocess.vf_foundation_input(x, size)
    want = jax.image.resize(x, (1, size, size, 3), "linear", antialias=False)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-4)
  m = preprocess.torch_bilinear_matrix(4, 3)   # s = (i + 0.5)·4/3 − 0.5
  np.testing.assert_allclose(m, [[5 / 6, 1 / 6, 0, 0], [0, 0.5, 0.5, 0], [0, 0, 1 / 6, 5 / 6]],
                             atol=1e-6)


def test_dinov2_vitl14_preset_and_register_free_conversion():
  cfg = dinov2.DinoV2Config.vitl14()
  assert (cfg.embed_dim, cfg.depth, cfg.num_heads, cfg.num_register_tokens, cfg.mlp_hidden,
          cfg.patch_size, cfg.grid_size, cfg.interpolate_antialias) == (
              1024, 24, 16, 0, 4096, 14, 37, True)
  assert dinov2.DinoV2Config.preset("vitl14") == cfg
  # a register-free state dict in the reference layout (timm / hub key names)
  tiny = dinov2.DinoV2Config.tiny_noreg()
  net = networks.random_network(dinov2.DinoV2, tiny, None, 1)
  assert net.register_tokens is None
  p = jax.tree.map(np.asarray, nnx.to_pure_dict(nnx.state(net, nnx.Param)))
  sd = {"cls_token": p["cls_token"][None], "pos_embed": p["pos_embed"][None],
        "patch_embed.proj.weight": p["patch_embed"]["kernel"].transpose(3, 2, 0, 1),
        "patch_embed.proj.bias": p["patch_embed"]["bias"],
        "norm.weight": p["norm"]["scale"], "norm.bias": p["norm"]["bias"]}
  for i, b in p["blocks"].items():
    for name in ("norm1", "norm2"):
      sd[f"blocks.{i}.{name}.weight"], sd[f"blocks.{i}.{name}.bias"] = (
          b[name]["scale"], b[name]["bias"])
    for name, sub in (("attn.qkv", b["attn"]["qkv"]), ("attn.proj", b["attn"]["proj"]),
                      ("mlp.fc1", b["mlp"]["fc1"]), ("mlp.fc2", b["mlp"]["fc2"])):
      sd[f"blocks.{i}.{name}.weight"], sd[f"blocks.{i}.{name}.bias"] = (
          sub["kernel"].T, sub["bias"])
    sd[f"blocks.{i}.ls1.gamma"], sd[f"blocks.{i}.ls2.gamma"] = (b["ls1"]["gamma"],
                                                                b["ls2"]["gamma"])
  params = dino_convert.convert_state_dict(sd, tiny)
  back = dino_convert.build_abstract(tiny)
  common.assign(back, params)
  _same_state(nnx.to_pure_dict(nnx.state(back, nnx.Param)), p)
  graph, weights = nnx.split(back)
  x = jax.random.normal(jax.random.key(1), (1, 56, 56, 3))
  out = jax.jit(lambda w, x: nnx.merge(graph, w).patch_features(x))(weights, x)
  assert out.shape == (1, 16, 64) and bool(jnp.all(jnp.isfinite(out)))


def test_recipe_configs():
  ldm = texture_vae_f16d32_ldm.get_config()
  va = texture_vae_f16d32_vavae.get_config("dinov2=/w/vitl14")
  for c in (ldm, va):
    assert (c.loss.name, c.loss.disc_start, c.loss.kl_weight, c.loss.disc_weight) == (
        "ldm", 5001, 1e-6, 0.5)
    assert (c.optimizer.lr, c.optimizer.b1, c.optimizer.b2) == (1e-4, 0.5, 0.9)
    assert (c.disc_optimizer.lr, c.disc_optimizer.b1, c.disc_optimizer.b2) == (1e-4, 0.5, 0.9)
    assert c.batch_size == 256 and c.model.ch_mult == (1, 1, 2, 2, 4)
  assert not ldm.loss.use_vf
  assert (va.loss.use_vf, va.loss.vf_weight, va.loss.adaptive_vf, va.loss.distmat_margin,
          va.loss.cos_margin, va.loss.vf_dim, va.loss.vf_image_size, va.loss.vf_dinov2) == (
              True, 0.1, True, 0.25, 0.5, 1024, 224, "/w/vitl14")
  assert texture_vae_f16d32_vavae.get_config("vf_features=/f").loss.vf_source == "features"


def test_extract_vf_features(dirs, tmp_path):
  """--mode=extract with extract.recipe=vf: the trainer's crop, bilinear, DINOv2 tokens."""
  from sfd_jax.data import images as images_lib  # pylint: disable=import-outside-toplevel
  from sfd_jax.jobs import extract  # pylint: disable=import-outside-toplevel
  c = tiny_vae.get_config(f"job=encode,data={dirs['data']}")
  c.extract.update(recipe="vf", image_size=24, vf_size=112, dinov2_preset="tiny_noreg")
  out = str(tmp_path / "vf")
  result = extract.run(c, out)
  assert result["complete"] and len(result["skipped"]) == 1      # the unreadable file
  feats = features_lib.FeatureRecords(out)
  assert len(feats) == NUM_SOURCE_IMAGES - 1
  assert feats.spec == features_lib.FeatureSpec(64, 64, "float16")
  src = images_lib.ImageFolderSource(dirs["data"])
  crop = preprocess.adm_center_crop(images_lib.open_image(src[3]), 24)
  dino = networks.load_network("dinov2", "", random_init=True, preset="tiny_noreg",
                               seed=c.seed)
  graph, weights = nnx.split(dino)
  x = preprocess.vf_foundation_input(preprocess.uint8_to_m11(crop[None]), 112)
  ref = jax.jit(lambda w, x: nnx.merge(graph, w).patch_features(x))(weights, x)[0]
  np.testing.assert_allclose(np.asarray(feats[3]["features"], np.float32), np.asarray(ref),
                             rtol=2e-3, atol=2e-3)
  # a skipped image would shift every later record: the trainer refuses the pairing
  bad = _config(dirs)
  bad.data.vf_features = out
  with pytest.raises(ValueError, match="24 records for 25 images"):
    vae_pipeline.make_train_iterator(bad, "texture_vae", process_index=0, process_count=1)
