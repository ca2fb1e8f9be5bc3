"""Sampling runs to files: the decoder and networks a config names, the resumable run
that writes numbered images, the ``samples_<N>.npz`` of the reference's evaluation, and
the sampling job's body (``sample_from_config``). The sampling job, the evaluation job,
the demo and the in-training evaluation use it; the math is ``sfd_jax.diffusion``.

Outputs of ``sample_to_directory``: ``{index:06d}.png`` (or ``{index:06d}.npy`` latents),
and at the end ``samples_<N>.npz`` with ``arr_0`` uint8 [N, H, W, 3] shuffled with Python
``random.seed(42)`` as the reference's evaluation script does. Batches are fixed ranges
of ``batch_size`` global indices, so any number of devices or processes writes the same
images; finished batches are skipped on restart.
"""
from __future__ import annotations

import dataclasses
import json
import os
import random
import time
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging
from flax import nnx
from jax.sharding import NamedSharding, PartitionSpec as P
from PIL import Image

from sfd_jax import checkpoint, parallel
from sfd_jax.core import checks, errors, options, progress
from sfd_jax.core import images as images_lib
from sfd_jax.core import jit as jit_lib
from sfd_jax.data import stats as stats_lib
from sfd_jax.diffusion import clocks
from sfd_jax.diffusion.generation import (LatentDecoder, SamplingError, SamplingOptions,
                                          check_decoder, check_guide, check_method, generate,
                                          sample_labels)
from sfd_jax.models import attention
from sfd_jax.models.lightning_dit import LightningDiT
from sfd_jax.parallel.multihost import gather, process_barrier


def load_decoder(config) -> LatentDecoder | None:
  """The ``LatentDecoder`` of ``config.sample.texture_vae`` with the latent statistics
  (``config.sample.stats``, else ``config.data.stats`` / ``config.data.path``; none with
  ``config.data.normalize=False``: texture = latent / multiplier); None when the field
  is empty (then latents are written instead of images)."""
  if not config.sample.get("texture_vae", ""):
    return None
  try:
    vae = checkpoint.load_texture_vae(config.sample.texture_vae,
                                      field="config.sample.texture_vae")
  except errors.UserError as e:
    text = str(e)
    raise SamplingError(text if text.startswith("config.sample.texture_vae") else
                        f"config.sample.texture_vae={config.sample.texture_vae!r}: {text}") from e
  multiplier = float(config.data.get("latent_multiplier", 1.0))
  if not config.data.get("normalize", True):     # latents = stored · multiplier
    return LatentDecoder(vae, jnp.zeros((), jnp.float32), jnp.ones((), jnp.float32),
                         multiplier)
  path = config.sample.get("stats", "") or config.data.get("stats", "") or config.data.path
  if not path:
    raise SamplingError("decoding needs latent statistics: set config.sample.stats or "
                        "config.data.path (or config.data.normalize=False)")
  try:
    stats = stats_lib.load_stats(path)
  except errors.UserError as e:
    field = ("config.sample.stats" if config.sample.get("stats", "") else
             "config.data.stats" if config.data.get("stats", "") else "config.data.path")
    raise SamplingError(f"{field}={path!r}: {e}") from e
  return LatentDecoder(vae, jnp.asarray(stats.texture_mean, jnp.float32),
                       jnp.asarray(stats.texture_std, jnp.float32), multiplier)


def schedule_of(config, checkpoint_path: str = "") -> clocks.Schedule | None:
  """The clock schedule to sample with: ``config.schedule`` if the config has one, else
  the one saved with the checkpoint's run config, else None (SFD's two parts from the
  model). A bad section is a ``SamplingError`` naming the field."""
  sources = [config]
  if checkpoint_path and checkpoint.is_run(checkpoint_path):
    try:
      sources.append(checkpoint.read_config(checkpoint_path))
    except errors.CheckpointError:
      pass
  for src in sources:
    sec = src.get("schedule") if hasattr(src, "get") else None
    if sec is not None and sec.get("parts"):
      try:
        return clocks.from_config(src)
      except clocks.ScheduleError as e:
        raise SamplingError(str(e)) from e
  return None


