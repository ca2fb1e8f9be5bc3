"""Sweeps: expansion, names, overrides on the config, dry run, emission, local runs."""
import json
import os
import shlex
import subprocess
import sys

import pytest

from configs import sweeps as named
from sfd_jax import sweep
from tests.util import flat_dict

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
XL = "configs/sfd_xl.py"


@pytest.fixture(scope="module")
def xl():
  return sweep.load_config(os.path.join(REPO, XL))


def test_delta_t_ablation_runs(xl):
  runs = sweep.make_runs(xl, "delta_t", "runs")
  assert [r.name for r in runs] == [
      "delta_t-0", "delta_t-0.1", "delta_t-0.2", "delta_t-0.3", "delta_t-0.4", "delta_t-0.5",
      "delta_t-0.6", "delta_t-0.7", "delta_t-0.8", "delta_t-0.9", "delta_t-1"]
  r = runs[3]
  assert r.workdir == os.path.join("runs", "delta_t", "delta_t-0.3")
  assert r.overrides == (("objective.delta_t", 0.3),)
  assert r.base == (("num_train_steps", named.ABLATION_STEPS),)
  assert r.flags() == ["--config.num_train_steps=400000", "--config.objective.delta_t=0.3"]


def test_every_named_sweep_expands_against_every_model_config():
  for config_file in ("configs/sfd_b.py", "configs/sfd_xl.py", "configs/sfd_xxl.py"):
    config = sweep.load_config(os.path.join(REPO, config_file))
    for name in named.SWEEPS:
      runs = sweep.make_runs(config, name)
      assert runs and len({r.name for r in runs}) == len(runs), (config_file, name)


def test_overrides_reach_the_config_and_nothing_else(xl):
  base = flat_dict(xl.to_dict())
  for run in sweep.make_runs(xl, "delta_t_x_size"):
    cfg = sweep.apply_overrides(xl, run.all_overrides)
    got = flat_dict(cfg.to_dict())
    changed = {k for k in base if got[k] != base[k]}
    assert changed <= {"model.variant", "objective.delta_t", "num_train_steps"}
    assert cfg.model.variant == dict(run.overrides)["model.variant"]
    assert cfg.objective.delta_t == dict(run.overrides)["objective.delta_t"]
    assert cfg.num_train_steps == 400_000
  assert xl.objective.delta_t == 0.3 and xl.model.variant == "XL"   # the input is untouched


def test_product_and_list():
  product = {"product": {"a": [1, 2], "b": ["x", "y", "z"]}}
  assert sweep.expand(product) == [
      (("a", 1), ("b", "x")), (("a", 1), ("b", "y")), (("a", 1), ("b", "z")),
      (("a", 2), ("b", "x")), (("a", 2), ("b", "y")), (("a", 2), ("b", "z"))]
  listed = {"list": [{"a": 1}, {"a": 2, "b": "x"}]}
  assert sweep.expand(listed) == [(("a", 1),), (("a", 2), ("b", "x"))]
  both = {"list": [{"a": 1}, {"a": 2}], "product": {"b": ["x", "y"]}}
  assert sweep.expand(both) == [(("a", 1), ("b", "x")), (("a", 1), ("b", "y")),
                                (("a", 2), ("b", "x")), (("a", 2), ("b", "y"))]
  with pytest.raises(sweep.SweepError, match=r"\['a'\] set by both"):
    sweep.expand({"list": [{"a": 1}], "product": {"a": [2]}})
  with pytest.raises(sweep.SweepError, match="needs a 'product' or a 'list'"):
    sweep.expand({"base": {"a": 1}})
  with pytest.raises(sweep.SweepError, match="unknown keys"):
    sweep.expand({"grid": {"a": [1]}})
  with pytest.raises(sweep.SweepError, match="non-empty list"):
    sweep.expand({"product": {"a": 3}})


def test_list_sweep_names(xl):
  runs = sweep.make_runs(xl, "repa")
  assert [r.name for r in runs] == ["use_repa-false", "repa_mode-cos_repa_weight-1",
                                    "repa_mode-cos_mse_repa_weight-0.5"]
  cfg = sweep.apply_overrides(xl, runs[0].all_overrides)
  assert cfg.objective.use_repa is False


