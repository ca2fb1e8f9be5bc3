"""sfd_jax.core.writers (both TensorBoard paths, W&B, the factory) and sfd_jax.core.progress.

The TensorFlow-free path is read back with TensorBoard's own reader
(``tensorboard.backend.event_processing``), which needs no TensorFlow; the clu path is
skipped when TensorFlow is not installed.
"""
import importlib.util
import io
import logging as pylog
import os
import subprocess
import sys
import textwrap
import types

import numpy as np
import pytest

from sfd_jax.core import optional, progress, writers

SCALARS = {1: {"loss": 0.5, "lr": np.float32(1e-3)}, 2: {"loss": 0.25, "lr": 2e-3}}
HPARAMS = {"optimizer": {"lr": 1e-3, "name": "adamw"}, "batch_size": 8, "ema": True,
           "schedule": None}


def _write_run(writer):
  writer.write_hparams(HPARAMS)
  for step, scalars in SCALARS.items():
    writer.write_scalars(step, scalars)
  rng = np.random.default_rng(0)
  writer.write_images(2, {"samples": rng.integers(0, 255, (3, 8, 8, 3), dtype=np.uint8),
                          "grid": rng.integers(0, 255, (8, 8, 1), dtype=np.uint8)})
  writer.flush()
  writer.close()


def _read_events(directory):
  """{"scalars": {tag: [(step, value)]}, "images": {tag}, "plugins": {name: tags}}."""
  from tensorboard.backend.event_processing import event_accumulator
  from tensorboard.util import tensor_util
  acc = event_accumulator.EventAccumulator(str(directory), size_guidance={"images": 0,
                                                                          "tensors": 0,
                                                                          "scalars": 0})
  acc.Reload()
  tags = acc.Tags()
  scalars = {t: [(e.step, e.value) for e in acc.Scalars(t)] for t in tags["scalars"]}
  images = set(tags["images"])
  for t in tags["tensors"]:       # TF2 summaries: scalars and images are tensors
    plugin = acc.SummaryMetadata(t).plugin_data.plugin_name
    if plugin == "scalars":
      scalars[t] = [(e.step, float(tensor_util.make_ndarray(e.tensor_proto)))
                    for e in acc.Tensors(t)]
    elif plugin == "images":
      images.add(t)
  try:
    hparams = set(acc.PluginTagToContent("hparams"))
  except KeyError:
    hparams = set()
  return {"scalars": scalars, "images": images, "hparams": hparams}


def _check_run(events):
  assert set(events["scalars"]) == {"loss", "lr"}
  for tag in ("loss", "lr"):
    got = events["scalars"][tag]
    assert [s for s, _ in got] == [1, 2]
    np.testing.assert_allclose([v for _, v in got],
                               [float(SCALARS[1][tag]), float(SCALARS[2][tag])], rtol=1e-6)
  assert events["images"] == {"samples", "grid"}
  assert "_hparams_/session_start_info" in events["hparams"]


def test_tensorboardx_writer_events(tmp_path, caplog):
  caplog.set_level(pylog.INFO)
  w = writers.create_writer(str(tmp_path), kind="tensorboardx")
  assert w.kind == "tensorboardx"
  assert "metric writer: absl log + tensorboardX" in caplog.text
  _write_run(w)
  assert "[1] loss=0.5" in caplog.text            # clu LoggingWriter's format
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path))
  _check_run(_read_events(tmp_path))


def test_clu_writer_same_tags(tmp_path):
  if not writers.tensorflow_available():
    pytest.skip("TensorFlow is not installed (clu writer path)")
  w = writers.create_writer(str(tmp_path / "clu"), kind="clu")
  assert w.kind == "clu"
  _write_run(w)
  clu_events = _read_events(tmp_path / "clu")
  _check_run(clu_events)
  t = writers.create_writer(str(tmp_path / "tbx"), kind="tensorboardx")
  _write_run(t)
  tbx_events = _read_events(tmp_path / "tbx")
  assert set(clu_events["scalars"]) == set(tbx_events["scalars"])
  assert clu_events["images"] == tbx_events["images"]


