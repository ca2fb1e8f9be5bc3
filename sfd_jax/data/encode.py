"""Images → stored datasets through frozen networks (docs/encode.md): the latent dataset
the SFD trainer reads (``encode_images``: ``--mode=encode``, the demo's encode stage) and
the feature datasets of the Semantic VAE and the VF loss (``extract_features``:
``--mode=extract``). The jobs load the networks; the demo passes its own (its feature net
has DINOv2's interface).

Encoding (docs/method.md §2.1–§2.3) samples both posteriors for the ADM crop and its flip (image
``i`` draws its noises from ``fold_in(key(seed), i)``: independent of batch, devices and
interruptions) and stores DINOv2's ``x_norm_patchtokens`` as the REPA target; extraction
uses the SemVAE *training* preprocessing (Resize(256) + CenterCrop(224), docs/method.md §3.3), or
with ``extract.recipe = "vf"`` the VA-VAE's VF targets (one record per image in source
order). Both run on ``data.images.run_sharded_job``: atomic, resumable shards, process
``p`` of ``P`` writing shards ``s ≡ p (mod P)``, unreadable images reported and skipped.
"""
from __future__ import annotations

from typing import Any, Mapping

import jax
import jax.numpy as jnp
import ml_collections
from absl import logging
from flax import nnx

from sfd_jax import parallel
from sfd_jax.core import errors
from sfd_jax.core.errors import ConfigError
from sfd_jax.core.jit import compiler_options, jitted
from sfd_jax.data import images as images_lib
from sfd_jax.data import preprocess, records
from sfd_jax.data import schema as schema_lib
from sfd_jax.data import stats as stats_lib
from sfd_jax.data.features import (FEATURES_FILE, FeatureShardWriter, FeatureSpec,
                                   write_feature_info)
from sfd_jax.data.schema import LatentSchema
from sfd_jax.models.distributions import token_grid
from sfd_jax.parallel.multihost import check_batch_size, local_mesh, place_networks

RECIPES = ("semvae", "vf")


# ---------------------------------------------------------------- latents


def latent_schema(config: ml_collections.ConfigDict, tvae, dino, semvae) -> LatentSchema:
  """The record schema, after checking that the three networks fit together.

  The texture latent grid (image_size / texture downsampling), the DINOv2 patch grid
  (dino_size / patch) and the SemVAE token grid must coincide (16 for SFD); the SemVAE
  input width must be the DINOv2 width.
  """
  e = config.encode
  f = tvae.config.downsample_factor
  if e.image_size % f:
    raise ConfigError(f"config.encode.image_size {e.image_size} is not divisible by the "
                     f"texture VAE's downsampling factor {f}")
  grid = e.image_size // f
  dino_grid = dino.patch_grid(e.dino_size, e.dino_size)
  if dino_grid != (grid, grid):
    raise ConfigError(
        f"texture latent grid {grid}×{grid} (image_size {e.image_size} / {f}) differs from "
        f"the DINOv2 patch grid {dino_grid[0]}×{dino_grid[1]} (dino_size {e.dino_size} / "
        f"patch {dino.config.patch_size}): the stored latents need one grid")
  if semvae.config.input_dim != dino.config.embed_dim:
    raise ConfigError(f"SemVAE input width {semvae.config.input_dim} differs from the DINOv2 "
                     f"width {dino.config.embed_dim}")
  try:
    token_grid(grid * grid)
  except ValueError as err:
    raise ConfigError(f"config.encode: {err}") from err
  return LatentSchema(grid=grid, texture_channels=tvae.config.embed_dim,
                      semantic_channels=semvae.config.bottleneck_dim,
                      repa_dim=dino.config.embed_dim, has_repa=bool(e.store_repa),
                      has_flip=True, repa_dtype="float16")


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


def _manifest(config: ml_collections.ConfigDict, source, schema: LatentSchema,
              nets: Mapping[str, str] | None) -> dict:
  e = config.encode
  return {"job": "encode", "source": source.describe(), "schema": schema.to_json(),
          "records_per_shard": int(e.records_per_shard), "seed": int(config.seed),
          "image_size": int(e.image_size), "dino_size": int(e.dino_size),
          "dtype": e.dtype, "networks": dict(nets or {})}


