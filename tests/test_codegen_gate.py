"""The codegen gate (tools/codegen_gate.py): no register transpose may feed a tensor-core product
on sm_90 (Triton 3.2-3.6 miscompile it: flash-linear-attention #640, triton #6124).

1. The TTGIR analysis on hand-written IR: each way a transposed value reaches a dot operand is
   caught, the harmless transposes are not, locations resolve through inlined call sites.
2. Toy kernels compiled for sm_90 with the installed Triton and with the GPU machines' Triton
   3.6 (FLASH_KERNELS_OTHER_TRITON_PYTHON): the two bad patterns (a dot result transposed in
   registers and dotted again; tl.trans of a computed tile into a dot) MUST be flagged, at the
   tl.trans line; the safe ones (S^T = K Q^T computed directly, a transposed load, tl.trans of
   a tile straight from memory) must not.
3. The package's kernels: a CI selection of the gate matrix (bench/compile_report.py
   GATE_MATRIX; the full matrix runs in `python -m bench.compile_report`), recorded for sm_90
   and compiled to TTGIR with both Triton versions: every kernel's flag values and tile
   choices, and the largest launch of every kernel in every dtype.
4. The paper shape (ARCHITECTURE_CHECK_CONFIGS), recorded for each NVIDIA architecture of the
   report, compiles to a binary for it and fits its shared memory.

The recording and the compiles of 2.-4. start once per session (`ci_compiles`), in child
processes, two at a time (the 2-core CI machine): about 170 CPU-seconds in all.
"""

# The hand-written TTGIR below keeps MLIR's one-operation-per-line form, longer than 100 columns:
# ruff: noqa: E501
import functools
import inspect
import os
import sys
import textwrap
import time

import numpy
import pytest
import triton
from interpreter_shim import version_tuple

from bench.compile_report import GATE_MATRIX, collect_recordings, recording_items
from tools.aot_compile import (
    NVIDIA_TARGETS,
    architecture,
    error_details,
    markdown_table,
    measure_concurrently,
    record_concurrently,
    record_from_dict,
    record_key,
)
from tools.codegen_gate import (
    describe_findings,
    find_register_transposes,
    flagged_rows,
    source_lines,
    summary_line,
)

TESTS_DIR = os.path.dirname(os.path.abspath(__file__))
if TESTS_DIR not in sys.path:
    sys.path.insert(0, TESTS_DIR)
import aot_toy_kernels  # noqa: E402  (after tests/ is on sys.path)

#: Recording runs the op under this environment's interpreter, which Triton < 3.7 cannot do for
#: loops with a run-time bound when numpy >= 2.4 is installed (docs/contract.md section 6).
needs_recording = pytest.mark.skipif(
    version_tuple(triton.__version__) < (3, 7) and version_tuple(numpy.__version__) >= (2, 4),
    reason=f"Triton {triton.__version__}'s interpreter cannot run loops with a run-time bound "
    f"under numpy {numpy.__version__}: the launches cannot be recorded",
)

#: A Python with the GPU machines' Triton (3.6; .ci/run makes one and exports this).
OTHER_TRITON_PYTHON = os.environ.get("FLASH_KERNELS_OTHER_TRITON_PYTHON")
needs_other_triton = pytest.mark.skipif(
    not OTHER_TRITON_PYTHON,
    reason="FLASH_KERNELS_OTHER_TRITON_PYTHON (a Python with the GPU "
    "machines' Triton 3.6, the version that miscompiles register transposes) is not set; "
    ".ci/run sets it",
)


# ---------------------------------------------------------------------------------------------
# 1. The analysis on hand-written TTGIR
# ---------------------------------------------------------------------------------------------

