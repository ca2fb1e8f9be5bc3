"""Input-pipeline throughput: records/s through ``build_pipeline`` with N workers.

  python -m bench.data_pipeline --records 4096 --batch 256 --workers 0,4,8 \\
      --train-images-per-sec 700

Writes a synthetic dataset of full-size SFD records (texture 16×16×32 f32, semantic
16×16×16 f32, REPA 16×16×768 f16, each with its flipped view; ≈ 0.86 MB per record) to
a temporary directory with ``sfd_jax.data.records`` (or reuses ``--data-dir``), then,
for each worker count, builds the training pipeline (shuffle, flip choice,
normalisation, REPA cast to ``--repa-dtype``, batching, Grain worker processes), skips
``--warmup-batches`` (worker start-up) and times ``--batches`` batches. Records/s is
compared with ``--train-images-per-sec`` (e.g. the train-step benchmark's number).

The freshly written files sit in the page cache, so this measures decoding, the
transform and inter-process transfer, not the disk; for a cold-disk number point
``--data-dir`` at a dataset on the training storage after dropping the cache.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time

import numpy as np

from bench import common

_POOL = 8   # distinct random records cycled through (content does not affect speed)


def write_synthetic(directory: str, num_records: int, records_per_shard: int,
                    seed: int = 0) -> int:
  """Writes ``num_records`` full-size random records and ``stats.npz``; returns bytes."""
  from sfd_jax.data import records as records_lib  # pylint: disable=import-outside-toplevel
  from sfd_jax.data import stats as stats_lib  # pylint: disable=import-outside-toplevel
  from sfd_jax.data.schema import LatentSchema  # pylint: disable=import-outside-toplevel

  schema = LatentSchema()   # grid 16, texture 32, semantic 16, REPA 768 f16, flips
  rng = np.random.default_rng(seed)
  g = schema.grid

  def one(i):
    ex = {}
    for suffix in ("", "_flip"):
      ex["texture" + suffix] = rng.standard_normal((g, g, schema.texture_channels), np.float32)
      ex["semantic" + suffix] = rng.standard_normal((g, g, schema.semantic_channels),
                                                    np.float32)
      ex["repa" + suffix] = rng.standard_normal((g, g, schema.repa_dim),
                                                np.float32).astype(np.float16)
    ex["label"] = np.int32(i % 1000)
    return ex

  pool = [one(i) for i in range(_POOL)]

  def shard(start, stop):
    for i in range(start, stop):
      yield {**pool[i % _POOL], "label": np.int32(i % 1000)}

  bounds = range(0, num_records, records_per_shard)
  shards = [shard(s, min(s + records_per_shard, num_records)) for s in bounds]
  records_lib.write_dataset(directory, shards, schema)
  stats_lib.LatentStats(
      np.zeros(schema.texture_channels), np.ones(schema.texture_channels),
      np.zeros(schema.semantic_channels), np.ones(schema.semantic_channels),
  ).save(stats_lib.stats_path(directory))
  return sum(os.path.getsize(os.path.join(directory, f)) for f in os.listdir(directory))


def measure(data_dir: str, *, workers: int, batch: int, batches: int, warmup: int,
            read_threads: int, prefetch: int, repa_dtype: str) -> dict:
  """Times ``batches`` batches after ``warmup`` batches; returns records/s etc."""
  from sfd_jax.data import pipeline  # pylint: disable=import-outside-toplevel

  it = pipeline.build_pipeline(data_dir, batch_size=batch, seed=0, process_index=0,
                               process_count=1, num_workers=workers,
                               read_threads=read_threads, prefetch_batches=prefetch,
                               repa_dtype=repa_dtype)
  try:
    t0 = time.perf_counter()
    for _ in range(warmup):
      next(it)
    startup_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    nbytes = 0
    for _ in range(batches):
      b = next(it)
      nbytes += sum(v.nbytes for v in b.values())
    dt = time.perf_counter() - t0
  finally:
    it.close()
  return {"workers": workers, "read_threads": read_threads, "batch": batch,
          "records_per_s": batches * batch / dt, "batch_ms": dt / batches * 1e3,
          "output_mb_per_s": nbytes / dt / 1e6, "warmup_s": startup_s,
          "timed_batches": batches}


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--records", type=int, default=4096, help="synthetic records to write")
  parser.add_argument("--records-per-shard", type=int, default=1000)
  parser.add_argument("--data-dir", default=None,
                      help="existing dataset to read instead of writing a synthetic one")
  parser.add_argument("--batch", type=int, default=256, help="batch size (one process)")
  parser.add_argument("--workers", default="0,4,8", help="Grain worker counts to try")
  parser.add_argument("--read-threads", type=int, default=4)
  parser.add_argument("--prefetch", type=int, default=4,
                      help="batches the reader threads keep ready (>= --read-threads)")
  parser.add_argument("--repa-dtype", default="float32")
  parser.add_argument("--batches", type=int, default=20, help="timed batches")
  parser.add_argument("--warmup-batches", type=int, default=3)
  parser.add_argument("--train-images-per-sec", type=float, default=None,
                      help="train-step images/s to compare with")
  parser.add_argument("--tmp", default=None, help="parent dir of the temporary dataset")
  common.add_output_args(parser)
  args = parser.parse_args(argv)

  env = common.env_info(args.machine)
  tmp = None
  data_dir = args.data_dir
  dataset_bytes = None
  if data_dir is None:
    tmp = tempfile.mkdtemp(prefix="sfd_bench_data_", dir=args.tmp)
    data_dir = tmp
    common.log(f"writing {args.records} synthetic records to {tmp}")
    t0 = time.perf_counter()
    dataset_bytes = write_synthetic(tmp, args.records, args.records_per_shard)
    common.log(f"wrote {dataset_bytes / 1e9:.2f} GB in {time.perf_counter() - t0:.1f} s")
  rows = []
  try:
    for w in common.parse_list(args.workers, int):
      common.log(f"{w} workers: reading")
      row = measure(data_dir, workers=w, batch=args.batch, batches=args.batches,
                    warmup=args.warmup_batches, read_threads=args.read_threads,
                    prefetch=args.prefetch, repa_dtype=args.repa_dtype)
      if args.train_images_per_sec:
        row["vs_train_step"] = row["records_per_s"] / args.train_images_per_sec
      rows.append(row)
      common.log(f"{w} workers: {row['records_per_s']:.0f} records/s")
  finally:
    if tmp is not None:
      shutil.rmtree(tmp, ignore_errors=True)
  columns = [("workers", "workers", None), ("read_threads", "threads", None),
             ("batch", "batch", None), ("records_per_s", "records/s", ".0f"),
             ("batch_ms", "ms/batch", ".1f"), ("output_mb_per_s", "MB/s out", ".0f"),
             ("warmup_s", "start-up s", ".1f")]
  notes = [f"{'synthetic' if tmp else 'existing'} dataset of "
           f"{args.records if tmp else '?'} records"
           + (f" ({dataset_bytes / 1e9:.2f} GB)" if dataset_bytes else "")
           + f"; flips on; REPA emitted as {args.repa_dtype}; page cache warm.",
           f"{args.warmup_batches} warm-up + {args.batches} timed batches per setting."]
  if args.train_images_per_sec:
    columns.append(("vs_train_step", f"× train ({args.train_images_per_sec:.0f} img/s)", ".2f"))
    notes.append("× train > 1: the pipeline keeps ahead of the train step.")
  common.write_report("data_pipeline", "Input pipeline throughput (one process)", rows, columns,
                      env=env, settings=vars(args), out_dir=args.out, tag=args.tag, notes=notes)


if __name__ == "__main__":
  main()
