"""``--mode=encode``: images → the stored latent dataset the SFD trainer reads.

  python main.py --mode=encode --config=configs/encode_imagenet.py --workdir=/data/in1k_sfd

Per image (SPEC §2.1–§2.3; the reference's ``extract_features.py``):

1. ADM centre crop to ``image_size`` (256) after RGB conversion, pixels → [-1, 1];
   the flipped view is the horizontal flip of that crop.
2. Texture latent: a *sample* of the texture VAE posterior, for both views.
3. DINOv2 ``x_norm_patchtokens`` of both views with the extraction preprocessing
   (``preprocess.dino_extraction_input``: ImageNet normalisation, then PyTorch's
   non-antialiased bicubic resize to ``dino_size`` = 224): the REPA target (float16)
   and the SemVAE input.
4. Semantic latent: a *sample* of the SemVAE posterior of those tokens, row-major
   tokens laid out as a [G, G, Cs] grid.
5. One record per image in the trainer's schema (``sfd_jax.data.schema``):
   ``texture``, ``semantic``, ``repa`` and their ``_flip`` views, ``label``.

Randomness: image ``i`` (its global index in the source) draws its four posterior
noises from ``fold_in(key(seed), i)``, so the dataset does not depend on the batch
size, the device or process count, or on interruptions (the reference seeds
``42 + rank`` and cannot be reproduced bit for bit anyway).

Parallelism and resumption (``sfd_jax.data.images.run_sharded_job``): shard ``s``
holds images ``[s·R, (s+1)·R)``; process ``p`` of ``P`` writes shards ``s ≡ p (mod P)``
with its batch spread over its local devices; shards are written atomically and
marked finished, so a rerun of the same command keeps finished shards and redoes
the rest. Unreadable images are reported by name, skipped and listed in
``dataset.json``. Once every shard is finished, process 0 writes ``dataset.json`` and
``stats.npz`` (per-channel statistics of ``min(10000, N)`` random unflipped records).

Networks come from converted folders (``config.encode.texture_vae``, ``.dinov2``,
``.semvae``; see docs/encode.md) or, with ``config.encode.random_init``, are random
instances of the ``*_preset`` architectures (the SemVAE input width then follows the
DINOv2 width).
"""
from __future__ import annotations

from typing import Any

import jax
import ml_collections
from absl import logging
from flax import nnx

import sfd_jax  # noqa: F401  (flax settings)
from sfd_jax import parallel
from sfd_jax.data import images as images_lib
from sfd_jax.data import preprocess
from sfd_jax.data import records
from sfd_jax.data import schema as schema_lib
from sfd_jax.data import stats as stats_lib
from sfd_jax.data.encoding import encode_batch
from sfd_jax.data.schema import LatentSchema
from sfd_jax.convert.networks import load_network
from sfd_jax.core import errors
from sfd_jax.core.errors import ConfigError
from sfd_jax.core.jit import compiler_options, jitted
from sfd_jax.parallel.multihost import check_batch_size, local_mesh, place_networks
from sfd_jax.models.semantic_vae import token_grid


def build_networks(config: ml_collections.ConfigDict) -> tuple[nnx.Module, nnx.Module,
                                                                nnx.Module]:
  """(texture VAE, DINOv2, SemVAE) as named by ``config.encode``."""
  e = config.encode
  kw = dict(random_init=bool(e.random_init), dtype=e.dtype)
  dino = load_network("dinov2", e.dinov2, preset=e.dinov2_preset, seed=config.seed, **kw)
  tvae = load_network("texture_vae", e.texture_vae, preset=e.texture_vae_preset,
                      seed=config.seed + 1, **kw)
  semvae = load_network("semvae", e.semvae, preset=e.semvae_preset, seed=config.seed + 2,
                        overrides={"input_dim": dino.config.embed_dim}, **kw)
  return tvae, dino, semvae


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


def _manifest(config: ml_collections.ConfigDict, source, schema: LatentSchema) -> dict:
  e = config.encode
  nets = ({k: e[k] for k in ("texture_vae", "dinov2", "semvae")} if not e.random_init else
          {k: f"random_init:{e[k + '_preset']}" for k in ("texture_vae", "dinov2", "semvae")})
  return {"job": "encode", "source": source.describe(), "schema": schema.to_json(),
          "records_per_shard": int(e.records_per_shard), "seed": int(config.seed),
          "image_size": int(e.image_size), "dino_size": int(e.dino_size),
          "dtype": e.dtype, "networks": nets}


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Encodes ``config.data`` into the latent dataset ``workdir`` (see module docstring).

  Returns ``{"complete", "num_records", "skipped", "stats"}`` (totals and stats only on
  process 0 once every shard is finished).
  """
  images_lib.validate_job_config(config, "encode")
  e = config.encode
  errors.check_writable(workdir, "the output dataset directory")
  source = images_lib.Subset(images_lib.make_source(config.data),
                             int(config.data.get("max_images", 0)))
  networks = build_networks(config)
  schema = latent_schema(config, *networks)
  mesh = local_mesh()
  batch_size = int(e.per_device_batch) * mesh.size
  check_batch_size(batch_size, mesh, "config.encode.per_device_batch × local devices")
  graphdefs, states = place_networks(networks, mesh)
  batch_sh = parallel.batch_sharding(mesh)
  base_key = jax.random.key(int(config.seed))
  encode_fn = jitted(encode_batch, (0, 1, 2), compiler_options(config.job))
  plan = images_lib.ShardPlan(len(source), int(e.records_per_shard))
  manifest = _manifest(config, source, schema)
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