_HEADER = """\
#blocked = #ttg.blocked<{sizePerThread = [1, 8], threadsPerWarp = [4, 8], warpsPerCTA = [4, 1], order = [1, 0]}>
#blocked1 = #ttg.blocked<{sizePerThread = [8, 1], threadsPerWarp = [8, 4], warpsPerCTA = [1, 4], order = [0, 1]}>
#linear = #ttg.linear<{register = [[1, 0], [0, 8]], lane = [[2, 0], [4, 0]], warp = [[0, 16]], block = []}>
#loc = loc("/repo/flash_kernels/kernels/toy.py":10:0)
#mma = #ttg.nvidia_mma<{versionMajor = 3, versionMinor = 0, warpsPerCTA = [4, 1], instrShape = [16, 64, 16]}>
#mma1 = #ttg.nvidia_mma<{versionMajor = 2, versionMinor = 0, warpsPerCTA = [4, 1], instrShape = [16, 8]}>
#shared = #ttg.nvmma_shared<{swizzlingByteWidth = 128, transposed = false, elementBitWidth = 16}>
#shared1 = #ttg.nvmma_shared<{swizzlingByteWidth = 128, transposed = true, elementBitWidth = 16}>
#smem = #ttg.shared_memory
module attributes {"ttg.num-warps" = 4 : i32, ttg.target = "cuda:90"} {
  tt.func public @toy_kernel(%x_ptr: !tt.ptr<f16> {tt.divisibility = 16 : i32} loc("x_ptr"(#loc))) attributes {noinline = false} {
"""
_FOOTER = """\
    tt.return loc(#loc)
  } loc(#loc)
} loc(#loc)
#loc1 = loc("/repo/flash_kernels/kernels/toy.py":20:5)
#loc2 = loc("/repo/flash_kernels/kernels/toy.py":30:9)
#loc3 = loc("/repo/flash_kernels/backends/triton/kernels/common.py":120:31)
#loc4 = loc("/repo/flash_kernels/kernels/toy.py":40:13)
#loc5 = loc(callsite(#loc3 at #loc4))
#loc6 = loc("scores"(#loc5))
"""
T64 = "tensor<64x64xf32, #blocked>"
H64 = "tensor<64x64xf16, #blocked>"
DOT_A = "tensor<64x64xf16, #ttg.dot_op<{opIdx = 0, parent = #mma, kWidth = 2}>>"
DOT_B = "tensor<64x64xf16, #ttg.dot_op<{opIdx = 1, parent = #mma, kWidth = 2}>>"
ACC = "tensor<64x64xf32, #mma>"
MEM = "!ttg.memdesc<64x64xf16, #shared, #smem>"


def _module(body: str) -> str:
    """A TTGIR module around `body` (ops, one per line, indented by 4)."""
    return _HEADER + textwrap.indent(textwrap.dedent(body).strip("\n"), "    ") + "\n" + _FOOTER


def _findings(body: str):
    return find_register_transposes(_module(body))


def _dots(finding) -> list:
    """The dots a finding reaches, without their TTGIR line numbers."""
    return [dot.split(" (TTGIR line")[0] for dot in finding.dots]


def test_transpose_of_an_mma_accumulator_is_rejected():
    findings = _findings(f"""
        %acc = ttng.warp_group_dot %a, %b, %c {{inputPrecision = 0 : i32}} : {MEM} * {MEM} -> {ACC} loc(#loc1)
        %t = tt.trans %acc {{order = array<i32: 1, 0>}} : {ACC} -> tensor<64x64xf32, #linear> loc(#loc2)
        tt.store %p, %t : tensor<64x64x!tt.ptr<f32>, #linear> loc(#loc2)
    """)
    (finding,) = findings
    assert finding.source == "/repo/flash_kernels/kernels/toy.py:30"
    assert finding.operand_layout == "nvidia_mma" and finding.shape == [64, 64]
    assert finding.reasons == ["operand in a nvidia_mma register layout"] and not finding.dots


def test_blocked_transpose_reaching_a_dot_through_casts_and_layout_conversions():
    findings = _findings(f"""
        %t = tt.trans %x {{order = array<i32: 1, 0>}} : {T64} -> tensor<64x64xf32, #blocked1> loc(#loc2)
        %h = arith.truncf %t : tensor<64x64xf32, #blocked1> to tensor<64x64xf16, #blocked1> loc(#loc2)
        %s = arith.mulf %h, %h : tensor<64x64xf16, #blocked1> loc(#loc2)
        %a = ttg.convert_layout %s : tensor<64x64xf16, #blocked1> -> {DOT_A} loc(#loc1)
        %d = tt.dot %a, %b, %c, inputPrecision = tf32 : {DOT_A} * {DOT_B} -> {ACC} loc(#loc4)
    """)
    (finding,) = findings
    assert finding.operand_layout == "blocked"
    assert finding.reasons == ["result reaches a dot operand"]
    assert _dots(finding) == ["tt.dot (wgmma) operand A at /repo/flash_kernels/kernels/toy.py:40"]


