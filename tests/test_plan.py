"""--mode=plan: the tiny configs' programs compiled by the real TPU compiler for a
4-chip TPU v5e slice (v5e:2x2), the report's fields, the activation-sharding check, and
the one-line errors. Needs the TPU compiler (libtpu, installed by CI); skipped without
it."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

from tests.conftest import REPO, child_env

# the libtpu each pinned jax asks for in its "tpu" extra (requirements/py3*.txt)
LIBTPU_OF_JAX = {"0.10.2": "0.0.42", "0.12.0.1": "0.0.50"}


def _libtpu_series() -> str:
  import jax  # pylint: disable=import-outside-toplevel
  if jax.__version__ not in LIBTPU_OF_JAX:
    pytest.skip(f"no libtpu pin recorded for jax {jax.__version__} (LIBTPU_OF_JAX)")
  return LIBTPU_OF_JAX[jax.__version__]

needs_libtpu = pytest.mark.tpu_compile   # skipped without libtpu (tests/conftest.py)

TOPOLOGY = "v5e:2x2"
BATCH = 24            # global; 6 per chip: no other dimension of the tiny model is 24


def _main(workdir, *args, config="configs/tiny.py", env=None):
  cmd = [sys.executable, "main.py", f"--config={config}", "--mode=plan",
         f"--workdir={workdir}", f"--config.plan.topology={TOPOLOGY}", *args]
  return subprocess.run(cmd, cwd=REPO, env=child_env(**(env or {})), capture_output=True,
                        text=True, timeout=600)


def _problem_lines(stderr: str) -> list[str]:
  """stderr lines that are not the TPU runtime's start-up chatter."""
  return [ln for ln in stderr.splitlines() if ln.startswith("main.py:")]


@pytest.fixture(scope="module")
def tiny_plan(tmp_path_factory):
  """The tiny SFD config (scanned blocks, fsdp over the 4 chips) planned from the CLI:
  train step at batch 24 with a one-compile search, and the sampling program."""
  workdir = tmp_path_factory.mktemp("plan")
  proc = _main(workdir, "--config.model.scan_blocks=True", f"--config.batch_size={BATCH}",
               "--config.plan.search_compiles=1")
  assert proc.returncode == 0, proc.stderr[-3000:]
  return workdir, proc, json.loads((workdir / "plan.json").read_text())


@needs_libtpu
def test_tiny_train_step_and_sampling_program(tiny_plan):
  workdir, proc, report = tiny_plan
  assert report["complete"] and not report["problems"]
  t = report["topology"]
  assert (t["chips"], t["device_kind"], t["hosts"]) == (4, "TPU v5 lite", 1)
  assert report["capacity_gib"] == 15.75
  assert report["versions"]["libtpu"].startswith(_libtpu_series())
  train = [r for r in report["rows"] if r["program"] == "train"]
  sample = [r for r in report["rows"] if r["program"] == "sample"]
  assert [r["batch"] for r in train] == [BATCH, 2 * BATCH]   # configured + one search step
  row = train[0]
  assert row["compiled"] and row["fits"] and row["per_chip_batch"] == BATCH / 4
  # every chip holds its 6 rows of each block's hidden state, never all 24
  assert row["global_batch_arrays"] == 0, row["global_batch_examples"]
  assert row["attention"] == "xla"     # 16 tokens: the splash kernel needs multiples of 128
  live = row["argument_gib"] + row["output_gib"] - row["alias_gib"] + row["temp_gib"]
  assert row["total_gib"] == pytest.approx(live)
  assert 0 < row["alias_gib"] <= row["argument_gib"]        # the state is donated
  assert row["hbm_fraction"] == pytest.approx(row["total_gib"] / 15.75)
  # no remat: the compiled matmuls are the model's 3 × forward (±3 %: embedder rounding)
  assert row["compiled_over_analytic"] == pytest.approx(1.0, abs=0.03)
  assert row["collectives"]["all-gather"]["count"] > 0        # FSDP gathers the weights
  assert row["collectives"]["all-reduce"]["count"] > 0
  assert report["searches"][0]["max_batch"] == 2 * BATCH
  s = sample[0]
  assert s["batch"] == 8 and s["compiled"] and s["fits"]
  assert s["compiled_over_analytic"] == pytest.approx(7.0)   # Euler, 8 grid points
  md = (workdir / "plan.md").read_text()
  assert "| DiT train step (custom, remat none, attention xla) | 24 | 6 |" in md
  assert "every chip holds only its share of the batch" in md
  assert "sampling (euler, 8 steps, guidance none)" in proc.stdout     # the printed table


