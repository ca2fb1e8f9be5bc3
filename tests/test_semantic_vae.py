"""Semantic VAE: parity of every output and loss term through the converter, posterior, sizes."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import sfd_jax  # noqa: F401  (flax config)
from sfd_jax.convert import common
from sfd_jax.convert import semantic_vae as conv
from sfd_jax.training.vae_losses import cosine_similarity, semvae_loss
from sfd_jax.models import layers
from sfd_jax.models.layers import param_count, unnamed_params
from sfd_jax.models.distributions import TokenGaussian as DiagonalGaussian
from sfd_jax.models.distributions import eps_nchw_to_tokens, tokens_to_nchw
from sfd_jax.models.semantic_vae import SemVAEConfig, torch_default_init
from tests.conftest import parity_dir
from tests.util import assert_close_ref

TINY = SemVAEConfig.tiny()


@pytest.fixture(scope="module")
def fixture(parity):
  return parity("semvae")


@pytest.fixture(scope="module")
def fixture_path(fixture):
  del fixture  # skips when absent
  return str(parity_dir() / "semvae.npz")


@pytest.fixture(scope="module")
def model(fixture_path):
  return conv.load_semantic_vae(fixture_path, TINY)


@nnx.jit
def _run(m, features, eps_nchw):
  posterior = m.encode(features)
  recon, z, kl = m(features, eps_nchw=eps_nchw)
  total, terms = semvae_loss(recon, features, kl)
  _, terms_channel = semvae_loss(recon, features, kl, cos_axis="channel")
  return {
      "encoder_raw": m.encoder(features), "posterior_mean": posterior.mean,
      "posterior_logvar": posterior.logvar, "z_sample": z, "recon_from_sample": recon,
      "recon_from_mean": m.decode(posterior.mode()), "kl": kl, "loss_total_returned": total,
      **{f"loss_{k}": terms[k] for k in ("mse", "l1", "cos", "kl", "total")},
      "cos_sim_per_token_mean": terms_channel["cos_sim"],
  }


def test_parity_all_outputs_and_losses(fixture, model):
  out = _run(model, fixture["in/features"], fixture["in/eps_nchw"])
  for key in ("encoder_raw", "posterior_mean", "posterior_logvar", "z_sample",
              "recon_from_sample", "recon_from_mean", "kl", "loss_mse", "loss_l1",
              "loss_cos", "loss_kl", "loss_total", "cos_sim_per_token_mean"):
    assert_close_ref(out[key], fixture[f"out/{key}"], name=key)
  assert_close_ref(out["loss_total_returned"], fixture["out/loss_total"], name="total")
  # The two cosine axes really differ on this fixture (the reference trap is visible).
  token_axis_cos = 1 - float(fixture["out/loss_cos"])
  assert abs(token_axis_cos - float(fixture["out/cos_sim_per_token_mean"])) > 1e-3


def test_eps_layout(fixture):
  eps_tokens = eps_nchw_to_tokens(jnp.asarray(fixture["in/eps_nchw"]))
  np.testing.assert_array_equal(np.asarray(eps_tokens), fixture["in/eps_tokens"])
  np.testing.assert_array_equal(np.asarray(tokens_to_nchw(eps_tokens)), fixture["in/eps_nchw"])


def test_sampling_from_key_draws_in_reference_layout():
  b, c = 2, 3
  key = jax.random.key(7)

  @jax.jit
  def draw(moments):
    post = DiagonalGaussian.from_moments(moments)
    eps_nchw = jax.random.normal(key, (b, c, 3, 3))
    return post.sample(key), post.sample(eps_nchw=eps_nchw)

  from_key, from_eps = draw(jax.random.normal(jax.random.key(1), (b, 9, 2 * c)))
  np.testing.assert_array_equal(np.asarray(from_key), np.asarray(from_eps))
  post = jax.eval_shape(DiagonalGaussian.from_moments, jnp.zeros((1, 10, 2 * c)))
  with pytest.raises(ValueError, match="exactly one"):
    jax.eval_shape(lambda p: p.sample(), post)
  with pytest.raises(ValueError, match="10 tokens do not form a square"):
    jax.eval_shape(lambda p: p.sample(key), post)


def test_logvar_clamp_and_kl():
  mean = np.array([0.5, -1.0, 2.0, 0.0], np.float32)
  raw_logvar = np.array([-45.0, 35.0, 0.3, -30.5], np.float32)
  post = DiagonalGaussian.from_moments(jnp.asarray(np.concatenate([mean, raw_logvar])[None, None]))
  logvar = np.clip(raw_logvar, -30.0, 20.0)
  np.testing.assert_array_equal(np.asarray(post.logvar)[0, 0], logvar)
  np.testing.assert_allclose(np.asarray(post.std)[0, 0], np.exp(logvar / 2), rtol=1e-6)
  want = 0.5 * np.sum(mean.astype(np.float64) ** 2 + np.exp(logvar.astype(np.float64)) - 1 - logvar)
  np.testing.assert_allclose(np.asarray(post.kl()), [want], rtol=1e-6)


def test_loss_options():
  rng = np.random.default_rng(0)
  a, b = rng.normal(size=(2, 5, 7)), rng.normal(size=(2, 5, 7))
  kl = np.array([3.0, 5.0])
  _, tok = semvae_loss(a, b, kl)
  _, ch = semvae_loss(a, b, kl, cos_axis="channel")
  def cos(axis):
    norms = np.linalg.norm(a, axis=axis) * np.linalg.norm(b, axis=axis)
    return np.mean(np.sum(a * b, axis) / norms)
  np.testing.assert_allclose(float(tok["cos"]), 1 - cos(1), rtol=1e-5)
  np.testing.assert_allclose(float(ch["cos"]), 1 - cos(-1), rtol=1e-5)
  total, terms = semvae_loss(a, b, kl, mse_weight=2.0, l1_weight=0.5, cos_weight=0.0, kl_weight=0.1)
  want = 2 * np.mean((a - b) ** 2) + 0.5 * np.mean(np.abs(a - b)) + 0.1 * 4.0
  np.testing.assert_allclose(float(total), want, rtol=1e-5)
  assert float(terms["kl"]) == 4.0
  with pytest.raises(ValueError, match="cos_axis"):
    semvae_loss(a, b, kl, cos_axis="tokens")
  # torch's eps: a zero vector gives cosine 0, not NaN.
  assert float(cosine_similarity(jnp.zeros((1, 4)), jnp.ones((1, 4)), axis=-1)[0]) == 0.0


def test_grad_step_is_finite(model, fixture):
  features = jnp.asarray(fixture["in/features"])

  @nnx.jit
  def step(m, eps_nchw):
    def loss_fn(m):
      recon, _, kl = m(features, eps_nchw=eps_nchw)
      return semvae_loss(recon, features, kl)[0]
    return nnx.value_and_grad(loss_fn)(m)

  loss, grads = step(model, fixture["in/eps_nchw"])
  assert_close_ref(loss, fixture["out/loss_total"], name="loss under grad")
  leaves = jax.tree.leaves(grads)
  assert len(leaves) == len(jax.tree.leaves(nnx.state(model, nnx.Param)))
  assert all(np.isfinite(np.asarray(g)).all() and np.asarray(g).any() for g in leaves)


def test_ch16_parameter_counts_and_names():
  abstract = conv.build_abstract(SemVAEConfig.ch16())
  d, hid = 768, 3072
  block = 4 * d + (3 * d * d + 3 * d) + (d * d + d) + (d * hid + hid) + (hid * d + d)
  encoder = (768 * d + d) + 4 * block + 2 * d + (d * 32 + 32)
  decoder = (16 * d + d) + 4 * block + 2 * d + (d * 768 + 768)
  assert (encoder, decoder) == (28_968_224, 28_956_672)
  assert param_count(abstract.encoder) == encoder
  assert param_count(abstract.decoder) == decoder
  assert unnamed_params(abstract) == []


def test_torch_default_init():
  """PyTorch defaults: MHA in_proj xavier-uniform, zero in/out-proj biases, Linear U(±1/√fan_in)."""
  assert torch_default_init("qkv", 64) == (layers.xavier_uniform, layers.zeros)
  assert torch_default_init("proj", 64)[1] is layers.zeros
  kernel, bias = torch_default_init("fc2", 256)
  values = np.asarray(jnp.stack([kernel(jax.random.key(0), (512,)),
                                 bias(jax.random.key(1), (512,))]))
  assert np.abs(values).max() <= 1 / 16 and np.abs(values).max() > 0.9 / 16


def _weights(fixture):
  return {k: fixture[k] for k in fixture.files if k != "config" and "/" not in k}


def test_converter_errors_name_the_key(fixture):
  sd = _weights(fixture)
  missing = {k: v for k, v in sd.items() if k != "decoder.2.attn.in_proj_bias"}
  with pytest.raises(common.ConversionError, match=r"decoder\.2\.attn\.in_proj_bias"):
    conv.convert_state_dict(missing, TINY)
  bad = dict(sd, **{"encoder.4.weight": np.zeros((18, 64), np.float32)})
  with pytest.raises(common.ConversionError, match=r"encoder\.4\.weight.*\(18, 64\).*\(16, 64\)"):
    conv.convert_state_dict(bad, TINY)
  extra = dict(sd, **{"encoder.5.weight": np.zeros((3,), np.float32)})
  with pytest.raises(common.ConversionError, match=r"encoder\.5\.weight"):
    conv.convert_state_dict(extra, TINY)


def test_safetensors_and_cli_roundtrip(fixture, model, tmp_path):
  from safetensors.numpy import save_file  # pylint: disable=import-outside-toplevel
  src = tmp_path / "semvae.safetensors"
  save_file(_weights(fixture), str(src))
  dst = tmp_path / "converted"
  conv.main(["--src", str(src), "--dst", str(dst), "--preset", "tiny"])
  loaded = conv.load_semantic_vae(dst)
  assert loaded.config == TINY
  want = dict(nnx.to_flat_state(nnx.state(model, nnx.Param)))
  for name, value in nnx.to_flat_state(nnx.state(loaded, nnx.Param)):
    np.testing.assert_array_equal(np.asarray(value.get_value()),
                                  np.asarray(want[name].get_value()), err_msg=str(name))