def test_auto_without_tensorflow_picks_tensorboardx(tmp_path, monkeypatch, caplog):
  real = importlib.util.find_spec
  monkeypatch.setattr(importlib.util, "find_spec",
                      lambda name, *a: None if name.split(".")[0] == "tensorflow"
                      else real(name, *a))
  caplog.set_level(pylog.INFO)
  assert writers.resolve_kind("auto") == ("tensorboardx", "TensorFlow is not installed")
  w = writers.create_writer(str(tmp_path))
  assert w.kind == "tensorboardx"
  assert "TensorFlow is not installed" in caplog.text
  w.write_scalars(3, {"loss": 1.0})
  w.close()
  assert _read_events(tmp_path)["scalars"]["loss"] == [(3, 1.0)]


def test_auto_in_a_process_without_tensorflow(tmp_path):
  """TensorFlow unimportable: the writer and progress modules never import it (nor clu)."""
  script = textwrap.dedent(f"""
      import importlib.abc, sys
      class Hide(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
          if name.split(".")[0] == "tensorflow":
            raise ModuleNotFoundError(name)
      sys.meta_path.insert(0, Hide())
      from sfd_jax.core import progress, writers
      w = writers.create_writer({str(tmp_path)!r})
      assert w.kind == "tensorboardx", w.kind
      hook = progress.Progress(10, w, every_steps=5, batch_size=4)
      for step in range(1, 11):
        hook(step)
      w.write_images(10, {{"samples": __import__("numpy").zeros((2, 4, 4, 3), "uint8")}})
      w.close()
      for t in progress.track(range(3), "stage", mode="log"):
        pass
      bad = sorted(m for m in sys.modules if m.split(".")[0] in ("tensorflow", "clu"))
      assert not bad, bad
      """)
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                        env=env, timeout=120, cwd=os.path.dirname(os.path.dirname(__file__)))
  assert proc.returncode == 0, proc.stderr[-3000:]
  events = _read_events(tmp_path)
  assert set(events["scalars"]) == {"steps_per_sec", "uptime"}
  assert events["images"] == {"samples"}


def test_non_main_process_only_logs(tmp_path, caplog):
  caplog.set_level(pylog.INFO)
  w = writers.create_writer(str(tmp_path / "wd"), is_main=False,
                            wandb={"enabled": True, "project": "p"})
  assert w.kind == "log" and isinstance(w, writers.LoggingWriter)
  w.write_scalars(1, {"loss": 2.0})
  w.close()
  assert not (tmp_path / "wd").exists()
  assert "not the main process" in caplog.text and "[1] loss=2" in caplog.text


def test_images_are_normalised():
  a = writers.to_uint8_images(np.full((4, 5), 0.5, np.float32))
  assert a.shape == (1, 4, 5, 1) and a.dtype == np.uint8 and a[0, 0, 0, 0] == 128
  with pytest.raises(ValueError):
    writers.to_uint8_images(np.zeros((2, 3, 4, 5, 3)))
  assert writers.flat_hparams(HPARAMS) == {"optimizer.lr": 1e-3, "optimizer.name": "adamw",
                                           "batch_size": 8, "ema": True}


class _FakeRun:
  def __init__(self, **kw):
    self.kw, self.logged, self.finished = kw, [], False
    self.id = kw.get("id") or "generated"
    self.config = types.SimpleNamespace(values={})
    self.config.update = lambda d, allow_val_change=False: self.config.values.update(d)

  def log(self, d, step):
    self.logged.append((step, d))

  def finish(self):
    self.finished = True


