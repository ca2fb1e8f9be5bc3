"""LightningDiT with the SFD architecture switches off (QK-norm, SwiGLU, RoPE, RMSNorm,
adaLN shift) against the reference module (``fixtures/lightningdit_variants.npz``, made
by ``fixtures/make_lightningdit_variants.py`` from hustvl/LightningDiT), the texture-only
(32-channel, Δt = 0) baseline through the converter and the sampling job, and the
converter's reference field names."""
import dataclasses
import json
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import sfd_jax  # noqa: F401
from sfd_jax.checkpoint import export
from sfd_jax.convert import lightning_dit as dit_conv
from sfd_jax.convert.common import ConversionError
from sfd_jax.diffusion import generation, samplers
from sfd_jax.jobs import sample
from sfd_jax.models.lightning_dit import DiTConfig, LightningDiT
from tests import torch_format as tf
from tests.conftest import REPO
from tests.util import assert_close_ref

sys.path.insert(0, str(REPO))
from configs import tiny as tiny_config  # noqa: E402  pylint: disable=wrong-import-position

FIXTURE = REPO / "tests" / "fixtures" / "lightningdit_variants.npz"
VARIANTS = ("released", "all_off", "layernorm_qk", "rms_qk_gelu")


@pytest.fixture(scope="module")
def ref():
  return np.load(FIXTURE)


def _variant(ref, name):
  kwargs = json.loads(str(ref[f"{name}/kwargs"]))
  prefix = f"{name}/sd/"
  sd = {k[len(prefix):]: ref[k] for k in ref.files if k.startswith(prefix)}
  return DiTConfig.from_reference_kwargs(kwargs), sd