def test_transpose_reaching_a_dot_through_a_branch_and_shared_memory():
    """The old key backward's pattern: tl.trans inside an scf.if, its result through the branch's
    result into shared memory, loaded back as the register operand A of a wgmma in a loop."""
    findings = _findings(f"""
        %w = scf.if %cond -> ({H64}) {{
          %t = tt.trans %x {{order = array<i32: 1, 0>}} : {T64} -> tensor<64x64xf32, #blocked1> loc(#loc2)
          %h = arith.truncf %t : tensor<64x64xf32, #blocked1> to {H64} loc(#loc2)
          scf.yield %h : {H64} loc(#loc2)
        }} else {{
          scf.yield %zero : {H64} loc(#loc1)
        }} loc(#loc1)
        %m = ttg.local_alloc %w : ({H64}) -> {MEM} loc(#loc1)
        %acc = scf.for %i = %c0 to %n step %c1 iter_args(%acc_in = %c) -> ({ACC})  : i32 {{
          %a = ttg.local_load %m : {MEM} -> {DOT_A} loc(#loc1)
          %d = ttng.warp_group_dot %a, %b, %acc_in {{inputPrecision = 0 : i32}} : {DOT_A} * {MEM} -> {ACC} loc(#loc4)
          scf.yield %d : {ACC} loc(#loc4)
        }} loc(#loc4)
    """)
    (finding,) = findings
    assert _dots(finding) == [
        "ttng.warp_group_dot (wgmma) operand A at /repo/flash_kernels/kernels/toy.py:40"
    ]


def test_transpose_carried_by_a_loop_and_stored_into_a_shared_buffer():
    """Loop-carried (scf.for iter_args) into a ttg.local_store of a buffer view that another view
    of the same buffer hands to a wgmma as operand B."""
    findings = _findings(f"""
        %buf = ttg.local_alloc : () -> !ttg.memdesc<2x64x64xf16, #shared, #smem, mutable> loc(#loc1)
        %t = tt.trans %x {{order = array<i32: 1, 0>}} : {H64} -> tensor<64x64xf16, #blocked1> loc(#loc2)
        %r:2 = scf.for %i = %c0 to %n step %c1 iter_args(%carried = %t, %acc_in = %c) -> (tensor<64x64xf16, #blocked1>, {ACC})  : i32 {{
          %slot = ttg.memdesc_index %buf[%i] : !ttg.memdesc<2x64x64xf16, #shared, #smem, mutable> -> {MEM} loc(#loc1)
          ttg.local_store %carried, %slot : tensor<64x64xf16, #blocked1> -> {MEM} loc(#loc1)
          %other = ttg.memdesc_index %buf[%j] : !ttg.memdesc<2x64x64xf16, #shared, #smem, mutable> -> {MEM} loc(#loc1)
          %d = ttng.warp_group_dot %a, %other, %acc_in {{inputPrecision = 0 : i32}} : {MEM} * {MEM} -> {ACC} loc(#loc4)
          scf.yield %carried, %d : tensor<64x64xf16, #blocked1>, {ACC} loc(#loc4)
        }} loc(#loc4)
    """)
    (finding,) = findings
    assert finding.dots and finding.dots[0].startswith("ttng.warp_group_dot (wgmma) operand B")


