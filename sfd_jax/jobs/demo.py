"""The demo's stages: real digits → texture VAE, feature net, SemVAE → composite latents →
SFD (Δt 0.3) and synchronous (Δt 0) training → guided sampling → FID, grids, plot, JSON.

``run(config, workdir)`` runs every stage whose ``<workdir>/<stage>/done.json`` is
missing, in order; a rerun skips finished stages (delete a stage's folder to redo it and
everything after it that reads it). Training stages resume from their checkpoints.

Stages (each a folder of the workdir):
  data         digits.npz (uint8 16×16 RGB images, labels, held-out mask);
               reference.npz (ADM-format ``arr_0``: training images, the FID reference);
               holdout.npz (held-out images)
  feature_net  the stand-in for DINOv2 / Inception (``sfd_jax.models.feature_net``)
  texture_vae  a small KL autoencoder (f4, 4 channels), saved as a converted texture VAE
  semvae       a Semantic VAE on the feature net's tokens (64 → 4 channels per token)
  latents      the trainer's ArrayRecord dataset + stats.npz (encode step)
  runs/dt<Δt>  one training workdir per Δt: checkpoints, TensorBoard, train_eval/ history,
               samples/ (guided sampling with the EMA weights)
and at the top: ``metrics.json``, ``samples.png`` (a row per class for each Δt),
``fid_vs_steps.png``.

The clock sweep (``config.demo.clock_sweep``, ``configs/demo.py:clocks=1``, ``make
demo-clocks``) replaces the Δt runs by one run per schedule and seed
(``runs/<schedule>_s<seed>``) and reports, per schedule, mean ± std over the seeds of the
demo FID and the class accuracy (``metrics.json`` ``summary.clock_sweep``) and a plot
``clock_sweep.png``.
"""
from __future__ import annotations

import copy
import dataclasses
import json
import os
import shutil
import time
from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from flax import nnx

from sfd_jax.convert import feature_net as feat_io
from sfd_jax.core import errors, files
from sfd_jax.core import images as images_lib
from sfd_jax.diffusion import generation
from sfd_jax.metrics import adm
from sfd_jax.metrics import features
from sfd_jax.models import feature_net as feat_lib
from sfd_jax.training import periodic_eval, sfd as sfd_training

class DemoInterrupted(RuntimeError):
  pass


def log(msg: str) -> None:
  print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_name(delta_t: float) -> str:
  return f"dt{delta_t:g}"


# ---------------------------------------------------------------- stage bookkeeping


def _done_path(workdir: str, stage: str) -> str:
  return os.path.join(workdir, stage, "done.json")


def _stage(workdir: str, stage: str, fn: Callable[[str], dict[str, Any]],
           timings: dict[str, float]) -> dict[str, Any]:
  """Runs ``fn(stage_dir)`` unless its done.json exists; returns the recorded info."""
  marker = _done_path(workdir, stage)
  if os.path.exists(marker):
    info = files.read_json(marker, what="demo stage marker (delete it to redo the stage)",
                           error=errors.DataError)
    log(f"{stage}: done earlier (delete {os.path.dirname(marker)} to redo)")
    return info
  d = os.path.join(workdir, stage)
  os.makedirs(d, exist_ok=True)
  log(f"{stage}: start")
  t0 = time.time()
  info = fn(d)
  info["seconds"] = round(time.time() - t0, 1)
  timings[stage] = info["seconds"]
  with open(marker + ".tmp", "w") as f:
    json.dump(info, f, indent=2, default=float)
  os.replace(marker + ".tmp", marker)
  log(f"{stage}: done in {info['seconds']:.1f} s")
  return info


def _fresh(d: str) -> None:
  """Empties a stage folder that holds a half-written result (no done.json)."""
  for name in os.listdir(d):
    p = os.path.join(d, name)
    shutil.rmtree(p) if os.path.isdir(p) else os.remove(p)


# ---------------------------------------------------------------- data


