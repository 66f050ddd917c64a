"""Ahead-of-time compile machinery (tools/aot_compile.py) on a toy tl.dot kernel.

The launch is recorded under TRITON_INTERPRET=1 in a child process (no GPU needed), then compiled
for every architecture of the report (NVIDIA sm_80 ... sm_120, AMD gfx942 / gfx90a) without the
interpreter (in child processes when this one runs with TRITON_INTERPRET=1), and the resources
are read from the binary: cuobjdump's for a cubin, the code object metadata for AMD.
"""

import json
import os
import subprocess
import sys

import pytest
import torch

from tools.aot_compile import (
    AMD_TARGETS,
    ARCHITECTURES,
    NVIDIA_TARGETS,
    TARGET_VARIABLE,
    architecture,
    compile_record,
    dedupe_records,
    load_records,
    measure_launches,
    record_snippets_in_interpreter,
    render_markdown,
    retype_record,
    row_failed,
    save_records,
    target_name,
)
from tools.launch_recording import specialize_argument

pytestmark = pytest.mark.slow  # the ahead-of-time compile machinery on a toy kernel

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(TESTS_DIR)
if TESTS_DIR not in sys.path:
    sys.path.insert(0, TESTS_DIR)

TOY_SNIPPET = """
import os
import torch
import aot_toy_kernels as toy
assert os.environ["FLASH_KERNELS_TARGET"] == "cuda:86", os.environ.get("FLASH_KERNELS_TARGET")
torch.manual_seed(0)
a = torch.randn(50, 64, dtype=torch.float16)   # 50 valid rows: T is do_not_specialize
b = torch.randn(64, 64, dtype=torch.float16)
c = toy.matmul_tile(a, b, block=64, num_warps=4)
expected = a.float() @ b.float()
assert torch.allclose(c[:50], expected, atol=1e-2, rtol=1e-2), (c[:50] - expected).abs().max()
toy.matmul_tile(a, b, block=64, num_warps=4)   # same launch again: deduplicated
"""


FAILING_SNIPPET = "raise ValueError('this snippet fails on purpose')"
TRANSPOSES_SNIPPET = """
import torch
import aot_toy_kernels as toy
q, k, v = (torch.randn(64, 32, dtype=torch.float16) for _ in range(3))
toy.transposed_product("dot_result_transposed", q, k, v)
"""


@pytest.fixture(scope="module")
def toy_recording():
    """The toy snippets and a failing one, recorded in one child for sm_86."""
    return record_snippets_in_interpreter(
        {"toy": TOY_SNIPPET, "failing": FAILING_SNIPPET, "transposes": TRANSPOSES_SNIPPET},
        sys_path=[TESTS_DIR],
        target="sm_86",
    )


@pytest.fixture(scope="module")
def toy_records(toy_recording):
    records, _ = toy_recording
    return records["toy"]


def test_recording_names_the_target_and_reports_failing_snippets(toy_recording):
    """The child runs with FLASH_KERNELS_TARGET set (TOY_SNIPPET asserts it), and a snippet that
    raises is reported with its traceback while the others still record."""
    records, errors = toy_recording
    assert TARGET_VARIABLE == "FLASH_KERNELS_TARGET"
    assert set(records) == {"toy", "transposes"} and set(errors) == {"failing"}
    assert "this snippet fails on purpose" in errors["failing"]


def test_target_names():
    assert [target_name(t) for t in (90, "90", "sm_90", "cuda:90")] == ["cuda:90"] * 4
    assert target_name("gfx942") == target_name("hip:gfx942") == "hip:gfx942"
    with pytest.raises(ValueError, match="unknown target"):
        target_name("tpu")
    assert NVIDIA_TARGETS == ("cuda:80", "cuda:86", "cuda:89", "cuda:90", "cuda:100", "cuda:120")
    assert AMD_TARGETS == ("hip:gfx942", "hip:gfx90a")
    limits = {t: a.shared_memory_bytes for t, a in ARCHITECTURES.items()}
    assert limits == {
        "cuda:80": 166_912,
        "cuda:86": 101_376,
        "cuda:89": 101_376,
        "cuda:90": 232_448,
        "cuda:100": 232_448,
        "cuda:120": 101_376,
        "hip:gfx942": 65_536,
        "hip:gfx90a": 65_536,
    }


def test_records_reproduce_jit_specialisation(toy_records):
    assert len(toy_records) == 2
    rec = toy_records[0]
    assert (rec.kernel_module, rec.kernel_name) == ("aot_toy_kernels", "matmul_tile_kernel")
    assert rec.signature == {
        "a_ptr": "*fp16",
        "b_ptr": "*fp16",
        "c_ptr": "*fp32",
        "T": "i32",
        "n_tiles": "constexpr",
        "stride_a": "i32",
        "scale": "fp32",
        "ACC_EXTRA": "constexpr",
    }
    # n_tiles == 1 becomes the constexpr 1; the default ACC_EXTRA=None is bound as the JIT does
    assert rec.constexprs == {"n_tiles": 1, "HAS_SCALE": False, "BLOCK": 64, "ACC_EXTRA": None}
    # T (do_not_specialize) is never a 16-divisibility candidate, stride_a = 64 is
    assert sorted(rec.divisible_by_16) == ["a_ptr", "b_ptr", "c_ptr", "stride_a"]
    assert (rec.num_warps, rec.num_stages, rec.grid) == (4, 2, (1,))
    assert len(dedupe_records(toy_records)) == 1


