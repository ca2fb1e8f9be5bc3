"""Every bad input gets one clear line (docs/errors.md).

A table of user mistakes across every mode of ``main.py`` and every command
(``python -m sfd_jax.convert.*``, ``sfd_jax.data.convert_reference``, ``sfd_jax.sweep``,
``sfd_jax.checkpoint.export``). Each case runs its command line in a child process (through
``tests/cli_runner.py``: the imports happen once, then one fork per case) and must

* exit with status 2,
* print no traceback,
* end stderr with one ``<prog>: <kind>: ...`` line naming the file or config field,
* leave every file saved before it (datasets, the training run, weights) byte-identical.

Plus the recoveries: a corrupt newest checkpoint is moved aside and the run resumes
bit-exactly from the one before; a full disk stops with one line, keeps the checkpoints
and the rerun finishes; a changed Δt is refused on resume.
"""
from __future__ import annotations

import contextlib
import dataclasses
import glob
import json
import os
import pathlib
import re
import shutil
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

import sfd_jax  # noqa: F401
from tests.conftest import REPO, child_env
from tests.util import tiny, write_tiny_latents

sys.path.insert(0, str(REPO))

STEPS = 4           # the saved run: checkpoints at steps 2 and 4
MAIN = "main.py"


# ------------------------------------------------------------------ saved data


def _png(path, seed):
  from PIL import Image  # pylint: disable=import-outside-toplevel
  rng = np.random.default_rng(seed)
  Image.fromarray(rng.integers(0, 255, (20, 20, 3), dtype=np.uint8)).save(path)


def _npz_bytes(path, **arrays):
  np.savez(path, **arrays)
  return path


@dataclasses.dataclass
class Saved:
  root: pathlib.Path
  data: str
  run: str
  p: dict                       # name -> path of every other input


