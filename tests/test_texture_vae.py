"""Texture VAE (LDM KL autoencoder): parity, converter, parameter count, loss, bf16."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

import sfd_jax  # noqa: F401
from sfd_jax.convert.common import ConversionError, load_params, load_state_dict
from sfd_jax.checkpoint.runs import load_texture_vae
from sfd_jax.convert.texture_vae import (convert_texture_vae, load_converted_texture_vae,
                                         main as convert_main)
from sfd_jax.training.vae_losses import texture_vae_loss
from sfd_jax.models.layers import param_count, unnamed_params
from sfd_jax.models.texture_vae import DiagonalGaussian, TextureVAEConfig, parameter_counts
from tests.conftest import parity_dir
from tests.util import assert_close_ref

FIXTURE = "texture_vae"
PARITY_OUTPUTS = ("encoder_out", "moments", "posterior_mean", "posterior_logvar",
                  "posterior_std", "kl", "posterior_sample", "decoded_from_mean",
                  "clamp_probe_logvar", "clamp_probe_kl")


def nchw(x):
  return np.asarray(x, np.float32).transpose(0, 3, 1, 2)


def nhwc(x):
  return jnp.asarray(np.asarray(x).transpose(0, 2, 3, 1))


@pytest.fixture(scope="module")
def ref(parity):
  return parity(FIXTURE)


@pytest.fixture(scope="module")
def fixture_path(ref):
  del ref  # requesting it skips the test when the fixture is absent
  return parity_dir() / f"{FIXTURE}.npz"


@pytest.fixture(scope="module")
def tiny_model(fixture_path):
  """The fixture's weights through load_state_dict → convert_texture_vae → assign."""
  return load_texture_vae(fixture_path, TextureVAEConfig.tiny())


def _outputs(model, ref, full=True):
  """Every fixture output (NHWC) plus the training forward, from one jitted call.

  ``full=False`` skips the extra decodes (cheaper to compile).
  """
  @nnx.jit
  def run(model, images, eps, probe):
    enc = model.encoder(images)
    moments = model.quant_conv(enc)
    post = DiagonalGaussian.from_moments(moments)
    probe_post = DiagonalGaussian.from_moments(probe)
    sample = post.sample(eps=eps)
    out = {
        "encoder_out": enc, "moments": moments, "posterior_mean": post.mean,
        "posterior_logvar": post.logvar, "posterior_std": post.std, "kl": post.kl(),
        "posterior_sample": sample, "decoded_from_mean": model.decode(post.mode()),
        "clamp_probe_logvar": probe_post.logvar, "clamp_probe_kl": probe_post.kl(),
    }
    if full:
      out["decoded_from_sample"] = model.decode(sample)
      out["call_with_eps"] = model(images, eps=eps)[0]
      out["call_mean"] = model(images, sample_posterior=False)[0]
    return out
  return jax.device_get(run(model, nhwc(ref["in/images"]), nhwc(ref["in/eps"]),
                            nhwc(ref["in/clamp_probe_moments"])))


@pytest.fixture(scope="module")
def f32_outputs(ref, tiny_model):
  return _outputs(tiny_model, ref)


def test_tiny_preset_is_fixture_config(ref):
  cfg = json.loads(str(ref["config"]))
  tiny = TextureVAEConfig.tiny()
  assert TextureVAEConfig.from_ldm(cfg["ddconfig"], cfg["embed_dim"]) == tiny
  assert tiny.num_res_blocks_dec == cfg["ddconfig"]["num_res_blocks"] + 1
  assert TextureVAEConfig.from_dict(json.loads(json.dumps(tiny.to_dict()))) == tiny


@pytest.mark.parametrize("name", PARITY_OUTPUTS)
def test_parity(ref, f32_outputs, name):
  out = f32_outputs[name]
  assert_close_ref(nchw(out) if out.ndim == 4 else out, ref[f"out/{name}"], 1e-4, name)


