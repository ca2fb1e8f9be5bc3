"""A real multi-process run: two JAX CPU processes train the tiny config through main.py.

The two processes (2 fake CPU devices each, 4 global devices) find each other through
``JAX_COORDINATOR_ADDRESS`` / ``JAX_NUM_PROCESSES`` / ``JAX_PROCESS_ID``, which
``sfd_jax.parallel.distributed.maybe_initialize`` turns into ``jax.distributed.initialize``.
Cross-process collectives on CPU use Gloo over TCP: jax 0.10.2's default
``jax_cpu_collectives_implementation`` is already ``"gloo"``, so nothing has to be set.

Launch A trains 4 steps (checkpoints at 2 and 4); launch B (same workdir, 6 steps)
resumes from step 4. Each process runs this file as its ``__main__`` (see
``_worker_main``): it wraps ``train.make_data_iterator`` to log a fingerprint of every
example it consumed, and ``train.train_and_evaluate`` to write a hash of the final
(all-gathered) parameters and EMA. The test then checks that

* the processes saw disjoint halves of every global batch, whose union is exactly the
  global batch a single-process pipeline with the same settings produces (launch B
  continues at the restored position: batches 4 and 5);
* both processes end with the same parameters, and the checkpoint they wrote together
  restores (in this single pytest process, on another mesh) to those parameters;
* ``--mode=export`` of the finished run writes exactly the EMA weights they trained.
"""
from __future__ import annotations

import hashlib
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NUM_PROCESSES = 2
DEVICES_PER_PROCESS = 2
LAUNCH_TIMEOUT_S = 300
# XLA:CPU spends most of the run compiling the train step; these halve that (the
# numbers are irrelevant here, only agreement between processes is checked).
_FAST_COMPILE_FLAGS = "--xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
_LOG_DIR_ENV = "SFD_MP_TEST_LOG_DIR"
_TAG_ENV = "SFD_MP_TEST_TAG"


# --------------------------------------------------------------------------------------
# Helpers shared by the worker and the test
# --------------------------------------------------------------------------------------


def example_fingerprint(latent: np.ndarray, label) -> str:
  """A short content hash of one training example (its normalised latent and label)."""
  h = hashlib.sha1(np.ascontiguousarray(latent, np.float32).tobytes())
  h.update(str(int(label)).encode())
  return h.hexdigest()[:16]


def tree_digest(tree) -> str:
  """SHA-1 over a nested dict of arrays, in sorted key order (values and shapes)."""
  h = hashlib.sha1()

  def visit(node, prefix):
    for k in sorted(node):
      v = node[k]
      if isinstance(v, dict):
        visit(v, f"{prefix}{k}/")
      else:
        a = np.asarray(v, np.float32)
        h.update(f"{prefix}{k}{a.shape}".encode())
        h.update(np.ascontiguousarray(a).tobytes())

  visit(tree, "")
  return h.hexdigest()


# --------------------------------------------------------------------------------------
# The worker: one training process (``python tests/test_multiprocess.py --config=...``)
# --------------------------------------------------------------------------------------


class _LoggingIterator:
  """Forwards to the training data iterator and records every example it hands out."""

  def __init__(self, inner, path: str):
    self._inner = inner
    self._path = path

  def __next__(self):
    position = self._inner.get_state()["position"]
    batch = next(self._inner)
    row = {"position": position,
           "examples": [example_fingerprint(l, y)
                        for l, y in zip(batch["latent"], batch["label"])]}
    with open(self._path, "a") as f:
      f.write(json.dumps(row) + "\n")
    return batch

  def __getattr__(self, name):
    return getattr(self._inner, name)


