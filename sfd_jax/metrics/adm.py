"""ADM-evaluator-style evaluation of a sample ``.npz`` against an ADM reference batch.

Files (the formats of openai/guided-diffusion ``evaluations/``):

* **Reference batch** (e.g. ``VIRTUAL_imagenet256_labeled.npz``): ``arr_0`` uint8
  [N, H, W, 3] images and/or precomputed statistics ``mu`` [2048], ``sigma`` [2048, 2048],
  ``mu_s`` [2023], ``sigma_s`` [2023, 2023]. As in the ADM evaluator, precomputed statistics
  are used for FID/sFID when present, and the features of ``arr_0`` always serve as the
  reference set of precision/recall.
* **Sample batch** (``sfd_jax`` sampling output): ``arr_0`` uint8 [N, H, W, 3] in the
  (shuffled) order the Inception Score splits should see (docs/method.md §9).

Arrays are streamed from the zip archive batch by batch (50k 256x256 images are 9.8 GB), so
neither file is loaded whole.

Features come from a ``FeatureExtractor``: a batched function uint8 [B, H, W, 3] -> {"pool":
[B, 2048], "spatial": [B, 2023], "logits": [B, 1008] (optional)} plus a fingerprint of the
network that computes them. ``FeatureExtractor.from_model`` wraps an ``InceptionV3``
(jit, fixed batch shape, optional input sharding); a caller that shards differently (several
hosts, a mesh) passes its own function with the same contract.

Features of a reference batch are cached next to it as ``<name>.sfd_stats.npz`` (the pool
features for precision/recall and the statistics of pool and spatial features), keyed by the
extractor's fingerprint (a hash of the weights and the preprocessing) and the reference
file's size and modification time; a stale or foreign cache is recomputed and overwritten.

For numbers comparable to published ADM-evaluator numbers build the Inception with
``preprocess="adm"`` (see ``sfd_jax.models.inception``); sFID parity with the TensorFlow
graph is unverified (same place).
"""
from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import logging
import os
import tempfile
import zipfile
from typing import Any, Callable, Iterator, Mapping

import numpy as np

from sfd_jax.core import progress
from sfd_jax.core import files
from sfd_jax.core.errors import DataError, MissingFileError, MissingKeyError
from sfd_jax.metrics import fid as fidlib

STATS_SUFFIX = ".sfd_stats.npz"
CACHE_VERSION = 1
DEFAULT_BATCH_SIZE = 100
STAT_KEYS = ("mu", "sigma", "mu_s", "sigma_s")

log = logging.getLogger(__name__)

FeatureFn = Callable[[np.ndarray], Mapping[str, Any]]


# --------------------------------------------------------------------------- npz reading


@contextlib.contextmanager
def _open_npy_member(path: str, key: str):
  if not os.path.exists(path):
    raise MissingFileError(f"batch file {path} not found")
  try:
    f = open(path, "rb")  # pylint: disable=consider-using-with
    zf = zipfile.ZipFile(f, "r")
  except (zipfile.BadZipFile, OSError, EOFError) as e:
    raise DataError(f"batch file {path}: truncated or not an .npz archive "
                    f"({type(e).__name__}: {e}); expected an ADM batch (.npz)") from e
  with f, zf:
    name = f"{key}.npy"
    if name not in zf.namelist():
      have = sorted(n[:-4] for n in zf.namelist() if n.endswith(".npy"))
      raise MissingKeyError(f"{path}: no array '{key}' in the archive (has {have})")
    with zf.open(name, "r") as member:
      yield member


def npz_keys(path: str | os.PathLike) -> list[str]:
  """Names of the arrays of an ``.npz`` file (without reading them)."""
  return files.npz_names(path, what="batch file")


