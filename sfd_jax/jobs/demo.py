"""The demo, a script of stages: digits → feature net, texture VAE, SemVAE (the package's
trainers, exported) → latents (``data.encode``) → SFD (Δt 0.3) and synchronous (Δt 0)
training → guided sampling (``sampling``) → FID, grids, plots, ``metrics.json``. A stage
runs unless ``<workdir>/<stage>/done.json`` exists; trainings resume from checkpoints. The
sweeps — clock schedules (``configs/demo.py:clocks=1``) and few-step sampling
(``fewstep=1``: flow matching at several Euler NFEs against average-velocity models at
1-4 jumps) — train ``runs/<setting>_s<seed>`` (``sweep`` overrides) in stages of their
own and report mean ± std over the seeds.
"""
from __future__ import annotations

import itertools
import json
import os
import time
from typing import Any, Callable

import jax
import numpy as np
from PIL import Image

from sfd_jax import sampling, sweep
from sfd_jax.checkpoint import export
from sfd_jax.convert import networks
from sfd_jax.core import checks, errors, files, optional, options
from sfd_jax.core import images as images_lib
from sfd_jax.data import encode
from sfd_jax.data import images as data_images
from sfd_jax.data import schema as schema_lib
from sfd_jax.diffusion.generation import balanced_labels
from sfd_jax.metrics import adm, features, plots
from sfd_jax.training import periodic_eval, sfd, vae


def log(msg: str) -> None:
  print(f"[demo {time.strftime('%H:%M:%S')}] {msg}", flush=True)


def _finished(res: dict[str, Any], config, what: str) -> dict[str, Any]:
  if res["step"] < int(config.num_train_steps):   # SIGTERM / preemption: saved, stop here
    raise RuntimeError(f"training {what} stopped at step {res['step']} of "
                       f"{config.num_train_steps} (signal); rerun the same command to resume")
  return res


def run_name(delta_t: float) -> str:
  return f"dt{delta_t:g}"


def _stage(workdir: str, stage: str, fn: Callable[[str], dict[str, Any]],
           timings: dict[str, float]) -> dict[str, Any]:
  """Runs ``fn(stage_dir)`` unless its done.json exists; returns the recorded info."""
  d = os.path.join(workdir, stage)
  marker = os.path.join(d, "done.json")
  if os.path.exists(marker):
    log(f"{stage}: done earlier (delete {d} to redo)")
    return files.read_json(marker, what="demo stage marker (delete it to redo the stage)")
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


def load_dataset(image_size: int) -> tuple[np.ndarray, np.ndarray]:
  """(uint8 [N, S, S, 3] images, int32 labels) of scikit-learn's digits, upsampled."""
  datasets = optional.require("sklearn.datasets", extra="demo",
                              purpose="--mode=demo (scikit-learn's digits)")
  d = datasets.load_digits()
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
  for split, mask in (("train", ~holdout), ("holdout", holdout)):   # for the jobs
    data_images.write_folder(os.path.join(d, split), images[mask], labels[mask])
  return {"num_train": int((~holdout).sum()), "num_holdout": int(holdout.sum()),
          "image_size": int(cfg.demo.image_size), "dataset": cfg.demo.dataset}


def _train_network(section, kind: str, d: str, train: str, holdout: str) -> dict[str, Any]:
  """Trains ``kind`` with its trainer in ``<d>/run`` and exports it as the converted
  folder ``d``; returns its last training and evaluation metrics."""
  c = sweep.apply_overrides(section, [("data.path", train), ("data.eval_path", holdout)])
  log(f"  training the {kind}: {c.num_train_steps} steps of batch {c.batch_size}")
  res = _finished(vae.train_model(c, os.path.join(d, "run"), kind), c, f"the {kind}")
  export.export_converted(c, os.path.join(d, "run"), kind, d, force=True)
  m = {k: float(v) for k, v in res["metrics"].items()}
  log(f"  {kind}: " + ", ".join(f"{k} {v:.4g}" for k, v in m.items() if k.startswith("eval_")))
  return m


