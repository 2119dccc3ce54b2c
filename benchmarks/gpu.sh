#!/usr/bin/env bash
# The throughput suite on a fresh NVIDIA GPU machine: a venv with the CUDA builds of JAX and
# TensorFlow, then benchmarks/throughput.py at the study's size (batch 32, 256 px, float32).
#
#   bash benchmarks/gpu.sh [OUT_DIR]        (or OUT=DIR bash benchmarks/gpu.sh)
#
# Needs Python >= 3.12 (with its venv module), PyPI, and an NVIDIA driver. Everything lands in
# OUT_DIR (default benchmarks/results/gpu): throughput-gpu.json and .md, pip.log, devices.txt,
# nvidia-smi.txt. The whole script keeps within BUDGET_S seconds (default 480, installs
# included): the suite gets what the installs left, and the configurations it could not start
# in time are listed as skipped in the table. DRY_RUN=1 prints the commands without running them.
set -euo pipefail

BUDGET_S=${BUDGET_S:-480}
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
OUT_DIR=$(realpath -m "${1:-${OUT:-$REPO/benchmarks/results/gpu}}")
VENV=${VENV:-$REPO/benchmarks/.venv-gpu}
DRY_RUN=${DRY_RUN:-0}
# The suite's own sizes (the study's 256 px, batch 32; configuration 7 at the recipe's 64 px):
# GPU steps take milliseconds, so many timed steps cost little next to the compiles, which
# dominate the budget.
SUITE_ARGS=(--steps 20 --warmup 3)

run() {
  echo "+ $*"
  if [ "$DRY_RUN" != 1 ]; then "$@"; fi
}

# First Python >= 3.12 among pyenv's 3.12, python3.12 on PATH, and python3.
find_python() {
  local candidate
  for candidate in "$(pyenv which python3.12 2>/dev/null || true)" \
                   "$(command -v python3.12 || true)" "$(command -v python3 || true)"; do
    if [ -n "$candidate" ] && [ -x "$candidate" ] &&
       "$candidate" -c 'import sys; sys.exit(sys.version_info < (3, 12))' 2>/dev/null; then
      echo "$candidate"
      return 0
    fi
  done
  return 1
}

# pneumojax's pinned dependencies plus its cuda12 extra, with TensorFlow's GPU build in place of
# tensorflow-cpu (which cannot use the GPU; the two builds in one venv overwrite each other's
# files, so only one is installed).
gpu_requirements() {
  "$1" - "$REPO/pyproject.toml" <<'EOF'
import sys
import tomllib

project = tomllib.load(open(sys.argv[1], "rb"))["project"]
for dep in project["dependencies"] + project["optional-dependencies"]["cuda12"]:
    if dep.startswith("tensorflow-cpu"):
        dep = "tensorflow[and-cuda]" + dep[len("tensorflow-cpu"):]
    print(dep)
EOF
}

mkdir -p "$OUT_DIR"
PY=$(find_python) || {
  echo "error: needs Python >= 3.12; found none (tried 'pyenv which python3.12', python3.12," \
       "python3). Install it, e.g. 'pyenv install 3.12' or 'apt-get install python3.12" \
       "python3.12-venv', then run this again." >&2
  exit 1
}
echo "python: $PY ($("$PY" --version 2>&1)); output: $OUT_DIR; budget ${BUDGET_S} s"
command -v nvidia-smi >/dev/null && nvidia-smi > "$OUT_DIR/nvidia-smi.txt" 2>&1 || true

if [ ! -x "$VENV/bin/python" ]; then
  run "$PY" -m venv "$VENV" || {
    echo "error: '$PY -m venv' failed; on Debian/Ubuntu install python3.12-venv" >&2
    exit 1
  }
fi
mapfile -t REQUIREMENTS < <(gpu_requirements "$PY")
export PIP_DISABLE_PIP_VERSION_CHECK=1
run "$VENV/bin/python" -m pip install --no-cache-dir --progress-bar off "${REQUIREMENTS[@]}" \
  > "$OUT_DIR/pip.log" 2>&1 || { tail -30 "$OUT_DIR/pip.log" >&2; exit 1; }
run "$VENV/bin/python" -m pip install --no-cache-dir --no-deps -e "$REPO" >> "$OUT_DIR/pip.log" 2>&1
echo "installed in ${SECONDS} s (log: $OUT_DIR/pip.log)"

# Both frameworks must see the GPU, or the comparison is GPU against CPU.
run "$VENV/bin/python" - > "$OUT_DIR/devices.txt" 2>&1 <<'EOF' || true
import os
os.environ["TF_CPP_MIN_LOG_LEVEL"] = "2"
os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
import jax
print("jax devices:", jax.devices())
print("jax_gpus=%d" % sum(d.platform == "gpu" for d in jax.devices()))
import tensorflow as tf
print("tensorflow_gpus=%d" % len(tf.config.list_physical_devices("GPU")))
EOF
cat "$OUT_DIR/devices.txt" 2>/dev/null || true
for framework in jax tensorflow; do
  if [ "$DRY_RUN" != 1 ] && ! grep -q "^${framework}_gpus=[1-9]" "$OUT_DIR/devices.txt"; then
    echo "warning: $framework sees no GPU: its side of the suite runs on the CPU" >&2
  fi
done

LEFT=$((BUDGET_S - SECONDS - 15))   # 15 s to write the table after the last worker
if [ "$LEFT" -lt 60 ]; then
  echo "warning: only ${LEFT} s left of the ${BUDGET_S} s budget after installing" >&2
  LEFT=60
fi
echo "throughput suite: ${LEFT} s budget"
run "$VENV/bin/python" "$REPO/benchmarks/throughput.py" "${SUITE_ARGS[@]}" \
  --time-budget "$LEFT" --out "$OUT_DIR/throughput-gpu.json" || status=$?
echo "done in ${SECONDS} s: $OUT_DIR/throughput-gpu.json and .md"
exit "${status:-0}"
