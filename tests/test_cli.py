"""The command line as a user meets it: ``--help`` on the three entry points (main.py, the
``sfd-jax`` console script, ``python -m sfd_jax``), ``--mode=config``, the resolved config
in every workdir, URL workdirs refused with one line. Subprocesses: absl flags are not
defined in the test process."""
import json
import os
import pathlib
import subprocess
import sys

import pytest

from tests.conftest import REPO, child_env


def _run(args, timeout=300, **env):
  return subprocess.run(args, cwd=REPO, env=child_env(JAX_PLATFORMS="cpu", **env),
                        capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope="module")
def modes():
  proc = _run([sys.executable, "-c", "import json; from sfd_jax import cli; "
               "print(json.dumps({'jobs': list(cli.JOBS), 'modes': cli.MODES}))"])
  assert proc.returncode == 0, proc.stderr[-2000:]
  return json.loads(proc.stdout)


def test_every_mode_has_a_line_of_help(modes):
  assert set(modes["modes"]) == set(modes["jobs"]) | {"config"}
  assert all(modes["modes"][m].strip() for m in modes["modes"])


ENTRY_POINTS = {
    "main.py": ([sys.executable, "main.py"], "python main.py"),
    "sfd-jax": ([str(pathlib.Path(sys.executable).parent / "sfd-jax")], "sfd-jax"),
    "python -m sfd_jax": ([sys.executable, "-m", "sfd_jax"], "python -m sfd_jax"),
}


@pytest.mark.parametrize("entry", list(ENTRY_POINTS))
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help_shows_the_flags_and_the_modes(entry, flag, modes):
  cmd, prog = ENTRY_POINTS[entry]
  if not os.path.exists(cmd[0]):
    pytest.skip("the sfd-jax console script is not installed (pip install -e .)")
  proc = _run(cmd + [flag])
  assert proc.returncode == 0, proc.stderr[-2000:]
  out = proc.stdout
  assert out.startswith(f"usage: {prog} --config=FILE[:ARGS] --workdir=DIR [--mode=MODE]")
  for name in ("--config=FILE", "--workdir=DIR", "--mode=MODE", "--config.FIELD=VALUE",
               "--helpfull"):
    assert name in out, name
  for mode, text in modes["modes"].items():
    assert f"      {mode} " in out and text in out, mode
  assert "Try --helpfull" not in out + proc.stderr


def test_mode_config_prints_the_resolved_config(tmp_path):
  proc = _run([sys.executable, "main.py", "--config=configs/tiny.py", "--mode=config",
               "--config.optimizer.lr=0.5", "--config.data.path=somewhere"])
  assert proc.returncode == 0, proc.stderr[-2000:]
  lines = proc.stdout.splitlines()
  assert "optimizer.lr = 0.5" in lines and "data.path = 'somewhere'" in lines
  assert "model.num_classes = 10" in lines or any(l.startswith("model.num_classes = ")
                                                  for l in lines)
  keys = [l.split(" = ", 1)[0] for l in lines]
  assert all(" = " in l for l in lines) and keys == sorted(set(keys)) and len(keys) > 50
  assert not list(tmp_path.iterdir())


def test_a_start_up_error_leaves_the_workdir_as_it_was(tmp_path):
  """A run whose start-up checks fail (here: the dataset is missing) stops before it writes
  anything: the earlier config.json stays, a new workdir is not created. (The resolved
  config of a run that starts is logged and written: tests/test_train.py,
  tests/test_wandb_resume.py; the undo after a later user error: the next test.)"""
  wd = tmp_path / "run"
  wd.mkdir()
  earlier = '{"optimizer": {"lr": 0.001}}\n'
  (wd / "config.json").write_text(earlier)
  args = [sys.executable, "main.py", "--config=configs/tiny.py",
          f"--config.data.path={tmp_path / 'missing'}", "--config.optimizer.lr=0.25"]
  proc = _run(args + [f"--workdir={wd}"])
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert "data" in proc.stderr.strip().splitlines()[-1]
  assert "resolved config (written to" not in proc.stderr
  assert sorted(p.name for p in wd.iterdir()) == ["config.json"]
  assert (wd / "config.json").read_text() == earlier
  fresh = tmp_path / "new" / "run"
  proc = _run(args + [f"--workdir={fresh}"])
  assert proc.returncode == 2 and not (tmp_path / "new").exists(), proc.stderr[-2000:]


_WRITE_CONFIG = """
import json, os, sys
from ml_collections import config_dict
from sfd_jax import cli
wd, case = sys.argv[1], sys.argv[2]
path = os.path.join(wd, "config.json")
config = config_dict.ConfigDict({"optimizer": {"lr": 0.25}})
if case == "interrupted":            # the rename fails: the earlier file stays whole
  def fail(*args):
    raise OSError(28, "No space left on device")
  os.replace = fail
  undo = cli.write_config(config, wd, "train")
elif case == "run_made_outputs":     # the run wrote something, then stopped: keep the config
  undo = cli.write_config(config, wd, "train")
  os.makedirs(os.path.join(wd, "checkpoints", "4"))
  undo()
elif case == "run_made_nothing":
  undo = cli.write_config(config, wd, "train")
  undo()
print(json.dumps(sorted(os.listdir(wd))))
"""


@pytest.mark.parametrize("case", ["interrupted", "run_made_outputs", "run_made_nothing"])
def test_config_json_is_written_atomically_and_kept_with_the_outputs_it_made(tmp_path, case):
  wd = tmp_path / "run"
  wd.mkdir()
  earlier = '{"optimizer": {"lr": 0.001}}\n'
  (wd / "config.json").write_text(earlier)
  proc = _run([sys.executable, "-c", _WRITE_CONFIG, str(wd), case])
  assert proc.returncode == 0, proc.stderr[-2000:]
  listing = json.loads(proc.stdout.strip().splitlines()[-1])
  text = (wd / "config.json").read_text()
  if case == "run_made_outputs":
    assert listing == ["checkpoints", "config.json"]
    assert json.loads(text) == {"optimizer": {"lr": 0.25}}
  else:                                 # no temporary file left, the earlier file intact
    assert listing == ["config.json"] and text == earlier
  if case == "interrupted":
    assert "cannot write" in proc.stderr and "No space left on device" in proc.stderr


@pytest.mark.parametrize("workdir", ["gs://bucket/runs/x", "s3://bucket/x"])
def test_url_workdirs_are_refused_in_one_line(workdir):
  proc = _run([sys.executable, "main.py", "--config=configs/tiny.py", f"--workdir={workdir}"])
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [
      f"main.py: config error: --workdir={workdir}: a URL is not accepted as a workdir; "
      "mount the bucket (e.g. gcsfuse to /mnt/gcs on every host) and give the mounted "
      "path, e.g. --workdir=/mnt/gcs/runs/NAME"]


def test_missing_flags_are_one_line():
  proc = _run([sys.executable, "main.py", "--config=configs/tiny.py"])
  assert proc.returncode == 2
  assert proc.stderr.strip().splitlines() == [
      "main.py: config error: --workdir is required: the run's directory, e.g. "
      "--workdir=runs/NAME (see --help)"]
