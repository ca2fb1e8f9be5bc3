"""LightningDiT (SFD variant) and the semantic-first objective against the reference."""
import dataclasses
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import sfd_jax  # noqa: F401
from sfd_jax.convert import lightning_dit as conv
from sfd_jax.convert.common import ConversionError, load_state_dict
from sfd_jax.diffusion import objective as obj
from sfd_jax.models import layers as L
from sfd_jax.models.lightning_dit import (DiTConfig, LightningDiT, param_count_table,
                                          rope_tables, sincos_pos_embed)
from tests.conftest import parity_dir
from tests.util import assert_close_ref


@nnx.jit(static_argnames=("return_repa", "return_intermediates"))
def fwd(model, x, t_tex, t_sem, y, return_repa=False, return_intermediates=False):
  return model(x, t_tex, t_sem, y, return_repa=return_repa,
               return_intermediates=return_intermediates)


def nchw(x):
  return np.asarray(x).transpose(0, 3, 1, 2)


def nhwc(x):
  return jnp.asarray(np.asarray(x).transpose(0, 2, 3, 1))


@pytest.fixture(scope="module")
def sfd(parity):
  z = parity("lightningdit_sfd")
  cfg = DiTConfig.from_reference_kwargs(json.loads(str(z["config"]))["model_kwargs"])
  return _load(parity, "lightningdit_sfd", cfg)


def _load(parity, name, cfg, prefix=""):
  parity(name)  # skips when the fixture is absent
  return conv.load_lightning_dit(str(parity_dir() / f"{name}.npz"), cfg, prefix=prefix)


def test_fixed_tables_match_reference_buffers(parity):
  z = parity("lightningdit_sfd")
  np.testing.assert_allclose(sincos_pos_embed(128, 8), z["pos_embed"][0], atol=1e-6)
  cos, sin = rope_tables(32, 8)
  np.testing.assert_allclose(cos, z["feat_rope.freqs_cos"], atol=1e-6)
  np.testing.assert_allclose(sin, z["feat_rope.freqs_sin"], atol=1e-6)


def test_sfd_forward_matches_reference(parity, sfd):
  z = parity("lightningdit_sfd")
  model = sfd
  v, inter = fwd(model, nhwc(z["in/x"]), z["in/t_tex"], z["in/t_sem"], z["in/y"],
                 return_intermediates=True)
  assert_close_ref(nchw(v), z["out/velocity_eval"], name="velocity_eval")
  for k in ("x_embed", "t_emb_sem", "t_emb_tex", "y_emb", "block0", "block1", "block2",
            "final_layer"):
    assert_close_ref(inter[k], z[f"out/inter/{k}"], name=k)
  v, proj = fwd(model, nhwc(z["in/x"]), z["in/t_tex"], z["in/t_sem"], z["in/y"],
                return_repa=True)
  assert_close_ref(nchw(v), z["out/velocity_train"], name="velocity_train")
  assert_close_ref(proj, z["out/repa_proj_train"], name="repa_proj_train")


def test_sync_forward_matches_reference(parity):
  z = parity("lightningdit_sync")
  cfg = DiTConfig.from_reference_kwargs(json.loads(str(z["config"]))["model_kwargs"])
  assert not cfg.semantic_first
  model = _load(parity, "lightningdit_sync", cfg)
  v, inter = fwd(model, nhwc(z["in/x"]), z["in/t"], None, z["in/y"],
                 return_intermediates=True)
  assert_close_ref(nchw(v), z["out/velocity_eval"], name="velocity_eval")
  for k in ("x_embed", "t_emb", "y_emb", "block0", "block1", "block2", "final_layer"):
    assert_close_ref(inter[k], z[f"out/inter/{k}"], name=k)


