"""Converts the reference's extracted latents (safetensors shards) into our records.

The reference extractor (docs/method.md §2.2) writes ``latents_rank{RR}_shard{SSS}.safetensors``
files holding, for N images, channels-first arrays

  latents, latents_flip         N×32×16×16  fp32   texture latents
  latents_sv, latents_sv_flip   N×16×16×16  fp32   semantic latents
  feats_dino, feats_dino_flip   N×768×16×16 fp16   REPA target features
  labels                        N           int64

plus, once per directory, ``latents_stats.pt`` and ``latents_sv_stats.pt``. Each
input file (in sorted name order, as the reference's dataset reads them) becomes one
output shard ``data-XXXXX-of-YYYYY.array_record`` of channels-last records; then
``dataset.json`` and ``stats.npz`` are written. Finished output shards are skipped on a
rerun, so an interrupted conversion resumes where it stopped.

  python -m sfd_jax.data.convert_reference --src DIR --dst DIR [--no-repa]
"""
from __future__ import annotations

import glob
import os
import time
from typing import Callable, Sequence

from array_record.python import array_record_module
import numpy as np
from safetensors import safe_open

from sfd_jax.core import errors, files, runner
from sfd_jax.core.errors import MissingFileError
from sfd_jax.data import records as records_lib
from sfd_jax.data import schema as schema_lib
from sfd_jax.data import stats as stats_lib
from sfd_jax.data.schema import DataFormatError, DatasetInfo, LatentSchema, ShardInfo

# our field name -> reference key (the flipped view appends "_flip" to both)
REFERENCE_KEYS = {"texture": "latents", "semantic": "latents_sv", "repa": "feats_dino"}
LABEL_KEY = "labels"


def _log(message: str) -> None:
  print(message, flush=True)


def reference_shards(src: str) -> list[str]:
  """The reference's safetensors files in ``src``, sorted by name."""
  files = sorted(glob.glob(os.path.join(src, "*.safetensors")))
  if not files:
    if not os.path.isdir(src):
      raise MissingFileError(f"--src {src}: no such directory (expected the reference's "
                             "folder of *.safetensors latents)")
    raise MissingFileError(f"--src {src}: no *.safetensors files in this directory (expected "
                           "the reference's extract_features.py output)")
  return files


def _key_shapes(path: str) -> dict[str, tuple[tuple[int, ...], str]]:
  return files.safetensors_shapes(path, what="reference latents", error=DataFormatError)


def infer_schema(path: str, repa: bool = True) -> LatentSchema:
  """Schema implied by one reference shard (``repa=False`` drops the REPA features)."""
  shapes = _key_shapes(path)
  for key in ("latents", "latents_sv"):
    if key not in shapes:
      raise DataFormatError(f"{path}: key '{key}' missing (has {sorted(shapes)})")
  tex, sem = shapes["latents"][0], shapes["latents_sv"][0]
  for key, shape in (("latents", tex), ("latents_sv", sem)):
    if len(shape) != 4 or shape[2] != shape[3]:
      raise DataFormatError(f"{path}: '{key}' expected N×C×G×G, found {list(shape)}")
  if repa and "feats_dino" not in shapes:
    raise DataFormatError(f"{path}: key 'feats_dino' missing (has {sorted(shapes)}); "
                          "convert with --no-repa to drop the REPA features")
  return LatentSchema(
      grid=tex[2], texture_channels=tex[1], semantic_channels=sem[1],
      repa_dim=shapes["feats_dino"][0][1] if repa else 768, has_repa=repa,
      has_flip="latents_flip" in shapes)


def _expected_keys(schema: LatentSchema, n: int) -> dict[str, tuple[int, ...]]:
  """Reference key -> expected shape, for the fields of ``schema``."""
  channels = {"texture": schema.texture_channels, "semantic": schema.semantic_channels,
              "repa": schema.repa_dim}
  out = {}
  for suffix in (("", "_flip") if schema.has_flip else ("",)):
    for part in schema.parts():
      out[REFERENCE_KEYS[part] + suffix] = (n, channels[part], schema.grid, schema.grid)
  out[LABEL_KEY] = (n,)
  return out