def _corrupt_largest(step_dir):
  f = max(glob.glob(os.path.join(step_dir, "state", "ocdbt.process_0", "d", "*")),
          key=os.path.getsize)
  with open(f, "r+b") as fh:
    fh.truncate(os.path.getsize(f) // 3)


def _make_saved(root: pathlib.Path) -> Saved:
  from sfd_jax.convert import texture_vae as tvae_convert  # pylint: disable=import-outside-toplevel
  from sfd_jax.data import features  # pylint: disable=import-outside-toplevel
  from sfd_jax.models import texture_vae  # pylint: disable=import-outside-toplevel
  from sfd_jax.training import sfd  # pylint: disable=import-outside-toplevel
  from flax import nnx  # pylint: disable=import-outside-toplevel

  data = write_tiny_latents(root / "data")
  run = str(root / "run")
  sfd.train_and_evaluate(tiny(data, num_train_steps=STEPS, checkpoint_every_steps=2), run)
  p = {}
  files = root / "files"
  files.mkdir()
  # statistics
  rand = os.urandom(4096)
  for name in ("stats_random.npz", "random.npz", "adm_random.npz", "random.safetensors"):
    (files / name).write_bytes(rand)
    p[name] = str(files / name)
  zeros = {k: np.zeros(c, np.float32) for k, c in (("texture_mean", 32), ("semantic_mean", 16))}
  p["stats_std0.npz"] = _npz_bytes(str(files / "stats_std0.npz"), **zeros,
                                   texture_std=np.zeros(32, np.float32),
                                   semantic_std=np.ones(16, np.float32))
  p["stats_tiny_std.npz"] = _npz_bytes(str(files / "stats_tiny_std.npz"), **zeros,
                                       texture_std=np.full(32, 1e-30, np.float32),
                                       semantic_std=np.full(16, 1e-30, np.float32))
  p["stats_8ch.npz"] = _npz_bytes(str(files / "stats_8ch.npz"),
                                  texture_mean=np.zeros(8, np.float32),
                                  texture_std=np.ones(8, np.float32),
                                  semantic_mean=np.zeros(16, np.float32),
                                  semantic_std=np.ones(16, np.float32))
  # converter inputs
  _npz_bytes(str(files / "full.npz"), a=np.arange(10000, dtype=np.float32))
  data_bytes = (files / "full.npz").read_bytes()
  (files / "truncated.npz").write_bytes(data_bytes[:len(data_bytes) // 2])
  p["truncated.npz"] = str(files / "truncated.npz")
  p["objects.npz"] = _npz_bytes(str(files / "objects.npz"),
                                weights=np.array([{"w": 1}], dtype=object))
  p["wrongkeys.npz"] = _npz_bytes(str(files / "wrongkeys.npz"), foo=np.zeros(3, np.float32))
  (files / "model.pt").write_bytes(rand)     # not a torch file (torch-free reader)
  p["model.pt"] = str(files / "model.pt")
  (files / "afile").write_text("not a directory")
  p["afile"] = str(files / "afile")
  # datasets with one defect each
  for name, defect in (("data_badjson", "json"), ("data_trunc", "shard")):
    d = root / name
    shutil.copytree(data, d)
    if defect == "json":
      (d / "dataset.json").write_text('{"format": "sfd_jax.latents", "schema_version": 1,')
    else:
      shard = sorted(d.glob("*.array_record"))[0]
      shard.write_bytes(shard.read_bytes()[:100])
    p[name] = str(d)
  # runs with broken checkpoints (copies of the saved run)
  allbad = root / "run_allbad"
  shutil.copytree(run, allbad)
  for s in (2, 4):
    _corrupt_largest(str(allbad / "checkpoints" / str(s)))
  p["run_allbad"] = str(allbad)
  (root / "empty").mkdir()
  p["empty"] = str(root / "empty")
  # a converted texture VAE with 4 latent channels (the model has 32 texture channels)
  cfg = texture_vae.TextureVAEConfig.tiny()
  vae = texture_vae.TextureVAE(cfg, rngs=nnx.Rngs(0))
  p["tvae4"] = tvae_convert.save_converted(str(root / "tvae4"),
                                           nnx.to_pure_dict(nnx.state(vae, nnx.Param)), cfg)
  # a converted-inception folder (only its layout is checked before sampling)
  inc = root / "inception"
  (inc / "params").mkdir(parents=True)
  (inc / "meta.json").write_text(json.dumps({"model": "inception_v3_fid"}))
  p["inception"] = str(inc)
  # SemVAE features of width 24 (the tiny SemVAE expects 32)
  rng = np.random.default_rng(0)
  features.write_feature_dataset(str(root / "feats24"),
                                 rng.normal(size=(16, 16, 24)).astype(np.float16),
                                 list(range(16)), records_per_shard=8)
  p["feats24"] = str(root / "feats24")
  # images: a class folder layout, and a folder without class sub-folders
  for cls in ("a", "b"):
    (root / "images" / cls).mkdir(parents=True)
    for i in range(2):
      _png(root / "images" / cls / f"{i}.png", i)
  p["images"] = str(root / "images")
  (root / "flat").mkdir()
  _png(root / "flat" / "0.png", 0)
  p["flat"] = str(root / "flat")
  # reference latents: a folder with a broken .safetensors file
  (root / "refbad").mkdir()
  shutil.copy(files / "random.safetensors", root / "refbad" / "shard000.safetensors")
  p["refbad"] = str(root / "refbad")
  # a config file with a misspelled field
  (files / "misspelled_config.py").write_text(
      "from configs import tiny\n\n\ndef get_config(arg=None):\n"
      "  c = tiny.get_config(arg)\n  c.model.hiden_size = 64\n  return c\n")
  p["misspelled_config.py"] = str(files / "misspelled_config.py")
  # a copy of the run whose lock is held by a live process (this one, on this host)
  from sfd_jax.core import workdir_lock  # pylint: disable=import-outside-toplevel
  shutil.copytree(run, root / "run_locked")
  owner = workdir_lock.owner_record("train", "main.py (the test's owner)")
  (root / "run_locked" / workdir_lock.LOCK_NAME).write_text(json.dumps(owner))
  p["run_locked"] = str(root / "run_locked")
  return Saved(root, data, run, p)


# ------------------------------------------------------------------ the table


@dataclasses.dataclass(frozen=True)
class Case:
  name: str
  target: str
  args: tuple[str, ...]
  kind: str                       # the line's "<kind>:" (config error, data error, ...)
  expect: tuple[str, ...]         # substrings of the line (the file / field / fix)
  env: tuple[tuple[str, str], ...] = ()


def _cases(s: Saved) -> list[Case]:
  d, run, p, out = s.data, s.run, s.p, str(s.root / "out")
  tiny_cfg = f"--config=configs/tiny.py:data={d}"
  vae = "--config=configs/tiny_vae.py:job="

  def main(name, *args, kind="config error", expect=(), mode="train", config=tiny_cfg,
           workdir=None):
    return Case(name, MAIN, (config, f"--workdir={workdir or os.path.join(out, name)}",
                             f"--mode={mode}", *args), kind, tuple(expect))

  def cmd(name, module, *args, kind, expect):
    return Case(name, module, tuple(args), kind, tuple(expect))

  sample = ("--config.sample.checkpoint=" + run,)
  return [
      # --- flags and config files (main.py, any mode)
      main("override_misspelled", "--config.optimizer.lrr=1",
           expect=("--config.optimizer.lrr", "'lrr'", "did you mean 'lr'")),
      main("section_misspelled", "--config.modle.depth=3", expect=("'modle'", "'model'")),
      main("config_file_missing", config="--config=configs/tinyy.py",
           expect=("configs/tinyy.py", "No such file")),
      main("config_option_unknown", config="--config=configs/tiny.py:foo=1",
           expect=("configs/tiny.py:foo=1", "unknown config argument 'foo'")),
      main("override_wrong_type", "--config.num_train_steps=abc",
           expect=("--config.num_train_steps=abc", "int")),
      main("mode_unknown", mode="trian", expect=("--mode=trian", "train|sample")),
      main("config_file_field_misspelled", config=f"--config={p['misspelled_config.py']}",
           expect=("config.model.hiden_size is not a field", "did you mean 'hidden_size'")),
      main("field_of_another_mode_checked", *sample, "--config.train_eval.method=rk9",
           mode="eval", expect=("config.train_eval.method must be one of", "got 'rk9'")),
      # --- train: config ranges
      main("steps_negative", "--config.num_train_steps=-5",
           expect=("config.num_train_steps", "> 0", "-5")),
      main("checkpoint_every_zero", "--config.checkpoint_every_steps=0",
           expect=("config.checkpoint_every_steps", "> 0")),
      main("log_every_zero", "--config.log_every_steps=0", expect=("config.log_every_steps",)),
      main("delta_t_out_of_range", "--config.objective.delta_t=1.5",
           expect=("config.objective.delta_t", "[0, 1]", "1.5")),
      main("ema_decay_out_of_range", "--config.ema_decay=1.5", expect=("config.ema_decay",)),
      main("lr_negative", "--config.optimizer.lr=-1", expect=("config.optimizer.lr", "> 0")),
      main("optimizer_unknown", "--config.optimizer.name=sgd",
           expect=("config.optimizer.name", "'adamw'")),
      main("batch_not_divisible", "--config.batch_size=12",
           expect=("config.batch_size=12", "multiple of 8")),
      main("accumulate_steps_not_dividing", "--config.optimizer.accumulate_steps=3",
           expect=("config.optimizer.accumulate_steps=3", "global batch 8",
                   "a multiple of 24")),
      main("accumulate_steps_zero", "--config.optimizer.accumulate_steps=0",
           expect=("config.optimizer.accumulate_steps must be an integer > 0, got 0",)),
      main("mesh_too_large", "--config.mesh.fsdp=16", expect=("needs 16 devices",)),
      main("variant_unknown", "--config.model.variant=XXXL",
           expect=("config.model", "'XXXL'")),
      main("train_eval_without_decoder", "--config.train_eval.every_steps=2",
           expect=("config.train_eval", "config.sample.texture_vae")),
      main("workdir_under_a_file", workdir=os.path.join(p["afile"], "sub"),
           expect=(p["afile"], "not a directory")),
      # --- train: the dataset against the model
      main("data_path_empty", "--config.data.path=", expect=("config.data.path",)),
      main("data_path_missing", f"--config.data.path={s.root}/nope", kind="file not found",
           expect=(f"{s.root}/nope/dataset.json",)),
      main("labels_exceed_num_classes", "--config.model.num_classes=5", kind="data error",
           expect=(f"{d}/dataset.json", "labels 0..9", "config.model.num_classes")),
      main("channels_mismatch", "--config.model.in_channels=40", kind="data error",
           expect=(f"{d}/dataset.json", "48 channels", "config.model.in_channels")),
      main("grid_mismatch", "--config.model.input_size=8", kind="data error",
           expect=(f"{d}/dataset.json", "4×4", "config.model.input_size")),
      main("repa_width_mismatch", "--config.model.repa_dim=32", kind="data error",
           expect=(f"{d}/dataset.json", "width 16", "config.model.repa_dim")),
      main("stats_random_bytes", f"--config.data.stats={p['stats_random.npz']}",
           kind="data error", expect=(p["stats_random.npz"], "not an .npz archive")),
      main("stats_std_zero", f"--config.data.stats={p['stats_std0.npz']}", kind="data error",
           expect=(p["stats_std0.npz"], "std > 0", "texture_std[0]")),
      main("stats_channels", f"--config.data.stats={p['stats_8ch.npz']}", kind="data error",
           expect=(p["stats_8ch.npz"], "'texture_mean' expected shape [32]")),
      main("stats_missing", f"--config.data.stats={s.root}/none.npz", kind="file not found",
           expect=(f"{s.root}/none.npz",)),
      main("dataset_json_corrupt", f"--config.data.path={p['data_badjson']}",
           kind="data error", expect=(f"{p['data_badjson']}/dataset.json", "not valid JSON")),
      main("shard_truncated", f"--config.data.path={p['data_trunc']}", kind="data error",
           expect=(p["data_trunc"], "data-00000-of-00002.array_record", "bytes")),
      # --- train: resuming the saved run
      main("resume_delta_t_changed", "--config.objective.delta_t=0.5", workdir=run,
           expect=(f"{run}/checkpoints/4", "objective.delta_t: 0.3 -> 0.5",
                   "allow_config_change=objective.delta_t")),
      main("resume_model_changed", "--config.model.depth=3", workdir=run,
           expect=(f"{run}/checkpoints/4", "model.depth: 2 -> 3")),
      main("resume_no_checkpoint_restores", workdir=p["run_allbad"], kind="checkpoint error",
           expect=(f"{p['run_allbad']}/checkpoints", "step 4:", "step 2:", "left as they are")),
      # --- one run per workdir
      main("workdir_in_use", workdir=p["run_locked"], kind="workdir in use",
           expect=(p["run_locked"], f"process {os.getpid()} on host", "--mode=train",
                   "nothing was changed", "--config.force_unlock=True")),
      # --- sample
      main("sample_checkpoint_empty", mode="sample",
           expect=("config.sample.checkpoint is empty",)),
      main("sample_checkpoint_missing", f"--config.sample.checkpoint={s.root}/nope",
           mode="sample", expect=("config.sample.checkpoint", f"{s.root}/nope")),
      main("sample_method_unknown", *sample, "--config.sample.method=rk9", mode="sample",
           expect=("config.sample.method", "'rk9'")),
      main("sample_num_images_zero", *sample, "--config.sample.num_images=0", mode="sample",
           expect=("config.sample.num_images", "> 0")),
      main("sample_batch_not_divisible", *sample, "--config.sample.batch_size=3",
           mode="sample", expect=("config.sample.batch_size=3", "8 devices")),
      main("sample_autoguidance_without_guide", *sample,
           "--config.sample.guidance=autoguidance", "--config.sample.scale=1.5",
           mode="sample", expect=("config.sample.guide_checkpoint",)),
      main("sample_texture_vae_channels", *sample, f"--config.sample.texture_vae={p['tvae4']}",
           mode="sample", expect=("config.sample.texture_vae", "4-channel", "32 texture")),
      main("sample_texture_vae_not_converted", *sample,
           f"--config.sample.texture_vae={p['empty']}", mode="sample",
           expect=("config.sample.texture_vae", p["empty"], "not a converted checkpoint")),
      main("sample_checkpoint_is_a_texture_vae", f"--config.sample.checkpoint={p['tvae4']}",
           mode="sample", expect=(f"config.sample.checkpoint={p['tvae4']} is a converted "
                                  "texture VAE folder", "needs a converted or exported "
                                  "LightningDiT folder or an SFD training workdir")),
      main("sample_texture_vae_is_a_dit_run", *sample, f"--config.sample.texture_vae={run}",
           mode="sample", expect=(f"config.sample.texture_vae={run} is an SFD (LightningDiT) "
                                  "training run", "needs a converted texture VAE folder")),
      # --- eval
      main("eval_inception_empty", *sample, mode="eval", expect=("config.eval.inception",)),
      main("eval_reference_corrupt", *sample, f"--config.sample.texture_vae={p['tvae4']}",
           f"--config.eval.inception={p['inception']}",
           f"--config.eval.reference_npz={p['adm_random.npz']}", mode="eval",
           kind="data error", expect=("config.eval.reference_npz", p["adm_random.npz"])),
      # --- export
      main("export_dtype_unknown", "--config.export.dtype=int8", mode="export", workdir=run,
           expect=("config.export.dtype must be one of", "got 'int8'")),
      main("export_step_missing", "--config.export.step=3", mode="export", workdir=run,
           kind="checkpoint error", expect=("no checkpoint at step 3", "[2, 4]")),
      main("export_no_checkpoints", mode="export", workdir=p["empty"],
           kind="checkpoint error", expect=(p["empty"],)),
      # --- encode / extract
      main("encode_folder_missing", f"--config.data.path={s.root}/noimages", mode="encode",
           config=vae + "encode", kind="file not found", expect=(f"{s.root}/noimages",)),
      main("encode_batch_zero", f"--config.data.path={p['images']}",
           "--config.encode.per_device_batch=0", mode="encode", config=vae + "encode",
           expect=("config.encode.per_device_batch", "> 0")),
      main("extract_no_class_folders", f"--config.data.path={p['flat']}", mode="extract",
           config=vae + "encode", kind="file not found",
           expect=(p["flat"], "no class sub-folders")),
      main("encode_dinov2_is_a_texture_vae", f"--config.data.path={p['images']}",
           "--config.encode.random_init=False", f"--config.encode.dinov2={p['tvae4']}",
           mode="encode", config=vae + "encode", kind="converter input error",
           expect=(f"config.encode.dinov2='{p['tvae4']}' is a converted texture VAE folder",
                   "a converted DINOv2 folder is expected")),
      main("encode_with_a_training_config", mode="encode",
           expect=("config.encode", "--mode=encode", "configs/encode_imagenet.py")),
      # --- demo
      main("demo_with_a_training_config", mode="demo",
           expect=("config.demo", "--mode=demo", "configs/demo.py")),
      main("demo_dataset_unknown", "--config.demo.dataset=mnist", mode="demo",
           config="--config=configs/demo.py:fast=1", expect=("config.demo.dataset", "'mnist'")),
      # --- the two autoencoder trainers
      main("semvae_data_empty", mode="train_semvae", config=vae + "semvae",
           expect=("config.data.path is empty", "--mode=extract")),
      main("semvae_feature_width", mode="train_semvae", config=vae + f"semvae,data={p['feats24']}",
           kind="data error", expect=(p["feats24"], "width 24", "config.model.input_dim")),
      main("texture_vae_extra_term_unknown", "--config.loss.extra_terms=lpips",
           mode="train_texture_vae", config=vae + f"texture_vae,data={p['images']}",
           expect=("config.loss.extra_terms", "'lpips'")),
      main("texture_vae_folder_missing", mode="train_texture_vae",
           config=vae + f"texture_vae,data={s.root}/noimages", kind="file not found",
           expect=(f"{s.root}/noimages",)),
      main("semvae_mode_with_a_texture_vae_config", mode="train_semvae",
           config=vae + f"texture_vae,data={p['images']}",
           expect=("a texture-VAE training config", "--mode=train_semvae",
                   "configs/semvae_ch16.py")),
      main("gan_lpips_empty", "--config.loss.lpips_random_init=False", mode="train_texture_vae",
           config=vae + f"texture_gan,data={p['images']}",
           expect=("config.loss.lpips is empty", "config.loss.perceptual_weight > 0",
                   "python -m sfd_jax.convert.lpips")),
      main("gan_disc_start_negative", "--config.loss.disc_start=-5", mode="train_texture_vae",
           config=vae + f"texture_gan,data={p['images']}",
           expect=("config.loss.disc_start must be an integer >= 0, got -5",)),
      # --- converters
      cmd("dit_src_missing", "sfd_jax.convert.lightning_dit", "--src", f"{s.root}/none.pt",
          "--dst", f"{out}/c1", kind="file not found", expect=(f"{s.root}/none.pt",)),
      cmd("dit_src_random_safetensors", "sfd_jax.convert.lightning_dit", "--src",
          p["random.safetensors"], "--dst", f"{out}/c2", kind="converter input error",
          expect=(p["random.safetensors"], "not a valid .safetensors file")),
      cmd("dit_variant_unknown", "sfd_jax.convert.lightning_dit", "--src", p["wrongkeys.npz"],
          "--dst", f"{out}/c3", "--variant", "XXXL", kind="config error",
          expect=("--variant XXXL", "'XXXL'")),
      cmd("texture_vae_src_truncated", "sfd_jax.convert.texture_vae", "--src",
          p["truncated.npz"], "--dst", f"{out}/c4", kind="converter input error",
          expect=(p["truncated.npz"], "truncated or not an .npz")),
      cmd("texture_vae_preset_unknown", "sfd_jax.convert.texture_vae", "--src",
          p["wrongkeys.npz"], "--dst", f"{out}/c5", "--preset", "f8", kind="usage error",
          expect=("--preset", "'f8'")),
      cmd("dinov2_src_random_npz", "sfd_jax.convert.dinov2", "--src", p["random.npz"],
          "--dst", f"{out}/c6", kind="converter input error",
          expect=(p["random.npz"], "not an .npz archive")),
      cmd("semvae_src_pickled_objects", "sfd_jax.convert.semantic_vae", "--src",
          p["objects.npz"], "--dst", f"{out}/c7", kind="converter input error",
          expect=(p["objects.npz"], "Python objects")),
      cmd("inception_src_wrong_keys", "sfd_jax.convert.inception", "--src", p["wrongkeys.npz"],
          "--dst", f"{out}/c8", kind="converter input error", expect=(p["wrongkeys.npz"],)),
      cmd("inception_src_pt", "sfd_jax.convert.inception", "--src", p["model.pt"], "--dst",
          f"{out}/c9", kind="converter input error",
          expect=(p["model.pt"], "not a readable PyTorch file")),
      cmd("export_cli_src_not_converted", "sfd_jax.checkpoint.export", "--src", p["empty"],
          "--dst", f"{out}/c10", kind="file not found",
          expect=(p["empty"], "not a converted checkpoint")),
      cmd("reference_latents_none", "sfd_jax.data.convert_reference", "--src", p["empty"],
          "--dst", f"{out}/c11", kind="file not found",
          expect=(p["empty"], "no *.safetensors")),
      cmd("reference_latents_corrupt", "sfd_jax.data.convert_reference", "--src", p["refbad"],
          "--dst", f"{out}/c12", kind="data error",
          expect=(f"{p['refbad']}/shard000.safetensors", "not a valid .safetensors")),
      cmd("sweep_unknown", "sfd_jax.sweep", "--config=configs/tiny.py", "--sweep=nope",
          kind="config error", expect=("unknown sweep 'nope'",)),
      cmd("sweep_config_option", "sfd_jax.sweep", "--config=configs/tiny.py:foo=1",
          "--sweep=delta_t", kind="config error", expect=("configs/tiny.py:foo=1", "'foo'")),
      cmd("vae_export_no_checkpoints", "sfd_jax.checkpoint.export",
          f"--run={p['empty']}", "--kind=semvae", f"--dst={out}/c13",
          kind="checkpoint error", expect=(f"{p['empty']}/checkpoints",)),
  ]


# ------------------------------------------------------------------ running them


def _env():
  # matmul precision as tests/conftest.py sets it in this process, so that the children's
  # train steps are the programs the fixture compiled (persistent-cache hits)
  env = child_env(JAX_DEFAULT_MATMUL_PRECISION="highest")
  env.pop("SFD_JAX_TRACEBACK", None)   # the default output of a user error: no traceback
  return env


def _run_cases(root: pathlib.Path, cases: list[dict], protect: list[str]) -> dict:
  spec = root / f"cases_{len(list(root.glob('cases_*.json')))}.json"
  logs = root / "logs"
  logs.mkdir(exist_ok=True)
  spec.write_text(json.dumps({"cases": cases, "workdir": str(logs), "protect": protect}))
  result = spec.with_suffix(".out.json")
  proc = subprocess.run([sys.executable, "-m", "tests.cli_runner", str(spec), str(result)],
                        cwd=REPO, env=_env(), capture_output=True, text=True, timeout=1500)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return {r["name"]: r for r in json.loads(result.read_text())}


@contextlib.contextmanager
def _read_only(path: str):
  """Makes ``path`` read-only for this process's children: chmod for a normal user; as
  root (who ignores permissions) a read-only bind mount. Yields False if impossible."""
  if os.geteuid() != 0:
    modes = {}
    for p in [path] + glob.glob(os.path.join(path, "**"), recursive=True):
      modes[p] = os.stat(p).st_mode
      os.chmod(p, modes[p] & ~0o222)
    try:
      yield True
    finally:
      for p, m in modes.items():
        os.chmod(p, m)
    return
  ok = (subprocess.run(["mount", "--bind", path, path], capture_output=True).returncode == 0
        and subprocess.run(["mount", "-o", "remount,ro,bind", path],
                           capture_output=True).returncode == 0)
  try:
    yield ok
  finally:
    subprocess.run(["umount", path], capture_output=True)


def _protected(s: Saved) -> list[str]:
  keep = [s.data, s.run] + [v for k, v in s.p.items() if k != "afile"]
  return sorted(set(keep))


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  return _make_saved(tmp_path_factory.mktemp("user_errors"))


@pytest.fixture(scope="module")
def results(saved):
  """Runs the whole table, then the recovery cases, in one runner process."""
  s = saved
  root = s.root
  # recovery cases work on copies of the saved run
  for name in ("run_fallback", "run_full", "run_nan", "run_ro"):
    shutil.copytree(s.run, root / name)
  _corrupt_largest(str(root / "run_fallback" / "checkpoints" / "4"))
  from tests.cli_runner import tree_hash  # pylint: disable=import-outside-toplevel
  corrupt_hash = tree_hash(str(root / "run_fallback" / "checkpoints" / "4"))
  cfg6 = f"--config=configs/tiny.py:data={s.data},steps=6"
  resume = [cfg6, "--config.checkpoint_every_steps=2"]
  table = [dataclasses.asdict(c) for c in _cases(s)]
  bad = [f"--config=configs/tiny.py:data={s.data}", f"--workdir={root}/out/tb",
         "--config.num_train_steps=-5"]
  extra = [
      {"name": "traceback_env", "target": MAIN, "args": bad,
       "env": {"SFD_JAX_TRACEBACK": "1"}},
      {"name": "traceback_verbosity", "target": MAIN, "args": [*bad, "--verbosity=1"]},
      {"name": "fallback", "target": MAIN, "timeout": 400,
       "args": [*resume, "--config.num_train_steps=4", f"--workdir={root}/run_fallback"]},
      {"name": "disk_full", "target": MAIN, "timeout": 400, "fsize": 300_000,
       "args": [*resume, f"--workdir={root}/run_full"]},
      {"name": "disk_full_rerun", "target": MAIN, "timeout": 400,
       "args": [*resume, f"--workdir={root}/run_full"]},
      # std 1e-30: finite and > 0, so accepted, but the normalised latents overflow
      {"name": "nan_loss", "target": MAIN, "timeout": 400,
       "args": [*resume, f"--config.data.stats={s.p['stats_tiny_std.npz']}",
                "--config.allow_config_change=data.stats", f"--workdir={root}/run_nan"]},
  ]
  protect = _protected(s) + [f"{root}/run_full/checkpoints/{k}" for k in (2, 4)] + [
      f"{root}/run_nan/checkpoints", f"{root}/run_ro"]
  before = {p: tree_hash(p) for p in protect}
  with _read_only(str(root / "run_ro")) as ok:
    if ok:
      extra.append({"name": "read_only_workdir", "target": MAIN,
                    "args": [*resume, f"--workdir={root}/run_ro"]})
    out = _run_cases(root, table + extra, protect)
  return {"out": out, "before": before, "corrupt_hash": corrupt_hash, "ro_ok": ok}


def _line(result) -> str:
  lines = [l for l in result["stderr"].splitlines() if l.strip()]
  return lines[-1] if lines else ""


def _prog(target: str) -> str:
  return "main.py" if target == MAIN else f"python -m {target}"


def _check_one_line(result, prog, kind, expect):
  err = result["stderr"]
  assert result["rc"] == 2, f"exit status {result['rc']}:\n{err[-3000:]}"
  assert "Traceback" not in err, err[-3000:]
  line = _line(result)
  assert line.startswith(f"{prog}: {kind}: "), line
  assert sum(l.startswith(f"{prog}: ") for l in err.splitlines()) == 1, err[-3000:]
  for text in expect:
    assert text in line, f"{text!r} not in: {line}"
  assert "allow_pickle" not in line


def test_table_has_forty_cases(saved):
  cases = _cases(saved)
  assert len({c.name for c in cases}) == len(cases) >= 40
  targets = {c.target for c in cases}
  assert {"sfd_jax.convert.lightning_dit", "sfd_jax.convert.texture_vae",
          "sfd_jax.convert.dinov2", "sfd_jax.convert.semantic_vae",
          "sfd_jax.convert.inception", "sfd_jax.checkpoint.export",
          "sfd_jax.data.convert_reference", "sfd_jax.sweep"} <= targets
  modes = {a.split("=", 1)[1] for c in cases for a in c.args if a.startswith("--mode=")}
  assert {"train", "sample", "eval", "export", "encode", "extract", "train_semvae",
          "train_texture_vae", "demo"} <= modes


class _AnyPath(dict):
  def __missing__(self, key):
    return f"/placeholder/{key}"


CASE_NAMES = [c.name for c in _cases(Saved(pathlib.Path("/placeholder"), "/placeholder/d",
                                           "/placeholder/r", _AnyPath()))]


@pytest.mark.parametrize("name", CASE_NAMES)
def test_bad_input_gets_one_line(saved, results, name):
  case = next(c for c in _cases(saved) if c.name == name)
  result = results["out"][case.name]
  _check_one_line(result, _prog(case.target), case.kind, case.expect)
  changed = [p for p, h in result["hashes"].items() if results["before"].get(p, h) != h]
  assert not changed, f"{case.name} changed saved data: {changed}"


def _state(workdir, step, data):
  from sfd_jax.checkpoint import restore_state_only  # pylint: disable=import-outside-toplevel
  from sfd_jax.training import sfd  # pylint: disable=import-outside-toplevel
  setup = sfd.build(tiny(data, num_train_steps=6))
  state, got, _ = restore_state_only(os.path.join(workdir, "checkpoints"),
                                     setup.abstract_state, step)
  assert got == step
  return jax.device_get(state)


def _same(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_corrupt_latest_checkpoint_falls_back(saved, results):
  """Step 4 truncated: warned about by step and reason, moved (not deleted) to
  checkpoints.corrupt/4, the run resumes from step 2 and re-creates step 4 bit-exactly."""
  r = results["out"]["fallback"]
  root = saved.root / "run_fallback"
  assert r["rc"] == 0, r["stderr"][-3000:]
  assert "Traceback" not in r["stderr"], r["stderr"][-3000:]
  warn = [l for l in r["stderr"].splitlines() if "cannot be restored" in l]
  assert len(warn) == 1 and f"{root}/checkpoints/4" in warn[0], warn
  assert "resuming from step 2" in warn[0] and "array " in warn[0], warn[0]
  from tests.cli_runner import tree_hash  # pylint: disable=import-outside-toplevel
  assert tree_hash(str(root / "checkpoints.corrupt" / "4")) == results["corrupt_hash"]
  assert (root / "checkpoints.corrupt" / "4.reason.txt").read_text().strip()
  steps = sorted(int(q.name) for q in (root / "checkpoints").iterdir() if q.name.isdigit())
  assert steps == [2, 4]
  _same(_state(str(root), 4, saved.data), _state(saved.run, 4, saved.data))


def test_disk_full_keeps_checkpoints_and_rerun_finishes(saved, results):
  r = results["out"]["disk_full"]
  root = saved.root / "run_full"
  _check_one_line(r, "main.py", "resource error",
                  (str(root), "[EFBIG]", "checkpoints up to step 4", "rerun"))
  # Orbax / TensorStore do not report the failed save again (their E... log lines)
  library_errors = [line for line in r["stderr"].splitlines()
                    if re.match(r"E\d{4} ", line) or "RESOURCE_EXHAUSTED" in line
                    or "OUT_OF_RANGE" in line]
  assert not library_errors, library_errors
  changed = [p for p, h in r["hashes"].items() if results["before"].get(p, h) != h]
  assert not changed, changed
  again = results["out"]["disk_full_rerun"]
  assert again["rc"] == 0, again["stderr"][-3000:]
  steps = sorted(int(q.name) for q in (root / "checkpoints").iterdir() if q.name.isdigit())
  assert steps == [2, 4, 6]
  assert not list((root / "checkpoints").glob("*tmp*")), "the failed save was not cleaned"


def test_nan_loss_is_one_line_and_keeps_the_checkpoint(saved, results):
  r = results["out"]["nan_loss"]
  _check_one_line(r, "main.py", "training diverged",
                  ("NaN/Inf", "Last good checkpoint: step 4", "config.optimizer.lr",
                   "statistics"))
  changed = [p for p, h in r["hashes"].items() if results["before"].get(p, h) != h]
  assert not changed, changed


def test_read_only_workdir(saved, results):
  if not results["ro_ok"]:
    pytest.skip("cannot make a directory read-only here (root without mount rights)")
  r = results["out"]["read_only_workdir"]
  root = saved.root / "run_ro"
  _check_one_line(r, "main.py", "resource error", (str(root), "not writable"))
  assert r["hashes"][str(root)] == results["before"][str(root)]


@pytest.mark.parametrize("name", ["traceback_env", "traceback_verbosity"])
def test_traceback_on_request(results, name):
  """SFD_JAX_TRACEBACK=1 and --verbosity=1 print the traceback before the same line."""
  r = results["out"][name]
  assert r["rc"] == 2, r["stderr"][-3000:]
  assert "Traceback (most recent call last)" in r["stderr"]
  assert _line(r).startswith("main.py: config error: config.num_train_steps must be")


def test_internal_errors_keep_their_traceback():
  """Only user errors are shortened: anything else is re-raised unchanged."""
  from sfd_jax.core import errors, runner  # pylint: disable=import-outside-toplevel

  def bug(_):
    raise ZeroDivisionError("a bug")
  with pytest.raises(ZeroDivisionError):
    runner.guard(bug, "prog")(None)
  assert errors.user_error(ZeroDivisionError("x")) is None
  assert isinstance(errors.user_error(OSError(28, "No space left on device", "/x")),
                    errors.ResourceError)


def _raised_in(filename: str, message: str) -> Exception:
  """An exception whose traceback has a frame in ``filename`` (a library's path)."""
  scope = {}
  exec(compile(f"def fail():\n  raise ValueError({message!r})\n", filename, "exec"),  # pylint: disable=exec-used
       scope)
  try:
    scope["fail"]()
  except ValueError as e:
    return e
  raise AssertionError("unreachable")


def test_failed_library_saves_log_nothing():
  """What Orbax / TensorStore log about a failed save — asyncio's "Task exception was
  never retrieved" for a failed write (logged whenever the task is collected, so in CI
  sometimes before the error line and sometimes not at all), their threads' and the
  commit's error records — is not shown: the entry point reports the failure in its
  line. Another library error record keeps its first line without the traceback; the
  same records for an exception raised in our own code are left as they are."""
  import logging  # pylint: disable=import-outside-toplevel
  from sfd_jax.core import runner  # pylint: disable=import-outside-toplevel

  def record_for(filename, text="OUT_OF_RANGE: Failed writing"):
    exc = _raised_in(filename, text)
    return logging.LogRecord(
        "asyncio", logging.ERROR, "/usr/lib/python3/asyncio/base_events.py", 1771,
        "Task exception was never retrieved\nfuture: <Task finished>", (),
        (type(exc), exc, exc.__traceback__))

  def orbax_record(msg):
    return logging.LogRecord("absl", logging.ERROR, "/site-packages/orbax/checkpoint/_src/"
                             "checkpointers/async_checkpointer.py", 264, msg, (), None)

  flt = runner._OneLineLibraryErrors()  # pylint: disable=protected-access
  lib = "/site-packages/orbax/checkpoint/_src/serialization/serialization.py"
  assert not flt.filter(record_for(lib))
  for msg in ("[process=0] Failed to run 5 Handler Commit operations or the Commit callback "
              "in background save thread, directory: /x/6",
              "[thread=MainThread][step=6] Save Finalize thread (save_finalize) failed.",
              "_SignalingThread.run() raised an exception: RESOURCE_EXHAUSTED: x"):
    assert not flt.filter(orbax_record(msg)), msg
  other = record_for(lib, "DATA_LOSS: unexpected end of a manifest")
  assert flt.filter(other)
  assert other.exc_info is None and other.getMessage() == "Task exception was never retrieved"
  ours = record_for("/repo/sfd_jax/training/loop.py")
  assert flt.filter(ours)
  assert ours.exc_info is not None and "future:" in ours.getMessage()


def test_failed_library_coroutines_print_nothing():
  """A failed Orbax restore leaves its read coroutines to the garbage collector, which
  reports each one ("Exception ignored in: <coroutine ...>" + traceback) through
  ``sys.unraisablehook``; those are dropped, any other unraisable exception is not."""
  from sfd_jax.core import runner  # pylint: disable=import-outside-toplevel
  seen = []
  hook = runner._quiet_unraisable(seen.append)  # pylint: disable=protected-access

  def unraisable_from(filename):
    exc = _raised_in(filename, "Encountered error while reading")
    return type("U", (), {"exc_value": exc, "object": None})()

  hook(unraisable_from("/site-packages/orbax/checkpoint/_src/serialization/x.py"))
  assert not seen
  ours = unraisable_from("/repo/sfd_jax/checkpoint/manager.py")
  hook(ours)
  assert seen == [ours]


# ------------------------------------------------------------------ one run per workdir


def _train_args(saved, workdir):
  return [f"--config=configs/tiny.py:data={saved.data}", f"--workdir={workdir}",
          f"--config.num_train_steps={STEPS}", "--config.checkpoint_every_steps=2"]


def _paused_after_step_2(saved, workdir, go_file=None):
  """A main.py training on ``workdir`` (tests.util.PausedMain) that has saved step 2 and
  waits before step 3; killed if it does not get there."""
  from tests.util import PausedMain  # pylint: disable=import-outside-toplevel
  first = PausedMain(_train_args(saved, workdir), step=2,
                     checkpoint=str(workdir / "checkpoints" / "2"), go_file=go_file)
  try:
    assert first.wait_paused(), "the first training did not reach step 2"
    time.sleep(0.5)                 # the step-2 save settles (its folder is final)
  except BaseException:
    first.kill()
    raise
  return first


def test_second_training_on_a_workdir_is_refused(saved):
  """Two main.py trainings on one workdir: the second stops with one line naming the
  first (host, pid, start time) and changes nothing; the first then finishes, and its
  checkpoints are bit-identical to the run trained alone."""
  from tests.cli_runner import tree_hash  # pylint: disable=import-outside-toplevel
  from sfd_jax.core import workdir_lock  # pylint: disable=import-outside-toplevel
  wd = saved.root / "run_twice"
  first = _paused_after_step_2(saved, wd, go_file=str(saved.root / "run_twice.go"))
  try:
    owner = json.loads((wd / workdir_lock.LOCK_NAME).read_text())
    assert owner["pid"] == first.proc.pid

    def files():                    # what a second run could touch (the first is paused)
      return (sorted(os.listdir(wd)), tree_hash(str(wd / "checkpoints")),
              (wd / workdir_lock.LOCK_NAME).read_bytes(),
              {p: tree_hash(p) for p in _protected(saved)})
    before = files()
    second = subprocess.run([sys.executable, MAIN, *_train_args(saved, wd)], cwd=REPO,
                            env=_env(), capture_output=True, text=True, timeout=600)
    _check_one_line({"rc": second.returncode, "stderr": second.stderr}, "main.py",
                    "workdir in use", (str(wd), f"process {first.proc.pid} on host",
                                       owner["started"], "--mode=train"))
    assert files() == before, "the second launch changed files"
    first.resume()
    done = first.finish()
  finally:
    first.kill()
  assert done.returncode == 0, done.stderr[-3000:]
  assert not (wd / workdir_lock.LOCK_NAME).exists()
  for step in (2, 4):
    _same(_state(str(wd), step, saved.data), _state(saved.run, step, saved.data))


def test_killed_training_leaves_a_stale_lock_that_is_taken_over(saved):
  """kill -9 of a training after its step-2 checkpoint leaves its lock; the next run on
  the workdir sees that its process is gone, takes the lock over (one warning naming
  the old owner) and resumes exactly: step 4 is bit-identical to the run trained alone."""
  from sfd_jax.core import workdir_lock  # pylint: disable=import-outside-toplevel
  wd = saved.root / "run_killed"
  first = _paused_after_step_2(saved, wd)
  first.kill()
  first.finish()
  stale = json.loads((wd / workdir_lock.LOCK_NAME).read_text())
  assert stale["pid"] == first.proc.pid
  again = subprocess.run([sys.executable, MAIN, *_train_args(saved, wd)], cwd=REPO,
                         env=_env(), capture_output=True, text=True, timeout=600)
  assert again.returncode == 0, again.stderr[-3000:]
  took = [line for line in again.stderr.splitlines() if "took over the lock" in line]
  assert len(took) == 1 and f"process {first.proc.pid}" in took[0], took
  assert "is not running" in took[0], took[0]
  assert not (wd / workdir_lock.LOCK_NAME).exists()
  assert sorted(int(q.name) for q in (wd / "checkpoints").iterdir() if q.name.isdigit()) == [2, 4]
  _same(_state(str(wd), 4, saved.data), _state(saved.run, 4, saved.data))
