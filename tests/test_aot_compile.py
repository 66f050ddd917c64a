"""Ahead-of-time compile machinery (tools.aot_compile) on a toy tl.dot kernel.

The launch is recorded under TRITON_INTERPRET=1 in a child process (no GPU needed), then compiled
for sm_80 and sm_90 without the interpreter (in this process, or in a child process when this one
runs with TRITON_INTERPRET=1), and the cubin's resources are read with the wheel's cuobjdump.
"""
import json
import os
import subprocess
import sys

import pytest
import torch

from tools.aot_compile import (SHARED_MEMORY_LIMIT_BYTES, compile_record,
                                       dedupe_records, load_records, measure_launches,
                                       record_in_interpreter, render_markdown, retype_record,
                                       row_failed, save_records)
from flash_kernels.utils import specialize_argument

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
REPO_ROOT = os.path.dirname(TESTS_DIR)
if TESTS_DIR not in sys.path:
    sys.path.insert(0, TESTS_DIR)

TOY_SNIPPET = """
import torch
import aot_toy_kernels as toy
torch.manual_seed(0)
a = torch.randn(50, 64, dtype=torch.float16)   # 50 valid rows: T is do_not_specialize
b = torch.randn(64, 64, dtype=torch.float16)
c = toy.matmul_tile(a, b, block=64, num_warps=4)
expected = a.float() @ b.float()
assert torch.allclose(c[:50], expected, atol=1e-2, rtol=1e-2), (c[:50] - expected).abs().max()
toy.matmul_tile(a, b, block=64, num_warps=4)   # same launch again: deduplicated
"""


@pytest.fixture(scope="module")
def toy_records():
    return record_in_interpreter(TOY_SNIPPET, sys_path=[TESTS_DIR])


def test_records_reproduce_jit_specialisation(toy_records):
    assert len(toy_records) == 2
    rec = toy_records[0]
    assert (rec.kernel_module, rec.kernel_name) == ("aot_toy_kernels", "matmul_tile_kernel")
    assert rec.signature == {"a_ptr": "*fp16", "b_ptr": "*fp16", "c_ptr": "*fp32", "T": "i32",
                             "n_tiles": "constexpr", "stride_a": "i32", "scale": "fp32",
                             "ACC_EXTRA": "constexpr"}
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
    values = [0, 1, 2, 16, 48, -1, -16, 2**31 - 1, 2**31, -2**31, 2**40, 2**63, 1.0, 2.5,
              True, False, None, torch.empty(8, dtype=torch.float16),
              torch.empty(9, dtype=torch.float32)[1:], torch.empty(4, dtype=torch.bool),
              torch.empty(4, dtype=torch.bfloat16), torch.empty(4, dtype=torch.int64),
              torch.empty(4, dtype=torch.uint8), torch.empty(4, dtype=torch.float8_e4m3fn)]
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


def test_toy_kernel_resources_sm80_sm90(toy_records):
    records = dedupe_records(toy_records) + [retype_record(toy_records[0], "fp16", "bf16")]
    rows = measure_launches(records, capabilities=(80, 90), sys_path=[TESTS_DIR])
    assert len(rows) == 4
    print("\n" + render_markdown(rows, title="toy kernel"))
    for row in rows:
        assert row["error"] is None, row["error"]
        assert not row_failed(row)
        usage = row["usage"]
        assert 0 < usage["registers"] <= 255
        assert usage["stack_bytes"] == 0                      # no spills in a 64x64 tile
        # two 64x64 16-bit tiles staged in shared memory for the dot
        assert 0 < usage["shared_bytes"] <= SHARED_MEMORY_LIMIT_BYTES[row["capability"]]
        assert usage["mma_instructions"] > 0
        # wgmma (HGMMA) on Hopper only, for fp16 and bf16 alike
        assert usage["uses_wgmma"] == (row["capability"] == 90)


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
    proc = subprocess.run([sys.executable, "-m", "tools.aot_compile", str(records_path),
                           "--capabilities", "90", "--markdown", str(md)],
                          env=env, cwd=REPO_ROOT, capture_output=True, text=True)
    assert proc.returncode == 1, proc.stderr
    report = md.read_text()
    assert "**FAIL**: 1 compile error(s)" in report
    assert report.count("| `matmul_tile_kernel` |") == 2
    assert "| sm_90 |" in report and "| yes | ok |" in report


# Runs without the interpreter (a child process: this one may have TRITON_INTERPRET=1).
WARM_CACHE_SCRIPT = """
import json, os, sys
import torch
import aot_toy_kernels as toy
from triton.backends.compiler import GPUTarget
from triton.runtime.driver import driver
from tools.aot_compile import compile_record
from flash_kernels.utils import make_launch_record

# What the JIT specialises: a pointer 2 bytes past a multiple of 16, ints that are not multiples
# of 16 (stride_a) or not 1 (n_tiles), a do_not_specialize int, a float, constexprs.
a = torch.zeros(50 * 72 + 1, dtype=torch.float16)[1:]
b = torch.zeros(64, 64, dtype=torch.float16)
c = torch.zeros(64, 64)
args = dict(a_ptr=a, b_ptr=b, c_ptr=c, T=50, n_tiles=3, stride_a=72, scale=1.0)
constexprs = dict(HAS_SCALE=True, BLOCK=64)
record = make_launch_record(toy.matmul_tile_kernel, (1,), args, constexprs, num_warps=4, num_stages=2)
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
    proc = subprocess.run([sys.executable, "-c", WARM_CACHE_SCRIPT], env=env, cwd=REPO_ROOT,
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-4000:]
    result = json.loads(proc.stdout.strip().splitlines()[-1])
    assert result["jit"] == result["ahead"], "the JIT compiles a different source or options"
    assert result["entries_after_jit"] == result["entries_after_ahead"]
    assert len(result["entries_after_ahead"]) == 1


def test_bench_compile_report_assembles(toy_records, tmp_path, monkeypatch):
    """bench/compile_report.py end to end, with the op's recording replaced by the toy launch
    (the real configs need the Triton backend of the op)."""
    compile_report = pytest.importorskip("bench.compile_report")
    monkeypatch.setattr(compile_report, "record_config",
                        lambda cfg: dedupe_records(
                            [retype_record(r, "fp16", cfg["compile_dtype"])
                             if cfg.get("compile_dtype") else r for r in toy_records]))
    monkeypatch.setattr(sys, "path", sys.path + [TESTS_DIR])      # compile here, or in a child
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join([TESTS_DIR, os.environ.get("PYTHONPATH", "")]))
    out = tmp_path / "compile_report.md"
    rc = compile_report.main(["--only", "small fp16 causal", "paper bf16 causal + rel_bias",
                              "--output", str(out)])
    report = out.read_text()
    assert rc == 0, report
    assert "**PASS**: all 4 compiles succeeded" in report
    assert "## paper bf16 causal + rel_bias" in report and "| bf16,fp32 |" in report
    assert "| fp16,fp32 |" in report
