"""config.sample.dtype: the denoiser computes in bfloat16 with the same weights."""
import jax
import jax.numpy as jnp
from flax import nnx

from sfd_jax import sampling
from sfd_jax.models.lightning_dit import DiTConfig, LightningDiT


def test_with_compute_dtype_shares_weights_and_stays_close():
  cfg = DiTConfig(input_size=4, hidden_size=32, depth=2, num_heads=2, num_classes=10,
                  use_repa=False)
  model = LightningDiT(cfg, rngs=nnx.Rngs(0))
  state = nnx.state(model, nnx.Param)
  leaves, tree = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  nnx.update(model, jax.tree.unflatten(
      tree, [a + 0.05 * jax.random.normal(k, a.shape) for a, k in zip(leaves, keys)]))
  assert sampling.with_compute_dtype(model, "float32") is model
  fast = sampling.with_compute_dtype(model, "bfloat16")
  assert fast.cfg.dtype == "bfloat16" and model.cfg.dtype == "float32"
  for a, b in zip(jax.tree.leaves(nnx.state(fast, nnx.Param)), leaves):
    assert a.dtype == jnp.float32 and a.shape == b.shape
  x = jax.random.normal(jax.random.key(2), (2, 4, 4, 48))
  t = jnp.array([0.3, 0.7])
  y = jnp.array([1, 2])
  ref, got = model(x, t, t, y), fast(x, t, t, y)
  rel = float(jnp.linalg.norm(got - ref) / jnp.linalg.norm(ref))
  assert 0 < rel < 3e-2, rel
