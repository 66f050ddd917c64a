#!/usr/bin/env bash
# GPU runbook: one command for a GPU machine with torch and triton preinstalled and no internet.
#
#     bash bench/gpu_runbook.sh OUTDIR
#
# Turns a few rare GPU minutes into evidence, within BUDGET_S (default 510 s, under a 10-minute
# command limit), in this order:
#   1. preflight (~5 s; bench/gpu_preflight.py): a C compiler and Python.h (Triton 3.6 builds a
#      C launcher per kernel signature), one tiny Triton kernel launched and checked,
#      TRITON_CACHE_DIR inside OUTDIR (a fresh cache), versions recorded. A failed preflight
#      says what is missing, skips the kernel tests and still runs the benchmark on the PyTorch
#      paths;
#   2. the self-test (`python -m flash_kernels.selftest --json`, at most SELFTEST_TIMEOUT_S,
#      default 150 s): every kernel path (forward, both backward kernels, state scans, hoisted and
#      long-chunk tiles, causal and not, rel_bias, packed documents with state, the fused op with
#      its gate, decoding) in every dtype the GPU has, output and every gradient against the
#      float64 reference: a verdict per path and dtype even when nothing after it runs. Its JSON
#      report is rewritten after every row, so a run stopped at the cap keeps the rows it
#      finished; it compiles into the same Triton cache the tests then reuse;
#   3. the GPU test selection, `pytest -m gpu` (tests/conftest.py: every test that touches CUDA,
#      the core correctness files first: the Triton op against the references with the bf16
#      checks, flash_attention, strides, torch.compile, determinism; then the other GPU tests,
#      fuzzing with FLASH_KERNELS_FUZZ_EXAMPLES=8, the 15 GB tensor last), on WORKERS=8
#      pytest-xdist workers so that the kernels compile in parallel, each test capped at
#      PER_TEST_TIMEOUT_S (pytest-timeout) and the stage at TEST_TIMEOUT_S (default 240 s);
#   4. the benchmark (`python -m bench.run --full`) with the time left, its plots and README
#      section;
#   5. the long-context training comparison, last of the measurements and capped at COMPARE_S
#      (default 120 s; the benchmark's budget leaves that much): examples/compare_long_context.py
#      --preset gpu (bf16, d = 512, 8 layers, S = 128, E = 2d, T = 1024, 4096 and 8192): FLASH,
#      Transformer++ (SDPA) and FLASH-Quad trained alternately on the same batches, validation
#      loss against wall-clock; its results go into logs.tar.gz (compare/), its table into the
#      summary. Publish on a development machine: extract compare/compare_long_context.jsonl
#      and run `python examples/publish_compare.py --results PATH`;
#   6. a one-screen summary, printed last (bench/gpu_summary.py): the self-test's table, tests
#      per file with the skip reasons, every bf16 test, the headline timings at the paper shape,
#      the long-context comparison's table.
#
# Compile work of step 3, estimated on a CPU machine with the GPU's software (Triton 3.6) from
# the launches the selection records under the interpreter (bench/gpu_selection.py, 2026-11-23):
#   367 distinct kernel specializations (435 with the default 35 fuzz examples) from the 195 GPU
#   tests that launch kernels, and 133 launcher signatures. Cold compile for sm_90: 0.35-0.61 s
#   CPU per specialization (mean by kernel), 0.33 s per launcher build: 212 s on one core.
#   At -n 8 on 16 cores: 27 s if the workers shared every compile, at most 69 s for the busiest
#   worker when none finds another's kernels in the shared cache: well inside the 240 s stage.
#
# OUTDIR keeps at most 5 files (the device tool returns 8): summary.txt (the summary),
# results.jsonl (benchmark records: copy them into bench/results/results.jsonl, then
# `python -m bench.plots && python -m bench.readme`), bench_section.md, tests.jsonl (one line
# per test outcome, written as the tests end) and logs.tar.gz (machine.txt, pip_list.txt,
# preflight.txt, selftest.log, selftest.json, install.log, tests.log, bench.log,
# plots, README.md with the regenerated benchmark section, elapsed.txt, triton_cache.txt,
# compare.log and compare/: the comparison's records, tables and figure).
# The Triton cache (OUTDIR/work/triton_cache while it runs) is counted, then deleted.
#
# On a machine without CUDA this is a dry run of the same steps: the preflight kernel, the
# self-test and the tests run under TRITON_INTERPRET=1 (capped by SELFTEST_TIMEOUT_S and
# TEST_TIMEOUT_S), the benchmark in quick mode, the comparison as --preset gpu-dry-run (the GPU
# preset's code path, bf16 autocast and time budget, at a tiny shape on the CPU).
#
# Environment knobs: PYTHON (default python3, else python), BUDGET_S, SELFTEST_TIMEOUT_S,
# SELFTEST_ARGS (extra arguments for flash_kernels.selftest, e.g. "--dtypes bf16"),
# TEST_TIMEOUT_S, COMPARE_S (default 120; 0 = no comparison),
# PER_TEST_TIMEOUT_S (default 150), WORKERS (default 8; 0 = no xdist), TEST_SELECTION (default
# "gpu"), TEST_PATHS (default tests), FLASH_KERNELS_FUZZ_EXAMPLES (default 8), BENCH_ARGS (extra
# arguments for bench.run), BENCH_MODE (default --full on a GPU, --quick without), INSTALL=0
# (PYTHONPATH only), SKIP_TESTS=1, WHEELHOUSE (a folder of wheels installed with --no-index
# first), FLASH_KERNELS_COMMIT (the commit id to record when the tree has no .git).
set -uo pipefail