def test_harmless_transposes_pass():
    """A transposed shared-memory descriptor, a blocked transpose that is stored, one that only
    makes a mask (a comparison, the condition of a select), one that is the accumulator (not an
    A or B operand), and a 3-D transpose: nothing to reject."""
    assert (
        _findings(f"""
        %m = ttg.local_alloc %x : ({H64}) -> {MEM} loc(#loc1)
        %mt = ttg.memdesc_trans %m {{order = array<i32: 1, 0>}} : {MEM} -> !ttg.memdesc<64x64xf16, #shared1, #smem> loc(#loc2)
        %d = ttng.warp_group_dot %a, %mt, %c {{inputPrecision = 0 : i32}} : {MEM} * !ttg.memdesc<64x64xf16, #shared1, #smem> -> {ACC} loc(#loc4)
        %t = tt.trans %y {{order = array<i32: 1, 0>}} : {T64} -> tensor<64x64xf32, #blocked1> loc(#loc2)
        tt.store %p, %t : tensor<64x64x!tt.ptr<f32>, #blocked1> loc(#loc2)
        %t2 = tt.trans %y {{order = array<i32: 1, 0>}} : {T64} -> tensor<64x64xf32, #blocked1> loc(#loc2)
        %mask = arith.cmpf ogt, %t2, %zero : tensor<64x64xf32, #blocked1> loc(#loc2)
        %sel = arith.select %mask, %v, %w : tensor<64x64xi1, #blocked1>, {H64} loc(#loc2)
        %as = ttg.convert_layout %sel : {H64} -> {DOT_A} loc(#loc1)
        %d2 = tt.dot %as, %b, %c : {DOT_A} * {DOT_B} -> {ACC} loc(#loc4)
        %t3 = tt.trans %y {{order = array<i32: 1, 0>}} : {T64} -> tensor<64x64xf32, #blocked1> loc(#loc2)
        %acc = ttg.convert_layout %t3 : tensor<64x64xf32, #blocked1> -> {ACC} loc(#loc1)
        %d3 = tt.dot %a, %b, %acc : {DOT_A} * {DOT_B} -> {ACC} loc(#loc4)
        %t4 = tt.trans %z {{order = array<i32: 0, 2, 1>}} : tensor<2x64x64xf16, #blocked> -> tensor<2x64x64xf16, #blocked1> loc(#loc2)
    """)
        == []
    )


def test_sibling_regions_may_reuse_value_names():
    """MLIR scopes names by region: the %w of the else branch is not the transposed %w of the
    then branch, so only the then branch's dot is reached."""
    findings = _findings(f"""
        scf.if %cond {{
          %w = tt.trans %x {{order = array<i32: 1, 0>}} : {T64} -> tensor<64x64xf32, #blocked1> loc(#loc2)
          %a = ttg.convert_layout %w : tensor<64x64xf32, #blocked1> -> {DOT_A} loc(#loc1)
          %d = tt.dot %a, %b, %c : {DOT_A} * {DOT_B} -> {ACC} loc(#loc1)
        }} else {{
          %w = ttg.convert_layout %y : {T64} -> tensor<64x64xf32, #blocked1> loc(#loc1)
          %a = ttg.convert_layout %w : tensor<64x64xf32, #blocked1> -> {DOT_A} loc(#loc1)
          %d = tt.dot %a, %b, %c : {DOT_A} * {DOT_B} -> {ACC} loc(#loc4)
        }} loc(#loc1)
    """)
    (finding,) = findings
    assert _dots(finding) == ["tt.dot (wgmma) operand A at /repo/flash_kernels/kernels/toy.py:20"]


def test_each_finding_names_the_kind_of_dot():
    """A warp-level MMA (mma v2 accumulator), an FMA dot (blocked accumulator: fp32 at ieee
    precision) and a Hopper wgmma, all reached by one transpose."""
    findings = _findings(f"""
        %t = tt.trans %x {{order = array<i32: 1, 0>}} : {H64} -> tensor<64x64xf16, #blocked1> loc(#loc2)
        %a = ttg.convert_layout %t : tensor<64x64xf16, #blocked1> -> {DOT_A} loc(#loc1)
        %d1 = tt.dot %a, %b, %c1 : {DOT_A} * {DOT_B} -> tensor<64x64xf32, #mma1> loc(#loc1)
        %d2 = tt.dot %a, %b, %c2, inputPrecision = ieee : {DOT_A} * {DOT_B} -> {T64} loc(#loc1)
        %m = ttg.local_alloc %t : (tensor<64x64xf16, #blocked1>) -> {MEM} loc(#loc1)
        %d3 = ttng.warp_group_dot %m, %mb, %c3 {{inputPrecision = 0 : i32}} : {MEM} * {MEM} -> {ACC} loc(#loc1)
    """)
    (finding,) = findings
    kinds = sorted(dot.split(" operand")[0] for dot in finding.dots)
    assert kinds == ["tt.dot (FMA)", "tt.dot (mma v2)", "ttng.warp_group_dot (wgmma)"]


