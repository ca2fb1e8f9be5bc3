"""Feature datasets: DINOv2 patch features for training the Semantic VAE (``--mode=extract``).

Format ``sfd_jax.dino_features`` version 1::

  <dir>/features.json                   token count, width, dtype, shard list, metadata
  <dir>/data-XXXXX-of-YYYYY.array_record ArrayRecord shards (group size 1)

Record bytes: the features, C-order little-endian ``dtype`` [num_tokens, dim]
(row-major token grid), followed by the label as a little-endian int32; a record has
exactly ``FeatureSpec.record_bytes`` bytes. ``FeatureRecords`` reads a dataset with
the same checks as ``sfd_jax.data.records.LatentRecords``.
"""
from __future__ import annotations

import dataclasses
import json
import os
from typing import Any, Mapping, Sequence

import grain
import numpy as np

from sfd_jax.core.errors import MissingFileError
from sfd_jax.data import images as images_lib
from sfd_jax.data import records
from sfd_jax.data.schema import DataFormatError, ShardInfo

FEATURES_FORMAT = "sfd_jax.dino_features"
FEATURES_VERSION = 1
FEATURES_FILE = "features.json"
_LABEL = np.dtype("<i4")


@dataclasses.dataclass(frozen=True)
class FeatureSpec:
  """Shape and storage dtype of one feature record ([num_tokens, dim] + label)."""
  num_tokens: int = 256
  dim: int = 768
  dtype: str = "float16"

  def __post_init__(self):
    if self.num_tokens <= 0 or self.dim <= 0:
      raise ValueError(f"FeatureSpec: sizes must be positive, got {self.num_tokens}×{self.dim}")
    if self.dtype not in ("float16", "float32"):
      raise ValueError(f"FeatureSpec.dtype must be float16 or float32, got {self.dtype!r}")

  @property
  def shape(self) -> tuple[int, int]:
    return (self.num_tokens, self.dim)

  @property
  def feature_bytes(self) -> int:
    return self.num_tokens * self.dim * np.dtype(self.dtype).itemsize

  @property
  def record_bytes(self) -> int:
    return self.feature_bytes + _LABEL.itemsize

  def encode(self, features: np.ndarray, label: int, where: str = "") -> bytes:
    """Record bytes of one example; ``features`` must have exactly ``shape``/``dtype``."""
    features = np.asarray(features)
    if features.shape != self.shape or features.dtype.name != self.dtype:
      raise DataFormatError(f"{where}: features expected {self.dtype}{list(self.shape)}, "
                            f"found {features.dtype.name}{list(features.shape)}")
    raw = np.ascontiguousarray(features).astype(np.dtype(self.dtype).newbyteorder("<"),
                                                copy=False).tobytes()
    return raw + np.asarray(label, _LABEL).tobytes()

  def decode(self, data: bytes, where: str = "") -> dict[str, np.ndarray]:
    """``{"features": [num_tokens, dim], "label": int32 scalar}`` (read-only views)."""
    if len(data) != self.record_bytes:
      raise DataFormatError(f"{where}: feature record of {len(data)} bytes, expected "
                            f"{self.record_bytes} ({self.dtype}{list(self.shape)} + int32)")
    dt = np.dtype(self.dtype).newbyteorder("<")
    feats = np.frombuffer(data, dt, count=self.num_tokens * self.dim).reshape(self.shape)
    label = np.frombuffer(data, _LABEL, count=1, offset=self.feature_bytes)[0]
    return {"features": feats, "label": label.astype(np.int32)}

  def to_json(self) -> dict[str, Any]:
    return dataclasses.asdict(self)


class FeatureShardWriter(records.ShardWriter):
  """Atomic shard writer (temporary file, rename on close) for feature records."""

  def __init__(self, path: str | os.PathLike, spec: FeatureSpec,
               compression: str = records.DEFAULT_COMPRESSION):
    super().__init__(path, schema=None, compression=compression)
    self.spec = spec

  def write(self, example: Mapping[str, Any]) -> None:
    where = f"{os.path.basename(self.path)} record {self.num_records}"
    self._writer.write(self.spec.encode(example["features"], int(example["label"]), where))
    self.num_records += 1


