"""Tests of the latent-encoding job (--mode=encode), the SemVAE feature extraction
(--mode=extract) and the image sources, with tiny random networks.

The image folder has 3 class folders with 3 RGB PNGs each plus a grayscale PNG, a CMYK
JPEG, a 10×10 PNG, a corrupt "JPEG" and a text file (13 image files, 12 readable).
Tiny sizes (configs/tiny_vae.py): 32 px crops → texture f4 → 8×8×4; DINOv2 (patch 14,
width 64) at 112 px → 8×8 tokens; SemVAE → 8×8×8. Shards of 5 images.
"""
import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from PIL import Image

import sfd_jax  # noqa: F401  (package set-up)
from configs import tiny_vae
from sfd_jax.convert import networks
from sfd_jax.data import features
from sfd_jax.jobs import encode, extract
from sfd_jax.data import images as images_lib
from sfd_jax.data import pipeline, preprocess, records
from sfd_jax.data import stats as stats_lib
from sfd_jax.data.schema import DataFormatError

CLASSES = ("n01", "n02", "n03")
CORRUPT = "n02/corrupt.jpg"
FAST_COMPILE = {"xla_backend_optimization_level": 0}


@pytest.fixture(scope="module")
def image_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("images")
  rng = np.random.default_rng(0)
  for cls, (h, w) in zip(CLASSES, [(40, 56), (64, 48), (50, 70)]):
    os.makedirs(root / cls)
    for j in range(3):
      img = rng.integers(0, 256, size=(h + 3 * j, w, 3), dtype=np.uint8)
      Image.fromarray(img).save(root / cls / f"img{j}.png")
  Image.fromarray(rng.integers(0, 256, size=(45, 60), dtype=np.uint8), "L").save(
      root / "n01" / "gray.png")
  Image.fromarray(rng.integers(0, 256, size=(48, 52, 4), dtype=np.uint8), "CMYK").save(
      root / "n02" / "cmyk.jpg")
  Image.fromarray(rng.integers(0, 256, size=(10, 10, 3), dtype=np.uint8)).save(
      root / "n03" / "tiny.png")
  (root / CORRUPT).write_bytes(b"\xff\xd8\xff\xe0 not a JPEG at all")
  (root / "n03" / "notes.txt").write_text("not an image")
  return str(root)


def _config(image_dir, **job):
  c = tiny_vae.get_config(f"job=encode,data={image_dir}")
  c.job.update(**job)
  return c


@pytest.fixture(scope="module")
def encoded(image_dir, tmp_path_factory):
  out = str(tmp_path_factory.mktemp("encoded"))
  return out, encode.run(_config(image_dir), out)


def _shard_bytes(directory):
  return {f: open(os.path.join(directory, f), "rb").read()
          for f in sorted(os.listdir(directory)) if f.endswith(".array_record")}


def test_image_folder_source_and_decoding(image_dir):
  src = images_lib.ImageFolderSource(image_dir)
  assert src.classes == list(CLASSES)
  names = [src[i]["name"] for i in range(len(src))]
  assert len(src) == 13 and "n03/notes.txt" not in names
  assert names[:4] == ["n01/gray.png", "n01/img0.png", "n01/img1.png", "n01/img2.png"]
  assert [src[i]["label"] for i in range(len(src))] == [0] * 4 + [1] * 5 + [2] * 4
  for name in ("n01/gray.png", "n02/cmyk.jpg", "n03/tiny.png"):
    img = images_lib.open_image(src[names.index(name)])
    assert img.mode == "RGB"
    assert preprocess.adm_center_crop(img, 32).shape == (32, 32, 3)
  with pytest.raises(images_lib.BadImageError, match="corrupt.jpg"):
    images_lib.open_image(src[names.index(CORRUPT)])
  with pytest.raises(ValueError, match="not one of"):
    images_lib.make_source({"source": "webdataset"})


