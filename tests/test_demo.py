"""The demo's stages (configs/demo.py:fast=1) end to end, and the periodic in-training
evaluation they exercise (sfd_jax.training.periodic_eval).

The demo runs once per module through ``main.py --mode=demo`` in a subprocess on 8 fake
devices with XLA's backend optimisation level 0 (the suite's cost is compilation; this
variant trains a handful of steps, so slower kernels do not matter).
"""
import json
import subprocess
import sys
import time

import numpy as np
import pytest

from configs import demo as demo_config
from sfd_jax.core import images as images_lib
from sfd_jax.jobs import demo as pipeline
from sfd_jax.training import periodic_eval as train_eval


def _tb_tags(directory):
  """Tags of every summary in the TensorBoard event files of ``directory``."""
  from tensorboard.backend.event_processing import event_accumulator
  acc = event_accumulator.EventAccumulator(str(directory), size_guidance={"images": 0,
                                                                          "tensors": 0})
  acc.Reload()
  tags = acc.Tags()
  return set(tags.get("images", [])) | set(tags.get("tensors", [])) | set(
      tags.get("scalars", []))


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
  from tests.conftest import REPO, child_env
  wd = tmp_path_factory.mktemp("demo")
  env = child_env(JAX_PLATFORMS="cpu",
                  XLA_FLAGS="--xla_force_host_platform_device_count=8 "
                            "--xla_backend_optimization_level=0")
  t0 = time.time()
  proc = subprocess.run([sys.executable, str(REPO / "main.py"), "--mode=demo",
                         "--config=configs/demo.py:fast=1", f"--workdir={wd}"], cwd=REPO,
                        env=env, capture_output=True, text=True, timeout=900)
  seconds = time.time() - t0
  assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
  assert "[demo" in proc.stdout and "summary:" in proc.stdout   # progress is printed
  with open(wd / "metrics.json") as f:
    info = json.load(f)
  return wd, demo_config.get_config("fast=1"), info, seconds


def test_demo_writes_every_output(demo_run):
  wd, cfg, info, _ = demo_run
  for name in ("metrics.json", "samples.png", "fid_vs_steps.png", "samples_dt0.3.png",
               "samples_dt0.png"):
    assert (wd / name).stat().st_size > 0, name
  with open(wd / "metrics.json") as f:
    saved = json.load(f)
  assert set(saved["summary"]["fid"]) == {"real_holdout", "dt0.3", "dt0"}
  assert all(np.isfinite(v) and v >= 0 for v in saved["summary"]["fid"].values())
  stages = saved["stages"]
  assert stages["latents"]["records"] == stages["data"]["num_train"] == 1497
  assert stages["latents"]["schema"]["grid"] == 4
  # the encoded dataset is what the trainer read: both runs trained on it
  for run in ("dt0.3", "dt0"):
    assert np.isfinite(stages["train"][run]["final_loss"])
    assert stages["sample"][run]["num_images"] == cfg.sample.num_images
  # grid: one row per class of grid_per_class 16-px tiles with 1-px borders, 3× upscaled
  from PIL import Image
  g = np.asarray(Image.open(wd / "samples_dt0.3.png"))
  assert g.shape == ((10 * 17 + 1) * 3, (cfg.demo.grid_per_class * 17 + 1) * 3, 3)


def test_periodic_eval_history_and_tensorboard(demo_run):
  wd, cfg, _, _ = demo_run
  for run in ("dt0.3", "dt0"):
    rd = wd / "runs" / run
    hist = train_eval.read_history(str(rd))
    assert [h["step"] for h in hist] == [4, 8]          # every_steps=4, 8 steps
    assert all(np.isfinite(h["fid"]) and h["fid"] > 0 for h in hist)
    assert all(np.isfinite(h["inception_score"]) for h in hist)
    assert sorted(p.name for p in (rd / "train_eval").glob("grid_*.png")) == [
        "grid_0000004.png", "grid_0000008.png"]
    tags = _tb_tags(rd)
    assert {"train_eval/samples", "train_eval/fid"} <= tags, tags


def test_demo_rerun_skips_finished_stages(demo_run):
  wd, cfg, info, first_seconds = demo_run
  before = (wd / "metrics.json").read_text()
  t0 = time.time()
  again = pipeline.run(cfg, str(wd))
  assert again["seconds_this_run"] == {}                # every stage was cached
  assert time.time() - t0 < max(10.0, 0.25 * first_seconds)
  assert json.loads(before)["summary"] == again["summary"]


def test_grid_selection_rows_of_classes():
  sel, cols = train_eval.grid_selection(n=100, num_classes=10, grid_images=25)
  labels = (np.arange(100) * 10) // 100
  assert cols == 5 and len(sel) == 25
  rows = labels[sel].reshape(5, 5)
  assert (rows == rows[:, :1]).all()                   # each row one class
  assert rows[0, 0] == 0 and rows[-1, 0] == 9           # evenly spaced, ends included
  # more grid cells than samples of a class: padded with -1 (blank tiles)
  sel, cols = train_eval.grid_selection(n=20, num_classes=10, grid_images=16)
  assert cols == 4 and (sel == -1).sum() == 4 * 2


def test_class_grid_rows_follow_balanced_labels():
  imgs = np.zeros((40, 2, 2, 3), np.uint8)
  imgs[:, 0, 0, 0] = (np.arange(40) * 10) // 40          # pixel = class
  g = images_lib.class_grid(imgs, 10, 3)
  assert g.shape == (10 * 3 + 1, 3 * 3 + 1, 3)                 # 2-px tiles, 1-px borders
  assert [int(g[1 + 3 * r, 1, 0]) for r in range(10)] == list(range(10))
  assert int(g[0, 0, 0]) == 96