def check_batch_file(path: str | os.PathLike, what: str = "batch file") -> None:
  """Checks, from the headers only, that ``path`` is an ADM batch: uint8 images
  ``arr_0`` [N, H, W, 3] and/or the statistics ``mu, sigma, mu_s, sigma_s``.

  Raises ``MissingFileError`` / ``DataError`` naming the file.
  """
  path = os.fspath(path)
  keys = set(files.npz_names(path, what=what))
  if "arr_0" in keys:
    try:
      _check_images(path, "arr_0")
    except (ValueError, OSError, EOFError, zipfile.BadZipFile) as e:
      if isinstance(e, DataError):
        raise
      raise DataError(f"{what} {path}: 'arr_0' unreadable ({e})") from e
  present = [k for k in STAT_KEYS if k in keys]
  if "arr_0" not in keys and len(present) != len(STAT_KEYS):
    raise DataError(f"{what} {path}: neither images 'arr_0' nor all of the statistics "
                    f"{list(STAT_KEYS)} (has {sorted(keys)}); expected an ADM reference "
                    "batch such as VIRTUAL_imagenet256_labeled.npz")


def _read_header(member) -> tuple[tuple[int, ...], bool, np.dtype] | None:
  version = np.lib.format.read_magic(member)
  if version == (1, 0):
    return np.lib.format.read_array_header_1_0(member)
  if version == (2, 0):
    return np.lib.format.read_array_header_2_0(member)
  return None


def npz_array_info(path: str | os.PathLike, key: str = "arr_0") -> tuple[tuple[int, ...], np.dtype]:
  """(shape, dtype) of one array of an ``.npz`` file, from its header only."""
  path = os.fspath(path)
  with _open_npy_member(path, key) as member:
    header = _read_header(member)
  if header is None:
    arr = files.load_npz(path, what="batch file", keys=[key])[key]
    return arr.shape, arr.dtype
  shape, _, dtype = header
  return tuple(shape), dtype


def iter_npz_batches(path: str | os.PathLike, key: str = "arr_0",
                     batch_size: int = DEFAULT_BATCH_SIZE) -> Iterator[np.ndarray]:
  """Yields consecutive [≤batch_size, ...] slices of one array of an ``.npz`` file.

  Streams C-ordered arrays (stored or deflated) straight from the archive; other layouts
  (Fortran order, unknown header versions) are loaded whole.
  """
  path = os.fspath(path)
  if batch_size < 1:
    raise ValueError(f"batch_size must be positive, got {batch_size}")
  with _open_npy_member(path, key) as member:
    header = _read_header(member)
    if header is not None and not header[1] and not header[2].hasobject:
      shape, _, dtype = header
      row_bytes = int(np.prod(shape[1:], dtype=np.int64)) * dtype.itemsize
      for start in range(0, shape[0], batch_size):
        count = min(batch_size, shape[0] - start)
        data = member.read(count * row_bytes)
        if len(data) != count * row_bytes:
          raise DataError(f"{path}: '{key}' ended early: expected {shape[0]} rows, got "
                          f"{start + len(data) // max(row_bytes, 1)} (a truncated file?)")
        yield np.frombuffer(data, dtype=dtype).reshape((count,) + tuple(shape[1:]))
      return
  arr = files.load_npz(path, what="batch file", keys=[key])[key]
  for start in range(0, arr.shape[0], batch_size):
    yield arr[start:start + batch_size]


def _check_images(path: str, key: str) -> tuple[int, ...]:
  shape, dtype = npz_array_info(path, key)
  if len(shape) != 4 or shape[-1] != 3 or dtype != np.uint8:
    raise DataError(f"{path}: '{key}' must be uint8 [N, H, W, 3] images, got "
                    f"{dtype} {tuple(shape)}")
  return shape


# --------------------------------------------------------------------------- features