def test_transport_loss_terms_match_reference(parity, sfd):
  z = parity("transport_sfd")
  model = sfd
  x1, x0 = nhwc(z["in/x1"]), nhwc(z["in/x0"])
  feats = jnp.asarray(z["in/feature_dino"]).reshape(4, 768, -1).transpose(0, 2, 1)

  def apply_fn(xt, t_tex, t_sem, y, key):
    del key
    return fwd(model, xt, t_tex, t_sem, y, return_repa=True)

  for mode, weight, key in [("cos", 1.0, "cos_w1"), ("mse", 1.0, "mse_w1"),
                            ("cos_mse", 1.0, "cos_mse_w1"), ("cos_mse", 0.5, "cos_mse_w0p5")]:
    cfg = obj.ObjectiveConfig(repa_mode=mode, repa_weight=weight)
    total, m = obj.training_losses(apply_fn, x1, z["in/y"], jax.random.key(0), cfg,
                                   repa_target=feats, x0=x0, t=jnp.asarray(z["in/t"]))
    pe = m["per_example"]
    assert_close_ref(pe["repa"], z[f"out/repa_loss_{key}"], name=f"repa {key}")
  np.testing.assert_array_equal(np.asarray(pe["t_tex"]), z["out/t_tex"])
  np.testing.assert_array_equal(np.asarray(pe["t_sem"]), z["out/t_sem"])
  assert_close_ref(nchw(pe["xt"]), z["out/xt"], name="xt")
  assert_close_ref(nchw(pe["ut"]), z["out/ut"], name="ut")
  assert_close_ref(nchw(pe["pred"]), z["out/pred"], name="pred")
  assert_close_ref(pe["mse"], z["out/loss"], name="loss")
  assert_close_ref(pe["cos"], z["out/cos_loss"], name="cos_loss")
  expected_total = (z["out/loss"].mean() + z["out/cos_loss"].mean()
                    + z["out/repa_loss_cos_mse_w0p5"].mean())
  np.testing.assert_allclose(float(total), expected_total, rtol=1e-5)


def test_repa_independent_of_cosine_loss_and_reference_trap(sfd):
  model = sfd
  x1 = jax.random.normal(jax.random.key(1), (2, 8, 8, 48))
  feats = jax.random.normal(jax.random.key(2), (2, 64, 768))

  def apply_fn(xt, t_tex, t_sem, y, key):
    del key
    return fwd(model, xt, t_tex, t_sem, y, return_repa=True)

  base = dict(use_cosine_loss=False, repa_mode="cos")
  _, ours = obj.training_losses(apply_fn, x1, jnp.array([1, 2]), jax.random.key(0),
                                obj.ObjectiveConfig(**base), repa_target=feats)
  _, ref = obj.training_losses(apply_fn, x1, jnp.array([1, 2]), jax.random.key(0),
                               obj.ObjectiveConfig(**base, repa_requires_cosine=True),
                               repa_target=feats)
  assert "loss_repa" in ours and float(ours["loss_repa"]) > 0
  np.testing.assert_allclose(float(ours["loss"]), float(ours["loss_mse"] + ours["loss_repa"]),
                             rtol=1e-6)
  assert "loss_repa" not in ref
  np.testing.assert_allclose(float(ref["loss"]), float(ref["loss_mse"]), rtol=1e-6)


@pytest.mark.parametrize("delta_t", [0.0, 0.1, 0.3, 0.5, 1.0])
def test_semantic_first_clocks(delta_t):
  t = jnp.linspace(0, 1, 101)
  t_tex, t_sem = obj.semantic_first_times(t, delta_t)
  tau = np.asarray(t) * (1 + delta_t)
  np.testing.assert_allclose(t_sem, np.minimum(tau, 1), atol=1e-6)
  np.testing.assert_allclose(t_tex, np.maximum(tau - delta_t, 0), atol=1e-6)
  assert float(t_tex[0]) == 0 and float(t_tex[-1]) == pytest.approx(1, abs=1e-6)
  assert float(t_sem[-1]) == 1
  if delta_t == 0:
    np.testing.assert_array_equal(t_tex, t_sem)


def test_delta_t_validation():
  with pytest.raises(ValueError, match="delta_t"):
    obj.ObjectiveConfig(delta_t=1.5)
  with pytest.raises(ValueError, match="delta_t"):
    DiTConfig(delta_t=-0.1)
  with pytest.raises(ValueError, match="unknown LightningDiT variant"):
    DiTConfig.variant("XXXL")


