"""Shared test helpers."""
import numpy as np


def assert_close_ref(actual, ref, tol=1e-4, name=""):
  """max|a - ref| <= tol * max(1, max|ref|): the parity README's criterion."""
  actual = np.asarray(actual, np.float64)
  ref = np.asarray(ref, np.float64)
  assert actual.shape == ref.shape, f"{name}: shape {actual.shape} != {ref.shape}"
  bound = tol * max(1.0, float(np.max(np.abs(ref))))
  err = float(np.max(np.abs(actual - ref)))
  assert err <= bound, f"{name}: max abs err {err:.3e} > {bound:.3e}"
