"""FID / sFID / Inception Score / precision-recall and the ADM-format evaluation driver."""
import json
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from scipy import linalg, special

import sfd_jax  # noqa: F401
from sfd_jax.metrics import adm
from sfd_jax.metrics import fid as F

FIXTURE = "inception_fid"


# --------------------------------------------------------------------------- FID


@pytest.mark.parametrize("case", ["fid_well", "fid_rankdef"])
def test_fid_matches_pytorch_fid_fixture(parity, case):
  z = parity(FIXTURE)
  ref = json.loads(str(z["config"]))[f"{case}_fid_f64"]
  from_features = F.fid_from_features(z[f"in/{case}_a"], z[f"in/{case}_b"])
  assert abs(from_features - ref) <= 1e-4 * abs(ref)
  from_stats = F.frechet_distance(z[f"out/{case}_mu_a"], z[f"out/{case}_sigma_a"],
                                  z[f"out/{case}_mu_b"], z[f"out/{case}_sigma_b"])
  assert abs(from_stats - ref) <= 1e-4 * abs(ref)
  stats = F.compute_statistics(z[f"in/{case}_a"])
  assert stats.mu.dtype == np.float64 and stats.sigma.dtype == np.float64
  np.testing.assert_allclose(stats.sigma, z[f"out/{case}_sigma_a"], rtol=1e-5, atol=1e-6)


def _fid_by_eigenvalues(a, b):
  """Independent check: tr sqrt(Σa Σb) = Σ sqrt(λ(√Σa Σb √Σa)), a symmetric PSD problem."""
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  mu_a, mu_b = a.mean(0), b.mean(0)
  sa, sb = np.cov(a, rowvar=False), np.cov(b, rowvar=False)
  w, v = np.linalg.eigh(sa)
  root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
  lam = np.linalg.eigvalsh(root_a @ sb @ root_a)
  return float(np.sum((mu_a - mu_b) ** 2) + np.trace(sa) + np.trace(sb)
               - 2 * np.sum(np.sqrt(np.clip(lam, 0, None))))


@pytest.mark.parametrize("kind", ["well", "ill", "rank_deficient"])
def test_fid_against_numpy_eigen_formula(kind):
  rng = np.random.default_rng(3)
  d, n = 24, 400
  if kind == "ill":  # covariance eigenvalues spanning 1e-8 .. 1e4 (condition number 1e12)
    scales = np.logspace(-4, 2, d)
  else:
    scales = np.ones(d)
  if kind == "rank_deficient":
    n = 15
  basis = np.linalg.qr(rng.normal(size=(d, d)))[0]
  a = (rng.normal(size=(n, d)) * scales) @ basis
  b = (rng.normal(size=(n, d)) * scales * 1.3 + 0.1) @ basis.T
  got = F.fid_from_features(a, b)
  want = _fid_by_eigenvalues(a, b)
  assert abs(got - want) <= 1e-6 * max(abs(want), 1.0), (got, want)


def test_fid_of_a_set_with_itself_and_a_shifted_copy():
  rng = np.random.default_rng(4)
  x = rng.normal(size=(500, 32)) @ rng.normal(size=(32, 32))
  scale = np.trace(np.cov(x, rowvar=False))
  assert abs(F.fid_from_features(x, x)) <= 1e-8 * scale
  c = 0.75
  # Shifting every coordinate by c leaves the covariance unchanged: FID = |c|²·d.
  assert F.fid_from_features(x, x + c) == pytest.approx(c * c * 32, rel=1e-6, abs=1e-6 * scale)


def test_fid_singular_fallback_and_imaginary_guard(monkeypatch):
  rng = np.random.default_rng(5)
  x, y = rng.normal(size=(50, 6)), rng.normal(size=(50, 6)) + 1
  sa, sb = np.cov(x, rowvar=False), np.cov(y, rowvar=False)
  mu_a, mu_b = x.mean(0), y.mean(0)
  real_sqrtm = linalg.sqrtm

  def singular_first(mat):
    if np.allclose(mat, sa @ sb):
      return np.full_like(mat, np.inf)
    return real_sqrtm(mat)

  monkeypatch.setattr(F.linalg, "sqrtm", singular_first)
  with pytest.warns(RuntimeWarning, match="singular"):
    got = F.frechet_distance(mu_a, sa, mu_b, sb, eps=1e-3)
  off = np.eye(6) * 1e-3
  want = (np.sum((mu_a - mu_b) ** 2) + np.trace(sa) + np.trace(sb)
          - 2 * np.trace(real_sqrtm((sa + off) @ (sb + off)).real))
  assert got == pytest.approx(want, rel=1e-12)

  monkeypatch.setattr(F.linalg, "sqrtm", lambda mat: real_sqrtm(mat) + 0.1j * np.eye(6))
  with pytest.raises(ValueError, match="imaginary"):
    F.frechet_distance(mu_a, sa, mu_b, sb)
  with pytest.raises(ValueError, match="differ in length"):
    F.frechet_distance(mu_a, sa, mu_b[:5], sb[:5, :5])