def test_logit_normal_times():
  t = obj.sample_times(jax.random.key(0), 20000, obj.ObjectiveConfig())
  logit = np.log(np.asarray(t) / (1 - np.asarray(t)))
  assert abs(logit.mean()) < 0.03 and abs(logit.std() - 1) < 0.03
  # P(t_tex clamped) = P(t < 0.3/1.3) ≈ 11.4% (docs/method.md §6.3)
  assert abs(np.mean(np.asarray(t) < 0.3 / 1.3) - 0.114) < 0.01


# Reference counts (docs/method.md §5.1): (params excluding REPA projector, projector).
EXPECTED = {"S": (32.8e6, 6.6e6), "B": (130.1e6, 7.3e6), "L": (457.4e6, 7.9e6),
            "XL": (674.3e6, 8.1e6), "XXL": (1027.9e6, 8.9e6), "1p6B": (1629.8e6, 9.4e6)}


def test_parameter_counts_match_reference():
  without = param_count_table(include_repa=False)
  with_repa = param_count_table(include_repa=True)
  for name, (n, proj) in EXPECTED.items():
    assert abs(without[name] - n) / n < 1e-3, (name, without[name], n)
    assert abs((with_repa[name] - without[name]) - proj) / proj < 1e-2, name


def _tiny(**kw):
  base = dict(input_size=4, hidden_size=64, depth=3, num_heads=4, repa_depth=2,
              repa_projector_dim=32, repa_dim=16)
  base.update(kw)
  return DiTConfig(**base)


def _random_model(cfg, seed=0):
  model = LightningDiT(cfg, rngs=nnx.Rngs(seed))
  # Give the zero-initialised layers values so every path is exercised.
  state = nnx.state(model, nnx.Param)
  leaves, tree = jax.tree.flatten(state)
  keys = jax.random.split(jax.random.key(seed + 1), len(leaves))
  leaves = [l + 0.05 * jax.random.normal(k, l.shape) for l, k in zip(leaves, keys)]
  nnx.update(model, jax.tree.unflatten(tree, leaves))
  return model


def _inputs(cfg, n=2):
  x = jax.random.normal(jax.random.key(3), (n, cfg.input_size, cfg.input_size, 48))
  return x, jnp.array([0.1, 0.7])[:n], jnp.array([0.4, 1.0])[:n], jnp.array([5, 1000])[:n]


def test_scan_matches_unrolled():
  cfg = _tiny()
  model = _random_model(cfg)
  x, tt, ts, y = _inputs(cfg)
  v_ref, p_ref = fwd(model, x, tt, ts, y, return_repa=True)
  scanned = LightningDiT(dataclasses.replace(cfg, scan_blocks=True, remat_policy="full"),
                         rngs=nnx.Rngs(9))
  nnx.update(scanned, nnx.state(model, nnx.Param))
  v, p = fwd(scanned, x, tt, ts, y, return_repa=True)
  np.testing.assert_allclose(v, v_ref, atol=1e-5)
  np.testing.assert_allclose(p, p_ref, atol=1e-5)

  # Gradients agree too (remat only changes what is stored).
  def loss(m):
    return jnp.sum(m(x, tt, ts, y) ** 2)

  grad = nnx.jit(nnx.grad(loss))
  for a, b in zip(jax.tree.leaves(grad(model)), jax.tree.leaves(grad(scanned))):
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=1e-4)


def test_bf16_compute_close_to_f32():
  cfg = _tiny()
  model = _random_model(cfg)
  x, tt, ts, y = _inputs(cfg)
  v32 = fwd(model, x, tt, ts, y)
  bf = LightningDiT(dataclasses.replace(cfg, dtype="bfloat16"), rngs=nnx.Rngs(0))
  nnx.update(bf, nnx.state(model, nnx.Param))
  v16 = fwd(bf, x, tt, ts, y)
  assert v16.dtype == jnp.float32
  assert jax.tree.leaves(nnx.state(bf, nnx.Param))[0].dtype == jnp.float32
  rel = float(jnp.max(jnp.abs(v16 - v32)) / jnp.max(jnp.abs(v32)))
  assert rel < 3e-2, rel  # stated tolerance: 3% of max|v| for bf16 matmuls