def test_periodic_eval_config_errors(tmp_path):
  """Bad train_eval settings fail at start-up with the field named (no training done)."""
  import types
  from sfd_jax import parallel
  from sfd_jax.metrics import features
  cfg = demo_config.get_config("fast=1")
  setup = types.SimpleNamespace(mesh=parallel.make_mesh({"data": -1, "fsdp": 1, "tensor": 1}))
  cfg.train_eval.num_images = 0
  with pytest.raises(train_eval.TrainEvalError, match="num_images"):
    train_eval.PeriodicEvaluator(cfg, setup, str(tmp_path))
  cfg.train_eval.num_images, cfg.train_eval.batch_size = 8, 12     # 12 % 8 devices
  with pytest.raises(train_eval.TrainEvalError, match="batch_size=12"):
    train_eval.PeriodicEvaluator(cfg, setup, str(tmp_path))
  cfg.train_eval.batch_size = 8
  with pytest.raises(train_eval.TrainEvalError, match="texture_vae"):
    train_eval.PeriodicEvaluator(cfg, setup, str(tmp_path))
  with pytest.raises(ValueError, match="expected one of"):
    features.load_extractor("clip", "x", batch_size=8)
  with pytest.raises(ValueError, match="directory"):
    features.load_extractor("inception", "", batch_size=8)
  from configs import tiny
  assert not train_eval.enabled(tiny.get_config())                 # off by default
  assert train_eval.due(cfg, 4, 8) and train_eval.due(cfg, 8, 8) and not train_eval.due(cfg, 5, 8)


def test_clock_sweep_mean_std_and_plot(demo_run, tmp_path):
  """The clock sweep (configs/demo.py:clocks=1) on the fast demo's encoded data: two of
  its schedules (SFD and the learned clock) × 2 seeds, in-process."""
  import shutil
  wd, _, info, _ = demo_run
  sweep_wd = tmp_path / "clocks"
  # the default demo's finished stages, train/sample/report included: the sweep must
  # reuse the encoded data but run its own training, sampling and report
  for stage in ("data", "feature_net", "texture_vae", "semvae", "latents", "train",
                "sample", "report"):
    shutil.copytree(wd / stage, sweep_wd / stage)
  cfg = demo_config.get_config("fast=1,clocks=1,seeds=2")
  assert tuple(cfg.demo.clock_sweep.order) == ("sync", "sfd", "rate", "learned")
  cfg.demo.clock_sweep.order = ("sfd", "learned")
  cfg.train_eval.every_steps = 0
  cfg.lock()                      # as main.py hands it over
  out = pipeline.run(cfg, str(sweep_wd))
  summ = out["summary"]["clock_sweep"]
  assert set(summ) == {"sfd", "learned"}
  for _name, row in summ.items():
    for metric in ("fid", "class_accuracy"):
      vals = row[metric]["values"]
      assert len(vals) == 2 and np.all(np.isfinite(vals))
      assert row[metric]["mean"] == pytest.approx(np.mean(vals))
      assert row[metric]["std"] == pytest.approx(np.std(vals, ddof=1))
  # the seeds differ
  assert summ["sfd"]["fid"]["values"][0] != summ["sfd"]["fid"]["values"][1]
  assert (sweep_wd / "clock_sweep.png").stat().st_size > 0
  assert {"sfd_s0", "sfd_s1", "learned_s0", "learned_s1"} <= set(out["stages"]["sample"])
  with open(sweep_wd / "metrics.json") as f:
    assert json.load(f)["summary"]["clock_sweep"]["learned"]["fid"]["values"] == \
        summ["learned"]["fid"]["values"]


def test_fewstep_sweep_nfe_table_and_plot(demo_run, tmp_path):
  """The few-step demo (configs/demo.py:fewstep=1) on the fast demo's encoded data: flow
  matching at Euler NFE 1 and 2 and the average-velocity SFD model at 1 and 2 jumps, one
  seed, in-process."""
  import shutil
  wd, _, _, _ = demo_run
  sweep_wd = tmp_path / "fewstep"
  for stage in ("data", "feature_net", "texture_vae", "semvae", "latents"):
    shutil.copytree(wd / stage, sweep_wd / stage)
  cfg = demo_config.get_config("fast=1,fewstep=1,seeds=1")
  assert tuple(cfg.demo.fewstep.order) == ("sfd", "meanflow_sfd", "meanflow_sync")
  assert tuple(cfg.demo.fewstep.nfe.sfd[1]) == (1, 2, 4, 8, 20)
  cfg.demo.fewstep.order = ("sfd", "meanflow_sfd")
  cfg.demo.fewstep.nfe.sfd = ("euler", (1, 2))
  cfg.demo.fewstep.nfe.meanflow_sfd = ("meanflow", (1, 2))
  cfg.train_eval.every_steps = 0
  cfg.lock()
  out = pipeline.run(cfg, str(sweep_wd))
  summ = out["summary"]["fewstep"]
  assert set(summ) == {"sfd@1", "sfd@2", "meanflow_sfd@1", "meanflow_sfd@2"}
  samples = out["stages"]["sample"]
  for key in summ:
    name, nfe = key.split("@")
    row = samples[f"{name}_s0@{nfe}"]
    assert row["nfe"] == int(nfe) and np.isfinite(row["fid"])      # what the sampler did
    assert summ[key]["fid"]["values"] == [row["fid"]]
  assert (sweep_wd / "fewstep.png").stat().st_size > 0
  assert (sweep_wd / "runs" / "meanflow_sfd_s0" / "nfe1" / "sample_info.json").exists()
