"""The encoding program of ``--mode=encode``: a batch of images → the record arrays of
the latent dataset (texture latents, semantic latents, REPA targets, both views).

``encode_batch`` is jitted by the encode job (``sfd_jax.jobs.encode``) and compiled for
TPU topologies by ``--mode=plan``; the networks come in as (graphdef, state) pairs.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sfd_jax.data import preprocess
from sfd_jax.models.semantic_vae import token_grid


def _split_views(x: jax.Array, name: str) -> dict[str, jax.Array]:
  """[2B, ...] with the two views of each image adjacent → ``name``, ``name_flip``."""
  x = x.reshape((x.shape[0] // 2, 2) + x.shape[1:])
  return {name: x[:, 0], name + "_flip": x[:, 1]}


def encode_batch(graphdefs, dino_size: int, store_repa: bool, states, images_u8, indices,
                 base_key):
  """Encodes a batch of ADM crops (uint8 [B, S, S, 3]) and their flips.

  ``indices`` are the images' global indices: image ``i`` draws its noises from
  ``fold_in(base_key, i)`` split four ways (texture, texture flip, semantic, semantic
  flip). Returns the record arrays with a leading batch axis. Jit it with
  ``graphdefs``, ``dino_size`` and ``store_repa`` static (see ``run``).

  The two views of an image sit next to each other in the [2B] batch the networks see
  (a reshape of [B, 2, ...]), so a batch sharded over devices stays where it is.
  """
  tvae, dino, semvae = (nnx.merge(g, s) for g, s in zip(graphdefs, states))
  n = images_u8.shape[0]
  x = preprocess.uint8_to_m11(images_u8)
  views = jnp.stack([x, x[:, :, ::-1]], axis=1)  # flip after the crop
  views = views.reshape((2 * n,) + x.shape[1:])
  keys = jax.vmap(lambda i: jax.random.split(jax.random.fold_in(base_key, i), 4))(indices)
  tex_keys = keys[:, :2].reshape(2 * n)  # (texture, texture flip) per image
  sem_keys = keys[:, 2:].reshape(2 * n)  # (semantic, semantic flip) per image

  posterior = tvae.encode(views)
  eps = jax.vmap(lambda k: jax.random.normal(k, posterior.mean.shape[1:], jnp.float32))(
      tex_keys)
  texture = posterior.sample(eps=eps)

  feats = dino.patch_features(preprocess.dino_extraction_input(views, dino_size))
  sem_post = semvae.encode(feats)
  _, length, chans = sem_post.mean.shape
  side = token_grid(length)
  eps_nchw = jax.vmap(lambda k: jax.random.normal(k, (chans, side, side), jnp.float32))(
      sem_keys)
  semantic = sem_post.sample(eps_nchw=eps_nchw).reshape(2 * n, side, side, chans)

  out = {**_split_views(texture, "texture"), **_split_views(semantic, "semantic")}
  if store_repa:
    repa = feats.reshape(2 * n, side, side, feats.shape[-1]).astype(jnp.float16)
    out.update(_split_views(repa, "repa"))
  return out
