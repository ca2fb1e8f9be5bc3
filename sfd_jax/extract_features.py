"""``--mode=extract``: DINOv2 patch features for training the Semantic VAE (SPEC §3.3).

  python main.py --mode=extract --config=configs/encode_imagenet.py --workdir=/data/in1k_dino

Every image goes through the SemVAE *training* preprocessing — torchvision
``Resize(256, bicubic)`` on the short side, ``CenterCrop(224)``, ImageNet
normalisation (``preprocess.semvae_training_dino_input``) — then DINOv2
``x_norm_patchtokens`` ([256, 768] for ViT-B/14 at 224 px), stored as float16 feature
records. This is *not* the preprocessing of the latent encoding job (SPEC §2.3,
§12.13); both are kept as the reference has them.

The job shares the machinery of ``--mode=encode`` (``sfd_jax.data.images``): shards of
``config.extract.records_per_shard`` images, process ``p`` of ``P`` writes shards
``s ≡ p (mod P)`` with the batch spread over its own devices, unreadable images are
reported by name and skipped, finished shards survive a rerun. The reference shuffles
while extracting; here the order is the source order (training shuffles anyway).

Feature dataset (format ``sfd_jax.dino_features`` version 1)::

  <dir>/features.json                   token count, width, dtype, shard list, metadata
  <dir>/data-XXXXX-of-YYYYY.array_record ArrayRecord shards (group size 1)

Record bytes: the features, C-order little-endian ``dtype`` [num_tokens, dim]
(row-major token grid), followed by the label as a little-endian int32; a record has
exactly ``FeatureSpec.record_bytes`` bytes. ``FeatureRecords`` reads a dataset with
the same checks as ``sfd_jax.data.records.LatentRecords``.

This module also holds the network loading shared with ``--mode=encode``.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from typing import Any, Mapping, Sequence

import grain
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

import sfd_jax  # noqa: F401  (flax settings)
from sfd_jax import parallel
from sfd_jax.convert import dinov2 as convert_dinov2
from sfd_jax.convert import semantic_vae as convert_semantic_vae
from sfd_jax.convert import texture_vae as convert_texture_vae
from sfd_jax.data import images as images_lib
from sfd_jax.data import preprocess
from sfd_jax.data import records
from sfd_jax.data.schema import DataFormatError, ShardInfo
from sfd_jax.models import dinov2, semantic_vae, texture_vae

FEATURES_FORMAT = "sfd_jax.dino_features"
FEATURES_VERSION = 1
FEATURES_FILE = "features.json"
NETWORK_KINDS = ("texture_vae", "dinov2", "semvae")
_LABEL = np.dtype("<i4")


# ------------------------------------------------------------ feature records


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
      raise FileNotFoundError(f"{path} not found: {self.directory!r} is not a feature "
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


# ------------------------------------------------- networks shared with encode


def _dtype(name: str | None):
  return None if not name else jnp.dtype(name)


def compiler_options(section) -> tuple[tuple[str, Any], ...]:
  """``section.compiler_options`` (a dict of XLA options, e.g.
  ``{"xla_backend_optimization_level": 0}`` for fast compiles in CPU tests) as a
  hashable tuple; empty when absent."""
  opts = section.get("compiler_options") if hasattr(section, "get") else None
  if not opts:
    return ()
  opts = opts.to_dict() if hasattr(opts, "to_dict") else dict(opts)
  return tuple(sorted(opts.items()))


@functools.lru_cache(maxsize=None)
def jitted(fn, static_argnums: tuple[int, ...] = (),
           options: tuple[tuple[str, Any], ...] = ()) -> Any:
  """``jax.jit(fn)`` with XLA ``options``, one jitted object per (fn, options) so
  that repeated jobs in one process reuse the compiled code."""
  return jax.jit(fn, static_argnums=static_argnums, compiler_options=dict(options) or None)


@functools.lru_cache(maxsize=8)
def _random_network(model_cls, cfg, dtype, seed: int) -> nnx.Module:
  """The network with random weights drawn on the host (no compilation).

  For tests and smoke runs: kernels N(0, 1/fan_in) (fan_in = all but the last axis),
  normalisation scales 1 + N(0, 0.1²), every other parameter N(0, 0.02²); seeded
  numpy, so the weights are the same on every machine. Cached (the jobs never modify
  their networks), since building even a tiny NNX model takes seconds.
  """
  model = nnx.eval_shape(lambda: model_cls(cfg, rngs=nnx.Rngs(seed), dtype=dtype))
  rng = np.random.default_rng(seed)
  for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
    shape, name = var.get_value().shape, str(path[-1])
    if name == "kernel":
      value = rng.normal(size=shape) / math.sqrt(max(1, math.prod(shape[:-1])))
    elif name in ("scale", "gamma"):
      value = 1.0 + 0.1 * rng.normal(size=shape)
    else:
      value = 0.02 * rng.normal(size=shape)
    var.set_value(jnp.asarray(value, var.get_value().dtype))
  return model


def load_network(kind: str, path: str, *, random_init: bool = False, preset: str = "",
                 dtype: str | None = "float32", seed: int = 0,
                 overrides: Mapping[str, Any] | None = None) -> nnx.Module:
  """One of the frozen networks of the data jobs.

  Args:
    kind: "texture_vae", "dinov2" or "semvae".
    path: folder written by the matching converter (``python -m sfd_jax.convert.<kind>``;
      DINOv2 and SemVAE also accept a reference checkpoint file).
    random_init: build ``preset`` with random weights instead (tests, smoke runs).
    preset: architecture preset used with ``random_init``.
    dtype: compute dtype (parameters stay float32).
    seed: random-init seed.
    overrides: config fields replaced in the preset (``random_init`` only).
  """
  if kind not in NETWORK_KINDS:
    raise ValueError(f"network kind {kind!r} not one of {NETWORK_KINDS}")
  dt = _dtype(dtype)
  if random_init:
    cfg_cls, model_cls = {
        "texture_vae": (texture_vae.TextureVAEConfig, texture_vae.TextureVAE),
        "dinov2": (dinov2.DinoV2Config, dinov2.DinoV2),
        "semvae": (semantic_vae.SemVAEConfig, semantic_vae.SemanticVAE)}[kind]
    cfg = dataclasses.replace(cfg_cls.preset(preset), **dict(overrides or {}))
    logging.info("%s: random weights of preset %r (%s)", kind, preset, cfg)
    return _random_network(model_cls, cfg, dt, seed)
  if not path:
    raise ValueError(f"no converted {kind} checkpoint given; convert one with "
                     f"python -m sfd_jax.convert.{kind.replace('semvae', 'semantic_vae')} "
                     "(see docs/encode.md)")
  if not os.path.exists(path):
    raise FileNotFoundError(f"{kind} checkpoint {path} not found")
  if kind == "texture_vae":
    return convert_texture_vae.load_converted_texture_vae(path, dtype=dt)
  if kind == "dinov2":
    return convert_dinov2.load_dinov2(path, dtype=dt)
  return convert_semantic_vae.load_semantic_vae(path, dtype=dt)


def local_mesh() -> Mesh:
  """A mesh over this process's devices (all on the batch axis).

  The data jobs are embarrassingly parallel: each process works on its own shards,
  so its computations never involve another process's devices.
  """
  return parallel.make_mesh({"data": -1}, devices=jax.local_devices())


def place_networks(modules: Sequence[nnx.Module], mesh: Mesh) -> tuple[tuple, tuple]:
  """(graphdefs, states replicated over ``mesh``) of frozen networks."""
  graphdefs, states = [], []
  rep = NamedSharding(mesh, P())
  for m in modules:
    gd, st = nnx.split(m)
    graphdefs.append(gd)
    states.append(jax.device_put(st, rep))
  return tuple(graphdefs), tuple(states)


def check_batch_size(batch_size: int, mesh: Mesh, field: str) -> None:
  if batch_size <= 0 or batch_size % mesh.size:
    raise ValueError(f"{field}: batch {batch_size} must be a positive multiple of the "
                     f"{mesh.size} local devices")


def _dino_patch_features(graphdef, state, images):
  dino = nnx.merge(graphdef, state)
  return dino.patch_features(images).astype(jnp.float16)


# --------------------------------------------------------------------- the job


def _manifest(config: ml_collections.ConfigDict, source, spec: FeatureSpec) -> dict:
  e = config.extract
  return {"job": "extract", "source": source.describe(), "spec": spec.to_json(),
          "records_per_shard": int(e.records_per_shard), "resize": int(e.resize),
          "crop": int(e.crop), "dinov2": e.dinov2 or "random_init",
          "dtype": e.dtype}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Extracts DINOv2 features of ``config.data`` into the feature dataset ``workdir``.

  Returns ``{"complete": bool, "num_records": int, "skipped": [...]}`` (the totals only
  on process 0 once every shard is finished).
  """
  e = config.extract
  source = images_lib.Subset(images_lib.make_source(config.data),
                             int(config.data.get("max_images", 0)))
  options = compiler_options(config.job)
  dino = load_network("dinov2", e.dinov2, random_init=e.random_init,
                      preset=e.dinov2_preset, dtype=e.dtype, seed=config.seed)
  grid = dino.patch_grid(e.crop, e.crop)
  spec = FeatureSpec(grid[0] * grid[1], dino.config.embed_dim, "float16")
  mesh = local_mesh()
  batch_size = int(e.per_device_batch) * mesh.size
  check_batch_size(batch_size, mesh, "config.extract.per_device_batch × local devices")
  (graphdef,), (state,) = place_networks([dino], mesh)
  batch_sh = parallel.batch_sharding(mesh)
  features_fn = jitted(_dino_patch_features, (0,), options)
  plan = images_lib.ShardPlan(len(source), int(e.records_per_shard))
  images_lib.prepare_output(workdir, plan, _manifest(config, source, spec), [FEATURES_FILE])

  def prepare(img):
    return preprocess.semvae_training_dino_input(img, resize=int(e.resize), crop=int(e.crop))

  def compute(batch, indices):
    del indices
    return features_fn(graphdef, state, jax.device_put(batch, batch_sh))

  def to_records(out, labels):
    return [{"features": f, "label": l} for f, l in zip(out, labels)]

  result = images_lib.run_sharded_job(
      source, workdir, plan, batch_size=batch_size, prepare=prepare, compute=compute,
      to_records=to_records,
      open_writer=lambda p: FeatureShardWriter(p, spec, config.job.compression),
      process_index=jax.process_index(), process_count=jax.process_count(),
      decode_threads=config.job.decode_threads, prefetch_batches=config.job.prefetch_batches,
      log_every_batches=config.job.log_every_batches,
      stop_after_shards=config.job.debug_stop_after_shards, name="extract")
  return finish_job(workdir, plan, source, result, "extract",
                    lambda shards, meta: {"index": write_feature_info(workdir, spec, shards,
                                                                      meta)})