@needs_libtpu
def test_activation_sharding_check_detects_a_chip_holding_the_whole_batch(monkeypatch):
  """The hidden states of the scanned blocks carry batch/4 rows per chip because the
  model pins them to the batch sharding; with the constraint removed the TPU compiler
  follows the FSDP weight sharding and every chip holds all 24 rows (the check sees it)."""
  from configs import tiny
  from sfd_jax.models import lightning_dit
  from sfd_jax.planning import plan, programs, tpu
  config = tiny.get_config("data=")
  config.model.scan_blocks = True
  config.batch_size = BATCH
  devices = tpu.devices(tpu.parse_topology(TOPOLOGY))
  original = lightning_dit.LightningDiT.__call__

  def unconstrained(self, *args, activation_sharding=None, **kw):
    return original(self, *args, **kw)

  monkeypatch.setattr(lightning_dit.LightningDiT, "__call__", unconstrained)
  program = programs.dit_train_programs(config, devices, ["none"])[0]
  row = plan.compile_row(program, BATCH, chips=4, capacity_gib=15.75)
  assert row["global_batch_arrays"] > 0
  assert any(f"[{BATCH},16," in e for e in row["global_batch_examples"])


@needs_libtpu
def test_texture_gan_step(tmp_path):
  """The GAN recipe's two-part step with its frozen LPIPS and DINOv2 (no weights)."""
  from configs import tiny_vae
  from sfd_jax.planning import plan
  config = tiny_vae.get_config("job=texture_gan,vf=dinov2")
  config.plan.update(topology=TOPOLOGY, search_max_batch=False)
  report = plan.make_plan(config, str(tmp_path))
  (row,) = report["rows"]
  assert row["program"] == "vae_train" and row["compiled"] and row["fits"]
  assert row["title"] == "texture VAE train step (ldm, GAN)"
  assert row["batch"] == 8 and row["per_chip_batch"] == 2
  assert row["total_gib"] > row["argument_gib"] > 0
  assert row["collectives"]["all-reduce"]["count"] > 0     # data parallel: gradient sums
  assert json.loads((tmp_path / "plan.json").read_text())["complete"]


@needs_libtpu
@pytest.mark.parametrize("name,args,expect", [
    ("topology", ["--config.plan.topology=v7x:2x2"],
     "config.plan.topology='v7x:2x2': unknown TPU generation 'v7x'"),
    ("mesh", ["--config.mesh.fsdp=3"],
     "config.mesh={'data': 1, 'fsdp': 3, 'tensor': 1} does not fit the 4 chips"),
    ("fit", ["--config.plan.hbm_gib=0.001", "--config.plan.programs=train",
             "--config.plan.search_max_batch=False"],
     "DiT train step (custom, remat none, attention xla) does not fit v5e:2x2: "
     "config.batch_size=8 config.model.remat_policy='none' needs"),
])
def test_bad_inputs_are_one_line(tmp_path, name, args, expect):
  proc = _main(tmp_path / name, *args)
  lines = _problem_lines(proc.stderr)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  assert lines[0].startswith("main.py: plan error: ") and expect in lines[0], lines[0]
  if name == "fit":   # the report is written before the run stops
    assert "--config.model.remat_policy=full" in lines[0]
    assert json.loads((tmp_path / name / "plan.json").read_text())["complete"]


def test_missing_tpu_compiler_is_one_line_with_the_install_command(tmp_path):
  """Without libtpu (hidden from the import system here) the plan says how to get it."""
  hide = tmp_path / "hide"
  hide.mkdir()
  (hide / "sitecustomize.py").write_text(
      "import importlib.util as u\n"
      "_find = u.find_spec\n"
      "def find_spec(name, package=None):\n"
      "  return None if name.split('.')[0] == 'libtpu' else _find(name, package)\n"
      "u.find_spec = find_spec\n")
  path = os.pathsep.join(filter(None, [str(hide), os.environ.get("PYTHONPATH", "")]))
  proc = _main(tmp_path / "w", env={"PYTHONPATH": path})
  lines = _problem_lines(proc.stderr)
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert len(lines) == 1 and "Traceback" not in proc.stderr, proc.stderr[-2000:]
  assert lines[0].startswith("main.py: plan error: the TPU compiler (libtpu) is not "
                             f"installed: pip install \"libtpu=={_libtpu_series()}.*\""), \
      lines[0]


def test_config_plan_defaults_are_the_planners():
  """configs/common.py's config.plan (configs import no package code) = the defaults of
  sfd_jax.planning.plan, in every config family."""
  from configs import encode_imagenet, semvae_ch16, sfd_xl, texture_vae_f16d32_ldm
  from sfd_jax.planning import plan
  for mod in (sfd_xl, semvae_ch16, texture_vae_f16d32_ldm, encode_imagenet):
    assert mod.get_config().plan.to_dict() == plan.DEFAULTS, mod.__name__
  assert pathlib.Path(REPO / "sfd_jax" / "jobs" / "plan.py").exists()
