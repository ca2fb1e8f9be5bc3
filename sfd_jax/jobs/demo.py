"""The demo's stages: real digits → feature net, texture VAE, SemVAE → composite latents →
SFD (Δt 0.3) and synchronous (Δt 0) training → guided sampling → FID, grids, plot, JSON.

Every stage is the package's own code with the demo's config sections: the networks
train with ``sfd_jax.training.vae`` and are exported (``checkpoint.export``), features and
latents are written by ``--mode=extract`` / ``--mode=encode``'s code (``data.encode``),
the DiT runs train with ``training.sfd`` and sample with ``sfd_jax.sampling``, the clock
sweep's runs are sweep overrides (``sfd_jax.sweep``). ``run(config, workdir)`` runs every
stage whose ``<workdir>/<stage>/done.json`` is missing, in order; a rerun skips finished
stages, and an interrupted training resumes from its checkpoints.

Stages (each a folder of the workdir):
  data         digits.npz (uint8 16×16 RGB images, labels, held-out mask), train/ and
               holdout/ (image folders of class sub-folders), reference.npz (ADM-format
               ``arr_0``: training images, the FID reference), holdout.npz
  feature_net  the stand-in for DINOv2 / Inception (run/: its training)
  texture_vae  a small KL autoencoder (f4, 4 channels)
  semvae       a Semantic VAE on the feature net's tokens (64 → 4 channels per token)
  latents      the trainer's ArrayRecord dataset + stats.npz
  runs/dt<Δt>  one training workdir per Δt: checkpoints, TensorBoard, train_eval/ history,
               samples/ (guided sampling with the EMA weights)
and at the top: ``metrics.json``, ``samples.png`` (a row per class for each Δt),
``fid_vs_steps.png``. The clock sweep (``configs/demo.py:clocks=1``) replaces the Δt runs
by one run per schedule and seed (``runs/<schedule>_s<seed>``) and reports mean ± std of
the FID and class accuracy over the seeds (``summary.clock_sweep``, ``clock_sweep.png``).
"""
from __future__ import annotations

import itertools
import json
import os
import time
from typing import Any, Callable

import jax
import matplotlib
import numpy as np
from PIL import Image

from sfd_jax import sampling, sweep
from sfd_jax.checkpoint import export
from sfd_jax.convert import networks
from sfd_jax.core import checks, errors, files
from sfd_jax.core import images as images_lib
from sfd_jax.data import encode
from sfd_jax.data import schema as schema_lib
from sfd_jax.diffusion.generation import balanced_labels
from sfd_jax.metrics import adm, features
from sfd_jax.training import periodic_eval, sfd, vae

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  pylint: disable=wrong-import-position


class DemoInterrupted(RuntimeError):
  pass


def log(msg: str) -> None:
  print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def run_name(delta_t: float) -> str:
  return f"dt{delta_t:g}"


def _stage(workdir: str, stage: str, fn: Callable[[str], dict[str, Any]],
           timings: dict[str, float]) -> dict[str, Any]:
  """Runs ``fn(stage_dir)`` unless its done.json exists; returns the recorded info."""
  marker = os.path.join(workdir, stage, "done.json")
  if os.path.exists(marker):
    log(f"{stage}: done earlier (delete {os.path.dirname(marker)} to redo)")
    return files.read_json(marker, what="demo stage marker (delete it to redo the stage)")
  d = os.path.dirname(marker)
  os.makedirs(d, exist_ok=True)
  log(f"{stage}: start")
  t0 = time.time()
  info = fn(d)
  timings[stage] = info["seconds"] = round(time.time() - t0, 1)
  with open(marker + ".tmp", "w") as f:
    json.dump(info, f, indent=2, default=float)
  os.replace(marker + ".tmp", marker)
  log(f"{stage}: done in {info['seconds']:.1f} s")
  return info


# ---------------------------------------------------------------- data


def load_dataset(image_size: int) -> tuple[np.ndarray, np.ndarray]:
  """(uint8 [N, S, S, 3] images, int32 labels) of scikit-learn's digits, upsampled."""
  from sklearn.datasets import load_digits  # pylint: disable=import-outside-toplevel
  d = load_digits()
  grey = np.round(d.images * (255.0 / 16.0)).astype(np.uint8)      # 17 levels → 0..255
  up = np.stack([np.asarray(Image.fromarray(g).resize((image_size, image_size),
                                                      Image.BICUBIC)) for g in grey])
  return np.repeat(up[..., None], 3, axis=-1), d.target.astype(np.int32)


