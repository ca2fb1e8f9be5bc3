"""``--mode=eval_tokenizer``: rFID, PSNR, SSIM and LPIPS of a texture VAE on held-out images.

  python main.py --mode=eval_tokenizer --config=configs/texture_vae_f16d32_vavae.py \
      --config.eval_tokenizer.checkpoint=runs/vavae \
      --config.eval_tokenizer.images=/data/imagenet/val \
      --config.eval_tokenizer.inception=weights/inception_fid \
      --config.eval_tokenizer.lpips=weights/lpips_vgg --workdir=runs/vavae

The reference's ``evaluate_tokenizer.py``: every image of ``eval_tokenizer.images`` (a
folder, class sub-folders allowed), centre-cropped to ``image_size``, is encoded (a
posterior *sample*, as the reference does; ``sample_posterior=False`` takes the mean)
and decoded; the metrics are those of ``sfd_jax.metrics.reconstruction`` (rFID with the
FID Inception in pytorch-fid preprocessing by default). Writes
``<workdir>/eval_tokenizer/metrics.json``, TensorBoard scalars ``eval_tokenizer/*`` and
a PNG of originals (top) over reconstructions (bottom).

``eval_tokenizer.checkpoint``: a converted texture VAE folder (``python -m
sfd_jax.convert.texture_vae``, or ``export`` of a run) or a texture-VAE training workdir
(``weights``: params | ema, ``step``: -1 = latest). Runs on process 0's local devices
(batches split over them); other processes return at once. Images are read and
cropped as the trainers do (ADM centre crop; the reference uses torchvision's
Resize(256) + CenterCrop(256)). ``random_init`` builds random networks of
``texture_vae_preset`` (tests, smoke runs).
"""
from __future__ import annotations

import concurrent.futures
import json
import os
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from sfd_jax.checkpoint import runs
from sfd_jax.convert import lpips as lpips_convert
from sfd_jax.convert import networks
from sfd_jax.core import checks, options
from sfd_jax.core import images as images_lib
from sfd_jax.core import writers as writers_lib
from sfd_jax.core.errors import ConfigError
from sfd_jax.data import images as data_images
from sfd_jax.metrics import features as features_lib
from sfd_jax.metrics import reconstruction


LPIPS_EMPTY = ("config.eval_tokenizer.lpips is empty: convert the LPIPS weights once (python "
               "-m sfd_jax.convert.lpips --vgg ... --lin ... --dst DIR) and point the field "
               "at DIR")


class TokenizerEvalError(ConfigError):
  """config.eval_tokenizer is incomplete or names files that cannot be used."""


def check(config: ml_collections.ConfigDict) -> None:
  """The fields (``core.options``), the held-out images and the LPIPS network named, before
  the workdir is touched."""
  checks.require_sections(config, ("eval_tokenizer", "data"), mode="eval_tokenizer",
                          example="configs/texture_vae_f16d32_vavae.py")
  options.check(config)
  e = config.eval_tokenizer
  if not (e.get("images") or config.data.get("eval_path", "")):
    raise TokenizerEvalError("config.eval_tokenizer.images is empty (and data.eval_path "
                             "too): point it at a folder of held-out images")
  if not e.get("lpips") and not e.get("random_init", False):
    raise TokenizerEvalError(LPIPS_EMPTY)


def _vae(e):
  if e.get("random_init", False):
    model = networks.load_network("texture_vae", "", random_init=True,
                                  preset=e.get("texture_vae_preset", "tiny"), seed=int(e.seed))
    return model, f"random {e.get('texture_vae_preset', 'tiny')}"
  step = int(e.get("step", -1))
  return runs.load_texture_vae(e.checkpoint, weights=e.get("weights", "params"),
                               step=None if step < 0 else step,
                               field="config.eval_tokenizer.checkpoint")


def _lpips(e):
  if e.get("random_init", False) and not e.get("lpips"):
    return lpips_convert.random_lpips(int(e.seed), width=float(e.get("lpips_random_width", 1.0)))
  if not e.get("lpips"):
    raise TokenizerEvalError(LPIPS_EMPTY)
  return lpips_convert.load_lpips(e.lpips)


