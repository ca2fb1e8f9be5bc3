#!/usr/bin/env bash
# The single-GPU run behind the GPU numbers in docs/benchmarks.md (one H100: < 10 min).
#
#   bash bench/gpu_suite.sh OUT_DIR [train] [sample] [data]     (default: all three)
#
# If a folder .whl/ with wheels exists (packages the machine lacks: grain, array-record,
# portpicker, ml-collections), they are installed into /tmp/site first. jax, flax and
# optax are the machine's own (the pinned flax 0.12.8 does not import with a newer jax).
# Each stage runs in its own process under a time limit and rewrites its report after
# every finished row, so a stage cut short still leaves results.
set -u
OUT_DIR=${1:?usage: bash bench/gpu_suite.sh OUT_DIR [train] [sample] [data]}
shift
STAGES=${*:-train sample data}
RES="$OUT_DIR/results"
mkdir -p "$RES"
export PYTHONUNBUFFERED=1
# Let XLA's allocator use most of the card (the default is 75%).
export XLA_PYTHON_CLIENT_MEM_FRACTION=${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.95}
PY=${PYTHON:-python3}
if compgen -G ".whl/*.whl" >/dev/null; then
  rm -rf /tmp/site   # a machine kept warm between calls still has the last call's packages
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv || true
"$PY" -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"

for stage in $STAGES; do
  case "$stage" in
    train)
      timeout 290 "$PY" -m bench.train_step --out "$RES" \
        --runs "B:none@256,XL:none@128/64,XL:dots_no_batch@256/128,XL:none:cudnn@128" ;;
    data)
      TRAIN_IPS=$("$PY" - "$RES" <<'EOF'
import glob, json, sys
best = [r.get("images_per_s") for f in glob.glob(sys.argv[1] + "/train_step_*.json")
        for r in json.load(open(f))["rows"] if r.get("variant") == "XL"]
best = [b for b in best if b]
print(f"{max(best):.1f}" if best else "")
EOF
)
      timeout 100 "$PY" -m bench.data_pipeline --out "$RES" --records 4096 --workers 0,8,16 \
        ${TRAIN_IPS:+--train-images-per-sec "$TRAIN_IPS"} ;;
    sample)
      timeout 190 "$PY" -m bench.sampling --out "$RES" --variant XL --guide-variant B \
        --batch 16 --runs euler:250:none,euler:250:autoguidance,dopri5::none \
        --warmup 1 --repeats 1 --max-steps 300 ;;
    *) echo "unknown stage $stage (train | data | sample)"; exit 2 ;;
  esac
  echo "stage $stage finished with status $?"
done
