#!/usr/bin/env bash
# Start main.py on every node of a SLURM allocation (srun): one process per node that
# drives all of the node's GPUs (default), or one process per GPU.
#
# Usage (inside an allocation: from launch/slurm_multinode.sbatch, or after salloc):
#   launch/slurm_launch.sh [options] -- MAIN_PY_FLAGS...
#
#   salloc --nodes=2 --gpus-per-node=8 --exclusive
#   launch/slurm_launch.sh -- --config=configs/sfd_xl.py --workdir=/shared/runs/sfd_xl
#
# Options:
#   --per-node          one process per node, seeing all its GPUs (default)
#   --per-gpu           one process per GPU (the allocation needs --ntasks-per-node=GPUS)
#   --gpus-per-node=N   GPUs per node (default $SLURM_GPUS_ON_NODE, else 8)
#   --log-dir=DIR       one log per task: DIR/task-<rank>.log
#                       (default logs/<job name>-<job id>)
#   --port=N            coordinator port (default 61440 + job id mod 4096, as JAX picks)
#   --python=BIN        interpreter (default: .venv/bin/python of the repository, else python3)
#   --dry-run           print the srun command, run nothing (works outside SLURM too)
#   -h, --help          this text
#
# How the processes find each other (sfd_jax/parallel/distributed.py runs before anything else):
# * --per-gpu: srun starts SLURM_NTASKS > 1 tasks, so main.py calls
#   jax.distributed.initialize() without arguments and JAX reads SLURM_JOB_ID,
#   SLURM_STEP_NODELIST, SLURM_NTASKS, SLURM_PROCID and SLURM_LOCALID: coordinator on the
#   first node, process id = rank, local device = GPU number SLURM_LOCALID. Every task
#   therefore has to see all GPUs of its node: the tasks are not bound to GPUs.
# * --per-node: JAX's SLURM detection would give each process only GPU SLURM_LOCALID (=0),
#   so this script passes the launch explicitly instead: JAX_COORDINATOR_ADDRESS (first
#   node of the job), JAX_NUM_PROCESSES (nodes), JAX_PROCESS_ID (SLURM_PROCID, read in
#   each task) and JAX_LOCAL_DEVICE_IDS=0..N-1 (all of the node's GPUs).
# Environment of each process: see gpu_env_words in launch/lib.sh (XLA latency-hiding
# scheduler, XLA_PYTHON_CLIENT_MEM_FRACTION=0.90, NCCL_DEBUG=WARN). srun passes the
# caller's environment on, so cluster NCCL settings (NCCL_SOCKET_IFNAME=<nic>,
# NCCL_IB_HCA=<hcas>, ...) exported before sbatch reach every task.
# --kill-on-bad-exit: when one process dies the others are stopped instead of waiting
# in a collective forever. SIGTERM (preemption, --signal in the sbatch script) reaches
# every task; main.py then saves a checkpoint and exits, and a requeued job resumes.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=launch/lib.sh
source "$REPO/launch/lib.sh"

usage() {
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'
}

# first_host NODELIST: the first host of a SLURM node list, as JAX derives it
# ("gpu[003-006],x" -> gpu003; "a,b" -> a).
first_host() {
  local list="$1" prefix rest
  prefix="${list%%[\[,]*}"
  if [[ "${list:${#prefix}:1}" == "[" ]]; then
    rest="${list:$((${#prefix} + 1))}"
    printf '%s\n' "${prefix}${rest%%[,-]*}"
  else
    printf '%s\n' "$prefix"
  fi
}

MODE="per-node"
GPUS_PER_NODE="${SLURM_GPUS_ON_NODE:-8}"
LOG_DIR=""
PORT=""
PYTHON_BIN=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --per-node) MODE="per-node" ;;
    --per-gpu) MODE="per-gpu" ;;
    --gpus-per-node=*) GPUS_PER_NODE="${1#*=}" ;;
    --log-dir=*) LOG_DIR="${1#*=}" ;;
    --port=*) PORT="${1#*=}" ;;
    --python=*) PYTHON_BIN="${1#*=}" ;;
    --dry-run) DRY_RUN=1 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; break ;;
    *) die "unknown option '$1' (main.py flags go after '--'; see --help)" ;;
  esac
  shift
done
[[ $# -gt 0 ]] || die "no main.py flags given (expected: -- --config=... --workdir=...)"
[[ "$GPUS_PER_NODE" =~ ^[1-9][0-9]*$ ]] || die "--gpus-per-node must be a positive integer"
if [[ -z "${SLURM_JOB_ID:-}" && "$DRY_RUN" != 1 ]]; then
  die "not inside a SLURM allocation (no SLURM_JOB_ID): submit launch/slurm_multinode.sbatch, or salloc first"
fi
PYTHON_BIN="${PYTHON_BIN:-$(python_bin "$REPO")}"

JOB_ID="${SLURM_JOB_ID:-0}"
NODES="${SLURM_JOB_NUM_NODES:-${SLURM_NNODES:-1}}"
NODELIST="${SLURM_JOB_NODELIST:-localhost}"
LOG_DIR="${LOG_DIR:-logs/${SLURM_JOB_NAME:-sfd}-${JOB_ID}}"
PORT="${PORT:-$((61440 + JOB_ID % 4096))}"

mapfile -t ENV_WORDS < <(gpu_env_words)
SRUN=(srun --nodes="$NODES" --kill-on-bad-exit=1 --output="$LOG_DIR/task-%t.log")
if [[ "$MODE" == "per-gpu" ]]; then
  SRUN+=(--ntasks-per-node="$GPUS_PER_NODE" --ntasks="$((NODES * GPUS_PER_NODE))")
  TASK=(env "${ENV_WORDS[@]}" "$PYTHON_BIN" "$REPO/main.py" "$@")
else
  SRUN+=(--ntasks-per-node=1 --ntasks="$NODES")
  DEVICES="$(seq -s, 0 $((GPUS_PER_NODE - 1)))"
  # JAX_PROCESS_ID differs per task: it is read from SLURM_PROCID inside each task.
  # shellcheck disable=SC2016  # (the single quotes are meant: expanded in the task)
  TASK=(bash -c 'JAX_PROCESS_ID="$SLURM_PROCID" exec "$@"' task
        env "${ENV_WORDS[@]}"
        "JAX_COORDINATOR_ADDRESS=$(first_host "$NODELIST"):$PORT"
        "JAX_NUM_PROCESSES=$NODES" "JAX_LOCAL_DEVICE_IDS=$DEVICES"
        "$PYTHON_BIN" "$REPO/main.py" "$@")
fi

run mkdir -p "$LOG_DIR"
run "${SRUN[@]}" "${TASK[@]}"