def weights_fingerprint(model, extra: Mapping[str, Any] | None = None) -> str:
  """sha256 over every variable of an NNX module (paths, dtypes, bytes) plus ``extra``."""
  from flax import nnx  # pylint: disable=import-outside-toplevel

  h = hashlib.sha256()
  info = {"class": type(model).__name__,
          "preprocess": getattr(model, "preprocess", None),
          "dtype": str(np.dtype(getattr(model, "dtype", np.float32))),
          "precision": str(getattr(model, "precision", None)),
          **dict(extra or {})}
  h.update(json.dumps(info, sort_keys=True, default=str).encode())
  flat = sorted(((tuple(str(p) for p in path), var)
                 for path, var in nnx.to_flat_state(nnx.state(model))), key=lambda t: t[0])
  for path, var in flat:
    arr = np.ascontiguousarray(np.asarray(var.get_value()))
    h.update("/".join(path).encode())
    h.update(str(arr.dtype).encode() + str(arr.shape).encode())
    h.update(arr.tobytes())
  return h.hexdigest()


@dataclasses.dataclass
class FeatureExtractor:
  """A batched feature function with the fingerprint of the network behind it.

  Attributes:
    fn: uint8 [B, H, W, 3] -> {"pool": [B, 2048], "spatial": [B, S], "logits": [B, C]}
      (NumPy or JAX arrays; B ≤ ``batch_size``; "logits" may be absent or None).
    batch_size: images per call.
    fingerprint: identifies weights + preprocessing; keys the reference-statistics cache.
  """

  fn: FeatureFn
  batch_size: int
  fingerprint: str

  @classmethod
  def from_model(cls, model, batch_size: int = DEFAULT_BATCH_SIZE,
                 in_sharding=None) -> "FeatureExtractor":
    """Wraps an ``InceptionV3``: one jit, batches padded to ``batch_size``.

    ``in_sharding``: optional ``jax.sharding.Sharding`` for the image batch (single
    process; e.g. ``NamedSharding(mesh, P("data"))`` to split the batch over local
    devices; ``batch_size`` must then divide evenly).
    """
    import jax  # pylint: disable=import-outside-toplevel
    from flax import nnx  # pylint: disable=import-outside-toplevel

    graphdef, state = nnx.split(model)

    @jax.jit
    def run(state, images):
      out = nnx.merge(graphdef, state)(images)
      return {k: out[k] for k in ("pool", "spatial", "logits") if out.get(k) is not None}

    def fn(images: np.ndarray) -> dict[str, np.ndarray]:
      n = images.shape[0]
      if n > batch_size:
        raise ValueError(f"feature batch of {n} images exceeds batch_size {batch_size}")
      if n < batch_size:
        pad = np.zeros((batch_size - n,) + images.shape[1:], images.dtype)
        images = np.concatenate([images, pad], axis=0)
      x = jax.device_put(images, in_sharding) if in_sharding is not None else images
      return {k: np.asarray(v)[:n] for k, v in run(state, x).items()}

    return cls(fn=fn, batch_size=batch_size, fingerprint=weights_fingerprint(model))

  def __call__(self, images: np.ndarray) -> dict[str, np.ndarray]:
    out = {k: np.asarray(v, np.float32) for k, v in self.fn(images).items() if v is not None}
    for key in ("pool", "spatial"):
      if key not in out:
        raise ValueError(f"feature function returned no '{key}' (got {sorted(out)})")
    for key, val in out.items():
      if val.ndim != 2 or val.shape[0] != images.shape[0]:
        raise ValueError(f"feature '{key}' has shape {val.shape}, expected "
                         f"[{images.shape[0]}, D]")
    return out


def compute_activations(path: str | os.PathLike, extractor: FeatureExtractor,
                        key: str = "arr_0") -> dict[str, np.ndarray]:
  """Features of every image of ``path[key]``: {"pool", "spatial", "logits"?} float32."""
  path = os.fspath(path)
  shape = _check_images(path, key)
  parts: dict[str, list[np.ndarray]] = {}
  with progress.track(int(shape[0]), f"{os.path.basename(path)}: features",
                      "images") as bar:
    for batch in iter_npz_batches(path, key, extractor.batch_size):
      for name, val in extractor(batch).items():
        parts.setdefault(name, []).append(val)
      bar.update(batch.shape[0])
  return {name: np.concatenate(vals, axis=0) for name, vals in parts.items()}


