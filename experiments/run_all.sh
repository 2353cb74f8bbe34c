#!/usr/bin/env bash
# Run the six Section 8 sweeps (CPU defaults), report each, and collect the claims tables and figures
# into experiments/results/ (no run data or checkpoints: those stay in $RUNS, which git ignores).
#
#   experiments/run_all.sh                 # full CPU suite, 2 parallel runs
#   JOBS=4 experiments/run_all.sh          # more parallel runs
#   SMOKE=1 experiments/run_all.sh         # shrunk sweeps (seconds), results into runs/sweeps-smoke/results
#   CONFIGS=experiments/gpu experiments/run_all.sh   # the larger GPU configs
#   SWEEP_ARGS="--backend ray --address HEAD:6379" RUNS=/shared/sweeps experiments/run_all.sh
#                                          # on a Ray cluster (RUNS on storage every node mounts)
set -euo pipefail
cd "$(dirname "$0")/.."
JOBS=${JOBS:-2}
CONFIGS=${CONFIGS:-experiments}
SMOKE_FLAG=()
if [[ -n "${SMOKE:-}" ]]; then
  SMOKE_FLAG=(--smoke)
  RUNS=${RUNS:-runs/sweeps-smoke}
  RESULTS=${RESULTS:-$RUNS/results}
else
  RUNS=${RUNS:-runs/sweeps}
  RESULTS=${RESULTS:-experiments/results}
fi
LIPVERIFY=${LIPVERIFY:-lipverify}
read -ra EXTRA_ARGS <<< "${SWEEP_ARGS:-}"
start=$(date +%s)
dirs=()
for claim in init near_convergence noisy_gradient label_noise batch_size trajectories; do
  config="$CONFIGS/sweep_$claim.toml"
  [[ -f "$config" ]] || { echo "missing $config" >&2; exit 2; }
  out="$RUNS/$(basename "$CONFIGS")-$claim"
  # a failed run does not stop the suite: it is listed in the claims table
  $LIPVERIFY sweep "$config" --out "$out" --jobs "$JOBS" "${SMOKE_FLAG[@]}" "${EXTRA_ARGS[@]}" || echo "sweep $claim had failed runs" >&2
  $LIPVERIFY report "$out" > /dev/null
  dirs+=("$out")
done
wall=$(( $(date +%s) - start ))
cmd="JOBS=$JOBS CONFIGS=$CONFIGS${SMOKE:+ SMOKE=1}${SWEEP_ARGS:+ SWEEP_ARGS=\"$SWEEP_ARGS\"} experiments/run_all.sh"
${PYTHON:-python} - "$RESULTS" "$cmd" "$wall" "${dirs[@]}" <<'PY'
import sys
from lipverify.claims import collect_results
results, cmd, wall, *dirs = sys.argv[1:]
note = f"  (wall time of this invocation {int(wall) // 60} min {int(wall) % 60} s; complete runs are skipped)"
dest = collect_results(dirs, results, command=cmd + note)
print(f"claims table: {dest / 'claims.md'}")
PY
