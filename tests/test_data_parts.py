"""Datasets with a third latent part (LatentSchema.extra_parts): records, statistics and
the training pipeline's composite latent [texture | semantic | extra]."""
import json

import numpy as np
import pytest

import sfd_jax  # noqa: F401  (package set-up)
from sfd_jax.data import records
from sfd_jax.data import stats as stats_lib
from sfd_jax.data.schema import DataFormatError, LatentSchema

SCHEMA3 = LatentSchema(grid=2, texture_channels=3, semantic_channels=2, has_repa=False,
                       extra_parts=(("hidden", 1),))


def example(i, schema=SCHEMA3):
  g = schema.grid
  ex = {"label": np.int64(i % 10)}
  for k, (name, c) in enumerate(schema.latent_parts()):
    base = (i + 10.0 * k + 0.1 * np.arange(c, dtype=np.float32)
            + np.zeros((g, g, 1), np.float32)).astype(np.float32)
    ex[name], ex[name + "_flip"] = base, base + np.float32(1000)
  return ex


def write3(directory, n=24):
  records.write_examples(directory, [example(i) for i in range(n)], SCHEMA3,
                         records_per_shard=10)
  st = stats_lib.compute_stats(records.LatentRecords(directory))
  st.save(stats_lib.stats_path(directory))
  return str(directory), st


def test_schema_parts_by_name_and_json_round_trip():
  assert SCHEMA3.latent_parts() == (("texture", 3), ("semantic", 2), ("hidden", 1))
  assert SCHEMA3.latent_channels == 6
  assert list(SCHEMA3.fields()) == ["texture", "semantic", "hidden", "texture_flip",
                                    "semantic_flip", "hidden_flip", "label"]
  back = LatentSchema.from_json(json.loads(json.dumps(SCHEMA3.to_json())))
  assert back == SCHEMA3
  assert "extra_parts" not in LatentSchema().to_json()   # old datasets: dataset.json unchanged
  for bad in ((("repa", 2),), (("x", 0),), (("a", 1), ("a", 2)), (("9x", 1),)):
    with pytest.raises(ValueError, match="extra_parts"):
      LatentSchema(extra_parts=bad)


def test_stats_and_records_with_a_third_part(tmp_path):
  d, st = write3(tmp_path / "d")
  recs = records.LatentRecords(d)
  assert recs.schema == SCHEMA3
  np.testing.assert_array_equal(recs[5]["hidden"], example(5)["hidden"])
  hid = np.stack([example(i)["hidden"] for i in range(24)]).reshape(-1, 1)
  mean, std = st.part("hidden")
  np.testing.assert_allclose(mean, hid.mean(0), rtol=1e-6)
  np.testing.assert_allclose(std, hid.std(0, ddof=1), rtol=1e-6)
  back = stats_lib.load_stats(d, SCHEMA3)
  np.testing.assert_array_equal(back.part("hidden")[1], std)
  two = stats_lib.LatentStats(st.texture_mean, st.texture_std, st.semantic_mean,
                              st.semantic_std)
  two.save(tmp_path / "two.npz")
  with pytest.raises(DataFormatError, match="hidden_mean"):
    stats_lib.load_stats(tmp_path / "two.npz", SCHEMA3)


def test_pipeline_latent_is_texture_semantic_extra(tmp_path):
  from sfd_jax.data import pipeline
  d, st = write3(tmp_path / "d")
  b = next(pipeline.build_pipeline(d, batch_size=4, seed=0, process_index=0, repa=False,
                                   process_count=1))
  assert b["latent"].shape == (4, 2, 2, 6)
  for latent, label in zip(b["latent"], b["label"]):
    flipped = latent[..., 0].min() > 50
    cands = [i for i in range(24) if i % 10 == int(label)]
    sfx = "_flip" if flipped else ""
    want = [np.concatenate([(example(i)[n + sfx] - st.part(n)[0]) / st.part(n)[1]
                            for n, _ in SCHEMA3.latent_parts()], -1) for i in cands]
    assert any(np.allclose(latent, w, atol=1e-5) for w in want)