# --------------------------------------------------------------------------- statistics


@dataclasses.dataclass
class BatchStatistics:
  """What the metrics need from one batch (reference or sample)."""

  fid: fidlib.FIDStatistics
  sfid: fidlib.FIDStatistics
  pool: np.ndarray | None  # [N, 2048] pool features (precision/recall), if the file has images
  logits: np.ndarray | None = None


def stats_cache_path(ref_npz: str | os.PathLike) -> str:
  """``<dir>/<name>.sfd_stats.npz`` for ``<dir>/<name>.npz``."""
  path = os.fspath(ref_npz)
  base = path[:-4] if path.endswith(".npz") else path
  return base + STATS_SUFFIX


def _cache_key(path: str, fingerprint: str) -> str:
  st = os.stat(path)
  info = {"version": CACHE_VERSION, "fingerprint": fingerprint, "size": st.st_size,
          "mtime_ns": st.st_mtime_ns, "name": os.path.basename(path)}
  return hashlib.sha256(json.dumps(info, sort_keys=True).encode()).hexdigest()


def _read_cache(cache: str, key: str) -> dict[str, np.ndarray] | None:
  if not os.path.exists(cache):
    return None
  try:
    with np.load(cache, allow_pickle=False) as z:
      if "key" not in z.files or str(z["key"]) != key:
        log.info("%s: stale statistics cache (other weights or reference file)", cache)
        return None
      return {k: z[k] for k in z.files if k != "key"}
  except (OSError, ValueError, zipfile.BadZipFile) as e:
    log.warning("%s: unreadable statistics cache (%s); recomputing", cache, e)
    return None


def _write_cache(cache: str, key: str, arrays: Mapping[str, np.ndarray]) -> None:
  directory = os.path.dirname(os.path.abspath(cache))
  try:
    fd, tmp = tempfile.mkstemp(suffix=".npz", dir=directory)
  except OSError as e:
    log.warning("could not write statistics cache %s (%s); continuing without it", cache, e)
    return
  try:
    with os.fdopen(fd, "wb") as f:
      np.savez(f, key=np.asarray(key), **arrays)
    os.replace(tmp, cache)
  except OSError as e:
    with contextlib.suppress(OSError):
      os.remove(tmp)
    log.warning("could not write statistics cache %s (%s); continuing without it", cache, e)


def _precomputed(path: str) -> dict[str, np.ndarray] | None:
  keys = set(npz_keys(path))
  present = [k for k in STAT_KEYS if k in keys]
  if not present:
    return None
  if len(present) != len(STAT_KEYS):
    raise DataError(f"{path}: has {present} but not all of {list(STAT_KEYS)}")
  return files.load_npz(path, what="batch file", keys=STAT_KEYS)


def _stats_from(arrays: Mapping[str, np.ndarray]) -> tuple[fidlib.FIDStatistics, ...]:
  return (fidlib.FIDStatistics(np.asarray(arrays["mu"], np.float64),
                               np.asarray(arrays["sigma"], np.float64)),
          fidlib.FIDStatistics(np.asarray(arrays["mu_s"], np.float64),
                               np.asarray(arrays["sigma_s"], np.float64)))


def _stat_arrays(pool: np.ndarray, spatial: np.ndarray) -> dict[str, np.ndarray]:
  s, s_sp = fidlib.compute_statistics(pool, "pool"), fidlib.compute_statistics(spatial, "spatial")
  return {"mu": s.mu, "sigma": s.sigma, "mu_s": s_sp.mu, "sigma_s": s_sp.sigma}


