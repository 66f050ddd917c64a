#!/usr/bin/env bash
# GPU runbook: one command for a GPU machine with torch and triton preinstalled and no internet.
#
#     bash bench/gpu_runbook.sh OUTDIR
#
# Within 8 minutes in all (BUDGET_S, default 470 s): records the machine (nvidia-smi, versions,
# pip list), makes the package importable without the network, runs the test suite
# (`python -m pytest -q tests`, capped at TEST_TIMEOUT_S, default 210 s; log kept), then the
# full benchmark (`python -m bench.run --full`) with whatever time is left, then the plots and
# the README section drawn from its results. Every file goes to OUTDIR:
#   machine.txt (nvidia-smi, versions), pip_list.txt, install.log, tests.log, tests_rc,
#   bench.log, results.jsonl, *.png (when matplotlib is installed), bench_section.md,
#   README.md (a copy whose benchmark section is regenerated), elapsed.txt.
# Each stage prints the elapsed time. Nothing here touches the network.
#
# Environment knobs: PYTHON (default python), BUDGET_S, TEST_TIMEOUT_S, BENCH_ARGS (extra
# arguments for bench.run, e.g. "--seq-lens 1024 4096 16384"), BENCH_MODE (default --full;
# --quick for a dry run on a CPU), INSTALL=0 (PYTHONPATH only), SKIP_TESTS=1 (the whole
# budget to the benchmark, e.g. for a second run after the tests passed), WHEELHOUSE (a folder of wheels,
# e.g. pytest/hypothesis/ninja/tqdm/matplotlib, installed with --no-index if given),
# FLASH_KERNELS_COMMIT (the commit id to record when the tree has no .git).
#
# Afterwards, on a development machine: copy OUTDIR/results.jsonl's lines into
# bench/results/results.jsonl, then `python -m bench.plots && python -m bench.readme`.
set -uo pipefail

if [ $# -ne 1 ]; then
    echo "usage: bash bench/gpu_runbook.sh OUTDIR" >&2
    exit 2
fi
mkdir -p "$1"
OUT="$(cd "$1" && pwd)"
REPO="$(cd "$(dirname "$0")/.." && pwd)"
cd "$REPO"
PY="${PYTHON:-python}"
BUDGET_S="${BUDGET_S:-470}"
TEST_TIMEOUT_S="${TEST_TIMEOUT_S:-210}"
START=$(date +%s)
elapsed() { echo $(( $(date +%s) - START )); }
stage() { echo "[$(elapsed) s] $*" | tee -a "$OUT/elapsed.txt"; }

export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"   # importable even if the install fails
export PYTHONUNBUFFERED=1
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1  # never reach for the network
unset TRITON_INTERPRET                                 # real kernels on the GPU
if [ -z "${FLASH_KERNELS_COMMIT:-}" ] && ! git -C "$REPO" rev-parse HEAD >/dev/null 2>&1; then
    echo "note: no .git here; results record a hash of the sources (set FLASH_KERNELS_COMMIT)"
fi

stage "machine"
{
    date -u
    nvidia-smi || echo "nvidia-smi failed"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv || true
    "$PY" - <<'EOF'
import platform, sys
print("python", sys.version.replace("\n", " "), platform.platform())
try:
    import torch
    print("torch", torch.__version__, "cuda", torch.version.cuda, "available", torch.cuda.is_available())
    if torch.cuda.is_available():
        print("device", torch.cuda.get_device_name(), torch.cuda.get_device_capability())
except Exception as exc:
    print("torch import failed:", exc)
for name in ("triton", "numpy", "pytest", "hypothesis", "ninja", "tqdm", "matplotlib", "fla"):
    try:
        module = __import__(name)
        print(name, getattr(module, "__version__", "?"))
    except Exception as exc:
        print(name, "missing:", type(exc).__name__)
EOF
} > "$OUT/machine.txt" 2>&1
cat "$OUT/machine.txt"
"$PY" -m pip list > "$OUT/pip_list.txt" 2>&1 || true

stage "install (no network)"
{
    if [ -n "${WHEELHOUSE:-}" ] && [ -d "$WHEELHOUSE" ]; then
        "$PY" -m pip install --no-index --find-links "$WHEELHOUSE" "$WHEELHOUSE"/*.whl
    fi
    if [ "${INSTALL:-1}" = 1 ]; then
        "$PY" -m pip install --no-index --no-deps --no-build-isolation -e . \
            || echo "pip install failed: using PYTHONPATH=$REPO"
    else
        echo "INSTALL=0: not installed, using PYTHONPATH=$REPO"
    fi
} > "$OUT/install.log" 2>&1
tail -n 2 "$OUT/install.log"
"$PY" -c "import flash_kernels; print('flash_kernels from', flash_kernels.__file__)"

stage "tests (at most ${TEST_TIMEOUT_S} s)"
if [ "${SKIP_TESTS:-0}" = 1 ]; then
    echo "SKIP_TESTS=1: tests not run" | tee "$OUT/tests.log"
    echo "skipped" > "$OUT/tests_rc"
elif "$PY" -c "import pytest" 2>/dev/null; then
    # SIGINT first so that pytest prints its summary of what ran; KILL 15 s later
    timeout -k 15 -s INT "$TEST_TIMEOUT_S" "$PY" -m pytest -q tests -p no:cacheprovider \
        > "$OUT/tests.log" 2>&1
    echo $? > "$OUT/tests_rc"
    tail -n 15 "$OUT/tests.log"
    echo "tests exit code $(cat "$OUT/tests_rc") (124/130: stopped at the time cap; see tests.log)"
else
    echo "pytest is not installed: tests skipped (give WHEELHOUSE=DIR with its wheels)" | tee "$OUT/tests.log"
    echo "missing" > "$OUT/tests_rc"
fi

LEFT=$(( BUDGET_S - $(elapsed) ))
BENCH_BUDGET=$(( LEFT - 70 ))     # the last point, the peak, report, plots and README after it
if [ "$BENCH_BUDGET" -lt 30 ]; then BENCH_BUDGET=30; fi
stage "benchmark (points started within ${BENCH_BUDGET} s)"
# Priority: the kernels, the eager torch path and SDPA at every T come first; torch.compile
# only where the targets are measured (a compile per shape); reference and fla last.
timeout -k 20 -s INT $(( BENCH_BUDGET + 45 )) "$PY" -m bench.run ${BENCH_MODE:---full} --output-dir "$OUT" \
    --time-budget "$BENCH_BUDGET" --warmup-ms 10 --rep-ms 60 --no-progress \
    --compile-seq-lens 1024 4096 16384 65536 ${BENCH_ARGS:-} 2>&1 | tee "$OUT/bench.log"
echo "benchmark exit code ${PIPESTATUS[0]}"

stage "plots and README section"
"$PY" -m bench.plots --results "$OUT/results.jsonl" --plot-dir "$OUT" 2>&1 | tee -a "$OUT/bench.log"
cp README.md "$OUT/README.md"
"$PY" -m bench.readme --results "$OUT/results.jsonl" --readme "$OUT/README.md" 2>&1 | tee -a "$OUT/bench.log"
"$PY" -m bench.readme --results "$OUT/results.jsonl" --readme "$OUT/README.md" --stdout \
    > "$OUT/bench_section.md" 2>&1

stage "done; files in $OUT:"
ls -la "$OUT"