def _stage_data(cfg, d: str) -> dict[str, Any]:
  images, labels = load_dataset(int(cfg.demo.image_size))
  holdout = np.arange(len(images)) % int(cfg.demo.holdout_every) == 0
  np.savez(os.path.join(d, "digits.npz"), images=images, labels=labels, holdout=holdout)
  np.savez(os.path.join(d, "reference.npz"), arr_0=images[~holdout])
  np.savez(os.path.join(d, "holdout.npz"), arr_0=images[holdout])
  for i, (img, label) in enumerate(zip(images, labels)):
    folder = os.path.join(d, "holdout" if holdout[i] else "train", str(label))
    os.makedirs(folder, exist_ok=True)
    Image.fromarray(img).save(os.path.join(folder, f"{i:04d}.png"))
  return {"num_train": int((~holdout).sum()), "num_holdout": int(holdout.sum()),
          "image_size": int(cfg.demo.image_size), "dataset": cfg.demo.dataset}


def _load_data(workdir: str):
  with np.load(os.path.join(workdir, "data", "digits.npz")) as z:
    images, labels, holdout = z["images"], z["labels"], z["holdout"]
  return images[holdout], labels[holdout]


# ---------------------------------------------------------------- networks


def _train_network(section, kind: str, d: str, train: str, holdout: str) -> dict[str, Any]:
  """Trains ``kind`` with its trainer in ``<d>/run`` and exports it as the converted
  folder ``d``; returns its final training and evaluation metrics."""
  c = sweep.apply_overrides(section, [("data.path", train), ("data.eval_path", holdout)])
  log(f"  training the {kind}: {c.num_train_steps} steps of batch {c.batch_size}")
  res = vae.train_model(c, os.path.join(d, "run"), kind)
  if res["step"] < int(c.num_train_steps):
    raise DemoInterrupted(f"training the {kind} stopped at step {res['step']} (signal); "
                          "rerun the same command to resume")
  export.export_converted(c, os.path.join(d, "run"), kind, d, force=True)
  m = {k: float(v) for k, v in res["metrics"].items()}
  log(f"  {kind}: " + ", ".join(f"{k} {v:.4g}" for k, v in m.items() if k.startswith("eval_")))
  return m


def _encode_config(cfg, images: str):
  return sweep.apply_overrides(cfg.demo.encode, [("data.path", images)])


def _stage_semvae(cfg, workdir: str, d: str) -> dict[str, Any]:
  net = networks.load_feature_net(os.path.join(workdir, "feature_net"))
  for split in ("train", "holdout"):
    encode.extract_features(_encode_config(cfg, os.path.join(workdir, "data", split)),
                            os.path.join(d, f"features_{split}"), net)
  return _train_network(cfg.demo.semvae, "semvae", d, os.path.join(d, "features_train"),
                        os.path.join(d, "features_holdout"))


def _stage_latents(cfg, workdir: str, d: str) -> dict[str, Any]:
  wd = lambda *p: os.path.join(workdir, *p)  # noqa: E731
  nets = (networks.load_network("texture_vae", wd("texture_vae")),
          networks.load_feature_net(wd("feature_net")),
          networks.load_network("semvae", wd("semvae")))
  res = encode.encode_images(_encode_config(cfg, wd("data", "train")), d, nets, {
      "texture_vae": wd("texture_vae"), "dinov2": wd("feature_net"), "semvae": wd("semvae")})
  schema = schema_lib.read_dataset_info(d).schema
  log(f"  wrote {res['num_records']} records of [{schema.grid}, {schema.grid}, "
      f"{schema.texture_channels}+{schema.semantic_channels}] (+ REPA {schema.repa_dim})")
  return {"records": res["num_records"], "schema": schema.to_json()}


# ---------------------------------------------------------------- SFD runs


def demo_runs(cfg, workdir: str) -> list[tuple[str, str, Any]]:
  """(run name, label for logs, config) of every training run of the demo: one per Δt,
  or with ``demo.clock_sweep`` one per schedule and seed (the schedules are sweep
  overrides, expanded and applied by ``sfd_jax.sweep``)."""
  wd = os.path.abspath(workdir)
  paths = [("data.path", os.path.join(wd, "latents")),
           ("sample.texture_vae", os.path.join(wd, "texture_vae")),
           ("train_eval.features_path", os.path.join(wd, "feature_net")),
           ("train_eval.reference", os.path.join(wd, "data", "reference.npz"))]
  sw = cfg.demo.get("clock_sweep")
  if sw is None:
    runs = [(run_name(dt), f"Δt={dt:g}", (("objective.delta_t", float(dt)),))
            for dt in cfg.demo.delta_ts]
  else:
    spec = {"list": [sw.schedules[n].to_dict() for n in sw.order],
            "product": {"seed": list(sw.seeds)}}
    runs = [(f"{name}_s{seed}", f"{name} seed {seed}", over + (("sample.seed", seed),))
            for (name, seed), over in zip(itertools.product(sw.order, sw.seeds),
                                          sweep.expand(spec, "clock_sweep"))]
  return [(name, label, sweep.apply_overrides(cfg, paths + list(over) + [
      ("sample.checkpoint", os.path.join(wd, "runs", name))])) for name, label, over in runs]


