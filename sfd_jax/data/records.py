"""ArrayRecord shards of latent records: atomic writers and a checked reader.

A dataset directory holds ``data-XXXXX-of-YYYYY.array_record`` shards (group size 1,
so every record is randomly addressable), ``dataset.json`` (schema, shard list with
record counts and byte sizes; see ``schema.py``) and usually ``stats.npz``.

Shards are written under a temporary name and renamed only once complete, so a crash
never leaves a file with a final name that is not a finished shard. The reader checks
every shard against ``dataset.json`` (exists, same byte size, readable, same record
count) before any data is served, and names the shard and record in decode errors.
"""
from __future__ import annotations

import glob
import os
from typing import Any, Iterable, Mapping, Sequence

from array_record.python import array_record_module
import grain
import numpy as np

from sfd_jax.core.errors import MissingFileError
from sfd_jax.data import schema as schema_lib
from sfd_jax.data.schema import DataFormatError, DatasetInfo, LatentSchema, ShardInfo

COMPRESSIONS = ("uncompressed", "snappy", "zstd:1", "zstd:3", "brotli:6")
DEFAULT_COMPRESSION = "uncompressed"
_TMP_MARK = ".tmp-"


def shard_name(index: int, count: int) -> str:
  """File name of shard ``index`` of ``count``: ``data-00003-of-00128.array_record``."""
  if not 0 <= index < count:
    raise ValueError(f"shard index {index} out of range for {count} shards")
  return f"data-{index:05d}-of-{count:05d}.array_record"


def writer_options(compression: str = DEFAULT_COMPRESSION) -> str:
  """ArrayRecord writer options: group size 1 (random access) and ``compression``.

  Latents are high-entropy floats: compression saves < 10% and roughly halves read
  throughput, hence ``uncompressed`` by default.
  """
  if compression not in COMPRESSIONS:
    raise ValueError(f"compression {compression!r} not one of {COMPRESSIONS}")
  return f"group_size:1,{compression}"


class ShardWriter:
  """Writes one shard atomically.

  Records go to ``<path>.tmp-<pid>``; ``close()`` finishes the file and renames it to
  ``path``. Used as a context manager, an exception removes the temporary file.
  """

  def __init__(self, path: str | os.PathLike, schema: LatentSchema,
               compression: str = DEFAULT_COMPRESSION):
    self.path = os.fspath(path)
    self.schema = schema
    self.num_records = 0
    self.label_range: tuple[int, int] | None = None   # (min, max) of the labels written
    self._tmp = f"{self.path}{_TMP_MARK}{os.getpid()}"
    self._writer = array_record_module.ArrayRecordWriter(self._tmp, writer_options(compression))
    if not self._writer.ok():
      raise OSError(f"cannot open {self._tmp} for writing")

  def write(self, example: Mapping[str, Any]) -> None:
    """Validates ``example`` against the schema and appends it."""
    where = f"{os.path.basename(self.path)} record {self.num_records}"
    self._writer.write(schema_lib.encode_record(example, self.schema, where))
    self.num_records += 1
    label = int(np.asarray(example["label"]))
    lo, hi = self.label_range or (label, label)
    self.label_range = (min(lo, label), max(hi, label))

  def close(self) -> ShardInfo:
    """Finishes the shard, renames it to its final name and describes it."""
    if not self._writer.ok():
      self.abort()
      raise OSError(f"writing {self.path} failed")
    self._writer.close()
    os.replace(self._tmp, self.path)
    return ShardInfo(os.path.basename(self.path), self.num_records,
                     os.path.getsize(self.path))

  def abort(self) -> None:
    """Drops the unfinished shard."""
    if self._writer.is_open():
      self._writer.close()
    if os.path.exists(self._tmp):
      os.remove(self._tmp)

  def __enter__(self) -> "ShardWriter":
    return self

  def __exit__(self, exc_type, exc, tb) -> None:
    if exc_type is not None:
      self.abort()


def write_shard(path: str | os.PathLike, examples: Iterable[Mapping[str, Any]],
                schema: LatentSchema, compression: str = DEFAULT_COMPRESSION,
                label_ranges: list | None = None) -> ShardInfo:
  """Writes ``examples`` as one shard at ``path`` (atomically). ``label_ranges``: a list
  the shard's (min, max) label is appended to (when it has records)."""
  with ShardWriter(path, schema, compression) as w:
    for ex in examples:
      w.write(ex)
    info = w.close()
    if label_ranges is not None and w.label_range is not None:
      label_ranges.append(w.label_range)
    return info


def label_metadata(ranges) -> dict[str, Any]:
  """``{"labels": {"min", "max"}}`` for ``dataset.json`` from per-shard (min, max)."""
  ranges = [r for r in ranges if r is not None]
  if not ranges:
    return {}
  return {"labels": {"min": int(min(r[0] for r in ranges)),
                     "max": int(max(r[1] for r in ranges))}}


def remove_stale_temporaries(directory: str | os.PathLike) -> list[str]:
  """Deletes leftover ``*.array_record.tmp-*`` files of interrupted writers."""
  removed = []
  pattern = os.path.join(os.fspath(directory), f"data-*.array_record{_TMP_MARK}*")
  for p in sorted(glob.glob(pattern)):
    os.remove(p)
    removed.append(p)
  return removed