def encode_images(config: ml_collections.ConfigDict, workdir: str,
                  networks: tuple[nnx.Module, nnx.Module, nnx.Module],
                  names: Mapping[str, str] | None = None) -> dict[str, Any]:
  """Encodes ``config.data`` into the latent dataset ``workdir`` with ``networks`` =
  (texture VAE, DINOv2 or a network with its interface, SemVAE) and ``config.encode`` /
  ``config.job``; ``names``: how the manifest names the networks.

  Returns ``{"complete", "num_records", "skipped", "stats"}`` (totals and stats only on
  process 0 once every shard is finished).
  """
  images_lib.validate_job_config(config, "encode")
  e = config.encode
  errors.check_writable(workdir, "the output dataset directory")
  source = images_lib.Subset(images_lib.make_source(config.data),
                             int(config.data.get("max_images", 0)))
  schema = latent_schema(config, *networks)
  mesh = local_mesh()
  batch_size = int(e.per_device_batch) * mesh.size
  check_batch_size(batch_size, mesh, "config.encode.per_device_batch × local devices")
  graphdefs, states = place_networks(networks, mesh)
  batch_sh = parallel.batch_sharding(mesh)
  base_key = jax.random.key(int(config.seed))
  encode_fn = jitted(encode_batch, (0, 1, 2), compiler_options(config.job))
  plan = images_lib.ShardPlan(len(source), int(e.records_per_shard))
  manifest = _manifest(config, source, schema, names)
  images_lib.prepare_output(workdir, plan, manifest,
                            [schema_lib.DATASET_FILE, schema_lib.STATS_FILE])
  logging.info("encode: %d images → %s (%d shards of %d), grid %d, batch %d on %d local "
               "device(s)", len(source), workdir, plan.num_shards, plan.per_shard,
               schema.grid, batch_size, mesh.size)

  def prepare(img):
    return preprocess.adm_center_crop(img, int(e.image_size))

  def compute(batch, indices):
    return encode_fn(graphdefs, int(e.dino_size), bool(e.store_repa), states,
                     jax.device_put(batch, batch_sh), jax.device_put(indices, batch_sh),
                     base_key)

  def to_records(out, labels):
    return [dict({k: v[i] for k, v in out.items()}, label=label)
            for i, label in enumerate(labels)]

  result = images_lib.run_sharded_job(
      source, workdir, plan, batch_size=batch_size, prepare=prepare, compute=compute,
      to_records=to_records,
      open_writer=lambda p: records.ShardWriter(p, schema, config.job.compression),
      process_index=jax.process_index(), process_count=jax.process_count(),
      decode_threads=config.job.decode_threads, prefetch_batches=config.job.prefetch_batches,
      log_every_batches=config.job.log_every_batches,
      stop_after_shards=config.job.debug_stop_after_shards, name="encode")

  def write_index(shards, metadata):
    metadata = dict(metadata, job=manifest)
    classes = int(source.describe().get("num_classes", 0) or 0)
    if classes:   # labels come from the source's classes: the trainer checks num_classes
      metadata["labels"] = {"min": 0, "max": classes - 1}
    schema_lib.write_dataset_info(workdir, schema_lib.DatasetInfo(schema, shards, metadata))
    recs = records.LatentRecords(workdir)
    n = min(int(e.stats_samples), len(recs))
    logging.info("encode: per-channel statistics from %d unflipped records", n)
    stats = stats_lib.compute_stats(recs, num_samples=n, seed=int(e.stats_seed))
    return {"stats": stats.save(stats_lib.stats_path(workdir))}

  return images_lib.finish_job(workdir, plan, source, result, "encode", write_index)


# ---------------------------------------------------------------- features


def _dino_patch_features(graphdef, state, images):
  dino = nnx.merge(graphdef, state)
  return dino.patch_features(images).astype(jnp.float16)


