"""The sampling job: ``python main.py --config=... --mode=sample --workdir=DIR``.

Fields of ``config.sample``: ``checkpoint`` (a converted/exported directory with
``meta.json``, or a training workdir / checkpoints dir: its EMA weights are used),
``guide_checkpoint`` (autoguidance guide, same two kinds), ``guidance`` (none | cfg |
autoguidance), ``scale``, ``method`` (euler | heun | dopri5 | sde), ``num_steps``, ``atol``,
``rtol``, ``num_images``, ``batch_size`` (global), ``seed``, ``texture_vae`` (converted
texture VAE directory; empty: write latents instead of images), ``stats`` (latent stats
file; default ``config.data.stats`` or ``<config.data.path>/stats.npz``).

Determinism: the label of global sample index ``i`` is ``i·num_classes // N`` (balanced,
``i // 50`` for 50k images as the reference) and its noise is drawn from
``fold_in(key(seed), i)``. Batches are fixed ranges of indices of ``batch_size`` (global),
so any number of devices or processes produces the same images (dopri5's shared step
sizes included). Finished batches are skipped on restart.

Outputs in ``<workdir>/samples``: ``{index:06d}.png`` (or ``{index:06d}.npy`` latents),
and at the end ``samples_<N>.npz`` with ``arr_0`` uint8 [N, H, W, 3] shuffled with Python
``random.seed(42)`` as the reference's evaluation script does.
"""
from __future__ import annotations

import json
import os
import random
import time
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P

from sfd_jax import checkpoint as ckpt_lib
from sfd_jax import parallel
from sfd_jax.convert import lightning_dit as dit_conv
from sfd_jax.convert.common import assign
from sfd_jax.diffusion import guidance, samplers
from sfd_jax.models.lightning_dit import DiTConfig, LightningDiT


class SamplingError(ValueError):
  pass


# ---------------------------------------------------------------- loading models


def load_dit(path: str, what: str = "checkpoint") -> LightningDiT:
  """A LightningDiT from a converted/exported dir or from a training run's EMA weights.

  Training runs are read with ``sfd_jax.export.restore_weights``: only the EMA subtree,
  straight to host memory (no optimizer state, no mesh).
  """
  if not path:
    raise SamplingError(f"config.sample.{what} is empty: give a converted checkpoint "
                        "directory or a training workdir")
  path = os.path.abspath(path)
  if os.path.exists(os.path.join(path, "meta.json")):
    return dit_conv.load_converted(path)
  from sfd_jax import export  # pylint: disable=import-outside-toplevel
  ckdir = export.checkpoint_dir(path)
  if not os.path.isdir(ckdir) or not any(d.isdigit() for d in os.listdir(ckdir)):
    raise SamplingError(f"config.sample.{what}={path}: neither a converted checkpoint "
                        "(meta.json) nor a training run (checkpoints/<step>/)")
  params, model_cfg, step, _ = export.restore_weights(ckdir, weights="ema")
  model = LightningDiT(model_cfg, rngs=nnx.Rngs(0))
  assign(model, params, name=f"{ckdir}/{step} ema")
  logging.info("loaded EMA weights of %s/%d", ckdir, step)
  return model


def check_guide(main: DiTConfig, guide: DiTConfig) -> None:
  for field in ("in_channels", "semantic_chans", "input_size", "patch_size", "delta_t",
                "num_classes"):
    a, b = getattr(main, field), getattr(guide, field)
    if a != b:
      raise SamplingError(f"guide model has {field}={b} but the main model has {field}={a}: "
                          "the guide must use the same latent layout and clocks")


# ---------------------------------------------------------------- labels and noise


