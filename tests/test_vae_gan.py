"""Parity of the texture VAE's GAN losses with ``parity/vae_gan_losses.npz`` (README §5.9).

LPIPS (random VGG16, the real lpips heads), the PatchGAN discriminator in training mode
(batch statistics, running-statistics updates) and evaluation mode, taming's d-losses,
the VF loss terms, and ``LPIPSWithDiscriminator``'s generator and discriminator calls
below and above ``disc_start`` with the adaptive weights, their gradients and the
clamp probes. Every output within 1e-4 of its own max |ref| (exact where the reference
is exactly 0 or clamped), in float32.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import sfd_jax  # noqa: F401  (flax settings)
from sfd_jax.convert import common
from sfd_jax.convert import discriminator as disc_convert
from sfd_jax.convert import lpips as lpips_convert
from sfd_jax.training import gan_losses
from sfd_jax.models import discriminator as disc_lib
from sfd_jax.models.distributions import DiagonalGaussian

TOL = 1e-4
ERRORS = {}   # output -> max err / max|ref| (printed by the summary test)


def nhwc(x):
  x = jnp.asarray(x)
  return jnp.transpose(x, (0, 2, 3, 1)) if x.ndim == 4 else x


def check(name, got, ref, exact=False):
  got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
  assert got.shape == ref.shape, (name, got.shape, ref.shape)
  scale = float(np.max(np.abs(ref)))
  err = float(np.max(np.abs(got - ref)))
  if exact or scale == 0.0:
    assert err == 0.0, f"{name}: expected exact, max err {err}"
    ERRORS[name] = 0.0
    return
  ERRORS[name] = err / scale
  if os.environ.get("GAN_PARITY_REPORT_ONLY"):
    print(f"{name}: {err / scale:.2e}")
    return
  assert err <= TOL * scale, f"{name}: max err {err:.3g} > {TOL} * {scale:.3g}"


@pytest.fixture(scope="module")
def fx(parity):
  z = parity("vae_gan_losses")
  return {k: z[k] for k in z.files}, json.loads(str(z["config"]))


@pytest.fixture(scope="module")
def nets(parity):
  parity("vae_gan_losses")  # skips when the fixture is missing
  from tests.conftest import parity_dir  # pylint: disable=import-outside-toplevel
  f = str(parity_dir() / "vae_gan_losses.npz")
  lp = lpips_convert.model_from_params(lpips_convert.convert_state_dict(
      common.load_state_dict(f, prefix="perceptual_loss."), name=f))
  d_params, d_stats = disc_convert.convert_state_dict(
      common.load_state_dict(f, prefix="discriminator."))
  apply, _, _ = disc_lib.functional(
      nnx.eval_shape(lambda: disc_lib.NLayerDiscriminator(rngs=nnx.Rngs(0))))
  ae = common.StateDict(common.load_state_dict(f, prefix="ae/"), name="ae")
  ae_params = {
      "encoder": {"conv_out": ae.conv("encoder.conv_out", 64, 64, 3, 3)},
      "quant_conv": ae.conv("quant_conv", 64, 64, 1, 1),
      "post_quant_conv": ae.conv("post_quant_conv", 32, 32, 1, 1),
      "decoder": {"conv_in": ae.conv("decoder.conv_in", 32, 16, 3, 3),
                  "conv_out": ae.conv("decoder.conv_out", 16, 3, 3, 3)},
      "linear_proj": ae.conv("linear_proj", 32, 1024, 1, 1, bias=False)}
  ae.check_all_used()
  return {"lpips": lp, "disc_apply": apply, "disc_params": d_params, "disc_stats": d_stats,
          "ae": jax.tree.map(jnp.asarray, ae_params)}


def _conv(x, p):
  y = jax.lax.conv_general_dilated(x, p["kernel"], (1, 1), "SAME",
                                   dimension_numbers=("NHWC", "HWIO", "NHWC"),
                                   precision=jax.lax.Precision.HIGHEST)
  return y + p["bias"] if "bias" in p else y


def _graph(fx_arrays, pin_recon=None):
  """The fixture's minimal autoencoder graph as ``forward(params)`` (README §5.9).

  ``pin_recon``: the reference's reconstruction. The output then takes exactly those
  values while its gradient still flows through the graph (``r + stop_gradient(ref −
  r)``). LPIPS' gradient is discontinuous (VGG ReLU and max-pool kinks): XLA's CPU
  convolution rounds differently with the test's 8 fake devices than with one, the
  reconstruction moves by 1.5e-6, one kink deep in the VGG flips and ∂nll/∂W moves by
  3e-3 of its max. At the reference's values every gradient matches to 4e-6.
  """
  h_enc, skip, eps = (nhwc(fx_arrays[k if k in fx_arrays else f"in/{k}"])
                      for k in ("h_enc", "h_dec_skip", "eps"))

  def forward(p):
    moments = _conv(_conv(h_enc, p["encoder"]["conv_out"]), p["quant_conv"])
    posterior = DiagonalGaussian.from_moments(moments, axis=-1)
    z = posterior.sample(eps=eps)
    d = _conv(_conv(z, p["post_quant_conv"]), p["decoder"]["conv_in"])
    up = jnp.repeat(jnp.repeat(d, 16, axis=1), 16, axis=2)
    recon = _conv(jax.nn.silu(up + skip), p["decoder"]["conv_out"])
    if pin_recon is not None:
      recon = recon + jax.lax.stop_gradient(pin_recon - recon)
    return {"recon": recon, "posterior": posterior, "moments": moments, "z": z,
            "z_vf": _conv(z, p["linear_proj"])}
  return forward


def test_lpips(fx, nets):
  a, _ = fx
  lp = nets["lpips"]
  x0, x1 = nhwc(a["in/inputs"]), nhwc(a["in/lpips_x1"])
  check("lpips/distance", lp(x0, x1).reshape(-1, 1, 1, 1), a["out/lpips/distance"])
  for k, t in enumerate(lp.stage_distances(x0, x1)):
    check(f"lpips/layer{k}", t.reshape(-1, 1, 1, 1), a[f"out/lpips/layer{k}"])
  for tag, x in (("x0", x0), ("x1", x1)):
    for k, f in enumerate(lp.features(x)):
      check(f"lpips/vgg{k}_chmean_{tag}", jnp.mean(f, axis=(1, 2)),
            a[f"out/lpips/vgg{k}_chmean_{tag}"])


def test_graph_and_vf_terms(fx, nets):
  a, cfg = fx
  out = _graph(a)(nets["ae"])
  post = out["posterior"]
  check("graph/moments", out["moments"], nhwc(a["out/graph/moments"]))
  check("graph/posterior_mean", post.mean, nhwc(a["out/graph/posterior_mean"]))
  check("graph/posterior_logvar", post.logvar, nhwc(a["out/graph/posterior_logvar"]))
  check("graph/z_sample", out["z"], nhwc(a["out/graph/z_sample"]))
  check("graph/kl", post.kl(), a["out/graph/kl"])
  check("graph/reconstructions", out["recon"], nhwc(a["out/graph/reconstructions"]))
  check("graph/z_vf", out["z_vf"], nhwc(a["out/graph/z_vf"]))
  check("graph/p_loss", nets["lpips"](nhwc(a["in/inputs"]), out["recon"]).reshape(-1, 1, 1, 1),
        a["out/graph/p_loss"])
  kw = cfg["loss_kwargs"]
  t = gan_losses.vf_terms(out["z_vf"], nhwc(a["in/aux_feature"]),
                          distmat_margin=kw["distmat_margin"], cos_margin=kw["cos_margin"])
  check("vf/z_cos_sim", t["z_cos_sim"], a["out/vf/z_cos_sim"])
  check("vf/aux_cos_sim", t["aux_cos_sim"], a["out/vf/aux_cos_sim"])
  check("vf/cos_aux_z", t["cos"], a["out/vf/cos_aux_z"])
  check("vf/loss_distmat", t["loss_distmat"], a["out/vf/loss_distmat"])
  check("vf/loss_cos", t["loss_cos"], a["out/vf/loss_cos"])


def test_discriminator_train_and_eval(fx, nets):
  a, _ = fx
  apply, params, stats = nets["disc_apply"], nets["disc_params"], nets["disc_stats"]
  recon = nhwc(a["out/graph/reconstructions"])
  conv_idx, norm_idx = disc_lib.DiscriminatorConfig().torch_index()
  del conv_idx
  logits_real, stats = apply(params, stats, nhwc(a["in/inputs"]))
  check("disc/logits_real_train", logits_real, nhwc(a["out/disc/logits_real_train"]))
  for tag, x in (("real", None), ("fake", recon)):
    if x is not None:
      logits_fake, stats = apply(params, stats, x)
      check("disc/logits_fake_train", logits_fake, nhwc(a["out/disc/logits_fake_train"]))
    for j, idx in enumerate(norm_idx):
      st = stats["norms"][j]
      check(f"disc/after_{tag}/main.{idx}.running_mean", st["mean"],
            a[f"out/disc/after_{tag}/main.{idx}.running_mean"])
      check(f"disc/after_{tag}/main.{idx}.running_var", st["var"],
            a[f"out/disc/after_{tag}/main.{idx}.running_var"])
      assert int(st["count"]) == (1 if tag == "real" else 2)
  check("disc/hinge_d_loss", gan_losses.hinge_d_loss(logits_real, logits_fake),
        a["out/disc/hinge_d_loss"])
  check("disc/vanilla_d_loss", gan_losses.vanilla_d_loss(logits_real, logits_fake),
        a["out/disc/vanilla_d_loss"])
  for tag, x in (("real", nhwc(a["in/inputs"])), ("fake", recon)):
    logits, _ = apply(params, stats, x, use_running_average=True)
    check(f"disc/logits_{tag}_eval", logits, nhwc(a[f"out/disc/logits_{tag}_eval"]))
  # the state dict round trip
  sd = disc_convert.to_state_dict(params, nets["disc_stats"])
  for k, v in sd.items():
    np.testing.assert_array_equal(v, a[f"discriminator.{k}"].astype(v.dtype))


def _loss_cfg(cfg):
  kw = dict(cfg["loss_kwargs"])
  return gan_losses.GANLossConfig.from_dict(dict(kw, use_vf=True, step_counter="batch"))


_GEN_FN = {}


def _gen_call(a, cfg, nets, step, logvar):
  """The generator call, jitted once with every array (and step, logvar) an argument.

  Also returns jax.grad of the returned loss (``auto_grads``), to check ``param_grads``.
  """
  apply = nets["disc_apply"]
  lp_graph, lp_state = nnx.split(nets["lpips"])
  inputs = {k: a[f"in/{k}"] for k in ("inputs", "h_enc", "h_dec_skip", "eps", "aux_feature")}
  inputs["recon"] = a["out/graph/reconstructions"]
  if "fn" not in _GEN_FN:
    @jax.jit
    def run(ae, lp_state, d_params, d_stats, inputs, step, logvar):
      def loss_of(p):
        return gan_losses.generator_loss(
            _graph(inputs, pin_recon=nhwc(inputs["recon"])), p, nhwc(inputs["inputs"]),
            cfg=_loss_cfg(cfg), global_step=step, dec_last=("decoder", "conv_out", "kernel"),
            enc_last=("encoder", "conv_out", "kernel"),
            perceptual=nnx.merge(lp_graph, lp_state),
            discriminate=lambda x: apply(d_params, d_stats, x),
            aux_feature=nhwc(inputs["aux_feature"]), logvar=logvar, return_grads=True,
            param_grads=True)
      loss, logs, extras = loss_of(ae)
      extras["auto_grads"] = jax.grad(lambda p: loss_of(p)[0])(ae)
      return loss, logs, extras
    _GEN_FN["fn"] = run
  return _GEN_FN["fn"](nets["ae"], lp_state, nets["disc_params"], nets["disc_stats"], inputs,
                       step, jnp.float32(logvar))


def _oihw(g):
  return np.transpose(np.asarray(g), (3, 2, 0, 1))


@pytest.mark.parametrize("name,opt_idx,step,logvar",
                         [("gen_step5000", 0, 5000, 0.0), ("gen_step5001", 0, 5001, 0.0),
                          ("gen_step5001_logvar", 0, 5001, 0.375),
                          ("disc_step5000", 1, 5000, 0.0), ("disc_step5001", 1, 5001, 0.0)])
def test_loss_calls(fx, nets, name, opt_idx, step, logvar):
  a, cfg = fx
  assert [name, opt_idx, step, logvar] in cfg["calls_list"]
  out = f"out/{name}"
  if opt_idx == 0:
    loss, logs, extras = _gen_call(a, cfg, nets, step, logvar)
    check(f"{name}/loss", loss, a[f"{out}/loss"])
    for k, v in logs.items():
      check(f"{name}/log/{k}", v, a[f"{out}/log/{k}"],
            exact=k in ("disc_factor", "logvar"))
    assert set(logs) == {k.rsplit("/", 1)[1] for k in a if k.startswith(f"{out}/log/")}
    check(f"{name}/logits_fake", extras["logits_fake"], nhwc(a[f"{out}/logits_fake"]))
    check(f"{name}/reconstructions", extras["recon"], nhwc(a["out/graph/reconstructions"]))
    for g, v in extras["grads"].items():
      check(f"{name}/{g}", _oihw(v), a[f"{out}/{g}"])
      check(f"{name}/{g}_norm", jnp.sqrt(jnp.sum(jnp.square(v))), a[f"{out}/{g}_norm"])
    return
  apply, params, stats = nets["disc_apply"], nets["disc_params"], nets["disc_stats"]
  lr, stats = apply(params, stats, nhwc(a["in/inputs"]))
  lf, _ = apply(params, stats, nhwc(a["out/graph/reconstructions"]))
  loss, logs = gan_losses.discriminator_loss(lr, lf, cfg=_loss_cfg(cfg), global_step=step)
  check(f"{name}/loss", loss, a[f"{out}/loss"])
  for k, v in logs.items():
    check(f"{name}/log/{k}", v, a[f"{out}/log/{k}"])
  check(f"{name}/logits_real", lr, nhwc(a[f"{out}/logits_real"]))
  check(f"{name}/logits_fake", lf, nhwc(a[f"{out}/logits_fake"]))


def test_probes(fx, nets):
  a, cfg = fx
  _, _, extras = _gen_call(a, cfg, nets, 5001, 0.0)
  g = extras["grads"]
  s = a["in/probe_scales"]
  aw = gan_losses.adaptive_weight
  kw = cfg["loss_kwargs"]
  check("probe/d_weight_zero_g",
        aw(g["nll_grad_dec"], 0.0 * g["g_grad_dec"], 1e4, kw["disc_weight"]),
        a["out/probe/d_weight_zero_g"], exact=True)
  check("probe/d_weight_scaled",
        aw(s[0] * g["nll_grad_dec"], s[1] * g["g_grad_dec"], 1e4, kw["disc_weight"]),
        a["out/probe/d_weight_scaled"])
  check("probe/vf_weight_zero_vf",
        aw(s[2] * g["nll_grad_enc"], 0.0 * g["vf_grad_enc"], 1e8, kw["vf_weight"]),
        a["out/probe/vf_weight_zero_vf"], exact=True)
  check("probe/vf_weight_scaled",
        aw(s[3] * g["nll_grad_enc"], s[4] * g["vf_grad_enc"], 1e8, kw["vf_weight"]),
        a["out/probe/vf_weight_scaled"])


def test_param_grads_equal_autodiff(fx, nets):
  """``param_grads`` (one more pullback of the shared forward) = jax.grad of the loss."""
  a, cfg = fx
  _, _, extras = _gen_call(a, cfg, nets, 5001, 0.375)
  for g, h in zip(jax.tree.leaves(extras["param_grads"]), jax.tree.leaves(extras["auto_grads"])):
    scale = float(jnp.max(jnp.abs(h)))
    assert float(jnp.max(jnp.abs(g - h))) <= 1e-5 * scale


def test_step_counter_and_switches():
  c = gan_losses.GANLossConfig()
  # batch b: generator sees 2b, discriminator 2b + 1 (Lightning's optimizer-step count)
  assert (c.reference_step(2500, 0), c.reference_step(2500, 1)) == (5000, 5001)
  assert float(gan_losses.adopt_weight(1.0, c.reference_step(2500, 1), c.disc_start)) == 1.0
  assert float(gan_losses.adopt_weight(1.0, c.reference_step(2500, 0), c.disc_start)) == 0.0
  with pytest.raises(ValueError, match="disc_loss"):
    gan_losses.GANLossConfig(disc_loss="wgan")
  with pytest.raises(ValueError, match="step_counter"):
    gan_losses.GANLossConfig(step_counter="epoch")


def test_zz_report():
  """Prints max err / max|ref| per output (run with -s to see it)."""
  for k in sorted(ERRORS):
    print(f"  {k:45s} {ERRORS[k]:.2e}")


def test_lpips_converter_cli_from_torchvision_and_lpips_files(parity, tmp_path):
  """--vgg (torchvision ``features.*``) + --lin (lpips ``lin*``) = the whole-module layout."""
  parity("vae_gan_losses")
  from tests.conftest import parity_dir  # pylint: disable=import-outside-toplevel
  f = str(parity_dir() / "vae_gan_losses.npz")
  sd = common.load_state_dict(f, prefix="perceptual_loss.")
  vgg = {f"features.{k.split('.')[2]}.{k.split('.')[3]}": v for k, v in sd.items()
         if k.startswith("net.")}
  vgg["classifier.0.weight"] = np.zeros((2, 2), np.float32)      # ignored
  lin = {k: v for k, v in sd.items() if k.startswith("lin")}
  np.savez(tmp_path / "vgg16.npz", **vgg)
  np.savez(tmp_path / "vgg_lin.npz", **lin)
  out = lpips_convert.main(["--vgg", str(tmp_path / "vgg16.npz"), "--lin",
                            str(tmp_path / "vgg_lin.npz"), "--dst", str(tmp_path / "lp")])
  flat = lambda t: {tuple(str(getattr(k, "key", k)) for k in path): np.asarray(v)  # noqa: E731
                    for path, v in jax.tree_util.tree_flatten_with_path(t)[0]}
  got = flat(nnx.to_pure_dict(nnx.state(lpips_convert.load_lpips(out), nnx.Param)))
  want = flat(lpips_convert.convert_state_dict(sd))
  assert got.keys() == want.keys()
  for k, v in want.items():
    np.testing.assert_array_equal(got[k], v)
  bad = dict(sd, **{"scaling_layer.shift": np.zeros((1, 3, 1, 1), np.float32)})
  with pytest.raises(common.ConversionError, match="scaling_layer.shift"):
    lpips_convert.convert_state_dict(bad)