@pytest.mark.parametrize("name", VARIANTS)
def test_switched_off_architectures_match_the_reference(ref, name):
  cfg, sd = _variant(ref, name)
  flags = json.loads(str(ref[f"{name}/kwargs"]))
  for flag in ("use_qknorm", "use_swiglu", "use_rope", "use_rmsnorm"):
    assert getattr(cfg, flag) == flags[flag]
  assert cfg.delta_t == 0 and not cfg.semantic_first and not cfg.use_repa
  model = dit_conv.load_lightning_dit(sd, cfg)
  x = jnp.asarray(ref[f"{name}/x"].transpose(0, 2, 3, 1))
  t = jnp.asarray(ref[f"{name}/t"])
  v = model(x, t, t, jnp.asarray(ref[f"{name}/y"]))
  assert_close_ref(np.asarray(v), ref[f"{name}/v"].transpose(0, 2, 3, 1), tol=1e-5, name=name)
  # Export writes the reference's state dict back, key for key.
  params = jax.device_get(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  back = export.to_reference_state_dict(params, cfg)
  assert set(back) == set(sd), set(back) ^ set(sd)
  for k in sd:
    np.testing.assert_allclose(back[k], sd[k], rtol=0, atol=1e-6, err_msg=k)


def test_wrong_switch_is_a_conversion_error(ref):
  cfg, sd = _variant(ref, "all_off")
  with pytest.raises(ConversionError, match=r"missing key 'blocks.0.mlp.w12.weight'"):
    dit_conv.convert_lightning_dit(sd, dataclasses.replace(cfg, use_swiglu=True))
  cfg, sd = _variant(ref, "released")
  with pytest.raises(ConversionError, match=r"RoPE tables .* use_rope=False"):
    dit_conv.convert_lightning_dit(sd, dataclasses.replace(cfg, use_rope=False))


TEXTURE_ONLY = {"input_size": 4, "in_chans": 32, "hidden_size": 32, "depth": 2,
                "num_heads": 2, "num_classes": 10, "use_qknorm": False, "use_swiglu": True,
                "use_rope": True, "use_rmsnorm": True}


def test_texture_only_baseline_converts_and_samples(tmp_path):
  """A LightningDiT checkpoint saved as its train.py does (random weights, an
  OmegaConf-like config) → converter CLI with the reference's field names → sampling."""
  cfg = dit_conv.config_from_fields(TEXTURE_ONLY, "custom")
  assert (cfg.in_channels, cfg.semantic_chans, cfg.delta_t) == (32, 0, 0.0)
  assert not cfg.use_qknorm and cfg.use_swiglu
  model = LightningDiT(cfg, rngs=nnx.Rngs(0))
  params = jax.device_get(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
  leaves, tree = jax.tree.flatten(params)
  rng = np.random.default_rng(0)
  params = jax.tree.unflatten(tree, [np.asarray(l) + 0.1 * rng.standard_normal(l.shape)
                                     .astype(np.float32) for l in leaves])
  sd = export.to_reference_state_dict(params, cfg)
  assert "blocks.0.attn.q_norm.weight" not in sd and "t_embedder.mlp.0.weight" in sd
  src = tf.save({"model": tf.tensors(sd), "ema": tf.tensors(sd),
                 "config": tf.omegaconf_like({"model": {"model_type": "LightningDiT-XL/1",
                                                        **TEXTURE_ONLY}})},
                tmp_path / "0064000.pt")
  dit_conv.main(["--src", src, "--dst", str(tmp_path / "conv"), "--variant", "custom",
                 "--config-json", json.dumps(TEXTURE_ONLY)])
  conv = dit_conv.load_converted(str(tmp_path / "conv"))
  assert conv.cfg == cfg
  for a, b in zip(jax.tree.leaves(nnx.to_pure_dict(nnx.state(conv, nnx.Param))),
                  jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), b)

  # Sampling job (latents out) == the direct sampler call; Δt = 0 from the model.
  c = tiny_config.get_config()
  c.model.num_classes = 10
  c.sample.update(checkpoint=str(tmp_path / "conv"), texture_vae="", num_images=4,
                  batch_size=4, num_steps=5, guidance="cfg", scale=1.5)
  out = sample.run(c, str(tmp_path / "wd"), devices=jax.devices()[:1])
  got = np.stack([np.load(tmp_path / "wd" / "samples" / f"{i:06d}.npy") for i in range(4)])
  assert got.shape == (4, 4, 4, 32)
  from sfd_jax.diffusion import guidance
  g, p = nnx.split(conv)

  def direct(p, idx, y):
    fn = guidance.make_guided_velocity(nnx.merge(g, p), mode="cfg", scale=1.5)
    return samplers.sample(fn, generation.noise_for(idx, 0, (4, 4, 32)), y, method="euler",
                           num_steps=5, delta_t=0.0, semantic_chans=0).x
  from sfd_jax.core import jit as jit_lib   # the job's XLA options (CPU: Eigen dots)
  want = jax.jit(direct, compiler_options=dict(jit_lib.inference_options()) or None)(
      p, jnp.arange(4, dtype=jnp.int32), jnp.asarray(np.load(out["labels"])))
  np.testing.assert_array_equal(got, np.asarray(want))
  assert np.isfinite(got).all() and got.std() > 0


def test_reference_names_in_config_json(tmp_path):
  yaml_like = {"model": {"model_type": "LightningDiT-XL/1", "in_chans": 32,
                         "use_qknorm": False, "use_swiglu": True, "use_rope": True,
                         "use_rmsnorm": True, "wo_shift": False},
               "data": {"image_size": 256, "num_classes": 1000}}
  cfg = dit_conv.config_from_fields(yaml_like)
  assert (cfg.depth, cfg.hidden_size, cfg.num_heads, cfg.patch_size) == (28, 1152, 16, 1)
  assert (cfg.in_channels, cfg.input_size, cfg.delta_t, cfg.use_qknorm) == (32, 16, 0.0, False)
  # SFD's own model section (the released SFD-XL config).
  sfd = dit_conv.config_from_fields({"model": {
      "model_type": "LightningDiT-XL/1", "in_chans": 48, "use_qknorm": True,
      "use_swiglu": True, "use_rope": True, "use_rmsnorm": True, "use_repa": True,
      "repa_feat_depth": 2, "semantic_chans": 16, "semfirst_delta_t": 0.3}})
  assert sfd == DiTConfig.variant("XL")
  # Constructor arguments: flags absent = off (the constructor's defaults); sizes from
  # the variant.
  kw = dit_conv.config_from_fields({"in_channels": 48, "semantic_chans": 16,
                                    "semfirst_delta_t": 0.3, "use_swiglu": True}, "B")
  assert (kw.depth, kw.hidden_size, kw.delta_t, kw.use_swiglu, kw.use_rope) == \
      (12, 768, 0.3, True, False)
  # sfd_jax names keep their meaning (variant + overrides, SFD flags on).
  same = dit_conv.config_from_fields({"input_size": 8}, "B")
  assert same == DiTConfig.variant("B", input_size=8)
  path = tmp_path / "c.json"
  path.write_text(json.dumps(yaml_like))
  assert dit_conv.read_config_json(str(path)) == yaml_like
  with pytest.raises(ValueError, match=r"unknown reference LightningDiT arguments \['dtype'\]"):
    dit_conv.config_from_fields({"in_chans": 32, "dtype": "bfloat16"}, "B")


def test_architecture_from_the_checkpoint_config(tmp_path):
  src = tf.save({"ema": {"pos_embed": tf.Tensor(np.zeros((1, 4), np.float32))},
                 "config": tf.omegaconf_like({"model": {"model_type": "LightningDiT-B/1",
                                                        "in_chans": 32,
                                                        "use_qknorm": False}})},
                tmp_path / "x.pt")
  cfg = dit_conv.config_from_checkpoint(src)
  assert (cfg.depth, cfg.in_channels, cfg.use_qknorm, cfg.use_swiglu) == (12, 32, False, False)
  bare = tf.save({"ema": {}}, tmp_path / "bare.pt")
  with pytest.raises(ConversionError, match="has no reference training config"):
    dit_conv.config_from_checkpoint(bare)
