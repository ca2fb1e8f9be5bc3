"""launch/: the TPU pod, single-host GPU and SLURM scripts.

Each script is run with --dry-run and its printed commands are parsed back (shlex) and
checked; then the scripts run for real against stand-ins for the cluster tools (a fake
``gcloud`` that plays one TPU worker locally, a fake ``srun`` that starts the task command
once per rank, and a fake ``python`` that records its arguments and environment).
"""
import json
import os
import shlex
import shutil
import stat
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, "launch")
SCRIPTS = ["tpu_pod.sh", "gpu_single_host.sh", "slurm_launch.sh", "slurm_multinode.sbatch"]
TRAIN_FLAGS = ["--config=configs/sfd_xl.py:recipe=80ep", "--workdir=/shared/runs/a b",
               "--config.objective.delta_t=0.1"]
_CLEAN_ENV = ("JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS", "SLURM_JOB_ID", "SLURM_JOB_NAME",
              "SLURM_JOB_NUM_NODES", "SLURM_NNODES", "SLURM_JOB_NODELIST",
              "SLURM_GPUS_ON_NODE", "SLURM_SUBMIT_DIR", "TPU_NAME", "ZONE", "PROJECT",
              "XLA_FLAGS", "LIBTPU_INIT_ARGS", "JAX_COMPILATION_CACHE_DIR", "SFD_REPO_DIR")


def _env(**extra):
  env = {k: v for k, v in os.environ.items() if k not in _CLEAN_ENV}
  env.update(extra)
  return env


def _script(name, *args, env=None, cwd=REPO, check=True):
  path = os.path.join(LAUNCH, name)
  cmd = (["bash", path] if name.endswith(".sbatch") else [path]) + list(args)
  out = subprocess.run(cmd, cwd=cwd, env=env or _env(), capture_output=True, text=True,
                       timeout=60)
  if check:
    assert out.returncode == 0, f"{name} {args}: exit {out.returncode}\n{out.stderr}"
  return out


def _lines(out):
  """The printed commands (comment lines skipped), each split into words."""
  return [shlex.split(line) for line in out.stdout.splitlines()
          if line.strip() and not line.startswith("#")]


def _env_words(cmd):
  """NAME=VALUE words following `env` (and its -u options) in a command."""
  i = cmd.index("env") + 1
  words = {}
  while i < len(cmd) and (cmd[i] == "-u" or "=" in cmd[i] and not cmd[i].startswith("-")):
    if cmd[i] == "-u":
      words.setdefault("-u", []).append(cmd[i + 1])
      i += 2
      continue
    k, v = cmd[i].split("=", 1)
    words[k] = v
    i += 1
  return words, cmd[i:]


def _write_exe(path, text):
  with open(path, "w") as f:
    f.write(text)
  os.chmod(path, os.stat(path).st_mode | stat.S_IXUSR | stat.S_IXGRP | stat.S_IXOTH)
  return str(path)


_FAKE_PYTHON = """#!{python}
import json, os, sys
rec = {{"argv": sys.argv[1:], "cwd": os.getcwd(),
        "env": {{k: v for k, v in os.environ.items()
                if k.startswith(("JAX_", "XLA_", "NCCL_", "LIBTPU", "TF_CPP", "CUDA_",
                                 "SLURM_NTASKS", "PYTHONUNBUFFERED"))}}}}
with open({log!r}, "a") as f:
  f.write(json.dumps(rec) + "\\n")
print("fake training output", flush=True)
"""


def _fake_python(tmp_path, name="python"):
  log = str(tmp_path / f"{name}.jsonl")
  return _write_exe(tmp_path / name, _FAKE_PYTHON.format(python=sys.executable, log=log)), log


def _records(log):
  with open(log) as f:
    return [json.loads(line) for line in f]


# ----------------------------------------------------------------------------------
# All scripts
# ----------------------------------------------------------------------------------


def test_shellcheck():
  if shutil.which("shellcheck") is None:
    pytest.skip("shellcheck is not installed (Debian: apt-get install shellcheck)")
  out = subprocess.run(["shellcheck", "-x", *[os.path.join("launch", s) for s in SCRIPTS],
                        "launch/lib.sh", "launch/install.sh"], cwd=REPO, capture_output=True,
                       text=True, timeout=60)
  assert out.returncode == 0, out.stdout + out.stderr


