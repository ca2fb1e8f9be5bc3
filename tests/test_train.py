"""Training system on 8 fake CPU devices: sharding, sharded == single-device, exact
resume after SIGTERM / SIGKILL, NaN guard, clear start-up errors, main.py end to end."""
import hashlib
import json
import os
import pathlib
import re
import subprocess
import sys

import jax
import ml_collections
import numpy as np
import pytest

import sfd_jax  # noqa: F401
from sfd_jax import parallel
from sfd_jax.training import state as state_lib
from sfd_jax.training import loop
from sfd_jax.training import optim
from sfd_jax.training import sfd as train
from sfd_jax.training import sfd as ts
from sfd_jax.checkpoint import restore_state_only
from sfd_jax.diffusion.objective import ObjectiveConfig
from sfd_jax.models.lightning_dit import DiTConfig
from tests.conftest import REPO, child_env
from tests.util import main_killed_after, preempted_at, tiny, write_tiny_latents

sys.path.insert(0, str(REPO))


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return write_tiny_latents(tmp_path_factory.mktemp("latents"))


# ---------------------------------------------------------------- sharding


SHARD_CFG = DiTConfig(input_size=4, hidden_size=64, depth=2, num_heads=4,
                      repa_projector_dim=64, repa_dim=16)


def _setup(shape, cfg=SHARD_CFG, lr=1e-3, eps=1e-8):
  mesh = parallel.make_mesh(shape, jax.devices()[:int(np.prod(shape))])
  opt = ml_collections.ConfigDict(dict(lr=lr, b1=0.9, b2=0.999, eps=eps, weight_decay=0.0))
  tx, sched = optim.make_optimizer(opt)
  return ts.build_setup(cfg, ObjectiveConfig(), mesh, tx, sched, ema_decay=0.9, seed=3)


@pytest.mark.parametrize("shape", [(8, 1, 1), (2, 4, 1), (2, 2, 2)])
def test_weights_sharded_per_rules(shape):
  setup = _setup(shape)
  abstract = setup.abstract_state["params"]
  rows = [(jax.tree_util.keystr(p), l.shape, l.sharding.spec)
          for p, l in jax.tree_util.tree_flatten_with_path(abstract)[0]]
  print("\n".join(f"{p:70s} {str(s):18s} {spec}" for p, s, spec in rows))
  fsdp, tensor = shape[1], shape[2]
  for path, shp, spec in rows:
    big = int(np.prod(shp)) >= 4096 and len(shp) >= 2
    sharded = any(a is not None for a in spec)
    if big and (fsdp > 1 or tensor > 1):
      assert sharded, f"large weight {path} {shp} is replicated on mesh {shape}"
    if fsdp == 1 and tensor == 1:
      assert not sharded, f"{path} sharded on a data-only mesh"
  qkv = setup.abstract_state["params"]["blocks"]["attn"]["qkv"]["kernel"].sharding.spec
  assert tuple(qkv) == (None, "fsdp" if fsdp > 1 else None, "tensor" if tensor > 1 else None)
  # Optimizer moments follow their parameter; the step counter is replicated.
  opt = setup.state_shardings["opt_state"]
  specs = {str(s.spec) for s in jax.tree.leaves(opt)}
  assert str(jax.sharding.PartitionSpec()) in specs
  if fsdp > 1:
    assert any("fsdp" in s for s in specs)


def _perturbed_params(setup, seed=0):
  """Random (non-zero everywhere) parameters: keeps gradients well conditioned."""
  shapes = setup.abstract_state["params"]
  leaves, tree = jax.tree.flatten(shapes)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  vals = [0.05 * jax.random.normal(k, l.shape, l.dtype) for l, k in zip(leaves, keys)]
  return jax.device_get(jax.tree.unflatten(tree, vals))


def test_sharded_step_equals_single_device():
  rng = np.random.RandomState(0)
  batch = {"latent": rng.randn(8, 4, 4, 48).astype(np.float32),
           "label": np.arange(8).astype(np.int32),
           "repa": rng.randn(8, 16, 16).astype(np.float32)}
  init = None
  results = {}
  for shape in [(1, 1, 1), (2, 4, 1), (2, 2, 2)]:
    # eps 1e-4: Adam's first update g/(|g|+eps) would otherwise turn float rounding of
    # near-zero gradient entries (different reduction order per mesh) into ±lr jumps.
    setup = _setup(shape, eps=1e-4)
    init = _perturbed_params(setup) if init is None else init
    state = state_lib.create_train_state(setup, init)
    step = ts.make_train_step(setup)
    b = jax.device_put(batch, parallel.batch_sharding(setup.mesh))
    state, metrics = step(state, b)
    results[shape] = (jax.device_get(state["params"]), float(metrics["loss"]))
  ref_params, ref_loss = results[(1, 1, 1)]
  for shape, (params, loss) in results.items():
    assert loss == pytest.approx(ref_loss, rel=1e-5)
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(ref_params)):
      scale = max(1e-3, float(np.max(np.abs(b))))
      assert float(np.max(np.abs(a - b))) / scale < 1e-5, shape


def test_state_created_sharded_and_ema_is_copy():
  setup = _setup((1, 8, 1))
  state = state_lib.create_train_state(setup)
  qkv = state["params"]["blocks"]["attn"]["qkv"]["kernel"]
  assert qkv.sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None)
  assert len(qkv.addressable_shards) == 8
  assert qkv.addressable_shards[0].data.shape == (2, 8, 192)
  for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(state["ema"])):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ---------------------------------------------------------------- start-up errors


