"""The one schema of a stored latent record, and the dataset-level metadata
(docs/data.md, "On-disk layout"). Every writer and reader of stored latents goes through
this module.

A *record* holds one image, channels last: ``texture`` (G, G, Ct) and ``semantic``
(G, G, Cs) posterior samples, optionally ``repa`` (G, G, D) float16 DINOv2 tokens, the
``_flip`` variants of each, ``label``, and any further latent part named in
``extra_parts`` (G = 16, Ct = 32, Cs = 16, D = 768 for SFD on ImageNet 256). The sizes
are a ``LatentSchema`` stored once per dataset in ``dataset.json``. Record bytes:
``b"SFDR"``, a uint32 header length, a JSON header of (name, dtype, shape), then each
array's little-endian C-order bytes on 8-byte boundaries; decoding checks every field
against the schema.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import struct
from typing import Any, Mapping, Sequence

import numpy as np

from sfd_jax.core.errors import DataError, MissingFileError

SCHEMA_VERSION = 1
DATASET_FILE = "dataset.json"
STATS_FILE = "stats.npz"
FORMAT_NAME = "sfd_jax.latents"

_MAGIC = b"SFDR"
_PREFIX = struct.Struct("<4sI")  # magic, header length
_ALIGN = 8


class DataFormatError(DataError):
  """Stored data does not match the schema (names the file/record and the field)."""


def _where(where: str) -> str:
  return f"{where}: " if where else ""


@dataclasses.dataclass(frozen=True)
class FieldSpec:
  """Name, shape and dtype of one array of a record."""
  name: str
  shape: tuple[int, ...]
  dtype: str

  def describe(self) -> str:
    return f"{self.dtype}{list(self.shape)}"


@dataclasses.dataclass(frozen=True)
class LatentSchema:
  """Sizes of the stored latents.

  Attributes:
    grid: latent grid side G (tokens per row).
    texture_channels: texture-VAE latent channels Ct.
    semantic_channels: SemVAE latent channels Cs.
    repa_dim: REPA feature width D (ignored when ``has_repa`` is False).
    has_repa: whether records carry REPA target features.
    has_flip: whether records carry the flipped variants.
    repa_dtype: storage dtype of the REPA features.
    extra_parts: ((name, channels), ...) of further latent parts stored after the
      semantic part; the composite latent is [texture | semantic | extra parts...] in
      this order (a clock schedule names the same parts, docs/clocks.md).
  """
  grid: int = 16
  texture_channels: int = 32
  semantic_channels: int = 16
  repa_dim: int = 768
  has_repa: bool = True
  has_flip: bool = True
  repa_dtype: str = "float16"
  extra_parts: tuple[tuple[str, int], ...] = ()

  def __post_init__(self):
    try:
      extra = tuple((str(n), int(c)) for n, c in self.extra_parts)
    except (TypeError, ValueError):
      raise ValueError("LatentSchema.extra_parts must be ((name, channels), ...), got "
                       f"{self.extra_parts!r}") from None
    object.__setattr__(self, "extra_parts", extra)
    reserved = {"texture", "semantic", "repa", "label"}
    names = [n for n, _ in extra]
    for n, c in extra:
      if not n.isidentifier() or n in reserved or n.endswith("_flip") or c <= 0:
        raise ValueError(f"LatentSchema.extra_parts: ({n!r}, {c}) needs an identifier name "
                         f"not in {sorted(reserved)} (no '_flip' suffix) and channels > 0")
    if len(set(names)) != len(names):
      raise ValueError(f"LatentSchema.extra_parts: duplicate names {names}")
    for name in ("grid", "texture_channels", "semantic_channels", "repa_dim"):
      value = getattr(self, name)
      if not isinstance(value, (int, np.integer)) or value <= 0:
        raise ValueError(f"LatentSchema.{name} must be a positive int, got {value!r}")
    if self.repa_dtype not in ("float16", "float32"):
      raise ValueError(f"LatentSchema.repa_dtype must be float16 or float32, "
                       f"got {self.repa_dtype!r}")

  @property
  def latent_channels(self) -> int:
    """Channels of the composite latent [texture | semantic | extra parts]."""
    return sum(c for _, c in self.latent_parts())

  def latent_parts(self) -> tuple[tuple[str, int], ...]:
    """((name, channels), ...) of the composite latent, in channel order."""
    return (("texture", self.texture_channels),
            ("semantic", self.semantic_channels)) + self.extra_parts

  @property
  def num_tokens(self) -> int:
    return self.grid * self.grid

  def parts(self) -> tuple[str, ...]:
    """The per-view array names (without the ``_flip`` suffix)."""
    return (("texture", "semantic") + tuple(n for n, _ in self.extra_parts)
            + (("repa",) if self.has_repa else ()))

  def fields(self) -> dict[str, FieldSpec]:
    """All fields of a record, in storage order."""
    return dict(_fields(self))

  def to_json(self) -> dict[str, Any]:
    out = dataclasses.asdict(self)
    if not self.extra_parts:
      del out["extra_parts"]        # datasets without extra parts have no such entry
    else:
      out["extra_parts"] = [list(p) for p in self.extra_parts]
    return out

  @classmethod
  def from_json(cls, obj: Mapping[str, Any], where: str = "") -> "LatentSchema":
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(obj) - names)
    if unknown:
      raise DataFormatError(f"{_where(where)}unknown schema keys {unknown}; "
                            f"expected a subset of {sorted(names)}")
    try:
      return cls(**dict(obj))
    except (TypeError, ValueError) as e:
      raise DataFormatError(f"{_where(where)}bad schema {dict(obj)}: {e}") from e


@functools.lru_cache(maxsize=None)
def _fields(schema: LatentSchema) -> dict[str, FieldSpec]:
  """Field specs of a schema (cached: decoding looks them up for every record)."""
  g = schema.grid
  base = {
      "texture": ((g, g, schema.texture_channels), "float32"),
      "semantic": ((g, g, schema.semantic_channels), "float32"),
      "repa": ((g, g, schema.repa_dim), schema.repa_dtype),
      **{n: ((g, g, c), "float32") for n, c in schema.extra_parts},
  }
  out = {}
  for suffix in (("", "_flip") if schema.has_flip else ("",)):
    for part in schema.parts():
      shape, dtype = base[part]
      out[part + suffix] = FieldSpec(part + suffix, shape, dtype)
  out["label"] = FieldSpec("label", (), "int32")
  return out


# ------------------------------------------------------------------ record codec


def _header_for(arrays: Sequence[tuple[str, np.ndarray]]) -> bytes:
  fields = [[name, a.dtype.name, list(a.shape)] for name, a in arrays]
  header = json.dumps({"v": SCHEMA_VERSION, "f": fields}, separators=(",", ":")).encode()
  pad = (-(_PREFIX.size + len(header))) % _ALIGN
  return header + b" " * pad


def validate_example(example: Mapping[str, Any], schema: LatentSchema,
                     where: str = "") -> dict[str, np.ndarray]:
  """Checks an example against the schema; returns its arrays in storage order.

  Float fields must have exactly the schema's shape and dtype. The label may be any
  integer scalar (it is stored as int32).

  Raises:
    DataFormatError: naming ``where``, the field, and the expected vs found
      shape/dtype, for missing, unexpected or mismatching fields.
  """
  specs = schema.fields()
  missing = [k for k in specs if k not in example]
  extra = sorted(k for k in example if k not in specs)
  if missing or extra:
    raise DataFormatError(
        f"{_where(where)}record fields do not match the schema: missing {missing}, "
        f"unexpected {extra} (expected {list(specs)})")
  out = {}
  for name, spec in specs.items():
    value = np.asarray(example[name])
    if name == "label":
      if value.shape != () or not np.issubdtype(value.dtype, np.integer):
        raise DataFormatError(f"{_where(where)}field 'label': expected an integer "
                              f"scalar, found {value.dtype.name}{list(value.shape)}")
      if not np.iinfo(np.int32).min <= int(value) <= np.iinfo(np.int32).max:
        raise DataFormatError(f"{_where(where)}field 'label': {int(value)} does not fit int32")
      value = value.astype(np.int32)
    elif value.shape != spec.shape or value.dtype.name != spec.dtype:
      raise DataFormatError(
          f"{_where(where)}field '{name}': expected {spec.describe()}, "
          f"found {value.dtype.name}{list(value.shape)}")
    out[name] = value
  return out


def encode_record(example: Mapping[str, Any], schema: LatentSchema, where: str = "") -> bytes:
  """Serialises one example (validated against ``schema``) to record bytes."""
  arrays = list(validate_example(example, schema, where).items())
  chunks = [b"", _header_for(arrays)]
  chunks[0] = _PREFIX.pack(_MAGIC, len(chunks[1]))
  for _, a in arrays:
    raw = np.ascontiguousarray(a).astype(a.dtype.newbyteorder("<"), copy=False).tobytes()
    chunks.append(raw)
    chunks.append(b"\0" * ((-len(raw)) % _ALIGN))
  return b"".join(chunks)


def decode_record(data: bytes, schema: LatentSchema, where: str = "") -> dict[str, np.ndarray]:
  """Parses record bytes and checks every field against ``schema``.

  Returns read-only ``np.frombuffer`` views (no copy); ``label`` is an int32 scalar
  array.

  Raises:
    DataFormatError: naming ``where`` and the field for a bad magic, a truncated
      record, missing/unexpected fields, or a field of the wrong shape/dtype.
  """
  view = memoryview(data)
  if len(view) < _PREFIX.size:
    raise DataFormatError(f"{_where(where)}record of {len(view)} bytes is too short")
  magic, header_len = _PREFIX.unpack_from(view, 0)
  if magic != _MAGIC:
    raise DataFormatError(f"{_where(where)}not an sfd_jax latent record "
                          f"(magic {bytes(magic)!r}, expected {_MAGIC!r})")
  start = _PREFIX.size + header_len
  try:
    header = json.loads(bytes(view[_PREFIX.size:start]))
    version, fields = header["v"], header["f"]
  except (ValueError, KeyError, TypeError) as e:
    raise DataFormatError(f"{_where(where)}corrupt record header: {e}") from e
  if version != SCHEMA_VERSION:
    raise DataFormatError(f"{_where(where)}record format version {version}, this code "
                          f"reads version {SCHEMA_VERSION}")
  specs = _fields(schema)
  found = [f[0] for f in fields]
  if sorted(found) != sorted(specs):
    missing = [k for k in specs if k not in found]
    extra = [k for k in found if k not in specs]
    raise DataFormatError(
        f"{_where(where)}record fields do not match the dataset schema: missing "
        f"{missing}, unexpected {extra}")
  out = {}
  offset = start
  for name, dtype, shape in fields:
    spec = specs[name]
    if dtype != spec.dtype or tuple(shape) != spec.shape:
      raise DataFormatError(f"{_where(where)}field '{name}': expected {spec.describe()}, "
                            f"found {dtype}{list(shape)}")
    dt = np.dtype(dtype).newbyteorder("<")
    nbytes = dt.itemsize * math.prod(shape)
    if offset + nbytes > len(view):
      raise DataFormatError(f"{_where(where)}record truncated in field '{name}' "
                            f"({len(view)} bytes, field ends at {offset + nbytes})")
    out[name] = np.frombuffer(view, dt, count=nbytes // dt.itemsize,
                              offset=offset).reshape(shape)
    offset += nbytes + (-nbytes) % _ALIGN
  return out


# ------------------------------------------------------------ dataset metadata


@dataclasses.dataclass(frozen=True)
class ShardInfo:
  """One finished shard: file name (relative to the dataset dir), records, bytes."""
  file: str
  num_records: int
  num_bytes: int

  def to_json(self) -> dict[str, Any]:
    return {"file": self.file, "num_records": self.num_records, "bytes": self.num_bytes}


@dataclasses.dataclass(frozen=True)
class DatasetInfo:
  """Contents of ``dataset.json``: schema, shard list and free-form provenance."""
  schema: LatentSchema
  shards: tuple[ShardInfo, ...]
  metadata: Mapping[str, Any] = dataclasses.field(default_factory=dict)

  @property
  def num_records(self) -> int:
    return sum(s.num_records for s in self.shards)

  def to_json(self) -> dict[str, Any]:
    return {
        "format": FORMAT_NAME,
        "schema_version": SCHEMA_VERSION,
        "schema": self.schema.to_json(),
        "fields": {k: {"shape": list(f.shape), "dtype": f.dtype}
                   for k, f in self.schema.fields().items()},
        "num_records": self.num_records,
        "shards": [s.to_json() for s in self.shards],
        "metadata": dict(self.metadata),
    }


def write_dataset_info(directory: str | os.PathLike, info: DatasetInfo) -> str:
  """Writes ``dataset.json`` atomically (temp file, then rename); returns its path."""
  path = os.path.join(os.fspath(directory), DATASET_FILE)
  tmp = f"{path}.tmp-{os.getpid()}"
  with open(tmp, "w", encoding="utf-8") as f:
    json.dump(info.to_json(), f, indent=2)
    f.write("\n")
  os.replace(tmp, path)
  return path


def read_dataset_info(directory: str | os.PathLike) -> DatasetInfo:
  """Reads and checks ``dataset.json``.

  Raises:
    FileNotFoundError: the directory has no ``dataset.json``.
    DataFormatError: the file is malformed or of another format version.
  """
  path = os.path.join(os.fspath(directory), DATASET_FILE)
  if not os.path.exists(path):
    raise MissingFileError(
        f"{path} not found: {os.fspath(directory)!r} is not an sfd_jax latent dataset "
        "(write one with sfd_jax.data.records or sfd_jax.data.convert_reference)")
  try:
    with open(path, encoding="utf-8") as f:
      obj = json.load(f)
  except ValueError as e:
    raise DataFormatError(f"{path}: not valid JSON ({e}); restore it from a copy or rerun "
                          "the job that wrote the dataset") from e
  if not isinstance(obj, dict) or obj.get("format") != FORMAT_NAME:
    raise DataFormatError(f"{path}: 'format' must be {FORMAT_NAME!r}")
  if obj.get("schema_version") != SCHEMA_VERSION:
    raise DataFormatError(f"{path}: schema_version {obj.get('schema_version')!r}, this "
                          f"code reads version {SCHEMA_VERSION}")
  try:
    schema = LatentSchema.from_json(obj["schema"], where=path)
    shards = tuple(ShardInfo(str(s["file"]), int(s["num_records"]), int(s["bytes"]))
                   for s in obj["shards"])
  except (KeyError, TypeError, ValueError) as e:
    if isinstance(e, DataFormatError):
      raise
    raise DataFormatError(f"{path}: missing or malformed entry: {e!r}") from e
  info = DatasetInfo(schema, shards, obj.get("metadata", {}))
  if "num_records" in obj and obj["num_records"] != info.num_records:
    raise DataFormatError(f"{path}: num_records {obj['num_records']} != sum over shards "
                          f"{info.num_records}")
  return info