def _worker_main() -> None:
  """Runs main.py's ``main`` with the two test hooks installed."""
  sys.path.insert(0, REPO)
  from absl import app  # pylint: disable=import-outside-toplevel
  import main as main_mod  # pylint: disable=import-outside-toplevel
  from sfd_jax.training import sfd as train  # pylint: disable=import-outside-toplevel

  log_dir, tag = os.environ[_LOG_DIR_ENV], os.environ[_TAG_ENV]
  make_iterator, train_and_evaluate = train.make_data_iterator, train.train_and_evaluate

  def proc_path(kind):
    import jax  # pylint: disable=import-outside-toplevel
    return os.path.join(log_dir, f"{kind}_{tag}_p{jax.process_index()}.json")

  def logged_iterator(config, seed):
    return _LoggingIterator(make_iterator(config, seed), proc_path("data"))

  def hashed_train(config, workdir):
    from jax.experimental import multihost_utils  # pylint: disable=import-outside-toplevel
    out = train_and_evaluate(config, workdir)
    full = multihost_utils.process_allgather(
        {"params": out["state"]["params"], "ema": out["state"]["ema"]}, tiled=True)
    with open(proc_path("hash"), "w") as f:
      json.dump({"step": int(out["step"]), "params": tree_digest(full["params"]),
                 "ema": tree_digest(full["ema"])}, f)
    return out

  def run_then_exit(argv):
    import jax  # pylint: disable=import-outside-toplevel
    main_mod.main(argv)
    # Leave right away: the interpreter's normal teardown of the XLA:CPU/Gloo runtime
    # takes ~10 s per process here and is not what this test is about.
    jax.distributed.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)

  train.make_data_iterator = logged_iterator
  train.train_and_evaluate = hashed_train
  app.run(run_then_exit)


# --------------------------------------------------------------------------------------
# The test
# --------------------------------------------------------------------------------------


def _free_port() -> int:
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _launch(tag: str, flags: list[str], log_dir: str, timeout: float) -> None:
  """Starts NUM_PROCESSES workers, waits for all of them; kills them all on failure."""
  port = _free_port()
  procs, logs = [], []
  for i in range(NUM_PROCESSES):
    env = dict(os.environ)
    env.update({
        "JAX_PLATFORMS": "cpu",
        "XLA_FLAGS": f"--xla_force_host_platform_device_count={DEVICES_PER_PROCESS} "
                     + _FAST_COMPILE_FLAGS,
        "JAX_COORDINATOR_ADDRESS": f"127.0.0.1:{port}",
        "JAX_NUM_PROCESSES": str(NUM_PROCESSES), "JAX_PROCESS_ID": str(i),
        _LOG_DIR_ENV: log_dir, _TAG_ENV: tag,
        "PYTHONPATH": REPO + os.pathsep + env.get("PYTHONPATH", ""),
    })
    log = open(os.path.join(log_dir, f"log_{tag}_p{i}.txt"), "w")
    logs.append(log)
    procs.append(subprocess.Popen(
        [sys.executable, os.path.abspath(__file__), *flags], cwd=REPO, env=env,
        stdout=log, stderr=subprocess.STDOUT, start_new_session=True))
  deadline = time.monotonic() + timeout
  try:
    while any(p.poll() is None for p in procs):
      if time.monotonic() > deadline:
        raise TimeoutError(f"launch {tag}: workers still running after {timeout:.0f} s")
      if any(p.poll() not in (None, 0) for p in procs):
        break                      # one failed: the other would wait for it forever
      time.sleep(0.2)
  finally:
    for p in procs:
      if p.poll() is None:
        os.killpg(p.pid, signal.SIGKILL)
        p.wait()
    for log in logs:
      log.close()
  bad = [(i, p.returncode) for i, p in enumerate(procs) if p.returncode != 0]
  if bad:
    tails = []
    for i, rc in bad:
      with open(os.path.join(log_dir, f"log_{tag}_p{i}.txt")) as f:
        tails.append(f"--- process {i} (exit {rc}) ---\n" + "".join(f.readlines()[-30:]))
    raise AssertionError(f"launch {tag} failed:\n" + "\n".join(tails))


def _read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f]


def _read_json(path):
  with open(path) as f:
    return json.load(f)


