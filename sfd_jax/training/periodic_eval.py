"""Periodic evaluation inside the training loop (``config.train_eval``).

Every ``every_steps`` steps (and at the last step) the training job samples
``num_images`` images from the *EMA* weights it holds in memory — sharded over the
training mesh, no checkpoint round trip — decodes their texture channels with the texture
VAE (``config.sample.texture_vae``), and

* logs a grid of about ``grid_images`` samples (a row per class, evenly spaced classes) to
  TensorBoard
  (``train_eval/samples``) and to ``<workdir>/train_eval/grid_<step>.png``;
* with a feature network (``features`` = ``inception`` | ``demo``, ``features_path``)
  and a reference batch (``reference``: an ADM-format ``.npz`` with images ``arr_0``
  and/or ``mu``/``sigma``), computes FID (and an Inception Score when the network has
  a classifier), logged as ``train_eval/fid`` etc.

Each evaluation appends one JSON line to ``<workdir>/train_eval/history.jsonl`` (step,
metrics, seconds). Noise and labels are the same at every evaluation (global index ``i``
draws from ``fold_in(key(seed), i)``, labels ``i·K // N``), so grids and numbers of
successive evaluations differ only by the weights. Small ``num_images`` give a biased,
noisy FID: use it for trends, and ``--mode=eval`` for reported numbers.
"""
from __future__ import annotations

import dataclasses
import json
import os
import time
from typing import TYPE_CHECKING, Any

import jax
import jax.numpy as jnp
import numpy as np
from absl import logging

from sfd_jax import parallel, sampling
from sfd_jax.core import images as images_lib
from sfd_jax.core import jit as jit_lib
from sfd_jax.core.errors import ConfigError
from sfd_jax.diffusion import generation
from sfd_jax.metrics import adm
from sfd_jax.metrics import features as features_lib
from sfd_jax.metrics import fid as fidlib
from sfd_jax.parallel.multihost import gather

if TYPE_CHECKING:
  import ml_collections


class TrainEvalError(ConfigError):
  """config.train_eval asks for something the run cannot do."""


def enabled(config: ml_collections.ConfigDict) -> bool:
  return int(config.get("train_eval", {}).get("every_steps", 0) or 0) > 0


def due(config: ml_collections.ConfigDict, step: int, total: int) -> bool:
  every = int(config.train_eval.every_steps)
  return every > 0 and (step % every == 0 or step == total)


def read_history(workdir: str) -> list[dict[str, Any]]:
  """The evaluations of a run, one per step (a step evaluated twice — after a resume —
  keeps its last entry), in step order."""
  path = os.path.join(workdir, "train_eval", "history.jsonl")
  if not os.path.exists(path):
    return []
  rows: dict[int, dict[str, Any]] = {}
  with open(path) as f:
    for line in f:
      if line.strip():
        row = json.loads(line)
        rows[int(row["step"])] = row
  return [rows[k] for k in sorted(rows)]