def test_encode_writes_trainer_records(encoded, image_dir):
  out, result = encoded
  assert result["complete"] and result["num_records"] == 12
  assert [s["name"] for s in result["skipped"]] == [CORRUPT]
  meta = json.load(open(os.path.join(out, "dataset.json")))["metadata"]
  assert [s["name"] for s in meta["skipped_images"]] == [CORRUPT]

  recs = records.LatentRecords(out)
  sch = recs.schema
  assert (sch.grid, sch.texture_channels, sch.semantic_channels, sch.repa_dim) == (8, 4, 8, 64)
  assert [int(recs[i]["label"]) for i in range(len(recs))] == [0] * 4 + [1] * 4 + [2] * 4
  r = recs[0]
  assert r["repa"].dtype == np.float16 and r["texture"].shape == (8, 8, 4)
  assert not np.allclose(r["texture"], r["texture_flip"])

  # The trainer's pipeline reads it (flip choice, normalisation with stats.npz).
  it = pipeline.build_pipeline(out, batch_size=4, process_index=0, process_count=1)
  batch = next(it)
  assert batch["latent"].shape == (4, 8, 8, 12) and batch["repa"].shape == (4, 64, 64)
  it.close()
  # stats.npz: min(10000, N) = all 12 unflipped records.
  stored = stats_lib.load_stats(out)
  ref = stats_lib.compute_stats(recs, num_samples=12, seed=0)
  np.testing.assert_allclose(stored.texture_std, ref.texture_std, rtol=1e-6)
  np.testing.assert_allclose(stored.semantic_mean, ref.semantic_mean, rtol=1e-6, atol=1e-7)

  # Record of the grayscale image (global index 0) recomputed one image at a time:
  # posterior samples with noise from fold_in(key(seed), index), flip after the crop.
  c = _config(image_dir)
  tvae, dino, semvae = encode.build_networks(c)
  src = images_lib.ImageFolderSource(image_dir)
  crop = preprocess.adm_center_crop(images_lib.open_image(src[0]), 32)

  graphdefs, states = zip(*(nnx.split(m) for m in (tvae, dino, semvae)))

  @functools.partial(jax.jit, compiler_options=FAST_COMPILE)
  def one(states, x, key):
    tvae, dino, semvae = (nnx.merge(g, s) for g, s in zip(graphdefs, states))
    keys = jax.random.split(jax.random.fold_in(key, 0), 4)
    out = {}
    for flip, suffix in ((0, ""), (1, "_flip")):
      v = x[:, :, ::-1] if flip else x
      post = tvae.encode(v)
      out["texture" + suffix] = post.sample(
          eps=jax.random.normal(keys[flip], post.mean.shape[1:])[None])[0]
      feats = dino.patch_features(preprocess.dino_extraction_input(v, 112))
      eps = jax.random.normal(keys[2 + flip], (8, 8, 8))[None]
      out["semantic" + suffix] = semvae.encode(feats).sample(eps_nchw=eps)[0].reshape(8, 8, 8)
      out["repa" + suffix] = feats[0].reshape(8, 8, 64)
    return out

  expected = one(states, preprocess.uint8_to_m11(crop[None]), jax.random.key(c.seed))
  for k, v in expected.items():
    np.testing.assert_allclose(np.asarray(r[k], np.float32), np.asarray(v), rtol=2e-3,
                               atol=2e-3, err_msg=k)