def test_locations_resolve_through_inlined_call_sites():
    """A named location around a call site: the tl.trans is in the callee (common.py), inlined
    at the caller's line. A file of another checkout (/repo/...) that exists here is named
    relative to this one (Triton's cache may hold another worktree's compile); toy.py does not
    exist, so its path stays."""
    findings = _findings(f"""
        %s = tt.trans %acc {{order = array<i32: 1, 0>}} : {ACC} -> {DOT_B} loc(#loc6)
    """)
    (finding,) = findings
    assert finding.source == "flash_kernels/backends/triton/kernels/common.py:120"
    assert finding.called_from == ["/repo/flash_kernels/kernels/toy.py:40"]
    assert finding.result_layout == "dot_op"
    assert "inlined at /repo/flash_kernels/kernels/toy.py:40" in finding.describe()


# ---------------------------------------------------------------------------------------------
# 2 and 3: what CI compiles, recorded and compiled once per session
# ---------------------------------------------------------------------------------------------

#: The toy kernels' runs (tests/aot_toy_kernels.py), fp16 and fp32, checked against PyTorch.
TOY_SNIPPET = """
import torch
import aot_toy_kernels as toy
gen = torch.Generator().manual_seed(0)
for dtype in (torch.float16, torch.float32):
    q, k, v = ((0.5 * torch.randn(64, 32, generator=gen)).to(dtype) for _ in range(3))
    for name in toy.TRANSPOSE_KERNELS:
        out = toy.transposed_product(name, q, k, v)
        expected = toy.transposed_product_reference(name, q, k, v)
        error = ((out - expected).abs().max() / expected.abs().max()).item()
        assert error < 1e-2, (name, dtype, error)
"""


def _gate_config(name):
    (cfg,) = [c for c in GATE_MATRIX if c["name"] == name]
    return cfg


#: The largest launch of every kernel in every dtype: S = 256, one full chunk of 256 tokens,
#: the fused op (roles formed from z, gate) with every option on (packed documents, state in
#: and out, causal, rel_bias), and the fused decoding step.
WORST_CASE_CONFIGS = [
    f"S=256 C=256 {dtype} {what}"
    for dtype in ("fp32", "fp16", "bf16")
    for what in (
        "flash_attention, causal, rel_bias, packed + state",
        "decode flash_attention_decode, rel_bias",
    )
]

#: Together with WORST_CASE_CONFIGS, every value of every kernel flag and every tile choice of
#: the gate matrix (chunk sizes 16 / 64 / 256 / None, S = 128 / 256; see
#: test_ci_selection_covers_every_flag_and_tile): the other options off, the unfused op, the
#: quadratic-only path, the one-chunk decoding step.
COVERAGE_CONFIGS = [
    "S=128 C=16 fp16 mixed_chunk_attention, non-causal",
    "S=128 C=64 bf16 mixed_chunk_attention, causal, rel_bias",
    "S=128 C=256 fp32 mixed_chunk_attention, non-causal, rel_bias, packed",
    "S=128 C=None bf16 quadratic only, causal, rel_bias",
    "S=256 C=None fp16 mixed_chunk_attention, causal",
    "S=128 C=None fp32 decode mixed_chunk_decode",
    "S=128 C=256 fp16 mixed_chunk_attention, causal, rel_bias, grads v",
    "S=128 C=64 fp32 mixed_chunk_attention, causal, rel_bias, grads q_quad+k_quad",
    "S=128 C=16 bf16 mixed_chunk_attention, causal, rel_bias, grads q_lin+k_lin",
]

CI_CONFIGS = WORST_CASE_CONFIGS + COVERAGE_CONFIGS

#: Recorded at this E: the launches equal the gate matrix's (value tiles are min(64, E) wide),
#: at a quarter of the interpreter time.
CI_RECORDED_E = 64