# --------------------------------------------------------------------------- Inception Score


def test_inception_score_limits():
  assert F.inception_score(np.zeros((64, 1008))) == pytest.approx(1.0, abs=1e-12)
  k = 10
  labels = np.arange(200) % k
  one_hot = np.eye(k)[labels]
  assert F.inception_score(probs=one_hot) == pytest.approx(k, rel=1e-12)
  assert F.inception_score(60.0 * one_hot) == pytest.approx(k, rel=1e-9)
  # All samples confidently in one class: score 1.
  assert F.inception_score(probs=np.eye(k)[np.zeros(50, int)]) == pytest.approx(1.0)
  with pytest.raises(ValueError, match="exactly one"):
    F.inception_score()


def test_inception_score_matches_adm_loop():
  rng = np.random.default_rng(6)
  logits = rng.normal(0, 3, (12000, 20)).astype(np.float32)
  probs = special.softmax(logits.astype(np.float64), axis=1)
  scores = []
  for i in range(0, len(probs), 5000):  # splits of 5000, 5000, 2000
    part = probs[i:i + 5000]
    kl = part * (np.log(part) - np.log(np.mean(part, 0, keepdims=True)))
    scores.append(np.exp(np.mean(np.sum(kl, 1))))
  assert F.inception_score(logits) == pytest.approx(float(np.mean(scores)), rel=1e-10)
  assert F.inception_score(probs=probs) == pytest.approx(float(np.mean(scores)), rel=1e-10)


# --------------------------------------------------------------------------- precision/recall


def _brute_force_pr(ref, smp, k=3):
  def sqd(u, v):
    return ((u[:, None, :].astype(np.float64) - v[None, :, :]) ** 2).sum(-1)
  r_ref = np.sort(sqd(ref, ref), axis=1)[:, k]
  r_smp = np.sort(sqd(smp, smp), axis=1)[:, k]
  d = sqd(ref, smp)
  precision = np.mean(np.any(d <= r_ref[:, None], axis=0))
  recall = np.mean(np.any(d <= r_smp[None, :], axis=1))
  return float(precision), float(recall), r_ref


@pytest.mark.parametrize("blocks", [(10000, 10000), (37, 29)])
def test_precision_recall_matches_brute_force(blocks):
  rng = np.random.default_rng(7)
  ref = rng.normal(size=(203, 16)).astype(np.float32)
  smp = (rng.normal(size=(157, 16)) * 1.2 + 0.3).astype(np.float32)
  p, r, r_ref = _brute_force_pr(ref, smp)
  assert 0.05 < p < 0.99 and 0.05 < r < 0.99  # a non-trivial case
  row, col = blocks
  radii = F.manifold_radii(ref, row_block=row, col_block=col)
  np.testing.assert_allclose(radii, r_ref, rtol=1e-5)
  assert F.precision_recall(ref, smp, row_block=row, col_block=col) == (p, r)


def test_precision_recall_float16_mode():
  rng = np.random.default_rng(8)
  ref = rng.normal(size=(96, 16)).astype(np.float32)
  smp = (rng.normal(size=(96, 16)) * 1.1).astype(np.float32)
  p, r, _ = _brute_force_pr(ref, smp)
  kw = dict(row_block=48, col_block=48)
  p16, r16 = F.precision_recall(ref, smp, distance_dtype="float16", **kw)
  assert abs(p16 - p) <= 0.03 and abs(r16 - r) <= 0.03
  # Squared norms beyond the float16 range: ADM falls back to float32 for such blocks.
  big_ref, big_smp = 300.0 * ref, 300.0 * smp
  assert (F.precision_recall(big_ref, big_smp, distance_dtype="float16", **kw)
          == F.precision_recall(big_ref, big_smp, **kw))


