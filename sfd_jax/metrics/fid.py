"""FID, sFID, Inception Score and precision/recall with the ADM evaluator's definitions.

The definitions follow openai/guided-diffusion ``evaluations/evaluator.py`` (the evaluator
every SFD number in docs/method.md §9/§11 was produced with) and pytorch-fid's ``fid_score.py``:

* **Statistics**: mean and ``np.cov(rowvar=False)`` covariance (divides by N − 1), in float64.
* **Fréchet distance**: ‖μ₁ − μ₂‖² + tr Σ₁ + tr Σ₂ − 2 tr sqrtm(Σ₁Σ₂). The matrix square root
  is ``scipy.linalg.sqrtm`` of the (non-symmetric) product. If it is not finite (singular
  product), ε·I (ε = 1e-6) is added to both covariances and the root recomputed. A complex
  result is accepted when the imaginary parts of its diagonal are within 1e-3 of 0, and its
  real part is used; otherwise ValueError.
* **sFID**: the same distance on the spatial features (``InceptionV3`` output ``spatial``).
* **Inception Score**: softmax class probabilities p(y|x); per split of 5000 consecutive
  samples exp(mean_x KL(p(y|x) ‖ mean_x p(y|x))); the score is the mean over splits (the
  order of the samples matters, docs/method.md §9). Computed here in float64 from the logits with a
  log-softmax (0·log 0 = 0 for probabilities given directly).
* **Precision / recall** (improved precision and recall, k = 3, the ADM ManifoldEstimator):
  squared Euclidean distances ‖u‖² − 2u·v + ‖v‖², clamped at 0. The radius of a point is its
  k-th smallest distance to its own set *including itself* (sorted index k, so the 3rd
  nearest other point). Precision = fraction of samples within (≤) the radius of at least one
  reference point; recall = fraction of reference points within the radius of at least one
  sample. Distances run in JAX (jit) in blocks of rows × columns, so 50k × 50k never
  materialises a full matrix.

``distance_dtype="float16"`` reproduces ADM's arithmetic more closely: it computes each block
of distances in float16 and falls back to float32 for a block with a non-finite entry (up to
the accumulation order of the backend). The default ``"float32"`` is the more accurate choice;
the two differ only for points within float16 rounding (~0.1 %) of a ball's boundary.
"""
from __future__ import annotations

import dataclasses
import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
from scipy import linalg, special

IS_SPLIT_SIZE = 5000
PR_NEIGHBOURHOOD = 3
PR_BLOCK = 10000
DISTANCE_DTYPES = ("float32", "float16")


# --------------------------------------------------------------------------- Fréchet


@dataclasses.dataclass(frozen=True)
class FIDStatistics:
  """Mean [D] and covariance [D, D] (float64) of a feature set."""

  mu: np.ndarray
  sigma: np.ndarray

  def frechet_distance(self, other: "FIDStatistics", eps: float = 1e-6) -> float:
    return frechet_distance(self.mu, self.sigma, other.mu, other.sigma, eps=eps)


def _as_features(features, name: str = "features") -> np.ndarray:
  x = np.asarray(features)
  if x.ndim != 2:
    raise ValueError(f"{name}: expected a [N, D] feature array, got shape {x.shape}")
  if x.shape[0] < 2:
    raise ValueError(f"{name}: need at least 2 samples for a covariance, got {x.shape[0]}")
  return x


def compute_statistics(features, name: str = "features") -> FIDStatistics:
  """Mean and covariance of [N, D] features, in float64 (``np.cov`` semantics)."""
  x = _as_features(features, name).astype(np.float64)
  return FIDStatistics(mu=np.mean(x, axis=0), sigma=np.cov(x, rowvar=False))


def frechet_distance(mu1, sigma1, mu2, sigma2, eps: float = 1e-6) -> float:
  """Fréchet distance between N(mu1, sigma1) and N(mu2, sigma2) (see the module doc)."""
  mu1 = np.atleast_1d(np.asarray(mu1, np.float64))
  mu2 = np.atleast_1d(np.asarray(mu2, np.float64))
  sigma1 = np.atleast_2d(np.asarray(sigma1, np.float64))
  sigma2 = np.atleast_2d(np.asarray(sigma2, np.float64))
  if mu1.shape != mu2.shape:
    raise ValueError(f"mean vectors differ in length: {mu1.shape} vs {mu2.shape}")
  if sigma1.shape != sigma2.shape or sigma1.shape != (mu1.shape[0],) * 2:
    raise ValueError(f"covariances {sigma1.shape} / {sigma2.shape} do not match the "
                     f"mean length {mu1.shape[0]}")
  diff = mu1 - mu2
  covmean = linalg.sqrtm(sigma1 @ sigma2)
  if not np.isfinite(covmean).all():
    warnings.warn(f"FID: the covariance product is singular; adding {eps} to the diagonals",
                  RuntimeWarning, stacklevel=2)
    offset = np.eye(sigma1.shape[0]) * eps
    covmean = linalg.sqrtm((sigma1 + offset) @ (sigma2 + offset))
  if np.iscomplexobj(covmean):
    if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3):
      raise ValueError("FID: matrix square root has a significant imaginary component "
                       f"{np.max(np.abs(covmean.imag)):.3e}")
    covmean = covmean.real
  return float(diff @ diff + np.trace(sigma1) + np.trace(sigma2) - 2.0 * np.trace(covmean))


