"""Grain input pipeline for training on stored latents (docs/method.md §2.4; docs/data.md, "The
input pipeline").

  records ─ shuffle(seed) ─ repeat(epochs) ─ per-example transform(global index)
          ─ [process_index::process_count] ─ batch(per-process batch)
          ─ to_iter_dataset ─ mp_prefetch(num_workers)

Everything is addressed by index, so the stream is a pure function of the seed: the
shuffle is global and differs per epoch; one flip choice per example (texture, semantic
and REPA together) from (seed, global stream index); global batch k is the same for any
process count. Batches: ``{"latent": (B,G,G,Ct+Cs) f32 normalised by the dataset
statistics (or only scaled with ``normalize=False``) × ``latent_multiplier``, "label":
(B,) int32, "repa": (B,G*G,D)}``. The iterator's state (batches consumed plus the
settings that define the stream) restores with any worker count and any process count
that keeps the global batch (``LatentIterator``).
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

from absl import flags
import grain
import numpy as np

from sfd_jax.data import records as records_lib
from sfd_jax.data import stats as stats_lib
from sfd_jax.data.schema import DataFormatError, LatentSchema

STATE_FORMAT = "sfd_jax.data.LatentIterator/1"
_FLIP_STREAM = 0x5F11  # separates the flip RNG stream from other uses of the seed


def ensure_absl_flags_parsed(*_unused) -> None:
  """Grain reads absl flags; outside an absl app they must be marked as parsed.

  Runs in the main process when the pipeline is built and in each Grain worker
  process (as its ``worker_init_fn``; the arguments are the worker index and count).
  """
  if not flags.FLAGS.is_parsed():
    flags.FLAGS.mark_as_parsed()


_MASK64 = (1 << 64) - 1


def _mix64(x: int) -> int:
  """SplitMix64 finaliser: a bijective, well-mixing hash of a 64-bit integer."""
  x = (x + 0x9E3779B97F4A7C15) & _MASK64
  x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
  x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
  return x ^ (x >> 31)


def flip_choice(seed: int, index: int) -> bool:
  """Whether global stream element ``index`` uses the flipped views (p = 0.5).

  A hash of (seed, index): independent of process count, workers and timing.
  """
  key = _mix64((int(seed) & _MASK64) ^ _FLIP_STREAM)
  return bool(_mix64(key ^ (int(index) & _MASK64)) >> 63)


class ExampleTransform(grain.transforms.MapWithIndex):
  """Record → training example: flip choice, normalisation, concatenation.

  ``index`` is the element's position in the global (shuffled, repeated) stream.
  """

  def __init__(self, schema: LatentSchema, stats: stats_lib.LatentStats | None, *,
               latent_multiplier: float = 1.0, flip: bool = True, repa: bool = True,
               seed: int = 0, num_classes: int | None = None, where: str = "dataset",
               normalize: bool = True):
    if flip and not schema.has_flip:
      raise DataFormatError(f"{where}: flip augmentation requested but the dataset stores "
                            "no flipped views (schema.has_flip is False); pass flip=False "
                            "(config.data.flip=False)")
    if repa and not schema.has_repa:
      raise DataFormatError(f"{where}: REPA features requested but the dataset stores none "
                            "(schema.has_repa is False); pass repa=False "
                            "(config.objective.use_repa=False)")
    self.num_classes = None if num_classes is None else int(num_classes)
    self.where = where
    self.normalize = bool(normalize)
    if self.normalize:
      if stats is None:
        raise ValueError("normalisation needs latent statistics (stats=None)")
      stats.check(schema, where="normalisation stats")
    self.schema = schema
    self.flip = flip
    self.repa = repa
    self.seed = int(seed)
    self.multiplier = np.float32(latent_multiplier)
    if self.normalize:
      self.t_mean, self.t_std = stats.texture_mean, stats.texture_std
      self.s_mean, self.s_std = stats.semantic_mean, stats.semantic_std
    self.extra = tuple((name,) + (tuple(stats.part(name)) if self.normalize else (None, None))
                       for name, _ in schema.extra_parts)

  def map_with_index(self, index: int, element: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    suffix = "_flip" if self.flip and flip_choice(self.seed, index) else ""
    texture, semantic = element["texture" + suffix], element["semantic" + suffix]
    if self.normalize:
      texture = (texture - self.t_mean) / self.t_std
      semantic = (semantic - self.s_mean) / self.s_std
    parts = [texture, semantic]
    for name, mean, std in self.extra:
      x = element[name + suffix]
      parts.append((x - mean) / std if self.normalize else x)
    latent = np.concatenate(parts, axis=-1)
    if self.multiplier != 1:
      latent = latent * self.multiplier
    label = np.asarray(element["label"], np.int32)
    if self.num_classes is not None and not 0 <= int(label) < self.num_classes:
      raise DataFormatError(
          f"{self.where}: a record (stream element {index}) has class label {int(label)}, "
          f"outside [0, {self.num_classes}) of config.model.num_classes; fix the labels or "
          "set config.model.num_classes to the number of classes")
    out = {"latent": latent.astype(np.float32, copy=False), "label": label}
    if self.repa:  # stays in its stored dtype here; BatchFn casts while stacking
      out["repa"] = element["repa" + suffix].reshape(self.schema.num_tokens,
                                                     self.schema.repa_dim)
    return out


REPA_DTYPES = ("float32", "bfloat16", "float16")


def repa_numpy_dtype(name: str) -> np.dtype:
  """numpy dtype of ``repa_dtype`` (bfloat16 through ml_dtypes, which JAX ships)."""
  if name not in REPA_DTYPES:
    raise ValueError(f"repa_dtype {name!r} not in {REPA_DTYPES}")
  if name == "bfloat16":
    import ml_dtypes  # pylint: disable=import-outside-toplevel
    return np.dtype(ml_dtypes.bfloat16)
  return np.dtype(name)


class BatchFn:
  """Stacks examples into a batch, casting ``repa`` to ``repa_dtype`` in the same pass."""

  def __init__(self, repa_dtype: str = "float32"):
    self.repa_dtype = repa_numpy_dtype(repa_dtype)

  def __call__(self, examples):
    return {k: np.stack([e[k] for e in examples],
                        dtype=self.repa_dtype if k == "repa" else None)
            for k in examples[0]}


def _check_process(process_index: int | None, process_count: int | None) -> tuple[int, int]:
  if process_index is None or process_count is None:
    import jax  # pylint: disable=import-outside-toplevel
    process_index = jax.process_index() if process_index is None else process_index
    process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f"process_index {process_index} not in [0, {process_count})")
  return int(process_index), int(process_count)


def build_pipeline(data_dir: str | os.PathLike, *, batch_size: int, seed: int = 0,
                   num_epochs: int | None = None, process_index: int | None = None,
                   process_count: int | None = None,
                   stats: stats_lib.LatentStats | str | os.PathLike | None = None,
                   latent_multiplier: float = 1.0, flip: bool = True, repa: bool = True,
                   repa_dtype: str = "float32", shuffle: bool = True,
                   normalize: bool = True,
                   drop_remainder: bool = True, num_workers: int = 0,
                   worker_buffer_size: int = 2, read_threads: int = 2,
                   prefetch_batches: int = 2,
                   num_classes: int | None = None) -> "LatentIterator":
  """Builds the training iterator over a stored latent dataset.

  Args:
    data_dir: dataset directory (``dataset.json``, shards, usually ``stats.npz``).
    batch_size: examples per batch on *this process*.
    seed: shuffle and flip seed.
    num_epochs: passes over the data; ``None`` repeats forever.
    process_index, process_count: this process's slot; default
      ``jax.process_index()`` / ``jax.process_count()``.
    stats: ``LatentStats``, a path to a stats file, or ``None`` for
      ``<data_dir>/stats.npz``.
    latent_multiplier: factor applied to the whole normalised latent (SFD: 1.0).
    normalize: per-channel normalisation with ``stats`` (SFD: True); False uses the
      stored latents as they are (times ``latent_multiplier``).
    flip: random choice between stored and flipped views (SFD: True).
    repa: emit REPA target features (``repa`` key).
    repa_dtype: dtype of the emitted REPA features: float32 (the reference's), float16
      (the training config's default: half the host→device bytes, and exact — the stored
      features are float16 and the loss upcasts to float32) or bfloat16 (also half, but
      rounds the stored values).
    shuffle: global shuffle (reseeded every epoch).
    drop_remainder: with finite epochs, drop the tail that does not fill a whole
      *global* batch, so every process yields the same number of batches.
    num_workers: Grain worker processes (0: decode in this process).
    worker_buffer_size: batches each worker keeps ready.
    read_threads: threads producing batches (in each worker, or in-process).
    prefetch_batches: batches the thread pool keeps ready.
    num_classes: when given, every label must be in ``[0, num_classes)`` (a
      ``DataFormatError`` naming the dataset otherwise, before it reaches the model).
  """
  ensure_absl_flags_parsed()
  process_index, process_count = _check_process(process_index, process_count)
  if batch_size <= 0:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  if num_workers < 0:
    raise ValueError(f"num_workers must be >= 0, got {num_workers}")
  records = records_lib.LatentRecords(data_dir)
  if normalize and not isinstance(stats, stats_lib.LatentStats):
    stats = stats_lib.load_stats(data_dir if stats is None else stats, records.schema)
  transform = ExampleTransform(records.schema, stats if normalize else None,
                               latent_multiplier=latent_multiplier, flip=flip, repa=repa,
                               seed=seed, num_classes=num_classes,
                               where=f"dataset {os.fspath(data_dir)}", normalize=normalize)
  settings = {
      "seed": int(seed), "num_records": len(records), "num_epochs": num_epochs,
      "global_batch_size": int(batch_size) * process_count, "shuffle": bool(shuffle),
      "flip": bool(flip), "latent_multiplier": float(latent_multiplier),
  }
  if not normalize:                 # only then: states saved before the option match
    settings["normalize"] = False
  ds = grain.MapDataset.source(records)
  if shuffle:
    ds = ds.shuffle(seed=seed)
  ds = ds.repeat(num_epochs)
  ds = ds.map_with_index(transform)
  global_batch = batch_size * process_count
  if num_epochs is not None and drop_remainder:
    ds = ds[:len(ds) // global_batch * global_batch]
  ds = ds[process_index::process_count]
  ds = ds.batch(batch_size, drop_remainder=drop_remainder, batch_fn=BatchFn(repa_dtype))
  return LatentIterator(
      ds, settings=settings, process_index=process_index, process_count=process_count,
      num_workers=num_workers, worker_buffer_size=worker_buffer_size,
      read_options=grain.ReadOptions(num_threads=read_threads,
                                     prefetch_buffer_size=prefetch_batches))


class LatentIterator(grain.DatasetIterator):
  """Checkpointable iterator over per-process batches.

  State (``get_state``): ``{"format", "position": batches consumed, "process_index",
  "process_count", "settings": {seed, num_records, num_epochs, global_batch_size,
  shuffle, flip, latent_multiplier}}``. ``set_state`` accepts a state from any
  number of Grain workers and any process count, as long as the settings match (the
  same global batch size keeps the global batch sequence identical); otherwise it
  raises ``ValueError`` naming the differing setting.
  """

  def __init__(self, batches: grain.MapDataset, *, settings: Mapping[str, Any],
               process_index: int, process_count: int, num_workers: int,
               worker_buffer_size: int, read_options: grain.ReadOptions):
    super().__init__()
    self._batches = batches
    self._settings = dict(settings)
    self._process_index = process_index
    self._process_count = process_count
    self._num_workers = num_workers
    self._worker_buffer_size = worker_buffer_size
    self._read_options = read_options
    self._position = 0
    self._inner = None

  def __len__(self) -> int:
    """Batches this iterator yields in total (``sys.maxsize`` when repeating forever)."""
    return len(self._batches)

  def _make_inner(self):
    ds = self._batches[self._position:].to_iter_dataset(self._read_options)
    if self._num_workers > 0:
      ds = ds.mp_prefetch(
          grain.MultiprocessingOptions(num_workers=self._num_workers,
                                       per_worker_buffer_size=self._worker_buffer_size),
          worker_init_fn=ensure_absl_flags_parsed)
    return iter(ds)

  def __next__(self) -> dict[str, np.ndarray]:
    self._assert_not_closed()
    if self._inner is None:
      self._inner = self._make_inner()
    batch = next(self._inner)
    self._position += 1
    # Worker outputs are shared-memory ndarray subclasses; hand out plain views.
    return {k: np.asarray(v) for k, v in batch.items()}

  def start_prefetch(self) -> None:
    """Starts the worker processes / threads before the first ``next``."""
    self._assert_not_closed()
    if self._inner is None:
      self._inner = self._make_inner()
    self._inner.start_prefetch()

  def _close_inner(self) -> None:
    if self._inner is not None:
      self._inner.close()
      self._inner = None

  def close(self) -> None:
    """Stops worker processes and threads (idempotent)."""
    if getattr(self, "_closed", True):
      return
    self._close_inner()
    super().close()

  def get_state(self) -> dict[str, Any]:
    return {
        "format": STATE_FORMAT,
        "position": self._position,
        "process_index": self._process_index,
        "process_count": self._process_count,
        "settings": dict(self._settings),
    }

  def set_state(self, state: Mapping[str, Any]) -> None:
    if state.get("format") != STATE_FORMAT:
      raise ValueError(f"iterator state has format {state.get('format')!r}, "
                       f"expected {STATE_FORMAT!r}")
    saved = state.get("settings", {})
    for key, value in self._settings.items():
      if saved.get(key) != value:
        raise ValueError(
            f"iterator state was saved with {key}={saved.get(key)!r}, this pipeline has "
            f"{key}={value!r}: restoring would not continue the same data stream")
    position = int(state["position"])
    if position < 0:
      raise ValueError(f"iterator state has a negative position {position}")
    self._close_inner()
    self._position = position

  def _get_next_index(self) -> int:
    return self._position

  def _set_next_index(self, index: int) -> None:
    self._close_inner()
    self._position = int(index)

  def __str__(self) -> str:
    return (f"LatentIterator(position={self._position}, process={self._process_index}/"
            f"{self._process_count}, workers={self._num_workers})")


def iterator_state_to_bytes(iterator: LatentIterator) -> bytes:
  """The iterator state as UTF-8 JSON (e.g. for an Orbax composite checkpoint)."""
  return json.dumps(iterator.get_state(), sort_keys=True).encode("utf-8")


def restore_iterator_state(iterator: LatentIterator, data: bytes | str) -> LatentIterator:
  """Restores a state written by ``iterator_state_to_bytes``; returns the iterator."""
  try:
    state = json.loads(data)
  except ValueError as e:
    raise ValueError(f"iterator state is not valid JSON: {e}") from e
  iterator.set_state(state)
  return iterator
