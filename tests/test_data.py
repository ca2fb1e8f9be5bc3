"""Tests of the latent record schema, ArrayRecord storage, Grain pipeline, stats and
the converter of the reference's safetensors latents (all on tiny synthetic data).

Synthetic records: record i has texture[h, w, c] = i + 0.1 c + 0.01 (4h + w),
semantic likewise, repa = i, and every flipped view = unflipped + 1000, so the
record and the flip choice can be read back from any output.
"""
import json
import os
import pickle
import shutil
import sys

from etils import epath
import grain
import jax
from jax.sharding import Mesh, PartitionSpec
import numpy as np
import pytest
from safetensors.numpy import save_file

import sfd_jax  # noqa: F401  (package set-up)
from sfd_jax.core import optional
from sfd_jax.data import convert_reference
from sfd_jax.data import global_batch
from sfd_jax.data import pipeline
from sfd_jax.data import records
from sfd_jax.data import schema as schema_lib
from sfd_jax.data import stats as stats_lib
from sfd_jax.data.schema import DataFormatError, LatentSchema

N = 40
SCHEMA = LatentSchema(grid=4, texture_channels=3, semantic_channels=2, repa_dim=5)
FLIP = 1000.0


def make_example(i, schema=SCHEMA):
  g = schema.grid
  pos = 0.01 * np.arange(g * g, dtype=np.float32).reshape(g, g, 1)
  ex = {"label": np.int64(i)}
  for part, c in (("texture", schema.texture_channels), ("semantic", schema.semantic_channels)):
    base = (i + 0.1 * np.arange(c, dtype=np.float32) + pos).astype(np.float32)
    ex[part], ex[part + "_flip"] = base, base + np.float32(FLIP)
  if schema.has_repa:
    base = np.full((g, g, schema.repa_dim), i, schema.repa_dtype)
    ex["repa"], ex["repa_flip"] = base, base + np.asarray(FLIP, schema.repa_dtype)
  return ex


IDENTITY = stats_lib.LatentStats(np.zeros(3), np.ones(3), np.zeros(2), np.ones(2))


def write_synthetic(directory, n=N, per_shard=15, stats=IDENTITY, schema=SCHEMA):
  records.write_examples(directory, [make_example(i, schema) for i in range(n)], schema,
                         records_per_shard=per_shard)
  if stats is not None:
    stats.save(stats_lib.stats_path(directory))
  return str(directory)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return write_synthetic(tmp_path_factory.mktemp("latents"))


def build(directory, **kw):
  kw.setdefault("batch_size", 8)
  kw.setdefault("process_index", 0)
  kw.setdefault("process_count", 1)
  return pipeline.build_pipeline(directory, **kw)


def take(it, n):
  return [next(it) for _ in range(n)]