def fid_from_features(features_a, features_b, eps: float = 1e-6) -> float:
  """FID (or sFID, given spatial features) between two [N, D] feature sets."""
  return compute_statistics(features_a, "features_a").frechet_distance(
      compute_statistics(features_b, "features_b"), eps=eps)


# --------------------------------------------------------------------------- Inception Score


def inception_score(logits=None, *, probs=None, split_size: int = IS_SPLIT_SIZE) -> float:
  """ADM's Inception Score from [N, C] ``logits`` (or class ``probs``), splits of 5000."""
  if (logits is None) == (probs is None):
    raise ValueError("inception_score: pass exactly one of logits= or probs=")
  if logits is not None:
    log_p = special.log_softmax(np.asarray(logits, np.float64), axis=1)
    p = np.exp(log_p)
  else:
    p = np.asarray(probs, np.float64)
    with np.errstate(divide="ignore"):
      log_p = np.log(p)
  if p.ndim != 2 or p.shape[0] == 0:
    raise ValueError(f"inception_score: expected [N, C] with N > 0, got shape {p.shape}")
  if split_size < 1:
    raise ValueError(f"inception_score: split_size must be positive, got {split_size}")
  scores = []
  for start in range(0, p.shape[0], split_size):
    part, log_part = p[start:start + split_size], log_p[start:start + split_size]
    with np.errstate(divide="ignore", invalid="ignore"):  # 0·log 0 terms are masked to 0
      log_marginal = np.log(np.mean(part, axis=0, keepdims=True))
      terms = np.where(part > 0, part * (log_part - log_marginal), 0.0)
    scores.append(np.exp(np.mean(np.sum(terms, axis=1))))
  return float(np.mean(scores))


# --------------------------------------------------------------------------- precision/recall


def _sqdist_in(u: jax.Array, v: jax.Array, dtype) -> jax.Array:
  """max(‖u‖² − 2 u·vᵀ + ‖v‖², 0) for rows of u [R, D] and v [C, D], computed in ``dtype``."""
  u, v = u.astype(dtype), v.astype(dtype)
  nu = jnp.sum(jnp.square(u), axis=1)[:, None]
  nv = jnp.sum(jnp.square(v), axis=1)[None, :]
  uv = jnp.matmul(u, v.T, precision=jax.lax.Precision.HIGHEST)
  return jnp.maximum(nu - 2 * uv + nv, jnp.zeros((), dtype))


def _sqdist(u: jax.Array, v: jax.Array, distance_dtype: str) -> jax.Array:
  """Squared distances as float32; ``"float16"`` mimics ADM (fp16, fp32 if non-finite)."""
  if distance_dtype == "float32":
    return _sqdist_in(u, v, jnp.float32)
  d16 = _sqdist_in(u, v, jnp.float16)
  return jax.lax.cond(jnp.all(jnp.isfinite(d16)), lambda: d16.astype(jnp.float32),
                      lambda: _sqdist_in(u, v, jnp.float32))


def _check_distance_dtype(distance_dtype: str) -> None:
  if distance_dtype not in DISTANCE_DTYPES:
    raise ValueError(f"distance_dtype must be one of {DISTANCE_DTYPES}, got {distance_dtype!r}")


