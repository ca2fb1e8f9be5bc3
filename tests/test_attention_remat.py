"""Attention kernel selection ("auto"), the splash kernel (Pallas interpret mode on CPU;
the TPU compiler when installed) and the save_attn_out remat policy."""
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


# ------------------------------------------------------------------ splash attention

TPU = FakeDevice("tpu", "TPU v5")


@pytest.mark.parametrize("dtype,head_dim,seq_len,mesh_known,want", [
    (jnp.bfloat16, 72, 256, True, "splash"),      # XL at ImageNet 256
    (jnp.bfloat16, 64, 256, True, "splash"),      # B, XXL
    (jnp.float32, 72, 256, True, "splash"),
    (jnp.bfloat16, 72, 256, False, "xla"),        # no mesh to place the kernel on
    (jnp.bfloat16, 16, 16, True, "xla"),          # 16 tokens: not a multiple of 128
    (jnp.float16, 64, 256, True, "xla"),          # the kernel takes bf16 / f32
    (jnp.bfloat16, 320, 256, True, "xla"),        # head_dim > 256
    (jnp.bfloat16, 72, None, True, "xla"),        # sequence unknown
])
def test_auto_picks_splash_on_tpu_where_it_applies(dtype, head_dim, seq_len, mesh_known,
                                                   want):
  with jax.default_matmul_precision("default"):   # the tests' default is "highest"
    got = attn_lib.select_impl(None, head_dim=head_dim, dtype=dtype, device=TPU,
                               seq_len=seq_len, mesh_known=mesh_known)
  assert got == want
  # GPUs keep cuDNN whatever the sequence and mesh
  assert attn_lib.select_impl(None, head_dim=72, dtype=jnp.bfloat16, device=H100,
                              seq_len=256, mesh_known=True) == "cudnn"


def _splash_vs_xla(shape, sharding=None):
  q, k, v = _qkv(shape=shape)
  w = jax.random.normal(jax.random.key(9), shape)
  ref = lambda q, k, v: jax.nn.dot_product_attention(  # noqa: E731
      q, k, v, scale=shape[-1] ** -0.5, implementation="xla")
  ours = lambda q, k, v: attn_lib.dot_product_attention(  # noqa: E731
      q, k, v, impl="splash", sharding=sharding)
  values = [np.asarray(jax.jit(f)(q, k, v)) for f in (ours, ref)]
  grads = [jax.jit(jax.grad(lambda q, k, v, f=f: jnp.sum(f(q, k, v) * w), (0, 1, 2)))(q, k, v)
           for f in (ours, ref)]
  return values, grads


@pytest.mark.parametrize("shape", [(2, 128, 2, 72), (1, 256, 3, 64)])
def test_splash_matches_xla_attention_in_interpret_mode(shape):
  """The Pallas splash kernel (interpret mode on CPU) = jax.nn's XLA attention in
  float32: values within 2e-6, gradients within 1e-5 (measured: 5e-7 and 1e-6 at
  |grad| ≈ 1 for XL's head_dim 72)."""
  (a, b), grads = _splash_vs_xla(shape)
  np.testing.assert_allclose(a, b, rtol=0, atol=2e-6)
  for x, y in zip(*grads):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-5)


def test_splash_runs_per_device_under_a_mesh():
  """With the activations' sharding (batch over data × fsdp of the 8 CPU devices) the
  kernel runs per device in shard_map; same values and gradients."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  from sfd_jax import parallel
  mesh = parallel.make_mesh({"data": 2, "fsdp": 4, "tensor": 1})
  assert attn_lib.BATCH_MESH_AXES == parallel.BATCH_AXES
  (a, b), grads = _splash_vs_xla((8, 128, 2, 72), NamedSharding(mesh, P(parallel.BATCH_AXES)))
  np.testing.assert_allclose(a, b, rtol=0, atol=2e-6)
  for x, y in zip(*grads):
    np.testing.assert_allclose(np.asarray(x), np.asarray(y), rtol=1e-5, atol=1e-5)


def test_splash_rejects_shapes_it_cannot_take():
  q, k, v = _qkv(shape=(1, 16, 2, 8))
  with pytest.raises(ValueError, match="sequence length 16 is not a multiple of 128"):
    attn_lib.dot_product_attention(q, k, v, impl="splash")


@pytest.mark.tpu_compile   # skipped without libtpu (tests/conftest.py)
def test_auto_compiles_the_splash_kernel_for_tpu_at_xl_shapes():
  """XL's attention (16 heads of 72, 256 tokens, bf16) forward and backward, batch over a
  4-chip v5e mesh, compiled by the TPU compiler: auto picks splash, a Mosaic kernel."""
  from jax.sharding import NamedSharding, PartitionSpec as P
  from sfd_jax import parallel
  from sfd_jax.planning import tpu
  mesh = parallel.make_mesh({"data": 1, "fsdp": -1, "tensor": 1},
                            tpu.devices(tpu.parse_topology("v5e:2x2")))
  sh = NamedSharding(mesh, P(parallel.BATCH_AXES))
  x = jax.ShapeDtypeStruct((8, 256, 16, 72), jnp.bfloat16, sharding=sh)

  def loss(q, k, v):
    out = attn_lib.dot_product_attention(q, k, v, sharding=sh)
    return jnp.sum(out.astype(jnp.float32))

  # the tests run with "highest" matmul precision; Mosaic takes bf16 dots at the default
  with jax.default_matmul_precision("default"):
    text = jax.jit(jax.grad(loss, (0, 1, 2))).lower(x, x, x).compile().as_text()
  assert text.count('custom_call_target="tpu_custom_call"') >= 3   # forward, dq, dkv


def test_splash_is_not_chosen_for_bf16_under_highest_matmul_precision():
  with jax.default_matmul_precision("highest"):
    assert attn_lib.select_impl(None, head_dim=72, dtype=jnp.bfloat16, device=TPU,
                                seq_len=256, mesh_known=True) == "xla"
    assert attn_lib.select_impl(None, head_dim=72, dtype=jnp.float32, device=TPU,
                                seq_len=256, mesh_known=True) == "splash"