def _stage_semvae(cfg, wd: Callable[..., str], d: str) -> dict[str, Any]:
  net = networks.load_feature_net(wd("feature_net"))
  for split in ("train", "holdout"):
    job = sweep.apply_overrides(cfg.demo.encode, [("data.path", wd("data", split))])
    encode.extract_features(job, os.path.join(d, f"features_{split}"), net)
  return _train_network(cfg.demo.semvae, "semvae", d, os.path.join(d, "features_train"),
                        os.path.join(d, "features_holdout"))


def _stage_latents(cfg, wd: Callable[..., str], d: str) -> dict[str, Any]:
  nets = {"texture_vae": networks.load_network("texture_vae", wd("texture_vae")),
          "dinov2": networks.load_feature_net(wd("feature_net")),
          "semvae": networks.load_network("semvae", wd("semvae"))}
  job = sweep.apply_overrides(cfg.demo.encode, [("data.path", wd("data", "train"))])
  res = encode.encode_images(job, d, tuple(nets.values()), {
      k: wd(k.replace("dinov2", "feature_net")) for k in nets})
  schema = schema_lib.read_dataset_info(d).schema
  log(f"  wrote {res['num_records']} records of [{schema.grid}, {schema.grid}, "
      f"{schema.texture_channels}+{schema.semantic_channels}] (+ REPA {schema.repa_dim})")
  return {"records": res["num_records"], "schema": schema.to_json()}


def demo_runs(cfg, workdir: str) -> list[tuple[str, str, Any]]:
  """(run name, label for logs, config) of every training run of the demo: one per Δt,
  or with ``demo.clock_sweep`` one per schedule and seed (the schedules are sweep
  overrides, expanded and applied by ``sfd_jax.sweep``)."""
  wd = lambda *p: os.path.join(os.path.abspath(workdir), *p)  # noqa: E731
  paths = [("data.path", wd("latents")), ("sample.texture_vae", wd("texture_vae")),
           ("train_eval.features_path", wd("feature_net")),
           ("train_eval.reference", wd("data", "reference.npz"))]
  sw = sweep_section(cfg)
  if sw is None:
    runs = [(run_name(dt), f"Δt={dt:g}", (("objective.delta_t", float(dt)),))
            for dt in cfg.demo.delta_ts]
  else:
    spec = {"list": [sw.schedules[n].to_dict() for n in sw.order],
            "product": {"seed": list(sw.seeds)}}
    runs = [(f"{name}_s{seed}", f"{name} seed {seed}", over + (("sample.seed", seed),))
            for (name, seed), over in zip(itertools.product(sw.order, sw.seeds),
                                          sweep.expand(spec, "demo sweep"))]
  return [(name, label, sweep.apply_overrides(
      cfg, paths + list(over) + [("sample.checkpoint", wd("runs", name))]))
          for name, label, over in runs]


def sweep_section(cfg):
  """``demo.clock_sweep`` or ``demo.fewstep`` (runs × seeds), or None (the default demo)."""
  return cfg.demo.get("clock_sweep") or cfg.demo.get("fewstep")


def evaluations(cfg, name: str) -> list[tuple[str, int, int]]:
  """(method, num_steps, NFE) at which run ``name`` is sampled: the config's sampler, or
  for the few-step sweep every NFE of its setting (Euler: NFE + 1 grid points)."""
  sw = cfg.demo.get("fewstep")
  if sw is None:
    return [(cfg.sample.method, int(cfg.sample.num_steps), 0)]
  method, nfes = sw.nfe[name.rsplit("_s", 1)[0]]
  return [(method, int(k) + (method != "meanflow"), int(k)) for k in nfes]


def _stage_train(cfg, workdir: str) -> dict[str, Any]:
  out = {}
  for name, label, rc in demo_runs(cfg, workdir):
    log(f"  training {label}: {rc.num_train_steps} steps of batch {rc.batch_size}")
    t0 = time.time()
    res = _finished(sfd.train_and_evaluate(rc, rc.sample.checkpoint), rc, label)
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


