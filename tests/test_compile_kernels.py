"""Ahead-of-time compile of every kernel the op launches, for sm_80 and sm_90, without a GPU.

The launches are recorded per target (FLASH_KERNELS_TARGET set) while the op runs forward +
backward under TRITON_INTERPRET=1 (in a child process), then compiled to cubin with
`triton.compile` (see tools/aot_compile.py and bench/compile_report.py, which writes the full
table for every architecture to bench/results/compile_report.md; tests/test_codegen_gate.py
checks the other NVIDIA architectures and the codegen gate).
This catches what the interpreter lets through: compile errors, shared memory over the
hardware limit, more than 255 registers, and spills at the paper shape on sm_90.
"""

import functools
import os

import numpy
import pytest
import triton
from interpreter_shim import version_tuple

from bench.compile_report import ARCHITECTURE_CONFIGS, RECORDED_E, record_config
from tools.aot_compile import (
    error_details,
    markdown_table,
    measure_launches,
    record_key,
    row_failed,
)

ALL_KERNELS = {
    "chunk_state_scan_kernel",
    "mixed_chunk_fwd_kernel",
    "mixed_chunk_bwd_query_kernel",
    "mixed_chunk_bwd_key_kernel",
}
CASES = {
    "small fp16 causal": ALL_KERNELS,
    "small fp32 non-causal, no bias": ALL_KERNELS,
    "small fp16 one long chunk (chunk_size=None, T > 256: scores recomputed)": ALL_KERNELS,
    "paper bf16 causal + rel_bias": ALL_KERNELS,
    "paper bf16 non-causal": ALL_KERNELS,
    "paper bf16 flash_attention (roles from z, gate), causal + rel_bias": ALL_KERNELS,
    "paper bf16 flash_attention packed documents + state, causal + rel_bias": ALL_KERNELS,
    "paper bf16 decode: flash_attention_decode (roles from z, gate) + rel_bias": {
        "mixed_chunk_decode_kernel"
    },
}


# The launches are recorded under the interpreter in a fresh process of the package's own
# recorder (tools.aot_compile), which the test-time shim (tests/interpreter_shim.py)
# does not reach: there Triton < 3.7's interpreter fails on loops with a run-time bound when
# numpy >= 2.4 is installed (docs/contract.md section 6).
# slow: records under the interpreter, compiles to cubin
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(
        version_tuple(triton.__version__) < (3, 7) and version_tuple(numpy.__version__) >= (2, 4),
        reason=f"Triton {triton.__version__}'s interpreter cannot run loops with a run-time bound "
        f"under numpy {numpy.__version__}: the launches cannot be recorded",
    ),
]

# Spill-free at the paper shape was established with this Triton; other versions allocate
# registers differently, so elsewhere only compiling (and the limits) is checked.
SPILL_CHECKED_TRITON = "3.9"


# A Python with the GPU machine's Triton (3.6; .ci/run makes one): the paper-shape launches must
# compile with it too. Its spills are listed, not asserted (bench/results/compile_report.md).
OTHER_TRITON_PYTHON = os.environ.get("FLASH_KERNELS_OTHER_TRITON_PYTHON")


@functools.lru_cache(maxsize=None)
def _records(name, target):
    """The config's launches for a target, recorded once per session (recording runs the
    interpreter)."""
    cfg = next(c for c in ARCHITECTURE_CONFIGS if c["name"] == name)
    return tuple(record_config(cfg, target=target))


@pytest.mark.parametrize("name", list(CASES))
def test_every_launch_compiles_for_sm80_and_sm90(name):
    rows = []
    for target in ("cuda:80", "cuda:90"):
        records = list(_records(name, target))
        assert {r.kernel_name for r in records} == CASES[name]
        rows += measure_launches(records, (target,), jobs=2)
    failed = [row for row in rows if row_failed(row)]
    assert not failed, "\n".join(markdown_table(failed) + error_details(failed))
    if name.startswith("paper") and triton.__version__.startswith(SPILL_CHECKED_TRITON):
        sm90 = [row for row in rows if row["target"] == "cuda:90"]
        spilling = [row for row in sm90 if row["usage"]["spill_bytes"]]
        assert not spilling, "spills at the paper shape on sm_90:\n" + "\n".join(
            markdown_table(spilling)
        )
        assert all(row["usage"]["uses_wgmma"] for row in sm90), (
            "a paper-shape kernel does not use Hopper's wgmma on sm_90"
        )


@pytest.mark.skipif(
    not OTHER_TRITON_PYTHON,
    reason="FLASH_KERNELS_OTHER_TRITON_PYTHON (a Python "
    "with the GPU machine's Triton 3.6) is not set; .ci/run sets it",
)
@pytest.mark.parametrize("name", [name for name in CASES if name.startswith("paper")])
def test_paper_launches_compile_with_the_gpu_machines_triton(name):
    rows = measure_launches(
        list(_records(name, "cuda:90")), ("cuda:90",), python=OTHER_TRITON_PYTHON, jobs=2
    )
    assert rows and all(row["triton"] != triton.__version__ for row in rows), (
        f"{OTHER_TRITON_PYTHON} runs this process's Triton {triton.__version__}"
    )
    failed = [row for row in rows if row_failed(row)]
    assert not failed, "\n".join(markdown_table(failed) + error_details(failed))
    spilling = [row for row in rows if row["usage"]["spill_bytes"]]
    if spilling:
        print(
            f"\nTriton {rows[0]['triton']} spills at the paper shape on sm_90:\n"
            + "\n".join(markdown_table(spilling))
        )


def test_the_paper_E_records_the_launches_of_the_recorded_E():
    """bench/compile_report.py records the paper shape at E = RECORDED_E instead of 1536 (the
    interpreter's time grows with E): both must launch the same kernels with the same types,
    constexprs, specialisations, warps and stages."""
    name = "paper bf16 flash_attention packed documents + state, causal + rel_bias"
    cfg = next(c for c in ARCHITECTURE_CONFIGS if c["name"] == name)
    assert cfg["E"] == RECORDED_E != 1536
    at_paper_E = record_config(dict(cfg, E=1536), target="cuda:90")
    assert [record_key(r) for r in at_paper_E] == [record_key(r) for r in _records(name, "cuda:90")]
