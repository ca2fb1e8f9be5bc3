# shellcheck shell=bash
# Helpers shared by the launch scripts (sourced, never run on its own).
#
# Every script accepts --dry-run: commands then go through `run`, which prints them
# (one line each, quoted so that the line can be pasted into a shell) instead of
# running them. Nothing else in the scripts has side effects.

DRY_RUN=0

die() {
  echo "error: $*" >&2
  exit 2
}

# quote ARG: ARG as a shell word ('...' only where needed).
quote() {
  if [[ "$1" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

# quote_cmd ARGS...: the command line, each argument quoted.
quote_cmd() {
  local out="" arg
  for arg in "$@"; do
    out+="$(quote "$arg") "
  done
  printf '%s\n' "${out% }"
}

# run CMD ARGS...: run it, or print it under --dry-run.
run() {
  if [[ "$DRY_RUN" == 1 ]]; then
    quote_cmd "$@"
  else
    "$@"
  fi
}

# run_shell 'PIPELINE': a shell pipeline through bash -c, or print it under --dry-run.
run_shell() {
  if [[ "$DRY_RUN" == 1 ]]; then
    printf '%s\n' "$1"
  else
    bash -o pipefail -c "$1"
  fi
}

# python_bin REPO: the repository's virtual environment if it exists, else python3.
python_bin() {
  if [[ -x "$1/.venv/bin/python" ]]; then
    printf '%s\n' "$1/.venv/bin/python"
  else
    printf '%s\n' "${PYTHON:-python3}"
  fi
}

# GPU environment of one training process, as NAME=VALUE words (for `env`):
#   XLA_FLAGS  --xla_gpu_enable_latency_hiding_scheduler=true lets XLA's scheduler overlap
#              the FSDP all-gathers / reduce-scatters (NCCL) with compute. The caller's
#              XLA_FLAGS come after ours, so they win where they repeat a flag.
#   XLA_PYTHON_CLIENT_MEM_FRACTION  share of GPU memory JAX preallocates (its default is
#              0.75; the training process is alone on its GPUs, so take 0.9).
#   NCCL_DEBUG  WARN: NCCL reports problems only (INFO prints the rings/trees it builds:
#              the first thing to look at when a multi-node job hangs or is slow).
#   TF_CPP_MIN_LOG_LEVEL  TensorFlow (imported by clu for summaries, CPU-only) stays quiet.
#   PYTHONUNBUFFERED  log lines reach the log files immediately.
# Cluster-specific NCCL settings (NCCL_SOCKET_IFNAME, NCCL_IB_HCA, ...) are not set
# here: export them before launching and they are passed on.
gpu_env_words() {
  local xla="--xla_gpu_enable_latency_hiding_scheduler=true"
  printf '%s\n' "XLA_FLAGS=${xla}${XLA_FLAGS:+ $XLA_FLAGS}" \
    "XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.90}" \
    "NCCL_DEBUG=${NCCL_DEBUG:-WARN}" \
    "TF_CPP_MIN_LOG_LEVEL=${TF_CPP_MIN_LOG_LEVEL:-2}" \
    "PYTHONUNBUFFERED=1"
}