@pytest.mark.parametrize("name", SCRIPTS)
def test_header_help_and_bad_options(name):
  with open(os.path.join(LAUNCH, name)) as f:
    text = f.read()
  assert text.startswith("#!/usr/bin/env bash\n")
  assert "Usage" in text.split("set -euo pipefail")[0]
  assert os.access(os.path.join(LAUNCH, name), os.X_OK)
  shown = _script(name, "--help").stdout
  assert "Usage" in shown and "--dry-run" in shown
  bad = _script(name, "--no-such-option", "--", "--config=x", check=False)
  assert bad.returncode == 2 and "unknown option '--no-such-option'" in bad.stderr
  bare = _script(name, "--dry-run", "--tpu=x", check=False) if name == "tpu_pod.sh" else \
      _script(name, "--dry-run", check=False)
  assert bare.returncode == 2 and "no main.py flags" in bare.stderr


# ----------------------------------------------------------------------------------
# Single GPU host
# ----------------------------------------------------------------------------------


def test_gpu_single_host_dry_run():
  out = _script("gpu_single_host.sh", "--dry-run", "--gpus=0,1", "--", *TRAIN_FLAGS,
                env=_env(XLA_FLAGS="--xla_dump_to=/tmp/d", JAX_COORDINATOR_ADDRESS="h:1"))
  (cmd,) = _lines(out)
  env, rest = _env_words(cmd)
  assert env["-u"] == ["JAX_COORDINATOR_ADDRESS", "SLURM_NTASKS"]
  assert env["XLA_FLAGS"] == "--xla_gpu_enable_latency_hiding_scheduler=true --xla_dump_to=/tmp/d"
  assert env["CUDA_VISIBLE_DEVICES"] == "0,1" and env["NCCL_DEBUG"] == "WARN"
  assert env["XLA_PYTHON_CLIENT_MEM_FRACTION"] == "0.90"
  assert rest[1:] == [os.path.join(REPO, "main.py"), *TRAIN_FLAGS]

  out = _script("gpu_single_host.sh", "--dry-run", "--log=/tmp/r/train.log", "--", "--config=c")
  mkdir, pipeline = out.stdout.splitlines()
  assert mkdir == "mkdir -p /tmp/r"
  assert pipeline.endswith("main.py --config=c 2>&1 | tee -a /tmp/r/train.log")


def test_gpu_single_host_runs_one_process(tmp_path):
  python, log = _fake_python(tmp_path)
  train_log = tmp_path / "logs" / "train.log"
  _script("gpu_single_host.sh", f"--python={python}", f"--log={train_log}", "--",
          *TRAIN_FLAGS, env=_env(JAX_COORDINATOR_ADDRESS="h:1", SLURM_NTASKS="4"),
          cwd=str(tmp_path))
  (rec,) = _records(log)
  assert rec["argv"] == [os.path.join(REPO, "main.py"), *TRAIN_FLAGS]
  assert rec["cwd"] == str(tmp_path)             # relative flags keep the caller's cwd
  assert "JAX_COORDINATOR_ADDRESS" not in rec["env"] and "SLURM_NTASKS" not in rec["env"]
  assert rec["env"]["XLA_FLAGS"] == "--xla_gpu_enable_latency_hiding_scheduler=true"
  assert train_log.read_text() == "fake training output\n"


# ----------------------------------------------------------------------------------
# SLURM
# ----------------------------------------------------------------------------------

_SLURM = dict(SLURM_JOB_ID="1234", SLURM_JOB_NAME="sfd", SLURM_JOB_NUM_NODES="2",
              SLURM_JOB_NODELIST="gpu[003-004],gpu010", SLURM_GPUS_ON_NODE="8")


