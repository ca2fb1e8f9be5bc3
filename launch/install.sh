#!/usr/bin/env bash
# Build a virtual environment for running sfd_jax (not for testing it): the runtime pinned
# set of the interpreter's Python version (requirements/pyXY.txt: no TensorFlow, no test
# tools), the JAX plugin of an accelerator at the pinned jax version, and the project.
# tpu_pod.sh --setup runs it on every TPU VM worker.
#
# Usage (from the repository root):
#   launch/install.sh [--python=python3] [--accelerator=cpu|tpu|cuda12|cuda13]
#                     [--venv=.venv] [--dry-run]
#
#   --python=BIN       interpreter (default python3): Python 3.11, 3.12 or 3.13
#   --accelerator=KIND jax extra to add (default cpu: none), pinned to the set's jax
#   --venv=DIR         virtual environment to create or update (default .venv)
#   --dry-run          print the commands, run nothing
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=launch/lib.sh
source "$REPO/launch/lib.sh"

PY=python3 ACCEL=cpu VENV=.venv
for arg in "$@"; do
  case "$arg" in
    --python=*) PY="${arg#*=}" ;;
    --accelerator=*) ACCEL="${arg#*=}" ;;
    --venv=*) VENV="${arg#*=}" ;;
    --dry-run) DRY_RUN=1 ;;
    -h|--help) sed -n '2,14p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    --) break ;;
    *) die "unknown option '$arg' (see --help)" ;;
  esac
done
case "$ACCEL" in cpu|tpu|cuda12|cuda13) ;; *) die "--accelerator=$ACCEL: expected cpu, tpu, cuda12 or cuda13" ;; esac

VER="$("$PY" -c 'import sys; print("%d%d" % sys.version_info[:2])' 2>/dev/null)" ||
  die "--python=$PY does not run"
LOCK="requirements/py$VER.txt"
[[ -f "$REPO/$LOCK" ]] || die "no pinned set $LOCK for Python ${VER:0:1}.${VER:1} ($PY): sfd_jax supports Python 3.11-3.13 (--python=python3.12, ...)"
JAX_VERSION="$(sed -n 's/^jax==\([^ ;#]*\).*/\1/p' "$REPO/$LOCK")"
[[ -n "$JAX_VERSION" ]] || die "no 'jax==' pin in $LOCK"

cd "$REPO"
run "$PY" -m venv "$VENV"
run "$VENV/bin/python" -m pip install -q --upgrade pip
if [[ "$ACCEL" == cpu ]]; then
  run "$VENV/bin/python" -m pip install -q -r "$LOCK"
else
  run "$VENV/bin/python" -m pip install -q -r "$LOCK" "jax[$ACCEL]==$JAX_VERSION"
fi
run "$VENV/bin/python" -m pip install -q -e . --no-deps