if [ $# -ne 1 ]; then
    echo "usage: bash bench/gpu_runbook.sh OUTDIR" >&2
    exit 2
fi
mkdir -p "$1"
OUT="$(cd "$1" && pwd)"
REPO="$(cd "$(dirname "$0")/.." && pwd)"
cd "$REPO"
PY="${PYTHON:-$(command -v python3 || command -v python)}"
BUDGET_S="${BUDGET_S:-510}"
SELFTEST_TIMEOUT_S="${SELFTEST_TIMEOUT_S:-150}"
TEST_TIMEOUT_S="${TEST_TIMEOUT_S:-240}"
PER_TEST_TIMEOUT_S="${PER_TEST_TIMEOUT_S:-150}"
WORKERS="${WORKERS:-8}"
COMPARE_S="${COMPARE_S:-120}"
export FLASH_KERNELS_FUZZ_EXAMPLES="${FLASH_KERNELS_FUZZ_EXAMPLES:-8}"
START=$(date +%s)
WORK="$OUT/work"
rm -rf "$WORK" && mkdir -p "$WORK"
elapsed() { echo $(( $(date +%s) - START )); }
stage() { echo "[$(elapsed) s] $*" | tee -a "$WORK/elapsed.txt"; }

export PYTHONPATH="$REPO${PYTHONPATH:+:$PYTHONPATH}"   # importable even if the install fails
export PYTHONUNBUFFERED=1
export PIP_NO_INDEX=1 PIP_DISABLE_PIP_VERSION_CHECK=1  # never reach for the network
export TRITON_CACHE_DIR="$WORK/triton_cache"          # fresh: every kernel compiles here, now
unset TRITON_INTERPRET
if "$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    DRY_RUN=0
    BENCH_MODE="${BENCH_MODE:---full}"
else
    DRY_RUN=1
    BENCH_MODE="${BENCH_MODE:---quick}"
    echo "no CUDA device: a dry run (kernels under TRITON_INTERPRET=1, benchmark $BENCH_MODE)"
fi
if [ -z "${FLASH_KERNELS_COMMIT:-}" ] && ! git -C "$REPO" rev-parse HEAD >/dev/null 2>&1; then
    echo "note: no .git here; results record a hash of the sources (set FLASH_KERNELS_COMMIT)"
fi
TESTS_RC="not run"
SELFTEST_RC="not run"

finish() {
    # Always last, also after an error or Ctrl-C: bundle the logs, then the summary.
    trap - EXIT INT TERM
    stage "summary"
    if [ -d "$TRITON_CACHE_DIR" ]; then
        echo "$(find "$TRITON_CACHE_DIR" -mindepth 1 -maxdepth 1 -type d | wc -l) cache entries," \
             "$(du -sh "$TRITON_CACHE_DIR" | cut -f1) in $TRITON_CACHE_DIR" > "$WORK/triton_cache.txt"
        rm -rf "$TRITON_CACHE_DIR"
    fi
    [ -f "$WORK/results.jsonl" ] && cp "$WORK/results.jsonl" "$OUT/results.jsonl"
    [ -f "$WORK/bench_section.md" ] && cp "$WORK/bench_section.md" "$OUT/bench_section.md"
    [ -f "$WORK/tests.jsonl" ] && cp "$WORK/tests.jsonl" "$OUT/tests.jsonl"
    "$PY" -m bench.gpu_summary --preflight "$WORK/preflight.txt" --tests "$WORK/tests.jsonl" \
        --selftest "$WORK/selftest.json" --selftest-rc "$SELFTEST_RC" \
        --results "$WORK/results.jsonl" --tests-rc "$TESTS_RC" --elapsed "$(elapsed)" \
        --compare "$WORK/compare/compare_long_context.txt" \
        --output "$OUT/summary.txt" > /dev/null 2>&1 \
        || echo "the summary failed; see logs.tar.gz" > "$OUT/summary.txt"
    tar -czf "$OUT/logs.tar.gz" -C "$WORK" . && rm -rf "$WORK"
    echo "files in $OUT: $(cd "$OUT" && ls | tr '\n' ' ')"
    cat "$OUT/summary.txt"
}
trap finish EXIT
trap 'exit 130' INT TERM

stage "preflight"
{
    date -u
    nvidia-smi || echo "nvidia-smi failed"
    nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.max.sm,power.limit --format=csv || true
} > "$WORK/machine.txt" 2>&1
"$PY" -m pip list > "$WORK/pip_list.txt" 2>&1 || true
if [ "$DRY_RUN" = 1 ]; then
    TRITON_INTERPRET=1 "$PY" -m bench.gpu_preflight --out "$OUT" --report "$WORK/preflight.txt"
else
    "$PY" -m bench.gpu_preflight --out "$OUT" --report "$WORK/preflight.txt"
fi
PREFLIGHT_RC=$?

stage "self-test (at most ${SELFTEST_TIMEOUT_S} s)"
if [ "$PREFLIGHT_RC" != 0 ]; then
    echo "preflight failed: self-test not run" | tee "$WORK/selftest.log"
    SELFTEST_RC="skipped (preflight failed)"
else
    if [ "$DRY_RUN" = 1 ]; then export TRITON_INTERPRET=1; fi
    # SIGINT first: the self-test then prints and writes the rows it finished (exit 130)
    timeout -k 10 -s INT "$SELFTEST_TIMEOUT_S" "$PY" -m flash_kernels.selftest \
        --json "$WORK/selftest.json" ${SELFTEST_ARGS:-} > "$WORK/selftest.log" 2>&1
    SELFTEST_RC=$?
    unset TRITON_INTERPRET
    grep -m 1 "^flash-kernels self-test" "$WORK/selftest.log" || tail -n 2 "$WORK/selftest.log"
    echo "self-test exit code $SELFTEST_RC (0 passed, 1 a row failed, 2 cannot run;" \
         "124/130/137: stopped at the time cap, selftest.json has the rows it finished)"
fi

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
} > "$WORK/install.log" 2>&1
tail -n 1 "$WORK/install.log"

