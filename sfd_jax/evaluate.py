"""The evaluation job: ``python main.py --config=... --mode=eval --workdir=DIR``.

Samples ``config.sample.num_images`` images with the sampling job (sharded; resumes),
extracts Inception features (batch split over the local devices), computes FID, sFID,
Inception Score, precision and recall against an ADM reference batch
(``config.eval.reference_npz``, e.g. ``VIRTUAL_imagenet256_labeled.npz``), and writes
``<workdir>/eval/metrics.json``, TensorBoard scalars and a sample grid PNG.

``config.eval``: ``inception`` (converted FID Inception directory: ``python -m
sfd_jax.convert.inception``), ``reference_npz``, ``preprocess`` ("adm" to mirror the ADM
evaluator's TF graph resize, "pytorch_fid" for pytorch-fid), ``batch_size``,
``grid_images``.
"""
from __future__ import annotations

import json
import math
import os
from typing import Any

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import NamedSharding, PartitionSpec as P

from sfd_jax import sample as sample_job


class EvalError(ValueError):
  pass


def image_grid(images: np.ndarray, cols: int | None = None, pad: int = 0,
               pad_value: int = 0) -> np.ndarray:
  """uint8 [N, H, W, 3] → one uint8 grid image (row-major; ``pad`` pixels of
  ``pad_value`` between and around tiles; missing tiles black)."""
  n, h, w, c = images.shape
  cols = cols or int(math.ceil(math.sqrt(n)))
  rows = int(math.ceil(n / cols))
  grid = np.full((rows * (h + pad) + pad, cols * (w + pad) + pad, c), pad_value, np.uint8)
  for r in range(rows):
    for q in range(cols):
      y, x = pad + r * (h + pad), pad + q * (w + pad)
      i = r * cols + q
      grid[y:y + h, x:x + w] = images[i] if i < n else 0
  return grid


def write_grid(out_dir: str, n: int, path: str) -> str | None:
  """Grid of the first ``n`` PNG samples (class order) written to ``path``."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  files = [os.path.join(out_dir, f"{i:06d}.png") for i in range(n)]
  files = [f for f in files if os.path.exists(f)]
  if not files:
    return None
  imgs = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
  Image.fromarray(image_grid(imgs)).save(path)
  return path


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  e = config.eval
  if not e.inception:
    raise EvalError("config.eval.inception is empty: convert the FID Inception weights once "
                    "(python -m sfd_jax.convert.inception --src pt_inception-2015-12-05-"
                    "6726825d.pth --dst DIR) and point the field at DIR")
  if not e.reference_npz or not os.path.exists(e.reference_npz):
    raise EvalError(f"config.eval.reference_npz={e.reference_npz!r} does not exist (the ADM "
                    "reference batch, e.g. VIRTUAL_imagenet256_labeled.npz)")
  if not config.sample.get("texture_vae", ""):
    raise EvalError("evaluation needs decoded images: set config.sample.texture_vae")
  result = sample_job.run(config, workdir)
  eval_dir = os.path.join(workdir, "eval")
  os.makedirs(eval_dir, exist_ok=True)
  if jax.process_index() != 0:
    return {}
  from sfd_jax.convert.inception import load_inception  # pylint: disable=import-outside-toplevel
  from sfd_jax.metrics import adm  # pylint: disable=import-outside-toplevel
  inception = load_inception(e.inception, preprocess=e.preprocess)
  n_local = jax.local_device_count()
  bs = int(e.batch_size) // n_local * n_local or n_local
  mesh = jax.sharding.Mesh(np.asarray(jax.local_devices()), ("data",))
  extractor = adm.FeatureExtractor.from_model(inception, batch_size=bs,
                                              in_sharding=NamedSharding(mesh, P("data")))
  metrics = adm.compute_metrics(result["npz"], e.reference_npz, extractor)
  metrics = {k: float(v) for k, v in metrics.items()}
  info = {"metrics": metrics, "num_images": int(config.sample.num_images),
          "samples_npz": result["npz"], "reference_npz": e.reference_npz,
          "sample": config.sample.to_dict(), "preprocess": e.preprocess}
  with open(os.path.join(eval_dir, "metrics.json"), "w") as f:
    json.dump(info, f, indent=2, default=str)
  grid = write_grid(result["out_dir"], int(e.grid_images), os.path.join(eval_dir, "grid.png"))
  from clu import metric_writers  # pylint: disable=import-outside-toplevel
  writer = metric_writers.create_default_writer(eval_dir)
  step = int(e.get("step", 0))
  writer.write_scalars(step, {f"eval/{k}": v for k, v in metrics.items() if np.isfinite(v)})
  if grid:
    from PIL import Image  # pylint: disable=import-outside-toplevel
    writer.write_images(step, {"eval/samples": np.asarray(Image.open(grid))[None]})
  writer.flush()
  logging.info("eval: %s", json.dumps(metrics))
  return info