def load_dataset(name: str, image_size: int) -> tuple[np.ndarray, np.ndarray]:
  """(uint8 [N, S, S, 3] images, int32 labels) of a dataset that ships offline."""
  if name != "digits":
    raise ValueError(f"config.demo.dataset={name!r}: only 'digits' (scikit-learn's "
                     "load_digits) is built in")
  from PIL import Image  # pylint: disable=import-outside-toplevel
  from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
  d = load_digits()
  grey = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)      # 17 levels → 0..255
  up = np.stack([np.asarray(Image.fromarray(g).resize((image_size, image_size),
                                                      Image.BICUBIC)) for g in grey])
  return np.repeat(up[..., None], 3, axis=-1), d.target.astype(np.int32)


def _stage_data(cfg: ml_collections.ConfigDict, d: str) -> dict[str, Any]:
  images, labels = load_dataset(cfg.demo.dataset, int(cfg.demo.image_size))
  holdout = np.arange(len(images)) % int(cfg.demo.holdout_every) == 0
  np.savez(os.path.join(d, "digits.npz"), images=images, labels=labels, holdout=holdout)
  np.savez(os.path.join(d, "reference.npz"), arr_0=images[~holdout])
  np.savez(os.path.join(d, "holdout.npz"), arr_0=images[holdout])
  return {"num_train": int((~holdout).sum()), "num_holdout": int(holdout.sum()),
          "image_size": int(cfg.demo.image_size), "dataset": cfg.demo.dataset}


def _load_data(workdir: str):
  with np.load(os.path.join(workdir, "data", "digits.npz")) as z:
    images, labels, holdout = z["images"], z["labels"], z["holdout"]
  return images[~holdout], labels[~holdout], images[holdout], labels[holdout]


def _to_float(images_u8: np.ndarray) -> np.ndarray:
  return images_u8.astype(np.float32) / 127.5 - 1.0


# ---------------------------------------------------------------- small networks


def _stage_feature_net(cfg, workdir: str, d: str) -> dict[str, Any]:
  fc = cfg.demo.feature_net
  x, y, xh, yh = _load_data(workdir)
  net_cfg = feat_lib.FeatureNetConfig(image_size=int(cfg.demo.image_size),
                                      widths=tuple(fc.widths), embed_dim=int(fc.embed_dim),
                                      num_classes=int(cfg.model.num_classes))
  net, train_acc = feat_lib.train_feature_net(x, y, net_cfg, steps=int(fc.steps),
                                              batch_size=int(fc.batch_size), lr=float(fc.lr),
                                              seed=int(cfg.seed), log=log)
  held = feat_lib.accuracy(net, xh, yh)
  feat_io.save_feature_net(d, net, {"train_accuracy": train_acc, "holdout_accuracy": held})
  log(f"  feature net accuracy: train {train_acc:.3f}, held-out {held:.3f}")
  return {"train_accuracy": train_acc, "holdout_accuracy": held,
          "tokens": [net_cfg.grid ** 2, net_cfg.embed_dim]}