def _pad_to(x: np.ndarray, multiple: int, fill: float = 0.0) -> np.ndarray:
  n = x.shape[0]
  total = -(-n // multiple) * multiple
  if total == n:
    return x
  pad = np.full((total - n,) + x.shape[1:], fill, x.dtype)
  return np.concatenate([x, pad], axis=0)


@functools.partial(jax.jit, static_argnames=("k", "col_block", "distance_dtype"))
def _radii_row_block(rows, feats, n_valid, *, k, col_block, distance_dtype):
  """k-th smallest distance (index k, self included) of each row to the valid feats."""
  num_blocks = feats.shape[0] // col_block
  init = jnp.full((rows.shape[0], k + 1), jnp.inf, jnp.float32)

  def body(i, best):
    cols = jax.lax.dynamic_slice_in_dim(feats, i * col_block, col_block)
    d = _sqdist(rows, cols, distance_dtype)
    valid = (i * col_block + jnp.arange(col_block)) < n_valid
    d = jnp.where(valid[None, :], d, jnp.inf)
    neg_smallest, _ = jax.lax.top_k(-jnp.concatenate([best, d], axis=1), k + 1)
    return -neg_smallest

  return jax.lax.fori_loop(0, num_blocks, body, init)[:, k]


def manifold_radii(features, k: int = PR_NEIGHBOURHOOD, *, row_block: int = PR_BLOCK,
                   col_block: int = PR_BLOCK, distance_dtype: str = "float32") -> np.ndarray:
  """[N] float32 radii: squared distance to the k-th nearest neighbour (self = 0th)."""
  _check_distance_dtype(distance_dtype)
  x = _as_features(features).astype(np.float32)
  n = x.shape[0]
  if n < k + 1:
    raise ValueError(f"manifold_radii: need more than k={k} points, got {n}")
  row_block, col_block = min(row_block, n), min(col_block, n)
  feats = jnp.asarray(_pad_to(x, col_block))
  rows_all = _pad_to(x, row_block)
  radii = np.empty((rows_all.shape[0],), np.float32)
  for start in range(0, n, row_block):
    radii[start:start + row_block] = np.asarray(_radii_row_block(
        jnp.asarray(rows_all[start:start + row_block]), feats, n, k=k, col_block=col_block,
        distance_dtype=distance_dtype))
  return radii[:n]


@functools.partial(jax.jit, static_argnames=("col_block", "distance_dtype"))
def _pr_row_block(ref_rows, ref_radii, ref_valid, samples, sample_radii, n_samples, *,
                  col_block, distance_dtype):
  """For a block of reference rows: (row in any sample ball [R], sample in any row ball [S])."""
  num_blocks = samples.shape[0] // col_block
  ref_in = jnp.zeros((ref_rows.shape[0],), bool)
  sample_in = jnp.zeros((samples.shape[0],), bool)

  def body(i, carry):
    ref_in, sample_in = carry
    start = i * col_block
    cols = jax.lax.dynamic_slice_in_dim(samples, start, col_block)
    col_radii = jax.lax.dynamic_slice_in_dim(sample_radii, start, col_block)
    valid = (start + jnp.arange(col_block)) < n_samples
    d = _sqdist(ref_rows, cols, distance_dtype)
    ref_in = ref_in | jnp.any((d <= col_radii[None, :]) & valid[None, :], axis=1)
    hit = jnp.any((d <= ref_radii[:, None]) & ref_valid[:, None], axis=0)
    old = jax.lax.dynamic_slice_in_dim(sample_in, start, col_block)
    sample_in = jax.lax.dynamic_update_slice_in_dim(sample_in, old | hit, start, 0)
    return ref_in, sample_in

  return jax.lax.fori_loop(0, num_blocks, body, (ref_in, sample_in))


def precision_recall(ref_features, sample_features, k: int = PR_NEIGHBOURHOOD, *,
                     row_block: int = PR_BLOCK, col_block: int = PR_BLOCK,
                     distance_dtype: str = "float32") -> tuple[float, float]:
  """Improved precision and recall (k-NN manifolds) of samples against a reference set."""
  _check_distance_dtype(distance_dtype)
  ref = _as_features(ref_features, "ref_features").astype(np.float32)
  smp = _as_features(sample_features, "sample_features").astype(np.float32)
  if ref.shape[1] != smp.shape[1]:
    raise ValueError(f"precision_recall: feature widths differ: ref {ref.shape[1]}, "
                     f"samples {smp.shape[1]}")
  kw = dict(k=k, row_block=row_block, col_block=col_block, distance_dtype=distance_dtype)
  ref_radii = manifold_radii(ref, **kw)
  smp_radii = manifold_radii(smp, **kw)
  n_ref, n_smp = ref.shape[0], smp.shape[0]
  row_block, col_block = min(row_block, n_ref), min(col_block, n_smp)
  samples = jnp.asarray(_pad_to(smp, col_block))
  sample_radii = jnp.asarray(_pad_to(smp_radii, col_block, fill=-np.inf))
  ref_rows = _pad_to(ref, row_block)
  ref_radii_p = _pad_to(ref_radii, row_block, fill=-np.inf)
  ref_valid = np.arange(ref_rows.shape[0]) < n_ref
  ref_in = np.zeros((ref_rows.shape[0],), bool)
  sample_in = np.zeros((samples.shape[0],), bool)
  for start in range(0, n_ref, row_block):
    sl = slice(start, start + row_block)
    r_in, s_in = _pr_row_block(
        jnp.asarray(ref_rows[sl]), jnp.asarray(ref_radii_p[sl]), jnp.asarray(ref_valid[sl]),
        samples, sample_radii, n_smp, col_block=col_block, distance_dtype=distance_dtype)
    ref_in[sl] = np.asarray(r_in)
    sample_in |= np.asarray(s_in)
  precision = float(np.mean(sample_in[:n_smp]))
  recall = float(np.mean(ref_in[:n_ref]))
  return precision, recall