def _stage_train(cfg, workdir: str, d: str) -> dict[str, Any]:
  out = {}
  for name, label, rc in demo_runs(cfg, workdir):
    log(f"  training {label}: {rc.num_train_steps} steps of batch {rc.batch_size}")
    t0 = time.time()
    res = sfd.train_and_evaluate(rc, rc.sample.checkpoint)
    if res["step"] < int(rc.num_train_steps):       # SIGTERM / preemption: saved, stop here
      raise DemoInterrupted(f"training {label} stopped at step {res['step']} of "
                            f"{rc.num_train_steps} (signal); rerun the same command to resume")
    hist = periodic_eval.read_history(rc.sample.checkpoint)
    out[name] = {"delta_t": float(rc.objective.delta_t), "seconds": round(time.time() - t0, 1),
                 "final_loss": res["metrics"].get("loss"),
                 "fid_history": [[h["step"], h.get("fid")] for h in hist]}
    log(f"  {label}: in-training FID " + ", ".join(
        f"{s}: {f:.2f}" for s, f in out[name]["fid_history"] if f is not None))
  return out


def _class_accuracy(extractor, images: np.ndarray, labels: np.ndarray) -> float:
  logits = np.concatenate([extractor(images[i:i + extractor.batch_size])["logits"]
                           for i in range(0, len(images), extractor.batch_size)])
  return float(np.mean(logits.argmax(-1) == labels))


def _stage_sample(cfg, workdir: str, d: str) -> dict[str, Any]:
  ex = features.load_extractor("demo", os.path.join(workdir, "feature_net"), batch_size=500)
  ref = os.path.join(workdir, "data", "reference.npz")
  hold = adm.compute_metrics(os.path.join(workdir, "data", "holdout.npz"), ref, ex)
  xh, yh = _load_data(workdir)
  out: dict[str, Any] = {"real_holdout": {**hold, "num_images": int(len(xh)),
                                          "class_accuracy": _class_accuracy(ex, xh, yh)}}
  for name, label, rc in demo_runs(cfg, workdir):
    log(f"  sampling {label}: {rc.sample.num_images} images, {rc.sample.method} "
        f"{rc.sample.num_steps} steps, {rc.sample.guidance} scale {rc.sample.scale}")
    res = sampling.sample_from_config(rc, rc.sample.checkpoint)
    n = int(rc.sample.num_images)
    imgs = images_lib.load_pngs(images_lib.numbered_pngs(res["out_dir"], n))
    m = out[name] = adm.compute_metrics(res["npz"], ref, ex)
    m.update(num_images=n, class_accuracy=_class_accuracy(
        ex, imgs, balanced_labels(np.arange(n), n, int(rc.model.num_classes))))
    log(f"  {label}: FID {m['fid']:.2f}, class accuracy {m['class_accuracy']:.3f}, "
        f"precision {m['precision']:.3f}, recall {m['recall']:.3f}")
  return out


# ---------------------------------------------------------------- report


