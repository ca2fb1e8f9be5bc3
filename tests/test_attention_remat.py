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
    (FakeDevice("cpu", "cpu"), jnp.bfloat16, 64, "xla"),
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


def test_auto_on_cpu_equals_xla():
  q, k, v = (jax.random.normal(jax.random.key(i), (2, 16, 2, 8)) for i in range(3))
  a = attn_lib.dot_product_attention(q, k, v, impl=None)
  b = jax.nn.dot_product_attention(q, k, v, scale=8 ** -0.5, implementation="xla")
  np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


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