def _reference_batches(config, count):
  """The first ``count`` global batches of a single-process pipeline, as fingerprints."""
  from sfd_jax.training import sfd as train  # pylint: disable=import-outside-toplevel
  it = train.make_data_iterator(config, config.seed)
  try:
    return [{example_fingerprint(l, y) for l, y in zip(b["latent"], b["label"])}
            for b in (next(it) for _ in range(count))]
  finally:
    it.close()


def test_two_process_train_resume(tmp_path):
  from tests.util import write_tiny_latents  # pylint: disable=import-outside-toplevel
  data = write_tiny_latents(tmp_path / "data")
  workdir, logs = str(tmp_path / "run"), str(tmp_path / "logs")
  os.makedirs(logs)

  def flags(steps):
    return [f"--config=configs/tiny.py:data={data},steps={steps}", f"--workdir={workdir}",
            "--config.checkpoint_every_steps=2", "--config.log_every_steps=2"]

  t0 = time.monotonic()
  _launch("a", flags(4), logs, LAUNCH_TIMEOUT_S)
  t1 = time.monotonic()
  _launch("b", flags(6), logs, LAUNCH_TIMEOUT_S)
  t2 = time.monotonic()
  print(f"launch a {t1 - t0:.1f} s, launch b {t2 - t1:.1f} s")
  assert sorted(int(s) for s in os.listdir(os.path.join(workdir, "checkpoints"))
                if s.isdigit()) == [2, 4, 6]
  for i in range(NUM_PROCESSES):
    with open(os.path.join(logs, f"log_b_p{i}.txt")) as f:
      assert "resuming from " + os.path.join(workdir, "checkpoints", "4") in f.read()

  from configs import tiny  # pylint: disable=import-outside-toplevel
  config = tiny.get_config(f"data={data},steps=6")
  ref = _reference_batches(config, 6)
  for tag, positions in (("a", [0, 1, 2, 3]), ("b", [4, 5])):
    rows = [_read_jsonl(os.path.join(logs, f"data_{tag}_p{i}.json"))
            for i in range(NUM_PROCESSES)]
    for i, r in enumerate(rows):
      assert [row["position"] for row in r] == positions, f"launch {tag}, process {i}"
    for k, pos in enumerate(positions):
      halves = [set(r[k]["examples"]) for r in rows]
      assert all(len(h) == config.batch_size // NUM_PROCESSES for h in halves)
      assert not halves[0] & halves[1], f"launch {tag}, batch {pos}: processes overlap"
      assert halves[0] | halves[1] == ref[pos], f"launch {tag}, batch {pos}: not the global batch"

  hashes = {tag: [_read_json(os.path.join(logs, f"hash_{tag}_p{i}.json"))
                  for i in range(NUM_PROCESSES)] for tag in ("a", "b")}
  for tag, steps in (("a", 4), ("b", 6)):
    assert hashes[tag][0] == hashes[tag][1], f"launch {tag}: processes disagree"
    assert hashes[tag][0]["step"] == steps

  import jax  # pylint: disable=import-outside-toplevel
  from sfd_jax import checkpoint  # pylint: disable=import-outside-toplevel
  from sfd_jax.training import sfd as train  # pylint: disable=import-outside-toplevel
  setup = train.build(config)
  state, step, saved_cfg = checkpoint.restore_state_only(
      os.path.join(workdir, "checkpoints"), setup.abstract_state)
  assert step == 6 and int(state["step"]) == 6
  assert saved_cfg["num_train_steps"] == 6
  restored = {k: tree_digest(jax.device_get(state[k])) for k in ("params", "ema")}
  assert restored == {k: hashes["b"][0][k] for k in ("params", "ema")}

  # --mode=export of this run writes exactly the EMA the two processes trained.
  from sfd_jax.jobs import export  # pylint: disable=import-outside-toplevel
  from sfd_jax.convert.common import load_params  # pylint: disable=import-outside-toplevel
  out = export.run(config, workdir)
  exported, meta = load_params(out["dst"])
  assert meta["step"] == 6 and meta["kind"] == "lightning_dit"
  assert tree_digest(exported) == hashes["b"][0]["ema"]


if __name__ == "__main__":
  _worker_main()
