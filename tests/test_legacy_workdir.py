"""Backward compatibility with files written by commit ddd7604 (tests/fixtures/legacy_v1).

* A training workdir checkpointed at step 4 by that commit's ``main.py --mode=train`` is
  resumed by today's ``main.py`` to step 8; the result must be bit-identical (params, EMA,
  optimizer state, data-iterator position) to an uninterrupted 8-step run of today's code,
  and close to the 8-step run recorded by the old code (``expected.npz``).
* A converted LightningDiT directory written by that commit's converter must load with
  ``sfd_jax.convert.lightning_dit.load_converted`` and give the recorded velocity.

The checkpoints are read with Orbax directly (no sfd_jax checkpoint/training modules), so
the test does not depend on where those live. See tests/fixtures/legacy_v1/README.md.
"""
import json
import pathlib
import re
import shutil
import subprocess
import sys

import jax
import numpy as np
import orbax.checkpoint as ocp

import sfd_jax  # noqa: F401
from tests.conftest import REPO, child_env
from tests.util import assert_close_ref, flat_dict

FIXTURE = pathlib.Path(__file__).resolve().parent / "fixtures" / "legacy_v1"
PROVENANCE = json.loads((FIXTURE / "provenance.json").read_text())
STEPS_SAVED = PROVENANCE["steps_saved"]      # 4: the fixture workdir's checkpoint
STEPS_TOTAL = PROVENANCE["steps_total"]      # 8
# Fields whose change would change the numbers (everything else is bookkeeping).
NUMERIC_SECTIONS = ("seed", "batch_size", "ema_decay", "model", "objective", "optimizer",
                    "data", "mesh", "sharding_rules")


# The fixture's code computed attention with jax.nn's XLA path, the CPU choice of "auto"
# then (today "auto" picks the heads-major formulation on CPU: same values to float32
# rounding). attention_impl is a compute-only field, so a resumed run may set it; pinning
# it gives both runs the fixture's arithmetic, which the bit-exact check needs.
FIXTURE_COMPUTE = ("--config.model.attention_impl=xla",)


def _train_cmd(data, workdir):
  return [sys.executable, str(REPO / "main.py"), f"--config={REPO}/configs/tiny.py",
          f"--config.data.path={data}", f"--config.num_train_steps={STEPS_TOTAL}",
          f"--workdir={workdir}", "--mode=train", *PROVENANCE["train_overrides"],
          *FIXTURE_COMPUTE]


def _env():
  return child_env()


def _run_both(cmds):
  """Runs the commands concurrently (each is mostly single-threaded start-up); returns
  their stderr, failing with the tail of the first one that failed."""
  procs = [subprocess.Popen(c, cwd=REPO, env=_env(), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True) for c in cmds]
  outs = [p.communicate(timeout=600) for p in procs]
  for c, p, (_, err) in zip(cmds, procs, outs):
    if p.returncode != 0:
      raise AssertionError(f"{' '.join(c)} failed ({p.returncode}):\n{err[-4000:]}")
  return [err for _, err in outs]


def _manager(ckpt_dir):
  return ocp.CheckpointManager(str(ckpt_dir), item_handlers={
      "state": ocp.PyTreeCheckpointHandler(), "data": ocp.JsonCheckpointHandler(),
      "config": ocp.JsonCheckpointHandler()})


def _read_checkpoint(ckpt_dir, step=None):
  """(step, state as numpy, data-iterator state, config) of a training checkpoint."""
  mngr = _manager(ckpt_dir)
  try:
    step = mngr.latest_step() if step is None else step
    assert step is not None, f"no checkpoint in {ckpt_dir}"
    meta = mngr.item_metadata(step)["state"]
    meta = getattr(meta, "tree", meta)
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), meta)
    out = mngr.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(restore_args=restore_args),
        data=ocp.args.JsonRestore(), config=ocp.args.JsonRestore()))
  finally:
    mngr.close()
  return step, out["state"], dict(out["data"] or {}), dict(out["config"] or {})


def _flat(tree):
  return {jax.tree_util.keystr(p): np.asarray(v)
          for p, v in jax.tree_util.tree_flatten_with_path(tree)[0]}


def _flat_slash(tree, prefix=""):
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(_flat_slash(v, f"{prefix}{k}/"))
    else:
      out[f"{prefix}{k}"] = np.asarray(v)
  return out


def _copy_writable(src, dst):
  """copytree, then u+w everywhere (the fixture may come from a read-only checkout; the
  resumed run deletes the old checkpoint)."""
  shutil.copytree(src, dst)
  for p in [pathlib.Path(dst), *pathlib.Path(dst).rglob("*")]:
    p.chmod(p.stat().st_mode | 0o200)


