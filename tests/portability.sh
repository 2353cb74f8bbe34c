#!/usr/bin/env bash
# Run the default test suite under BLAS kernel / CPU capability / thread-count variants.
#
# What these variables change (measured on the 2-core Xeon with AVX-512 this was written on,
# torch 2.13 CPU wheel, numpy/scipy wheels):
# - torch's BLAS/LAPACK is MKL (torch.__config__.show(): BLAS_INFO=mkl, LAPACK_INFO=mkl); matmul,
#   torch.linalg.cholesky/eigh/svd go there. OPENBLAS_CORETYPE does not touch it.
# - numpy and scipy each load their own OpenBLAS (threadpoolctl.threadpool_info(): two
#   libscipy_openblas, architecture SkylakeX by default); lipverify._linalg routes syrk/potrf/trsm
#   through scipy. OPENBLAS_CORETYPE=Haswell/Sandybridge switches both (threadpoolctl reports it);
#   Prescott is reported as 'Katmai' (OpenBLAS's generic SSE kernels).
# - ATEN_CPU_CAPABILITY=default/avx2 changes torch's own vectorised kernels
#   (torch.backends.cpu.get_cpu_capability(): AVX512 -> DEFAULT / AVX2), not MKL's.
# - MKL picks its code path on its own: MKL_ENABLE_INSTRUCTIONS=AVX2 emulates an AVX2-only CPU
#   (this flipped whether Cholesky of the singular s1^2 I - W W^T failed, and made the old lr = 2
#   divergence test run to completion without diverging); it is an extra axis here (--mkl).
# - OMP_NUM_THREADS/MKL_NUM_THREADS/OPENBLAS_NUM_THREADS (set together) change reduction orders.
#
# Usage: tests/portability.sh [--quick] [--mkl] [--coretype LIST] [--aten LIST] [--threads LIST]
#                             [-- PYTEST ARGS...]
#   default   the full cross product: coretype {Haswell,Sandybridge,Prescott} x aten {default,avx2}
#             x threads {1,2} (12 runs)
#   --quick   a covering subset (3 runs; every value appears at least once)
#   --mkl     also cross with MKL_ENABLE_INSTRUCTIONS {unset, AVX2}
#   --coretype/--aten/--threads  comma-separated value lists for the cross product
#   -- ARGS   passed to pytest (e.g. -- tests/test_probe.py -k resolvent)
# Uses the python of the active environment (`python`, or $PYTHON). Prints one line per variant,
# then a table; exits 1 if any variant fails.
set -u

PYTHON=${PYTHON:-python}
coretypes="Haswell,Sandybridge,Prescott"
atens="default,avx2"
threads="1,2"
mkls="-"
quick=0
pytest_args=()
while [ $# -gt 0 ]; do
    case "$1" in
        --quick) quick=1 ;;
        --mkl) mkls="-,AVX2" ;;
        --coretype) coretypes="$2"; shift ;;
        --aten) atens="$2"; shift ;;
        --threads) threads="$2"; shift ;;
        --) shift; pytest_args=("$@"); break ;;
        -h|--help) sed -n '2,32p' "$0"; exit 0 ;;
        *) echo "portability.sh: unknown option '$1' (see --help)" >&2; exit 2 ;;
    esac
    shift
done

variants=()
if [ "$quick" = 1 ]; then
    variants=("Haswell default 1 -" "Sandybridge avx2 2 -" "Prescott default 2 -")
    [ "$mkls" != "-" ] && variants+=("Haswell avx2 1 AVX2")
else
    IFS=, read -r -a ct_list <<<"$coretypes"
    IFS=, read -r -a at_list <<<"$atens"
    IFS=, read -r -a th_list <<<"$threads"
    IFS=, read -r -a mk_list <<<"$mkls"
    for ct in "${ct_list[@]}"; do for at in "${at_list[@]}"; do for th in "${th_list[@]}"; do
        for mk in "${mk_list[@]}"; do variants+=("$ct $at $th $mk"); done
    done; done; done
fi

cd "$(dirname "$0")/.." || exit 2
table=()
any_failed=0
for v in "${variants[@]}"; do
    read -r ct at th mk <<<"$v"
    env_args=(OPENBLAS_CORETYPE="$ct" ATEN_CPU_CAPABILITY="$at"
              OMP_NUM_THREADS="$th" MKL_NUM_THREADS="$th" OPENBLAS_NUM_THREADS="$th")
    [ "$mk" != "-" ] && env_args+=(MKL_ENABLE_INSTRUCTIONS="$mk")
    name="coretype=$ct aten=$at threads=$th mkl=${mk/-/native}"
    start=$(date +%s)
    out=$(env "${env_args[@]}" "$PYTHON" -m pytest -q -p no:cacheprovider "${pytest_args[@]}" 2>&1)
    rc=$?
    secs=$(( $(date +%s) - start ))
    summary=$(printf '%s\n' "$out" | tail -n 1)
    passed=$(printf '%s' "$summary" | grep -oE '[0-9]+ passed' | grep -oE '[0-9]+' || true)
    failed=$(printf '%s' "$summary" | grep -oE '[0-9]+ (failed|errors?)' | awk '{s += $1} END {print s + 0}')
    passed=${passed:-0}
    failed=${failed:-0}
    if [ "$rc" != 0 ]; then
        any_failed=1
        status=FAIL
        printf '%s\n' "$out" | grep -E '^(FAILED|ERROR)' | sed 's/^/    /'
        [ "$failed" = 0 ] && failed="rc=$rc"
    else
        status=ok
    fi
    line=$(printf '%-4s %-58s passed %5s  failed %5s  %5ss' "$status" "$name" "$passed" "$failed" "$secs")
    echo "$line"
    table+=("$line")
done

echo
echo "== portability summary (${#variants[@]} variants)"
printf '%s\n' "${table[@]}"
exit "$any_failed"