def test_slurm_dry_run_one_process_per_node():
  out = _script("slurm_multinode.sbatch", "--dry-run", "--", *TRAIN_FLAGS, env=_env(**_SLURM))
  mkdir, srun = _lines(out)
  assert mkdir == ["mkdir", "-p", "logs/sfd-1234"]
  assert srun[:7] == ["srun", "--nodes=2", "--kill-on-bad-exit=1",
                      "--output=logs/sfd-1234/task-%t.log", "--ntasks-per-node=1",
                      "--ntasks=2", "bash"]
  assert srun[8] == 'JAX_PROCESS_ID="$SLURM_PROCID" exec "$@"'
  env, rest = _env_words(srun)
  # JAX's own port rule: 61440 + job id mod 4096; first host of the node list.
  assert env["JAX_COORDINATOR_ADDRESS"] == f"gpu003:{61440 + 1234 % 4096}"
  assert env["JAX_NUM_PROCESSES"] == "2"
  assert env["JAX_LOCAL_DEVICE_IDS"] == "0,1,2,3,4,5,6,7"
  assert env["XLA_FLAGS"] == "--xla_gpu_enable_latency_hiding_scheduler=true"
  assert rest[1:] == [os.path.join(REPO, "main.py"), *TRAIN_FLAGS]


def test_slurm_dry_run_one_process_per_gpu():
  out = _script("slurm_launch.sh", "--dry-run", "--per-gpu", "--gpus-per-node=4",
                "--log-dir=/shared/logs/x", "--", *TRAIN_FLAGS, env=_env(**_SLURM))
  _, srun = _lines(out)
  assert srun[:6] == ["srun", "--nodes=2", "--kill-on-bad-exit=1",
                      "--output=/shared/logs/x/task-%t.log", "--ntasks-per-node=4",
                      "--ntasks=8"]
  env, rest = _env_words(srun)
  # No explicit launch variables: JAX reads SLURM's (rank, local rank -> GPU).
  assert not any(k.startswith("JAX_") for k in env)
  assert rest[1:] == [os.path.join(REPO, "main.py"), *TRAIN_FLAGS]


@pytest.mark.parametrize("nodelist,first", [("node001", "node001"), ("a1,b2", "a1"),
                                            ("gpu[003-006],x", "gpu003"),
                                            ("n[7,9-11]", "n7")])
def test_slurm_coordinator_is_first_node(nodelist, first):
  out = _script("slurm_launch.sh", "--dry-run", "--", "--config=c",
                env=_env(**{**_SLURM, "SLURM_JOB_NODELIST": nodelist}))
  env, _ = _env_words(_lines(out)[1])
  assert env["JAX_COORDINATOR_ADDRESS"].split(":")[0] == first


_FAKE_SRUN = """#!{python}
# Stand-in for srun: runs the task command once per rank, with SLURM's task variables.
import os, subprocess, sys
args = sys.argv[1:]
opts = {{}}
while args and args[0].startswith("--"):
  k, _, v = args.pop(0)[2:].partition("=")
  opts[k] = v
with open({log!r}, "w") as f:
  f.write(repr(opts))
rcs = []
for rank in range(int(opts["ntasks"])):
  env = dict(os.environ, SLURM_PROCID=str(rank), SLURM_NTASKS=opts["ntasks"],
             SLURM_LOCALID=str(rank % int(opts["ntasks-per-node"])))
  rcs.append(subprocess.call(args, env=env))
sys.exit(max(rcs))
"""


def test_slurm_batch_job_starts_every_rank(tmp_path):
  bindir = tmp_path / "bin"
  bindir.mkdir()
  _write_exe(bindir / "srun", _FAKE_SRUN.format(python=sys.executable,
                                                log=str(tmp_path / "srun.txt")))
  python, log = _fake_python(tmp_path)
  env = _env(**_SLURM, SLURM_SUBMIT_DIR=REPO, PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}")
  out = _script("slurm_multinode.sbatch", f"--python={python}",
                f"--log-dir={tmp_path / 'logs'}", "--", *TRAIN_FLAGS, env=env)
  assert "# job 1234 (sfd): 2 node(s)" in out.stdout
  recs = _records(log)
  assert [r["env"]["JAX_PROCESS_ID"] for r in recs] == ["0", "1"]
  assert {r["env"]["JAX_COORDINATOR_ADDRESS"] for r in recs} == {"gpu003:62674"}
  assert all(r["argv"] == [os.path.join(REPO, "main.py"), *TRAIN_FLAGS] for r in recs)
  assert (tmp_path / "logs").is_dir()