def _stage_sample(cfg, wd: Callable[..., str]) -> dict[str, Any]:
  ex = features.load_extractor("demo", wd("feature_net"), batch_size=500)
  ref = wd("data", "reference.npz")
  with np.load(wd("data", "digits.npz")) as z:
    xh, yh = z["images"][z["holdout"]], z["labels"][z["holdout"]]
  out: dict[str, Any] = {"real_holdout": {
      **adm.compute_metrics(wd("data", "holdout.npz"), ref, ex), "num_images": int(len(xh)),
      "class_accuracy": _class_accuracy(ex, xh, yh)}}
  for name, label, rc in demo_runs(cfg, wd()):
    for method, steps, nfe in evaluations(cfg, name):
      key, sub = (f"{name}@{nfe}", f"nfe{nfe}") if nfe else (name, "")
      rs = sweep.apply_overrides(rc, [("sample.method", method), ("sample.num_steps", steps)])
      log(f"  sampling {label}: {rs.sample.num_images} images, {method} {steps} steps, "
          f"{rs.sample.guidance} scale {rs.sample.scale}")
      res = sampling.sample_from_config(rs, os.path.join(rc.sample.checkpoint, sub))
      n = int(rs.sample.num_images)
      imgs = images_lib.load_pngs(images_lib.numbered_pngs(res["out_dir"], n))
      m = out[key] = adm.compute_metrics(res["npz"], ref, ex)
      m.update(num_images=n, nfe=res["nfe_per_batch"], class_accuracy=_class_accuracy(
          ex, imgs, balanced_labels(np.arange(n), n, int(rs.model.num_classes))))
      log(f"  {label}: FID {m['fid']:.2f}, class accuracy {m['class_accuracy']:.3f}, "
          f"precision {m['precision']:.3f}, recall {m['recall']:.3f}")
  return out


def _stage_report(cfg, workdir: str, results: dict[str, Any]) -> dict[str, Any]:
  sample_res, floor = results["sample"], results["sample"]["real_holdout"]["fid"]
  wd, metrics = lambda *p: os.path.join(workdir, *p), ("fid", "class_accuracy")  # noqa: E731
  sw = sweep_section(cfg)
  if sw is not None:
    few = cfg.demo.get("fewstep") is not None
    groups = {f"{n}@{k}" if few else n: [f"{n}_s{s}@{k}" if few else f"{n}_s{s}"
                                         for s in sw.seeds]
              for n in sw.order for k in (sw.nfe[n][1] if few else (0,))}
    summ = sweep.mean_std(sample_res, groups, metrics)
    if few:
      plots.lines_over_nfe(summ, {n: (sw.labels[n], sw.nfe[n][1]) for n in sw.order},
                           metrics, wd("fewstep.png"), floor=floor)
      return {"files": ["fewstep.png", "metrics.json"], "fewstep": summ}
    plots.bars_over_seeds(summ, list(sw.order), metrics, wd("clock_sweep.png"), floor=floor)
    return {"files": ["clock_sweep.png", "metrics.json"], "clock_sweep": summ}
  k, per, n = int(cfg.model.num_classes), int(cfg.demo.grid_per_class), int(cfg.sample.num_images)
  names = [run_name(dt) for dt in cfg.demo.delta_ts]
  grids = [images_lib.class_grid(images_lib.load_pngs(images_lib.numbered_pngs(
      wd("runs", r, "samples"), n)), k, per) for r in names]
  for r, grid in zip(names, grids):
    Image.fromarray(grid).resize((grid.shape[1] * 3, grid.shape[0] * 3), Image.NEAREST).save(
        wd(f"samples_{r}.png"))
  plots.sample_grids(grids, [f"Δt = {dt:g}: FID {sample_res[r]['fid']:.2f}, class acc. "
                             f"{sample_res[r]['class_accuracy']:.2f}"
                             for dt, r in zip(cfg.demo.delta_ts, names)], wd("samples.png"))
  plots.curves({f"Δt = {dt:g}" + (" (SFD)" if dt else " (synchronous)"):
                [(s, f) for s, f in results["train"][r]["fid_history"] if f is not None]
                for dt, r in zip(cfg.demo.delta_ts, names)}, wd("fid_vs_steps.png"),
               xlabel="training step", floor=floor,
               ylabel=f"FID ({cfg.train_eval.num_images} samples, demo features)",
               floor_label=f"held-out real images ({floor:.2f})")
  return {"files": ["samples.png", "fid_vs_steps.png", "metrics.json"] +
          [f"samples_{r}.png" for r in names]}


