"""Shared pytest setup.

- The repository root is importable (for `csrc_ref`) and so is this folder (for `helpers`).
- Without a GPU, Triton kernels run on the CPU under the interpreter: TRITON_INTERPRET=1 must be
  set before triton is first imported, so it is set here, before any test module loads.
- Triton < 3.7's interpreter breaks under numpy >= 2.4; a test-time shim repairs it
  (tests/interpreter_shim.py, also imported by helpers.py for the processes tests start).
- Under the interpreter every load and store a kernel makes must stay inside its tensor
  arguments (tests/interpreter_memcheck.py; FLASH_KERNELS_MEMCHECK=0 turns it off): the CPU
  run sees the out-of-bounds accesses that fault on a GPU.
- Test selections (markers registered in pyproject.toml, set on the tests themselves):
    gpu   every test that touches CUDA when a GPU is present: the GPU run is `-m gpu`;
    slow  left out of the quick selection `-m "not slow"` (which still launches every kernel);
    big_memory  allocates a tensor of more than 2^31 elements: last in the GPU run.
  A test marks itself `slow` or `big_memory` (or its module: `pytestmark`); `gpu` is also
  added here by a rule, not by a list, so new test files join by themselves (see
  `is_gpu_test`). Tests are ordered so that the kernels' core correctness
  files come first, then the other GPU tests, fuzzing, the big-memory test, and CPU-only tests.
- FLASH_KERNELS_FUZZ_EXAMPLES=N: examples per fuzz test (tests/test_fuzz.py reads it; the GPU
  runbook lowers it).
- FLASH_KERNELS_TEST_REPORT=PATH: one JSON line per test outcome, appended as each test ends
  (so a run stopped by a time cap or a kill still leaves what ran): bench/gpu_summary.py.
- FLASH_KERNELS_RECORD_LAUNCHES=PATH: record every kernel launch of every test (its
  `tools.launch_recording.LaunchRecord`s) into PATH (JSON; one file per xdist worker, PATH.gwN);
  bench/gpu_selection.py estimates the GPU run's compile work from it.
"""

import json
import os
import sys

import pytest
import torch

_TESTS = os.path.dirname(os.path.abspath(__file__))
for path in (os.path.dirname(_TESTS), _TESTS):
    if path not in sys.path:
        sys.path.insert(0, path)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


# The shim first: it repairs the interpreter the memcheck then wraps.
# isort: off
import interpreter_shim  # noqa: E402,F401  (after TRITON_INTERPRET is set; see its docstring)
import interpreter_memcheck  # noqa: E402,F401  (out-of-bounds accesses fail under the interpreter)
# isort: on


# ---------------------------------------------------------------------------------------------
# Test selections
# ---------------------------------------------------------------------------------------------

#: The kernels' core correctness files, first in the GPU run: the Triton op against the
#: references (the bf16 checks included), the fused op, strides, torch.compile, determinism.
CORE_FILES = (
    "test_triton_mixed_chunk.py",
    "test_flash_attention.py",
    "test_strides.py",
    "test_torch_compile.py",
    "test_determinism.py",
)


def is_gpu_test(item) -> bool:
    """A test touches CUDA (and so is in the GPU run, `-m gpu`) when
    - it (or its class or module: `pytestmark = pytest.mark.gpu`) is marked `gpu`; or
    - its module follows the device convention: a module-level `DEVICE` ("cuda" when there is
      a GPU), which every file testing the kernels defines.
    """
    return item.get_closest_marker("gpu") is not None or hasattr(
        getattr(item, "module", None), "DEVICE"
    )


def _gpu_order(item) -> tuple:
    """Rank in the run: the core kernel files (in CORE_FILES' order), the other GPU tests,
    fuzzing, big memory, then the CPU-only tests."""
    filename = os.path.basename(str(item.path))
    if item.get_closest_marker("gpu") is None:
        return (4, 0)
    if item.get_closest_marker("big_memory") is not None:
        return (3, 0)
    if "fuzz" in filename:
        return (2, 0)
    if filename in CORE_FILES:
        return (0, CORE_FILES.index(filename))
    return (1, 0)


def pytest_collection_modifyitems(config, items):
    for item in items:
        if is_gpu_test(item):
            item.add_marker(pytest.mark.gpu)
    order = {id(item): (*_gpu_order(item), index) for index, item in enumerate(items)}
    items.sort(key=lambda item: order[id(item)])


# ---------------------------------------------------------------------------------------------
# Recording every test's kernel launches (opt-in)
# ---------------------------------------------------------------------------------------------

_recorded = {}


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    if not os.environ.get("FLASH_KERNELS_RECORD_LAUNCHES"):
        yield
        return
    from tools.launch_recording import record_launches

    with record_launches() as records:
        yield
    if records:
        from tools.aot_compile import record_to_dict

        _recorded[item.nodeid] = dict(
            gpu=item.get_closest_marker("gpu") is not None,
            slow=item.get_closest_marker("slow") is not None,
            launches=[record_to_dict(r) for r in records],
        )


def pytest_sessionfinish(session):
    path = os.environ.get("FLASH_KERNELS_RECORD_LAUNCHES")
    if not path or not _recorded:
        return
    worker = _xdist_worker(session.config)
    with open(f"{path}.{worker}" if worker else path, "w") as f:
        json.dump(_recorded, f, default=str)


# ---------------------------------------------------------------------------------------------
# A live report of every test's outcome (opt-in)
# ---------------------------------------------------------------------------------------------


def _outcome(report):
    """("passed" | "failed" | "error" | "skipped", message) of a test phase's report, or None
    for the phases that say nothing (a passing setup or teardown)."""
    if report.when == "call" and not report.skipped:
        outcome = report.outcome
    elif report.failed:
        outcome = "error"
    elif report.skipped:
        outcome = "skipped"
    else:
        return None
    if report.skipped:
        if hasattr(report, "wasxfail"):
            return outcome, f"xfail: {report.wasxfail}"
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        return outcome, reason.removeprefix("Skipped: ")
    if report.failed:
        crash = getattr(report.longrepr, "reprcrash", None)
        return outcome, crash.message if crash is not None else report.longreprtext[-500:]
    return outcome, ""


def _xdist_worker(config):
    """This process's xdist worker id ("gw0", ...), or None. Asked of pytest, not read from
    PYTEST_XDIST_WORKER: a pytest that a test starts (the runbook's dry run) inherits that
    variable from the worker it runs in without being a worker itself."""
    workerinput = getattr(config, "workerinput", None)
    return workerinput["workerid"] if workerinput else None


def pytest_configure(config):
    global _IS_XDIST_WORKER
    _IS_XDIST_WORKER = _xdist_worker(config) is not None


_IS_XDIST_WORKER = False


def pytest_runtest_logreport(report):
    path = os.environ.get("FLASH_KERNELS_TEST_REPORT")
    if not path or _IS_XDIST_WORKER:  # under xdist the controller writes
        return
    result = _outcome(report)
    if result is None:
        return
    with open(path, "a") as f:
        f.write(
            json.dumps(
                dict(
                    nodeid=report.nodeid,
                    outcome=result[0],
                    message=result[1],
                    seconds=round(report.duration, 3),
                )
            )
            + "\n"
        )
