"""Per-channel latent statistics (docs/method.md §2.4).

The texture and the semantic part are each normalised per channel with their own
dataset mean/std, computed once from ``num_samples`` (10,000) random *unflipped*
records drawn without replacement; mean and std over (records, H, W), std with
Bessel's correction (as ``torch.std``). Stored as ``stats.npz`` in the dataset dir
with float32 arrays ``texture_mean, texture_std`` (Ct,) and
``semantic_mean, semantic_std`` (Cs,); a dataset with extra latent parts
(``LatentSchema.extra_parts``) also has ``<name>_mean, <name>_std`` for each.

The reference caches ``latents_stats.pt`` / ``latents_sv_stats.pt``: dicts with
``mean`` and ``std`` of shape [1, C, 1, 1]. ``load_reference_stats`` reads those without
PyTorch (``core.safe_pickle``: no code from the file runs) or ``.npz`` / ``.safetensors``
files with the same keys.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Mapping

import numpy as np

from sfd_jax.core import files
from sfd_jax.core.errors import MissingFileError
from sfd_jax.data.schema import STATS_FILE, DataFormatError, LatentSchema

_KEYS = ("texture_mean", "texture_std", "semantic_mean", "semantic_std")
REFERENCE_STATS = {"texture": "latents_stats", "semantic": "latents_sv_stats"}
_REFERENCE_EXTS = (".pt", ".npz", ".safetensors")


@dataclasses.dataclass(frozen=True)
class LatentStats:
  """Per-channel mean/std of the texture and semantic latents (float32 vectors)."""
  texture_mean: np.ndarray
  texture_std: np.ndarray
  semantic_mean: np.ndarray
  semantic_std: np.ndarray
  extra: tuple[tuple[str, np.ndarray, np.ndarray], ...] = ()   # (name, mean, std) per part

  def __post_init__(self):
    for k in _KEYS:
      object.__setattr__(self, k, np.asarray(getattr(self, k), np.float32))
    object.__setattr__(self, "extra", tuple(
        (str(n), np.asarray(m, np.float32), np.asarray(sd, np.float32))
        for n, m, sd in self.extra))
    self.check(where="LatentStats")

  def part(self, name: str) -> tuple[np.ndarray, np.ndarray]:
    """(mean, std) of a latent part by name."""
    if name in ("texture", "semantic"):
      return getattr(self, f"{name}_mean"), getattr(self, f"{name}_std")
    for n, m, sd in self.extra:
      if n == name:
        return m, sd
    raise KeyError(f"no statistics for latent part {name!r}")

  def _arrays(self) -> dict[str, np.ndarray]:
    out = {k: getattr(self, k) for k in _KEYS}
    for n, m, sd in self.extra:
      out[f"{n}_mean"], out[f"{n}_std"] = m, sd
    return out

  def check(self, schema: LatentSchema | None = None, where: str = "stats") -> None:
    """Checks shapes (against ``schema`` when given) and that every std is > 0.

    Raises:
      DataFormatError: naming ``where``, the array and the expected vs found shape.
    """
    expected = {}
    names = ["texture", "semantic"] + [n for n, _, _ in self.extra]
    if schema is not None:
      expected = dict(schema.latent_parts())
      missing = [n for n in expected if n not in names]
      if missing:
        raise DataFormatError(f"{where}: no statistics for latent part(s) {missing}; "
                              "recompute them (sfd_jax.data.stats.compute_stats)")
    for part in names:
      mean, std = self.part(part)
      want = (expected.get(part, mean.shape[0] if mean.ndim == 1 else -1),)
      for name, a in ((f"{part}_mean", mean), (f"{part}_std", std)):
        if a.shape != want:
          raise DataFormatError(f"{where}: '{name}' expected shape {list(want)}, "
                                f"found {list(a.shape)}")
      if not (np.all(np.isfinite(mean)) and np.all(np.isfinite(std)) and np.all(std > 0)):
        bad = [f"{name}[{i}]={float(a[i])}" for name, a in ((f"{part}_mean", mean),
                                                       (f"{part}_std", std))
               for i in np.flatnonzero(~np.isfinite(a) | ((a <= 0) if "std" in name else
                                                           np.zeros_like(a, bool)))[:3]]
        raise DataFormatError(f"{where}: '{part}' mean/std must be finite with std > 0 "
                              f"(found {', '.join(bad)}); recompute the statistics "
                              "(sfd_jax.data.stats.compute_stats)")

  def save(self, path: str | os.PathLike) -> str:
    """Writes ``stats.npz`` (atomically); returns the path."""
    path = os.fspath(path)
    tmp = f"{path}.tmp-{os.getpid()}.npz"
    np.savez(tmp, **self._arrays())
    os.replace(tmp, path)
    return path


def stats_path(directory: str | os.PathLike) -> str:
  return os.path.join(os.fspath(directory), STATS_FILE)


def load_stats(path: str | os.PathLike, schema: LatentSchema | None = None) -> LatentStats:
  """Loads ``stats.npz`` (a file, or a dataset directory holding one).

  Raises:
    FileNotFoundError: with the path and how to create the file.
    DataFormatError: a missing key, or a shape that does not match ``schema``.
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    path = stats_path(path)
  if not os.path.exists(path):
    raise MissingFileError(
        f"latent statistics {path} not found: compute them with "
        "sfd_jax.data.stats.compute_stats(...).save(path), or convert the reference's "
        "latents_stats.pt / latents_sv_stats.pt with sfd_jax.data.convert_reference")
  z = files.load_npz(path, what="latent statistics", error=DataFormatError)
  missing = [k for k in _KEYS if k not in z]
  if missing:
    raise DataFormatError(f"{path}: missing arrays {missing} (has {sorted(z)}); expected "
                          f"{list(_KEYS)} as written by LatentStats.save")
  arrays = {k: z[k] for k in _KEYS}
  extra_names = [n for n, _ in schema.extra_parts] if schema is not None else sorted(
      k[:-5] for k in z if k.endswith("_mean") and k not in _KEYS)
  missing = [f"{n}_{s}" for n in extra_names for s in ("mean", "std") if f"{n}_{s}" not in z]
  if missing:
    raise DataFormatError(f"{path}: missing arrays {missing} (has {sorted(z)}) for the "
                          "dataset's extra latent parts; recompute the statistics")
  for k, a in list(arrays.items()) + [(f"{n}_{s}", z[f"{n}_{s}"]) for n in extra_names
                                      for s in ("mean", "std")]:
    if a.ndim != 1:
      raise DataFormatError(f"{path}: '{k}' expected a vector, found shape {list(a.shape)}")
  try:
    stats = LatentStats(**arrays, extra=tuple((n, z[f"{n}_mean"], z[f"{n}_std"])
                                              for n in extra_names))
  except DataFormatError as e:
    raise DataFormatError(f"{path}: {str(e).removeprefix('LatentStats: ')}") from e
  stats.check(schema, where=path)
  return stats