stage "tests: -m ${TEST_SELECTION:-gpu} (at most ${TEST_TIMEOUT_S} s)"
if [ "${SKIP_TESTS:-0}" = 1 ]; then
    echo "SKIP_TESTS=1: tests not run" | tee "$WORK/tests.log"
    TESTS_RC="skipped (SKIP_TESTS=1)"
elif [ "$PREFLIGHT_RC" != 0 ]; then
    echo "preflight failed: kernel tests not run ($(tail -n 1 "$WORK/preflight.txt"))" | tee "$WORK/tests.log"
    TESTS_RC="skipped (preflight failed)"
elif ! "$PY" -c "import pytest" 2>/dev/null; then
    echo "pytest is not installed: tests skipped (give WHEELHOUSE=DIR with its wheels)" | tee "$WORK/tests.log"
    TESTS_RC="skipped (no pytest)"
else
    export FLASH_KERNELS_TEST_REPORT="$WORK/tests.jsonl"      # one line per test, as it ends
    PYTEST_ARGS=(-m "${TEST_SELECTION:-gpu}" -q -rfEs -p no:cacheprovider)
    if [ "$WORKERS" -gt 0 ] && "$PY" -c "import xdist" 2>/dev/null; then
        PYTEST_ARGS+=(-n "$WORKERS" --dist load)
    else
        echo "pytest-xdist missing or WORKERS=0: tests run in one process (kernels compile serially)"
    fi
    if "$PY" -c "import pytest_timeout" 2>/dev/null; then
        # per test, and no new test after the session's time (the outer timeout is the backstop)
        PYTEST_ARGS+=(--timeout "$PER_TEST_TIMEOUT_S" --session-timeout $(( TEST_TIMEOUT_S - 20 )))
    else
        echo "pytest-timeout missing: no per-test time limit"
    fi
    # SIGINT first so that pytest writes its report of what ran; KILL 20 s later
    if [ "$DRY_RUN" = 1 ]; then export TRITON_INTERPRET=1; fi
    timeout -k 20 -s INT "$TEST_TIMEOUT_S" "$PY" -m pytest "${PYTEST_ARGS[@]}" ${TEST_PATHS:-tests} \
        > "$WORK/tests.log" 2>&1
    TESTS_RC=$?
    unset TRITON_INTERPRET
    tail -n 4 "$WORK/tests.log"
    echo "tests exit code $TESTS_RC (124/130/137: stopped at the time cap; tests.jsonl has what ran)"
