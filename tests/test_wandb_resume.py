"""Weights & Biases through main.py, offline: a resumed training run continues the W&B run
of its first start (the id kept in the workdir) and logs the hparams again; the resolved
config lands in the workdir on both starts."""
import json
import re
import subprocess
import sys

import pytest

from tests.conftest import REPO, child_env
from tests.util import write_tiny_latents

pytest.importorskip("wandb", reason="wandb is in the test set (requirements/py3XY-test.txt); "
                    "not installed here")


def _main(data, workdir, steps):
  proc = subprocess.run(
      [sys.executable, str(REPO / "main.py"), f"--config={REPO}/configs/tiny.py:data={data},"
       f"steps={steps}", f"--workdir={workdir}", "--config.log_every_steps=2",
       "--config.checkpoint_every_steps=2", "--config.wandb.enabled=True",
       "--config.wandb.mode=offline", "--config.wandb.project=sfd-test"],
      cwd=REPO, env=child_env(JAX_PLATFORMS="cpu", WANDB_SILENT="true"),
      capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-3000:]
  return proc.stderr


def test_resumed_run_continues_the_same_wandb_run(tmp_path):
  data = write_tiny_latents(tmp_path / "latents", n=32)
  wd = tmp_path / "run"
  logs = [_main(data, wd, 2), _main(data, wd, 4)]      # the second start resumes at step 2
  run_id = (wd / "wandb_run_id").read_text().strip()
  for log in logs:
    assert re.search(rf"metric writer: .*wandb \(project=sfd-test, mode=offline, run "
                     rf"{run_id}\)", log), log[-3000:]
    assert "[Hyperparameters] " in log and "'num_train_steps': " in log   # every start
  assert "steps 2 → 4" in logs[1], logs[1][-3000:]
  runs = sorted(p.name for p in (wd / "wandb").glob("offline-run-*"))
  assert len(runs) == 2 and all(r.endswith("-" + run_id) for r in runs), runs
  saved = json.loads((wd / "config.json").read_text())
  assert saved["num_train_steps"] == 4 and saved["wandb"]["mode"] == "offline"