def test_wandb_writer_with_multiplexing(tmp_path, monkeypatch):
  runs = []
  fake = types.ModuleType("wandb")
  fake.init = lambda **kw: runs.append(_FakeRun(**kw)) or runs[-1]
  fake.Image = lambda a: ("image", np.asarray(a).shape)
  monkeypatch.setitem(sys.modules, "wandb", fake)
  w = writers.create_writer(str(tmp_path), kind="tensorboardx",
                            wandb={"enabled": True, "project": "sfd", "name": "r1",
                                   "mode": "offline", "entity": None})
  assert isinstance(w, writers.MultiWriter) and "wandb" in w.description
  _write_run(w)
  (run,) = runs
  run_id = (tmp_path / "wandb_run_id").read_text().strip()
  assert len(run_id) == 8 and run_id.isalnum()
  assert run.kw == {"project": "sfd", "name": "r1", "mode": "offline", "dir": str(tmp_path),
                    "id": run_id, "resume": "allow"}
  assert run.logged[0] == (1, {"loss": 0.5, "lr": pytest.approx(1e-3)})
  assert run.logged[2][1]["grid"] == ("image", (8, 8))
  assert len(run.logged[2][1]["samples"]) == 3
  assert run.config.values["optimizer.lr"] == 1e-3 and run.finished
  assert set(_read_events(tmp_path)["scalars"]) == {"loss", "lr"}   # TensorBoard as well


def test_wandb_enabled_but_missing_is_one_clear_error(tmp_path, monkeypatch):
  monkeypatch.setitem(sys.modules, "wandb", None)       # import wandb -> ImportError
  with pytest.raises(optional.MissingPackageError) as info:
    writers.create_writer(str(tmp_path), kind="log", wandb={"enabled": True})
  assert str(info.value) == (
      "config.wandb.enabled=True needs wandb, which is not installed: pip install -e "
      "'.[wandb]' in the repository (the 'wandb' extra), or set --config.wandb.enabled=False")
  assert isinstance(info.value, ImportError)
  writers.create_writer(str(tmp_path), kind="log", wandb={"enabled": False}).close()


def test_wandb_offline_resume_continues_the_same_run(tmp_path, monkeypatch):
  """Two starts in one workdir (offline W&B): the second continues the first's run id,
  kept in <workdir>/wandb_run_id, and logs the hparams again."""
  wandb = pytest.importorskip("wandb", reason="wandb is in the test set "
                              "(requirements/py3XY-test.txt); not installed here")
  monkeypatch.setenv("WANDB_SILENT", "true")
  settings = {"enabled": True, "project": "sfd-test", "mode": "offline"}
  ids = []
  for start in range(2):
    w = writers.create_writer(str(tmp_path), kind="log", wandb=settings)
    w.write_hparams({"optimizer": {"lr": 1e-3 * (start + 1)}, "start": start})
    w.write_scalars(10 * (start + 1), {"loss": 1.0 / (start + 1)})
    run = w.writers[-1]._run if isinstance(w, writers.MultiWriter) else w._run
    assert dict(run.config)["optimizer.lr"] == pytest.approx(1e-3 * (start + 1))
    ids.append(run.id)
    w.close()
  assert ids[0] == ids[1] == (tmp_path / "wandb_run_id").read_text().strip()
  runs = sorted(p.name for p in (tmp_path / "wandb").glob("offline-run-*"))
  # one directory per start, both of the same run (W&B adds "-1" to the second directory's
  # name when both starts fall in the same second)
  assert len(runs) == 2 and all(f"-{ids[0]}" in r for r in runs), runs
  assert wandb.run is None


class _Recorder:
  def __init__(self):
    self.scalars = []

  def write_scalars(self, step, scalars):
    self.scalars.append((step, dict(scalars)))