#: Compiled to the binary for every NVIDIA architecture of the report, each recorded for its
#: target: the paper shape (S = 128, C = 256) in bf16, the fused op with every option on and
#: the unfused op non-causal (the forward's widest value tile). Shared memory must fit; the full
#: matrix of shapes and dtypes per architecture is in bench/results/compile_report.md.
ARCHITECTURE_CHECK_CONFIGS = [
    "S=128 C=256 bf16 flash_attention, causal, rel_bias, packed + state",
    "S=128 C=256 bf16 mixed_chunk_attention, non-causal",
]

GATE_TARGET = "cuda:90"


class CiCompiles:
    """Everything the tests below compile, recorded and compiled together so that two child
    processes run at a time (2-core CI).

    Recorded (FLASH_KERNELS_TARGET set: the runtime may pick its tiles per target): the toy
    kernels and CI_CONFIGS for sm_90, ARCHITECTURE_CHECK_CONFIGS for every NVIDIA target.
    Compiled with this Triton and, when FLASH_KERNELS_OTHER_TRITON_PYTHON is set, the GPU
    machines': the toys to the binary and to TTGIR only (the same TTGIR either way), the CI
    configs' launches to TTGIR (all the gate reads; a compile of the largest fp32 tiles to the
    binary takes a minute), and with this Triton the architecture check's launches to the
    binary for every NVIDIA target."""

    def __init__(self):
        start = time.perf_counter()
        toy_item = dict(snippets={"toys": TOY_SNIPPET}, target=GATE_TARGET, sys_path=[TESTS_DIR])
        ci_configs = [dict(_gate_config(name), E=CI_RECORDED_E) for name in CI_CONFIGS]
        arch_configs = [
            dict(_gate_config(name), E=CI_RECORDED_E) for name in ARCHITECTURE_CHECK_CONFIGS
        ]
        ci_items = recording_items(ci_configs, [GATE_TARGET], jobs=2)
        arch_items = recording_items(arch_configs, NVIDIA_TARGETS, jobs=2)
        results = record_concurrently([toy_item] + ci_items + arch_items, jobs=2)
        toy_records, toy_errors = results[0]
        assert not toy_errors, toy_errors["toys"]
        self.toy_records = toy_records["toys"]
        self.records, errors = collect_recordings(
            ci_configs, ci_items, results[1 : 1 + len(ci_items)]
        )
        arch_records, arch_errors = collect_recordings(
            arch_configs, arch_items, results[1 + len(ci_items) :]
        )
        errors.update(arch_errors)
        assert not errors, "\n".join(f"{n} ({t}): {text}" for (n, t), text in errors.items())
        self.recording_seconds = time.perf_counter() - start

        launches = [r for name in CI_CONFIGS for r in self.records[(name, GATE_TARGET)]]
        gate_tasks = [
            dict(records=self.toy_records, targets=[GATE_TARGET], sys_path=[TESTS_DIR]),
            dict(
                records=self.toy_records,
                targets=[GATE_TARGET],
                sys_path=[TESTS_DIR],
                ttgir_only=True,
            ),
            dict(records=launches, targets=[GATE_TARGET], ttgir_only=True),
        ]
        tasks = gate_tasks + [
            dict(
                records=[r for name in ARCHITECTURE_CHECK_CONFIGS for r in arch_records[(name, t)]],
                targets=[t],
            )
            for t in NVIDIA_TARGETS
        ]
        if OTHER_TRITON_PYTHON:
            tasks += [dict(task, python=OTHER_TRITON_PYTHON) for task in gate_tasks]
        rows = measure_concurrently(tasks, jobs=2)
        self.toy_rows, self.toy_ttgir_rows, self.kernel_rows = rows[:3]
        self.architecture_rows = [
            row for task_rows in rows[3 : 3 + len(NVIDIA_TARGETS)] for row in task_rows
        ]
        self.other_toy_rows, self.other_toy_ttgir_rows, self.other_kernel_rows = (
            rows[-3:] if OTHER_TRITON_PYTHON else (None, None, None)
        )
        for row in self.kernel_rows + (self.other_kernel_rows or []):
            row["configs"] = [
                name
                for name in CI_CONFIGS
                if any(record_key(r) == _row_key(row) for r in self.records[(name, GATE_TARGET)])
            ]
        self.compiles = sum(map(len, rows))
        self.seconds = time.perf_counter() - start
        print(
            f"\ncodegen gate CI: {self.recording_seconds:.0f} s recording, {self.seconds:.0f} s "
            f"in all, {self.compiles} compiles"
        )


