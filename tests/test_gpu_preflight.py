"""The GPU runbook's parts: its preflight finds what is missing, its summary reports what ran,
and the whole runbook runs end to end here as a dry run (no GPU: kernels under the interpreter).
"""

import json
import os
import subprocess
import sys
import tarfile

import pytest

from bench import gpu_preflight, gpu_summary

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_missing_compiler_is_named(monkeypatch):
    monkeypatch.delenv("CC", raising=False)
    monkeypatch.setattr(gpu_preflight.shutil, "which", lambda name: None)
    ok, message = gpu_preflight.check_compiler_and_headers()
    assert not ok and "C compiler" in message and "gcc" in message


def test_missing_python_header_is_named(monkeypatch, tmp_path):
    monkeypatch.setattr(gpu_preflight, "python_include_dir", lambda: str(tmp_path))
    ok, message = gpu_preflight.check_compiler_and_headers()
    assert not ok and "Python.h" in message and str(tmp_path) in message


def test_compiler_that_fails_is_reported(monkeypatch):
    monkeypatch.setenv("CC", "false")  # exists, exits 1: a broken toolchain
    ok, message = gpu_preflight.check_compiler_and_headers()
    assert not ok and "cannot build an extension" in message


def test_cache_dir_must_be_inside_the_output(monkeypatch, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    monkeypatch.delenv("TRITON_CACHE_DIR", raising=False)
    assert not gpu_preflight.check_cache_dir(str(out))[0]
    monkeypatch.setenv("TRITON_CACHE_DIR", str(tmp_path / "elsewhere"))
    ok, message = gpu_preflight.check_cache_dir(str(out))
    assert not ok and "not inside" in message
    monkeypatch.setenv("TRITON_CACHE_DIR", str(out / "cache"))
    assert gpu_preflight.check_cache_dir(str(out)) == (True, f"TRITON_CACHE_DIR={out / 'cache'}")


@pytest.mark.gpu
def test_tiny_kernel_runs_and_is_checked():
    ok, message = gpu_preflight.check_tiny_kernel()
    assert ok, message


REPORT = [
    dict(
        nodeid="tests/test_triton_mixed_chunk.py::test_bfloat16[causal]",
        outcome="passed",
        message="",
    ),
    dict(
        nodeid="tests/test_triton_mixed_chunk.py::test_bfloat16[full]",
        outcome="failed",
        message="AssertionError: out: rms error 1e-1",
    ),
    dict(
        nodeid="tests/test_strides.py::test_tensors_over_2_31_elements",
        outcome="skipped",
        message="needs ~15 GB of GPU memory",
    ),
    dict(
        nodeid="tests/test_strides.py::test_layouts_give_the_same_result[split]",
        outcome="passed",
        message="",
    ),
]


def test_summary_counts_per_file_with_reasons_and_bf16(tmp_path):
    report = tmp_path / "tests.jsonl"
    report.write_text("".join(json.dumps(entry) + "\n" for entry in REPORT))
    preflight = tmp_path / "preflight.txt"
    preflight.write_text(
        "version triton: 3.6.0\nFAIL compiler: missing Python.h\n"
        "PREFLIGHT: FAILED: missing Python.h\n"
    )
    text = gpu_summary.summary(str(preflight), str(report), str(tmp_path / "none.jsonl"), "1", "12")
    assert "tests: 2 passed, 1 failed, 0 errors, 1 skipped (exit 1)" in text
    lines = text.splitlines()
    assert any(
        line.split()[:5] == ["test_triton_mixed_chunk.py", "1", "1", "0", "0"] for line in lines
    )
    assert any(line.split()[:5] == ["test_strides.py", "1", "0", "0", "1"] for line in lines)
    assert "1 x needs ~15 GB of GPU memory" in text
    assert "FAILED test_triton_mixed_chunk.py::test_bfloat16[full]: AssertionError" in text
    assert "test_bfloat16[causal] passed" in text and "test_bfloat16[full] failed" in text
    assert "PREFLIGHT: FAILED: missing Python.h" in text and "timings: no results" in text


def test_summary_without_any_input():
    text = gpu_summary.summary(None, None, None)
    assert "preflight: no report" in text and "tests: no test report" in text
    assert "self-test: no report (None): not run (exit ?)" in text
    assert "long-context comparison: no table (None)" in text


def test_summary_keeps_the_comparison_table_columns(tmp_path):
    """The comparison's narrow table goes into the summary with its alignment (not
    whitespace-collapsed as other lines are) and cut at the summary's width."""
    table = tmp_path / "compare_long_context.txt"
    rows = [
        "long-context comparison (ms/step, ...):",
        "  T=1024   b=32   FLASH 41.2  T++ 35.0 (0.85x)  Quad 60.1 (1.46x)",
        "  " + "x" * 120,
    ]
    table.write_text("\n".join(rows) + "\n")
    text = gpu_summary.summary(None, None, None, compare_path=str(table))
    assert rows[1] in text.splitlines() and ("  " + "x" * 98) in text.splitlines()


def _selftest_report(rows):
    from flash_kernels.selftest import SelfTestReport, SelfTestRow

    report = SelfTestReport(
        {
            "device": "GPU",
            "capability": "sm_90",
            "driver": "580.1",
            "ptxas": "release 12.8 (/x/ptxas, sm_90)",
        },
        seed=5,
        dtypes=["bf16"],
        paths=[row[0] for row in rows],
        wall_s=9.5,
    )
    for path, verdict, quantity, error in rows:
        report.rows.append(
            SelfTestRow(
                path, "bf16", quantity, error, 3e-2, verdict, 4.2, 0.01, errors={quantity: error}
            )
        )
    return report


def test_summary_shows_the_selftest_table(tmp_path):
    """The self-test's verdict, its rows with their columns aligned (not whitespace-collapsed),
    the failures and the ptxas/driver lines; a stopped run's rows; a run that could not start."""
    path = tmp_path / "selftest.json"
    report = _selftest_report(
        [
            ("mixed C=128 hoist causal +bias", "PASS", "dv", 1e-3),
            ("flash C=128 hoist causal +gate", "FAIL", "dz", 0.5),
        ]
    )
    path.write_text(json.dumps(report.to_dict()))
    text = gpu_summary.summary(None, None, None, selftest_path=str(path), selftest_rc="1")
    assert "self-test (exit 1; python -m flash_kernels.selftest" in text
    assert "flash-kernels self-test: FAILED: 1 of 2 rows passed, 1 failed (seed 5" in text
    for line in report.table_lines():
        assert line in text.splitlines()
    assert "  FAIL flash C=128 hoist causal +gate [bf16]: over 3e-02: dz 5.0e-01" in text
    assert "  ptxas: release 12.8 (/x/ptxas, sm_90)" in text and "  driver: 580.1" in text

    stopped = _selftest_report([("mixed C=128 hoist causal +bias", "PASS", "dv", 1e-3)])
    stopped.paths.append("flash C=128 hoist causal +gate")
    path.write_text(json.dumps(stopped.to_dict()))
    text = gpu_summary.summary(None, None, None, selftest_path=str(path), selftest_rc="137")
    assert "self-test: INCOMPLETE: 1 of 2 rows passed, 0 failed, 1 not run" in text

    path.write_text(json.dumps({"passed": False, "not_run": "no CUDA device"}))
    text = gpu_summary.summary(None, None, None, selftest_path=str(path), selftest_rc="2")
    assert "self-test: not run (exit 2): no CUDA device" in text


@pytest.mark.slow
def test_runbook_dry_run(tmp_path):
    """bench/gpu_runbook.sh end to end on this machine: preflight, the GPU selection of one test
    file, a one-point quick benchmark, plots, README section, the long-context comparison's dry
    run (bf16 autocast at a tiny shape), the summary last, few files."""
    out = tmp_path / "out"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env.update(
        PYTHON=sys.executable,
        INSTALL="0",
        BUDGET_S="300",
        TEST_TIMEOUT_S="120",
        WORKERS="0",
        TEST_PATHS="tests/test_gpu_preflight.py",
        COMPARE_S="60",
        SELFTEST_ARGS="--dtypes fp32 --paths decode --seed 3",
        BENCH_ARGS="--seq-lens 512 --noncausal-seq-lens --modes fwd --impls torch "
        "--no-memory --varlen-tokens 0",
    )
    proc = subprocess.run(
        ["bash", "bench/gpu_runbook.sh", str(out)],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=400,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert sorted(os.listdir(out)) == [
        "bench_section.md",
        "logs.tar.gz",
        "results.jsonl",
        "summary.txt",
        "tests.jsonl",
    ]
    summary = (out / "summary.txt").read_text()
    assert proc.stdout.rstrip().endswith(summary.rstrip())  # the summary is the last screen
    assert "PREFLIGHT: OK" in summary
    assert "self-test (exit 0; " in summary  # right after the preflight, its table shown
    assert "flash-kernels self-test: PASSED: 2 of 2 rows passed, 0 failed (seed 3" in summary
    assert (
        summary.index("PREFLIGHT: OK")
        < summary.index("self-test (exit 0")
        < summary.index("tests: ")
    )
    assert (
        sum(line.startswith("decode ") and " PASS " in line for line in summary.splitlines()) == 2
    )
    assert "tests: 1 passed, 0 failed, 0 errors, 0 skipped" in summary
    assert "test_gpu_preflight.py" in summary and "timings (fwd" in summary
    records = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    assert {r["impl"] for r in records} == {"torch"} and {r["T"] for r in records} == {512}
    # the comparison ran last, into logs.tar.gz (the file count above is unchanged), its table
    # in the summary
    assert summary.index("timings (fwd") < summary.index("long-context comparison (ms/step")
    assert "T=32" in summary and "T=64" in summary
    with tarfile.open(out / "logs.tar.gz") as logs:
        compare_file = logs.extractfile("./compare/compare_long_context.jsonl")
        compared = [json.loads(line) for line in compare_file.read().decode().splitlines()]
    assert {(r["T"], r["model"]) for r in compared} == {
        (T, model) for T in (32, 64) for model in ("FLASH", "Transformer++", "FLASH-Quad")
    }
    assert {(r["preset"], r["dtype"], r["status"]) for r in compared} == {
        ("gpu-dry-run", "bfloat16", "ok")
    }