def balanced_labels(indices: np.ndarray, num_images: int, num_classes: int) -> np.ndarray:
  """Class of global index i: i·K // N (== i // (N/K) when K divides N)."""
  return (np.asarray(indices, np.int64) * num_classes // num_images).astype(np.int32)


def noise_for(indices: jax.Array, seed: int, shape: tuple[int, ...]) -> jax.Array:
  base = jax.random.key(seed)
  size = int(np.prod(shape))
  return jax.vmap(lambda i: jax.random.normal(jax.random.fold_in(base, i), (size,))
                  .reshape(shape))(indices)


# ---------------------------------------------------------------- decoding


def load_stats_for(config) -> Any:
  from sfd_jax.data import stats as stats_lib  # pylint: disable=import-outside-toplevel
  path = config.sample.get("stats", "") or config.data.get("stats", "") or config.data.path
  if not path:
    raise SamplingError("decoding needs latent statistics: set config.sample.stats or "
                        "config.data.path")
  return stats_lib.load_stats(path)


def load_decoder(config):
  """(texture VAE, (mean, std, latent_multiplier)) for ``config.sample.texture_vae``, or
  (None, None) when the field is empty (then latents are written instead of images)."""
  if not config.sample.get("texture_vae", ""):
    return None, None
  from sfd_jax.convert.texture_vae import load_converted_texture_vae  # pylint: disable=import-outside-toplevel
  decoder = load_converted_texture_vae(config.sample.texture_vae)
  stats = load_stats_for(config)
  norm = (jnp.asarray(stats.texture_mean, jnp.float32), jnp.asarray(stats.texture_std,
                                                                    jnp.float32),
          float(config.data.get("latent_multiplier", 1.0)))
  return decoder, norm


def to_uint8(images: jax.Array) -> jax.Array:
  """[-1, 1] → uint8 as the reference: clamp(127.5·x + 128, 0, 255) then truncate."""
  return jnp.clip(127.5 * images.astype(jnp.float32) + 128.0, 0, 255).astype(jnp.uint8)


# ---------------------------------------------------------------- one batch


def generate(model: LightningDiT, guide: LightningDiT | None, decoder, indices: jax.Array,
             labels: jax.Array, key: jax.Array, opts, latent_norm=None):
  """Samples one batch (call inside jit); returns (uint8 images or latents, NFE).

  ``opts``: the fields of ``config.sample`` (guidance, scale, method, num_steps, atol,
  rtol, timestep_shift, seed). Noise of row ``r`` comes from global index ``indices[r]``.
  With a texture VAE ``decoder`` the texture channels are de-normalised with
  ``latent_norm = (mean, std, latent_multiplier)`` and decoded to uint8 [N, H, W, 3];
  without one the normalised latents are returned.
  """
  cfg = model.cfg
  fn = guidance.make_guided_velocity(model, guide, mode=opts["guidance"],
                                     scale=float(opts["scale"]))
  z = noise_for(indices, int(opts["seed"]), (cfg.input_size, cfg.input_size, cfg.in_channels))
  out = samplers.sample(fn, z, labels, method=opts["method"], num_steps=int(opts["num_steps"]),
                        delta_t=cfg.delta_t, semantic_chans=cfg.semantic_chans,
                        atol=float(opts["atol"]), rtol=float(opts["rtol"]),
                        shift=float(opts.get("timestep_shift", 0.0)), key=key)
  if decoder is None:
    return out.x, out.nfe
  mean, std, mult = latent_norm
  tex = out.x[..., :cfg.in_channels - cfg.semantic_chans] * std / mult + mean
  return to_uint8(decoder.decode(tex)), out.nfe


# ---------------------------------------------------------------- the job


def _done(out_dir: str, indices, ext: str) -> bool:
  return all(os.path.exists(os.path.join(out_dir, f"{i:06d}.{ext}")) for i in indices)


def gather(arr: jax.Array) -> np.ndarray:
  """A batch-sharded array as one host array on every process."""
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    return np.asarray(multihost_utils.process_allgather(arr, tiled=True))
  return np.asarray(jax.device_get(arr))


def _write(out_dir: str, rows: np.ndarray, start: int, ext: str) -> None:
  """Process 0 writes rows as {index:06d}.{png,npy}, each atomically (tmp + rename)."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  if jax.process_index() != 0:
    return
  for j, row in enumerate(rows):
    path = os.path.join(out_dir, f"{start + j:06d}.{ext}")
    with open(path + ".tmp", "wb") as f:
      if ext == "png":
        Image.fromarray(row).save(f, format="PNG")
      else:
        np.save(f, row)
    os.replace(path + ".tmp", path)


def run(config: ml_collections.ConfigDict, workdir: str, devices=None) -> dict[str, Any]:
  """Runs (or resumes) the sampling job; ``devices`` defaults to all devices."""
  s = config.sample
  out_dir = os.path.join(workdir, "samples")
  os.makedirs(out_dir, exist_ok=True)
  model = load_dit(s.checkpoint, "checkpoint")
  cfg = model.cfg
  guide = None
  if s.guidance == "autoguidance" and s.scale > 1:
    guide = load_dit(s.guide_checkpoint, "guide_checkpoint")
    check_guide(cfg, guide.cfg)
  decoder, latent_norm = load_decoder(config)

  mesh = parallel.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, devices)
  n, bs = int(s.num_images), int(s.batch_size)
  if bs % mesh.size:
    raise SamplingError(f"config.sample.batch_size={bs} is not divisible by the "
                        f"{mesh.size} devices")
  batch_sh = NamedSharding(mesh, P("data"))
  rep = NamedSharding(mesh, P())

  g_model, p_model = nnx.split(model)
  p_model = jax.device_put(p_model, rep)
  if guide is not None:
    g_guide, p_guide = nnx.split(guide)
    p_guide = jax.device_put(p_guide, rep)
  else:
    g_guide, p_guide = None, None
  if decoder is not None:
    g_dec, p_dec = nnx.split(decoder)
    p_dec = jax.device_put(p_dec, rep)

  def generate_batch(pm, pg, pd, indices, labels, key):
    gd = nnx.merge(g_guide, pg) if pg is not None else None
    dec = nnx.merge(g_dec, pd) if pd is not None else None
    return generate(nnx.merge(g_model, pm), gd, dec, indices, labels, key, s, latent_norm)

  gen = jax.jit(generate_batch, out_shardings=(batch_sh, rep))
  ext = "png" if decoder is not None else "npy"
  t0, done_images, total_nfe = time.time(), 0, 0
  num_batches = -(-n // bs)
  for b in range(num_batches):
    start = b * bs
    idx = np.arange(start, start + bs)
    real = idx[idx < n]
    if _done(out_dir, real, ext):
      continue
    labels = balanced_labels(np.minimum(idx, n - 1), n, cfg.num_classes)
    ind = jax.device_put(jnp.asarray(idx, jnp.int32), batch_sh)
    lab = jax.device_put(jnp.asarray(labels), batch_sh)
    key = jax.random.fold_in(jax.random.key(s.seed + 1), b)
    imgs, nfe = gen(p_model, p_guide, p_dec if decoder is not None else None, ind, lab, key)
    _write(out_dir, gather(imgs)[:len(real)], start, ext)
    done_images += len(real)
    total_nfe += int(nfe)
    rate = done_images / max(time.time() - t0, 1e-9)
    logging.info("sampled batch %d/%d (%d images, NFE %d, %.2f images/s)", b + 1,
                 num_batches, len(real), int(nfe), rate)
  ckpt_lib.process_barrier("sampling_done")
  result = {"num_images": n, "out_dir": out_dir, "images_per_sec_this_run":
            done_images / max(time.time() - t0, 1e-9), "format": ext}
  if jax.process_index() == 0 and ext == "png":
    result["npz"] = pack_npz(out_dir, n)
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "sample_info.json"), "w") as f:
      json.dump({**result, "config": config.sample.to_dict()}, f, indent=2, default=str)
  return result


def pack_npz(out_dir: str, n: int) -> str:
  """Packs the N PNGs into ``samples_<N>.npz`` (``arr_0``), shuffled as the reference."""
  from PIL import Image  # pylint: disable=import-outside-toplevel
  files = [os.path.join(out_dir, f"{i:06d}.png") for i in range(n)]
  missing = [f for f in files if not os.path.exists(f)]
  if missing:
    raise SamplingError(f"{len(missing)} sample images missing, e.g. {missing[0]}")
  random.seed(42)
  random.shuffle(files)
  arr = np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
  path = os.path.join(out_dir, f"samples_{n}.npz")
  np.savez(path + ".tmp.npz", arr_0=arr)
  os.replace(path + ".tmp.npz", path)
  logging.info("wrote %s %s", path, arr.shape)
  return path