def write_feature_info(directory: str, spec: FeatureSpec, shards: Sequence[ShardInfo],
                       metadata: Mapping[str, Any] | None = None) -> str:
  """Writes ``features.json`` atomically; returns its path."""
  path = os.path.join(directory, FEATURES_FILE)
  obj = {"format": FEATURES_FORMAT, "version": FEATURES_VERSION, "spec": spec.to_json(),
         "num_records": sum(s.num_records for s in shards),
         "shards": [s.to_json() for s in shards], "metadata": dict(metadata or {})}
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(obj, f, indent=2, default=str)
  os.replace(tmp, path)
  return path


def write_feature_dataset(directory: str, features: np.ndarray, labels: Sequence[int],
                          records_per_shard: int = 1000, dtype: str = "float16",
                          metadata: Mapping[str, Any] | None = None) -> str:
  """Writes in-memory features [N, L, C] as a feature dataset (small sets, tests)."""
  features = np.asarray(features)
  if features.ndim != 3 or len(labels) != len(features):
    raise ValueError(f"write_feature_dataset: expected features [N, L, C] and N labels, got "
                     f"{features.shape} and {len(labels)} labels")
  os.makedirs(directory, exist_ok=True)
  spec = FeatureSpec(features.shape[1], features.shape[2], dtype)
  plan = images_lib.ShardPlan(len(features), records_per_shard)
  infos = []
  for s in range(plan.num_shards):
    with FeatureShardWriter(os.path.join(directory, plan.file(s)), spec) as w:
      for i in range(*plan.bounds(s)):
        w.write({"features": features[i].astype(dtype), "label": labels[i]})
      infos.append(w.close())
  return write_feature_info(directory, spec, infos, metadata)


class FeatureRecords:
  """Random-access, picklable reader of a feature dataset (checked like LatentRecords)."""

  def __init__(self, directory: str | os.PathLike):
    self.directory = os.fspath(directory)
    path = os.path.join(self.directory, FEATURES_FILE)
    if not os.path.exists(path):
      raise MissingFileError(f"{path} not found: {self.directory!r} is not a feature "
                              "dataset (write one with --mode=extract)")
    try:
      with open(path, encoding="utf-8") as f:
        obj = json.load(f)
      if obj.get("format") != FEATURES_FORMAT or obj.get("version") != FEATURES_VERSION:
        raise DataFormatError(f"{path}: format {obj.get('format')!r} version "
                              f"{obj.get('version')!r}, expected {FEATURES_FORMAT!r} "
                              f"version {FEATURES_VERSION}")
      self.spec = FeatureSpec(**obj["spec"])
      shards = [ShardInfo(str(s["file"]), int(s["num_records"]), int(s["bytes"]))
                for s in obj["shards"]]
    except (ValueError, KeyError, TypeError) as e:
      if isinstance(e, DataFormatError):
        raise
      raise DataFormatError(f"{path}: malformed: {e!r}") from e
    self.metadata = obj.get("metadata", {})
    if not shards or sum(s.num_records for s in shards) == 0:
      raise DataFormatError(f"{path} lists no records")
    paths = []
    check_shard = records.LatentRecords._check_shard  # pylint: disable=protected-access
    for s in shards:
      shard_path = os.path.join(self.directory, s.file)
      check_shard(shard_path, s, verify=True)  # exists, byte size, record count
      paths.append(f"{shard_path}[0:{s.num_records}]")
    self._files = [s.file for s in shards]
    self._starts = np.cumsum([0] + [s.num_records for s in shards])
    self._source = grain.sources.ArrayRecordDataSource(paths)

  def __len__(self) -> int:
    return int(self._starts[-1])

  def describe(self, index: int) -> str:
    shard = int(np.searchsorted(self._starts, index, side="right")) - 1
    return (f"{os.path.join(self.directory, self._files[shard])} record "
            f"{index - int(self._starts[shard])} (global record {index})")

  def __getitem__(self, index: int) -> dict[str, np.ndarray]:
    index = int(index)
    if not 0 <= index < len(self):
      raise IndexError(f"feature record {index} out of range for {len(self)} records")
    return self.spec.decode(self._source[index], self.describe(index))

  def __repr__(self) -> str:
    return f"FeatureRecords({self.directory!r}, {len(self)} records)"
