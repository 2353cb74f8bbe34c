#!/usr/bin/env bash
# One prepared GPU check of the probe's device route (issue 15), under 8 minutes on one GPU:
#   1. the Python environment: the lent GPU machine (/work/.library/device/KINDS.md) has no network
#      and its own torch (2.11.0+cu130 on Python 3.12 when last read), numpy, scipy, sympy,
#      matplotlib, tqdm, threadpoolctl, filelock, pytest and hypothesis. When all of them import
#      (pyproject.toml's dependencies and torch floor, pytest, hypothesis: benchmarks/device_env.py
#      decides), nothing is installed and this tree runs from PYTHONPATH; else wheels carried in
#      .whl/ are installed offline; else pip installs from the index (one try, short timeout),
#   2. the CUDA tests (tests/test_probe_cuda.py: set_sync_debug_mode("error") around the steady
#      state, CUDA against CPU's route, the CUDA-graph option captured and replayed, the side
#      stream) and the CPU proofs (tests/test_probe_sync.py, tests/test_probe_graphs.py,
#      tests/test_probe_streams.py),
#   3. bench_probe on CUDA: the ConvNet at b = 256 and the MLP at b = 128 (time, memory, ATen ops,
#      host syncs per step, plain against probe; the ConvNet also --interleaved),
# writing everything (log, junit XML, JSON; 6 files) into $OUT (default benchmarks/out).
#
#   bash benchmarks/device_check.sh            # from the repository root
#   PYTHON=/path/to/python OUT=/tmp/out bash benchmarks/device_check.sh
#   DRY_RUN=1 bash benchmarks/device_check.sh  # CPU: no install, every other step on CPU, tiny
#                                              # sizes, 5x the step limits
#
# Through the device tool (its $OUT comes back): command
#   PYTHONUNBUFFERED=1 bash benchmarks/device_check.sh   with timeout_s=540
# The step limits below add up to more than 8 minutes; each is a cap, and a step that reaches it is
# logged (rc=124) while the script goes on.
set -u
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/out}"
mkdir -p "$OUT"
LOG="$OUT/device_check.log"
: >"$LOG"
PY="${PYTHON:-$(command -v python3 || command -v python || echo python)}"
DEVICE=cuda
CONV_B=256
MLP_B=128
REPEATS=20
LIMIT_SCALE=1
if [ "${DRY_RUN:-0}" = 1 ]; then
  DEVICE=cpu
  CONV_B=16
  MLP_B=16
  REPEATS=2
  LIMIT_SCALE=5  # the step limits are sized for a 16-core GPU machine, not a busy 2-core CPU
fi
say() { echo "== $(date -u +%H:%M:%S) $*" | tee -a "$LOG"; }
run() {  # run a step with a time limit, log its output and exit status, never stop the script
  local limit=$(($1 * LIMIT_SCALE))
  shift
  timeout "$limit" "$@" >>"$LOG" 2>&1
  local rc=$?
  echo "   rc=$rc: $*" | tee -a "$LOG"
  return 0
}

say "environment"
run 30 nvidia-smi
run 60 "$PY" -c "import torch, sys; print(sys.version); print('torch', torch.__version__, 'cuda', torch.version.cuda, 'available', torch.cuda.is_available())"

say "environment check: what this tree needs at run time, without installing anything"
if "$PY" benchmarks/device_env.py >>"$LOG" 2>&1; then
  echo "   everything imports: no install, this tree from PYTHONPATH" | tee -a "$LOG"
elif [ "${DRY_RUN:-0}" = 1 ]; then
  echo "   dry run: no install (the environment is someone else's)" | tee -a "$LOG"
elif ls .whl/*.whl >/dev/null 2>&1; then
  # wheels carried to an offline machine (device README): installed beside, not into, its Python
  run 120 "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/lipverify-site .whl/*.whl
  export PYTHONPATH="/tmp/lipverify-site${PYTHONPATH:+:$PYTHONPATH}"
else
  # online machines only: one try with a short timeout, so that an offline one loses seconds, not minutes
  run 240 "$PY" -m pip install --retries 0 --timeout 15 -e ".[test]" -c constraints-cuda.txt
fi
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"  # this tree, whether or not the install worked
run 60 "$PY" -c "import lipverify.probe as p, torch; print('lipverify.probe from', p.__file__, 'torch', torch.__version__)"

say "tests (CUDA tests skip themselves without CUDA)"
run 200 "$PY" -m pytest -q -m "not slow" -p no:cacheprovider tests/test_probe_cuda.py tests/test_probe_sync.py tests/test_probe_graphs.py tests/test_probe_streams.py \
  tests/test_projections.py --junitxml "$OUT/probe_device_tests.xml" -rs

say "bench_probe: ConvNet b=$CONV_B on $DEVICE"
run 150 "$PY" benchmarks/bench_probe.py --device "$DEVICE" --model convnet --batch-size "$CONV_B" \
  --no-reference --variants probe,probe-graphs,probe-side,probe-f32,probe-gram --repeats "$REPEATS" --warmup 5 \
  --json "$OUT/bench_convnet_b${CONV_B}.json"
say "bench_probe --interleaved: ConvNet b=$CONV_B on $DEVICE (conv projections: shifted against grouped conv)"
run 90 "$PY" benchmarks/bench_probe.py --device "$DEVICE" --model convnet --batch-size "$CONV_B" --interleaved \
  --no-reference --variants probe,probe-conv,probe-side --repeats "$REPEATS" --warmup 5 \
  --json "$OUT/bench_convnet_b${CONV_B}_interleaved.json"
say "bench_probe: MLP b=$MLP_B on $DEVICE"
run 120 "$PY" benchmarks/bench_probe.py --device "$DEVICE" --model mlp --batch-size "$MLP_B" \
  --no-reference --variants probe,probe-graphs,probe-side,probe-f32 --repeats "$REPEATS" --warmup 5 \
  --json "$OUT/bench_mlp_b${MLP_B}.json"

say "summary"
grep -E "^(mlp|convnet) |rc=|passed|failed|skipped" "$LOG" | tee "$OUT/summary.txt"
say "done: $OUT"
