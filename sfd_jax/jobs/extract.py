"""``--mode=extract``: DINOv2 patch features for training the Semantic VAE (SPEC §3.3).

  python main.py --mode=extract --config=configs/encode_imagenet.py --workdir=/data/in1k_dino

Every image goes through the SemVAE *training* preprocessing — torchvision
``Resize(256, bicubic)`` on the short side, ``CenterCrop(224)``, ImageNet
normalisation (``preprocess.semvae_training_dino_input``) — then DINOv2
``x_norm_patchtokens`` ([256, 768] for ViT-B/14 at 224 px), stored as float16 feature
records. This is *not* the preprocessing of the latent encoding job (SPEC §2.3,
§12.13); both are kept as the reference has them.

The job shares the machinery of ``--mode=encode`` (``sfd_jax.data.images``): shards of
``config.extract.records_per_shard`` images, process ``p`` of ``P`` writes shards
``s ≡ p (mod P)`` with the batch spread over its own devices, unreadable images are
reported by name and skipped, finished shards survive a rerun. The reference shuffles
while extracting; here the order is the source order (training shuffles anyway).

The feature dataset format is described in ``sfd_jax.data.features``.

``config.extract.recipe = "vf"`` extracts the VA-VAE's VF-loss targets instead (the
texture-VAE trainer's ``data.vf_features``): the trainer's ADM centre crop
(``extract.image_size``), bilinear resize to ``extract.vf_size`` without ImageNet
normalisation (``preprocess.vf_foundation_input``), DINOv2 ViT-L/14
(``extract.dinov2_preset = "vitl14"``) patch tokens. One record per image in source
order: the trainer pairs record i with image i, so a run that skipped unreadable
images is refused there.
"""
from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

import sfd_jax  # noqa: F401  (flax settings)
from sfd_jax import parallel
from sfd_jax.convert.networks import load_network
from sfd_jax.core import errors
from sfd_jax.core.jit import compiler_options, jitted
from sfd_jax.data import images as images_lib
from sfd_jax.data import preprocess
from sfd_jax.data.features import (FEATURES_FILE, FeatureShardWriter, FeatureSpec,
                                   write_feature_info)
from sfd_jax.parallel.multihost import check_batch_size, local_mesh, place_networks


RECIPES = ("semvae", "vf")


def _dino_patch_features(graphdef, state, images):
  dino = nnx.merge(graphdef, state)
  return dino.patch_features(images).astype(jnp.float16)


def _vf_patch_features(graphdef, state, images_uint8, size: int):
  dino = nnx.merge(graphdef, state)
  x = preprocess.vf_foundation_input(preprocess.uint8_to_m11(images_uint8), size)
  return dino.patch_features(x).astype(jnp.float16)


def _manifest(config: ml_collections.ConfigDict, source, spec: FeatureSpec) -> dict:
  e = config.extract
  out = {"job": "extract", "source": source.describe(), "spec": spec.to_json(),
         "records_per_shard": int(e.records_per_shard), "resize": int(e.resize),
         "crop": int(e.crop), "dinov2": e.dinov2 or "random_init",
         "dtype": e.dtype}
  if e.get("recipe", "semvae") == "vf":
    out.update(recipe="vf", image_size=int(e.image_size), vf_size=int(e.vf_size))
  return out


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Extracts DINOv2 features of ``config.data`` into the feature dataset ``workdir``.

  Returns ``{"complete": bool, "num_records": int, "skipped": [...]}`` (the totals only
  on process 0 once every shard is finished).
  """
  images_lib.validate_job_config(config, "extract")
  e = config.extract
  errors.check_writable(workdir, "the output feature dataset directory")
  recipe = e.get("recipe", "semvae")
  if recipe not in RECIPES:
    raise ValueError(f"config.extract.recipe {recipe!r} not one of {RECIPES}")
  source = images_lib.Subset(images_lib.make_source(config.data),
                             int(config.data.get("max_images", 0)))
  options = compiler_options(config.job)
  dino = load_network("dinov2", e.dinov2, random_init=e.random_init,
                      preset=e.dinov2_preset, dtype=e.dtype, seed=config.seed)
  side = int(e.vf_size) if recipe == "vf" else int(e.crop)
  grid = dino.patch_grid(side, side)
  spec = FeatureSpec(grid[0] * grid[1], dino.config.embed_dim, "float16")
  mesh = local_mesh()
  batch_size = int(e.per_device_batch) * mesh.size
  check_batch_size(batch_size, mesh, "config.extract.per_device_batch × local devices")
  (graphdef,), (state,) = place_networks([dino], mesh)
  batch_sh = parallel.batch_sharding(mesh)
  plan = images_lib.ShardPlan(len(source), int(e.records_per_shard))
  images_lib.prepare_output(workdir, plan, _manifest(config, source, spec), [FEATURES_FILE])
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
