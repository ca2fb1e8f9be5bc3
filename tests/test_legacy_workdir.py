"""Backward compatibility with files written by commit ddd7604 (tests/fixtures/legacy_v1).

* A training workdir checkpointed at step 4 by that commit's ``main.py --mode=train`` is
  resumed by today's ``main.py`` to step 8 and compared with an uninterrupted 8-step run of
  today's code: the step, the data-iterator position, the saved config, the state's key
  set and the logged steps must be equal on any machine; params, EMA and optimizer state
  must be bit-identical when this machine and this JAX are the ones that wrote the fixture
  (``provenance.json``: ``jax``, ``machine``), and equal to float32 rounding otherwise
  (XLA:CPU compiles the straight run's first four steps for this CPU, the fixture's state
  was computed on that one: tests/machine.py). Both are also compared with the 8-step run
  recorded by the old code (``expected.npz``).
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
from tests import machine
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

# Resumed vs straight on another machine or JAX, per array: max |resumed - straight| <=
# RESUME_TOL * max |straight|. Adam divides by sqrt(nu), so an ulp of gradient difference in
# the first 4 steps becomes a relative difference of up to ~1e-5 of the weights by step 8
# (measured: 1.1e-5 params, 1.9e-5 EMA, 6e-7 Adam moments, AMD EPYC against the fixture's
# Intel Xeon); a resume that zeroes the optimizer state or restarts the data iterator is
# off by 0.47-1.7 in every part (tests/fixtures/legacy_v1/README.md).
RESUME_TOL = 1e-4


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


def _assert_close_scaled(actual, desired, tol, msg):
  """Floats: max |actual - desired| <= tol * max |desired| (an array-wide scale, so entries
  near zero do not dominate); integers exactly."""
  actual, desired = np.asarray(actual), np.asarray(desired)
  assert actual.shape == desired.shape, (msg, actual.shape, desired.shape)
  if not np.issubdtype(desired.dtype, np.floating):
    np.testing.assert_array_equal(actual, desired, err_msg=msg)
    return
  scale = float(np.abs(desired).max()) if desired.size else 0.0
  err = float(np.abs(actual.astype(np.float64) - desired).max()) if desired.size else 0.0
  assert err <= tol * scale, f"{msg}: max difference {err:.3g} > {tol:g} x {scale:.3g}"


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
  fc_r, fc_s = flat_dict(config_r), flat_dict(config_s)
  assert fc_r == fc_s, sorted(k for k in fc_r.keys() | fc_s.keys() if fc_r.get(k) != fc_s.get(k))
  # Bit-exact only where the fixture's state was computed by this program on this kind of
  # machine: the same JAX (the same XLA) and the same CPU facts. Otherwise the straight
  # run's first 4 steps are compiled by another XLA or for another CPU (other vector
  # widths and summation orders) while the resumed run starts from the fixture's step-4
  # state, so the two agree to float32 rounding as amplified by 4 Adam steps (RESUME_TOL).
  exact = jax.__version__ == PROVENANCE["jax"] and machine.same_machine(PROVENANCE.get("machine"))
  why = (f"jax {jax.__version__} vs the fixture's {PROVENANCE['jax']}; this machine: "
         f"{machine.describe(machine.machine_facts())}; the fixture's: "
         f"{machine.describe(PROVENANCE.get('machine'))}")
  for part in ("params", "ema", "opt_state", "step"):
    fr, fs = _flat(state_r[part]), _flat(state_s[part])
    assert fr.keys() == fs.keys(), (part, sorted(set(fr) ^ set(fs)))
    assert fr, part
    for k in fr:
      if exact:
        np.testing.assert_array_equal(fr[k], fs[k], err_msg=f"{part}{k}: resumed != straight")
      else:
        _assert_close_scaled(fr[k], fs[k], RESUME_TOL, f"{part}{k}: resumed != straight ({why})")
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


def test_machine_facts_decide_bit_exactness():
  """The bit-exact branch needs a full record equal to this machine; a partial record (the
  fixture's) or one that differs in any fact (cores, ISA, model) is another machine."""
  here = machine.machine_facts()
  assert here["cores"] >= 1 and here["arch"]
  assert machine.same_machine(dict(here))
  assert not machine.same_machine(None) and not machine.same_machine({})
  assert not machine.same_machine(PROVENANCE["machine"]) or PROVENANCE["machine"] == here
  for key, other in (("cores", here["cores"] + 1), ("isa", [*here["isa"], "amx_tile"]),
                     ("model", "other")):
    assert not machine.same_machine({**here, key: other}), key
  partial = {k: v for k, v in here.items() if k != "isa"}
  assert not machine.same_machine(partial)
  assert machine.describe(partial).startswith("partial record")
