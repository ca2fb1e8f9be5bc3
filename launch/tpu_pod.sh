#!/usr/bin/env bash
# Train on a Cloud TPU VM pod slice: the same main.py command on every TPU VM worker,
# started together through `gcloud compute tpus tpu-vm ssh --worker=all`.
#
# Usage (from the repository root):
#   launch/tpu_pod.sh --tpu=NAME [options] -- MAIN_PY_FLAGS...
#
#   # first time: copy the code to every worker and build its virtual environment
#   launch/tpu_pod.sh --tpu=sfd-v5p-64 --zone=us-east5-a --sync --setup -- \
#       --config=configs/sfd_xl.py --workdir=/mnt/gcs/runs/sfd_xl
#   # later (code changed): --sync only; dry run first to see the gcloud commands
#   launch/tpu_pod.sh --tpu=sfd-v5p-64 --zone=us-east5-a --sync --dry-run -- ...
#
# Options:
#   --tpu=NAME        TPU VM (pod slice) name (default $TPU_NAME)
#   --zone=ZONE       its zone (default $ZONE; else gcloud's compute/zone setting)
#   --project=ID      project (default $PROJECT; else gcloud's core/project setting)
#   --remote-dir=DIR  checkout on every worker, relative to the home directory
#                     (default sfd_jax)
#   --sync            copy this working tree (git-tracked and untracked, non-ignored
#                     files) to every worker first
#   --setup           create <remote-dir>/.venv on every worker (launch/install.sh): the
#                     runtime pinned set of its Python (requirements/pyXY.txt) plus
#                     jax[tpu] of the pinned jax version
#   --python=BIN      interpreter for --setup (default python3; Python 3.11-3.13, e.g.
#                     --python=python3.11 on older TPU VM images)
#   --run-name=NAME   log directory <remote-dir>/logs/NAME (default: a UTC timestamp)
#   --foreground      stay attached and stream the output until training ends (default:
#                     start detached under nohup, so a dropped connection does not stop it)
#   --dry-run         print the commands, run nothing
#   -h, --help        this text
#
# Multi-host start-up: TPU VM workers have TPU_WORKER_HOSTNAMES set, so main.py calls
# jax.distributed.initialize() without arguments and JAX finds the coordinator and its
# own process index from the TPU metadata (sfd_jax/parallel/distributed.py). Every worker runs the
# same command with the same flags; each feeds its share of every global batch.
# Logs: each worker writes <remote-dir>/logs/<run-name>/<hostname>.log on its own disk
# (hostnames end in -w-<worker index>); to look at them:
#   gcloud compute tpus tpu-vm ssh NAME --zone=ZONE --worker=all \
#       --command='tail -n 3 sfd_jax/logs/RUN/*.log'
# --workdir (and config.data.path) must name the same storage on every worker: mount a
# bucket (gcsfuse) or a Filestore share at the same path on all of them. A URL workdir
# (gs://...) is refused here before anything runs, as main.py refuses it.
#
# Environment of the training processes:
#   LIBTPU_INIT_ARGS   XLA:TPU flags that let the FSDP all-gathers and reduce-scatters run
#                      asynchronously and overlap with compute (async collective fusion,
#                      "multiple steps" = prefetch the next layer's gather, overlap on the
#                      tensor cores), plus the data-parallel all-reduce optimisation. Set
#                      LIBTPU_INIT_ARGS here to replace them.
#   JAX_COMPILATION_CACHE_DIR  passed on when set here (e.g. gs://BUCKET/jax_cache, which
#                      JAX writes directly): a
#                      restarted job (preemption, maintenance) then skips compilation.
#   TF_CPP_MIN_LOG_LEVEL=2  TensorFlow (if the tf extra is installed) stays quiet.
#   PYTHONUNBUFFERED=1      log lines reach the log file immediately.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=launch/lib.sh
source "$REPO/launch/lib.sh"

usage() {
  sed -n '2,/^set -euo/p' "${BASH_SOURCE[0]}" | sed '$d' | sed 's/^# \{0,1\}//'
}

DEFAULT_LIBTPU_INIT_ARGS="--xla_tpu_enable_async_collective_fusion=true"
DEFAULT_LIBTPU_INIT_ARGS+=" --xla_tpu_enable_async_collective_fusion_fuse_all_gather=true"
DEFAULT_LIBTPU_INIT_ARGS+=" --xla_tpu_enable_async_collective_fusion_multiple_steps=true"
DEFAULT_LIBTPU_INIT_ARGS+=" --xla_tpu_overlap_compute_collective_tc=true"
DEFAULT_LIBTPU_INIT_ARGS+=" --xla_enable_async_all_gather=true"
DEFAULT_LIBTPU_INIT_ARGS+=" --xla_tpu_enable_data_parallel_all_reduce_opt=true"
DEFAULT_LIBTPU_INIT_ARGS+=" --xla_tpu_data_parallel_opt_different_sized_ops=true"

