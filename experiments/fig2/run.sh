#!/usr/bin/env bash
# Fig. 2 validation: the eight ConvNet configurations, then the results table.
#   experiments/fig2/run.sh              # CPU, Fashion-MNIST (experiments/fig2/*.toml)
#   experiments/fig2/run.sh gpu          # CUDA, CIFAR-10/100 (experiments/gpu/fig2/*.toml)
#   SMOKE=1 experiments/fig2/run.sh      # 6 steps, 256 samples each: end-to-end check
# AutoAugment is skipped (with a note in the table) when torchvision is not installed.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
root=$(cd "$here/../.." && pwd)
py=${PYTHON:-python}
if [[ "${1:-}" == gpu ]]; then configs=("$root"/experiments/gpu/fig2/*.toml); out=${OUT:-runs/fig2-gpu}
else configs=("$here"/{plain,batch_norm,dropout,weight_decay,mixup,autoaugment,label_smoothing,fgsm,plain_small_lr}.toml); out=${OUT:-runs/fig2}
fi
mkdir -p "$out"
extra=()
if [[ -n "${SMOKE:-}" ]]; then extra=(steps=6 train_size=256 batch_size=32 full_gradient_every=3 sharpness_every=0); fi
for cfg in "${configs[@]}"; do
  name=$(basename "$cfg" .toml)
  if grep -q '^autoaugment = true' "$cfg" && ! "$py" -c 'import torchvision' 2>/dev/null; then
    echo "skip $name: torchvision is not installed (pip install lipverify[vision])"; continue
  fi
  "$py" -m lipverify.cli train --config "$cfg" --out "$out/$name" --no-progress "${extra[@]}" >"$out.$name.log" 2>&1 \
    || { echo "FAILED $name (see $out.$name.log)"; exit 1; }
  echo "done $name"
done
"$py" "$here/table.py" "$out" --out "${TABLE:-$out/table.md}"
