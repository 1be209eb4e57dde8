#!/usr/bin/env bash
# GPU suite (issue #8): on a machine with a CUDA GPU, in one command, from a fresh copy of the repo:
#   1. install the wheels carried in .whl/ (fvcore, yacs, termcolor, iopath for the device image) into a
#      temporary folder on PYTHONPATH, and check that every package the suite needs imports;
#   2. build the CUDA selective-scan extension for the local GPU (TORCH_CUDA_ARCH_LIST = its capability);
#   3. run every GPU test with pytest (CUDA scan, model-level GPU test, and the Triton GPU tests if present);
#   4. run the scan benchmark (every backend, DefMamba-T/S shapes) and the model throughput benchmark
#      (DefMamba-T/S, auto backends plus the forced backend pairs, with a profile of one training step);
#   5. write OUTDIR/results.json (all figures) and OUTDIR/results.md (tables for docs/benchmarks.md).
#
#   bash benchmarks/gpu_suite.sh OUTDIR
#
# Files in OUTDIR (flat, at most 8 at any time): suite.log (step lines and benchmark output), build.log,
# pytest.log, results.json, results.md; pytest.xml, scan.json and throughput.json while the suite runs
# (merged into results.json at the end). Every step is bounded so that the whole run ends within
# GPU_SUITE_BUDGET_S seconds (default 540); a step that fails does not stop the later ones.
# Exit status: 0 when every step passed; otherwise non-zero with one line on stderr naming what failed
# (no CUDA, a missing package, the build, a test, a benchmark, or time running out).
# Environment: PYTHON (default python3), GPU_SUITE_BUDGET_S, MAX_JOBS (default: number of CPUs).
set -uo pipefail

die() { echo "gpu_suite: $*" >&2; exit 1; }

[ $# -eq 1 ] && [ -n "$1" ] || die "usage: bash benchmarks/gpu_suite.sh OUTDIR"
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PY=${PYTHON:-python3}
BUDGET=${GPU_SUITE_BUDGET_S:-540}
case $BUDGET in ''|*[!0-9]*) die "GPU_SUITE_BUDGET_S must be a whole number of seconds, got '$BUDGET'";; esac
command -v "$PY" >/dev/null || die "Python interpreter '$PY' not found (set PYTHON)"

cuda=$("$PY" -c "import torch; print(int(torch.cuda.is_available()))" 2>/dev/null) \
    || die "cannot import torch with $PY"
[ "$cuda" = 1 ] || die "CUDA is not available (torch.cuda.is_available() is False): the GPU suite needs a GPU"

mkdir -p "$1" || die "cannot create OUTDIR $1"
OUT=$(cd "$1" && pwd)
[ -w "$OUT" ] || die "OUTDIR $OUT is not writable"
cd "$REPO" || die "cannot enter $REPO"
rm -f "$OUT"/{suite.log,build.log,pytest.log,pytest.xml,scan.json,throughput.json,results.json,results.md}
LOG=$OUT/suite.log
START=$(date +%s)
export PYTHONUNBUFFERED=1
unset TRITON_INTERPRET  # Triton must compile for the GPU here, not interpret

log() { echo "$*" | tee -a "$LOG"; }
log "gpu_suite: repo $REPO, commit $(git -C "$REPO" rev-parse --short HEAD 2>/dev/null || echo unknown)," \
    "$(date -u +%FT%TZ)"