def assert_batches_equal(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


# ------------------------------------------------------------- schema / records


def test_record_codec_round_trip_and_errors():
  ex = make_example(3)
  data = schema_lib.encode_record(ex, SCHEMA)
  out = schema_lib.decode_record(data, SCHEMA)
  assert list(out) == list(SCHEMA.fields())
  for k, v in ex.items():
    np.testing.assert_array_equal(out[k], v)
    assert out[k].dtype.name == SCHEMA.fields()[k].dtype
  with pytest.raises(DataFormatError, match="magic"):
    schema_lib.decode_record(b"XXXX" + data[4:], SCHEMA, "f.array_record record 2")
  with pytest.raises(DataFormatError, match="f.array_record record 2: record truncated"):
    schema_lib.decode_record(data[:-8], SCHEMA, "f.array_record record 2")
  no_flip = LatentSchema(grid=4, texture_channels=3, semantic_channels=2, repa_dim=5,
                         has_flip=False)
  with pytest.raises(DataFormatError, match=r"unexpected \['texture_flip'"):
    schema_lib.decode_record(data, no_flip)


def test_write_read_round_trip(data_dir):
  info = json.load(open(os.path.join(data_dir, "dataset.json")))
  assert info["schema_version"] == schema_lib.SCHEMA_VERSION
  assert info["num_records"] == N
  assert [s["file"] for s in info["shards"]] == [
      f"data-0000{i}-of-00003.array_record" for i in range(3)]
  assert [s["num_records"] for s in info["shards"]] == [15, 15, 10]
  assert info["fields"]["repa_flip"] == {"shape": [4, 4, 5], "dtype": "float16"}
  assert not [f for f in os.listdir(data_dir) if ".tmp-" in f]
  recs = records.LatentRecords(data_dir)
  assert len(recs) == N and recs.locate(31) == ("data-00002-of-00003.array_record", 1)
  for i in (0, 14, 15, 39):
    rec, ex = recs[i], make_example(i)
    for k in ex:
      np.testing.assert_array_equal(rec[k], ex[k], err_msg=f"record {i} {k}")


def test_writer_rejects_wrong_shape_or_dtype(tmp_path):
  bad = make_example(0)
  bad["semantic"] = np.zeros((4, 4, 3), np.float32)
  with pytest.raises(DataFormatError,
                     match=r"data-00000-of-00001.array_record record 1: field 'semantic': "
                           r"expected float32\[4, 4, 2\], found float32\[4, 4, 3\]"):
    records.write_dataset(tmp_path, [[make_example(1), bad]], SCHEMA)
  bad = make_example(0)
  bad["texture"] = bad["texture"].astype(np.float64)
  with pytest.raises(DataFormatError, match=r"field 'texture': expected float32.*found float64"):
    records.write_dataset(tmp_path, [[bad]], SCHEMA)
  # a failed shard leaves neither a finished-looking file nor a temporary
  assert os.listdir(tmp_path) == []


def test_reader_names_field_shard_and_record_of_a_bad_record(tmp_path):
  wrong = LatentSchema(grid=4, texture_channels=3, semantic_channels=3, repa_dim=5)
  write_synthetic(tmp_path, n=6, per_shard=3, schema=wrong, stats=None)
  info = schema_lib.read_dataset_info(tmp_path)   # claim the right schema
  schema_lib.write_dataset_info(tmp_path, schema_lib.DatasetInfo(SCHEMA, info.shards))
  IDENTITY.save(stats_lib.stats_path(tmp_path))
  recs = records.LatentRecords(tmp_path)
  with pytest.raises(DataFormatError, match=r"data-00001-of-00002.array_record record 1 "
                     r"\(global record 4\): field 'semantic': expected float32\[4, 4, 2\], "
                     r"found float32\[4, 4, 3\]"):
    recs[4]
  with pytest.raises(DataFormatError, match="field 'semantic'"):
    next(build(tmp_path, batch_size=2))
  f32 = LatentSchema(grid=4, texture_channels=3, semantic_channels=2, repa_dim=5,
                     repa_dtype="float32")
  data = schema_lib.encode_record(make_example(0, f32), f32)
  with pytest.raises(DataFormatError, match=r"x: field 'repa': expected float16.*found float32"):
    schema_lib.decode_record(data, SCHEMA, "x")


def test_missing_or_truncated_files(tmp_path, data_dir):
  with pytest.raises(FileNotFoundError, match="dataset.json not found"):
    records.LatentRecords(tmp_path)
  d = tmp_path / "copy"
  shutil.copytree(data_dir, d)
  shard = d / "data-00001-of-00003.array_record"
  full = shard.read_bytes()
  shard.write_bytes(full[:len(full) // 2])
  with pytest.raises(DataFormatError, match=r"data-00001-of-00003.array_record is \d+ bytes "
                     r"but dataset.json records \d+ \(truncated"):
    records.LatentRecords(d)
  with pytest.raises(DataFormatError, match="not a complete ArrayRecord file"):
    records.inspect_shard(shard)
  shard.unlink()
  with pytest.raises(FileNotFoundError, match="data-00001-of-00003.array_record"):
    records.LatentRecords(d)


# ------------------------------------------------------------------------ stats


def test_stats_compute_save_load(tmp_path, data_dir):
  recs = records.LatentRecords(data_dir)
  st = stats_lib.compute_stats(recs, num_samples=10_000, seed=0, chunk=7)
  tex = np.stack([make_example(i)["texture"] for i in range(N)]).reshape(-1, 3)
  sem = np.stack([make_example(i)["semantic"] for i in range(N)]).reshape(-1, 2)
  np.testing.assert_allclose(st.texture_mean, tex.mean(0), rtol=1e-6)
  np.testing.assert_allclose(st.texture_std, tex.std(0, ddof=1), rtol=1e-6)
  np.testing.assert_allclose(st.semantic_std, sem.std(0, ddof=1), rtol=1e-6)
  sub = stats_lib.compute_stats(recs, num_samples=10, seed=1)   # random subset, seeded
  assert not np.allclose(sub.texture_mean, st.texture_mean)
  np.testing.assert_array_equal(
      sub.texture_mean, stats_lib.compute_stats(recs, num_samples=10, seed=1).texture_mean)
  path = st.save(tmp_path / "stats.npz")
  back = stats_lib.load_stats(path, SCHEMA)
  np.testing.assert_array_equal(back.semantic_mean, st.semantic_mean)
  with pytest.raises(FileNotFoundError, match="stats.npz not found"):
    stats_lib.load_stats(tmp_path / "none" / "stats.npz")
  with pytest.raises(DataFormatError, match=r"'texture_mean' expected shape \[4\], found \[3\]"):
    stats_lib.load_stats(path, LatentSchema(grid=4, texture_channels=4, semantic_channels=2))
  np.savez(tmp_path / "bad.npz", texture_mean=np.zeros(3), texture_std=np.ones(3))
  with pytest.raises(DataFormatError, match="missing arrays"):
    stats_lib.load_stats(tmp_path / "bad.npz")


def test_missing_stats_file_fails_pipeline(tmp_path):
  write_synthetic(tmp_path, n=8, stats=None)
  with pytest.raises(FileNotFoundError, match="stats.npz not found"):
    build(tmp_path)


def test_reference_stats_files(tmp_path):
  rng = np.random.default_rng(0)
  t_mean, t_std = rng.normal(size=(1, 3, 1, 1)), rng.uniform(1, 2, (1, 3, 1, 1))
  s_mean, s_std = rng.normal(size=(1, 2, 1, 1)), rng.uniform(1, 2, (1, 2, 1, 1))
  np.savez(tmp_path / "latents_stats.npz", mean=t_mean, std=t_std)
  save_file({"mean": s_mean.astype(np.float32), "std": s_std.astype(np.float32)},
            str(tmp_path / "latents_sv_stats.safetensors"))
  paths = stats_lib.find_reference_stats(tmp_path)
  st = stats_lib.load_reference_stats(*paths, schema=SCHEMA)
  np.testing.assert_allclose(st.texture_std, t_std.ravel(), rtol=1e-6)
  np.testing.assert_allclose(st.semantic_mean, s_mean.ravel(), rtol=1e-6)
  assert st.texture_mean.dtype == np.float32


def test_reference_stats_pt_files_read_without_torch(tmp_path, monkeypatch):
  """The reference's latents_stats.pt / latents_sv_stats.pt (torch.save zip archives) are
  read by the restricted reader: PyTorch is not imported (made unimportable here)."""
  from tests import torch_format  # pylint: disable=import-outside-toplevel
  monkeypatch.setitem(sys.modules, "torch", None)            # import torch -> ImportError
  rng = np.random.default_rng(1)
  arrays = {"texture": (rng.normal(size=(1, 3, 1, 1)), rng.uniform(1, 2, (1, 3, 1, 1))),
            "semantic": (rng.normal(size=(1, 2, 1, 1)), rng.uniform(1, 2, (1, 2, 1, 1)))}
  for part, name in stats_lib.REFERENCE_STATS.items():
    mean, std = (a.astype(np.float32) for a in arrays[part])
    torch_format.save({"mean": torch_format.Tensor(mean), "std": torch_format.Tensor(std)},
                      tmp_path / f"{name}.pt")
  paths = stats_lib.find_reference_stats(tmp_path)
  assert [os.path.basename(p) for p in paths] == ["latents_stats.pt", "latents_sv_stats.pt"]
  st = stats_lib.load_reference_stats(*paths, schema=SCHEMA)
  np.testing.assert_array_equal(st.texture_std, arrays["texture"][1].astype(np.float32).ravel())
  np.testing.assert_array_equal(st.semantic_mean,
                                arrays["semantic"][0].astype(np.float32).ravel())
  # A legacy (pre-1.6, non-zip) file is the one case that needs PyTorch: one line naming
  # the extra.
  legacy = tmp_path / "legacy" / "latents_stats.pt"
  legacy.parent.mkdir()
  legacy.write_bytes(pickle.dumps({"mean": [0.0]}, protocol=2))
  with pytest.raises(optional.MissingPackageError, match=r"a legacy \(pre-1.6, non-zip\) "
                     r"PyTorch file needs torch, which is not installed: pip install -e "
                     r"'.\[torch\]'"):
    stats_lib.load_reference_stats(legacy, tmp_path / "latents_sv_stats.pt")


# --------------------------------------------------------------------- pipeline


@pytest.mark.parametrize("count", [1, 2, 4])
def test_process_slices_disjoint_and_complete(data_dir, count):
  global_bs = 8
  per_process = [list(build(data_dir, batch_size=global_bs // count, num_epochs=1, seed=5,
                            process_index=p, process_count=count)) for p in range(count)]
  steps = {len(b) for b in per_process}
  assert steps == {N // global_bs}
  labels = np.concatenate([b["label"] for bs in per_process for b in bs])
  assert sorted(labels.tolist()) == list(range(N))
  # global batch k is the same set of records whatever the process count
  reference = [b["label"] for b in build(data_dir, batch_size=global_bs, num_epochs=1, seed=5)]
  for k in range(N // global_bs):
    got = np.concatenate([per_process[p][k]["label"] for p in range(count)])
    assert sorted(got.tolist()) == sorted(reference[k].tolist())


def test_epochs_reshuffle_and_cover(data_dir):
  batches = list(build(data_dir, batch_size=8, num_epochs=2, seed=1))
  assert len(batches) == 2 * N // 8
  first = np.concatenate([b["label"] for b in batches[:5]])
  second = np.concatenate([b["label"] for b in batches[5:]])
  assert sorted(first) == sorted(second) == list(range(N))
  assert not np.array_equal(first, second)


def test_flip_choice_consistent_across_keys(data_dir):
  flips = []
  for b in take(build(data_dir, batch_size=8, seed=3), 15):
    tex, sem, repa = b["latent"][..., :3], b["latent"][..., 3:], b["repa"]
    tex_f = tex.min(axis=(1, 2, 3)) >= FLIP
    assert np.array_equal(tex_f, tex.max(axis=(1, 2, 3)) >= FLIP)
    assert np.array_equal(tex_f, sem.min(axis=(1, 2, 3)) >= FLIP)
    assert np.array_equal(tex_f, repa.min(axis=(1, 2)) >= FLIP)
    want = b["label"][:, None, None] + FLIP * tex_f[:, None, None]
    np.testing.assert_array_equal(repa, np.broadcast_to(want, repa.shape))
    flips.append(tex_f)
  rate = np.concatenate(flips).mean()
  assert 0.3 < rate < 0.7, rate
  no_flip = take(build(data_dir, batch_size=8, seed=3, flip=False), 5)
  assert all(b["latent"].max() < FLIP for b in no_flip)


def test_normalisation_and_output_layout(tmp_path, data_dir):
  rng = np.random.default_rng(1)
  st = stats_lib.LatentStats(rng.normal(size=3), rng.uniform(0.5, 2, 3),
                             rng.normal(size=2), rng.uniform(0.5, 2, 2))
  path = st.save(tmp_path / "other_stats.npz")
  b = next(build(data_dir, batch_size=8, stats=path, latent_multiplier=0.5, repa=False))
  assert set(b) == {"latent", "label"}
  assert b["latent"].shape == (8, 4, 4, 5) and b["latent"].dtype == np.float32
  assert b["label"].shape == (8,) and b["label"].dtype == np.int32
  for latent, label in zip(b["latent"], b["label"]):
    ex = make_example(int(label))
    flipped = latent[..., 0].min() > 100   # normalised flip values stay far above
    sfx = "_flip" if flipped else ""
    want = np.concatenate([(ex["texture" + sfx] - st.texture_mean) / st.texture_std,
                           (ex["semantic" + sfx] - st.semantic_mean) / st.semantic_std],
                          axis=-1) * 0.5
    np.testing.assert_allclose(latent, want, rtol=1e-6, atol=1e-5)
  full = next(build(data_dir, batch_size=8))
  assert full["repa"].shape == (8, 16, 5) and full["repa"].dtype == np.float32


def test_determinism_for_fixed_seed(data_dir):
  a = take(build(data_dir, seed=7), 6)
  assert_batches_equal(a, take(build(data_dir, seed=7), 6))
  b = take(build(data_dir, seed=8), 6)
  assert not all(np.array_equal(x["label"], y["label"]) for x, y in zip(a, b))


def test_iterator_state_save_restore(tmp_path, data_dir):
  it = build(data_dir, seed=2, batch_size=4)
  take(it, 3)
  blob = pipeline.iterator_state_to_bytes(it)
  expected = take(it, 4)
  state = json.loads(blob)
  assert state["position"] == 3 and state["settings"]["global_batch_size"] == 4
  restored = pipeline.restore_iterator_state(build(data_dir, seed=2, batch_size=4), blob)
  assert_batches_equal(expected, take(restored, 4))
  # the position carries over to another process count with the same global batch
  halves = [pipeline.restore_iterator_state(
      build(data_dir, seed=2, batch_size=2, process_index=p, process_count=2), blob)
      for p in range(2)]
  got = np.concatenate([next(h)["latent"] for h in halves])
  ref = expected[0]["latent"]
  assert sorted(map(bytes, got)) == sorted(map(bytes, ref))
  # grain's Orbax handler round-trips it too
  handler = grain.checkpoint.CheckpointHandler()
  handler.save(epath.Path(tmp_path), item=pipeline.restore_iterator_state(
      build(data_dir, seed=2, batch_size=4), blob))
  again = handler.restore(epath.Path(tmp_path), item=build(data_dir, seed=2, batch_size=4))
  assert_batches_equal(expected, take(again, 4))
  with pytest.raises(ValueError, match="seed=2.*seed=3"):
    pipeline.restore_iterator_state(build(data_dir, seed=3, batch_size=4), blob)
  with pytest.raises(ValueError, match="global_batch_size"):
    pipeline.restore_iterator_state(build(data_dir, seed=2, batch_size=8), blob)


def test_grain_worker_processes(data_dir):
  """Two Grain worker processes (spawned) give the in-process batches, and restore."""
  ref = take(build(data_dir, seed=4, batch_size=4), 5)
  it = build(data_dir, seed=4, batch_size=4, num_workers=2)
  try:
    got = take(it, 3)
    blob = pipeline.iterator_state_to_bytes(it)
  finally:
    it.close()
  assert_batches_equal(ref[:3], got)
  resumed = pipeline.restore_iterator_state(build(data_dir, seed=4, batch_size=4), blob)
  assert_batches_equal(ref[3:], take(resumed, 2))


# ------------------------------------------------------------------ global batch


def test_to_global(data_dir):
  mesh = Mesh(np.array(jax.devices()[:8]).reshape(4, 2), ("data", "fsdp"))
  batch = next(build(data_dir, batch_size=8))
  out = global_batch.to_global(batch, mesh, PartitionSpec(("data", "fsdp")))
  assert out["latent"].shape == (8, 4, 4, 5)
  assert len(out["latent"].sharding.device_set) == 8
  np.testing.assert_array_equal(np.asarray(out["latent"]), batch["latent"])
  np.testing.assert_array_equal(np.asarray(out["label"]), batch["label"])
  small = {"latent": batch["latent"][:6]}
  with pytest.raises(ValueError, match=r"\['latent'\]: local batch 6 .* 8 of 8 batch shards"):
    global_batch.to_global(small, mesh, PartitionSpec(("data", "fsdp")))


# -------------------------------------------------------------------- converter


def write_reference(src, sizes=(7, 5), repa=True, stats=True):
  """Tiny reference-style safetensors shards (NCHW) and stats files."""
  os.makedirs(src, exist_ok=True)
  rng = np.random.default_rng(0)
  shards = []
  for s, n in enumerate(sizes):
    t = {"latents": rng.normal(size=(n, 3, 4, 4)).astype(np.float32),
         "latents_sv": rng.normal(size=(n, 2, 4, 4)).astype(np.float32),
         "labels": rng.integers(0, 1000, n).astype(np.int64)}
    if repa:
      t["feats_dino"] = rng.normal(size=(n, 5, 4, 4)).astype(np.float16)
    for k in list(t):
      if k != "labels":
        t[k + "_flip"] = t[k][..., ::-1].copy()
    save_file(t, os.path.join(src, f"latents_rank00_shard{s:03d}.safetensors"))
    shards.append(t)
  if stats:
    np.savez(os.path.join(src, "latents_stats.npz"), mean=np.full((1, 3, 1, 1), 0.1),
             std=np.full((1, 3, 1, 1), 2.0))
    np.savez(os.path.join(src, "latents_sv_stats.npz"), mean=np.zeros((1, 2, 1, 1)),
             std=np.full((1, 2, 1, 1), 0.5))
  return shards


def test_converter_and_resume(tmp_path):
  src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
  shards = write_reference(src)
  logs = []
  info = convert_reference.convert(src, dst, log=logs.append)
  assert info.schema == SCHEMA and info.num_records == 12
  assert any("[2/2]" in m and "5 records" in m for m in logs)
  recs = records.LatentRecords(dst)
  for i, (s, j) in enumerate([(0, 0), (0, 6), (1, 0), (1, 4)]):
    idx = [0, 6, 7, 11][i]
    rec = recs[idx]
    np.testing.assert_array_equal(rec["texture"], shards[s]["latents"][j].transpose(1, 2, 0))
    np.testing.assert_array_equal(rec["semantic_flip"],
                                  shards[s]["latents_sv_flip"][j].transpose(1, 2, 0))
    np.testing.assert_array_equal(rec["repa"], shards[s]["feats_dino"][j].transpose(1, 2, 0))
    assert rec["label"] == shards[s]["labels"][j]
  st = stats_lib.load_stats(dst, SCHEMA)
  np.testing.assert_allclose(st.texture_mean, 0.1)
  np.testing.assert_allclose(st.semantic_std, 0.5)
  b = next(build(dst, batch_size=4, seed=0))
  assert b["latent"].shape == (4, 4, 4, 5) and b["repa"].shape == (4, 16, 5)

  # rerun: everything is skipped; a lost shard (and dataset.json) is redone alone
  mtime = os.path.getmtime(os.path.join(dst, "data-00000-of-00002.array_record"))
  logs.clear()
  convert_reference.convert(src, dst, log=logs.append)
  assert sum("exists, skipped" in m for m in logs) == 2
  os.remove(os.path.join(dst, "data-00001-of-00002.array_record"))
  os.remove(os.path.join(dst, "dataset.json"))
  open(os.path.join(dst, "data-00001-of-00002.array_record.tmp-123"), "w").write("partial")
  logs.clear()
  convert_reference.convert(src, dst, log=logs.append)
  assert sum("exists, skipped" in m for m in logs) == 1
  assert any("[2/2]" in m and "5 records" in m for m in logs)
  assert os.path.getmtime(os.path.join(dst, "data-00000-of-00002.array_record")) == mtime
  assert not [f for f in os.listdir(dst) if ".tmp-" in f]
  assert len(records.LatentRecords(dst)) == 12


def test_converter_cli_no_repa_and_computed_stats(tmp_path, capsys):
  src, dst = str(tmp_path / "src"), str(tmp_path / "dst")
  write_reference(src, sizes=(6,), stats=False)
  assert convert_reference.main(["--src", src, "--dst", dst, "--no-repa"]) == 0
  out = capsys.readouterr().out
  assert "[1/1]" in out and "computing from" in out
  info = schema_lib.read_dataset_info(dst)
  assert not info.schema.has_repa and "repa" not in info.schema.fields()
  b = next(build(dst, batch_size=3, repa=False))
  assert set(b) == {"latent", "label"}
  with pytest.raises(ValueError, match="REPA features requested"):
    build(dst, batch_size=3)
  # converting with REPA into the same directory is refused
  with pytest.raises(DataFormatError, match="already holds a dataset"):
    convert_reference.convert(src, dst, log=lambda _: None)


def test_converter_rejects_bad_reference_shard(tmp_path):
  src = str(tmp_path / "src")
  write_reference(src, sizes=(4,), stats=False)
  t = {"latents": np.zeros((3, 3, 4, 4), np.float32),
       "latents_flip": np.zeros((3, 3, 4, 4), np.float32),
       "latents_sv": np.zeros((3, 2, 4, 4), np.float32),
       "latents_sv_flip": np.zeros((3, 2, 4, 4), np.float32),
       "feats_dino": np.zeros((3, 6, 4, 4), np.float16),
       "feats_dino_flip": np.zeros((3, 6, 4, 4), np.float16),
       "labels": np.zeros(3, np.int64)}
  save_file(t, os.path.join(src, "latents_rank00_shard001.safetensors"))
  with pytest.raises(DataFormatError, match=r"shard001.safetensors: key 'feats_dino' expected "
                     r"shape \[3, 5, 4, 4\], found \[3, 6, 4, 4\]"):
    convert_reference.convert(src, str(tmp_path / "dst"), log=lambda _: None)
