#!/usr/bin/env bash
# Train on one GPU host: a single main.py process that drives all local GPUs.
#
# Usage (relative paths in the flags are relative to the current directory, as for
# `python main.py`; the repository root is the natural place to call it from):
#   launch/gpu_single_host.sh [options] -- MAIN_PY_FLAGS...
#
#   launch/gpu_single_host.sh -- --config=configs/sfd_xl.py --workdir=runs/sfd_xl
#   launch/gpu_single_host.sh --gpus=0,1,2,3 --log=runs/b/train.log -- \
#       --config=configs/sfd_b.py --workdir=runs/b --config.batch_size=128
#
# Options:
#   --gpus=LIST   CUDA_VISIBLE_DEVICES for the process (default: every GPU of the host)
#   --log=FILE    also write the output to FILE (default: the terminal only)
#   --python=BIN  interpreter (default: .venv/bin/python of the repository, else python3)
#   --dry-run     print the command, run nothing
#   -h, --help    this text
#
# One process sees all GPUs as local devices, so no jax.distributed set-up is involved:
# the mesh (config.mesh, FSDP over all devices by default) spans the GPUs and XLA talks
# to them through NCCL. The launch variables of multi-process runs (JAX_COORDINATOR_ADDRESS,
# SLURM_NTASKS) are removed from the process's environment so that a call from inside a
# SLURM allocation cannot make main.py wait for peers that never start.
# Environment (see gpu_env_words in launch/lib.sh for each variable): XLA_FLAGS with the
# latency-hiding scheduler, XLA_PYTHON_CLIENT_MEM_FRACTION=0.90, NCCL_DEBUG=WARN; values
# already set in the caller's environment are kept (XLA_FLAGS: appended).
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=launch/lib.sh
source "$REPO/launch/lib.sh"

usage() {
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'
}

GPUS=""
LOG=""
PYTHON_BIN=""
while [[ $# -gt 0 ]]; do
  case "$1" in
    --gpus=*) GPUS="${1#*=}" ;;
    --log=*) LOG="${1#*=}" ;;
    --python=*) PYTHON_BIN="${1#*=}" ;;
    --dry-run) DRY_RUN=1 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; break ;;
    *) die "unknown option '$1' (main.py flags go after '--'; see --help)" ;;
  esac
  shift
done
[[ $# -gt 0 ]] || die "no main.py flags given (expected: -- --config=... --workdir=...)"
PYTHON_BIN="${PYTHON_BIN:-$(python_bin "$REPO")}"

mapfile -t ENV_WORDS < <(gpu_env_words)
if [[ -n "$GPUS" ]]; then
  ENV_WORDS+=("CUDA_VISIBLE_DEVICES=$GPUS")
fi
CMD=(env -u JAX_COORDINATOR_ADDRESS -u SLURM_NTASKS "${ENV_WORDS[@]}"
     "$PYTHON_BIN" "$REPO/main.py" "$@")

if [[ -n "$LOG" ]]; then
  run mkdir -p "$(dirname "$LOG")"
  run_shell "$(quote_cmd "${CMD[@]}") 2>&1 | tee -a $(quote "$LOG")"
else
  run "${CMD[@]}"
fi
