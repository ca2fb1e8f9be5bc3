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

# Tests that compile for a TPU topology with the TPU compiler (no TPU needed) carry the
# ``tpu_compile`` mark; they skip, saying why, only where libtpu is not installed (CI
# installs it: bash .ci/run). The summary states how many ran, so a CI log shows it.
TPU_MARK = "tpu_compile"


def _libtpu() -> tuple[bool, str]:
  from sfd_jax.planning import tpu  # pylint: disable=import-outside-toplevel
  return tpu.libtpu_version() is not None, tpu.libtpu_requirement()


def pytest_configure(config):
  config.addinivalue_line("markers", f"{TPU_MARK}: compiles for a TPU topology with the "
                          "TPU compiler (libtpu); skipped where it is not installed")


def pytest_collection_modifyitems(config, items):
  del config
  have, requirement = _libtpu()
  if have:
    return
  skip = pytest.mark.skip(reason=f"the TPU compiler (libtpu) is not installed: pip install "
                          f"\"{requirement}\" (CI installs it: bash .ci/run)")
  for item in items:
    if TPU_MARK in item.keywords:
      item.add_marker(skip)


def pytest_terminal_summary(terminalreporter):
  """One line: how many TPU compile tests passed, failed, were skipped (and why)."""
  seen: dict[str, str] = {}
  for outcome in ("passed", "failed", "error", "skipped"):
    for rep in terminalreporter.stats.get(outcome, []):
      if TPU_MARK in getattr(rep, "keywords", {}) and rep.nodeid not in seen:
        seen[rep.nodeid] = "failed" if outcome == "error" else outcome
  if not seen:
    return
  counts = {k: sum(v == k for v in seen.values()) for k in ("passed", "failed", "skipped")}
  from sfd_jax.planning import tpu  # pylint: disable=import-outside-toplevel
  version = tpu.libtpu_version()
  terminalreporter.write_line(
      f"TPU compile tests ({f'libtpu {version}' if version else 'no libtpu'}): "
      + ", ".join(f"{n} {k}" for k, n in counts.items() if n))


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