def _train_loop(model: nnx.Module, loss_fn, data: np.ndarray, *, steps: int, batch_size: int,
                lr: float, seed: int, name: str, log_every: int = 200) -> dict[str, float]:
  """Adam on random minibatches of ``data``; ``loss_fn(model, batch, key) -> (loss, terms)``."""
  opt = nnx.Optimizer(model, optax.adam(optax.warmup_cosine_decay_schedule(
      0.0, lr, min(50, max(steps // 10, 1)), max(steps, 2), lr * 0.1)), wrt=nnx.Param)

  @nnx.jit
  def step(model, opt, batch, key):
    (loss, terms), grads = nnx.value_and_grad(loss_fn, has_aux=True)(model, batch, key)
    opt.update(model, grads)
    return terms

  rng = np.random.default_rng(seed)
  base = jax.random.key(seed)
  terms = {}
  for i in range(steps):
    batch = jnp.asarray(data[rng.integers(0, len(data), batch_size)])
    terms = step(model, opt, batch, jax.random.fold_in(base, i))
    if (i + 1) % log_every == 0 or i + 1 == steps:
      log(f"  {name} step {i + 1}/{steps}: " +
          ", ".join(f"{k} {float(v):.4f}" for k, v in terms.items()))
  return {k: float(v) for k, v in terms.items()}


def _texture_vae_config(cfg):
  from sfd_jax.models.texture_vae import TextureVAEConfig  # pylint: disable=import-outside-toplevel
  t = cfg.demo.texture_vae
  return TextureVAEConfig(ch=int(t.ch), ch_mult=tuple(t.ch_mult), num_res_blocks_enc=1,
                          num_res_blocks_dec=1, attn_resolutions=(),
                          z_channels=int(t.z_channels), embed_dim=int(t.z_channels),
                          resolution=int(cfg.demo.image_size), num_groups=8)


def _stage_texture_vae(cfg, workdir: str, d: str) -> dict[str, Any]:
  from sfd_jax.convert import texture_vae as tvae_conv  # pylint: disable=import-outside-toplevel
  from sfd_jax.diffusion.vae_losses import texture_vae_loss  # pylint: disable=import-outside-toplevel
  from sfd_jax.models.texture_vae import TextureVAE  # pylint: disable=import-outside-toplevel
  t = cfg.demo.texture_vae
  tcfg = _texture_vae_config(cfg)
  x, _, xh, _ = _load_data(workdir)
  model = TextureVAE(tcfg, rngs=nnx.Rngs(cfg.seed + 1))
  kl_w = float(t.kl_weight)
  terms = _train_loop(model, lambda m, b, k: texture_vae_loss(m, b, k, kl_w), _to_float(x),
                      steps=int(t.steps), batch_size=int(t.batch_size), lr=float(t.lr),
                      seed=cfg.seed + 1, name="texture VAE")
  recon = nnx.jit(lambda m, b: m.decode(m.encode(b).mode()))(model, jnp.asarray(_to_float(xh)))
  mse = float(jnp.mean(jnp.square(jnp.clip(recon, -1, 1) - _to_float(xh))))
  psnr = float(10 * np.log10(4.0 / max(mse, 1e-12)))        # peak-to-peak 2 → 4
  _fresh(d)
  tvae_conv.save_converted(d, nnx.to_pure_dict(nnx.state(model, nnx.Param)), tcfg,
                           source="sfd_jax demo")
  log(f"  texture VAE held-out PSNR {psnr:.2f} dB")
  return {"holdout_psnr_db": psnr, "final_terms": terms, "latent": [
      tcfg.latent_resolution, tcfg.latent_resolution, tcfg.embed_dim]}


def _tokens(net: feat_lib.DemoFeatureNet, images_u8: np.ndarray, bs: int = 512) -> np.ndarray:
  fn = nnx.jit(lambda n, x: n.tokens(x))
  return np.concatenate([np.asarray(fn(net, jnp.asarray(_to_float(images_u8[i:i + bs]))))
                         for i in range(0, len(images_u8), bs)])


def _semvae_config(cfg):
  from sfd_jax.models.semantic_vae import SemVAEConfig  # pylint: disable=import-outside-toplevel
  s = cfg.demo.semvae
  return SemVAEConfig(input_dim=int(cfg.demo.feature_net.embed_dim),
                      bottleneck_dim=int(s.bottleneck_dim), hidden_dim=int(s.hidden_dim),
                      num_heads=int(s.num_heads), num_blocks=int(s.num_blocks))


def _stage_semvae(cfg, workdir: str, d: str) -> dict[str, Any]:
  from sfd_jax.convert import common  # pylint: disable=import-outside-toplevel
  from sfd_jax.convert.semantic_vae import MODEL_KIND  # pylint: disable=import-outside-toplevel
  from sfd_jax.diffusion.semvae_loss import semvae_loss  # pylint: disable=import-outside-toplevel
  from sfd_jax.models.semantic_vae import SemanticVAE  # pylint: disable=import-outside-toplevel
  s = cfg.demo.semvae
  scfg = _semvae_config(cfg)
  x, _, xh, _ = _load_data(workdir)
  net = feat_io.load_feature_net(os.path.join(workdir, "feature_net"))
  tok, tok_h = _tokens(net, x), _tokens(net, xh)
  model = SemanticVAE(scfg, rngs=nnx.Rngs(cfg.seed + 2))
  kl_w = float(s.kl_weight)

  def loss_fn(m, b, k):
    recon, _, kl = m(b, k)
    return semvae_loss(recon, b, kl, kl_weight=kl_w)

  terms = _train_loop(model, loss_fn, tok, steps=int(s.steps), batch_size=int(s.batch_size),
                      lr=float(s.lr), seed=cfg.seed + 2, name="Semantic VAE")
  recon = nnx.jit(lambda m, b: m.decode(m.encode(b).mode()))(model, jnp.asarray(tok_h))
  r, t = np.asarray(recon), tok_h
  cos = float(np.mean(np.sum(r * t, -1) / (np.linalg.norm(r, axis=-1) *
                                          np.linalg.norm(t, axis=-1) + 1e-8)))
  _fresh(d)
  common.save_params(d, nnx.to_pure_dict(nnx.state(model, nnx.Param)),
                     meta={"kind": MODEL_KIND, "config": dataclasses.asdict(scfg),
                           "source": "sfd_jax demo"})
  log(f"  Semantic VAE held-out per-token cosine {cos:.3f}")
  return {"holdout_token_cosine": cos, "final_terms": terms}


# ---------------------------------------------------------------- encode


def _stage_latents(cfg, workdir: str, d: str) -> dict[str, Any]:
  from sfd_jax.convert.semantic_vae import load_semantic_vae  # pylint: disable=import-outside-toplevel
  from sfd_jax.convert.texture_vae import load_converted_texture_vae  # pylint: disable=import-outside-toplevel
  from sfd_jax.data import records  # pylint: disable=import-outside-toplevel
  from sfd_jax.data import stats as stats_lib  # pylint: disable=import-outside-toplevel
  from sfd_jax.data.schema import LatentSchema  # pylint: disable=import-outside-toplevel
  x, y, _, _ = _load_data(workdir)
  net = feat_io.load_feature_net(os.path.join(workdir, "feature_net"))
  tvae = load_converted_texture_vae(os.path.join(workdir, "texture_vae"))
  semvae = load_semantic_vae(os.path.join(workdir, "semvae"))
  grid = net.cfg.grid
  if tvae.config.latent_resolution != grid:
    raise ValueError(f"texture latent grid {tvae.config.latent_resolution} differs from the "
                     f"feature-net token grid {grid}")
  base = jax.random.key(cfg.seed + 3)

  @nnx.jit
  def encode(tvae, semvae, net, imgs, idx):
    keys = jax.vmap(lambda i: jax.random.split(jax.random.fold_in(base, i)))(idx)
    tex_post = tvae.encode(imgs)
    tex = tex_post.mean + tex_post.std * jax.vmap(
        lambda k: jax.random.normal(k, tex_post.mean.shape[1:]))(keys[:, 0])
    tok = net.tokens(imgs)
    sem_post = semvae.encode(tok)
    sem = sem_post.mean + sem_post.std * jax.vmap(
        lambda k: jax.random.normal(k, sem_post.mean.shape[1:]))(keys[:, 1])
    b = imgs.shape[0]
    return tex, sem.reshape(b, grid, grid, -1), tok.reshape(b, grid, grid, -1)

  examples = []
  bs = 256
  for s in range(0, len(x), bs):
    tex, sem, tok = encode(tvae, semvae, net, jnp.asarray(_to_float(x[s:s + bs])),
                           jnp.arange(s, min(s + bs, len(x))))
    for j in range(tex.shape[0]):
      examples.append({"texture": np.asarray(tex[j]), "semantic": np.asarray(sem[j]),
                       "repa": np.asarray(tok[j], np.float16), "label": np.int32(y[s + j])})
  schema = LatentSchema(grid=grid, texture_channels=tvae.config.embed_dim,
                        semantic_channels=semvae.config.bottleneck_dim,
                        repa_dim=net.cfg.embed_dim, has_repa=True, has_flip=False)
  _fresh(d)
  records.write_examples(d, examples, schema, records_per_shard=500)
  st = stats_lib.compute_stats(records.LatentRecords(d), num_samples=len(examples))
  st.save(stats_lib.stats_path(d))
  log(f"  wrote {len(examples)} records of [{grid}, {grid}, "
      f"{schema.texture_channels}+{schema.semantic_channels}] (+ REPA {schema.repa_dim})")
  return {"records": len(examples), "schema": schema.to_json()}


# ---------------------------------------------------------------- SFD runs


def run_config(cfg: ml_collections.ConfigDict, workdir: str,
               delta_t: float) -> ml_collections.ConfigDict:
  """The training/sampling config of one Δt run, with the demo's paths filled in."""
  c = copy.deepcopy(cfg)
  wd = os.path.abspath(workdir)
  c.objective.delta_t = float(delta_t)
  c.data.path = os.path.join(wd, "latents")
  c.sample.texture_vae = os.path.join(wd, "texture_vae")
  c.sample.checkpoint = os.path.join(wd, "runs", run_name(delta_t))
  c.train_eval.features_path = os.path.join(wd, "feature_net")
  c.train_eval.reference = os.path.join(wd, "data", "reference.npz")
  return c


def _sweep(cfg):
  return cfg.demo.get("clock_sweep") if "demo" in cfg else None


def sweep_run_name(schedule: str, seed: int) -> str:
  return f"{schedule}_s{seed}"


def sweep_run_config(cfg: ml_collections.ConfigDict, workdir: str, schedule: str,
                     seed: int) -> ml_collections.ConfigDict:
  """The config of one clock-sweep run: the schedule's fields, the seed for training and
  sampling, the run's own workdir."""
  spec = cfg.demo.clock_sweep.schedules[schedule]
  c = run_config(cfg, workdir, float(spec.get("delta_t", cfg.objective.delta_t)))
  if spec.get("schedule") is not None:
    with c.unlocked():                 # main.py's configs are locked
      c.schedule = copy.deepcopy(spec.schedule)
  c.seed = int(seed)
  c.sample.seed = int(seed)
  c.sample.checkpoint = os.path.join(os.path.abspath(workdir), "runs",
                                     sweep_run_name(schedule, seed))
  return c


def demo_runs(cfg, workdir: str) -> list[tuple[str, str, ml_collections.ConfigDict]]:
  """(run name, label for logs, config) of every training run of the demo."""
  sw = _sweep(cfg)
  if sw is None:
    return [(run_name(dt), f"Δt={dt:g}", run_config(cfg, workdir, dt))
            for dt in cfg.demo.delta_ts]
  return [(sweep_run_name(name, seed), f"{name} seed {seed}",
           sweep_run_config(cfg, workdir, name, seed))
          for name in sw.order for seed in sw.seeds]


def _stage_train(cfg, workdir: str, d: str) -> dict[str, Any]:
  out = {}
  if _sweep(cfg) is not None:
    for name, label, rc in demo_runs(cfg, workdir):
      log(f"  training {label}: {rc.num_train_steps} steps of batch {rc.batch_size}")
      t0 = time.time()
      res = sfd_training.train_and_evaluate(rc, rc.sample.checkpoint)
      if res["step"] < int(rc.num_train_steps):
        raise DemoInterrupted(f"training {label} stopped at step {res['step']} (signal); "
                              "rerun the same command to resume")
      hist = periodic_eval.read_history(rc.sample.checkpoint)
      out[name] = {"seconds": round(time.time() - t0, 1),
                   "final_loss": res["metrics"].get("loss"),
                   "fid_history": [[h["step"], h.get("fid")] for h in hist]}
    return out
  for dt in cfg.demo.delta_ts:
    rc = run_config(cfg, workdir, dt)
    log(f"  training Δt={dt:g}: {rc.num_train_steps} steps of batch {rc.batch_size}, "
        f"in-training FID every {rc.train_eval.every_steps} steps")
    t0 = time.time()
    res = sfd_training.train_and_evaluate(rc, rc.sample.checkpoint)
    if res["step"] < int(rc.num_train_steps):       # SIGTERM / preemption: saved, stop here
      raise DemoInterrupted(f"training Δt={dt:g} stopped at step {res['step']} of "
                            f"{rc.num_train_steps} (signal); rerun the same command to resume")
    hist = periodic_eval.read_history(rc.sample.checkpoint)
    out[run_name(dt)] = {"delta_t": float(dt), "seconds": round(time.time() - t0, 1),
                         "final_loss": res["metrics"].get("loss"),
                         "fid_history": [[h["step"], h.get("fid")] for h in hist]}
    log(f"  Δt={dt:g}: in-training FID " +
        ", ".join(f"{s}: {f:.2f}" for s, f in out[run_name(dt)]["fid_history"]))
  return out


def _class_accuracy(extractor, images: np.ndarray, labels: np.ndarray) -> float:
  logits = np.concatenate([extractor(images[i:i + extractor.batch_size])["logits"]
                           for i in range(0, len(images), extractor.batch_size)])
  return float(np.mean(logits.argmax(-1) == labels))


def _stage_sample(cfg, workdir: str, d: str) -> dict[str, Any]:
  ex = features.load_extractor("demo", os.path.join(workdir, "feature_net"),
                               batch_size=500)
  ref = os.path.join(workdir, "data", "reference.npz")
  out: dict[str, Any] = {}
  hold = adm.compute_metrics(os.path.join(workdir, "data", "holdout.npz"), ref, ex)
  _, _, xh, yh = _load_data(workdir)
  out["real_holdout"] = {**hold, "num_images": int(len(xh)),
                         "class_accuracy": _class_accuracy(ex, xh, yh)}
  sweep = _sweep(cfg) is not None
  for name, label, rc in demo_runs(cfg, workdir):
    if not sweep:
      log(f"  sampling {label}: {rc.sample.num_images} images, {rc.sample.method} "
          f"{rc.sample.num_steps} steps, {rc.sample.guidance} scale {rc.sample.scale}")
    out[name] = m = _sample_and_score(rc, ref, ex)
    extra = "" if sweep else (f", precision {m['precision']:.3f}, "
                              f"recall {m['recall']:.3f}")
    log(f"  {label}: FID {m['fid']:.2f}, class accuracy {m['class_accuracy']:.3f}{extra}")
  return out


def _sample_and_score(rc, ref: str, ex) -> dict[str, Any]:
  """Samples one run with the sampling job; its metrics against ``ref`` and the feature
  net's class accuracy on the (class-balanced) samples."""
  res = generation.sample_from_config(rc, rc.sample.checkpoint)
  n = int(rc.sample.num_images)
  imgs = images_lib.load_pngs(images_lib.numbered_pngs(res["out_dir"], n))
  labels = generation.balanced_labels(np.arange(n), n, int(rc.model.num_classes))
  m = adm.compute_metrics(res["npz"], ref, ex)
  m["class_accuracy"] = _class_accuracy(ex, imgs, labels)
  m["num_images"] = n
  return m


# ---------------------------------------------------------------- report


def class_grid(images: np.ndarray, num_classes: int, per_class: int) -> np.ndarray:
  """Class-balanced samples in index order → a grid with one row per class."""
  n = len(images)
  rows = []
  for c in range(num_classes):
    start = -(-c * n // num_classes)
    rows.append(images[start:start + per_class])
  return images_lib.image_grid(np.concatenate(rows), cols=per_class, pad=1, pad_value=96)


def sweep_summary(cfg, sample_res: dict[str, Any]) -> dict[str, Any]:
  """Per schedule: the seeds' FID and class accuracy, their mean and std (ddof 1)."""
  sw = cfg.demo.clock_sweep
  out = {}
  for name in sw.order:
    row = {}
    for metric in ("fid", "class_accuracy"):
      vals = [float(sample_res[sweep_run_name(name, s)][metric]) for s in sw.seeds]
      row[metric] = {"values": vals, "mean": float(np.mean(vals)),
                     "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0}
    out[name] = row
  return out


def _stage_report_sweep(cfg, workdir: str, results: dict[str, Any]) -> dict[str, Any]:
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  summ = sweep_summary(cfg, results["sample"])
  names = list(cfg.demo.clock_sweep.order)
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
  for ax, metric, title in ((axes[0], "fid", "demo FID (lower is better)"),
                            (axes[1], "class_accuracy", "class accuracy")):
    means = [summ[n][metric]["mean"] for n in names]
    stds = [summ[n][metric]["std"] for n in names]
    ax.bar(names, means, yerr=stds, capsize=4, color="#6a8fc7")
    for i, n in enumerate(names):
      ax.plot([i] * len(summ[n][metric]["values"]), summ[n][metric]["values"], "k.", ms=4)
    ax.set_title(f"{title}, mean ± std over {len(cfg.demo.clock_sweep.seeds)} seeds",
                 fontsize=9)
    ax.grid(alpha=0.3, axis="y")
  if "real_holdout" in results["sample"]:
    axes[0].axhline(results["sample"]["real_holdout"]["fid"], color="grey", ls="--", lw=1)
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, "clock_sweep.png"), dpi=120)
  plt.close(fig)
  return {"files": ["clock_sweep.png", "metrics.json"], "clock_sweep": summ}


def _stage_report(cfg, workdir: str, d: str, results: dict[str, Any]) -> dict[str, Any]:
  if _sweep(cfg) is not None:
    return _stage_report_sweep(cfg, workdir, results)
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  from PIL import Image  # pylint: disable=import-outside-toplevel
  k, per = int(cfg.model.num_classes), int(cfg.demo.grid_per_class)
  n = int(cfg.sample.num_images)
  dts = list(cfg.demo.delta_ts)
  sample_res, train_res = results["sample"], results["train"]
  fig, axes = plt.subplots(1, len(dts), figsize=(4.2 * len(dts), 4.6))
  for ax, dt in zip(np.atleast_1d(axes), dts):
    sdir = os.path.join(workdir, "runs", run_name(dt), "samples")
    imgs = images_lib.load_pngs(images_lib.numbered_pngs(sdir, n))
    grid = class_grid(imgs, k, per)
    Image.fromarray(grid).resize((grid.shape[1] * 3, grid.shape[0] * 3), Image.NEAREST).save(
        os.path.join(workdir, f"samples_{run_name(dt)}.png"))
    ax.imshow(grid, interpolation="nearest")
    m = sample_res[run_name(dt)]
    ax.set_title(f"Δt = {dt:g}: FID {m['fid']:.2f}, class acc. {m['class_accuracy']:.2f}",
                 fontsize=10)
    ax.set_xticks([])
    ax.set_yticks([])
    ax.set_ylabel("one row per class (0–9)")
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, "samples.png"), dpi=120)
  plt.close(fig)

  fig, ax = plt.subplots(figsize=(5.5, 3.8))
  for dt in dts:
    hist = [(s, f) for s, f in train_res[run_name(dt)]["fid_history"] if f is not None]
    if hist:
      ax.plot(*zip(*hist), marker="o", label=f"Δt = {dt:g}" + (" (SFD)" if dt else
                                                               " (synchronous)"))
  floor = sample_res["real_holdout"]["fid"]
  ax.axhline(floor, color="grey", ls="--", lw=1, label=f"held-out real images ({floor:.2f})")
  ax.set_xlabel("training step")
  ax.set_ylabel(f"FID ({cfg.train_eval.num_images} samples, demo features)")
  ax.set_yscale("log")
  ax.legend()
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, "fid_vs_steps.png"), dpi=120)
  plt.close(fig)
  return {"files": ["samples.png", "fid_vs_steps.png", "metrics.json"] +
          [f"samples_{run_name(dt)}.png" for dt in dts]}


# ---------------------------------------------------------------- driver


def run(config: ml_collections.ConfigDict, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) the whole demo; returns the content of ``metrics.json``."""
  t_start = time.time()
  workdir = os.path.abspath(workdir)
  errors.require_sections(config, ("demo", "model", "data", "sample", "train_eval"),
                          mode="demo", example="configs/demo.py")
  if config.demo.get("dataset", "digits") != "digits":
    raise errors.ConfigError(f"config.demo.dataset must be 'digits' (scikit-learn's "
                             f"load_digits, the only one built in), got "
                             f"{config.demo.dataset!r}")
  errors.check_writable(workdir, "the demo workdir")
  if jax.process_count() > 1:
    raise errors.ConfigError("the demo runs in one process (it is meant for one CPU "
                             "machine): run it without the multi-process environment")
  log(f"workdir {workdir}; {jax.device_count()} {jax.devices()[0].platform} device(s)")
  timings: dict[str, float] = {}
  results: dict[str, Any] = {}
  c = config
  results["data"] = _stage(workdir, "data", lambda d: _stage_data(c, d), timings)
  results["feature_net"] = _stage(workdir, "feature_net",
                                  lambda d: _stage_feature_net(c, workdir, d), timings)
  results["texture_vae"] = _stage(workdir, "texture_vae",
                                  lambda d: _stage_texture_vae(c, workdir, d), timings)
  results["semvae"] = _stage(workdir, "semvae", lambda d: _stage_semvae(c, workdir, d), timings)
  results["latents"] = _stage(workdir, "latents", lambda d: _stage_latents(c, workdir, d),
                              timings)
  # The sweep's stages have their own names: it can share a workdir (and the data, VAE
  # and latent stages) with the default demo without taking its results for its own.
  sx = "_clocks" if _sweep(config) is not None else ""
  results["train"] = _stage(workdir, "train" + sx, lambda d: _stage_train(c, workdir, d),
                            timings)
  results["sample"] = _stage(workdir, "sample" + sx, lambda d: _stage_sample(c, workdir, d),
                             timings)
  results["report"] = _stage(workdir, "report" + sx,
                             lambda d: _stage_report(c, workdir, d, results), timings)
  scored = {k: v for k, v in results["sample"].items() if isinstance(v, dict)}
  summary = {
      "fid": {k: v["fid"] for k, v in scored.items()},
      "class_accuracy": {k: v["class_accuracy"] for k, v in scored.items()},
      "note": ("FID and class accuracy use the demo's own feature network (not Inception): "
               "comparable between the runs of this demo only. 'real_holdout' is the same "
               "metric for held-out real digits (fewer images, so its FID is biased up)."),
  }
  if _sweep(config) is not None:
    summary["clock_sweep"] = results["report"]["clock_sweep"]
  info = {"summary": summary, "stages": results, "seconds_this_run": timings,
          "total_seconds_this_run": round(time.time() - t_start, 1),
          "config": config.to_dict()}
  with open(os.path.join(workdir, "metrics.json.tmp"), "w") as f:
    json.dump(info, f, indent=2, default=float)
  os.replace(os.path.join(workdir, "metrics.json.tmp"), os.path.join(workdir, "metrics.json"))
  log("summary: " + json.dumps(summary["fid"]) + " (FID, demo features); class accuracy " +
      json.dumps(summary["class_accuracy"]))
  log(f"wrote {workdir}/metrics.json, samples.png, fid_vs_steps.png in "
      f"{time.time() - t_start:.0f} s")
  return info
