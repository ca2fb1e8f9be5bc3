"""REPA targets fed in bfloat16/float16: batches in that dtype, loss computed in float32."""
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import pytest

from sfd_jax.data import pipeline
from sfd_jax.diffusion import objective as obj


@pytest.mark.parametrize("name", ["float32", "bfloat16", "float16"])
def test_batch_fn_casts_repa(name):
  rng = np.random.RandomState(0)
  ex = [{"repa": rng.randn(4, 3).astype(np.float16), "label": np.int32(i)} for i in range(2)]
  out = pipeline.BatchFn(name)(ex)
  assert out["repa"].dtype == pipeline.repa_numpy_dtype(name)
  assert out["label"].dtype == np.int32
  np.testing.assert_allclose(out["repa"].astype(np.float32),
                             np.stack([e["repa"] for e in ex]).astype(np.float32),
                             rtol=2 ** -8)


def test_unknown_repa_dtype():
  with pytest.raises(ValueError, match="repa_dtype"):
    pipeline.BatchFn("int8")


def test_repa_loss_upcasts_half_targets():
  rng = np.random.RandomState(1)
  proj = jnp.asarray(rng.randn(2, 16, 8), jnp.float32)
  target16 = rng.randn(2, 16, 8).astype(ml_dtypes.bfloat16)
  for mode in ("cos", "mse", "cos_mse"):
    got = obj.repa_loss(proj, jnp.asarray(target16), mode, 1.0)
    want = obj.repa_loss(proj, jnp.asarray(target16.astype(np.float32)), mode, 1.0)
    assert got.dtype == jnp.float32
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))


def test_training_config_default_is_half_and_exact():
  import sys
  from tests.conftest import REPO
  sys.path.insert(0, str(REPO))
  from configs import common  # pylint: disable=import-outside-toplevel
  assert common.base_config("B").data.repa_dtype == "float16"
  stored = np.random.RandomState(2).randn(3, 4).astype(np.float16)   # records: float16
  fed = pipeline.BatchFn("float16")([{"repa": stored}])["repa"]
  np.testing.assert_array_equal(jnp.asarray(fed).astype(jnp.float32),
                                pipeline.BatchFn("float32")([{"repa": stored}])["repa"])
