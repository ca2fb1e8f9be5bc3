"""The Grain pipelines of the small-network trainers (``sfd_jax.training.vae``): feature
records for the Semantic VAE (``--mode=extract``'s datasets), images for the texture VAE
and the demo's feature net (a folder of class sub-folders or TFDS, ADM centre crop,
optional random flip, optional VF features paired by source index).

``make_train_iterator``: global shuffle (reseeded every epoch), endless repeat,
per-process slice, batch; checkpointable (its state is small JSON stored in every
checkpoint). ``eval_batches``: one ordered, padded pass over ``config.data.eval_path``.
"""
from __future__ import annotations

import concurrent.futures
from typing import Iterator

import grain
import jax
import ml_collections
import numpy as np

from sfd_jax.core import errors
from sfd_jax.data import images as images_lib
from sfd_jax.data import pipeline
from sfd_jax.data.features import FeatureRecords
from sfd_jax.models import distributions


class _RandomFlip(grain.transforms.MapWithIndex):
  """Horizontal flip of ``image`` with p = 0.5, a hash of (seed, stream index)."""

  def __init__(self, seed: int):
    self.seed = int(seed)

  def map_with_index(self, index: int, element):
    if element is None or not pipeline.flip_choice(self.seed, index):
      return element
    return dict(element, image=np.ascontiguousarray(element["image"][:, ::-1]))


class _WithFeatures:
  """An image source whose element i also carries record i of a feature dataset."""

  def __init__(self, source, features: FeatureRecords):
    if len(features) != len(source):
      raise errors.DataError(
          f"config.data.vf_features={features.directory}: {len(features)} records for "
          f"{len(source)} images; the features must be extracted from the same image "
          "source, one record per image in source order (an image the extraction skipped "
          "shifts every later record)")
    self.source, self.features = source, features

  def __len__(self) -> int:
    return len(self.source)

  def __getitem__(self, index: int):
    return dict(self.source[index], vf_features=self.features[index]["features"])


class _CropWithFeatures:
  """``CenterCropTransform`` that keeps the element's ``vf_features``."""

  def __init__(self, image_size: int):
    self.crop = images_lib.CenterCropTransform(image_size)

  def __call__(self, element):
    out = self.crop(element)
    return None if out is None else dict(out, vf_features=element["vf_features"])


def source_and_transform(kind: str, config, path_key: str = "path"):
  """(random-access source, per-element transform or None) for ``config.data``."""
  data_cfg = config.data
  if kind == "semvae":
    if not data_cfg.get(path_key):
      raise errors.ConfigError(f"config.data.{path_key} is empty: point it at a feature "
                               "dataset written by --mode=extract")
    recs = FeatureRecords(data_cfg[path_key])
    if recs.spec.dim != config.model.input_dim:
      raise errors.DataError(f"{recs.directory}: features of width {recs.spec.dim}, but "
                             f"config.model.input_dim is {config.model.input_dim}; set "
                             f"--config.model.input_dim={recs.spec.dim}")
    try:
      distributions.token_grid(recs.spec.num_tokens)  # the posterior needs a square grid
    except ValueError as e:
      raise errors.DataError(f"{recs.directory}: {e}") from e
    return recs, None
  section = dict(data_cfg.to_dict(), path=data_cfg.get(path_key))
  if path_key == "eval_path":  # evaluation images always come from a folder
    section["source"] = "folder"
  source = images_lib.make_source(section)
  loss = config.get("loss") or {}
  if (path_key == "path" and loss.get("name") == "ldm" and loss.get("use_vf")
      and loss.get("vf_source") == "features"):
    if not data_cfg.get("vf_features"):
      raise errors.ConfigError("config.loss.vf_source='features' needs "
                               "config.data.vf_features (a feature dataset of --mode=extract "
                               "with extract.recipe=vf)")
    return (_WithFeatures(source, FeatureRecords(data_cfg.vf_features)),
            _CropWithFeatures(int(data_cfg.image_size)))
  return source, images_lib.CenterCropTransform(int(data_cfg.image_size))


def make_train_iterator(config: ml_collections.ConfigDict, kind: str,
                        process_index: int | None = None,
                        process_count: int | None = None) -> grain.DatasetIterator:
  """Checkpointable iterator over this process's part of the global batches.

  Global shuffle (reseeded every epoch), endless repeat, per-process slice
  ``[process_index::process_count]``, batch. Texture VAE: ADM centre crop (unreadable
  images are logged and dropped) and optional random flip. Its state (``get_state``)
  is small JSON stored in every checkpoint.
  """
  pipeline.ensure_absl_flags_parsed()
  pi = jax.process_index() if process_index is None else process_index
  pc = jax.process_count() if process_count is None else process_count
  d = config.data
  source, transform = source_and_transform(kind, config)
  ds = grain.MapDataset.source(source).shuffle(seed=int(config.seed)).repeat(None)
  if transform is not None:
    ds = ds.map(transform)
    if d.get("random_flip", False):
      ds = ds.map_with_index(_RandomFlip(int(config.seed)))
  ds = ds[pi::pc]
  it = ds.to_iter_dataset(grain.ReadOptions(num_threads=int(d.read_threads),
                                            prefetch_buffer_size=int(d.prefetch_batches)))
  it = it.batch(int(config.batch_size) // pc, drop_remainder=True)
  if int(d.num_workers) > 0:
    it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=int(d.num_workers)),
                        worker_init_fn=pipeline.ensure_absl_flags_parsed)
  return iter(it)


def eval_batches(config, kind: str) -> Iterator[tuple[dict, np.ndarray]]:
  """One ordered pass over ``config.data.eval_path``: (this process's batch, mask) per
  global batch. Unreadable images and the tail are padded (mask 0), so every process
  runs the same number of steps. Elements are read with ``data.read_threads`` threads.
  """
  source, transform = source_and_transform(kind, config, path_key="eval_path")
  load = (lambda i: source[i]) if transform is None else (lambda i: transform(source[i]))
  pi, pc = jax.process_index(), jax.process_count()
  local = int(config.batch_size) // pc
  total = len(source)
  if config.eval.get("max_examples", 0):
    total = min(total, int(config.eval.max_examples))
  template = next((e for e in map(load, range(total)) if e is not None), None)
  if template is None:
    raise errors.DataError(f"config.data.eval_path {config.data.eval_path}: no readable "
                           "example")
  with concurrent.futures.ThreadPoolExecutor(max(1, int(config.data.read_threads))) as pool:
    for start in range(0, total, local * pc):
      ids = range(start + pi * local, start + (pi + 1) * local)
      elems = list(pool.map(lambda i: load(i) if i < total else None, ids))
      batch = {k: np.stack([np.asarray((e or template)[k]) for e in elems])
               for k in template}
      yield batch, np.asarray([e is not None for e in elems], bool)
