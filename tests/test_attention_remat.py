"""Attention kernel selection ("auto") and the save_attn_out remat policy."""
import contextlib
import dataclasses
import io

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sfd_jax.models import attention as attn_lib
from sfd_jax.models.lightning_dit import DiTConfig, LightningDiT


@dataclasses.dataclass
class FakeDevice:
  platform: str
  device_kind: str = "fake"
  compute_capability: str | None = None


H100 = FakeDevice("gpu", "NVIDIA H100 80GB HBM3", "9.0")


@pytest.mark.parametrize("device,dtype,head_dim,want", [
    (H100, jnp.bfloat16, 72, "cudnn"),          # XL in bf16
    (H100, jnp.float16, 64, "cudnn"),
    (H100, jnp.float32, 72, "xla"),             # cuDNN flash attention: half types only
    (H100, jnp.bfloat16, 68, "xla"),            # head_dim not a multiple of 8
    (H100, jnp.bfloat16, 256, "xla"),           # head_dim > 128
    (FakeDevice("gpu", "Tesla V100", "7.0"), jnp.bfloat16, 64, "xla"),
    (FakeDevice("gpu", "A100", "8.0"), jnp.bfloat16, 64, "cudnn"),
    (FakeDevice("gpu", "?", None), jnp.bfloat16, 64, "xla"),
    (FakeDevice("tpu", "TPU v5p"), jnp.bfloat16, 64, "xla"),
    (FakeDevice("cpu", "cpu"), jnp.bfloat16, 64, "xla_heads"),
    (FakeDevice("cpu", "cpu"), jnp.float32, 72, "xla_heads"),
])
def test_auto_selection(device, dtype, head_dim, want):
  for auto in (None, "", "auto"):
    assert attn_lib.select_impl(auto, head_dim=head_dim, dtype=dtype, device=device) == want


def test_explicit_choice_is_kept_and_validated():
  assert attn_lib.select_impl("cudnn", head_dim=68, dtype=jnp.float32,
                              device=FakeDevice("cpu")) == "cudnn"
  assert attn_lib.select_impl("xla", head_dim=64, dtype=jnp.bfloat16, device=H100) == "xla"
  with pytest.raises(ValueError, match="attention_impl"):
    attn_lib.select_impl("flash", head_dim=64, dtype=jnp.bfloat16, device=H100)


def _qkv(dtype=jnp.float32, shape=(2, 16, 2, 8)):
  return tuple(jax.random.normal(jax.random.key(i), shape).astype(dtype) for i in range(3))


def test_explicit_xla_is_jax_nn():
  q, k, v = _qkv()
  a = attn_lib.dot_product_attention(q, k, v, impl="xla")
  b = jax.nn.dot_product_attention(q, k, v, scale=8 ** -0.5, implementation="xla")
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("shape", [(2, 16, 2, 8), (3, 256, 4, 64), (1, 9, 3, 72)])
def test_heads_major_matches_jax_nn_in_float32(shape):
  """auto on CPU (heads-major) = jax.nn's XLA attention to float32 rounding, values and
  gradients."""
  q, k, v = _qkv(shape=shape)
  w = jax.random.normal(jax.random.key(9), shape)
  ref = lambda q, k, v: jax.nn.dot_product_attention(  # noqa: E731
      q, k, v, scale=shape[-1] ** -0.5, implementation="xla")
  ours = lambda q, k, v: attn_lib.dot_product_attention(q, k, v, impl=None)  # noqa: E731
  assert attn_lib.select_impl(None, head_dim=shape[-1], dtype=q.dtype) == "xla_heads"
  np.testing.assert_allclose(np.asarray(jax.jit(ours)(q, k, v)),
                             np.asarray(jax.jit(ref)(q, k, v)), rtol=1e-6, atol=1e-6)
  grads = [jax.jit(jax.grad(lambda q, k, v, f=f: jnp.sum(f(q, k, v) * w), (0, 1, 2)))(q, k, v)
           for f in (ours, ref)]
  for a, b in zip(*grads):
    np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)


def test_heads_major_keeps_the_half_precision_dtypes():
  """bf16 in: bf16 out, with float32 logits/softmax as jax.nn (same values)."""
  q, k, v = _qkv(jnp.bfloat16, (2, 32, 2, 64))
  a = attn_lib.heads_major_attention(q, k, v, scale=0.125)
  b = jax.nn.dot_product_attention(q, k, v, scale=0.125, implementation="xla")
  assert a.dtype == jnp.bfloat16
  np.testing.assert_allclose(np.asarray(a, np.float32), np.asarray(b, np.float32),
                             rtol=1e-2, atol=1e-2)


def _saved_residuals(remat: str) -> str:
  cfg = DiTConfig(input_size=4, in_channels=48, hidden_size=32, depth=2, num_heads=2,
                  num_classes=10, use_repa=False, remat_policy=remat)
  model = LightningDiT(cfg, rngs=nnx.Rngs(0))
  graphdef, params = nnx.split(model)
  x = jnp.ones((2, 4, 4, 48))
  t = jnp.full((2,), 0.5)
  y = jnp.zeros((2,), jnp.int32)

  def loss(p):
    return jnp.sum(nnx.merge(graphdef, p)(x, t, t, y))

  buf = io.StringIO()
  with contextlib.redirect_stdout(buf):
    jax.ad_checkpoint.print_saved_residuals(loss, params)
  return buf.getvalue()


def test_save_attn_out_policy_saves_the_attention_output():
  saved = _saved_residuals("save_attn_out")
  full = _saved_residuals("full")
  named = [line for line in saved.splitlines() if "named 'attn_out'" in line]
  # One [N, T, heads, hd] attention output per block (depth 2), nothing named under full.
  assert len(named) == 2, saved
  assert all("f32[2,16,2,16]" in line for line in named), named
  assert "attn_out" not in full
  assert len(saved.splitlines()) == len(full.splitlines()) + 2
