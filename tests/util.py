"""Shared test helpers."""
import contextlib
import os
import signal

import numpy as np


def flat_dict(d, prefix=""):
  """{"a": {"b": 1}} -> {"a.b": 1}."""
  out = {}
  for k, v in d.items():
    if isinstance(v, dict):
      out.update(flat_dict(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def assert_close_ref(actual, ref, tol=1e-4, name=""):
  """max|a - ref| <= tol * max(1, max|ref|): the parity README's criterion."""
  actual = np.asarray(actual, np.float64)
  ref = np.asarray(ref, np.float64)
  assert actual.shape == ref.shape, f"{name}: shape {actual.shape} != {ref.shape}"
  bound = tol * max(1.0, float(np.max(np.abs(ref))))
  err = float(np.max(np.abs(actual - ref)))
  assert err <= bound, f"{name}: max abs err {err:.3e} > {bound:.3e}"


def write_tiny_latents(directory, n=64, grid=4, repa_dim=16, num_classes=10, seed=0,
                       per_shard=32):
  """A small class-structured latent dataset in the trainer's format (+ stats.npz).

  Each class has its own mean pattern, so a denoiser can learn something in a few steps.
  """
  from sfd_jax.data import records, stats as stats_lib
  from sfd_jax.data.schema import LatentSchema
  schema = LatentSchema(grid=grid, texture_channels=32, semantic_channels=16,
                        repa_dim=repa_dim)
  rng = np.random.default_rng(seed)
  protos = rng.normal(size=(num_classes, grid, grid, 48)).astype(np.float32)
  rprotos = rng.normal(size=(num_classes, grid, grid, repa_dim)).astype(np.float32)
  examples = []
  for i in range(n):
    c = i % num_classes
    lat = protos[c] + 0.1 * rng.normal(size=protos[c].shape).astype(np.float32)
    rep = rprotos[c] + 0.1 * rng.normal(size=rprotos[c].shape).astype(np.float32)
    examples.append({
        "texture": lat[..., :32], "semantic": lat[..., 32:],
        "texture_flip": lat[:, ::-1, :32].copy(), "semantic_flip": lat[:, ::-1, 32:].copy(),
        "repa": rep.astype(np.float16), "repa_flip": rep[:, ::-1].astype(np.float16),
        "label": np.int64(c)})
  records.write_examples(directory, examples, schema, records_per_shard=per_shard)
  st = stats_lib.compute_stats(records.LatentRecords(directory), num_samples=n)
  st.save(stats_lib.stats_path(directory))
  return str(directory)


def tiny(data, **overrides):
  """configs/tiny.py on the dataset ``data`` with dotted-path ``overrides``
  (``tiny(d, **{"optimizer.lr": 1e-3})``)."""
  from configs import tiny as tiny_config  # pylint: disable=import-outside-toplevel
  c = tiny_config.get_config(f"data={data}")
  for k, v in overrides.items():
    node = c
    *parents, leaf = k.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = v
  return c


_HIDE = """
import importlib.machinery as _m
_orig = _m.PathFinder.find_spec
def _find_spec(cls, name, path=None, target=None):
  if name.split(".")[0] in {hidden!r}:
    return None                      # as if the package were not installed
  return _orig(name, path, target)
_m.PathFinder.find_spec = classmethod(_find_spec)
"""


def env_without(tmp_path, hidden):
  """A child-process environment (CPU jax, the repository importable) in which the
  top-level packages ``hidden`` cannot be imported, as if they were not installed."""
  from tests.conftest import REPO, child_env  # pylint: disable=import-outside-toplevel
  site = tmp_path / "site"
  site.mkdir(exist_ok=True)
  (site / "sitecustomize.py").write_text(_HIDE.format(hidden=set(hidden)))
  return child_env(JAX_PLATFORMS="cpu", PYTHONPATH=os.pathsep.join([str(site), str(REPO)]))


class _SignalOnBatch:
  """A data iterator whose ``n``-th batch is fetched only after another process has sent
  ``sig`` to this one."""

  def __init__(self, it, n: int, sig):
    self._it, self._n, self._sig, self._count = it, n, sig, 0

  def __iter__(self):
    return self

  def __next__(self):
    self._count += 1
    if self._count == self._n:
      import subprocess  # pylint: disable=import-outside-toplevel
      subprocess.run(["kill", "-s", self._sig.name[3:], str(os.getpid())], check=True)
    return next(self._it)

  def __getattr__(self, name):        # get_state, set_state, close
    return getattr(self._it, name)


@contextlib.contextmanager
def preempted_at(module, name: str, step: int, sig=signal.SIGTERM):
  """While active, the data iterators that ``module.<name>`` makes have another process
  send ``sig`` (a preemption notice) to this one when the batch of step ``step`` is
  fetched, so a fresh run saves step ``step`` and stops there."""
  make = getattr(module, name)
  setattr(module, name, lambda *a, **k: _SignalOnBatch(make(*a, **k), step, sig))
  try:
    yield
  finally:
    setattr(module, name, make)


def main_killed_after(args, step: int, checkpoint: str, timeout: float = 600):
  """Runs main.py's entry with ``args`` in a child process whose training stops before
  step ``step + 1`` (its batch never arrives); once the directory ``checkpoint`` exists (an
  earlier save completed), the child is killed from here with SIGKILL.
  Returns the ``subprocess.CompletedProcess``."""
  child = PausedMain(args, step, checkpoint)
  child.wait_paused(timeout)
  child.kill()
  return child.finish(timeout=60)


class PausedMain:
  """main.py's entry in a child process whose training waits before step ``step + 1``
  (its batch is not fetched) until ``resume()`` (without ``go_file``, for ever);
  ``wait_paused()`` returns once it waits and the directory ``checkpoint`` exists (an
  earlier save completed). ``kill()`` sends SIGKILL. ``finish()`` waits for the end:
  ``subprocess.CompletedProcess``."""

  def __init__(self, args, step: int, checkpoint: str, go_file: str | None = None):
    import subprocess  # pylint: disable=import-outside-toplevel
    import sys  # pylint: disable=import-outside-toplevel
    import tempfile  # pylint: disable=import-outside-toplevel
    from tests.conftest import REPO, child_env  # pylint: disable=import-outside-toplevel
    go = f"os.path.exists({go_file!r})" if go_file else "False"
    code = (
        "import os, sys, time\n"
        "from sfd_jax.data import global_batch\n"
        "_to_global, _calls = global_batch.to_global, [0]\n"
        "def _counted(*a, **k):\n"
        "  _calls[0] += 1\n"
        f"  if _calls[0] == {step + 1}:\n"
        "    print('paused', flush=True)\n"
        f"    while not {go}:\n"
        "      time.sleep(0.05)\n"
        "  return _to_global(*a, **k)\n"
        "global_batch.to_global = _counted\n"
        f"sys.argv = ['main.py'] + {list(args)!r}\n"
        "from sfd_jax.cli import run\n"
        "run()\n")
    self.args, self.checkpoint, self.go_file = list(args), checkpoint, go_file
    self._err = tempfile.TemporaryFile("w+")
    self.proc = subprocess.Popen([sys.executable, "-c", code], cwd=REPO, env=child_env(),
                                 stdout=subprocess.PIPE, stderr=self._err, text=True)
    self._out = ""

  def wait_paused(self, timeout: float = 600) -> bool:
    import time  # pylint: disable=import-outside-toplevel
    self._out = self.proc.stdout.readline()      # "paused", or "" if the child ended
    deadline = time.time() + timeout
    while (self._out == "paused\n" and not os.path.isdir(self.checkpoint)
           and time.time() < deadline):
      time.sleep(0.05)
    return self._out == "paused\n" and os.path.isdir(self.checkpoint)

  def resume(self) -> None:
    with open(self.go_file, "w", encoding="utf-8"):
      pass

  def kill(self) -> None:
    if self.proc.poll() is None:
      self.proc.kill()

  def finish(self, timeout: float = 600):
    import subprocess  # pylint: disable=import-outside-toplevel
    try:
      self.proc.wait(timeout=timeout)
    finally:
      self.kill()
    out = self._out + self.proc.stdout.read()
    self._err.seek(0)
    err = self._err.read()
    self._err.close()
    return subprocess.CompletedProcess(self.args, self.proc.returncode, out, err)


# ----------------------------------------------------------------------------------
# One training step on a tiny model (the sharding / accumulation / resume tests)
# ----------------------------------------------------------------------------------


def perturbed_params(setup, seed=0):
  """Every weight random (zero-initialised layers too), so every term has gradients."""
  import jax  # pylint: disable=import-outside-toplevel
  leaves, tree = jax.tree.flatten(setup.abstract_state["params"])
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.device_get(jax.tree.unflatten(
      tree, [0.05 * jax.random.normal(k, l.shape, l.dtype) for l, k in zip(leaves, keys)]))


def tiny_batch(n=16, seed=0):
  """A random batch of n 4×4×48 latents with labels and 16×16 REPA features."""
  rng = np.random.RandomState(seed)
  return {"latent": rng.randn(n, 4, 4, 48).astype(np.float32),
          "label": (np.arange(n) % 10).astype(np.int32),
          "repa": rng.randn(n, 16, 16).astype(np.float32)}


def train_one_step(setup, init, batch, **kw):
  """(state, float metrics) after one step of ``make_train_step(setup, **kw)`` from the
  parameters ``init`` on ``batch`` sharded over ``setup.mesh``."""
  import jax  # pylint: disable=import-outside-toplevel
  from sfd_jax import parallel  # pylint: disable=import-outside-toplevel
  from sfd_jax.training import sfd, state as state_lib  # pylint: disable=C0415
  state = state_lib.create_train_state(setup, init)
  step = sfd.make_train_step(setup, **kw)
  state, metrics = step(state, jax.device_put(batch, parallel.batch_sharding(setup.mesh)))
  return jax.device_get(state), {k: float(v) for k, v in jax.device_get(metrics).items()}


def assert_trees_close(a, b, tol):
  """Every leaf of ``a`` within ``tol`` of ``b``'s, relative to max(1e-3, max |b|)."""
  import jax  # pylint: disable=import-outside-toplevel
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    scale = max(1e-3, float(np.max(np.abs(y))))
    assert float(np.max(np.abs(np.asarray(x) - np.asarray(y)))) / scale <= tol


def final_state(workdir, config):
  """(step, state, setup) of the last checkpoint under ``workdir`` for ``config``."""
  import jax  # pylint: disable=import-outside-toplevel
  from sfd_jax.checkpoint import restore_state_only  # pylint: disable=C0415
  from sfd_jax.training import sfd  # pylint: disable=import-outside-toplevel
  setup = sfd.build(config)
  state, step, _ = restore_state_only(os.path.join(workdir, "checkpoints"),
                                      setup.abstract_state)
  return step, jax.device_get(state), setup