# --------------------------------------------------------------- computation


class _Moments:
  """Streaming per-channel mean and sum of squared deviations (Chan et al.)."""

  def __init__(self, channels: int):
    self.n = 0
    self.mean = np.zeros(channels, np.float64)
    self.m2 = np.zeros(channels, np.float64)

  def update(self, x: np.ndarray) -> None:
    x = x.reshape(-1, x.shape[-1]).astype(np.float64)
    n_b = x.shape[0]
    mean_b = x.mean(axis=0)
    m2_b = ((x - mean_b) ** 2).sum(axis=0)
    n = self.n + n_b
    delta = mean_b - self.mean
    self.mean = self.mean + delta * (n_b / n)
    self.m2 = self.m2 + m2_b + delta ** 2 * (self.n * n_b / n)
    self.n = n

  def std(self) -> np.ndarray:
    if self.n < 2:
      raise ValueError("need at least 2 values to estimate a std")
    return np.sqrt(self.m2 / (self.n - 1))


def compute_stats(records, num_samples: int = 10_000, seed: int = 0,
                  chunk: int = 256, log_every: int = 0) -> LatentStats:
  """Per-channel stats from ``num_samples`` random unflipped records.

  Args:
    records: a ``LatentRecords`` (anything with ``len``, ``[i]`` -> record dict, and
      a ``schema``).
    num_samples: records to draw without replacement (all if the dataset is smaller).
    seed: numpy seed of the draw.
    chunk: records accumulated per update.
    log_every: print progress every this many records (0: silent).
  """
  n = min(int(num_samples), len(records))
  idx = np.random.default_rng(seed).choice(len(records), size=n, replace=False)
  schema = records.schema
  moments = {name: _Moments(c) for name, c in schema.latent_parts()}
  for start in range(0, n, chunk):
    recs = [records[int(i)] for i in idx[start:start + chunk]]
    for name, m in moments.items():
      m.update(np.stack([r[name] for r in recs]))
    done = start + len(recs)
    if log_every and (done // log_every > start // log_every or done == n):
      print(f"stats: {done}/{n} records", flush=True)
  tex, sem = moments["texture"], moments["semantic"]
  return LatentStats(tex.mean, tex.std(), sem.mean, sem.std(),
                     extra=tuple((n, moments[n].mean, moments[n].std())
                                 for n, _ in schema.extra_parts))


# ------------------------------------------------------- reference stat files


def _read_mean_std(path: str) -> Mapping[str, np.ndarray]:
  if not path.endswith(_REFERENCE_EXTS):
    raise DataFormatError(f"{path}: unknown stats format (expected {_REFERENCE_EXTS})")
  obj = files.read_array_file(
      path, what="reference statistics", error=DataFormatError,
      alternative=f"or save its 'mean'/'std' as {path[:-3]}.npz first")
  return {k: v.detach().float().numpy() if hasattr(v, "detach") else np.asarray(v)
          for k, v in obj.items()}


def _mean_std_vectors(path: str) -> tuple[np.ndarray, np.ndarray]:
  obj = _read_mean_std(path)
  out = []
  for key in ("mean", "std"):
    if key not in obj:
      raise DataFormatError(f"{path}: missing '{key}' (has {sorted(obj)})")
    a = np.asarray(obj[key], np.float32)
    if a.ndim == 4 and a.shape[0] == 1 and a.shape[2:] == (1, 1):
      a = a[0, :, 0, 0]
    if a.ndim != 1:
      raise DataFormatError(f"{path}: '{key}' expected shape [1,C,1,1] or [C], found "
                            f"{list(np.shape(obj[key]))}")
    out.append(a)
  return out[0], out[1]


def load_reference_stats(texture_path: str | os.PathLike, semantic_path: str | os.PathLike,
                         schema: LatentSchema | None = None) -> LatentStats:
  """Reads the reference's texture and semantic stat files (``mean``/``std`` [1,C,1,1])."""
  paths = {}
  for part, p in (("texture", texture_path), ("semantic", semantic_path)):
    p = os.fspath(p)
    if not os.path.exists(p):
      raise MissingFileError(f"{part} stats file {p} not found")
    paths[part] = p
  t_mean, t_std = _mean_std_vectors(paths["texture"])
  s_mean, s_std = _mean_std_vectors(paths["semantic"])
  where = f"{paths['texture']} + {paths['semantic']}"
  try:
    stats = LatentStats(t_mean, t_std, s_mean, s_std)
  except DataFormatError as e:
    raise DataFormatError(f"{where}: {e}") from e
  stats.check(schema, where=where)
  return stats


def find_reference_stats(directory: str | os.PathLike) -> tuple[str, str] | None:
  """Paths of ``latents_stats.*`` and ``latents_sv_stats.*`` in ``directory``, if both exist.

  Prefers ``.npz`` and ``.safetensors`` over ``.pt`` (read by the restricted unpickler).
  """
  found = []
  for part in ("texture", "semantic"):
    stem = os.path.join(os.fspath(directory), REFERENCE_STATS[part])
    hits = [stem + ext for ext in (".npz", ".safetensors", ".pt") if os.path.exists(stem + ext)]
    if not hits:
      return None
    found.append(hits[0])
  return found[0], found[1]