def test_precision_recall_identical_sets_and_errors():
  x = np.random.default_rng(9).normal(size=(40, 8)).astype(np.float32)
  assert F.precision_recall(x, x) == (1.0, 1.0)
  with pytest.raises(ValueError, match="more than k=3"):
    F.manifold_radii(x[:3])
  with pytest.raises(ValueError, match="widths differ"):
    F.precision_recall(x, x[:, :4])
  with pytest.raises(ValueError, match="distance_dtype"):
    F.precision_recall(x, x, distance_dtype="bfloat16")


# --------------------------------------------------------------------------- ADM driver


def _fake_features(images):
  """A deterministic stand-in for the Inception: 12-d pool, 9-d spatial, 5 logits."""
  x = images.reshape(images.shape[0], -1).astype(np.float64) / 255.0
  return {"pool": x[:, :12] * 2 + x[:, 12:24] ** 2, "spatial": x[:, 24:33],
          "logits": 4 * (x[:, 33:38] - 0.5)}


class _CountingFn:
  def __init__(self):
    self.images = 0

  def __call__(self, images):
    self.images += images.shape[0]
    return _fake_features(images)


def _images(seed, n, size=6):
  return np.random.default_rng(seed).integers(0, 256, (n, size, size, 3), dtype=np.uint8)


def test_npz_streaming_reader(tmp_path):
  arr = _images(10, 23)
  for save in (np.savez, np.savez_compressed):
    path = str(tmp_path / f"{save.__name__}.npz")
    save(path, arr_0=arr, other=np.zeros(3))
    batches = list(adm.iter_npz_batches(path, "arr_0", batch_size=5))
    assert [b.shape[0] for b in batches] == [5, 5, 5, 5, 3]
    np.testing.assert_array_equal(np.concatenate(batches), arr)
    assert adm.npz_array_info(path) == ((23, 6, 6, 3), np.dtype(np.uint8))
  with pytest.raises(KeyError, match="no array 'missing'"):
    list(adm.iter_npz_batches(path, "missing"))
  bad = str(tmp_path / "float.npz")
  np.savez(bad, arr_0=arr.astype(np.float32))
  ext = adm.FeatureExtractor(_fake_features, batch_size=8, fingerprint="x")
  with pytest.raises(ValueError, match=r"float\.npz.*uint8 \[N, H, W, 3\].*float32"):
    adm.compute_activations(bad, ext)


def test_compute_metrics_and_reference_cache(tmp_path):
  ref_imgs, smp_imgs = _images(11, 40), _images(12, 31)
  ref_path, smp_path = str(tmp_path / "ref.npz"), str(tmp_path / "samples.npz")
  np.savez(ref_path, arr_0=ref_imgs)
  np.savez(smp_path, arr_0=smp_imgs)
  fn = _CountingFn()
  ext = adm.FeatureExtractor(fn, batch_size=8, fingerprint="weights-a")
  got = adm.compute_metrics(smp_path, ref_path, ext, pr_block=16)

  ref_f, smp_f = _fake_features(ref_imgs), _fake_features(smp_imgs)
  f32 = lambda a: a.astype(np.float32)  # noqa: E731  (features pass through float32)
  want = {
      "fid": F.fid_from_features(f32(smp_f["pool"]), f32(ref_f["pool"])),
      "sfid": F.fid_from_features(f32(smp_f["spatial"]), f32(ref_f["spatial"])),
      "inception_score": F.inception_score(f32(smp_f["logits"])),
  }
  want["precision"], want["recall"], _ = _brute_force_pr(f32(ref_f["pool"]), f32(smp_f["pool"]))
  assert set(got) == set(want)
  for key, val in want.items():
    assert got[key] == pytest.approx(val, rel=1e-9, abs=1e-12), key
  assert fn.images == 40 + 31

  cache = tmp_path / "ref.sfd_stats.npz"
  assert cache.exists() and str(cache) == adm.stats_cache_path(ref_path)
  again = adm.compute_metrics(smp_path, ref_path, ext, pr_block=16)
  assert again == got and fn.images == 40 + 31 + 31  # reference features came from the cache
  other = adm.FeatureExtractor(fn, batch_size=8, fingerprint="weights-b")
  adm.compute_metrics(smp_path, ref_path, other, pr_block=16)
  assert fn.images == 2 * (40 + 31) + 31  # other weights: recomputed
  st = os.stat(ref_path)
  os.utime(ref_path, ns=(st.st_atime_ns, st.st_mtime_ns + 10**9))
  adm.compute_metrics(smp_path, ref_path, other, pr_block=16)
  assert fn.images == 3 * (40 + 31) + 31  # reference file changed: recomputed
  adm.compute_metrics(smp_path, ref_path, other, pr_block=16, cache=False)
  assert fn.images == 4 * (40 + 31) + 31


