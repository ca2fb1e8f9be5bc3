"""Packaging: pyproject ranges vs the pinned sets, the console script, .ci/run's choice of
interpreter. Fast (no JAX work); the console-script checks run in subprocesses so that
absl flags are not defined in the test process."""
import os
import pathlib
import shutil
import subprocess
import sys
import tomllib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
LOCKS = sorted(p for p in (REPO / "requirements").glob("py3*.txt")
               if not p.stem.endswith("-test"))            # the runtime sets
TEST_SETS = sorted((REPO / "requirements").glob("py3*-test.txt"))


def _pyproject():
  with open(REPO / "pyproject.toml", "rb") as f:
    return tomllib.load(f)


def _pins(path):
  """{name: version} of a requirements file, following ``-r`` includes."""
  pins = {}
  for line in path.read_text().splitlines():
    line = line.split("#")[0].strip()
    if line.startswith("-r "):
      pins.update(_pins(path.parent / line[3:].strip()))
    elif "==" in line:
      name, version = line.split("==")
      pins[name.strip().lower().replace("_", "-")] = version.strip()
  return pins


def _name(spec):
  requirements = pytest.importorskip("packaging.requirements")
  return requirements.Requirement(spec).name.lower().replace("_", "-")


NOT_RUNTIME = ("tensorflow", "tensorflow-cpu", "keras", "clu", "tensorflow-datasets",
               "pytest", "pytest-xdist", "ruff", "torch")


def test_metadata_ranges_and_no_tensorflow_or_clu_base():
  """``pip install -e .`` brings neither TensorFlow nor clu (they are the ``tf`` extra)."""
  project = _pyproject()["project"]
  assert project["requires-python"] == ">=3.11,<3.14"
  assert not {_name(d) for d in project["dependencies"]} & set(NOT_RUNTIME)
  extras = project["optional-dependencies"]
  assert {"cuda12", "cuda13", "tpu", "torch", "tf", "wandb", "demo", "test"} <= set(extras)
  assert "clu" in {_name(d) for d in extras["tf"]}
  assert not {_name(d) for d in extras["test"]} & {"tensorflow", "tensorflow-cpu", "clu"}
  assert project["scripts"]["sfd-jax"] == "sfd_jax.cli:run"


def test_jax_is_allowed_up_to_0_12():
  requirements = pytest.importorskip("packaging.requirements")
  project = _pyproject()["project"]
  specs = {_name(d): requirements.Requirement(d).specifier for d in project["dependencies"]}
  assert specs["jax"].contains("0.12.0.1") and specs["jaxlib"].contains("0.12.0.1")
  assert specs["jax"].contains("0.10.2") and not specs["jax"].contains("0.13.0")


def _check_pins(lock, specs):
  requirements = pytest.importorskip("packaging.requirements")
  pins = _pins(lock)
  for spec in specs:
    req = requirements.Requirement(spec)
    name = _name(spec)
    assert name in pins, f"{lock.name} lacks {name}"
    assert req.specifier.contains(pins[name], prereleases=True), (
        f"{lock.name}: {name}=={pins[name]} outside {req.specifier}")
  return pins


@pytest.mark.parametrize("lock", LOCKS, ids=[p.name for p in LOCKS])
def test_runtime_sets_satisfy_the_ranges_without_tensorflow_or_test_tools(lock):
  pins = _check_pins(lock, _pyproject()["project"]["dependencies"])
  assert not set(pins) & set(NOT_RUNTIME), sorted(set(pins) & set(NOT_RUNTIME))


@pytest.mark.parametrize("lock", TEST_SETS, ids=[p.name for p in TEST_SETS])
def test_test_sets_are_the_runtime_set_plus_the_test_extra(lock):
  project = _pyproject()["project"]
  runtime = lock.with_name(lock.name.replace("-test", ""))
  assert f"-r {runtime.name}" in lock.read_text().splitlines()
  pins = _check_pins(lock, project["dependencies"] + project["optional-dependencies"]["test"])
  assert not set(pins) & {"tensorflow", "tensorflow-cpu", "keras", "clu"}
  assert {k: v for k, v in pins.items() if k in _pins(runtime)} == _pins(runtime)


