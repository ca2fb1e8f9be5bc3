"""Training losses of the autoencoders that produce SFD's latents.

``texture_vae_loss``: reconstruction + KL objective of the texture VAE
(``sfd_jax.models.texture_vae.TextureVAE``). SFD itself loads the released f16d32
weights; this loss exists for fine-tuning or retraining the autoencoder (SPEC §4.3).

Texture VAE objective
---------------------
loss = L1(images, recon) + kl_weight · mean_batch(KL(q(z|x) ‖ N(0, I)))
       + Σ_name extra_terms[name](images, recon, posterior)

* ``pixel_reduction="mean"`` (default) averages |x − x̂| over every pixel and channel.
  ``"sum"`` sums it per image and averages over the batch, which is the scale of the LDM
  recipe (with its learned log-variance at its initial value 0): there the KL weight 1e-6
  is relative to a per-image pixel *sum*, so with ``"mean"`` the same ``kl_weight`` puts
  H·W·C times (196,608× at 256² RGB) more relative weight on the KL.
* The LDM / VA-VAE generator loss with LPIPS, the adaptively weighted PatchGAN term and
  the VF loss is ``sfd_jax.diffusion.gan_losses`` (``config.loss.name = "ldm"``).
  ``extra_terms`` adds further terms to this L1 + KL loss: each is a callable
  ``term(images, recon, posterior) -> scalar`` returning its already-weighted
  contribution; it is added to the loss and reported as ``metrics["loss_<name>"]``.
  A term that needs parameters closes over them.
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