def finish_job(workdir: str, plan: images_lib.ShardPlan, source,
               result: images_lib.JobResult, name: str, write_index) -> dict[str, Any]:
  """Waits for every process, then (process 0) lists the shards and reports.

  ``write_index(shard_infos, metadata)`` writes the dataset's index file; it runs on
  process 0 once all shards are finished and returns a dict of extra summary entries.
  Returns ``{"complete", "num_records", "skipped", ...}``; ``complete`` is False on
  processes other than 0 and while some shard is unfinished (a process stopped early).
  """
  from sfd_jax import checkpoint  # pylint: disable=import-outside-toplevel
  checkpoint.process_barrier(f"{name}_done")
  incomplete = {"complete": False, "num_records": 0, "skipped": []}
  if jax.process_index() != 0:
    return incomplete
  missing = images_lib.unfinished_shards(workdir, plan)
  if missing:
    logging.warning("%s: %d of %d shards unfinished (e.g. %s); rerun the same command to "
                    "complete %s", name, len(missing), plan.num_shards,
                    plan.file(missing[0]), workdir)
    return incomplete
  done = images_lib.collect_done(workdir, plan)
  skipped = images_lib.skipped_images(done)
  shards = images_lib.finished_shard_infos(done)
  n = sum(s.num_records for s in shards)
  if n == 0:
    raise RuntimeError(f"{name}: no image of {source.describe()} could be read")
  extra = write_index(shards, {"source": source.describe(), "skipped_images": skipped})
  if skipped:
    logging.warning("%s: %d unreadable image(s) skipped: %s", name, len(skipped),
                    ", ".join(s["name"] for s in skipped[:20])
                    + (" ..." if len(skipped) > 20 else ""))
  logging.info("%s: finished %s: %d records in %d shards, %d unreadable image(s) skipped",
               name, workdir, n, len(shards), len(skipped))
  return dict({"complete": True, "num_records": n, "skipped": skipped}, **(extra or {}))