fi

LEFT=$(( BUDGET_S - $(elapsed) ))
# the last point, the peak, report, plots and summary after it; the comparison after them
BENCH_BUDGET=$(( LEFT - 60 - COMPARE_S ))
if [ "$BENCH_BUDGET" -lt 30 ]; then BENCH_BUDGET=30; fi
IMPL_ARGS=()
if [ "$PREFLIGHT_RC" != 0 ]; then
    IMPL_ARGS=(--impls torch sdpa)   # no Triton (torch.compile's inductor needs it too)
    echo "preflight failed: benchmark on the PyTorch paths only (${IMPL_ARGS[*]})"
fi
stage "benchmark (points started within ${BENCH_BUDGET} s)"
# Priority: the kernels, the eager torch path and SDPA at every T come first; torch.compile
# only where the targets are measured (a compile per shape); reference and fla last.
timeout -k 20 -s INT $(( BENCH_BUDGET + 40 )) "$PY" -m bench.run "$BENCH_MODE" --output-dir "$WORK" \
    --time-budget "$BENCH_BUDGET" --warmup-ms 10 --rep-ms 60 --no-progress \
    --compile-seq-lens 1024 4096 16384 65536 "${IMPL_ARGS[@]}" ${BENCH_ARGS:-} > "$WORK/bench.log" 2>&1
echo "benchmark exit code $? ($(grep -c . "$WORK/results.jsonl" 2>/dev/null || echo 0) records)"

stage "plots and README section"
{
    "$PY" -m bench.plots --results "$WORK/results.jsonl" --plot-dir "$WORK"
    cp README.md "$WORK/README.md"
    "$PY" -m bench.readme --results "$WORK/results.jsonl" --readme "$WORK/README.md"
} >> "$WORK/bench.log" 2>&1
"$PY" -m bench.readme --results "$WORK/results.jsonl" --readme "$WORK/README.md" --stdout \
    > "$WORK/bench_section.md" 2>> "$WORK/bench.log"

# Last: the long-context comparison, in what is left of the budget (at most COMPARE_S). Its
# driver stops training COMPARE_BUDGET - 20 s after it starts (each T a share; records are
# appended after every T), the timeout is the backstop.
LEFT=$(( BUDGET_S - $(elapsed) - 10 ))     # the summary after it
COMPARE_BUDGET=$(( LEFT < COMPARE_S ? LEFT : COMPARE_S ))
if [ "$COMPARE_S" -le 0 ]; then
    echo "COMPARE_S=$COMPARE_S: long-context comparison not run" | tee "$WORK/compare.log"
elif [ "$COMPARE_BUDGET" -lt 40 ]; then
    echo "long-context comparison not run: ${LEFT} s left of BUDGET_S" | tee "$WORK/compare.log"
else
    stage "long-context comparison (at most ${COMPARE_BUDGET} s)"
    if [ "$DRY_RUN" = 1 ]; then COMPARE_PRESET=gpu-dry-run; else COMPARE_PRESET=gpu; fi
    timeout -k 10 -s INT "$COMPARE_BUDGET" "$PY" examples/compare_long_context.py \
        --preset "$COMPARE_PRESET" --time-budget $(( COMPARE_BUDGET - 20 )) \
        --output-dir "$WORK/compare" > "$WORK/compare.log" 2>&1
    echo "comparison exit code $? ($(grep -c . "$WORK/compare/compare_long_context.jsonl" \
        2>/dev/null || echo 0) records)"
fi