def class_grid(images: np.ndarray, num_classes: int, per_class: int) -> np.ndarray:
  """Class-balanced samples in index order → a grid with one row per class."""
  n = len(images)
  rows = [images[-(-c * n // num_classes):][:per_class] for c in range(num_classes)]
  return images_lib.image_grid(np.concatenate(rows), cols=per_class, pad=1, pad_value=96)


def sweep_summary(cfg, sample_res: dict[str, Any]) -> dict[str, Any]:
  """Per schedule: the seeds' FID and class accuracy, their mean and std (ddof 1)."""
  sw, out = cfg.demo.clock_sweep, {}
  for name in sw.order:
    out[name] = {}
    for metric in ("fid", "class_accuracy"):
      vals = [float(sample_res[f"{name}_s{s}"][metric]) for s in sw.seeds]
      out[name][metric] = {"values": vals, "mean": float(np.mean(vals)),
                           "std": float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0}
  return out


def _report_sweep(cfg, workdir: str, results: dict[str, Any]) -> dict[str, Any]:
  summ, names = sweep_summary(cfg, results["sample"]), list(cfg.demo.clock_sweep.order)
  fig, axes = plt.subplots(1, 2, figsize=(9, 3.6))
  for ax, metric, title in ((axes[0], "fid", "demo FID (lower is better)"),
                            (axes[1], "class_accuracy", "class accuracy")):
    ax.bar(names, [summ[n][metric]["mean"] for n in names], capsize=4, color="#6a8fc7",
           yerr=[summ[n][metric]["std"] for n in names])
    for i, n in enumerate(names):
      ax.plot([i] * len(summ[n][metric]["values"]), summ[n][metric]["values"], "k.", ms=4)
    ax.set_title(f"{title}, mean ± std over {len(cfg.demo.clock_sweep.seeds)} seeds",
                 fontsize=9)
    ax.grid(alpha=0.3, axis="y")
  axes[0].axhline(results["sample"]["real_holdout"]["fid"], color="grey", ls="--", lw=1)
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, "clock_sweep.png"), dpi=120)
  plt.close(fig)
  return {"files": ["clock_sweep.png", "metrics.json"], "clock_sweep": summ}


def _report(cfg, workdir: str, results: dict[str, Any]) -> dict[str, Any]:
  if cfg.demo.get("clock_sweep") is not None:
    return _report_sweep(cfg, workdir, results)
  k, per, n = int(cfg.model.num_classes), int(cfg.demo.grid_per_class), int(cfg.sample.num_images)
  dts, sample_res, train_res = list(cfg.demo.delta_ts), results["sample"], results["train"]
  fig, axes = plt.subplots(1, len(dts), figsize=(4.2 * len(dts), 4.6))
  for ax, dt in zip(np.atleast_1d(axes), dts):
    sdir = os.path.join(workdir, "runs", run_name(dt), "samples")
    grid = class_grid(images_lib.load_pngs(images_lib.numbered_pngs(sdir, n)), k, per)
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
      ax.plot(*zip(*hist), marker="o",
              label=f"Δt = {dt:g}" + (" (SFD)" if dt else " (synchronous)"))
  floor = sample_res["real_holdout"]["fid"]
  ax.axhline(floor, color="grey", ls="--", lw=1, label=f"held-out real images ({floor:.2f})")
  ax.set(xlabel="training step", yscale="log",
         ylabel=f"FID ({cfg.train_eval.num_images} samples, demo features)")
  ax.legend()
  ax.grid(alpha=0.3)
  fig.tight_layout()
  fig.savefig(os.path.join(workdir, "fid_vs_steps.png"), dpi=120)
  plt.close(fig)
  return {"files": ["samples.png", "fid_vs_steps.png", "metrics.json"] +
          [f"samples_{run_name(dt)}.png" for dt in dts]}


# ---------------------------------------------------------------- driver


def run(config, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) the whole demo; returns the content of ``metrics.json``."""
  t_start, workdir = time.time(), os.path.abspath(workdir)
  checks.require_sections(config, ("demo", "model", "data", "sample", "train_eval"),
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
  c, wd = config, lambda *p: os.path.join(workdir, *p)
  stages = [
      ("data", lambda d: _stage_data(c, d)),
      ("feature_net", lambda d: _train_network(c.demo.feature_net, "feature_net", d,
                                               wd("data", "train"), wd("data", "holdout"))),
      ("texture_vae", lambda d: _train_network(c.demo.texture_vae, "texture_vae", d,
                                               wd("data", "train"), wd("data", "holdout"))),
      ("semvae", lambda d: _stage_semvae(c, workdir, d)),
      ("latents", lambda d: _stage_latents(c, workdir, d)),
      # the sweep's stages have their own names: it can share a workdir (and the data,
      # network and latent stages) with the default demo
      ("train", lambda d: _stage_train(c, workdir, d)),
      ("sample", lambda d: _stage_sample(c, workdir, d)),
      ("report", lambda d: _report(c, workdir, results))]
  sx = "_clocks" if config.demo.get("clock_sweep") is not None else ""
  for name, fn in stages:
    stage = name + sx if name in ("train", "sample", "report") else name
    results[name] = _stage(workdir, stage, fn, timings)
  scored = {k: v for k, v in results["sample"].items() if isinstance(v, dict)}
  summary = {
      "fid": {k: v["fid"] for k, v in scored.items()},
      "class_accuracy": {k: v["class_accuracy"] for k, v in scored.items()},
      "note": ("FID and class accuracy use the demo's own feature network (not Inception): "
               "comparable between the runs of this demo only. 'real_holdout' is the same "
               "metric for held-out real digits (fewer images, so its FID is biased up)."),
  }
  if sx:
    summary["clock_sweep"] = results["report"]["clock_sweep"]
  info = {"summary": summary, "stages": results, "seconds_this_run": timings,
          "total_seconds_this_run": round(time.time() - t_start, 1),
          "config": config.to_dict()}
  with open(wd("metrics.json.tmp"), "w") as f:
    json.dump(info, f, indent=2, default=float)
  os.replace(wd("metrics.json.tmp"), wd("metrics.json"))
  log("summary: " + json.dumps(summary["fid"]) + " (FID, demo features); class accuracy " +
      json.dumps(summary["class_accuracy"]))
  log(f"wrote {workdir}/metrics.json, samples.png, fid_vs_steps.png in "
      f"{time.time() - t_start:.0f} s")
  return info