def test_startup_errors_are_readable(data_dir):
  with pytest.raises(parallel.ShardingError, match=r"batch_size=12 is not divisible by the "
                     r"batch mesh axes data×fsdp = 1×8 = 8"):
    train.build(tiny(data_dir, batch_size=12))
  with pytest.raises(parallel.ShardingError, match="needs 16 devices, but 8"):
    train.build(tiny(data_dir, **{"mesh.fsdp": 16}))
  with pytest.raises(ValueError, match="unknown LightningDiT variant 'XXXL'"):
    train.build(tiny(data_dir, **{"model.variant": "XXXL"}))
  with pytest.raises(ValueError, match=r"delta_t must be in \[0, 1\], got 1.5"):
    train.build(tiny(data_dir, **{"objective.delta_t": 1.5}))
  with pytest.raises(parallel.ShardingError, match=r"dimension 170 .*'mlp'.* not divisible"):
    train.build(tiny(data_dir, strict_sharding=True, **{"mesh.fsdp": 2, "mesh.tensor": 4,
                                                        "model.hidden_size": 64}))
  c = tiny(data_dir)
  c.data.path = str(pathlib.Path(data_dir).parent / "does_not_exist")
  with pytest.raises(Exception, match="does_not_exist"):
    train.make_data_iterator(c, 0)


# ---------------------------------------------------------------- resume


def _final_params(workdir, config):
  setup = train.build(config)
  state, step, _ = restore_state_only(os.path.join(workdir, "checkpoints"),
                                      setup.abstract_state)
  return step, jax.device_get(state)


def _run_main(args, env_extra=None, check=True):
  env = child_env(**(env_extra or {}))
  proc = subprocess.run([sys.executable, str(REPO / "main.py"), *args], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=300)
  if check and proc.returncode != 0:
    raise AssertionError(f"main.py failed ({proc.returncode}):\n{proc.stderr[-4000:]}")
  return proc


def _same(a, b):
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_main_trains_and_resume_is_exact(data_dir, tmp_path):
  steps = 20
  cfg_arg = f"--config={REPO}/configs/tiny.py:data={data_dir},steps={steps}"
  # 1. Uninterrupted run through main.py: loss decreases, TensorBoard events written.
  straight = tmp_path / "straight"
  proc = _run_main([cfg_arg, f"--workdir={straight}", "--config.log_every_steps=5"])
  losses = [float(m) for m in re.findall(r"\] \[\d+\] .*?\bloss=([0-9.]+)", proc.stderr)]
  assert len(losses) == steps // 5, proc.stderr[-2000:]
  assert losses[-1] < losses[0], losses
  assert list(straight.glob("events.out.tfevents.*")), "no TensorBoard events written"
  saved = json.loads((straight / "config.json").read_text())     # the resolved config
  assert saved["num_train_steps"] == steps and saved["log_every_steps"] == 5
  assert saved["data"]["path"] == str(data_dir)
  step, ref = _final_params(str(straight), tiny(data_dir, num_train_steps=steps))
  assert step == steps

  # 2. SIGTERM at step 7 (checkpoint every 10): saves step 7 and exits; resume to 20.
  term = tmp_path / "sigterm"
  c = tiny(data_dir, num_train_steps=steps)
  with preempted_at(train, "make_data_iterator", 7):
    out = train.train_and_evaluate(c, str(term))
  assert out["step"] == 7
  assert sorted(int(p.name) for p in (term / "checkpoints").iterdir() if p.name.isdigit()) == [7]
  train.train_and_evaluate(tiny(data_dir, num_train_steps=steps), str(term))
  _same(_final_params(str(term), tiny(data_dir, num_train_steps=steps))[1], ref)

  # 3. SIGKILL at step 13, after the save at step 10 completed; resume to 20.
  kill = tmp_path / "sigkill"
  proc = main_killed_after([cfg_arg, f"--workdir={kill}"], 13, str(kill / "checkpoints" / "10"))
  assert proc.returncode == -9, proc.stderr[-2000:]
  assert (kill / "checkpoints" / "10").is_dir() and not (kill / "checkpoints" / "20").exists()
  train.train_and_evaluate(tiny(data_dir, num_train_steps=steps), str(kill))
  _same(_final_params(str(kill), tiny(data_dir, num_train_steps=steps))[1], ref)


def _tree_hash(path):
  h = hashlib.sha256()
  for p in sorted(pathlib.Path(path).rglob("*")):
    if p.is_file():
      h.update(str(p.relative_to(path)).encode())
      h.update(p.read_bytes())
  return h.hexdigest()


def test_nan_guard_keeps_last_checkpoint(data_dir, tmp_path):
  wd = tmp_path / "nan"
  train.train_and_evaluate(tiny(data_dir, num_train_steps=10), str(wd))
  before = _tree_hash(wd / "checkpoints")
  with pytest.raises(loop.NonFiniteLossError, match=r"Last good checkpoint: step 10"):
    train.train_and_evaluate(tiny(data_dir, num_train_steps=20,
                                  **{"optimizer.lr": 1e30}), str(wd))
  assert _tree_hash(wd / "checkpoints") == before
