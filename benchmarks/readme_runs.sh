#!/usr/bin/env bash
# Re-makes the measured training runs of docs/training.md and writes what they printed, with the machine,
# the date and the load, to benchmarks/results/:
#   readme-mini-cpu.md       the "Measured: chest_xray_mini" run (DenseNet121, random init, 128 px)
#   methods-train224-cpu.md  the five --balance methods on chest_xray_train224, and `compare`
# Usage: bash benchmarks/readme_runs.sh [SHARED_DATA_DIR]  (default ../shared/data)
set -euo pipefail
cd "$(dirname "$0")/.."
data=${1:-../shared/data}
bin=.venv/bin/pneumojax
out=benchmarks/results
runs=$(mktemp -d)
export PNEUMOJAX_CACHE=$runs/cache  # a fresh cache: first-run costs are part of what is shown

header() {
  echo "# $1"
  echo
  echo "Made by \`bash benchmarks/readme_runs.sh\` on $(date -u +%Y-%m-%d), $(git rev-parse --short HEAD)."
  echo "Machine: $(nproc) cores, $(lscpu | sed -n 's/^Model name: *//p'), no GPU; jax $(.venv/bin/python -c 'import jax; print(jax.__version__)')."
  echo "Load average before: $(cut -d' ' -f1-3 /proc/loadavg)."
  echo
}

run_logged() {  # the command, then what it printed and its wall time
  echo '```console'
  echo "\$ $*" | sed "s|$runs|RUNS|g"
  local t0=$SECONDS
  "$@" 2>&1 | sed "s|$runs|RUNS|g"
  echo '```'
  echo
  echo "Wall time: $((SECONDS - t0)) s (load average after: $(cut -d' ' -f1-3 /proc/loadavg))."
  echo
}

{
  header "chest_xray_mini, DenseNet121 from random init, 128 px, 3 epochs"
  echo "First run (decodes the images and runs the frozen backbone once):"
  echo
  run_logged $bin train --data "$data/chest_xray_mini" --backbone densenet121 --weights none \
      --image-size 128 --epochs 3 --out "$runs/mini"
  echo "Second run, same command with --overwrite (decoded images and activations cached):"
  echo
  run_logged $bin train --data "$data/chest_xray_mini" --backbone densenet121 --weights none \
      --image-size 128 --epochs 3 --out "$runs/mini" --overwrite
  echo "Re-scored from the run folder:"
  echo
  run_logged $bin evaluate --run "$runs/mini" --split test
} > $out/readme-mini-cpu.md
mkdir -p docs/mini
cp "$runs"/mini/plots/{history,confusion_matrix,roc}.png docs/mini/

{
  header "The five --balance methods on chest_xray_train224 (DenseNet121, random init, 128 px)"
  for m in none class-weight undersample oversample ensemble; do
    run_logged $bin train --data "$data/chest_xray_train224" --backbone densenet121 \
        --weights none --image-size 128 --balance $m --out "$runs/t224-$m"
  done
  run_logged $bin compare "$runs"/t224-{none,class-weight,undersample,oversample,ensemble} \
      --out "$runs/comparison.png"
} > $out/methods-train224-cpu.md
mkdir -p docs/t224
cp "$runs/comparison.png" docs/t224/comparison.png
rm -rf "$runs"
echo "wrote $out/readme-mini-cpu.md $out/methods-train224-cpu.md"