def test_every_weight_has_logical_axes():
  for cfg in (_tiny(), _tiny(delta_t=0.0)):
    model = nnx.eval_shape(lambda c=cfg: LightningDiT(c, rngs=nnx.Rngs(0)))
    assert L.unnamed_params(model) == []
  state = nnx.state(nnx.eval_shape(lambda: LightningDiT(_tiny(), rngs=nnx.Rngs(0))))
  specs = nnx.get_partition_spec(state)
  assert tuple(specs["blocks"]["attn"]["qkv"]["kernel"].get_value()) == ("layers", "embed", "qkv")


def test_label_dropout_rate():
  cfg = _tiny()
  model = _random_model(cfg)
  y = jnp.arange(4000) % 1000
  embed = nnx.jit(lambda m, y, k: m.embed_condition(jnp.zeros(4000), jnp.zeros(4000), y, k)[0])
  c_drop = embed(model, y, jax.random.key(0))
  c_null = embed(model, jnp.full(4000, 1000), None)
  dropped = np.all(np.isclose(c_drop, c_null), axis=1)
  assert 0.08 < dropped.mean() < 0.12


def test_converter_errors_name_the_key(parity):
  path = parity_dir() / "lightningdit_sfd.npz"
  z = parity("lightningdit_sfd")
  cfg = DiTConfig.from_reference_kwargs(json.loads(str(z["config"]))["model_kwargs"])
  sd = load_state_dict(path)
  bad = dict(sd)
  del bad["blocks.1.attn.qkv.weight"]
  with pytest.raises(ConversionError, match=r"missing key 'blocks.1.attn.qkv.weight'"):
    conv.convert_lightning_dit(bad, cfg)
  bad = dict(sd)
  bad["blocks.0.mlp.w3.weight"] = np.zeros((128, 340), np.float32)
  with pytest.raises(ConversionError, match=r"'blocks.0.mlp.w3.weight' has shape \(128, 340\), "
                     r"expected \(128, 341\)"):
    conv.convert_lightning_dit(bad, cfg)
  bad = dict(sd, **{"blocks.0.extra.weight": np.zeros(3, np.float32)})
  with pytest.raises(ConversionError, match="unexpected keys 'blocks.0.extra.weight'"):
    conv.convert_lightning_dit(bad, cfg)
  with pytest.raises(ConversionError, match="two timestep embedders"):
    conv.convert_lightning_dit(sd, dataclasses.replace(cfg, delta_t=0.0))
  with pytest.raises(ConversionError, match="more than depth"):
    conv.convert_lightning_dit(sd, dataclasses.replace(cfg, depth=2))
  with pytest.raises(ConversionError, match="pos_embed"):
    conv.convert_lightning_dit(sd, dataclasses.replace(cfg, input_size=16))


def test_convert_command_round_trip(parity, tmp_path, sfd):
  z = parity("lightningdit_sfd")
  kw = json.loads(str(z["config"]))["model_kwargs"]
  cfg = DiTConfig.from_reference_kwargs(kw)
  overrides = {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg)
               if f.name not in ("depth", "hidden_size", "num_heads")}
  dst = tmp_path / "ckpt"
  # --variant B, then overridden to the fixture's tiny sizes through --config-json.
  argv = ["--src", str(parity_dir() / "lightningdit_sfd.npz"), "--dst", str(dst),
          "--variant", "B", "--config-json",
          json.dumps({**overrides, "depth": 3, "hidden_size": 128, "num_heads": 4})]
  assert conv.main(argv) == 0
  with pytest.raises(FileExistsError):
    conv.main(argv)
  loaded = conv.load_converted(dst)
  v = fwd(loaded, nhwc(z["in/x"]), z["in/t_tex"], z["in/t_sem"], z["in/y"])
  assert_close_ref(nchw(v), z["out/velocity_eval"], name="velocity after round trip")
