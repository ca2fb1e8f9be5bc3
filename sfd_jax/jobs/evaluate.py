"""The evaluation job: ``python main.py --config=... --mode=eval --workdir=DIR``.

Samples ``config.sample.num_images`` images with the sampling job (sharded; resumes),
extracts Inception features (batch split over the local devices), computes FID, sFID,
Inception Score, precision and recall against an ADM reference batch
(``config.eval.reference_npz``, e.g. ``VIRTUAL_imagenet256_labeled.npz``), and writes
``<workdir>/eval/metrics.json``, TensorBoard scalars and a sample grid PNG.

``config.eval``: ``inception`` (converted FID Inception directory: ``python -m
sfd_jax.convert.inception``), ``reference_npz``, ``preprocess`` ("adm" to mirror the ADM
evaluator's TF graph resize, "pytorch_fid" for pytorch-fid), ``batch_size``,
``grid_images``, ``samples_npz``.

Eval only: with ``config.eval.samples_npz`` set (an ADM-format ``.npz`` with uint8
images ``arr_0`` [N, H, W, 3], e.g. a ``samples_50000.npz`` written by the reference or
by an earlier run) nothing is sampled and no model is loaded: the file is scored as is
(the same metrics ``--mode=eval`` computes on its own samples) and the grid shows its
first ``grid_images`` images.
"""
from __future__ import annotations

import json
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

from sfd_jax import sampling
from sfd_jax.convert.common import check_converted_dir
from sfd_jax.convert.inception import load_inception
from sfd_jax.core import checks, options
from sfd_jax.core import images as images_lib
from sfd_jax.core import writers as writers_lib
from sfd_jax.core.errors import ConfigError
from sfd_jax.metrics import adm


class EvalError(ConfigError):
  """config.eval is incomplete or names files that cannot be used."""


def check(config: ml_collections.ConfigDict) -> None:
  """Everything ``run`` needs that can be checked without sampling: the fields, the
  Inception folder, the reference batch, the samples to score (or the sampling
  options)."""
  checks.require_sections(config, ("eval", "sample"), mode="eval", example="configs/sfd_xl.py")
  options.check(config)
  e = config.eval
  if not e.inception:
    raise EvalError("config.eval.inception is empty: convert the FID Inception weights once "
                    "(python -m sfd_jax.convert.inception --src pt_inception-2015-12-05-"
                    "6726825d.pth --dst DIR) and point the field at DIR")
  if not e.reference_npz or not os.path.exists(e.reference_npz):
    raise EvalError(f"config.eval.reference_npz={e.reference_npz!r} does not exist (the ADM "
                    "reference batch, e.g. VIRTUAL_imagenet256_labeled.npz)")
  samples_npz = e.get("samples_npz", "")
  if not samples_npz and not config.sample.get("texture_vae", ""):
    raise EvalError("evaluation needs decoded images: set config.sample.texture_vae (or "
                    "config.eval.samples_npz to score existing samples)")
  check_converted_dir(e.inception, "inception_v3_fid", "config.eval.inception")
  adm.check_batch_file(e.reference_npz, "config.eval.reference_npz")
  if samples_npz:
    if not os.path.exists(samples_npz):
      raise EvalError(f"config.eval.samples_npz={samples_npz!r} does not exist")
    adm.check_batch_file(samples_npz, "config.eval.samples_npz")   # headers only
    keys = adm.npz_keys(samples_npz)
    if "arr_0" not in keys:
      raise EvalError(f"config.eval.samples_npz={samples_npz!r} has no 'arr_0' "
                      f"(found {keys}): expected ADM-format uint8 images [N, H, W, 3]")
  else:
    sampling.check_config(config)


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  check(config)       # everything the metrics need, before the (long) sampling run
  e = config.eval
  samples_npz = e.get("samples_npz", "")
  if samples_npz:
    num_images = int(adm.npz_array_info(samples_npz)[0][0])
    result, sample_info = {"npz": samples_npz, "out_dir": None}, {"samples_npz": samples_npz}
  else:
    result = sampling.sample_from_config(config, workdir)
    num_images, sample_info = int(config.sample.num_images), config.sample.to_dict()
  eval_dir = os.path.join(workdir, "eval")
  os.makedirs(eval_dir, exist_ok=True)
  if jax.process_index() != 0:
    return {}
  metrics = score_npz(result["npz"], e)
  info = {"metrics": metrics, "num_images": num_images, "samples_npz": result["npz"],
          "reference_npz": e.reference_npz, "sample": sample_info,
          "preprocess": e.preprocess}
  with open(os.path.join(eval_dir, "metrics.json"), "w") as f:
    json.dump(info, f, indent=2, default=str)
  if result["out_dir"] is not None:
    files = [f for f in images_lib.numbered_pngs(result["out_dir"], int(e.grid_images))
             if os.path.exists(f)]
    grid_images = images_lib.load_pngs(files) if files else None
  else:
    n_grid = int(e.grid_images)      # the first images only, streamed from the archive
    grid_images = (next(adm.iter_npz_batches(samples_npz, batch_size=n_grid), None)
                   if n_grid else None)
  writer = writers_lib.create_writer(eval_dir)
  step = int(e.get("step", 0))
  writer.write_scalars(step, {f"eval/{k}": v for k, v in metrics.items() if np.isfinite(v)})
  if grid_images is not None and len(grid_images):
    grid = images_lib.image_grid(grid_images)
    images_lib.save_png(grid, os.path.join(eval_dir, "grid.png"))
    writer.write_images(step, {"eval/samples": grid[None]})
  writer.flush()
  logging.info("eval: %s", json.dumps(metrics))
  return info


def score_npz(samples_npz: str, e) -> dict[str, float]:
  """FID, sFID, IS, precision, recall of ``samples_npz`` against ``e.reference_npz``
  (Inception ``e.inception`` on the local devices)."""
  inception = load_inception(e.inception, preprocess=e.preprocess)
  n_local = jax.local_device_count()
  bs = int(e.batch_size) // n_local * n_local or n_local
  mesh = jax.sharding.Mesh(np.asarray(jax.local_devices()), ("data",))
  extractor = adm.FeatureExtractor.from_model(inception, batch_size=bs,
                                              in_sharding=NamedSharding(mesh, P("data")))
  metrics = adm.compute_metrics(samples_npz, e.reference_npz, extractor)
  return {k: float(v) for k, v in metrics.items()}