# 1. carried wheels; packages ---------------------------------------------------------------------------
SITE=$(mktemp -d /tmp/defmamba-site.XXXXXX) || die "cannot create a temporary folder"
trap 'rm -rf "$SITE"' EXIT
shopt -s nullglob
wheels=("$REPO"/.whl/*.whl)
shopt -u nullglob
if [ ${#wheels[@]} -gt 0 ]; then
    "$PY" -m pip install -q --no-index --no-deps --no-compile --target "$SITE" "${wheels[@]}" >>"$LOG" 2>&1 \
        || die "installing the wheels in .whl/ failed (see $LOG)"
    log "installed ${#wheels[@]} carried wheels into $SITE"
fi
export PYTHONPATH="$SITE${PYTHONPATH:+:$PYTHONPATH}"
missing=$("$PY" - <<'EOF'
import importlib.util
need = ["torch", "timm", "triton", "einops", "numpy", "PIL", "pytest", "yacs", "fvcore", "termcolor", "iopath"]
print(" ".join(n for n in need if importlib.util.find_spec(n) is None))
EOF
) || die "cannot run $PY"
[ -z "$missing" ] || die "missing Python packages: $missing (carry wheels in .whl/, see docs/benchmarks.md)"
"$PY" -c "import torch, triton; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'triton', \
triton.__version__, 'GPU', torch.cuda.get_device_name())" 2>&1 | tee -a "$LOG"

# step runner: NAME CAP_SECONDS LOGFILE CMD... -- bounded by the remaining budget, result in suite.log -----
FAILED=()
run_step() {
    local name=$1 cap=$2 out=$3; shift 3
    local left=$(( BUDGET - ($(date +%s) - START) ))
    local limit=$(( left < cap ? left : cap ))
    if [ "$limit" -lt 30 ]; then
        printf 'STEP\t%s\tskipped\t0\tout of time (budget %ss)\n' "$name" "$BUDGET" | tee -a "$LOG"
        FAILED+=("$name (out of time)")
        return 1
    fi
    local t0 rc note
    t0=$(date +%s)
    timeout --kill-after=10 "$limit" "$@" >>"$out" 2>&1
    rc=$?
    note=ok
    if [ $rc -eq 124 ] || [ $rc -eq 137 ]; then
        note="timed out after ${limit}s"
    elif [ $rc -ne 0 ]; then
        note="failed"
    fi
    printf 'STEP\t%s\t%s\t%s\t%s\n' "$name" "$rc" "$(( $(date +%s) - t0 ))" "$note" | tee -a "$LOG"
    [ $rc -eq 0 ] || FAILED+=("$name ($note, see $(basename "$out"))")
    return $rc
}

# 2. build the extension for this GPU ----------------------------------------------------------------------
ARCH=$("$PY" -c "import torch; print('%d.%d' % torch.cuda.get_device_capability())") \
    || die "cannot read the GPU's compute capability"
log "building defmamba_scan_cuda for sm_${ARCH/./}"
run_step build 300 "$OUT/build.log" env TORCH_CUDA_ARCH_LIST="$ARCH" MAX_JOBS="${MAX_JOBS:-$(nproc)}" \
    "$PY" -m pip install -v --no-build-isolation --no-deps --no-index --no-cache-dir --target "$SITE" \
    "$REPO/kernels/selective_scan" \
    && run_step build_import 60 "$OUT/build.log" \
        bash -c 'cd /tmp && "$0" -c "import torch, defmamba_scan_cuda as m; print(m.__file__)"' "$PY"

# 3. GPU tests ---------------------------------------------------------------------------------------------
tests=()
for t in tests/test_selective_scan_cuda.py tests/test_gpu_model.py tests/test_selective_scan_triton.py \
         tests/test_deformable_triton.py tests/test_adaptive_triton.py tests/test_sync.py; do
    [ -f "$t" ] && tests+=("$t")
done
# DATA.LOADER dali on the GPU, where DALI is installed (requirements-dali.txt; the device image lacks it)
"$PY" -c "import nvidia.dali" 2>/dev/null && tests+=(tests/test_dali.py)
log "pytest: ${tests[*]}"
run_step pytest 240 "$OUT/pytest.log" "$PY" -m pytest -q -rsfE -p no:cacheprovider \
    --junitxml="$OUT/pytest.xml" "${tests[@]}"
tail -n 1 "$OUT/pytest.log" | tee -a "$LOG"

# 4. benchmarks ----------------------------------------------------------------------------------------------
run_step scan_benchmark 150 "$LOG" "$PY" benchmarks/selective_scan.py --backend all --model T,S --dtype all \
    --quick --json "$OUT/scan.json"
run_step throughput 300 "$LOG" "$PY" benchmarks/model_throughput.py --model tiny,small --profile 25 \
    --configs auto:auto,cuda:torch,cuda:triton,triton:triton,triton:torch --json "$OUT/throughput.json"

# 5. report ----------------------------------------------------------------------------------------------------
"$PY" benchmarks/gpu_suite_report.py "$OUT" >>"$LOG" 2>&1 || FAILED+=("report (see suite.log)")
[ -f "$OUT/results.md" ] && cat "$OUT/results.md"
if [ ${#FAILED[@]} -gt 0 ]; then
    echo "gpu_suite: FAILED: $(IFS=';'; echo "${FAILED[*]}" | sed 's/;/; /g') -- results in $OUT" >&2
    exit 1
fi
log "gpu_suite: all steps passed in $(( $(date +%s) - START ))s; results in $OUT/results.md"