def test_progress_hook_logs_rate_and_eta(caplog):
  caplog.set_level(pylog.INFO)
  rec = _Recorder()
  hook = progress.Progress(100, rec, every_steps=10, batch_size=32, start_step=0,
                           every_secs=None)
  assert not hook(1, t=0.0)                     # the first call sets the baseline
  assert not hook(5, t=0.4)
  assert hook(10, t=0.9)                    # 9 steps in 0.9 s
  assert hook.last["steps_per_sec"] == pytest.approx(10.0)
  assert hook.last["images_per_sec"] == pytest.approx(320.0)
  assert hook.last["eta_secs"] == pytest.approx(9.0)
  assert "10.00 steps/s, 320.0 images/s, 10.0% (10/100), ETA: 9s" in caplog.text
  assert rec.scalars[0][0] == 10 and set(rec.scalars[0][1]) == {"steps_per_sec", "uptime"}
  with hook.timed("eval"):
    pass
  assert hook(100, t=10.0)                      # the last step always reports
  assert "(100/100), ETA: 0s" in caplog.text and "% eval)" in caplog.text
  assert progress.format_secs(123456.7) == "1d10h17m" and progress.format_secs(450) == "7m30s"


def test_track_logs_lines_when_not_a_terminal(caplog, monkeypatch):
  monkeypatch.delenv("SFD_PROGRESS", raising=False)
  caplog.set_level(pylog.INFO)
  stream = io.StringIO()                        # not a TTY -> log lines
  items = list(progress.track(range(20), "encode", unit="img", stream=stream))
  assert items == list(range(20)) and stream.getvalue() == ""
  lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("encode:")]
  assert lines[0] == "encode: started (20 img)"
  assert any("10/20 img (50%)" in m and "ETA" in m for m in lines)
  assert 9 <= len(lines) <= 12                  # every 10 %, plus start and done
  assert lines[-1].startswith("encode: done, 20 img in")


def test_track_total_and_time_based_lines(caplog, monkeypatch):
  caplog.set_level(pylog.INFO)
  clock = iter(range(0, 1000, 40))             # 40 s per call: every update logs
  monkeypatch.setattr(progress.time, "monotonic", lambda: float(next(clock)))
  with progress.track(None, "extract", unit="batch", mode="log", every_frac=1.0) as t:
    t.update(2)
    t.update(3)
  msgs = [r.getMessage() for r in caplog.records]
  assert any(m.startswith("extract: 2 batch") for m in msgs)
  assert any(m.startswith("extract: done, 5 batch") for m in msgs)


class _Tty(io.StringIO):
  def isatty(self):
    return True


@pytest.mark.parametrize("with_tqdm", [True, False])
def test_track_bar_on_a_terminal(monkeypatch, caplog, with_tqdm):
  if with_tqdm:
    pytest.importorskip("tqdm")
  else:
    monkeypatch.setitem(sys.modules, "tqdm", None)
  monkeypatch.delenv("SFD_PROGRESS", raising=False)
  caplog.set_level(pylog.INFO)
  stream = _Tty()
  with progress.track(4, "sample", unit="batch", stream=stream) as bar:
    assert bar.mode == "bar"
    for _ in range(4):
      bar.update(1)
  out = stream.getvalue()
  assert "sample" in out and "4/4" in out and "\r" in out
  assert not [r for r in caplog.records if r.getMessage().startswith("sample")]
  off = progress.track(3, "x", stream=_Tty(), enabled=False)
  off.update(3)
  off.close()
  assert off.mode == "off"


def test_profile_hook_traces_the_chosen_steps(monkeypatch, tmp_path):
  import jax
  calls = []
  monkeypatch.setattr(jax.profiler, "start_trace", lambda d: calls.append(("start", d)))
  monkeypatch.setattr(jax.profiler, "stop_trace", lambda: calls.append(("stop",)))
  hook = progress.Profile(str(tmp_path), num_profile_steps=3, first_profile=5)
  tracing = []
  for step in range(1, 12):
    hook(step)
    if hook.active:
      tracing.append(step)
  assert calls == [("start", str(tmp_path)), ("stop",)]
  assert tracing == [5, 6, 7]                   # stopped after step 8's call

