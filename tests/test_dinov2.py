"""DINOv2 ViT with registers: parity through the converter, pos-embed resampling, sizes."""
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import sfd_jax  # noqa: F401  (flax config)
from sfd_jax.convert import common
from sfd_jax.convert import dinov2 as conv
from sfd_jax.models.dinov2 import DinoV2, DinoV2Config
from sfd_jax.models.layers import param_count, unnamed_params
from tests.conftest import parity_dir
from tests.util import assert_close_ref

TINY = DinoV2Config.tiny()


@pytest.fixture(scope="module")
def fixture(parity):
  return parity("dinov2")


@pytest.fixture(scope="module")
def fixture_path(fixture):
  del fixture  # skips when absent
  return str(parity_dir() / "dinov2.npz")


@pytest.fixture(scope="module")
def model(fixture_path):
  return conv.load_dinov2(fixture_path, TINY)


def _images(fixture):
  return fixture["in/images"].transpose(0, 2, 3, 1)


def _pos(model, h, w):
  return np.asarray(nnx.jit(lambda m: m.interpolate_pos_encoding(h, w))(model))


def test_parity_all_outputs(fixture, model):
  @nnx.jit
  def run(m, x):
    return dict(m.forward_features(x), interpolated_pos_embed=m.interpolate_pos_encoding(16, 16),
                patch_embed=m.embed_patches(x), forward_cls_head=m(x))

  out = run(model, _images(fixture))
  out["interpolated_pos_embed"] = out["interpolated_pos_embed"][None]
  for key in ("x_norm_clstoken", "x_norm_regtokens", "x_norm_patchtokens", "x_prenorm",
              "interpolated_pos_embed", "patch_embed", "forward_cls_head"):
    assert_close_ref(out[key], fixture[f"out/{key}"], name=key)


def _keys_kernel(x):
  """Keys cubic kernel, a = -0.5 (PyTorch's antialiased bicubic)."""
  a, ax = -0.5, np.abs(x)
  near = ((a + 2) * ax - (a + 3)) * ax * ax + 1
  far = ((a * ax - 5 * a) * ax + 8 * a) * ax - 4 * a
  return np.where(ax <= 1, near, np.where(ax < 2, far, 0.0))


def _torch_aa_bicubic_matrix(in_size, out_size, scale=None):
  """Independent float64 rendering of PyTorch's antialiased bicubic (upsample_bicubic2d_aa).

  scale: input pixels per output pixel (in/out for a target size, 1/scale_factor otherwise).
  Kernel stretched by the scale when downscaling; taps outside the input dropped; weights
  renormalised.
  """
  scale = in_size / out_size if scale is None else scale
  support = 2.0 * max(scale, 1.0)
  inv = 1.0 / max(scale, 1.0)
  mat = np.zeros((out_size, in_size))
  for i in range(out_size):
    center = scale * (i + 0.5)
    lo = max(int(center - support + 0.5), 0)
    hi = min(int(center + support + 0.5), in_size)
    j = np.arange(lo, hi)
    w = _keys_kernel((j - center + 0.5) * inv)
    mat[i, lo:hi] = w / w.sum()
  return mat


def _resample_reference(pos, m, h, w, scales=None):
  grid = np.asarray(pos[1:], np.float64).reshape(m, m, -1)
  sh, sw = (None, None) if scales is None else scales
  rh, rw = _torch_aa_bicubic_matrix(m, h, sh), _torch_aa_bicubic_matrix(m, w, sw)
  out = np.einsum("ip,jq,pqc->ijc", rh, rw, grid).reshape(h * w, -1)
  return np.concatenate([np.asarray(pos[:1], np.float64), out], 0)


def test_reference_resampler_reproduces_fixture(fixture, model):
  """Sanity of the test's own numpy rendering of the PyTorch rule."""
  ref = _resample_reference(model.pos_embed[...], TINY.grid_size, 16, 16)
  np.testing.assert_allclose(ref, fixture["out/interpolated_pos_embed"][0], rtol=0, atol=2e-6)


@pytest.mark.parametrize("h,w", [(20, 12), (40, 45)])
def test_pos_embed_resampling_matches_torch_rule(model, h, w):
  """Down- and upsampling, non-square. Both PyTorch and JAX place the taps in float32:
  ~2e-6 weight differences from the float64 rule when upsampling."""
  ref = _resample_reference(model.pos_embed[...], TINY.grid_size, h, w)
  np.testing.assert_allclose(_pos(model, h, w), ref, rtol=0, atol=2e-5)