def _config_drift(old, new):
  """Numeric-relevant config fields that differ between the fixture and today's run."""
  old, new = flat_dict(old), flat_dict(new)
  skip = {"data.path", "num_train_steps"}
  rows = []
  for k in sorted(old):
    if k in skip or k.split(".")[0] not in NUMERIC_SECTIONS:
      continue
    if k not in new:
      rows.append(f"{k}: {old[k]!r} -> (absent)")
    elif new[k] != old[k]:
      rows.append(f"{k}: {old[k]!r} -> {new[k]!r}")
  return rows


def _loss_steps(stderr):
  """Steps at which the run logged its training metrics (clu's ``[step] loss=...``)."""
  return [int(s) for s in re.findall(r"\] \[(\d+)\] .*?\bloss=", stderr)]


def test_resume_legacy_workdir_is_exact(tmp_path):
  data = tmp_path / "data"
  resumed, straight = tmp_path / "resumed", tmp_path / "straight"
  _copy_writable(FIXTURE / "data", data)
  _copy_writable(FIXTURE / "workdir", resumed)
  _, legacy_state, legacy_data, legacy_config = _read_checkpoint(
      resumed / "checkpoints", STEPS_SAVED)
  assert int(legacy_state["step"]) == STEPS_SAVED and legacy_data["position"] == STEPS_SAVED

  err_resumed, err_straight = _run_both([_train_cmd(data, resumed),
                                         _train_cmd(data, straight)])
  # The resumed run continued from step 4 (a run that ignored the checkpoint would log
  # step 4 too and match the straight run vacuously).
  assert _loss_steps(err_straight) == [4, 8], err_straight[-3000:]
  assert _loss_steps(err_resumed) == [8], err_resumed[-3000:]

  step_r, state_r, data_r, config_r = _read_checkpoint(resumed / "checkpoints")
  step_s, state_s, data_s, config_s = _read_checkpoint(straight / "checkpoints")
  assert step_r == step_s == STEPS_TOTAL
  assert data_r == data_s, (data_r, data_s)
  assert data_r.get("position") == STEPS_TOTAL, data_r
  # Bit-exact when this JAX is the one that wrote the fixture. With another JAX release
  # the straight run's first 4 steps are compiled by another XLA (float32 rounding may
  # differ by an ulp) while the resumed run starts from the fixture's step-4 state, so
  # the two can only agree to rounding.
  same_jax = jax.__version__ == PROVENANCE["jax"]
  for part in ("params", "ema", "opt_state", "step"):
    fr, fs = _flat(state_r[part]), _flat(state_s[part])
    assert fr.keys() == fs.keys(), (part, sorted(set(fr) ^ set(fs)))
    assert fr, part
    for k in fr:
      if same_jax:
        np.testing.assert_array_equal(fr[k], fs[k], err_msg=f"{part}{k}: resumed != straight")
      else:
        np.testing.assert_allclose(fr[k], fs[k], rtol=1e-5, atol=1e-7,
                                   err_msg=f"{part}{k}: resumed != straight (jax "
                                           f"{jax.__version__} vs fixture's {PROVENANCE['jax']})")
  assert set(state_r) == set(state_s)
  for k in state_r:
    if k not in ("params", "ema", "opt_state", "step"):
      jax.tree.map(np.testing.assert_array_equal, state_r[k], state_s[k])

  # Cross-version: today's 8 steps vs the old code's uninterrupted 8 steps.
  drift = _config_drift(legacy_config, config_r)
  note = ("config fields changed since the fixture:\n  " + "\n  ".join(drift)) if drift else ""
  expected = np.load(FIXTURE / "expected.npz")
  assert int(expected["step"]) == STEPS_TOTAL
  for part in ("params", "ema"):
    got = _flat_slash(state_r[part], f"{part}/")
    want = sorted(k for k in expected.files if k.startswith(f"{part}/"))
    assert sorted(got) == want, (part, sorted(set(got) ^ set(want)), note)
    for k in want:
      np.testing.assert_allclose(got[k], expected[k], rtol=1e-5, atol=1e-7,
                                 err_msg=f"{k} vs the legacy run. {note}")


def test_load_legacy_converted_lightning_dit():
  from flax import nnx  # pylint: disable=import-outside-toplevel
  from sfd_jax.convert.lightning_dit import load_converted  # pylint: disable=import-outside-toplevel
  io = np.load(FIXTURE / "converted_io.npz")
  model = load_converted(FIXTURE / "converted")
  apply = nnx.jit(lambda m, *a: m(*a))
  v = apply(model, *(jax.numpy.asarray(io[k]) for k in ("x", "t_tex", "t_sem", "y")))
  assert_close_ref(v, io["velocity"], tol=1e-5, name="velocity of the legacy converted model")