def _vf_patch_features(graphdef, state, images_uint8, size: int):
  dino = nnx.merge(graphdef, state)
  x = preprocess.vf_foundation_input(preprocess.uint8_to_m11(images_uint8), size)
  return dino.patch_features(x).astype(jnp.float16)


def _extract_manifest(config: ml_collections.ConfigDict, source, spec: FeatureSpec) -> dict:
  e = config.extract
  out = {"job": "extract", "source": source.describe(), "spec": spec.to_json(),
         "records_per_shard": int(e.records_per_shard), "resize": int(e.resize),
         "crop": int(e.crop), "dinov2": e.dinov2 or "random_init",
         "dtype": e.dtype}
  if e.get("recipe", "semvae") == "vf":
    out.update(recipe="vf", image_size=int(e.image_size), vf_size=int(e.vf_size))
  return out


def extract_features(config: ml_collections.ConfigDict, workdir: str,
                     dino: nnx.Module) -> dict[str, Any]:
  """Extracts the patch features of ``config.data`` by ``dino`` (DINOv2 or a network with
  its interface) into the feature dataset ``workdir`` (``config.extract``, ``config.job``).

  Returns ``{"complete": bool, "num_records": int, "skipped": [...]}`` (the totals only
  on process 0 once every shard is finished).
  """
  images_lib.validate_job_config(config, "extract")
  e = config.extract
  errors.check_writable(workdir, "the output feature dataset directory")
  recipe = e.get("recipe", "semvae")
  if recipe not in RECIPES:
    raise ConfigError(f"config.extract.recipe must be one of {RECIPES}, got {recipe!r}")
  source = images_lib.Subset(images_lib.make_source(config.data),
                             int(config.data.get("max_images", 0)))
  options = compiler_options(config.job)
  side = int(e.vf_size) if recipe == "vf" else int(e.crop)
  grid = dino.patch_grid(side, side)
  spec = FeatureSpec(grid[0] * grid[1], dino.config.embed_dim, "float16")
  mesh = local_mesh()
  batch_size = int(e.per_device_batch) * mesh.size
  check_batch_size(batch_size, mesh, "config.extract.per_device_batch × local devices")
  (graphdef,), (state,) = place_networks([dino], mesh)
  batch_sh = parallel.batch_sharding(mesh)
  plan = images_lib.ShardPlan(len(source), int(e.records_per_shard))
  images_lib.prepare_output(workdir, plan, _extract_manifest(config, source, spec), [FEATURES_FILE])
  if recipe == "vf":
    features_fn = jitted(_vf_patch_features, (0, 3), options)

    def prepare(img):
      return preprocess.adm_center_crop(img, int(e.image_size))

    def compute(batch, indices):
      del indices
      return features_fn(graphdef, state, jax.device_put(batch, batch_sh), int(e.vf_size))
  else:
    features_fn = jitted(_dino_patch_features, (0,), options)

    def prepare(img):
      return preprocess.semvae_training_dino_input(img, resize=int(e.resize),
                                                   crop=int(e.crop))

    def compute(batch, indices):
      del indices
      return features_fn(graphdef, state, jax.device_put(batch, batch_sh))

  def to_records(out, labels):
    return [{"features": f, "label": l} for f, l in zip(out, labels)]

  result = images_lib.run_sharded_job(
      source, workdir, plan, batch_size=batch_size, prepare=prepare, compute=compute,
      to_records=to_records,
      open_writer=lambda p: FeatureShardWriter(p, spec, config.job.compression),
      process_index=jax.process_index(), process_count=jax.process_count(),
      decode_threads=config.job.decode_threads, prefetch_batches=config.job.prefetch_batches,
      log_every_batches=config.job.log_every_batches,
      stop_after_shards=config.job.debug_stop_after_shards, name="extract")
  return images_lib.finish_job(workdir, plan, source, result, "extract",
                    lambda shards, meta: {"index": write_feature_info(workdir, spec, shards,
                                                                      meta)})
