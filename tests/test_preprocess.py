"""Image preprocessing: ADM crop, PyTorch bicubic resize, the two DINOv2 input pipelines."""
import jax
import numpy as np
import pytest
from PIL import Image

import sfd_jax  # noqa: F401  (flax config)
from sfd_jax.data import preprocess as pp


def _nhwc(x_nchw):
  return np.asarray(x_nchw).transpose(0, 2, 3, 1)


def test_dino_preprocess_parity(parity):
  z = parity("dino_preprocess")
  x = _nhwc(z["in/x"])
  resized = np.asarray(pp.torch_bicubic_resize(x, 224, 224))
  dino_in = np.asarray(pp.dino_extraction_input(x))
  assert resized.dtype == np.float32 and dino_in.shape == (1, 224, 224, 3)
  # README §5.8: both outputs to 1e-4 abs (measured ≈1.2e-6 and ≈2.6e-6).
  np.testing.assert_allclose(resized, _nhwc(z["out/resize_only"]), rtol=0, atol=1e-4)
  np.testing.assert_allclose(dino_in, _nhwc(z["out/dino_input"]), rtol=0, atol=1e-4)


def test_exact_rule_vs_torch_float32_rule(parity):
  """The float64 rule is mathematically exact but ~6e-5 off PyTorch's float32 one."""
  z = parity("dino_preprocess")
  x = _nhwc(z["in/x"]).astype(np.float64)
  m64 = pp.torch_bicubic_matrix(256, 224, "float64")
  exact = np.einsum("ip,jq,bpqc->bijc", m64, m64, x, optimize=True)
  err = np.abs(exact - _nhwc(z["out/resize_only"])).max()
  assert 1e-5 < err < 1e-4


@pytest.mark.parametrize("size_in,size_out", [(20, 13), (13, 29), (1, 3)])
def test_bicubic_matrix_matches_jax_cubic_pytorch(size_in, size_out):
  """Independent check of the rule (a=-0.75, clamped taps, no stretching) at other sizes."""
  m = pp.torch_bicubic_matrix(size_in, size_out)
  np.testing.assert_allclose(m.sum(axis=1), 1.0, atol=1e-6)
  x = np.random.default_rng(0).normal(size=(2, size_in, size_in + 3, 3)).astype(np.float32)
  ours = pp.torch_bicubic_resize(x, size_out, size_out + 2)
  ref = jax.image.resize(x, (2, size_out, size_out + 2, 3), "bicubic-pytorch", antialias=False)
  np.testing.assert_allclose(np.asarray(ours), np.asarray(ref), rtol=0, atol=2e-5)


def test_torch_bicubic_resize_rejects_non_nhwc():
  with pytest.raises(ValueError, match="NHWC"):
    pp.torch_bicubic_resize(np.zeros((3, 8, 8), np.float32), 4, 4)


def _pattern(w, h, seed=0):
  return np.random.default_rng(seed).integers(0, 256, size=(h, w, 3), dtype=np.uint8)


@pytest.mark.parametrize("mode,size", [
    ("RGB", (300, 400)), ("RGB", (1100, 700)), ("L", (640, 480)), ("CMYK", (256, 256)),
    ("RGBA", (257, 700)), ("RGB", (10, 10)), ("P", (31, 17))])
def test_adm_center_crop_shapes_and_modes(mode, size):
  img = Image.fromarray(_pattern(*size)).convert(mode)
  out = pp.adm_center_crop(img, 256)
  assert out.shape == (256, 256, 3) and out.dtype == np.uint8
  if mode == "L":
    assert np.array_equal(out[..., 0], out[..., 1]) and np.array_equal(out[..., 0], out[..., 2])


def test_adm_center_crop_halving_and_offsets():
  """512×768 (W×H): one BOX halving to 256×384, no resize, crop rows 64:320."""
  img = Image.fromarray(_pattern(512, 768, seed=1))
  halved = np.asarray(img.resize((256, 384), resample=Image.Resampling.BOX))
  np.testing.assert_array_equal(pp.adm_center_crop(img, 256), halved[64:320])
  same = _pattern(256, 256, seed=2)
  np.testing.assert_array_equal(pp.adm_center_crop(Image.fromarray(same), 256), same)


def test_rgba_drops_alpha_like_the_reference_loader():
  arr = np.zeros((256, 256, 4), np.uint8)
  arr[..., 0] = 200
  arr[..., 3] = 0  # fully transparent: alpha is discarded, not composited
  out = pp.adm_center_crop(Image.fromarray(arr, "RGBA"), 256)
  assert (out[..., 0] == 200).all() and (out[..., 1:] == 0).all()


def test_uint8_to_m11():
  np.testing.assert_allclose(np.asarray(pp.uint8_to_m11(np.array([0, 255], np.uint8))), [-1, 1])


def test_semvae_training_dino_input():
  # Constant colour: exactly the normalised colour; size 300×400 (W×H) → Resize to
  # 256×341 (long side truncated), CenterCrop 224.
  colour = np.array([10, 128, 250], np.uint8)
  img = Image.fromarray(np.broadcast_to(colour, (400, 300, 3)).copy())
  out = pp.semvae_training_dino_input(img)
  assert out.shape == (224, 224, 3) and out.dtype == np.float32
  want = (colour / 255.0 - np.array(pp.IMAGENET_MEAN)) / np.array(pp.IMAGENET_STD)
  np.testing.assert_allclose(out, np.broadcast_to(want, out.shape), atol=1e-5)
  # Offsets: torchvision rounds (341 - 224)/2 = 58.5 half-to-even → 58.
  arr = _pattern(300, 400, seed=3)
  resized = np.asarray(Image.fromarray(arr).resize((256, 341), Image.Resampling.BICUBIC))
  want = (resized[58:282, 16:240] / 255.0 - np.array(pp.IMAGENET_MEAN)) / np.array(pp.IMAGENET_STD)
  np.testing.assert_allclose(pp.semvae_training_dino_input(Image.fromarray(arr)), want, atol=1e-5)