def check_reference_shard(path: str, schema: LatentSchema) -> int:
  """Checks the keys/shapes of one reference shard; returns its number of images.

  Raises:
    DataFormatError: naming the file, the key and the expected vs found shape.
  """
  shapes = _key_shapes(path)
  if LABEL_KEY not in shapes or len(shapes[LABEL_KEY][0]) != 1:
    raise DataFormatError(f"{path}: key '{LABEL_KEY}' missing or not a vector")
  n = shapes[LABEL_KEY][0][0]
  for key, want in _expected_keys(schema, n).items():
    if key not in shapes:
      raise DataFormatError(f"{path}: key '{key}' missing (has {sorted(shapes)})")
    if shapes[key][0] != want:
      raise DataFormatError(f"{path}: key '{key}' expected shape {list(want)}, found "
                            f"{list(shapes[key][0])}")
  return n


def _nhwc(a: np.ndarray, dtype: str) -> np.ndarray:
  return np.transpose(a, (0, 2, 3, 1)).astype(dtype, copy=False)


def convert_shard(src: str, dst: str, schema: LatentSchema,
                  compression: str = records_lib.DEFAULT_COMPRESSION) -> ShardInfo:
  """Converts one reference file into one output shard (written atomically)."""
  n = check_reference_shard(src, schema)
  specs = schema.fields()
  arrays = {}
  try:
    with safe_open(src, framework="numpy") as f:
      for name, spec in specs.items():
        if name == "label":
          continue
        part, _, flip = name.partition("_")
        key = REFERENCE_KEYS[part] + ("_flip" if flip else "")
        arrays[name] = _nhwc(f.get_tensor(key), spec.dtype)
      labels = f.get_tensor(LABEL_KEY)
  except Exception as e:  # pylint: disable=broad-except  (SafetensorError: truncated data)
    raise DataFormatError(f"reference latents {src}: cannot read its tensors "
                          f"({errors.reason(e)}); the file is truncated or corrupt") from e
  if labels.size and (labels.min() < 0 or labels.max() > np.iinfo(np.int32).max):
    raise DataFormatError(f"{src}: labels outside [0, 2^31) (min {labels.min()}, "
                          f"max {labels.max()})")
  examples = ({**{k: v[i] for k, v in arrays.items()}, "label": labels[i]} for i in range(n))
  return records_lib.write_shard(dst, examples, schema, compression)


def _check_finished_shard(path: str, expected_records: int, schema: LatentSchema) -> ShardInfo:
  """Describes an existing output shard, checking its count and its first record."""
  info = records_lib.inspect_shard(path)
  if info.num_records != expected_records:
    raise DataFormatError(f"{path} exists with {info.num_records} records but its source "
                          f"has {expected_records}; delete it to reconvert")
  if expected_records:
    reader = array_record_module.ArrayRecordReader(path)
    try:
      first = reader.read([0])[0]
    finally:
      reader.close()
    schema_lib.decode_record(first, schema, f"{path} record 0 (written by an earlier run "
                             "with other options? delete it to reconvert)")
  return info


def _write_stats(src: str, dst: str, schema: LatentSchema, *, force_compute: bool,
                 num_samples: int, seed: int, log: Callable[[str], None]) -> str:
  path = stats_lib.stats_path(dst)
  if os.path.exists(path) and not force_compute:
    stats_lib.load_stats(path, schema)
    log(f"stats: {path} exists, kept")
    return path
  ref = None if force_compute else stats_lib.find_reference_stats(src)
  if ref is not None:
    stats = stats_lib.load_reference_stats(ref[0], ref[1], schema)
    log(f"stats: converted {os.path.basename(ref[0])} + {os.path.basename(ref[1])}")
  else:
    log(f"stats: computing from {num_samples} random unflipped records (seed {seed})")
    stats = stats_lib.compute_stats(records_lib.LatentRecords(dst), num_samples, seed,
                                    log_every=1000)
  stats.save(path)
  log(f"stats: wrote {path}")
  return path


