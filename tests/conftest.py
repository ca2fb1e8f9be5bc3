"""Test set-up: 8 fake CPU devices, float32 matmuls, parity fixtures location."""
import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import pathlib  # noqa: E402
import tempfile  # noqa: E402

import jax  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_default_matmul_precision", "highest")

# Persistent compilation cache: the training/sampling tests compile the same tiny
# programs in several runs (and subprocesses, via JAX_COMPILATION_CACHE_DIR); on a 2-core
# CPU compile time dominates the suite.
CACHE_DIR = os.path.join(tempfile.gettempdir(), "sfd_jax_test_compilation_cache")
jax.config.update("jax_compilation_cache_dir", CACHE_DIR)
jax.config.update("jax_persistent_cache_min_compile_time_secs", 1.0)

REPO = pathlib.Path(__file__).resolve().parents[1]


def child_env(**overrides: str) -> dict[str, str]:
  """The environment for a subprocess (main.py, a converter CLI): this process's (8 fake
  CPU devices), plus the persistent compilation cache, plus ``overrides``."""
  return dict(os.environ, JAX_COMPILATION_CACHE_DIR=CACHE_DIR,
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="1", **overrides)


def parity_dir() -> pathlib.Path:
  env = os.environ.get("SFD_PARITY_DIR")
  if env:
    return pathlib.Path(env)
  return REPO.parent / "shared" / "parity"


@pytest.fixture(scope="session")
def parity():
  """Returns a loader: parity("lightningdit_sfd") -> dict-like npz."""
  root = parity_dir()

  def load(name):
    path = root / f"{name}.npz"
    if not path.exists():
      pytest.skip(f"parity fixture {path} not found (set SFD_PARITY_DIR)")
    return np.load(path)

  return load