def test_names_are_stable_and_filesystem_safe():
  assert sweep.value_token(0.3) == "0.3" and sweep.value_token(0.0) == "0"
  assert sweep.value_token(1.0) == "1" and sweep.value_token(2e-4) == "0.0002"
  assert sweep.value_token(1e-5) == "1e-05" and sweep.value_token(True) == "true"
  assert sweep.value_token("gs://b/x y") == "gs___b_x_y" and sweep.value_token("") == "empty"
  labels = sweep.field_labels(["seed", "sample.seed", "objective.delta_t", "model.variant"])
  assert labels == {"seed": "seed", "sample.seed": "sample.seed",
                    "objective.delta_t": "delta_t", "model.variant": "variant"}
  assert sweep.run_name((("sample.seed", 3), ("objective.delta_t", 0.5)), labels) == \
      "sample.seed-3_delta_t-0.5"
  assert sweep.run_name((), labels) == "base"


def test_adhoc_sweep_converts_to_field_types():
  tiny = sweep.load_config(os.path.join(REPO, "configs/tiny.py") + ":data=/d")
  runs = sweep.make_runs(tiny, "objective.delta_t=0,0.3; model.depth=2,3 ;model.use_repa=false",
                         "out", base=[("num_train_steps", "7")])
  assert [r.name for r in runs] == [
      "delta_t-0_depth-2_use_repa-false", "delta_t-0_depth-3_use_repa-false",
      "delta_t-0.3_depth-2_use_repa-false", "delta_t-0.3_depth-3_use_repa-false"]
  assert runs[3].overrides == (("objective.delta_t", 0.3), ("model.depth", 3),
                               ("model.use_repa", False))
  assert runs[0].base == (("num_train_steps", 7),)
  assert runs[0].workdir == os.path.join("out", "sweep", runs[0].name)


def test_invalid_fields_and_values_give_clear_errors(xl):
  with pytest.raises(sweep.SweepError, match=r"unknown config field 'objective.delta'.*"
                     r"did you mean 'objective.delta_t'"):
    sweep.make_runs(xl, "objective.delta=0,1")
  with pytest.raises(sweep.SweepError, match=r"unknown config field 'modle.variant': the "
                     r"config has no 'modle'.*did you mean 'model'"):
    sweep.make_runs(xl, {"product": {"modle.variant": ["B"]}})
  with pytest.raises(sweep.SweepError, match="'num_train_steps' is a int, not a section"):
    sweep.make_runs(xl, "num_train_steps.x=1")
  with pytest.raises(sweep.SweepError, match="'objective.delta_t' is a float; cannot use 'high'"):
    sweep.make_runs(xl, "objective.delta_t=high")
  with pytest.raises(sweep.SweepError, match="'model' is a section"):
    sweep.make_runs(xl, {"product": {"model": ["B"]}})
  with pytest.raises(sweep.SweepError, match="must be numbers, booleans or strings"):
    sweep.make_runs(xl, {"product": {"data.path": [["a"]]}})
  with pytest.raises(sweep.SweepError, match="'model.variant' \\(str\\) cannot be set to 3"):
    sweep.apply_overrides(xl, [("model.variant", 3)])
  with pytest.raises(sweep.SweepError, match="unknown sweep 'nope'.*delta_t"):
    sweep.make_runs(xl, "nope")
  with pytest.raises(sweep.SweepError, match="same name"):
    sweep.make_runs(xl, {"product": {"data.path": ["a/b", "a_b"]}})


def test_cli_dry_run_prints_main_commands(capsys):
  assert sweep.main([f"--config={XL}:recipe=80ep", "--sweep=delta_t_coarse",
                     "--workdir-root=/r", "--set", "batch_size=512"]) == 0
  out = capsys.readouterr().out.splitlines()
  comments = [l for l in out if l.startswith("#")]
  commands = [shlex.split(l) for l in out if not l.startswith("#")]
  assert comments[0] == "# 5 run(s)"
  assert comments[1] == "# every run: num_train_steps=400000 batch_size=512"
  assert comments[2] == "#   delta_t-0: objective.delta_t=0.0 -> /r/delta_t_coarse/delta_t-0"
  assert len(commands) == 5
  assert commands[2] == ["python", "main.py", f"--config={XL}:recipe=80ep",
                         "--workdir=/r/delta_t_coarse/delta_t-0.3",
                         "--config.num_train_steps=400000", "--config.batch_size=512",
                         "--config.objective.delta_t=0.3"]


def test_cli_errors(capsys):
  assert sweep.main([f"--config={XL}", "--sweep=objective.delta=1"]) == 2
  assert "unknown config field 'objective.delta'" in capsys.readouterr().err
  assert sweep.main([f"--config={XL}", "--sweep=delta_t", "--only=delta_t-7"]) == 2
  assert "no run named ['delta_t-7']" in capsys.readouterr().err
  assert sweep.main(["--config=configs/none.py", "--sweep=delta_t"]) == 2
  assert "config file not found" in capsys.readouterr().err