def test_specialize_argument_matches_triton():
    """The pure-Python mirror agrees with Triton's own (native) specialisation."""
    native = pytest.importorskip("triton._C.libtriton").native_specialize_impl
    from triton.backends.nvidia.compiler import CUDABackend

    values = [
        0,
        1,
        2,
        16,
        48,
        -1,
        -16,
        2**31 - 1,
        2**31,
        -(2**31),
        2**40,
        2**63,
        1.0,
        2.5,
        True,
        False,
        None,
        torch.empty(8, dtype=torch.float16),
        torch.empty(9, dtype=torch.float32)[1:],
        torch.empty(4, dtype=torch.bool),
        torch.empty(4, dtype=torch.bfloat16),
        torch.empty(4, dtype=torch.int64),
        torch.empty(4, dtype=torch.uint8),
        torch.empty(4, dtype=torch.float8_e4m3fn),
    ]
    for value in values:
        for specialize in (True, False):
            for align in (True, False):
                ty, attr = native(CUDABackend, value, False, specialize, align)
                mine_ty, is_constant, div16 = specialize_argument(value, specialize, align)
                assert mine_ty == ty, (value, specialize, align)
                assert is_constant == (ty == "constexpr"), (value, specialize, align)
                assert div16 == (attr == "D"), (value, specialize, align)


def test_save_load_roundtrip(toy_records, tmp_path):
    import triton.language as tl

    rec = retype_record(toy_records[0])
    rec.constexprs["DTYPE"] = tl.bfloat16
    path = tmp_path / "records.json"
    save_records([rec], path)
    (back,) = load_records(path)
    assert back == rec
    assert back.signature["a_ptr"] == "*bf16" and back.signature["c_ptr"] == "*fp32"


def test_compile_refuses_interpreter(toy_records, monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        compile_record(toy_records[0], 90)


#: The tensor-core instructions each architecture's binary must hold for a 16-bit tl.dot.
TENSOR_CORE_OPCODES = {
    "cuda:80": "HMMA",
    "cuda:86": "HMMA",
    "cuda:89": "HMMA",
    "cuda:90": "HGMMA",
    "cuda:100": "UTCHMMA",
    "cuda:120": "HMMA",
    "hip:gfx942": "v_mfma",
    "hip:gfx90a": "v_mfma",
}


def test_toy_kernel_resources_on_every_architecture(toy_records):
    """fp16 on every architecture of the report, bf16 on sm_80 and sm_90."""
    fp16 = dedupe_records(toy_records)
    bf16 = [retype_record(toy_records[0], "fp16", "bf16")]
    rows = measure_launches(
        fp16, targets=list(ARCHITECTURES), sys_path=[TESTS_DIR], jobs=2
    ) + measure_launches(bf16, targets=("cuda:80", "cuda:90"), sys_path=[TESTS_DIR])
    assert len(rows) == len(ARCHITECTURES) + 2
    print("\n" + render_markdown(rows, title="toy kernel"))
    for row in rows:
        assert row["error"] is None, row["error"]
        assert not row_failed(row)
        arch = architecture(row["target"])
        usage = row["usage"]
        assert 0 < usage["registers"] <= arch.max_registers
        assert usage["spill_bytes"] == 0  # no spills in a 64x64 tile
        # two 64x64 16-bit tiles staged in shared memory (LDS) for the dot
        assert 0 < usage["shared_bytes"] <= arch.shared_memory_bytes
        opcodes = usage["tensor_core_opcodes"]
        assert opcodes and all(
            op.startswith(TENSOR_CORE_OPCODES[row["target"]]) for op in opcodes
        ), opcodes
        assert usage["tensor_core_instructions"] == sum(opcodes.values())
        # wgmma (HGMMA) on Hopper only, for fp16 and bf16 alike
        assert usage["uses_wgmma"] == (row["target"] == "cuda:90")
        # the codegen gate looks at sm_90 only; this kernel transposes nothing
        assert row["codegen_findings"] == ([] if row["target"] == "cuda:90" else None)


def test_cli_reports_compile_errors(toy_records, tmp_path):
    """A record that cannot compile (tl.arange of 48: not a power of two) makes the CLI fail,
    with the error in the report; the good record still compiles."""
    good = toy_records[0]
    bad = retype_record(good)
    bad.constexprs["BLOCK"] = 48
    records_path = tmp_path / "records.json"
    save_records([good, bad], records_path)
    md = tmp_path / "report.md"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([REPO_ROOT, TESTS_DIR, env.get("PYTHONPATH", "")])
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "tools.aot_compile",
            str(records_path),
            "--targets",
            "90",
            "--markdown",
            str(md),
        ],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 1, proc.stderr
    report = md.read_text()
    assert "**FAIL**: 1 compile error(s)" in report
    assert report.count("| `matmul_tile_kernel` |") == 2
    assert "| sm_90 |" in report and " HGMMA | ok |" in report