def test_encode_is_deterministic_and_resumable(encoded, image_dir, tmp_path):
  ref_dir, _ = encoded
  out = str(tmp_path / "run")
  first = encode.run(_config(image_dir, debug_stop_after_shards=1), out)
  assert not first["complete"]
  assert list(_shard_bytes(out)) == ["data-00000-of-00003.array_record"]
  assert not os.path.exists(os.path.join(out, "dataset.json"))

  assert encode.run(_config(image_dir), out)["complete"]
  reference = _shard_bytes(ref_dir)
  assert _shard_bytes(out) == reference                  # identical records, both runs

  # A truncated last shard (killed mid-write on a filesystem without atomic rename)
  # is redone; finished shards are kept as they are.
  last = os.path.join(out, "data-00002-of-00003.array_record")
  with open(last, "r+b") as f:
    f.truncate(os.path.getsize(last) // 2)
  first_shard = os.path.join(out, "data-00000-of-00003.array_record")
  mtime = os.stat(first_shard).st_mtime_ns
  result = encode.run(_config(image_dir), out)
  assert result["complete"] and result["num_records"] == 12
  assert os.stat(first_shard).st_mtime_ns == mtime
  assert _shard_bytes(out) == reference
  recs, ref_recs = records.LatentRecords(out), records.LatentRecords(ref_dir)
  assert len(recs) == 12
  for i in range(12):  # no duplicates, no gaps
    np.testing.assert_array_equal(recs[i]["texture"], ref_recs[i]["texture"])

  other = _config(image_dir)
  other.seed = 7
  with pytest.raises(ValueError, match="seed"):
    encode.run(other, out)


def test_encode_checks_that_the_networks_fit(image_dir, tmp_path):
  c = _config(image_dir)
  c.encode.dino_size = 98    # 7×7 DINOv2 tokens vs an 8×8 texture grid
  with pytest.raises(ValueError, match="grid"):
    encode.run(c, str(tmp_path / "bad"))


def test_extract_features(image_dir, tmp_path):
  out = str(tmp_path / "features")
  c = _config(image_dir)
  result = extract.run(c, out)
  assert result["complete"] and [s["name"] for s in result["skipped"]] == [CORRUPT]
  feats = features.FeatureRecords(out)
  assert len(feats) == 12 and feats.spec == features.FeatureSpec(64, 64, "float16")
  rec = feats[5]
  assert rec["features"].dtype == np.float16 and int(rec["label"]) == 1

  # Record 5 = image 6 of the folder (after the corrupt one): SemVAE *training*
  # preprocessing (resize 128, centre crop 112) → DINOv2 patch tokens.
  src = images_lib.ImageFolderSource(image_dir)
  assert src[5]["name"] == CORRUPT
  x = preprocess.semvae_training_dino_input(images_lib.open_image(src[6]), 128, 112)
  dino = networks.load_network("dinov2", "", random_init=True, preset="tiny",
                                       seed=c.seed)
  graphdef, state = nnx.split(dino)
  ref = jax.jit(lambda s, x: nnx.merge(graphdef, s).patch_features(x),
                compiler_options=FAST_COMPILE)(state, jnp.asarray(x)[None])[0]
  np.testing.assert_allclose(np.asarray(rec["features"], np.float32), np.asarray(ref),
                             rtol=2e-3, atol=2e-3)

  spec = feats.spec
  with pytest.raises(DataFormatError, match="bytes"):
    spec.decode(b"\0" * 10, where="x")
  with pytest.raises(DataFormatError, match="float16"):
    spec.encode(np.zeros((64, 64), np.float32), 0, where="x")


def _toy_job(image_dir, directory, p=0, count=1, **kw):
  """A sharded job over the image folder with a trivial host computation (4 shards)."""
  src = images_lib.ImageFolderSource(image_dir)
  plan = images_lib.ShardPlan(len(src), 4)
  spec = features.FeatureSpec(2, 3, "float16")
  return images_lib.run_sharded_job(
      src, directory, plan, batch_size=3,
      prepare=lambda img: np.asarray(img.resize((4, 4)), np.float32),
      compute=lambda x, idx: {"f": np.broadcast_to(
          (x.mean(axis=(1, 2, 3)) + idx)[:, None, None], (len(x), 2, 3))},
      to_records=lambda out, labels: [
          {"features": f.astype(np.float16), "label": l} for f, l in zip(out["f"], labels)],
      open_writer=lambda path: features.FeatureShardWriter(path, spec),
      process_index=p, process_count=count, decode_threads=2, name="test", **kw)


def test_sharded_job_progress_bar_on_a_terminal_lines_otherwise(image_dir, tmp_path,
                                                                 monkeypatch, capsys, caplog):
  """encode / extract report through core.progress: a bar (with the shard being written)
  on a terminal, log lines with the same counts otherwise."""
  monkeypatch.setenv("SFD_PROGRESS", "bar")
  _toy_job(image_dir, str(tmp_path / "bar"))
  err = capsys.readouterr().err
  assert "test: 100%" in err and "13/13" in err and "shard data-00003-of-00004" in err, err
  monkeypatch.setenv("SFD_PROGRESS", "log")
  caplog.set_level("INFO")
  _toy_job(image_dir, str(tmp_path / "log"), log_every_batches=1)
  lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("test: ")]
  assert any("img (" in l and "img/s" in l and ", shard data-0000" in l for l in lines), lines
  assert any(l.startswith("test: done, 13 img in ") for l in lines), lines


def test_sharded_job_splits_shards_between_processes(image_dir, tmp_path):
  """Process p of P writes shards s ≡ p (mod P); together they equal one process."""
  plan = images_lib.ShardPlan(len(images_lib.ImageFolderSource(image_dir)), 4)

  def run(directory, p, count):
    return _toy_job(image_dir, directory, p, count)

  single, split = str(tmp_path / "one"), str(tmp_path / "two")
  run(single, 0, 1)
  r0, r1 = run(split, 0, 2), run(split, 1, 2)
  assert (r0.written, r1.written) == ([0, 2], [1, 3])
  assert [s[1] for s in r0.skipped + r1.skipped] == [CORRUPT]
  assert _shard_bytes(split) == _shard_bytes(single)
  done = images_lib.collect_done(split, plan)
  assert sum(d["num_records"] for d in done) == 12
  assert images_lib.skipped_images(done)[0]["name"] == CORRUPT
  assert run(split, 0, 2).written == []                      # rerun: nothing left to do
