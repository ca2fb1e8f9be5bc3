"""FID Inception-v3: parity with pytorch-fid (inception_fid.npz), converter, preprocessing."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import sfd_jax  # noqa: F401
from sfd_jax.convert import inception as conv
from sfd_jax.convert.common import ConversionError, load_state_dict
from sfd_jax.models import inception as inc
from sfd_jax.models.layers import param_count, unnamed_params
from tests.conftest import parity_dir
from tests.util import assert_close_ref

FIXTURE = "inception_fid"


def _fixture_path():
  path = parity_dir() / f"{FIXTURE}.npz"
  if not path.exists():
    pytest.skip(f"parity fixture {path} not found (set SFD_PARITY_DIR)")
  return path


@pytest.fixture(scope="module")
def state_dict():
  return load_state_dict(_fixture_path())


@pytest.fixture(scope="module")
def fc_weight():
  """A random classifier (the fixture has none) so one forward also checks the logits."""
  return np.random.default_rng(0).normal(0, 0.05, (inc.FID_NUM_CLASSES, 2048)).astype(np.float32)


@pytest.fixture(scope="module")
def model(state_dict, fc_weight):
  sd = dict(state_dict)
  sd["fc.weight"] = fc_weight
  sd["fc.bias"] = np.ones((inc.FID_NUM_CLASSES,), np.float32)
  return conv.build_inception(conv.convert_state_dict(sd))


@pytest.fixture(scope="module")
def forward():
  return nnx.jit(lambda m, x: m(x))


@pytest.mark.parametrize("res", [299, 256])
def test_pool3_and_block_means_match_pytorch_fid(parity, model, forward, fc_weight, res):
  z = parity(FIXTURE)
  images = jnp.asarray(z[f"in/images_{res}"].transpose(0, 2, 3, 1))  # NCHW -> NHWC
  out = jax.tree.map(np.asarray, forward(model, images))
  assert_close_ref(out["pool"], z[f"out/pool3_{res}"], tol=1e-3, name=f"pool3_{res}")
  for b in range(3):
    assert_close_ref(out[f"block{b}_mean"], z[f"out/block{b}_channel_mean_{res}"], tol=1e-3,
                     name=f"block{b}_{res}")
  # Logits are pool3 @ fc.weight.T *without* the bias (the ADM Inception Score's logits).
  ref_logits = out["pool"].astype(np.float64) @ fc_weight.T.astype(np.float64)
  assert_close_ref(out["logits"], ref_logits, tol=1e-5, name="logits")
  # sFID tap: Mixed_6d.branch1x1 after ReLU, first 7 channels of the 17x17 map.
  assert out["spatial"].shape == (2, inc.spatial_feature_dim()) == (2, 17 * 17 * 7)
  assert out["spatial"].min() >= 0.0 and out["spatial"].max() > 0.0


@pytest.fixture(scope="module")
def mixed_6d_outputs(model):
  """Mixed_6d in float32 and with bfloat16 compute (same weights), one jit."""
  bf16 = nnx.eval_shape(lambda: inc.FIDInceptionC(
      768, 160, dtype=jnp.bfloat16, param_dtype=jnp.float32, precision=None,
      rngs=nnx.Rngs(0)))
  nnx.update(bf16, nnx.state(model.Mixed_6d))
  x = jax.random.uniform(jax.random.key(0), (1, 9, 9, 768))

  @nnx.jit
  def run(block, block_bf16, x):
    return block(x), block.branch1x1(x), block_bf16(x)

  return jax.tree.map(np.asarray, run(model.Mixed_6d, bf16, x)), bf16


def test_sfid_tap_is_mixed_6d_branch1x1(mixed_6d_outputs):
  ((full, tap), branch1x1, _), _ = mixed_6d_outputs
  np.testing.assert_array_equal(tap, branch1x1)
  np.testing.assert_array_equal(full[..., :192], tap)


def test_bfloat16_compute_dtype(mixed_6d_outputs):
  """bf16 convolutions (f32 params, BN, pooling sums and outputs of the network)."""
  ((ref, _), _, (out, tap)), bf16 = mixed_6d_outputs
  assert bf16.branch1x1.conv.kernel[...].dtype == jnp.float32
  assert out.dtype == jnp.bfloat16 and tap.dtype == jnp.bfloat16
  rel = np.linalg.norm(out.astype(np.float32) - ref) / np.linalg.norm(ref)
  assert rel < 2e-2, rel


def test_parameters_named_and_counted(state_dict, model):
  assert unnamed_params(model) == []
  n_weights = sum(v.size for k, v in state_dict.items() if "running_" not in k)
  assert n_weights == 21_785_568
  assert param_count(model) == n_weights + 2048 * inc.FID_NUM_CLASSES
  stats = nnx.state(model, nnx.BatchStat)
  assert all(v.get_metadata().get("out_sharding") == ("norm",)
             for _, v in nnx.to_flat_state(stats))
  assert sum(v.get_value().size for _, v in nnx.to_flat_state(stats)) == sum(
      v.size for k, v in state_dict.items() if "running_" in k)


def test_converter_names_the_key(state_dict):
  sd = dict(state_dict)
  del sd["Mixed_6d.branch1x1.bn.running_var"]
  with pytest.raises(ConversionError, match=r"Mixed_6d\.branch1x1\.bn\.running_var"):
    conv.convert_state_dict(sd)
  sd = dict(state_dict)
  sd["Mixed_7c.branch_pool.conv.weight"] = np.zeros((192, 2048, 3, 3), np.float16)
  with pytest.raises(ConversionError, match=r"Mixed_7c\.branch_pool\.conv\.weight.*"
                     r"\(192, 2048, 3, 3\).*\(192, 2048, 1, 1\)"):
    conv.convert_state_dict(sd)
  sd = dict(state_dict)
  sd["AuxLogits.fc.weight"] = np.zeros((1000, 768), np.float32)
  sd["Conv2d_1a_3x3.bn.num_batches_tracked"] = np.zeros((), np.int64)  # ignored
  with pytest.raises(ConversionError, match=r"unexpected keys 'AuxLogits\.fc\.weight'"):
    conv.convert_state_dict(sd)
  sd = dict(state_dict)
  sd["fc.weight"] = np.zeros((1008, 1024), np.float32)
  with pytest.raises(ConversionError, match=r"fc\.weight"):
    conv.convert_state_dict(sd)


def test_converter_casts_float16_and_maps_layouts(state_dict):
  tree = conv.convert_state_dict(state_dict)
  assert "fc" not in tree
  w = state_dict["Mixed_5b.branch5x5_2.conv.weight"]
  assert w.dtype == np.float16
  got = tree["Mixed_5b"]["branch5x5_2"]["conv"]["kernel"]
  assert got.dtype == np.float32 and got.shape == (5, 5, 48, 64)
  np.testing.assert_array_equal(got, w.astype(np.float32).transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(tree["Conv2d_4a_3x3"]["bn"]["var"],
                                state_dict["Conv2d_4a_3x3.bn.running_var"].astype(np.float32))


def test_cli_writes_and_load_inception_reads(tmp_path, state_dict):
  src = tmp_path / "fid_weights.npz"
  sd = dict(state_dict)
  sd["fc.weight"] = np.full((inc.FID_NUM_CLASSES, 2048), 0.5, np.float16)
  sd["fc.bias"] = np.zeros((inc.FID_NUM_CLASSES,), np.float16)
  np.savez(src, **sd)
  dst = tmp_path / "converted"
  conv.main(["--src", str(src), "--dst", str(dst)])
  meta = json.loads((dst / "meta.json").read_text())
  assert meta["model"] == conv.MODEL_KIND and meta["num_classes"] == inc.FID_NUM_CLASSES
  m = conv.load_inception(dst, preprocess="adm")
  assert m.preprocess == "adm" and m.num_classes == inc.FID_NUM_CLASSES
  np.testing.assert_array_equal(np.asarray(m.fc.kernel[...]), 0.5)
  np.testing.assert_array_equal(
      np.asarray(m.Mixed_7b.branch3x3dbl_3a.bn.mean[...]),
      state_dict["Mixed_7b.branch3x3dbl_3a.bn.running_mean"].astype(np.float32))
  with pytest.raises(FileExistsError):
    conv.main(["--src", str(src), "--dst", str(dst)])


# --------------------------------------------------------------------------- preprocessing


@pytest.mark.parametrize("mode", ["torch", "tf1"])
@pytest.mark.parametrize("n_in,n_out", [(299, 299), (256, 299), (320, 299), (7, 3)])
def test_resize_matrix_is_a_partition_of_unity(mode, n_in, n_out):
  m = inc.bilinear_resize_matrix(n_in, n_out, mode)
  assert m.shape == (n_out, n_in)
  np.testing.assert_allclose(m.sum(axis=1), 1.0, rtol=0, atol=1e-6)
  assert (m >= 0).all()
  if n_in == n_out:
    np.testing.assert_array_equal(m, np.eye(n_in))


# TensorFlow 2.21 ``tf.raw_ops.ResizeBilinear(align_corners=False)`` of the 4x5 image below,
# with half_pixel_centers False (TF1 / the ADM graph) and True (the same rule as torch's
# ``F.interpolate(mode="bilinear", align_corners=False)``), recorded once.
_RESIZE_SRC = ((np.arange(20).reshape(1, 4, 5, 1) * 37) % 23).astype(np.float32)
_RESIZE_GOLDEN = {
    ("tf1", (7, 3)): [[0, 8, 16], [0.5714286, 8.571428, 16.571428],
                      [1.1428572, 9.142858, 17.142857], [1.7142859, 9.714286, 17.714287],
                      [2.2857144, 10.285714, 18.285715], [2.857143, 10.857143, 18.857143],
                      [3, 11, 19]],
    ("tf1", (3, 8)): [[0, 8.75, 11.75, 6.125, 12, 17.875, 12.25, 10],
                      [1.3333334, 10.083333, 13.083333, 7.4583335, 13.333333, 19.208334,
                       13.583333, 11.333333],
                      [2.6666667, 11.416667, 14.416667, 8.791667, 14.666667, 20.541666,
                       14.916667, 12.666667]],
    ("torch", (7, 3)): [[4.6666665, 5, 13.000002], [5.0238094, 5.357143, 13.357145],
                        [5.5952377, 5.9285717, 13.928574], [6.1666665, 6.5, 14.500002],
                        [6.7380953, 7.071429, 15.07143], [7.3095236, 7.6428576, 15.642859],
                        [7.6666665, 8, 16.000002]],
    ("torch", (3, 8)): [[0.16666669, 6.2916665, 13.604167, 7.9791665, 9.541667, 18.291666,
                         14.104167, 10.166667],
                        [1.5, 7.625, 14.9375, 9.3125, 10.875, 19.625, 15.4375, 11.5],
                        [2.8333335, 8.958334, 16.270834, 10.645834, 12.208334, 20.958334,
                         16.770834, 12.833334]],
}


@pytest.mark.parametrize("mode,size", sorted(_RESIZE_GOLDEN))
def test_resize_matches_tensorflow_golden(mode, size):
  got = np.asarray(inc.bilinear_resize(jnp.asarray(_RESIZE_SRC), size, mode))[0, :, :, 0]
  np.testing.assert_allclose(got, np.asarray(_RESIZE_GOLDEN[(mode, size)]), rtol=0, atol=2e-5)


def test_input_normalisation_modes():
  rng = np.random.default_rng(2)
  u8 = rng.integers(0, 256, (1, 299, 299, 3)).astype(np.uint8)
  ref_torch = 2 * (u8 / 255.0) - 1
  for images in (u8, (u8 / 255.0).astype(np.float32)):
    np.testing.assert_allclose(np.asarray(inc.preprocess_images(jnp.asarray(images))),
                               ref_torch, rtol=0, atol=1e-6)
  np.testing.assert_allclose(np.asarray(inc.preprocess_images(jnp.asarray(u8), "adm")),
                             (u8 - 128.0) / 128.0, rtol=0, atol=1e-6)
  u8_256 = rng.integers(0, 256, (1, 256, 256, 3)).astype(np.uint8)
  mat = inc.bilinear_resize_matrix(256, 299, "tf1").astype(np.float64)
  resized = np.einsum("oh,hwc->owc", mat, u8_256[0].astype(np.float64))
  ref = (np.einsum("pw,owc->opc", mat, resized)[None] - 128) / 128
  np.testing.assert_allclose(np.asarray(inc.preprocess_images(jnp.asarray(u8_256), "adm")),
                             ref, rtol=0, atol=1e-5)
  with pytest.raises(ValueError, match="NHWC"):
    inc.preprocess_images(jnp.zeros((1, 3, 32, 32)))
  with pytest.raises(ValueError, match="preprocess"):
    inc.preprocess_images(jnp.zeros((1, 32, 32, 3)), "tf")