# Runs without the interpreter (a child process: this one may have TRITON_INTERPRET=1).
WARM_CACHE_SCRIPT = """
import json, os, sys
import torch
import aot_toy_kernels as toy
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver
from tools.launch_recording import make_launch_record
from tools.aot_compile import compile_record

# What the JIT specialises: a pointer 2 bytes past a multiple of 16, ints that are not multiples
# of 16 (stride_a) or not 1 (n_tiles), a do_not_specialize int, a float, constexprs.
a = torch.zeros(50 * 72 + 1, dtype=torch.float16)[1:]
b = torch.zeros(64, 64, dtype=torch.float16)
c = torch.zeros(64, 64)
args = dict(a_ptr=a, b_ptr=b, c_ptr=c, T=50, n_tiles=3, stride_a=72, scale=1.0)
constexprs = dict(HAS_SCALE=True, BLOCK=64)
record = make_launch_record(toy.matmul_tile_kernel, (1,), args, constexprs, num_warps=4,
                            num_stages=2)
ahead = compile_record(record, 90)
entries = sorted(os.listdir(os.environ["TRITON_CACHE_DIR"]))

class Sm90:   # the JIT asks its driver for a device, a stream and the target, nothing else here
    def get_current_device(self): return 0
    def get_current_stream(self, device=None): return 0
    def get_current_target(self): return GPUTarget("cuda", 90, 32)

driver.set_active(Sm90())
jit = toy.matmul_tile_kernel.warmup(**args, **constexprs, grid=(1,), num_warps=4, num_stages=2)
print(json.dumps(dict(ahead=ahead.hash, jit=jit.hash, entries_after_ahead=entries,
                      entries_after_jit=sorted(os.listdir(os.environ["TRITON_CACHE_DIR"])))))
"""


def test_ahead_of_time_compile_warms_the_jit_cache(tmp_path):
    """compile_record builds exactly the JIT's source and options: the JIT, given the real
    arguments of the recorded launch, finds the ahead-of-time compile in its cache (same key,
    no new cache entry)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = os.pathsep.join([REPO_ROOT, TESTS_DIR, env.get("PYTHONPATH", "")])
    env["TRITON_CACHE_DIR"] = str(tmp_path / "cache")
    proc = subprocess.run(
        [sys.executable, "-c", WARM_CACHE_SCRIPT],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["jit"] == result["ahead"], "the JIT compiles a different source or options"
    assert result["entries_after_jit"] == result["entries_after_ahead"]
    assert len(result["entries_after_ahead"]) == 1


def test_bench_compile_report_assembles(toy_recording, tmp_path, monkeypatch):
    """bench/compile_report.py end to end, with the op's recording replaced by toy launches
    (the real configs take minutes): the toy tl.dot launch for an architecture config, and a
    launch that transposes a dot result in registers for a gate config, which the codegen gate
    must report (by source line) and fail."""
    compile_report = pytest.importorskip("bench.compile_report")
    import aot_toy_kernels

    records, _ = toy_recording
    gate_configs = [id(cfg) for cfg in compile_report.GATE_MATRIX]

    def recorded(configs, targets, jobs=2):
        launches = {}
        for cfg in configs:
            source = records["transposes"] if id(cfg) in gate_configs else records["toy"]
            launches.update({(cfg["name"], target): dedupe_records(source) for target in targets})
        return launches, {}

    monkeypatch.setattr(compile_report, "record_configs", recorded)
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([TESTS_DIR, os.environ.get("PYTHONPATH", "")]))
    monkeypatch.delenv("FLASH_KERNELS_OTHER_TRITON_PYTHON", raising=False)
    out = tmp_path / "compile_report.md"
    rc = compile_report.main(
        [
            "--only",
            "paper bf16 causal + rel_bias",
            "S=128 C=256 bf16 mixed_chunk_attention, causal, rel_bias",
            "--targets",
            "cuda:80",
            "cuda:90",
            "--output",
            str(out),
        ]
    )
    report = out.read_text()
    assert rc == 1, report  # the gate fails
    assert "Architecture report: **PASS**: all 2 compiles succeeded" in report
    assert "| sm_80 | 1 | 0 | 0 | 0 (0) |" in report and "| sm_90 | 1 | 0 | 0 | 0 (0) |" in report
    assert "### paper bf16 causal + rel_bias" in report and "| `matmul_tile_kernel` | 4 |" in report
    with open(aot_toy_kernels.__file__) as f:
        source_line = next(
            i for i, line in enumerate(f.read().splitlines(), 1) if "tl.trans(scores)" in line
        )
    assert "**Codegen gate FAIL**: 1 of 1 launches compiled for sm_90" in report, report
    assert (
        f"| `tests/aot_toy_kernels.py:{source_line}` | `dot_result_transposed_kernel` |" in report
    )