def inspect_shard(path: str | os.PathLike) -> ShardInfo:
  """Opens a finished shard and describes it.

  Raises:
    FileNotFoundError: no file at ``path``.
    DataFormatError: the file is not a complete ArrayRecord file (e.g. truncated).
  """
  path = os.fspath(path)
  if not os.path.isfile(path):
    raise MissingFileError(f"shard {path} not found")
  reader = array_record_module.ArrayRecordReader(path)
  if not reader.ok():
    raise DataFormatError(f"shard {path} ({os.path.getsize(path)} bytes) is not a "
                          "complete ArrayRecord file (truncated or corrupt?)")
  try:
    num = int(reader.num_records())
  finally:
    reader.close()
  return ShardInfo(os.path.basename(path), num, os.path.getsize(path))


def write_dataset(directory: str | os.PathLike,
                  shards: Sequence[Iterable[Mapping[str, Any]]], schema: LatentSchema, *,
                  compression: str = DEFAULT_COMPRESSION,
                  metadata: Mapping[str, Any] | None = None) -> DatasetInfo:
  """Writes a whole dataset: one shard per entry of ``shards``, then ``dataset.json``."""
  directory = os.fspath(directory)
  os.makedirs(directory, exist_ok=True)
  ranges: list = []
  infos = [write_shard(os.path.join(directory, shard_name(i, len(shards))), examples,
                       schema, compression, label_ranges=ranges)
           for i, examples in enumerate(shards)]
  info = DatasetInfo(schema, tuple(infos), {**label_metadata(ranges), **dict(metadata or {})})
  schema_lib.write_dataset_info(directory, info)
  return info


def write_examples(directory: str | os.PathLike, examples: Sequence[Mapping[str, Any]],
                   schema: LatentSchema, records_per_shard: int = 1000,
                   **kwargs) -> DatasetInfo:
  """Writes a list of examples, ``records_per_shard`` per shard (see write_dataset)."""
  if records_per_shard <= 0:
    raise ValueError(f"records_per_shard must be positive, got {records_per_shard}")
  n = len(examples)
  chunks = [examples[i:i + records_per_shard] for i in range(0, n, records_per_shard)]
  return write_dataset(directory, chunks, schema, **kwargs)


class LatentRecords:
  """Random-access source of decoded records of one dataset directory.

  ``records[i]`` is a dict of numpy arrays (see ``LatentSchema.fields``), checked
  against the schema; global index ``i`` runs over the shards in ``dataset.json``
  order. Wraps grain's ``ArrayRecordDataSource`` and is picklable, so it can feed
  Grain worker processes.
  """

  def __init__(self, directory: str | os.PathLike, verify: bool = True):
    """Opens a dataset.

    Args:
      directory: dataset directory holding ``dataset.json`` and the shards.
      verify: also open each shard and compare its record count (cheap: reads the
        footer). Existence and byte size are always checked.

    Raises:
      FileNotFoundError: no ``dataset.json`` or a listed shard is missing.
      DataFormatError: a shard is truncated/corrupt or does not match ``dataset.json``.
    """
    self.directory = os.fspath(directory)
    self.info = schema_lib.read_dataset_info(self.directory)
    self.schema = self.info.schema
    if not self.info.shards or self.info.num_records == 0:
      raise DataFormatError(f"{self.directory}/{schema_lib.DATASET_FILE} lists no records")
    paths = []
    for shard in self.info.shards:
      path = os.path.join(self.directory, shard.file)
      self._check_shard(path, shard, verify)
      paths.append(f"{path}[0:{shard.num_records}]")
    self._files = [s.file for s in self.info.shards]
    self._starts = np.cumsum([0] + [s.num_records for s in self.info.shards])
    self._source = grain.sources.ArrayRecordDataSource(paths)

  @staticmethod
  def _check_shard(path: str, shard: ShardInfo, verify: bool) -> None:
    if not os.path.isfile(path):
      raise MissingFileError(f"shard {path} listed in {schema_lib.DATASET_FILE} not found")
    size = os.path.getsize(path)
    if size != shard.num_bytes:
      raise DataFormatError(
          f"shard {path} is {size} bytes but {schema_lib.DATASET_FILE} records "
          f"{shard.num_bytes} (truncated or replaced?)")
    if verify:
      found = inspect_shard(path)
      if found.num_records != shard.num_records:
        raise DataFormatError(f"shard {path} holds {found.num_records} records, "
                              f"{schema_lib.DATASET_FILE} says {shard.num_records}")

  def __len__(self) -> int:
    return int(self._starts[-1])

  def locate(self, index: int) -> tuple[str, int]:
    """(shard file name, position in shard) of global record ``index``."""
    if not 0 <= index < len(self):
      raise IndexError(f"record {index} out of range for {len(self)} records")
    shard = int(np.searchsorted(self._starts, index, side="right")) - 1
    return self._files[shard], index - int(self._starts[shard])

  def describe(self, index: int) -> str:
    """Human-readable location of a record, for error messages."""
    file, pos = self.locate(index)
    return f"{os.path.join(self.directory, file)} record {pos} (global record {index})"

  def raw(self, index: int) -> bytes:
    """The stored bytes of record ``index``."""
    index = int(index)
    self.locate(index)
    try:
      return self._source[index]
    except Exception as e:  # pylint: disable=broad-except
      raise DataFormatError(f"{self.describe(index)}: read failed: {e}") from e

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    index = int(index)
    return schema_lib.decode_record(self.raw(index), self.schema, self.describe(index))

  def __repr__(self) -> str:
    return f"LatentRecords({self.directory!r}, {len(self)} records)"