def test_pos_embed_offset_uses_scale_factor(fixture_path, model):
  cfg = dataclasses.replace(TINY, interpolate_offset=0.1)
  m_off = conv.load_dinov2(fixture_path, cfg)
  m = TINY.grid_size
  ref = _resample_reference(model.pos_embed[...], m, 16, 16, scales=(m / 16.1, m / 16.1))
  np.testing.assert_allclose(_pos(m_off, 16, 16), ref, rtol=0, atol=2e-5)


def test_pos_embed_unchanged_at_training_resolution(model):
  np.testing.assert_array_equal(_pos(model, 37, 37), np.asarray(model.pos_embed[...]))


def test_token_layout_and_bad_sizes(model):
  def shapes(hw):
    x = jax.ShapeDtypeStruct((1,) + hw + (3,), jnp.float32)
    return nnx.eval_shape(lambda m, x: m.forward_features(x), model, x)

  feats = shapes((28, 42))
  assert feats["x_norm_patchtokens"].shape == (1, 6, 64)
  assert feats["x_prenorm"].shape == (1, 1 + 4 + 6, 64)
  with pytest.raises(ValueError, match="multiple of the patch size 14"):
    shapes((30, 28))


def test_bf16_compute_close_to_f32(fixture, fixture_path):
  m16 = conv.load_dinov2(fixture_path, TINY, dtype=jnp.bfloat16)
  assert m16.pos_embed[...].dtype == jnp.float32
  out16 = nnx.jit(lambda m, x: m.patch_features(x))(m16, _images(fixture))
  assert out16.dtype == jnp.bfloat16
  ref = fixture["out/x_norm_patchtokens"]
  err = np.abs(np.asarray(out16, np.float32) - ref).max() / np.abs(ref).max()
  assert err < 0.05, err


def _vit_b_reg_count(include_mask_token):
  """Closed form for ViT-B/14, 4 registers, 37×37 position grid, LayerScale."""
  d, hid, p = 768, 3072, 14
  block = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * hid + hid) + (hid * d + d) + 2 * d
  total = (3 * p * p * d + d) + d + 4 * d + (1 + 37 * 37) * d + 12 * block + 2 * d
  return total + (d if include_mask_token else 0)


def test_vitb14_reg_parameter_count_and_names():
  abstract = conv.build_abstract(DinoV2Config.vitb14_reg())
  assert param_count(abstract) == _vit_b_reg_count(False) == 86_582_784
  assert _vit_b_reg_count(True) == 86_583_552  # the hub model, with its unused mask_token
  assert unnamed_params(abstract) == []


def test_unnamed_params_tiny():
  assert unnamed_params(nnx.eval_shape(lambda: DinoV2(TINY, rngs=nnx.Rngs(0)))) == []


def _weights(fixture):
  return {k: fixture[k] for k in fixture.files if k != "config" and "/" not in k}


def test_converter_errors_name_the_key(fixture):
  sd = _weights(fixture)
  missing = {k: v for k, v in sd.items() if k != "blocks.1.ls2.gamma"}
  with pytest.raises(common.ConversionError, match=r"blocks\.1\.ls2\.gamma"):
    conv.convert_state_dict(missing, TINY)
  bad = dict(sd, **{"blocks.0.attn.qkv.weight": np.zeros((191, 64), np.float32)})
  with pytest.raises(common.ConversionError,
                     match=r"blocks\.0\.attn\.qkv\.weight.*\(191, 64\).*\(192, 64\)"):
    conv.convert_state_dict(bad, TINY)
  extra = dict(sd, **{"head.weight": np.zeros((3, 64), np.float32)})
  with pytest.raises(common.ConversionError, match=r"head\.weight"):
    conv.convert_state_dict(extra, TINY)
  with pytest.raises(common.ConversionError, match="pos_embed"):
    conv.convert_state_dict(sd, dataclasses.replace(TINY, img_size=224))
  # mask_token is optional and ignored.
  conv.convert_state_dict({k: v for k, v in sd.items() if k != "mask_token"}, TINY)


def test_cli_roundtrip(fixture_path, model, tmp_path):
  dst = tmp_path / "dino"
  conv.main(["--src", fixture_path, "--dst", str(dst), "--preset", "tiny"])
  with pytest.raises(FileExistsError):
    conv.main(["--src", fixture_path, "--dst", str(dst), "--preset", "tiny"])
  loaded = conv.load_dinov2(dst)
  assert loaded.config == TINY
  model_params = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  for name, value in nnx.to_flat_state(nnx.state(loaded, nnx.Param)):
    np.testing.assert_array_equal(np.asarray(value.get_value()),
                                  np.asarray(model_params[name].get_value()), err_msg=str(name))
