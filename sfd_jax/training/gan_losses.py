"""The texture VAE's LDM / VA-VAE training objective (``LPIPSWithDiscriminator``).

The reference is ``vavae/ldm/modules/losses/contperceptual.py`` (yuemingPAN/SFD and
hustvl/LightningDiT, with taming-transformers' LPIPS, PatchGAN, ``hinge_d_loss``,
``vanilla_d_loss`` and ``adopt_weight``); the numbers are pinned by reference outputs
(``tests/test_vae_gan.py``). Layouts are NHWC here. The formulas,
the config fields and the reference's details kept here (the never-trained ``logvar``,
the adaptive weight before ``disc_start``, Lightning's step counting) are in
docs/texture_vae.md, "The objective".

The adaptive weights need ∂nll/∂W, ∂g_loss/∂W, ∂nll/∂E and ∂vf_loss/∂E inside the step
(W, E: the decoder's and the encoder's last convolution kernels): ``generator_loss``
evaluates the loss terms once under ``jax.vjp`` and pulls each term's unit cotangent back
to the parameters, reading the two leaves; the weights are ``stop_gradient``-ed. The
LPIPS heads' dropout of the reference is off (evaluation mode, ``sfd_jax.models.lpips``).
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, Mapping, Sequence

import jax
import jax.numpy as jnp

D_WEIGHT_MAX = 1e4
VF_WEIGHT_MAX = 1e8
GRAD_EPS = 1e-4
STEP_COUNTERS = ("reference", "batch")


@dataclasses.dataclass(frozen=True)
class GANLossConfig:
  """Hyper-parameters of ``LPIPSWithDiscriminator`` plus the on/off switches.

  Defaults are the LDM f16d32 recipe (``vavae/configs/f16d32_ldm.yaml``); the VA-VAE
  recipe (``f16d32_vfdinov2.yaml``) adds ``use_vf``, ``vf_weight`` 0.1, ``adaptive_vf``,
  ``distmat_margin`` 0.25, ``cos_margin`` 0.5.

  Attributes:
    disc_start: first (reference) step with the adversarial terms on.
    kl_weight: weight of the batch-summed-then-averaged KL.
    logvar_init: the (never trained) output log-variance.
    perceptual_weight: LPIPS weight inside the reconstruction term (0 = no LPIPS).
    use_gan: whether there is a discriminator at all (False: no g_loss, no d-step).
    disc_weight: multiplier of the adaptive discriminator weight.
    disc_factor: the adversarial factor once ``disc_start`` is reached.
    disc_loss: "hinge" or "vanilla".
    use_vf: VF (vision-foundation alignment) loss on/off.
    vf_weight: multiplier of the adaptive VF weight (or the weight, without adaptive_vf).
    adaptive_vf: VF weight from the gradient-norm ratio at the encoder's last layer.
    distmat_margin, cos_margin, distmat_weight, cos_weight: the VF loss terms.
    step_counter: "reference" (batch b is step 2b for the generator, 2b + 1 for the
      discriminator: Lightning's optimizer-step count) or "batch" (both see b).
  """
  disc_start: int = 5001
  kl_weight: float = 1e-6
  logvar_init: float = 0.0
  perceptual_weight: float = 1.0
  use_gan: bool = True
  disc_weight: float = 0.5
  disc_factor: float = 1.0
  disc_loss: str = "hinge"
  use_vf: bool = False
  vf_weight: float = 0.1
  adaptive_vf: bool = True
  distmat_margin: float = 0.0
  cos_margin: float = 0.0
  distmat_weight: float = 1.0
  cos_weight: float = 1.0
  step_counter: str = "reference"

  def __post_init__(self):
    if self.disc_loss not in ("hinge", "vanilla"):
      raise ValueError(f"GANLossConfig.disc_loss must be 'hinge' or 'vanilla', got "
                       f"{self.disc_loss!r}")
    if self.step_counter not in STEP_COUNTERS:
      raise ValueError(f"GANLossConfig.step_counter must be one of {STEP_COUNTERS}, got "
                       f"{self.step_counter!r}")
    if self.perceptual_weight < 0:
      raise ValueError("GANLossConfig.perceptual_weight must be >= 0")

  @property
  def use_lpips(self) -> bool:
    return self.perceptual_weight > 0

  @classmethod
  def from_dict(cls, d: Mapping[str, Any]) -> "GANLossConfig":
    names = {f.name for f in dataclasses.fields(cls)}
    return cls(**{k: v for k, v in dict(d).items() if k in names})

  def reference_step(self, batch_index, optimizer_idx: int):
    """The ``global_step`` the reference's loss sees for batch ``batch_index``."""
    if self.step_counter == "batch":
      return batch_index
    return 2 * batch_index + optimizer_idx


# ----------------------------------------------------------------- small pieces


def adopt_weight(weight, global_step, threshold, value: float = 0.0):
  """taming's ``adopt_weight``: ``value`` while global_step < threshold, else weight."""
  return jnp.where(jnp.asarray(global_step) < threshold, jnp.float32(value),
                   jnp.float32(weight))


def hinge_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
  return 0.5 * (jnp.mean(jax.nn.relu(1.0 - logits_real))
                + jnp.mean(jax.nn.relu(1.0 + logits_fake)))


def vanilla_d_loss(logits_real: jax.Array, logits_fake: jax.Array) -> jax.Array:
  return 0.5 * (jnp.mean(jax.nn.softplus(-logits_real))
                + jnp.mean(jax.nn.softplus(logits_fake)))


D_LOSSES: Mapping[str, Callable[[jax.Array, jax.Array], jax.Array]] = {
    "hinge": hinge_d_loss, "vanilla": vanilla_d_loss}


def adaptive_weight(num_grad: jax.Array, den_grad: jax.Array, max_value: float,
                    scale: float) -> jax.Array:
  """clamp(‖num_grad‖ / (‖den_grad‖ + 1e-4), 0, max_value) · scale, without gradient."""
  num = jnp.sqrt(jnp.sum(jnp.square(num_grad.astype(jnp.float32))))
  den = jnp.sqrt(jnp.sum(jnp.square(den_grad.astype(jnp.float32))))
  w = jnp.clip(num / (den + GRAD_EPS), 0.0, max_value)
  return jax.lax.stop_gradient(w) * scale


def _unit(x: jax.Array, eps: float) -> jax.Array:
  """``F.normalize(x, dim=-1)``: x / max(‖x‖, eps)."""
  return x / jnp.maximum(jnp.sqrt(jnp.sum(jnp.square(x), axis=-1, keepdims=True)), eps)


def vf_terms(z: jax.Array, aux: jax.Array, *, distmat_margin: float, cos_margin: float
             ) -> dict[str, jax.Array]:
  """The VF loss terms of NHWC ``z`` (projected latent) and ``aux`` (foundation features).

  Returns the token Gram matrices ``z_cos_sim`` / ``aux_cos_sim`` [B, T, T] (T = h·w,
  row-major), the per-token cosine ``cos`` [B, h, w] and the two (unweighted) terms
  ``loss_distmat`` and ``loss_cos``.
  """
  if z.shape != aux.shape:
    raise ValueError(f"VF loss: projected latent {tuple(z.shape)} and foundation features "
                     f"{tuple(aux.shape)} differ in shape")
  b, h, w, c = z.shape
  zf = z.astype(jnp.float32).reshape(b, h * w, c)
  af = aux.astype(jnp.float32).reshape(b, h * w, c)
  zn, an = _unit(zf, 1e-12), _unit(af, 1e-12)
  hi = jax.lax.Precision.HIGHEST
  z_cos = jnp.einsum("bic,bjc->bij", zn, zn, precision=hi)
  a_cos = jnp.einsum("bic,bjc->bij", an, an, precision=hi)
  # F.cosine_similarity(aux, z, dim=1, eps=1e-8): each vector over max(‖·‖, eps)
  cos = jnp.sum(_unit(af, 1e-8) * _unit(zf, 1e-8), axis=-1).reshape(b, h, w)
  return {"z_cos_sim": z_cos, "aux_cos_sim": a_cos, "cos": cos,
          "loss_distmat": jnp.mean(jax.nn.relu(jnp.abs(z_cos - a_cos) - distmat_margin)),
          "loss_cos": jnp.mean(jax.nn.relu(1.0 - cos_margin - cos))}


def _leaf(tree: Any, path: Sequence[str]) -> jax.Array:
  for p in path:
    tree = tree[p]
  return tree


# -------------------------------------------------------------------- generator

# forward(params) -> {"recon": NHWC, "posterior": DiagonalGaussian, "z_vf": NHWC or absent}
Forward = Callable[[Any], Mapping[str, Any]]
# perceptual(x, y) -> [B] LPIPS distances
Perceptual = Callable[[jax.Array, jax.Array], jax.Array]
# discriminate(x) -> (logits, new discriminator statistics)
Discriminate = Callable[[jax.Array], tuple[jax.Array, Any]]


def generator_loss(forward: Forward, params: Any, images: jax.Array, *,
                   cfg: GANLossConfig, global_step, dec_last: Sequence[str],
                   enc_last: Sequence[str] | None = None,
                   perceptual: Perceptual | None = None,
                   discriminate: Discriminate | None = None,
                   aux_feature: jax.Array | None = None,
                   logvar: float | jax.Array | None = None,
                   return_grads: bool = False, param_grads: bool = False
                   ) -> tuple[jax.Array, dict[str, jax.Array], dict[str, Any]]:
  """The generator call (``optimizer_idx`` 0) of ``LPIPSWithDiscriminator``.

  Args:
    forward: the autoencoder as a function of ``params`` (encode, sample, decode, and
      with the VF loss the projected sample ``z_vf``).
    params: the autoencoder parameters (pure dict); the returned loss is differentiable
      with respect to them.
    images: NHWC targets in [-1, 1].
    cfg: hyper-parameters and switches.
    global_step: the reference step of this call (``cfg.reference_step(batch, 0)``).
    dec_last / enc_last: key paths of the decoder's / encoder's last convolution kernel
      inside ``params`` (the adaptive weights' W and E).
    perceptual: LPIPS (required when ``cfg.perceptual_weight`` > 0).
    discriminate: the discriminator in training mode (required with ``cfg.use_gan``).
    aux_feature: NHWC foundation-model features (required with ``cfg.use_vf``).
    logvar: the output log-variance (default ``cfg.logvar_init``).
    return_grads: also return the four gradients behind the adaptive weights.
    param_grads: also return ∂loss/∂params as ``extras["param_grads"]``: one more
      pullback of the same forward pass, with the adaptive weights as constants (what
      differentiating the returned loss gives, without a second forward).

  Returns:
    ``(loss, logs, extras)``: logs are the reference's ``train/*`` entries (total_loss,
    logvar, kl_loss, nll_loss, rec_loss, d_weight, disc_factor, g_loss, vf_loss,
    vf_weight; the GAN and VF ones only when on); extras hold ``recon``, ``posterior``,
    ``logits_fake`` and ``disc_stats`` (GAN), the VF terms, and the gradients.
  """
  if cfg.use_lpips and perceptual is None:
    raise ValueError("generator_loss: perceptual_weight > 0 needs an LPIPS network")
  if cfg.use_gan and discriminate is None:
    raise ValueError("generator_loss: use_gan needs the discriminator")
  if cfg.use_vf and aux_feature is None:
    raise ValueError("generator_loss: use_vf needs the foundation-model features")
  if cfg.use_vf and cfg.adaptive_vf and enc_last is None:
    raise ValueError("generator_loss: adaptive_vf needs the encoder's last layer (enc_last)")
  logvar = jnp.float32(cfg.logvar_init if logvar is None else logvar)
  x = images.astype(jnp.float32)

  def terms(p):
    out = forward(p)
    recon = out["recon"].astype(jnp.float32)
    posterior = out["posterior"]
    rec = jnp.abs(x - recon)
    extras: dict[str, Any] = {"recon": recon, "posterior": posterior}
    if cfg.use_lpips:
      p_loss = perceptual(x, recon).astype(jnp.float32)
      extras["p_loss"] = p_loss
      rec = rec + cfg.perceptual_weight * p_loss.reshape((-1,) + (1,) * (rec.ndim - 1))
    batch = rec.shape[0]
    vals = {"nll": jnp.sum(rec / jnp.exp(logvar) + logvar) / batch,
            "kl": jnp.sum(posterior.kl()) / batch}
    extras["rec_loss"] = jnp.mean(rec)
    if cfg.use_gan:
      logits, stats = discriminate(recon)
      extras["logits_fake"], extras["disc_stats"] = logits, stats
      vals["g"] = -jnp.mean(logits)
    if cfg.use_vf:
      t = vf_terms(out["z_vf"], aux_feature, distmat_margin=cfg.distmat_margin,
                   cos_margin=cfg.cos_margin)
      extras.update({f"vf_{k}": v for k, v in t.items()})
      vals["vf"] = cfg.distmat_weight * t["loss_distmat"] + cfg.cos_weight * t["loss_cos"]
    return vals, extras

  vals, pullback, extras = jax.vjp(terms, params, has_aux=True)

  def grad_of(name):
    ct = {k: (jnp.ones_like(v) if k == name else jnp.zeros_like(v)) for k, v in vals.items()}
    return pullback(ct)[0]

  grads: dict[str, jax.Array] = {}
  need_nll = (cfg.use_gan and cfg.disc_factor > 0) or (cfg.use_vf and cfg.adaptive_vf)
  nll_grads = grad_of("nll") if need_nll else None
  disc_factor = adopt_weight(cfg.disc_factor, global_step, cfg.disc_start)
  loss = vals["nll"] + cfg.kl_weight * vals["kl"]
  logs = {"logvar": logvar, "kl_loss": vals["kl"], "nll_loss": vals["nll"],
          "rec_loss": extras["rec_loss"]}
  if cfg.use_gan:
    if cfg.disc_factor > 0:
      grads["nll_grad_dec"] = _leaf(nll_grads, dec_last)
      grads["g_grad_dec"] = _leaf(grad_of("g"), dec_last)
      d_weight = adaptive_weight(grads["nll_grad_dec"], grads["g_grad_dec"], D_WEIGHT_MAX,
                                 cfg.disc_weight)
    else:
      d_weight = jnp.float32(0.0)
    loss = loss + d_weight * disc_factor * vals["g"]
    logs.update(d_weight=d_weight, disc_factor=disc_factor, g_loss=vals["g"])
  if cfg.use_vf:
    if cfg.adaptive_vf:
      grads["nll_grad_enc"] = _leaf(nll_grads, enc_last)
      grads["vf_grad_enc"] = _leaf(grad_of("vf"), enc_last)
      vf_weight = adaptive_weight(grads["nll_grad_enc"], grads["vf_grad_enc"], VF_WEIGHT_MAX,
                                  cfg.vf_weight)
    else:
      vf_weight = jnp.float32(cfg.vf_weight)
    loss = loss + vf_weight * vals["vf"]
    logs.update(vf_loss=vals["vf"], vf_weight=vf_weight)
  logs["total_loss"] = loss
  if param_grads:
    weights = {"nll": 1.0, "kl": cfg.kl_weight}
    if cfg.use_gan:
      weights["g"] = d_weight * disc_factor
    if cfg.use_vf:
      weights["vf"] = vf_weight
    ct = {k: jax.lax.stop_gradient(jnp.asarray(weights[k], v.dtype)) * jnp.ones_like(v)
          for k, v in vals.items()}
    extras["param_grads"] = pullback(ct)[0]
  if return_grads:
    extras["grads"] = jax.tree.map(jax.lax.stop_gradient, grads)
  return loss, logs, extras


# ---------------------------------------------------------------- discriminator


def discriminator_loss(logits_real: jax.Array, logits_fake: jax.Array, *,
                       cfg: GANLossConfig, global_step) -> tuple[jax.Array, dict[str, jax.Array]]:
  """The discriminator call (``optimizer_idx`` 1): ``disc_factor(step) · d_loss``.

  The logits come from two separate training-mode forwards (real, then reconstructed).
  Returns (d_loss, logs with disc_loss, logits_real and logits_fake means).
  """
  disc_factor = adopt_weight(cfg.disc_factor, global_step, cfg.disc_start)
  d_loss = disc_factor * D_LOSSES[cfg.disc_loss](logits_real.astype(jnp.float32),
                                                 logits_fake.astype(jnp.float32))
  return d_loss, {"disc_loss": d_loss, "logits_real": jnp.mean(logits_real),
                  "logits_fake": jnp.mean(logits_fake)}


__all__: Sequence[str] = ("GANLossConfig", "adopt_weight", "hinge_d_loss", "vanilla_d_loss",
                          "adaptive_weight", "vf_terms", "generator_loss",
                          "discriminator_loss")