def convert(src: str, dst: str, *, repa: bool = True,
            compression: str = records_lib.DEFAULT_COMPRESSION,
            compute_stats: bool = False, stats_samples: int = 10_000, stats_seed: int = 0,
            log: Callable[[str], None] = _log) -> DatasetInfo:
  """Converts a directory of reference shards (resumable; see module docstring)."""
  src, dst = os.fspath(src), os.fspath(dst)
  files = reference_shards(src)
  schema = infer_schema(files[0], repa=repa)
  os.makedirs(dst, exist_ok=True)
  if os.path.exists(os.path.join(dst, schema_lib.DATASET_FILE)):
    old = schema_lib.read_dataset_info(dst)
    if old.schema != schema or len(old.shards) != len(files):
      raise DataFormatError(
          f"{dst} already holds a dataset with schema {old.schema} and {len(old.shards)} "
          f"shards; this conversion gives {schema} and {len(files)} shards. Use another "
          "--dst or delete it")
  for p in records_lib.remove_stale_temporaries(dst):
    log(f"removed unfinished {os.path.basename(p)}")
  infos = []
  t0, done_new = time.time(), 0
  for i, file in enumerate(files):
    out = os.path.join(dst, records_lib.shard_name(i, len(files)))
    n = check_reference_shard(file, schema)
    prefix = f"[{i + 1}/{len(files)}] {os.path.basename(file)} -> {os.path.basename(out)}"
    if os.path.exists(out):
      infos.append(_check_finished_shard(out, n, schema))
      log(f"{prefix}: exists, skipped")
      continue
    t = time.time()
    infos.append(convert_shard(file, out, schema, compression))
    done_new += n
    rate = done_new / max(time.time() - t0, 1e-9)
    log(f"{prefix}: {n} records in {time.time() - t:.1f}s ({rate:.0f} records/s)")
  info = DatasetInfo(schema, tuple(infos), {
      "source": "reference safetensors (yuemingPAN/SFD extract_features.py)",
      "source_dir": os.path.abspath(src),
      "source_files": [os.path.basename(f) for f in files],
      "compression": compression,
  })
  schema_lib.write_dataset_info(dst, info)
  log(f"wrote {os.path.join(dst, schema_lib.DATASET_FILE)}: {info.num_records} records "
      f"in {len(infos)} shards")
  _write_stats(src, dst, schema, force_compute=compute_stats, num_samples=stats_samples,
               seed=stats_seed, log=log)
  return info


def main(argv: Sequence[str] | None = None) -> int:
  parser = runner.ArgumentParser(
      prog="python -m sfd_jax.data.convert_reference", description=__doc__.split("\n\n")[0])
  parser.add_argument("--src", required=True, help="directory of reference *.safetensors")
  parser.add_argument("--dst", required=True, help="output dataset directory")
  parser.add_argument("--no-repa", action="store_true", help="drop the REPA features")
  parser.add_argument("--compression", default=records_lib.DEFAULT_COMPRESSION,
                      choices=records_lib.COMPRESSIONS)
  parser.add_argument("--compute-stats", action="store_true",
                      help="compute stats.npz from the records even if the reference's "
                           "latents_stats/latents_sv_stats files are present")
  parser.add_argument("--stats-samples", type=int, default=10_000)
  parser.add_argument("--stats-seed", type=int, default=0)
  args = parser.parse_args(argv)
  convert(args.src, args.dst, repa=not args.no_repa, compression=args.compression,
          compute_stats=args.compute_stats, stats_samples=args.stats_samples,
          stats_seed=args.stats_seed)
  return 0


if __name__ == "__main__":
  runner.run_cli(main, "python -m sfd_jax.data.convert_reference")