def check(config) -> None:
  """The demo's start-up checks: a demo config (every field, its trainers' configs
  included, against ``core.options``) in one process."""
  checks.require_sections(config, ("demo", "model", "data", "sample", "train_eval"),
                          mode="demo", example="configs/demo.py")
  options.check(config, "sfd")
  if jax.process_count() > 1:
    raise errors.ConfigError("the demo runs in one process (it is meant for one CPU "
                             "machine): run it without the multi-process environment")


def run(config, workdir: str) -> dict[str, Any]:
  """Runs (or resumes) the whole demo; returns the content of ``metrics.json``."""
  t_start, workdir = time.time(), os.path.abspath(workdir)
  check(config)
  errors.check_writable(workdir, "the demo workdir")
  log(f"workdir {workdir}; {jax.device_count()} {jax.devices()[0].platform} device(s)")
  c, wd = config, lambda *p: os.path.join(workdir, *p)
  images = (wd("data", "train"), wd("data", "holdout"))
  # the sweep's stages have their own names: it shares a workdir's data, networks and
  # latents with the default demo
  sx = ("_clocks" if config.demo.get("clock_sweep") is not None else
        "_fewstep" if config.demo.get("fewstep") is not None else "")
  stages = [("data", lambda d: _stage_data(c, d)),
            *[(k, lambda d, k=k: _train_network(c.demo[k], k, d, *images))
              for k in ("feature_net", "texture_vae")],
            ("semvae", lambda d: _stage_semvae(c, wd, d)),
            ("latents", lambda d: _stage_latents(c, wd, d)),
            ("train" + sx, lambda d: _stage_train(c, workdir)),
            ("sample" + sx, lambda d: _stage_sample(c, wd)),
            ("report" + sx, lambda d: _stage_report(c, workdir, results))]
  timings: dict[str, float] = {}
  results: dict[str, Any] = {}
  for stage, fn in stages:
    results[stage.removesuffix(sx) if sx else stage] = _stage(workdir, stage, fn, timings)
  scored = {k: v for k, v in results["sample"].items() if isinstance(v, dict)}
  summary = {
      "fid": {k: v["fid"] for k, v in scored.items()},
      "class_accuracy": {k: v["class_accuracy"] for k, v in scored.items()},
      "note": ("FID and class accuracy use the demo's own feature network (not Inception): "
               "comparable between the runs of this demo only. 'real_holdout' is the same "
               "metric for held-out real digits (fewer images, so its FID is biased up)."),
  }
  if sx:
    key = "fewstep" if sx == "_fewstep" else "clock_sweep"
    summary[key] = results["report"][key]
  info = {"summary": summary, "stages": results, "seconds_this_run": timings,
          "total_seconds_this_run": round(time.time() - t_start, 1), "config": config.to_dict()}
  with open(wd("metrics.json.tmp"), "w") as f:
    json.dump(info, f, indent=2, default=float)
  os.replace(wd("metrics.json.tmp"), wd("metrics.json"))
  log("summary: " + json.dumps(summary["fid"]) + " (FID, demo features); class accuracy " +
      json.dumps(summary["class_accuracy"]))
  log(f"wrote {workdir}/metrics.json and the plots in {time.time() - t_start:.0f} s")
  return info
