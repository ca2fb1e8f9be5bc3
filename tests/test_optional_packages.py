"""A feature whose optional package is missing ends in one line naming the extra that
installs it (exit 2, no traceback): the demo without scikit-learn or matplotlib, W&B
without wandb, clu's writer or TFDS without TensorFlow, a legacy .pt without PyTorch.
Each case runs the real command in a process where the package cannot be imported."""
import pickle
import subprocess
import sys

import pytest

from tests.conftest import REPO
from tests.util import env_without, write_tiny_latents


def _run(tmp_path, hidden, args):
  return subprocess.run([sys.executable] + args, cwd=REPO, env=env_without(tmp_path, hidden),
                        capture_output=True, text=True, timeout=600)


def _extra(extra):
  return f"pip install -e '.[{extra}]' in the repository (the '{extra}' extra)"


CASES = {
    "demo-sklearn": (["sklearn"], "main.py", ["--config=configs/demo.py:fast=1", "--mode=demo"],
                     "--mode=demo (scikit-learn's digits) needs scikit-learn (sklearn), which "
                     f"is not installed: {_extra('demo')}"),
    "demo-matplotlib": (["matplotlib"], "main.py",
                        ["--config=configs/demo.py:fast=1", "--mode=demo"],
                        f"--mode=demo needs matplotlib, which is not installed: {_extra('demo')}"),
    "wandb": (["wandb"], "main.py", ["--config=configs/tiny.py:data={data},steps=2",
                                     "--config.wandb.enabled=True"],
              "config.wandb.enabled=True needs wandb, which is not installed: "
              f"{_extra('wandb')}, or set --config.wandb.enabled=False"),
    "clu-writer": (["tensorflow", "clu"], "main.py",
                   ["--config=configs/tiny.py:data={data},steps=2", "--config.writer=clu"],
                   "the clu metric writer (config.writer='clu') needs clu, which is not "
                   f"installed: {_extra('tf')}, or set --config.writer=tensorboardx"),
    "tfds-source": (["tensorflow", "tensorflow_datasets"], "main.py",
                    ["--config=configs/tiny_vae.py:job=encode", "--mode=encode",
                     "--config.data.source=tfds", "--config.data.path=imagenet2012"],
                    "config.data.source='tfds' needs tensorflow-datasets (tensorflow_datasets), "
                    f"which is not installed: {_extra('tf')}"),
    "legacy-pt": (["torch"], "sfd_jax.convert.inception", ["--src={legacy}", "--dst={out}"],
                  "{legacy}: a legacy (pre-1.6, non-zip) PyTorch file needs torch, which is "
                  f"not installed: {_extra('torch')}, or re-save it with a current PyTorch, "
                  "or convert it to .safetensors"),
}


@pytest.fixture(scope="module")
def files(tmp_path_factory):
  root = tmp_path_factory.mktemp("inputs")
  legacy = root / "legacy.pth"
  legacy.write_bytes(pickle.dumps({"weight": [0.0]}, protocol=2))
  return {"data": write_tiny_latents(root / "latents", n=16), "legacy": str(legacy),
          "out": str(root / "converted")}


@pytest.mark.parametrize("case", list(CASES))
def test_missing_package_is_one_line_naming_the_extra(case, files, tmp_path):
  hidden, target, args, expect = CASES[case]
  args = [a.format(**files) for a in args]
  if target == "main.py":
    cmd, prog = ["main.py", *args, f"--workdir={tmp_path / 'run'}"], "main.py"
  else:
    cmd, prog = ["-m", target, *args], f"python -m {target}"
  proc = _run(tmp_path, hidden, cmd)
  assert proc.returncode == 2, proc.stderr[-3000:]
  lines = proc.stderr.strip().splitlines()
  assert lines[-1] == f"{prog}: missing package: {expect.format(**files)}", proc.stderr[-3000:]
  assert "Traceback" not in proc.stderr
