"""The self-test a user runs on their device (flash_kernels/selftest/): it passes here, its
table lists every path in every dtype with every gradient checked, its exit status is right, and
it FAILS, naming the row, when a kernel is broken (a self-test that cannot fail is worthless).

Without a GPU the kernels run under TRITON_INTERPRET=1 (conftest.py), in float32 and float16.
One full run, `python -m flash_kernels.selftest` in a subprocess (about 35 s of CPU), serves the
first two tests (marked slow in conftest.py); the broken-kernel tests run one or two paths
in-process, before and after a fault is planted by monkeypatch.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

import flash_kernels
from flash_kernels import selftest
from flash_kernels.backends.torch.chunked import mixed_chunk_attention_torch
from flash_kernels.backends.triton import mixed_chunk as triton_mixed_chunk
from flash_kernels.core.plan import resolve_scales
from flash_kernels.core.tolerances import rms_ratio
from tools.launch_recording import record_launches

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SEED = 7
HOISTED = "mixed C=128 hoist causal +bias"
FUSED = "flash C=128 hoist causal +gate"


def expected_dtypes():
    if DEVICE == "cpu":
        return ["fp32", "fp16"]
    return ["fp32", "fp16"] + (["bf16"] if torch.cuda.is_bf16_supported() else [])


def expected_quantities(path):
    """What a row must compare, worked out here from the path's options: the output, the final
    state when there is one, and the gradient of every input."""
    if isinstance(path, selftest.DecodePath):
        return {"out", "state"}
    if path.op == "mixed":
        names = {"out", "dq_quad", "dk_quad", "dv"}
        if path.linear:
            names |= {"dq_lin", "dk_lin"}
    else:
        names = {"out", "dz", "dgamma", "dbeta", "dv"} | ({"du"} if path.gate else set())
    if path.bias:
        names.add("drel_bias")
    if path.packed:
        names |= {"final_state", "dinitial_state"}
    return names


@pytest.fixture(scope="module")
def full_run(tmp_path_factory):
    """`python -m flash_kernels.selftest --seed 7 --json PATH` once: (process, JSON report)."""
    report_path = tmp_path_factory.mktemp("selftest") / "report.json"
    env = dict(
        os.environ,
        PYTHONPATH=os.pathsep.join(
            [REPO_ROOT] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else [])
        ),
    )
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "flash_kernels.selftest",
            "--seed",
            str(SEED),
            "--json",
            str(report_path),
        ],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    assert report_path.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads(report_path.read_text())


@pytest.mark.slow  # the whole self-test in a subprocess
def test_every_path_passes_in_every_dtype(full_run):
    proc, report = full_run
    assert proc.returncode == 0, proc.stdout[-5000:] + proc.stderr[-3000:]
    assert report["passed"] and not report["interrupted"] and report["seed"] == SEED
    rows = {(row["path"], row["dtype"]): row for row in report["rows"]}
    assert len(rows) == len(report["rows"])
    assert set(rows) == {
        (path, dtype) for path in selftest.PATH_NAMES for dtype in expected_dtypes()
    }
    dtypes = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
    for path in selftest.PATHS:
        for dtype in expected_dtypes():
            row = rows[path.name, dtype]
            assert row["verdict"] == "PASS", row
            assert set(row["errors"]) == expected_quantities(path), (path.name, row["errors"])
            # the tolerance is the test suite's (flash_kernels/core/tolerances.py), not its own
            assert row["tolerance"] == rms_ratio(path.check, dtypes[dtype])
            assert max(row["errors"].values()) == row["error"] <= row["tolerance"]
            assert row["errors"][row["quantity"]] == row["error"]
            assert row["first_run_s"] > 0
            assert (row["timed_s"] is not None) == (DEVICE == "cuda")


@pytest.mark.slow
def test_the_printed_table_lists_every_row_and_the_environment(full_run):
    proc, report = full_run
    lines = proc.stdout.splitlines()
    assert lines[0].startswith("flash-kernels self-test: PASSED: ")
    assert f"seed {SEED}" in lines[0]
    for path in selftest.PATH_NAMES:
        for dtype in expected_dtypes():
            row = [
                line
                for line in lines
                if line.startswith(path + " ") and line.split()[len(path.split())] == dtype
            ]
            assert len(row) == 1, (path, dtype)
            assert " PASS " in row[0]
    end = lines.index("environment:")
    assert all(len(line) <= 100 for line in lines[:end])  # the GPU run's summary clips at 100
    environment = lines[end + 1 :]
    for name in (
        "device",
        "capability",
        "CUDA runtime",
        "torch",
        "triton",
        "ptxas",
        "python",
        "flash_kernels",
        "backend",
        "timing",
    ):
        assert any(
            line.split("  ")[1].strip() == name for line in environment if line.startswith("  ")
        ), name
    assert report["environment"]["torch"] == torch.__version__
    assert report["text"] == proc.stdout


def _planted_dk_quad_fault(monkeypatch):
    """Make the Triton backward of mixed_chunk_attention return dk_quad 0.1% off on one
    64-row tile of keys -- the size of fault a miscompiled tile gives. The fused op has its own
    backward entry (backends/triton/fused.py imports mixed_chunk_backward by name): untouched."""
    original = triton_mixed_chunk.mixed_chunk_backward

    def with_fault(*args, **kwargs):
        grads = list(original(*args, **kwargs))
        grads[1] = grads[1].clone()
        grads[1][:, 64:128] *= 1.001
        return tuple(grads)

    monkeypatch.setattr(triton_mixed_chunk, "mixed_chunk_backward", with_fault)


def test_a_wrong_gradient_fails_its_row_and_only_its_row(monkeypatch, capsys):
    before = flash_kernels.self_test(dtypes=["fp32"], seed=SEED, paths=[HOISTED, FUSED])
    assert before.passed and [row.verdict for row in before.rows] == ["PASS", "PASS"]
    _planted_dk_quad_fault(monkeypatch)
    report = flash_kernels.self_test(dtypes=["fp32"], seed=SEED, paths=[HOISTED, FUSED])
    assert not report.passed
    rows = {row.path: row for row in report.rows}
    broken = rows[HOISTED]
    assert broken.verdict == "FAIL" and broken.quantity == "dk_quad"
    over = {name for name, error in broken.errors.items() if error > broken.tolerance}
    assert over == {"dk_quad"}, broken.errors  # the other gradients are still right
    assert rows[FUSED].verdict == "PASS"
    assert f"FAIL {HOISTED} [fp32]: over {broken.tolerance:.0e}: dk_quad" in str(report)

    status = selftest.main(["--dtypes", "fp32", "--seed", str(SEED), "--paths", HOISTED, "--quiet"])
    out = capsys.readouterr().out
    assert status == selftest.EXIT_FAILED == 1
    assert out.startswith("flash-kernels self-test: FAILED: 0 of 1 rows passed, 1 failed")
    row_line = next(line for line in out.splitlines() if line.startswith(HOISTED))
    assert " dk_quad " in row_line and " FAIL " in row_line


def test_a_path_that_silently_falls_back_to_pytorch_fails(monkeypatch):
    """Right numbers from the wrong code: the Triton entry point runs the PyTorch path. Only
    the check of the kernels launched can see it, so it must."""

    def pytorch_instead(*args, chunk_size, quad_scale, lin_scale, **options):
        quad, lin = resolve_scales(quad_scale, lin_scale, chunk_size)
        return mixed_chunk_attention_torch(
            *args, chunk_size=chunk_size, quad_scale=quad, lin_scale=lin, **options
        )

    monkeypatch.setattr(triton_mixed_chunk, "mixed_chunk_attention_triton", pytorch_instead)
    report = flash_kernels.self_test(dtypes=["fp32"], seed=SEED, paths=[HOISTED])
    (row,) = report.rows
    assert row.error <= row.tolerance  # the numbers alone would pass
    assert row.verdict == "FAIL" and not report.passed
    assert any(
        "not launched" in problem and "mixed_chunk_fwd_kernel" in problem
        for problem in row.problems
    ), row.problems


def test_an_interrupted_run_keeps_its_rows():
    def interrupt(report):
        raise KeyboardInterrupt

    report = flash_kernels.self_test(
        dtypes=["fp32", "fp16"], seed=SEED, paths=["decode mixed"], on_row=interrupt
    )
    assert report.interrupted and not report.passed and len(report.rows) == 1
    assert "INTERRUPTED: 1 of 2 rows passed, 0 failed, 1 not run" in str(report)


@pytest.mark.slow  # a subprocess
@pytest.mark.skipif(DEVICE == "cuda", reason="the Triton backend can run on this machine")
def test_without_cuda_or_the_interpreter_it_says_it_cannot_run(tmp_path):
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = REPO_ROOT
    proc = subprocess.run(
        [sys.executable, "-m", "flash_kernels.selftest", "--json", str(tmp_path / "r.json")],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert proc.returncode == selftest.EXIT_UNAVAILABLE == 2, proc.stderr[-3000:]
    assert "the Triton backend cannot run here" in proc.stderr
    assert "TRITON_INTERPRET=1" in proc.stderr and proc.stdout == ""
    assert json.loads((tmp_path / "r.json").read_text())["passed"] is False


@pytest.mark.parametrize(
    "argv,words",
    [
        (["--paths", "no such path"], "no path matches"),
        (["--dtypes", "fp64"], "unknown dtype"),
        (["--device", "meta"], "runs on CUDA devices"),
    ]
    + (
        [(["--dtypes", "bf16"], "bfloat16 cannot run under the Triton interpreter")]
        if DEVICE == "cpu"
        else []
    ),
)
def test_bad_arguments_exit_2_with_a_reason(argv, words, capsys):
    assert selftest.main(argv + ["--quiet"]) == selftest.EXIT_UNAVAILABLE
    assert words in capsys.readouterr().err


def test_the_self_test_records_launches_inside_a_recording_caller():
    """It checks the kernels each path launched with record_launches; a caller recording too
    (tests/conftest.py with FLASH_KERNELS_RECORD_LAUNCHES) must keep its own record, and the
    inner block must not remove the caller's list when both hold the same launches."""
    with record_launches() as outer:
        report = flash_kernels.self_test(dtypes=["fp32"], seed=SEED, paths=["decode"])
        assert report.passed and len(report.rows) == 2
    assert [(r.kernel_name, r.constexprs["FROM_Z"]) for r in outer] == [
        ("mixed_chunk_decode_kernel", False)
    ] * 6 + [("mixed_chunk_decode_kernel", True)] * 6