TPU="${TPU_NAME:-}"
ZONE_ARG="${ZONE:-}"
PROJECT_ARG="${PROJECT:-}"
REMOTE_DIR="sfd_jax"
SYNC=0
SETUP=0
SETUP_PYTHON="python3"
RUN_NAME=""
FOREGROUND=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --tpu=*) TPU="${1#*=}" ;;
    --zone=*) ZONE_ARG="${1#*=}" ;;
    --project=*) PROJECT_ARG="${1#*=}" ;;
    --remote-dir=*) REMOTE_DIR="${1#*=}" ;;
    --sync) SYNC=1 ;;
    --setup) SETUP=1 ;;
    --python=*) SETUP_PYTHON="${1#*=}" ;;
    --run-name=*) RUN_NAME="${1#*=}" ;;
    --foreground) FOREGROUND=1 ;;
    --dry-run) DRY_RUN=1 ;;
    -h | --help) usage; exit 0 ;;
    --) shift; break ;;
    *) die "unknown option '$1' (main.py flags go after '--'; see --help)" ;;
  esac
  shift
done
[[ -n "$TPU" ]] || die "no TPU name: pass --tpu=NAME or set TPU_NAME"
[[ $# -gt 0 ]] || die "no main.py flags given (expected: -- --config=... --workdir=...)"
prev=""
for arg in "$@"; do
  workdir=""
  case "$arg" in --workdir=*) workdir="${arg#*=}" ;; esac
  [[ "$prev" == --workdir ]] && workdir="$arg"
  if [[ "$workdir" == *://* ]]; then
    die "--workdir=$workdir: a URL is not accepted as a workdir; mount the bucket (gcsfuse) at the same path on every worker and give that path, e.g. --workdir=/mnt/gcs/runs/NAME"
  fi
  prev="$arg"
done
[[ "$REMOTE_DIR" =~ ^[A-Za-z0-9_./-]+$ ]] || die "--remote-dir: use letters, digits, _ . / - only"
RUN_NAME="${RUN_NAME:-$(date -u +%Y%m%d-%H%M%S)}"
[[ "$RUN_NAME" =~ ^[A-Za-z0-9_.+-]+$ ]] || die "--run-name: use letters, digits, _ . + - only"
if [[ "$DRY_RUN" != 1 ]] && ! command -v gcloud > /dev/null; then
  die "gcloud not found (install the Google Cloud CLI, or use --dry-run)"
fi

GCLOUD_OPTS=()
[[ -n "$ZONE_ARG" ]] && GCLOUD_OPTS+=("--zone=$ZONE_ARG")
[[ -n "$PROJECT_ARG" ]] && GCLOUD_OPTS+=("--project=$PROJECT_ARG")

# on_all_workers 'COMMAND': run a shell command on every worker of the slice.
on_all_workers() {
  run gcloud compute tpus tpu-vm ssh "$TPU" "${GCLOUD_OPTS[@]}" --worker=all --command="$1"
}

# 1. Code: an archive of the working tree, unpacked on every worker.
if [[ "$SYNC" == 1 ]]; then
  ARCHIVE="${TMPDIR:-/tmp}/sfd_jax-$RUN_NAME.tar.gz"
  REMOTE_ARCHIVE="sfd_jax-$RUN_NAME.tar.gz"    # in the workers' home directories
  run_shell "git -C $(quote "$REPO") ls-files -z --cached --others --exclude-standard | tar -C $(quote "$REPO") --null -T - -czf $(quote "$ARCHIVE")"
  run gcloud compute tpus tpu-vm scp "$ARCHIVE" "$TPU:$REMOTE_ARCHIVE" "${GCLOUD_OPTS[@]}" --worker=all
  on_all_workers "mkdir -p ~/$REMOTE_DIR && tar -xzf ~/$REMOTE_ARCHIVE -C ~/$REMOTE_DIR && rm -f ~/$REMOTE_ARCHIVE"
  run rm -f "$ARCHIVE"
fi

# 2. Environment: the runtime pinned set of the workers' Python plus jax[tpu] of its jax.
if [[ "$SETUP" == 1 ]]; then
  on_all_workers "cd ~/$REMOTE_DIR && bash launch/install.sh $(quote "--python=$SETUP_PYTHON") --accelerator=tpu"
fi

# 3. Training: the same command on every worker, one log per worker.
ENV_WORDS=("LIBTPU_INIT_ARGS=${LIBTPU_INIT_ARGS:-$DEFAULT_LIBTPU_INIT_ARGS}"
           "TF_CPP_MIN_LOG_LEVEL=2" "PYTHONUNBUFFERED=1")
if [[ -n "${JAX_COMPILATION_CACHE_DIR:-}" ]]; then
  ENV_WORDS+=("JAX_COMPILATION_CACHE_DIR=$JAX_COMPILATION_CACHE_DIR")
fi
TRAIN="$(quote_cmd env "${ENV_WORDS[@]}" .venv/bin/python main.py "$@")"
LOG="logs/$RUN_NAME/\$(hostname).log"
if [[ "$FOREGROUND" == 1 ]]; then
  on_all_workers "cd ~/$REMOTE_DIR && mkdir -p logs/$RUN_NAME && set -o pipefail && $TRAIN 2>&1 | tee $LOG"
else
  on_all_workers "cd ~/$REMOTE_DIR && mkdir -p logs/$RUN_NAME && (nohup $TRAIN > $LOG 2>&1 < /dev/null &) && echo \"started on \$(hostname): ~/$REMOTE_DIR/$LOG\""
fi