def test_slurm_launch_needs_an_allocation():
  out = _script("slurm_launch.sh", "--", "--config=c", check=False)
  assert out.returncode == 2 and "not inside a SLURM allocation" in out.stderr


# ----------------------------------------------------------------------------------
# TPU pod
# ----------------------------------------------------------------------------------


def _remote(cmd):
  (opt,) = [c for c in cmd if c.startswith("--command=")]
  return opt[len("--command="):]


def test_tpu_pod_dry_run():
  out = _script("tpu_pod.sh", "--dry-run", "--tpu=pod1", "--zone=us-east5-a", "--sync",
                "--setup", "--run-name=r1", "--", *TRAIN_FLAGS, env=_env(TMPDIR="/tmp"))
  lines = out.stdout.splitlines()
  assert len(lines) == 6
  assert lines[0].startswith(f"git -C {REPO} ls-files -z --cached --others") and \
      lines[0].endswith("-czf /tmp/sfd_jax-r1.tar.gz")
  scp, unpack, rm, setup, train = (shlex.split(x) for x in lines[1:])
  assert scp[:5] == ["gcloud", "compute", "tpus", "tpu-vm", "scp"]
  assert scp[5:] == ["/tmp/sfd_jax-r1.tar.gz", "pod1:sfd_jax-r1.tar.gz",
                     "--zone=us-east5-a", "--worker=all"]
  for cmd in (unpack, setup, train):
    assert cmd[:7] == ["gcloud", "compute", "tpus", "tpu-vm", "ssh", "pod1", "--zone=us-east5-a"]
    assert "--worker=all" in cmd
  assert "tar -xzf ~/sfd_jax-r1.tar.gz -C ~/sfd_jax" in _remote(unpack)
  assert rm == ["rm", "-f", "/tmp/sfd_jax-r1.tar.gz"]
  assert _remote(setup) == ("cd ~/sfd_jax && bash launch/install.sh --python=python3 "
                            "--accelerator=tpu")
  remote = _remote(train)
  assert remote.startswith("cd ~/sfd_jax && mkdir -p logs/r1 && (nohup env ")
  assert remote.endswith('echo "started on $(hostname): ~/sfd_jax/logs/r1/$(hostname).log"')
  words = shlex.split(remote.split("(nohup ", 1)[1].split(" > logs/r1/")[0])
  env, rest = _env_words(words)
  assert "--xla_tpu_enable_async_collective_fusion=true" in env["LIBTPU_INIT_ARGS"].split()
  assert rest == [".venv/bin/python", "main.py", *TRAIN_FLAGS]


@pytest.mark.parametrize("flags", [["--workdir=gs://b/r"], ["--workdir", "gs://b/r"]])
def test_tpu_pod_refuses_a_url_workdir_before_anything_runs(flags):
  out = _script("tpu_pod.sh", "--dry-run", "--tpu=pod1", "--sync", "--setup", "--",
                "--config=configs/tiny.py", *flags, check=False)
  assert out.returncode == 2 and out.stdout == ""
  assert out.stderr.strip().splitlines() == [
      "error: --workdir=gs://b/r: a URL is not accepted as a workdir; mount the bucket "
      "(gcsfuse) at the same path on every worker and give that path, e.g. "
      "--workdir=/mnt/gcs/runs/NAME"]


@pytest.mark.parametrize("python", ["3.11", "3.12", "3.13"])
def test_install_script_uses_the_runtime_set_of_the_python(python, tmp_path):
  """launch/install.sh (tpu_pod.sh --setup): the runtime pinned set of the interpreter's
  Python and the accelerator's jax plugin at that set's jax version."""
  fake = tmp_path / f"python{python}"
  major, minor = python.split(".")
  _write_exe(fake, f"#!/bin/sh\necho {major}{minor}\n")   # answers the version query
  out = _script("install.sh", "--dry-run", f"--python={fake}", "--accelerator=tpu")
  with open(os.path.join(REPO, "requirements", f"py{major}{minor}.txt")) as f:
    pins = f.read()
  jax_version = next(l.split("==")[1] for l in pins.splitlines() if l.startswith("jax=="))
  assert out.stdout.splitlines() == [
      f"{fake} -m venv .venv",
      ".venv/bin/python -m pip install -q --upgrade pip",
      f".venv/bin/python -m pip install -q -r requirements/py{major}{minor}.txt "
      f"'jax[tpu]=={jax_version}'",
      ".venv/bin/python -m pip install -q -e . --no-deps"]
  fake.write_text("#!/bin/sh\necho 310\n")
  out = _script("install.sh", "--dry-run", f"--python={fake}", check=False)
  assert out.returncode == 2 and "no pinned set requirements/py310.txt" in out.stderr