def test_reference_with_precomputed_statistics(tmp_path):
  rng = np.random.default_rng(13)
  ref_imgs, smp_imgs = _images(14, 30), _images(15, 30)
  stats = {"mu": rng.normal(size=12), "sigma": np.cov(rng.normal(size=(40, 12)), rowvar=False),
           "mu_s": rng.normal(size=9), "sigma_s": np.cov(rng.normal(size=(40, 9)), rowvar=False)}
  smp_path = str(tmp_path / "samples.npz")
  np.savez(smp_path, arr_0=smp_imgs)
  ext = adm.FeatureExtractor(_fake_features, batch_size=16, fingerprint="w")
  smp_f = {k: v.astype(np.float32) for k, v in _fake_features(smp_imgs).items()}
  smp_stats = F.compute_statistics(smp_f["pool"])
  smp_stats_s = F.compute_statistics(smp_f["spatial"])
  want_fid = smp_stats.frechet_distance(F.FIDStatistics(stats["mu"], stats["sigma"]))
  want_sfid = smp_stats_s.frechet_distance(F.FIDStatistics(stats["mu_s"], stats["sigma_s"]))

  with_images = str(tmp_path / "ref_images_and_stats.npz")
  np.savez(with_images, arr_0=ref_imgs, **stats)
  got = adm.compute_metrics(smp_path, with_images, ext, cache=False)
  assert got["fid"] == pytest.approx(want_fid, rel=1e-10)
  assert got["sfid"] == pytest.approx(want_sfid, rel=1e-10)
  assert 0 <= got["precision"] <= 1 and 0 <= got["recall"] <= 1

  stats_only = str(tmp_path / "ref_stats_only.npz")
  np.savez(stats_only, **stats)
  got = adm.compute_metrics(smp_path, stats_only, ext)
  assert got["fid"] == pytest.approx(want_fid, rel=1e-10)
  assert np.isnan(got["precision"]) and np.isnan(got["recall"])

  partial = str(tmp_path / "ref_partial.npz")
  np.savez(partial, arr_0=ref_imgs, mu=stats["mu"])
  with pytest.raises(ValueError, match="not all of"):
    adm.compute_metrics(smp_path, partial, ext)


class _ToyNet(nnx.Module):
  """A tiny module with the Inception output contract (for FeatureExtractor.from_model)."""

  def __init__(self):
    self.w = nnx.Param(jnp.linspace(0.0, 1.0, 3 * 4).reshape(3, 4), out_sharding=(None, None))

  def __call__(self, images):
    x = images.astype(jnp.float32).mean(axis=(1, 2)) / 255.0
    pool = x @ self.w[...]
    return {"pool": pool, "spatial": pool[:, :2] * 2, "block0_mean": x, "logits": None}


def test_feature_extractor_from_model_pads_and_fingerprints():
  net = _ToyNet()
  ext = adm.FeatureExtractor.from_model(net, batch_size=8)
  imgs = _images(16, 5)
  out = ext(imgs)
  assert set(out) == {"pool", "spatial"} and out["pool"].shape == (5, 4)
  x = imgs.astype(np.float64).mean(axis=(1, 2)) / 255.0
  np.testing.assert_allclose(out["pool"], x @ np.asarray(net.w[...]), rtol=1e-5, atol=1e-6)
  assert ext.fingerprint == adm.weights_fingerprint(net)
  net.w[...] = net.w[...] + 1.0
  assert adm.weights_fingerprint(net) != ext.fingerprint
  with pytest.raises(ValueError, match="exceeds batch_size"):
    ext(_images(17, 9))


def test_bad_feature_function_is_reported():
  ext = adm.FeatureExtractor(lambda im: {"pool": np.zeros((im.shape[0], 3))}, 4, "x")
  with pytest.raises(ValueError, match="no 'spatial'"):
    ext(_images(18, 2))
  wrong_rows = adm.FeatureExtractor(
      lambda im: {"pool": np.zeros((1, 3)), "spatial": np.zeros((1, 2))}, 4, "x")
  with pytest.raises(ValueError, match=r"shape \(1, 3\), expected \[2, D\]"):
    wrong_rows(_images(19, 2))