def test_flags_give_the_same_config_through_main_py_parsing(xl):
  """The printed --config.* flags, parsed by ml_collections like main.py does, produce
  exactly the config the sweep checked."""
  runs = sweep.make_runs(xl, "repa") + sweep.make_runs(xl, "delta_t_x_size")[:2]
  script = (
      "import json, sys\n"
      "from absl import app\n"
      "from ml_collections import config_flags\n"
      "cfg = config_flags.DEFINE_config_file('config', None, '', lock_config=True)\n"
      "app.run(lambda _: print('CONFIG=' + json.dumps(cfg.value.to_dict(), default=str)))\n")
  for run in runs:
    out = subprocess.run([sys.executable, "-c", script, f"--config={XL}", *run.flags()],
                         cwd=REPO, capture_output=True, text=True, timeout=60,
                         env=dict(os.environ, PYTHONPATH=REPO))
    assert out.returncode == 0, out.stderr
    parsed = json.loads(out.stdout.split("CONFIG=", 1)[1])
    expected = json.loads(json.dumps(sweep.apply_overrides(xl, run.all_overrides).to_dict(),
                                     default=str))
    assert parsed == expected, run.name


@pytest.mark.parametrize("kind", sweep.EMIT_KINDS)
def test_emitted_launch_commands_are_accepted_by_the_scripts(kind, capsys):
  assert sweep.main([f"--config={XL}", "--sweep=model_size", f"--emit={kind}",
                     "--workdir-root=/shared/runs", "--only=variant-B,variant-XXL",
                     "--launcher-args=--time=1:00:00" if kind == "slurm" else
                     "--launcher-args="]) == 0
  lines = [shlex.split(l) for l in capsys.readouterr().out.splitlines() if not l.startswith("#")]
  assert len(lines) == 2
  for cmd, variant in zip(lines, ("B", "XXL")):
    main_flags = cmd[cmd.index("--") + 1:]
    assert main_flags == [f"--config={XL}", f"--workdir=/shared/runs/model_size/variant-{variant}",
                          "--config.num_train_steps=400000", f"--config.model.variant={variant}"]
    if kind == "slurm":
      assert cmd[:3] == ["sbatch", f"--job-name=model_size-variant-{variant}", "--time=1:00:00"]
      script = ["bash", cmd[3]]
      rest = cmd[4:]
    else:
      script, rest = [cmd[0]], cmd[1:]
    env = dict(os.environ, TPU_NAME="pod")
    env.pop("SLURM_JOB_ID", None)
    out = subprocess.run(script + ["--dry-run"] + rest, cwd=REPO, capture_output=True,
                         text=True, timeout=60, env=env)
    assert out.returncode == 0, out.stderr
    last = out.stdout.splitlines()[-1]
    if kind == "tpu":      # the training command is inside gcloud's --command
      last = shlex.split(last)[-1].split("--command=", 1)[1]
    last = shlex.split(last.split(" 2>&1")[0])     # gpu/tpu: before the log redirection
    assert last[-len(main_flags):] == main_flags


_FAKE_PYTHON = """#!{python}
import json, os, sys
with open({log!r}, "a") as f:
  f.write(json.dumps({{"argv": sys.argv[1:], "cwd": os.getcwd()}}) + "\\n")
sys.exit(3 if any(a.endswith("delta_t-0.1") for a in sys.argv) else 0)
"""


def test_run_executes_each_run_in_turn(tmp_path, capsys):
  log = str(tmp_path / "calls.jsonl")
  fake = tmp_path / "python"
  fake.write_text(_FAKE_PYTHON.format(python=sys.executable, log=log))
  fake.chmod(0o755)
  args = [f"--config={XL}", "--sweep=delta_t_coarse", "--run", f"--python={fake}",
          f"--workdir-root={tmp_path}"]
  assert sweep.main(args) == 1                     # stops at the failing second run
  calls = [json.loads(l) for l in open(log)]
  assert [c["argv"][2].rsplit("/", 1)[1] for c in calls] == ["delta_t-0", "delta_t-0.1"]
  assert calls[0]["argv"][0] == "main.py" and calls[0]["cwd"] == REPO
  assert "failed: delta_t-0.1" in capsys.readouterr().out
  os.remove(log)
  assert sweep.main(args + ["--keep-going"]) == 1
  assert len(open(log).readlines()) == 5
  os.remove(log)
  assert sweep.main(args + ["--only=delta_t-0,delta_t-1"]) == 0
  assert len(open(log).readlines()) == 2