def test_parity_exercises_both_clamps(ref, f32_outputs):
  assert np.any(ref["out/posterior_logvar"] == -30.0)
  assert np.any(f32_outputs["posterior_logvar"] == -30.0)
  probe = f32_outputs["clamp_probe_logvar"]
  assert probe.min() == -30.0 and probe.max() == 20.0


def test_training_forward(ref, f32_outputs):
  """__call__ decodes the posterior sample, or the mean with sample_posterior=False."""
  np.testing.assert_array_equal(f32_outputs["call_with_eps"], f32_outputs["decoded_from_sample"])
  assert_close_ref(nchw(f32_outputs["call_mean"]), ref["out/decoded_from_mean"], 1e-4,
                   "call_mean")


def _analytic_counts(cfg: TextureVAEConfig) -> tuple[int, int]:
  """Encoder / decoder parameter counts of the LDM architecture, by hand."""
  def conv(i, o, k):
    return k * k * i * o + o

  def gn(c):
    return 2 * c

  def res(i, o):
    return gn(i) + conv(i, o, 3) + gn(o) + conv(o, o, 3) + (conv(i, o, 1) if i != o else 0)

  def attn(c):
    return gn(c) + 4 * conv(c, c, 1)

  widths = [cfg.ch * m for m in cfg.ch_mult]
  top = widths[-1]
  mid = 2 * res(top, top) + attn(top)
  enc, cin, r = conv(cfg.in_channels, cfg.ch, 3), cfg.ch, cfg.resolution
  for lvl, w in enumerate(widths):
    for b in range(cfg.num_res_blocks_enc):
      enc += res(cin if b == 0 else w, w) + (attn(w) if r in cfg.attn_resolutions else 0)
    cin = w
    if lvl < len(widths) - 1:
      enc += conv(w, w, 3)
      r //= 2
  enc += mid + gn(top) + conv(top, 2 * cfg.z_channels, 3)
  dec, cin, r = conv(cfg.z_channels, top, 3) + mid, top, cfg.latent_resolution
  for lvl in reversed(range(len(widths))):
    w = widths[lvl]
    for b in range(cfg.num_res_blocks_dec):
      dec += res(cin if b == 0 else w, w) + (attn(w) if r in cfg.attn_resolutions else 0)
    cin = w
    if lvl:
      dec += conv(w, w, 3)
      r *= 2
  dec += gn(cin) + conv(cin, cfg.out_channels, 3)
  return enc, dec


def test_param_count_f16d32():
  cfg = TextureVAEConfig.f16d32()
  counts = parameter_counts(cfg)  # nnx.eval_shape: nothing is allocated
  enc, dec = _analytic_counts(cfg)
  assert (counts["encoder"], counts["decoder"]) == (enc, dec) == (28_413_248, 41_417_603)
  assert counts["quant_conv"] == 64 * 64 + 64 and counts["post_quant_conv"] == 32 * 32 + 32
  assert abs(counts["encoder"] / 28.4e6 - 1) < 5e-3  # docs/method.md §4.2
  assert abs(counts["decoder"] / 41.4e6 - 1) < 5e-3


def test_tiny_model_params(fixture_path, tiny_model):
  sd = load_state_dict(fixture_path)
  assert param_count(tiny_model) == sum(v.size for v in sd.values())
  assert (param_count(tiny_model.encoder), param_count(tiny_model.decoder)) == (
      _analytic_counts(TextureVAEConfig.tiny()))
  assert unnamed_params(tiny_model) == []