def validate_config(config, section: str = "sample") -> SamplingOptions:
  """The config's fields (``core.options``) and the sampling options of
  ``config.<section>`` across fields (``SamplingOptions.validate``), checked before any
  model is loaded; returns the options."""
  checks.require_sections(config, (section, "data"), mode="sample",
                          example="configs/sfd_xl.py")
  options.check(config)
  opts = SamplingOptions.from_config(config[section], f"config.{section}")
  if section == "sample" and opts.guidance == "autoguidance" and opts.scale > 1 and not (
      config.sample.get("guide_checkpoint", "")):
    raise SamplingError("config.sample.guidance='autoguidance' with scale > 1 needs "
                        "config.sample.guide_checkpoint (the guide model); set it, or use "
                        "guidance 'cfg' / 'none'")
  return opts


def _done(out_dir: str, indices, ext: str) -> bool:
  return all(os.path.exists(os.path.join(out_dir, f"{i:06d}.{ext}")) for i in indices)


def _write(out_dir: str, rows: np.ndarray, start: int, ext: str) -> None:
  """Process 0 writes rows as {index:06d}.{png,npy}, each atomically (tmp + rename)."""
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


def sample_to_directory(model, guide, decoder: LatentDecoder | None, opts: SamplingOptions,
                        out_dir: str, *, num_images: int, batch_size: int,
                        devices=None, compiler_options=()) -> dict[str, Any]:
  """Samples ``num_images`` (labels as ``opts.labels``) into ``out_dir``; resumes;
  packs the npz and writes the labels of the N samples, in index order, to
  ``labels_<N>.npy``.

  ``batch_size`` is global; the batch is split over ``devices`` (default: all).
  ``compiler_options``: XLA options of the sampling program as (name, value) pairs;
  none given: ``core.jit.inference_options``' defaults (on CPU, Eigen dots).
  """
  os.makedirs(out_dir, exist_ok=True)
  cfg = model.cfg
  mesh = parallel.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}, devices)
  n, bs = int(num_images), int(batch_size)
  if bs % mesh.size:
    raise SamplingError(f"config.sample.batch_size={bs} is not divisible by the "
                        f"{mesh.size} devices")
  batch_sh = NamedSharding(mesh, P("data"))
  rep = NamedSharding(mesh, P())

  g_model, p_model = nnx.split(model)
  p_model = jax.device_put(p_model, rep)
  g_guide, p_guide = nnx.split(guide) if guide is not None else (None, None)
  p_guide = jax.device_put(p_guide, rep) if guide is not None else None
  s_dec, p_dec = decoder.split() if decoder is not None else (None, None)
  p_dec = jax.device_put(p_dec, rep) if decoder is not None else None

  def generate_batch(pm, pg, pd, indices, labels, key):
    gd = nnx.merge(g_guide, pg) if pg is not None else None
    dec = LatentDecoder.merge(s_dec, pd) if pd is not None else None
    return generate(nnx.merge(g_model, pm), gd, dec, indices, labels, key, opts)

  options = dict(jit_lib.inference_options(tuple(compiler_options)))
  if options:
    logging.info("sampling: XLA compiler options %s", options)
  gen = jax.jit(generate_batch, out_shardings=(batch_sh, rep), compiler_options=options or None)
  ext = "png" if decoder is not None else "npy"
  t0, done_images, total_nfe, batches_run = time.time(), 0, 0, 0
  num_batches = -(-n // bs)
  bar = progress.track(n, f"sampling {os.path.basename(out_dir.rstrip('/')) or out_dir}",
                       "images", enabled=jax.process_index() == 0)
  for b in range(num_batches):
    start = b * bs
    idx = np.arange(start, start + bs)
    real = idx[idx < n]
    if _done(out_dir, real, ext):
      bar.update(len(real))
      continue
    labels = sample_labels(idx, n, cfg.num_classes, opts,
                           has_null=cfg.class_dropout_prob > 0)
    ind = jax.device_put(jnp.asarray(idx, jnp.int32), batch_sh)
    lab = jax.device_put(jnp.asarray(labels), batch_sh)
    key = jax.random.fold_in(jax.random.key(opts.seed + 1), b)
    with attention.use_mesh(mesh):   # the splash kernel (TPU) is placed per device
      imgs, nfe = gen(p_model, p_guide, p_dec, ind, lab, key)
    _write(out_dir, gather(imgs)[:len(real)], start, ext)
    nfe = int(nfe)
    done_images += len(real)
    total_nfe += nfe
    batches_run += 1
    bar.update(len(real))
    logging.debug("sampled batch %d/%d (%d images, NFE %d)", b + 1, num_batches, len(real),
                  nfe)
  bar.close()
  if done_images:
    logging.info("sampled %d images in this run (NFE %d per batch on average)", done_images,
                 round(total_nfe / max(1, -(-done_images // bs))))
  process_barrier("sampling_done")
  result = {"num_images": n, "out_dir": out_dir, "images_per_sec_this_run":
            done_images / max(time.time() - t0, 1e-9), "format": ext,
            "compiler_options": options,
            "nfe_per_batch": total_nfe / batches_run if batches_run else None}
  if jax.process_index() == 0:
    labels_path = os.path.join(out_dir, f"labels_{n}.npy")
    np.save(labels_path, sample_labels(np.arange(n), n, cfg.num_classes, opts,
                                       has_null=cfg.class_dropout_prob > 0))
    result["labels"] = labels_path
    if ext == "png":
      result["npz"] = pack_npz(out_dir, n)
  return result


def pack_npz(out_dir: str, n: int) -> str:
  """Packs the N PNGs into ``samples_<N>.npz`` (``arr_0``), shuffled as the reference."""
  files = images_lib.numbered_pngs(out_dir, n)
  missing = [f for f in files if not os.path.exists(f)]
  if missing:
    raise SamplingError(f"{len(missing)} sample images missing, e.g. {missing[0]}")
  random.seed(42)
  random.shuffle(files)
  arr = images_lib.load_pngs(files)
  path = os.path.join(out_dir, f"samples_{n}.npz")
  np.savez(path + ".tmp.npz", arr_0=arr)
  os.replace(path + ".tmp.npz", path)
  logging.info("wrote %s %s", path, arr.shape)
  return path


def with_compute_dtype(model, dtype: str):
  """The same LightningDiT (weights shared, kept in their dtype) computing its matmuls in
  ``dtype`` (``config.sample.dtype``: "float32" default, "bfloat16" faster on GPU/TPU)."""
  if model is None or model.cfg.dtype == dtype:
    return model
  cfg = dataclasses.replace(model.cfg, dtype=str(jnp.dtype(dtype)))
  graphdef = nnx.graphdef(nnx.eval_shape(lambda: LightningDiT(cfg, rngs=nnx.Rngs(0))))
  return nnx.merge(graphdef, nnx.state(model))


def _step(section, field: str) -> int | None:
  step = int(section.get(field, -1))
  return None if step < 0 else step


def prepare(config):
  """(model, guide or None, decoder or None, options) named by ``config.sample``.

  What fits together is checked before any weights are read: the guide against the main
  model, the texture VAE and the statistics against the model's texture channels.
  ``checkpoint_step`` / ``guide_step`` pick a step of a training workdir (-1: latest),
  e.g. the paper's 70K / 120K B/1 guides from one guide run.
  """
  s = config.sample
  opts = validate_config(config)
  dtype = s.get("dtype", "float32") or "float32"
  try:
    autoguidance = opts.guidance == "autoguidance" and opts.guided
    if not autoguidance and _step(s, "guide_step") is not None:
      raise SamplingError(f"config.sample.guide_step={s.guide_step}: no guide is loaded "
                          "(guidance is not 'autoguidance' with scale > 1)")
    main_cfg = checkpoint.dit_config(s.checkpoint, "config.sample.checkpoint")
    check_method(main_cfg, opts, what=f"config.sample.checkpoint={s.checkpoint!r}")
    if autoguidance:
      guide_cfg = checkpoint.dit_config(s.guide_checkpoint, "config.sample.guide_checkpoint")
      check_guide(main_cfg, guide_cfg)
      check_method(guide_cfg, opts, what=f"the guide, config.sample.guide_checkpoint="
                   f"{s.guide_checkpoint!r},")
    decoder = load_decoder(config)
    sch = schedule_of(config, s.checkpoint)
    tex_part = None if sch is None else sch.parts[
        sch.names.index("texture") if "texture" in sch.names else 0].channels
    check_decoder(main_cfg, decoder, texture_channels=tex_part)
    model = checkpoint.load_dit(s.checkpoint, "config.sample.checkpoint",
                                step=_step(s, "checkpoint_step"))
    guide = None
    if autoguidance:
      guide = checkpoint.load_dit(s.guide_checkpoint, "config.sample.guide_checkpoint",
                                  step=_step(s, "guide_step"))
      check_guide(model.cfg, guide.cfg)
    model, guide = with_compute_dtype(model, dtype), with_compute_dtype(guide, dtype)
  except errors.CheckpointError as e:
    raise SamplingError(str(e)) from e
  if sch is not None:
    if sch.channels != model.cfg.in_channels:
      raise SamplingError(f"config.schedule has {sch.channels} channels but the model in "
                          f"config.sample.checkpoint has {model.cfg.in_channels}")
    opts = dataclasses.replace(opts, schedule=sch)
  return model, guide, decoder, opts


def check_config(config, devices=None) -> SamplingOptions:
  """``validate_config``, the batch against the devices (``devices``: default all) and the
  kind of the networks named (a LightningDiT, its guide, a texture VAE): what
  ``sample_from_config`` checks before it writes anything."""
  opts = validate_config(config)
  n_dev = len(devices) if devices is not None else jax.device_count()
  if int(config.sample.batch_size) % n_dev:
    raise SamplingError(f"config.sample.batch_size={int(config.sample.batch_size)} is not "
                        f"divisible by the {n_dev} devices; use a multiple of {n_dev}")
  s = config.sample
  try:      # the networks named are of the right kind (nothing read but their configs)
    checkpoint.dit_config(s.checkpoint, "config.sample.checkpoint")
    if opts.guidance == "autoguidance" and opts.guided:
      checkpoint.dit_config(s.guide_checkpoint, "config.sample.guide_checkpoint")
    if s.get("texture_vae", ""):
      checkpoint.check_texture_vae(s.texture_vae, "config.sample.texture_vae")
  except errors.CheckpointError as e:
    raise SamplingError(str(e)) from e
  return opts


def sample_from_config(config, workdir: str, devices=None) -> dict[str, Any]:
  """``config.sample`` end to end: load, sample into ``<workdir>/samples`` (resumable),
  write ``<workdir>/sample_info.json``."""
  check_config(config, devices)
  errors.check_writable(os.path.join(workdir, "samples"), "the samples directory")
  model, guide, decoder, opts = prepare(config)
  result = sample_to_directory(
      model, guide, decoder, opts, os.path.join(workdir, "samples"),
      num_images=int(config.sample.num_images), batch_size=int(config.sample.batch_size),
      devices=devices, compiler_options=jit_lib.compiler_options(config.sample))
  if jax.process_index() == 0:
    with open(os.path.join(workdir, "sample_info.json"), "w") as f:
      json.dump({**result, "config": config.sample.to_dict()}, f, indent=2, default=str)
  return result