def _batches(source, transform, batch: int, limit: int, threads: int):
  """(uint8 images, valid mask, first index) per batch of ``batch`` in source order."""
  total = len(source) if limit <= 0 else min(limit, len(source))
  load = lambda i: transform(source[i])  # noqa: E731
  with concurrent.futures.ThreadPoolExecutor(max(1, threads)) as pool:
    for start in range(0, total, batch):
      elems = list(pool.map(load, range(start, min(start + batch, total))))
      yield [e["image"] for e in elems if e is not None], start


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  check(config)
  e = config.eval_tokenizer
  images_dir = e.get("images") or config.data.get("eval_path", "")
  if jax.process_index() != 0:
    return {}
  out_dir = os.path.join(workdir, "eval_tokenizer")
  os.makedirs(out_dir, exist_ok=True)
  vae, vae_name = _vae(e)
  lp = _lpips(e)
  devices = jax.local_devices()
  n_dev = len(devices)
  bs = max(n_dev, int(e.batch_size) // n_dev * n_dev)
  mesh = Mesh(np.asarray(devices), ("data",))
  batch_sh = NamedSharding(mesh, P("data"))
  rep = NamedSharding(mesh, P())
  feature_fn = None
  kind = e.get("features", "inception")
  if kind:
    path = e.get("inception", "") if kind == "inception" else e.get("features_path", "")
    feature_fn = features_lib.load_extractor(kind, path, batch_size=bs,
                                             preprocess=e.get("preprocess", "pytorch_fid"),
                                             in_sharding=batch_sh,
                                             field="config.eval_tokenizer.features")
  vae_graph, vae_state = nnx.split(vae)
  lp_graph, lp_state = nnx.split(lp)
  vae_state, lp_state = jax.device_put((vae_state, lp_state), rep)
  base_key = jax.random.key(int(e.seed))
  sample = bool(e.get("sample_posterior", True))

  @jax.jit
  def evaluate(vae_state, lp_state, images, first):
    model = nnx.merge(vae_graph, vae_state)
    x = images.astype(jnp.float32) / 127.5 - 1.0
    posterior = model.encode(x)
    if sample:   # image i draws its noise from fold_in(key(seed), i): batch-size independent
      keys = jax.vmap(lambda i: jax.random.fold_in(base_key, i))(first + jnp.arange(x.shape[0]))
      eps = jax.vmap(lambda k: jax.random.normal(k, posterior.mean.shape[1:]))(keys)
      z = posterior.sample(eps=eps)
    else:
      z = posterior.mode()
    recon = model.decode(z)
    return reconstruction.per_image_metrics(images, recon, nnx.merge(lp_graph, lp_state))

  source = data_images.ImageFolderSource(images_dir)
  transform = data_images.CenterCropTransform(int(e.image_size))
  acc = reconstruction.ReconstructionMetrics(feature_fn)
  grid_real, grid_fake = [], []
  want_grid = int(e.get("grid_images", 8))
  for imgs, start in _batches(source, transform, bs, int(e.get("max_images", 0)),
                              int(e.get("read_threads", 8))):
    if not imgs:
      continue
    n = len(imgs)
    arr = np.stack(imgs + [imgs[0]] * (bs - n))          # pad the tail, drop it below
    out = jax.device_get(evaluate(vae_state, lp_state, jax.device_put(arr, batch_sh),
                                  jnp.int32(start)))
    out = {k: np.asarray(v)[:n] for k, v in out.items()}
    acc.add(arr[:n], out)
    if len(grid_real) < want_grid:
      grid_real.extend(arr[:n][:want_grid - len(grid_real)])
      grid_fake.extend(out["recon_uint8"][:want_grid - len(grid_fake)])
  if not acc.count:
    raise TokenizerEvalError(f"{images_dir}: no readable image")
  metrics = acc.result()
  info = {"metrics": metrics, "tokenizer": vae_name, "images": os.path.abspath(images_dir),
          "image_size": int(e.image_size), "sample_posterior": sample,
          "features": kind or "", "preprocess": e.get("preprocess", "pytorch_fid")}
  with open(os.path.join(out_dir, "metrics.json"), "w") as f:
    json.dump(info, f, indent=2, default=str)
  writer = writers_lib.create_writer(out_dir, kind=str(config.get("writer", "auto") or "auto"))
  step = int(e.get("tb_step", 0))
  writer.write_scalars(step, {f"eval_tokenizer/{k}": v
                              for k, v in reconstruction.finite(metrics).items()})
  if grid_real:
    grid = images_lib.image_grid(np.concatenate([np.stack(grid_real), np.stack(grid_fake)]),
                                 cols=len(grid_real), pad=1)
    images_lib.save_png(grid, os.path.join(out_dir, "reconstructions.png"))
    writer.write_images(step, {"eval_tokenizer/reconstructions": grid[None]})
  writer.close()
  logging.info("eval_tokenizer: %s", json.dumps(metrics))
  return info
