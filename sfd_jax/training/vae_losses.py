"""Training losses of the two autoencoders that produce SFD's latents (trained by
``sfd_jax.training.vae``; the texture VAE's GAN recipe is ``training.gan_losses``).

Texture VAE (docs/method.md §4.3): SFD itself loads the released f16d32 weights; this loss exists
for fine-tuning or retraining the autoencoder::

  loss = L1(images, recon) + kl_weight · mean_batch(KL(q(z|x) ‖ N(0, I)))
         + Σ_name extra_terms[name](images, recon, posterior)

* ``pixel_reduction="mean"`` (default) averages |x − x̂| over every pixel and channel.
  ``"sum"`` sums it per image and averages over the batch, which is the scale of the LDM
  recipe (with its learned log-variance at its initial value 0): there the KL weight 1e-6
  is relative to a per-image pixel *sum*, so with ``"mean"`` the same ``kl_weight`` puts
  H·W·C times (196,608× at 256² RGB) more relative weight on the KL.
* ``extra_terms`` adds further terms: each is a callable
  ``term(images, recon, posterior) -> scalar`` returning its already-weighted
  contribution; it is added to the loss and reported as ``metrics["loss_<name>"]``.
  A term that needs parameters closes over them.

Semantic VAE (docs/method.md §3.4)::

  total = w_mse·MSE + w_l1·L1 + w_cos·(1 − mean cos) + w_kl·mean(KL)

with the weights of ``semvae_train/ch16.yaml`` as defaults (1, 0, 1, 1e-7). Reference
trap (docs/method.md §12.14): the reference calls ``F.cosine_similarity(recon, features)`` on
[B, L, C] tensors with PyTorch's default ``dim=1``, which is the **token** axis: one
cosine per (sample, feature channel) over the L tokens, not the per-token cosine over the
C feature channels that its evaluation code reports. The released SemVAE was trained with
the token-axis version, so that is the default here (``cos_axis="token"``);
``cos_axis="channel"`` gives the per-token cosine over channels (the evaluation metric,
and the natural choice for a new model).
"""
from __future__ import annotations

from typing import Callable, Mapping

import jax
import jax.numpy as jnp

from sfd_jax.models.distributions import DiagonalGaussian
from sfd_jax.models.texture_vae import TextureVAE

GeneratorLossTerm = Callable[[jax.Array, jax.Array, DiagonalGaussian], jax.Array]


def texture_vae_loss(model: TextureVAE, images: jax.Array, key: jax.Array,
                     kl_weight: float = 1e-6, *, pixel_reduction: str = "mean",
                     extra_terms: Mapping[str, GeneratorLossTerm] | None = None,
                     ) -> tuple[jax.Array, dict[str, jax.Array]]:
  """Reconstruction + KL loss of the texture VAE on one batch.

  Args:
    model: the autoencoder (its forward encodes, samples the posterior and decodes).
    images: NHWC images in [-1, 1].
    key: PRNG key for the posterior sample.
    kl_weight: weight of the batch-mean KL (LDM: 1e-6).
    pixel_reduction: ``"mean"`` (L1 averaged over all pixels) or ``"sum"`` (summed per
      image, averaged over the batch: the LDM scale). See the module docstring.
    extra_terms: optional ``{name: term}`` generator-loss terms (perceptual, adversarial),
      each ``term(images, recon, posterior) -> weighted scalar``.

  Returns:
    (loss, metrics) with metrics ``loss``, ``loss_rec`` (unweighted L1), ``kl`` (batch
    mean, unweighted), ``loss_kl`` (weighted), ``posterior_std_mean`` and one
    ``loss_<name>`` per extra term. All float32 scalars.
  """
  if pixel_reduction not in ("mean", "sum"):
    raise ValueError(f"texture_vae_loss: pixel_reduction must be 'mean' or 'sum', "
                     f"got {pixel_reduction!r}")
  recon, posterior = model(images, key)
  recon = recon.astype(jnp.float32)
  target = images.astype(jnp.float32)
  abs_err = jnp.abs(target - recon)
  if pixel_reduction == "mean":
    loss_rec = jnp.mean(abs_err)
  else:
    loss_rec = jnp.mean(jnp.sum(abs_err, axis=tuple(range(1, abs_err.ndim))))
  kl = jnp.mean(posterior.kl())
  loss_kl = kl_weight * kl
  loss = loss_rec + loss_kl
  metrics = {"loss_rec": loss_rec, "kl": kl, "loss_kl": loss_kl,
             "posterior_std_mean": jnp.mean(posterior.std)}
  for name, term in (extra_terms or {}).items():
    value = jnp.asarray(term(target, recon, posterior), jnp.float32)
    if value.ndim:
      raise ValueError(f"texture_vae_loss: extra term '{name}' returned shape "
                       f"{tuple(value.shape)}, expected a scalar")
    metrics[f"loss_{name}"] = value
    loss = loss + value
  metrics["loss"] = loss
  return loss, metrics


_COS_AXES = {"token": 1, "channel": -1}


def cosine_similarity(a: jax.Array, b: jax.Array, axis: int, eps: float = 1e-8) -> jax.Array:
  """``torch.nn.functional.cosine_similarity``: each vector divided by max(‖v‖, eps)."""
  na = jnp.maximum(jnp.linalg.norm(a, axis=axis, keepdims=True), eps)
  nb = jnp.maximum(jnp.linalg.norm(b, axis=axis, keepdims=True), eps)
  return jnp.sum((a / na) * (b / nb), axis=axis)


def semvae_loss(recon: jax.Array, features: jax.Array, kl: jax.Array, *,
                mse_weight: float = 1.0, l1_weight: float = 0.0, cos_weight: float = 1.0,
                kl_weight: float = 1e-7,
                cos_axis: str = "token") -> tuple[jax.Array, dict[str, jax.Array]]:
  """SemVAE loss on [B, L, C] reconstructions and target features, per-sample ``kl`` [B].

  Args:
    cos_axis: "token" (the reference: cosine along axis 1, the L tokens) or "channel"
      (per-token cosine over the C feature channels).

  Returns:
    (total, terms) with terms ``mse``, ``l1``, ``cos`` (= 1 − mean cosine), ``cos_sim``
    (the mean cosine), ``kl`` (batch mean) and ``total``. Computed in float32.
  """
  if cos_axis not in _COS_AXES:
    raise ValueError(f"semvae_loss: cos_axis must be one of {sorted(_COS_AXES)}, "
                     f"got '{cos_axis}'")
  if recon.shape != features.shape or recon.ndim != 3:
    raise ValueError(f"semvae_loss: recon {recon.shape} and features {features.shape} "
                     "must both be [B, L, C]")
  recon = recon.astype(jnp.float32)
  features = features.astype(jnp.float32)
  diff = recon - features
  mse = jnp.mean(jnp.square(diff))
  l1 = jnp.mean(jnp.abs(diff))
  cos_sim = jnp.mean(cosine_similarity(recon, features, axis=_COS_AXES[cos_axis]))
  cos = 1.0 - cos_sim
  kl_mean = jnp.mean(kl.astype(jnp.float32))
  total = mse_weight * mse + l1_weight * l1 + cos_weight * cos + kl_weight * kl_mean
  return total, {"mse": mse, "l1": l1, "cos": cos, "cos_sim": cos_sim, "kl": kl_mean,
                 "total": total}
