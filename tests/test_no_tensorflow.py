"""Training and the benchmarks in a process where TensorFlow (and, for the benchmarks,
ml_collections, Grain and clu) cannot be imported: the TF-free writer path end to end."""
import os
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import REPO
from tests.util import env_without, write_tiny_latents


def test_training_without_tensorflow_writes_tensorboard_events(tmp_path):
  from tensorboard.backend.event_processing import event_accumulator  # pylint: disable=import-outside-toplevel
  data = write_tiny_latents(tmp_path / "latents", n=32)
  wd = tmp_path / "run"
  proc = subprocess.run(
      [sys.executable, str(REPO / "main.py"),
       f"--config={REPO}/configs/tiny.py:data={data},steps=4",
       f"--workdir={wd}", "--config.log_every_steps=2", "--config.checkpoint_every_steps=4"],
      cwd=REPO, env=env_without(tmp_path, ["tensorflow"]), capture_output=True, text=True,
      timeout=300)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert "metric writer:" in proc.stderr and "(tensorboardx:" in proc.stderr, (
      proc.stderr[-3000:])
  assert "ETA" in proc.stderr                                   # the progress hook
  files = [f for f in os.listdir(wd) if f.startswith("events.out.tfevents")]
  assert files, os.listdir(wd)
  acc = event_accumulator.EventAccumulator(str(wd))
  acc.Reload()
  tags = set(acc.Tags()["scalars"])
  assert {"loss", "grad_norm", "lr", "images_per_sec"} <= tags, tags
  assert [e.step for e in acc.Scalars("loss")] == [2, 4]


@pytest.mark.parametrize("module", ["bench.train_step", "bench.sampling"])
def test_benchmarks_need_only_the_jax_stack(tmp_path, module):
  hidden = ["tensorflow", "ml_collections", "grain", "clu", "tensorboardX", "torch"]
  script = textwrap.dedent(f"""
      import sys
      import {module} as bench
      from sfd_jax.training import sfd  # the train step the benchmark times
      from sfd_jax.diffusion import samplers, guidance
      bad = sorted(m for m in sys.modules if m.split(".")[0] in {hidden!r})
      assert not bad, bad
      print("ok")
      """)
  proc = subprocess.run([sys.executable, "-c", script], cwd=REPO,
                        env=env_without(tmp_path, hidden), capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  proc = subprocess.run([sys.executable, "-m", module, "--help"], cwd=REPO,
                        env=env_without(tmp_path, hidden), capture_output=True, text=True,
                        timeout=120)
  assert proc.returncode == 0 and "usage" in proc.stdout, proc.stderr[-3000:]
