#!/usr/bin/env bash
# The single-GPU benchmark suite (docs/benchmarks.md): every configuration within one time
# budget (default 530 s).
#
#   bash bench/gpu_suite.sh OUT_DIR [--dry-run] [--budget SECONDS] [--only NAME,NAME]
#
# Each configuration runs in its own process under its own deadline (min of its own
# limit and what is left of the suite's budget, default 530 s); a failed or timed-out
# run is recorded in OUT_DIR/results/suite_status.tsv (name, status, seconds, log) and
# the suite goes on. The first run (XL with cuDNN attention) dumps its optimized HLO to
# OUT_DIR/hlo/. Logs: OUT_DIR/logs/<name>.log; reports: OUT_DIR/results/*.{json,md}.
#
# Needs only the JAX stack (jax with CUDA, flax, optax and their dependencies): the
# benchmarks do not import grain, array-record or ml-collections. jax, flax and optax are
# the machine's own (the pinned flax may not import with a newer jax). Wheels in .whl/
# (if any) are installed into a fresh temporary directory first and put on PYTHONPATH.
#
# Optional last stage: the reference PyTorch train step side by side on the same GPU,
# when REFERENCE=/path/to/SFD-checkout is set (torch from the machine; TORCH_PYTHON).
set -u
OUT_DIR=${1:?usage: bash bench/gpu_suite.sh OUT_DIR [--dry-run] [--budget S] [--only A,B]}
shift
DRY=0
BUDGET=530
ONLY=""
while [ $# -gt 0 ]; do
  case "$1" in
    --dry-run) DRY=1 ;;
    --budget) BUDGET=$2; shift ;;
    --only) ONLY=$2; shift ;;
    *) echo "unknown argument $1"; exit 2 ;;
  esac
  shift
done
RES="$OUT_DIR/results"; LOGS="$OUT_DIR/logs"; HLO="$OUT_DIR/hlo"
mkdir -p "$RES" "$LOGS" "$HLO"
STATUS="$RES/suite_status.tsv"
printf 'name\tstatus\tseconds\tlog\n' > "$STATUS"
export PYTHONUNBUFFERED=1
# Let XLA's allocator use most of the card (the default is 75%).
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
PY=${PYTHON:-python3}
START=$(date +%s)

if [ "$DRY" = 0 ]; then
  if compgen -G ".whl/*.whl" >/dev/null; then
    SITE=$(mktemp -d)
    "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target "$SITE" .whl/*.whl || echo "wheel install failed; continuing without"
    export PYTHONPATH=$SITE
  fi
  nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
  "$PY" -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())" \
    2>&1 | tee "$LOGS/versions.log"
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"

# name | own limit (s) | command, in priority order (cuDNN XL first; its HLO is dumped;
# XLA attention next for the comparison; on sm80+ in bf16 "auto" is cuDNN). Runs that
# no longer fit the budget are recorded as skipped.
RUNS=(
  "train_xl_cudnn|150|-m bench.train_step --tag xl_cudnn --runs XL:none:cudnn@128/64"
  "train_xl_xla|110|-m bench.train_step --tag xl_xla --runs XL:none:xla@128/64"
  "sample_xl_bf16|130|-m bench.sampling --tag xl_bf16 --variant XL --guide-variant B --batch 16 --dtype bfloat16 --runs euler:250:cfg,euler:250:autoguidance,dopri5::none --warmup 1 --repeats 1 --max-steps 300"
  "train_xl_dots_no_batch|110|-m bench.train_step --tag xl_dnb --runs XL:dots_no_batch:auto@256/128"
  "train_xl_save_attn_out|100|-m bench.train_step --tag xl_sao --runs XL:save_attn_out:auto@256/128"
  "train_b|70|-m bench.train_step --tag b --runs B:none:auto@256"
  "sample_xl_f32|100|-m bench.sampling --tag xl_f32 --variant XL --guide-variant B --batch 16 --dtype float32 --runs euler:250:cfg,euler:250:autoguidance --warmup 1 --repeats 1"
)
if [ -n "${REFERENCE:-}" ]; then
  RUNS+=("reference_cuda|90|-m bench.reference_side_by_side --reference $REFERENCE --torch-python ${TORCH_PYTHON:-$PY} --device cuda --batch 64")
fi

first=1
for entry in "${RUNS[@]}"; do
  IFS='|' read -r name limit cmd <<<"$entry"
  if [ -n "$ONLY" ] && [[ ",$ONLY," != *",$name,"* ]]; then continue; fi
  left=$(( BUDGET - ($(date +%s) - START) ))
  t=$(( limit < left ? limit : left ))
  log="$LOGS/$name.log"
  if [ "$t" -lt 30 ]; then
    printf '%s\tskipped (budget: %ss left)\t0\t-\n' "$name" "$left" >> "$STATUS"
    continue
  fi
  flags="${XLA_FLAGS:-}"
  if [ "$first" = 1 ]; then
    flags="$flags --xla_dump_to=$HLO --xla_dump_hlo_as_text --xla_dump_hlo_module_re=.*step_fn.*"
    first=0
  fi
  if [ "$DRY" = 1 ]; then
    echo "[dry-run] timeout $t XLA_FLAGS='${flags# }' $PY $cmd --out $RES > $log"
    printf '%s\tdry-run\t0\t%s\n' "$name" "$log" >> "$STATUS"
    continue
  fi
  echo "=== $name (deadline ${t}s)"
  t0=$(date +%s)
  XLA_FLAGS="${flags# }" timeout -k 10 "$t" "$PY" $cmd --out "$RES" > "$log" 2>&1
  rc=$?
  dt=$(( $(date +%s) - t0 ))
  case $rc in
    0) st=ok ;;
    124|137) st="timeout after ${t}s" ;;
    *) st="error rc=$rc: $(grep -E 'Error|error' "$log" | tail -1 | cut -c1-200 | tr '\t' ' ')" ;;
  esac
  printf '%s\t%s\t%s\t%s\n' "$name" "$st" "$dt" "$log" >> "$STATUS"
  echo "=== $name: $st (${dt}s)"; tail -3 "$log"
done
# Keep only the optimized HLO of the first run (the dump also has every pass's input).
find "$HLO" -type f ! -name '*after_optimizations*' -delete 2>/dev/null || true
cat "$STATUS"
cat "$RES"/*.md 2>/dev/null | grep '^|' || true