def _row_key(row) -> str:
    return record_key(record_from_dict(row["record"]))


@functools.lru_cache(maxsize=None)
def ci_compiles() -> CiCompiles:
    """The session's CiCompiles (the first test that needs it records and compiles)."""
    return CiCompiles()


class GateFailure(AssertionError):
    """The gate found register transposes feeding tensor-core products."""


def _toy_source_line(name: str) -> str:
    """ "tests/aot_toy_kernels.py:N" of the tl.trans in a bad toy kernel."""
    kernel, _ = aot_toy_kernels.TRANSPOSE_KERNELS[name]
    lines, first = inspect.getsourcelines(kernel.fn)
    (offset,) = [i for i, line in enumerate(lines) if "tl.trans(" in line]
    return f"tests/aot_toy_kernels.py:{first + offset}"


def _check_toys(rows, ttgir_rows):
    assert len(rows) == 2 * len(aot_toy_kernels.TRANSPOSE_KERNELS)
    for row, ttgir_row in zip(rows, ttgir_rows):
        assert row["error"] is None, row["error"]
        assert row["stage"] == "binary" and ttgir_row["stage"] == "ttgir"
        # compiling only to TTGIR (what the gate runs on the kernels) gives the same TTGIR
        assert ttgir_row["ttgir_sha256"] == row["ttgir_sha256"]
        assert ttgir_row["codegen_findings"] == row["codegen_findings"]
        name = row["record"]["kernel_name"].removesuffix("_kernel")
        _, bad = aot_toy_kernels.TRANSPOSE_KERNELS[name]
        findings = row["codegen_findings"]
        if bad:
            assert [f["source"] for f in findings] == [_toy_source_line(name)], (
                f"the gate must reject {name} (Triton {row['triton']}): {findings}"
            )
        else:
            assert findings == [], f"the gate must accept {name}: {findings}"
    # The safe control with a tl.trans of a tile from memory: a transpose the gate looked at.
    looked_at = {r["record"]["kernel_name"]: r["codegen_transposes"] for r in rows}
    assert looked_at["loaded_tile_transposed_kernel"] >= 1
    assert looked_at["scores_transposed_directly_kernel"] == 0


@needs_recording
def test_toy_kernels_installed_triton():
    compiles = ci_compiles()
    _check_toys(compiles.toy_rows, compiles.toy_ttgir_rows)


@needs_other_triton
@needs_recording
def test_toy_kernels_gpu_machines_triton():
    compiles = ci_compiles()
    assert compiles.other_toy_rows[0]["triton"] != triton.__version__, (
        "the other Python runs this Triton"
    )
    _check_toys(compiles.other_toy_rows, compiles.other_toy_ttgir_rows)


@needs_recording
def test_ci_selection_covers_every_flag_and_tile():
    """Every kernel of the package is launched, every boolean flag of every kernel is seen
    both on and off (unless it cannot be: EXCEPTIONS), and every tile size of the gate matrix's
    tile choices appears, in the CI selection's launches."""
    compiles = ci_compiles()
    launches = [r for name in CI_CONFIGS for r in compiles.records[(name, GATE_TARGET)]]
    seen = {}
    for record in launches:
        for flag, value in record.constexprs.items():
            seen.setdefault((record.kernel_name, flag), set()).add(value)
    kernels = {r.kernel_name for r in launches}
    assert kernels == {
        "chunk_state_scan_kernel",
        "mixed_chunk_fwd_kernel",
        "mixed_chunk_bwd_query_kernel",
        "mixed_chunk_bwd_key_kernel",
        "mixed_chunk_decode_kernel",
    }
    one_sided = sorted(
        f"{kernel}.{flag}={values.pop()}"
        for (kernel, flag), values in seen.items()
        if len(values) == 1
        and isinstance(next(iter(values)), bool)
        and f"{kernel}.{flag}" not in ONE_SIDED_FLAGS
    )
    assert not one_sided, f"flags the CI selection sees only one way (add a config): {one_sided}"
    blocks = {
        (kernel, flag): values
        for (kernel, flag), values in seen.items()
        if flag.startswith("BLOCK")
    }
    for (kernel, flag), expected in EXPECTED_TILES.items():
        assert expected <= blocks.get((kernel, flag), set()), (
            kernel,
            flag,
            blocks.get((kernel, flag)),
        )