def batch_statistics(path: str | os.PathLike, extractor: FeatureExtractor, *,
                     cache: bool = False, keep_logits: bool = False) -> BatchStatistics:
  """Statistics of one ADM-format batch file, following the ADM evaluator.

  FID/sFID statistics are the file's own ``mu``/``sigma``/``mu_s``/``sigma_s`` when present,
  otherwise computed from the features of ``arr_0``. The pool features of ``arr_0`` (when the
  file has images) are returned for precision/recall. ``cache``: read/write
  ``stats_cache_path(path)`` (for reference batches). ``keep_logits``: also return the
  logits (Inception Score; sample batches).
  """
  path = os.fspath(path)
  if not os.path.exists(path):
    raise MissingFileError(f"batch file not found: {path}")
  precomputed = _precomputed(path)
  has_images = "arr_0" in npz_keys(path)
  if not has_images and precomputed is None:
    raise DataError(f"{path}: neither images 'arr_0' nor statistics {list(STAT_KEYS)}")
  if not has_images:
    fid_s, sfid_s = _stats_from(precomputed)
    return BatchStatistics(fid=fid_s, sfid=sfid_s, pool=None)

  cache_file, key, cached = None, None, None
  if cache and not keep_logits:
    cache_file = stats_cache_path(path)
    key = _cache_key(path, extractor.fingerprint)
    cached = _read_cache(cache_file, key)
  if cached is not None:
    log.info("%s: using cached reference features %s", path, cache_file)
    ours, pool, logits = cached, cached["pool"], None
  else:
    acts = compute_activations(path, extractor)
    ours = _stat_arrays(acts["pool"], acts["spatial"])
    pool, logits = acts["pool"], acts.get("logits")
    if cache_file is not None:
      _write_cache(cache_file, key, {"pool": pool, **ours})
  fid_s, sfid_s = _stats_from(precomputed if precomputed is not None else ours)
  return BatchStatistics(fid=fid_s, sfid=sfid_s, pool=pool,
                         logits=logits if keep_logits else None)


def compute_metrics(sample_npz: str | os.PathLike, ref_npz: str | os.PathLike, inception, *,
                    batch_size: int = DEFAULT_BATCH_SIZE, cache: bool = True,
                    distance_dtype: str = "float32",
                    pr_block: int = fidlib.PR_BLOCK) -> dict[str, float]:
  """FID, sFID, Inception Score, precision and recall of ``sample_npz`` vs ``ref_npz``.

  Args:
    sample_npz: our samples, ``arr_0`` uint8 [N, H, W, 3].
    ref_npz: ADM reference batch (images and/or precomputed statistics).
    inception: an ``InceptionV3`` module or a ``FeatureExtractor``.
    batch_size: images per feature call when ``inception`` is a module.
    cache: cache the reference features/statistics next to ``ref_npz``.
    distance_dtype, pr_block: precision/recall arithmetic and block size (see
      ``sfd_jax.metrics.fid``).

  Returns:
    {"fid", "sfid", "inception_score", "precision", "recall"} as floats. Inception Score is
    NaN when the network has no classifier, precision/recall are NaN when the reference file
    holds statistics only (both logged).
  """
  extractor = (inception if isinstance(inception, FeatureExtractor)
               else FeatureExtractor.from_model(inception, batch_size=batch_size))
  ref = batch_statistics(ref_npz, extractor, cache=cache)
  smp = batch_statistics(sample_npz, extractor, keep_logits=True)
  if smp.pool is None:
    raise ValueError(f"{os.fspath(sample_npz)}: the sample batch needs images 'arr_0'")
  out = {"fid": smp.fid.frechet_distance(ref.fid),
         "sfid": smp.sfid.frechet_distance(ref.sfid)}
  if smp.logits is None:
    log.warning("the feature extractor returns no logits: inception_score = NaN")
    out["inception_score"] = float("nan")
  else:
    out["inception_score"] = fidlib.inception_score(smp.logits)
  if ref.pool is None:
    log.warning("%s has no images: precision/recall = NaN", os.fspath(ref_npz))
    out["precision"] = out["recall"] = float("nan")
  else:
    out["precision"], out["recall"] = fidlib.precision_recall(
        ref.pool, smp.pool, row_block=pr_block, col_block=pr_block,
        distance_dtype=distance_dtype)
  return out