def test_tpu_pod_requires_a_name_and_keeps_user_flags():
  out = _script("tpu_pod.sh", "--dry-run", "--", "--config=c", check=False)
  assert out.returncode == 2 and "no TPU name" in out.stderr
  out = _script("tpu_pod.sh", "--dry-run", "--foreground", "--", "--config=c",
                env=_env(TPU_NAME="pod2", LIBTPU_INIT_ARGS="--xla_foo=1",
                         JAX_COMPILATION_CACHE_DIR="gs://b/cache"))
  (train,) = _lines(out)
  assert train[5] == "pod2" and not any(c.startswith("--zone") for c in train)
  remote = _remote(train)
  assert "set -o pipefail" in remote and remote.endswith("| tee logs/" + remote.split(
      "logs/")[1].split(" ")[0] + "/$(hostname).log")
  env, _ = _env_words(shlex.split(remote.split("&& set -o pipefail && ")[1].split(" 2>&1")[0]))
  assert env["LIBTPU_INIT_ARGS"] == "--xla_foo=1"
  assert env["JAX_COMPILATION_CACHE_DIR"] == "gs://b/cache"


_FAKE_GCLOUD = """#!{python}
# Stand-in for gcloud: a one-worker "pod" whose home directory is {home!r}.
import os, shutil, subprocess, sys
args = sys.argv[1:]
assert args[:3] == ["compute", "tpus", "tpu-vm"], args
if args[3] == "scp":
  src, dst = args[4], args[5].split(":", 1)[1]
  shutil.copy(src, os.path.join({home!r}, dst))
  sys.exit(0)
command = [a for a in args if a.startswith("--command=")][0][len("--command="):]
env = dict(os.environ, HOME={home!r})
sys.exit(subprocess.call(["bash", "-c", command], env=env))
"""


def test_tpu_pod_sync_and_train_on_a_fake_worker(tmp_path):
  home, bindir = tmp_path / "home", tmp_path / "bin"
  bindir.mkdir()
  _write_exe(bindir / "gcloud", _FAKE_GCLOUD.format(python=sys.executable, home=str(home)))
  # The worker already has a (fake) interpreter in its virtual environment (--setup).
  checkout = home / "w" / "sfd"
  (checkout / ".venv" / "bin").mkdir(parents=True)
  _, log = _fake_python(tmp_path)
  shutil.copy(tmp_path / "python", checkout / ".venv" / "bin" / "python")
  env = _env(PATH=f"{bindir}{os.pathsep}{os.environ['PATH']}", TMPDIR=str(tmp_path))
  _script("tpu_pod.sh", "--tpu=pod1", "--sync", "--run-name=t1", "--remote-dir=w/sfd",
          "--foreground", "--", "--config=configs/tiny.py", "--workdir=/mnt/gcs/r", env=env,
          cwd=str(tmp_path))
  assert (checkout / "main.py").is_file() and (checkout / "launch" / "tpu_pod.sh").is_file()
  assert not (checkout / ".venv" / "pyvenv.cfg").exists()   # ignored files stay here
  assert not list(tmp_path.glob("sfd_jax-*.tar.gz")) and not list(home.glob("*.tar.gz"))
  (rec,) = _records(log)
  assert rec["argv"] == ["main.py", "--config=configs/tiny.py", "--workdir=/mnt/gcs/r"]
  assert rec["cwd"] == str(checkout) and "LIBTPU_INIT_ARGS" in rec["env"]
  (worker_log,) = (checkout / "logs" / "t1").iterdir()
  assert worker_log.read_text() == "fake training output\n"