#: Flags the ops only ever launch one way (in the whole gate matrix): none today.
ONE_SIDED_FLAGS = set()

#: Tile sizes the gate matrix launches (S = 128 / 256; chunks of 16, 64, 256 and None).
EXPECTED_TILES = {
    ("mixed_chunk_fwd_kernel", "BLOCK_M"): {16, 64},
    ("mixed_chunk_fwd_kernel", "BLOCK_S"): {128, 256},
    ("mixed_chunk_bwd_key_kernel", "BLOCK"): {16, 64},
    ("mixed_chunk_bwd_query_kernel", "BLOCK"): {16, 64},
}


def _assert_gate_passes(rows):
    assert rows and all(row["error"] is None for row in rows), "\n".join(
        error_details([row for row in rows if row["error"]])
    )
    print("\n" + summary_line(rows))
    if flagged_rows(rows):
        raise GateFailure(f"{summary_line(rows)}\n{describe_findings(rows)}")


@needs_recording
def test_kernels_pass_the_gate_installed_triton():
    _assert_gate_passes(ci_compiles().kernel_rows)


@needs_other_triton
@needs_recording
def test_kernels_pass_the_gate_gpu_machines_triton():
    rows = ci_compiles().other_kernel_rows
    assert rows[0]["triton"] != triton.__version__, "the other Python runs this Triton"
    _assert_gate_passes(rows)


class SharedMemoryOverflow(AssertionError):
    """A launch needs more shared memory than its architecture has."""


@needs_recording
@pytest.mark.parametrize("target", NVIDIA_TARGETS)
def test_paper_shape_compiles_and_fits(target):
    """Every launch of ARCHITECTURE_CHECK_CONFIGS, recorded for `target`, compiles to a binary
    for it, with tensor-core instructions, within its register and shared memory limits."""
    rows = [row for row in ci_compiles().architecture_rows if row["target"] == target]
    assert {row["record"]["kernel_name"] for row in rows} == {
        "chunk_state_scan_kernel",
        "mixed_chunk_fwd_kernel",
        "mixed_chunk_bwd_query_kernel",
        "mixed_chunk_bwd_key_kernel",
    }
    failed = [row for row in rows if row["error"] or row["over_register_limit"]]
    assert not failed, "\n".join(markdown_table(failed) + error_details(failed))
    for row in rows:
        assert row["stage"] == "binary" and row["usage"]["tensor_core_instructions"] > 0
    over = [row for row in rows if row["over_shared_limit"]]
    if over:
        raise SharedMemoryOverflow(
            f"over {architecture(target).shared_memory_bytes:,} B of shared memory:\n"
            + "\n".join(markdown_table(over))
        )


@needs_recording
def test_the_gate_finds_the_same_source_lines_with_both_tritons():
    """Not a requirement of the kernels, a check of the gate: where both versions compiled the
    same launches, they agree on which source lines transpose into dots (Triton's layouts
    changed between 3.6 and 3.9; a difference would deserve a look)."""
    compiles = ci_compiles()
    if compiles.other_kernel_rows is None:
        pytest.skip("FLASH_KERNELS_OTHER_TRITON_PYTHON is not set")
    assert source_lines(compiles.kernel_rows) == source_lines(compiles.other_kernel_rows)


def test_config_names_are_in_the_gate_matrix():
    names = {c["name"] for c in GATE_MATRIX}
    assert set(CI_CONFIGS) <= names, set(CI_CONFIGS) - names
    assert set(ARCHITECTURE_CHECK_CONFIGS) <= names