def grid_selection(n: int, num_classes: int, grid_images: int,
                   labels: np.ndarray | None = None) -> tuple[np.ndarray, int]:
  """Which of ``n`` samples to show: rows of evenly spaced classes, the first samples of
  each class along a row (``labels``: of the n samples, default class-balanced). Returns
  (indices, columns); -1 marks an empty cell."""
  rows = max(1, min(num_classes, n, int(np.ceil(np.sqrt(grid_images)))))
  cols = max(1, grid_images // rows)
  if labels is None:
    labels = generation.balanced_labels(np.arange(n), n, num_classes)
  chosen = []
  for c in np.linspace(0, num_classes - 1, rows).round().astype(int):
    members = np.flatnonzero(labels == c)[:cols]
    chosen.extend(members.tolist() + [-1] * (cols - len(members)))
  return np.asarray(chosen), cols


class PeriodicEvaluator:
  """Samples from the in-memory EMA weights of a ``TrainSetup`` and scores the images."""

  def __init__(self, config: ml_collections.ConfigDict, setup, workdir: str):
    te = config.train_eval
    self.te, self.setup = te, setup
    self.out_dir = os.path.join(workdir, "train_eval")
    self.n, self.bs = int(te.num_images), int(te.batch_size)
    if self.n < 1:
      raise TrainEvalError(f"config.train_eval.num_images must be positive, got {self.n}")
    batch_devices = parallel.batch_devices(setup.mesh)
    if self.bs < 1 or self.bs % batch_devices:
      raise TrainEvalError(f"config.train_eval.batch_size={self.bs} must be a positive "
                           f"multiple of the {batch_devices} devices of the batch axes")
    self.decoder = sampling.load_decoder(config)
    if self.decoder is None:
      raise TrainEvalError("config.train_eval.every_steps > 0 needs decoded images: set "
                           "config.sample.texture_vae (a converted texture VAE directory)")
    if setup.model_cfg is not None:
      sch = getattr(setup.obj_cfg, "schedule", None)
      tex = None if sch is None else sch.parts[
          sch.names.index("texture") if "texture" in sch.names else 0].channels
      generation.check_decoder(setup.model_cfg, self.decoder, texture_channels=tex)
    if te.features and not te.reference:
      raise TrainEvalError(f"config.train_eval.features={te.features!r} needs "
                           "config.train_eval.reference (an ADM-format .npz)")
    if te.reference and not os.path.exists(te.reference):
      raise TrainEvalError(f"config.train_eval.reference={te.reference!r} does not exist")
    self.opts = dataclasses.replace(
        generation.SamplingOptions.from_config(te, "config.train_eval"),
        schedule=getattr(setup.obj_cfg, "schedule", None))
    if setup.model_cfg is not None:
      generation.check_method(setup.model_cfg, self.opts, "config.train_eval",
                              "the model of this run (config.objective.name="
                              f"{getattr(setup.obj_cfg, 'name', 'flow_matching')!r})")
    if te.guidance == "autoguidance":
      raise TrainEvalError("config.train_eval.guidance: 'autoguidance' needs a separate guide "
                           "model; use 'cfg' or 'none' during training")
    self._extractor, self._ref = None, None
    self._build()

  def _build(self) -> None:
    setup, mesh = self.setup, self.setup.mesh
    rep = parallel.replicated(mesh)
    self.batch_sh = parallel.batch_sharding(mesh)
    s_dec, p_dec = self.decoder.split()
    self.p_dec = jax.device_put(p_dec, rep)
    opts = self.opts

    def gen(ema, pd, indices, labels, key):
      return generation.generate(setup.model(ema), None,
                                 generation.LatentDecoder.merge(s_dec, pd), indices, labels,
                                 key, opts)[0]

    options = dict(jit_lib.inference_options(jit_lib.compiler_options(self.te)))
    self._gen = jax.jit(gen, in_shardings=(setup.state_shardings["ema"], rep, self.batch_sh,
                                           self.batch_sh, rep),
                        out_shardings=self.batch_sh, compiler_options=options or None)

  def _features(self):
    te = self.te
    if not te.features:
      return None, None
    if self._extractor is None:
      self._extractor = features_lib.load_extractor(
          te.features, te.features_path, batch_size=int(te.feature_batch_size),
          preprocess=te.preprocess, field="config.train_eval.features")
      self._ref = adm.batch_statistics(te.reference, self._extractor, cache=True)
    return self._extractor, self._ref

  def labels(self, indices) -> np.ndarray:
    cfg = self.setup.model_cfg
    return generation.sample_labels(indices, self.n, cfg.num_classes, self.opts,
                                    has_null=cfg.class_dropout_prob > 0,
                                    where="config.train_eval")

  def sample(self, ema) -> np.ndarray:
    """uint8 [num_images, H, W, 3] from the EMA params (identical on every process)."""
    out = []
    key = jax.random.key(self.opts.seed + 1)
    with jax.set_mesh(self.setup.mesh):
      for start in range(0, self.n, self.bs):
        idx = np.arange(start, start + self.bs)
        labels = self.labels(idx)
        ind = jax.device_put(jnp.asarray(idx, jnp.int32), self.batch_sh)
        lab = jax.device_put(jnp.asarray(labels), self.batch_sh)
        imgs = self._gen(ema, self.p_dec, ind, lab, jax.random.fold_in(key, start))
        out.append(gather(imgs)[:self.n - start])
    return np.concatenate(out)

  def __call__(self, step: int, state, writer) -> dict[str, float]:
    t0 = time.time()
    images = self.sample(state["ema"])
    if jax.process_index() != 0:
      return {}
    metrics: dict[str, float] = {}
    extractor, ref = self._features()
    if extractor is not None:
      feats: dict[str, list[np.ndarray]] = {}
      for s in range(0, len(images), extractor.batch_size):
        for k, v in extractor(images[s:s + extractor.batch_size]).items():
          feats.setdefault(k, []).append(v)
      pool = np.concatenate(feats["pool"])
      metrics["fid"] = fidlib.compute_statistics(pool, "pool").frechet_distance(ref.fid)
      if "logits" in feats:
        metrics["inception_score"] = fidlib.inception_score(np.concatenate(feats["logits"]))
    metrics["seconds"] = time.time() - t0
    os.makedirs(self.out_dir, exist_ok=True)
    sel, cols = grid_selection(self.n, self.setup.model_cfg.num_classes,
                               int(self.te.grid_images), self.labels(np.arange(self.n)))
    blank = np.zeros_like(images[0])
    grid = images_lib.image_grid(np.stack([images[i] if i >= 0 else blank for i in sel]), cols=cols,
                      pad=1, pad_value=96)
    images_lib.save_png(grid, os.path.join(self.out_dir, f"grid_{step:07d}.png"))
    writer.write_images(step, {"train_eval/samples": grid[None]})
    writer.write_scalars(step, {f"train_eval/{k}": v for k, v in metrics.items()})
    with open(os.path.join(self.out_dir, "history.jsonl"), "a") as f:
      f.write(json.dumps({"step": int(step), **metrics}) + "\n")
    logging.info("train_eval at step %d: %s", step,
                 ", ".join(f"{k} {v:.4g}" for k, v in metrics.items()))
    return metrics