def test_converter_errors(fixture_path):
  cfg = TextureVAEConfig.tiny()
  sd = load_state_dict(fixture_path)

  missing = dict(sd)
  del missing["decoder.up.2.attn.1.k.weight"]
  with pytest.raises(ConversionError, match=r"missing key 'decoder\.up\.2\.attn\.1\.k\.weight'"):
    convert_texture_vae(missing, cfg)

  wrong = dict(sd)
  wrong["encoder.down.1.block.0.nin_shortcut.weight"] = np.zeros((64, 32, 3, 3), np.float32)
  with pytest.raises(ConversionError) as err:
    convert_texture_vae(wrong, cfg, name="ckpt.npz")
  msg = str(err.value)
  assert msg.startswith("ckpt.npz:")
  assert "encoder.down.1.block.0.nin_shortcut.weight" in msg
  assert "(64, 32, 3, 3)" in msg and "(64, 32, 1, 1)" in msg

  extra = dict(sd, **{"encoder.down.0.attn.0.q.weight": np.zeros((32, 32, 1, 1), np.float32)})
  with pytest.raises(ConversionError, match=r"unexpected keys 'encoder\.down\.0\.attn\.0\.q"):
    convert_texture_vae(extra, cfg)

  # Training-only weights of a Lightning / VA-VAE checkpoint are ignored.
  ok = dict(sd, **{"loss.logvar": np.zeros((), np.float32),
                   "loss.discriminator.main.0.weight": np.zeros((64, 3, 4, 4), np.float32),
                   "foundation_model.blocks.0.attn.qkv.weight": np.zeros((6, 2), np.float32)})
  params = convert_texture_vae(ok, cfg)
  np.testing.assert_array_equal(params["quant_conv"]["kernel"],
                                sd["quant_conv.weight"].transpose(2, 3, 1, 0))
  np.testing.assert_array_equal(params["encoder"]["down"]["2"]["attn"]["0"]["norm"]["scale"],
                                sd["encoder.down.2.attn.0.norm.weight"])


def test_converter_architecture_mismatch(fixture_path):
  sd = load_state_dict(fixture_path)
  cfg = dataclasses.replace(TextureVAEConfig.tiny(), embed_dim=8)
  with pytest.raises(ConversionError, match=r"key 'post_quant_conv\.weight' has shape "
                                            r"\(4, 4, 1, 1\), expected \(4, 8, 1, 1\)"):
    convert_texture_vae(sd, cfg)


def test_cli_roundtrip(fixture_path, tiny_model, tmp_path):
  dst = tmp_path / "tvae"
  convert_main(["--src", str(fixture_path), "--dst", str(dst), "--preset", "tiny"])
  with pytest.raises(FileExistsError):
    convert_main(["--src", str(fixture_path), "--dst", str(dst), "--preset", "tiny"])
  _, meta = load_params(dst)
  assert meta["kind"] == "texture_vae" and meta["config"]["num_res_blocks_dec"] == 2
  model = load_converted_texture_vae(dst)
  assert model.config == TextureVAEConfig.tiny()
  got = nnx.to_flat_state(nnx.state(model, nnx.Param))
  want = dict(nnx.to_flat_state(nnx.state(tiny_model, nnx.Param)))
  assert len(got) == len(want)
  for path, var in got:
    np.testing.assert_array_equal(var.get_value(), want[path].get_value())


def test_bf16_compute_close_to_f32(ref, fixture_path, f32_outputs):
  """bf16 activations, float32 params: within 6e-2·max(1, max|f32|) of the float32 run.

  Measured on this fixture: posterior mean 1.8e-2, decoded image 4.0e-2 (bf16 keeps 8
  mantissa bits; the error accumulates over ~25 convolutions).
  """
  model = load_texture_vae(fixture_path, TextureVAEConfig.tiny(), dtype=jnp.bfloat16)
  assert model.encoder.conv_in.kernel.get_value().dtype == jnp.float32
  out = _outputs(model, ref, full=False)
  assert out["decoded_from_mean"].dtype == jnp.bfloat16
  assert out["posterior_mean"].dtype == jnp.float32  # the posterior is float32
  for name in ("posterior_mean", "posterior_sample", "decoded_from_mean"):
    assert_close_ref(out[name], f32_outputs[name], 6e-2, f"bf16 {name}")


# Random draws in these tests use the "unsafe_rbg" PRNG: XLA:CPU compiles it several
# seconds faster than threefry, and the code under test does not depend on the impl.
def _key(seed):
  return jax.random.key(seed, impl="unsafe_rbg")