def test_a_pinned_set_for_this_python():
  v = sys.version_info
  assert (REPO / "requirements" / f"py{v.major}{v.minor}.txt").exists()
  assert (REPO / "requirements" / f"py{v.major}{v.minor}-test.txt").exists()
  text = (REPO / "requirements.txt").read_text()
  assert "-r requirements/py311.txt" in text
  assert [p.name for p in LOCKS] == ["py311.txt", "py312.txt", "py313.txt"]
  assert len(TEST_SETS) == 3


def test_ci_installs_the_test_set_and_lints_before_the_tests():
  text = (REPO / ".ci" / "run").read_text()
  assert "lock=requirements/py${ver/./}-test.txt" in text
  ci = text.split("\n  ci)\n", 1)[1]
  assert ci.index("ruff check") < ci.index("python -m pytest")


def test_cli_modes_resolve_and_console_script():
  script = ("import importlib.util; from sfd_jax import cli; "
            "missing = [m for m, (mod, fn) in cli.JOBS.items() "
            "if importlib.util.find_spec(f'sfd_jax.jobs.{mod}') is None]; "
            "assert not missing, missing; print(sorted(cli.JOBS))")
  proc = subprocess.run([sys.executable, "-c", script], cwd=REPO, capture_output=True,
                        text=True, timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu"))
  assert proc.returncode == 0, proc.stderr[-2000:]
  assert "demo" in proc.stdout and "train_texture_vae" in proc.stdout
  exe = pathlib.Path(sys.executable).parent / "sfd-jax"
  if not exe.exists():
    pytest.skip("sfd-jax console script not installed (pip install -e .)")
  proc = subprocess.run([str(exe), "--helpfull"], capture_output=True, text=True,
                        timeout=120, cwd=REPO)
  out = proc.stdout + proc.stderr
  assert "--config" in out and "--workdir" in out and "--mode" in out


def _ci_python(path_dirs, home, python=None):
  env = {"PATH": os.pathsep.join(map(str, path_dirs)), "HOME": str(home)}
  if python is not None:
    env["PYTHON"] = python
  return subprocess.run([shutil.which("bash") or "/bin/bash", str(REPO / ".ci" / "run"),
                         "python"], env=env, capture_output=True, text=True, timeout=60)


def test_ci_run_picks_a_supported_python(tmp_path):
  fake = tmp_path / "bin"
  fake.mkdir()
  (fake / "python3.11").write_text("#!/bin/sh\nexit 1\n")       # a broken shim
  (fake / "python3.11").chmod(0o755)
  os.symlink(sys.executable, fake / "python3")
  proc = _ci_python([fake], tmp_path)
  assert proc.returncode == 0, proc.stderr
  assert proc.stdout.strip() == str(fake / "python3")
  assert "python: " in proc.stderr and "within the supported 3.11-3.13" in proc.stderr
  assert "skipped " + str(fake / "python3.11") + " (does not run)" in proc.stderr
  proc = _ci_python([fake], tmp_path, python=sys.executable)
  assert proc.returncode == 0 and "set by PYTHON=" in proc.stderr


def test_ci_run_says_when_no_python_fits(tmp_path):
  fake = tmp_path / "bin"
  fake.mkdir()
  (fake / "python3").write_text("#!/bin/sh\necho 'Python 3.9'\nexit 3\n")   # too old
  (fake / "python3").chmod(0o755)
  proc = _ci_python([fake], tmp_path)
  assert proc.returncode == 1 and proc.stdout == ""
  assert "no supported Python: sfd_jax needs Python 3.11-3.13" in proc.stderr
  assert len(proc.stderr.strip().splitlines()) == 1
  proc = _ci_python([fake], tmp_path, python=str(fake / "python3"))
  assert proc.returncode == 1 and "supports Python 3.11-3.13" in proc.stderr