def _images(seed=1):
  return jnp.asarray(np.tanh(np.random.default_rng(seed).normal(size=(2, 32, 32, 3))),
                     jnp.float32)


def test_posterior_sample_arguments():
  post = DiagonalGaussian.from_moments(jnp.zeros((1, 2, 2, 4)))
  with pytest.raises(ValueError, match="exactly one"):
    post.sample()
  with pytest.raises(ValueError, match="exactly one"):
    post.sample(_key(0), eps=jnp.zeros((1, 2, 2, 2)))
  with pytest.raises(ValueError, match="eps has shape"):
    post.sample(eps=jnp.zeros((1, 2, 2, 3)))
  assert post.sample(_key(0)).shape == (1, 2, 2, 2)


def test_adam_decreases_texture_vae_loss(tiny_model):
  model = nnx.clone(tiny_model)
  images, key = _images(), _key(2)
  opt = nnx.Optimizer(model, optax.adam(1e-3), wrt=nnx.Param)

  @nnx.jit
  def step(model, opt, images, key):
    grad_fn = nnx.value_and_grad(lambda m: texture_vae_loss(m, images, key), has_aux=True)
    (loss, metrics), grads = grad_fn(model)
    opt.update(model, grads)
    return loss, metrics

  losses = []
  for _ in range(5):
    loss, metrics = step(model, opt, images, key)
    losses.append(float(loss))
  assert np.isclose(float(metrics["loss"]),
                    float(metrics["loss_rec"]) + 1e-6 * float(metrics["kl"]), rtol=1e-6)
  assert all(b < a for a, b in zip(losses, losses[1:])), losses
  assert losses[-1] < 0.9 * losses[0], losses


class _StubVAE:
  """Stands in for TextureVAE in the loss: fixed reconstruction and posterior."""

  def __init__(self, recon, posterior):
    self.recon, self.posterior = recon, posterior

  def __call__(self, images, key):
    del images, key
    return self.recon, self.posterior


def test_texture_vae_loss_terms():
  images = _images(1)
  recon = _images(2)
  mean = jnp.asarray(np.random.default_rng(3).normal(size=(2, 2, 2, 4)), jnp.float32)
  post = DiagonalGaussian(mean=mean, logvar=jnp.full_like(mean, -1.0))
  stub = _StubVAE(recon, post)
  l1 = float(np.mean(np.abs(np.asarray(images) - np.asarray(recon))))
  kl = 0.5 * np.sum(np.asarray(mean) ** 2 + np.exp(-1.0) - 1.0 + 1.0, axis=(1, 2, 3))

  loss, met = texture_vae_loss(stub, images, _key(0), kl_weight=0.5)
  np.testing.assert_allclose(met["loss_rec"], l1, rtol=1e-6)
  np.testing.assert_allclose(met["kl"], kl.mean(), rtol=1e-6)
  np.testing.assert_allclose(loss, l1 + 0.5 * kl.mean(), rtol=1e-6)
  np.testing.assert_allclose(met["posterior_std_mean"], np.exp(-0.5), rtol=1e-6)

  loss, met = texture_vae_loss(stub, images, _key(0), kl_weight=0.5, pixel_reduction="sum",
                               extra_terms={"const": lambda x, r, p: jnp.float32(0.25)})
  np.testing.assert_allclose(met["loss_rec"], l1 * 32 * 32 * 3, rtol=1e-5)
  np.testing.assert_allclose(loss, l1 * 32 * 32 * 3 + 0.5 * kl.mean() + 0.25, rtol=1e-5)
  assert float(met["loss_const"]) == 0.25
  with pytest.raises(ValueError, match="pixel_reduction"):
    texture_vae_loss(stub, images, _key(0), pixel_reduction="max")
  with pytest.raises(ValueError, match="extra term 'bad'"):
    texture_vae_loss(stub, images, _key(0), extra_terms={"bad": lambda x, r, p: r})
