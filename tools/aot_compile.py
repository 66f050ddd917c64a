"""Ahead-of-time compile of recorded kernel launches for sm_80 / sm_90, on a machine with no GPU.

Every kernel launch of the ops goes through `flash_kernels.utils.launch`, which (inside
`record_launches()`) writes a `LaunchRecord`: the kernel, its argument types, constexpr values,
16-divisibility specialisations and num_warps/num_stages, as Triton's JIT would specialise it.
This module compiles those records with `triton.compile` for a chosen GPU target (the whole
pipeline down to PTX and cubin runs on the CPU) and reads the resources of the result with the
cuobjdump bundled in the Triton wheel: registers, stack (spills), shared memory, and whether the
Hopper wgmma instructions (SASS `HGMMA`) are used.

Typical use, without a GPU (docs/contract.md section 6):

    records = record_in_interpreter("import ...; run the op once")   # TRITON_INTERPRET=1 child
    rows = measure_launches(records, capabilities=(80, 90))          # compiles, no interpreter
    print(render_markdown(rows))

or from the shell:

    python -m tools.aot_compile records.json --capabilities 80 90 --markdown out.md

Compiling needs Triton's real JIT, so it refuses to run with TRITON_INTERPRET=1 set (under the
interpreter `triton.jit` makes interpreter objects that cannot be compiled); recording needs the
interpreter (no GPU here), hence the two processes.
"""
import argparse
import dataclasses
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import warnings

from flash_kernels.utils import LaunchRecord, triton_interpret_enabled

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: Largest shared memory one block may use (opt-in maximum), in bytes: A100 163 KB, H100 227 KB.
SHARED_MEMORY_LIMIT_BYTES = {80: 163 * 1024, 86: 99 * 1024, 89: 99 * 1024, 90: 227 * 1024}

#: The register file allows at most 255 registers per thread.
MAX_REGISTERS = 255


# --------------------------------------------------------------------------------------------
# Records: JSON (de)serialisation, dtype rewriting, deduplication
# --------------------------------------------------------------------------------------------

def _encode_value(value):
    """JSON-safe form of a constexpr value (Triton dtypes become {"tl_dtype": "bf16"})."""
    if type(value).__name__ in ("dtype", "pointer_type") and hasattr(value, "name"):
        return {"tl_dtype": value.name}
    if isinstance(value, tuple):
        return {"tuple": [_encode_value(v) for v in value]}
    return value


def _decode_value(value):
    if isinstance(value, dict) and "tl_dtype" in value:
        import triton.language as tl
        return tl.dtype(value["tl_dtype"])
    if isinstance(value, dict) and "tuple" in value:
        return tuple(_decode_value(v) for v in value["tuple"])
    return value


def record_to_dict(record: LaunchRecord) -> dict:
    """`dataclasses.asdict(record)` with JSON-safe constexpr values."""
    d = dataclasses.asdict(record)
    d["constexprs"] = {k: _encode_value(v) for k, v in record.constexprs.items()}
    d["grid"] = list(record.grid)
    return d


def record_from_dict(d: dict) -> LaunchRecord:
    """Inverse of `record_to_dict` (`LaunchRecord(**d)` with decoded constexprs)."""
    d = dict(d)
    d["constexprs"] = {k: _decode_value(v) for k, v in d["constexprs"].items()}
    d["grid"] = tuple(d.get("grid", ()))
    return LaunchRecord(**d)


def save_records(records, path):
    """Write launch records to a JSON file (a list of `record_to_dict`)."""
    with open(path, "w") as f:
        json.dump([record_to_dict(r) for r in records], f, indent=1)


def load_records(path) -> list:
    """Read launch records written by `save_records`."""
    with open(path) as f:
        return [record_from_dict(d) for d in json.load(f)]


def retype_record(record: LaunchRecord, old: str = "fp16", new: str = "bf16") -> LaunchRecord:
    """A copy of `record` with element type `old` replaced by `new` in pointer/scalar types and in
    dtype constexprs. Used to compile for bf16 what was recorded in fp16 under the interpreter
    (which cannot run bf16 dots); the op must choose the same constexprs for both dtypes."""
    signature = {name: (ty[:-len(old)] + new if ty.lstrip("*") == old else ty)
                 for name, ty in record.signature.items()}
    constexprs = {}
    for name, value in record.constexprs.items():
        if type(value).__name__ == "dtype" and getattr(value, "name", None) == old:
            import triton.language as tl
            value = tl.dtype(new)
        constexprs[name] = value
    return dataclasses.replace(record, signature=signature, constexprs=constexprs)


def record_key(record: LaunchRecord) -> str:
    """What makes two launches compile to the same binary (everything but the grid)."""
    d = record_to_dict(record)
    d.pop("grid")
    d["divisible_by_16"] = sorted(d["divisible_by_16"])
    return json.dumps(d, sort_keys=True, default=str)


def dedupe_records(records) -> list:
    """The distinct launches in `records`, first occurrence order."""
    seen, out = set(), []
    for record in records:
        key = record_key(record)
        if key not in seen:
            seen.add(key)
            out.append(record)
    return out


# --------------------------------------------------------------------------------------------
# Recording launches under the interpreter (in a child process)
# --------------------------------------------------------------------------------------------

_RECORDER_TEMPLATE = """\
import sys
sys.path[:0] = {sys_path!r}
from flash_kernels.utils import record_launches
from tools.aot_compile import save_records
with open({snippet_path!r}) as _f:
    _code = compile(_f.read(), "<recorded snippet>", "exec")
with record_launches() as _records:
    exec(_code, {{"__name__": "__recorded_snippet__"}})
save_records(_records, {out_path!r})
"""


def _child_env(interpret: bool, sys_path=()) -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    paths = [_REPO_ROOT, *sys_path] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def record_in_interpreter(snippet: str, sys_path=(), timeout: float = 1800) -> list:
    """Run the Python `snippet` in a child process with TRITON_INTERPRET=1 and return the
    `LaunchRecord`s of every `flash_kernels.utils.launch` it makes.

    `sys_path`: extra directories the child needs to import the snippet's modules (the repository
    root is always added). The kernels must live in importable modules (not in the snippet), so
    that `compile_record` can import them again by name. Raises RuntimeError with the child's
    output if the snippet fails.
    """
    sys_path = [os.path.abspath(p) for p in sys_path]
    with tempfile.TemporaryDirectory() as tmp:
        snippet_path = os.path.join(tmp, "snippet.py")
        out_path = os.path.join(tmp, "records.json")
        with open(snippet_path, "w") as f:
            f.write(snippet)
        script = _RECORDER_TEMPLATE.format(sys_path=[_REPO_ROOT, *sys_path],
                                           snippet_path=snippet_path, out_path=out_path)
        proc = subprocess.run([sys.executable, "-c", script], env=_child_env(True, sys_path),
                              cwd=_REPO_ROOT, capture_output=True, text=True, timeout=timeout)
        if proc.returncode != 0 or not os.path.exists(out_path):
            raise RuntimeError(f"recording under TRITON_INTERPRET=1 failed (exit {proc.returncode})"
                               f"\n--- snippet ---\n{snippet}\n--- output ---\n"
                               f"{proc.stdout[-4000:]}{proc.stderr[-8000:]}")
        return load_records(out_path)


# --------------------------------------------------------------------------------------------
# Compiling one record, reading its resources
# --------------------------------------------------------------------------------------------

def _require_compile_mode():
    if triton_interpret_enabled():
        raise RuntimeError(
            "tools.aot_compile cannot compile with TRITON_INTERPRET=1 set: under the "
            "interpreter triton.jit returns interpreter objects. Compile in a process without it "
            "(measure_launches does this for you, or run `env -u TRITON_INTERPRET python -m "
            "tools.aot_compile ...`).")


def load_kernel(record: LaunchRecord):
    """Import the recorded kernel and return its `triton.runtime.JITFunction` (unwrapping
    autotuner/heuristics wrappers)."""
    _require_compile_mode()
    from triton.runtime.jit import JITFunction
    if record.kernel_module in ("__main__", "__recorded_snippet__"):
        raise ValueError(f"kernel {record.kernel_name} was defined in a script, not an importable "
                         "module: it cannot be compiled again by name")
    obj = getattr(importlib.import_module(record.kernel_module), record.kernel_name)
    while not isinstance(obj, JITFunction) and hasattr(obj, "fn"):
        obj = obj.fn
    if not isinstance(obj, JITFunction):
        raise TypeError(f"{record.kernel_module}.{record.kernel_name} is {type(obj).__name__}, not "
                        "a triton.jit function (was TRITON_INTERPRET set when it was imported?)")
    return obj


_TRITON_TO_TORCH = {
    "fp16": "float16", "bf16": "bfloat16", "fp32": "float32", "fp64": "float64", "i32": "int32",
    "i64": "int64", "i16": "int16", "i8": "int8", "u8": "uint8", "u1": "bool",
    "fp8e4nv": "float8_e4m3fn", "fp8e5": "float8_e5m2"}


def _stand_in_value(record: LaunchRecord, name: str):
    """A value the JIT specialises exactly as the recorded argument `name`: a tensor stand-in of
    the recorded element type at an address that is (or is not) a multiple of 16, an int of the
    recorded width that is (or is not) a multiple of 16, a float, a bool, or the constant."""
    import torch
    from triton.runtime.jit import MockTensor
    if name in record.constexprs:
        return record.constexprs[name]
    ty = record.signature[name]
    divisible = name in record.divisible_by_16
    if ty.startswith("*"):
        address = 0 if divisible else 8

        class StandInTensor(MockTensor):
            @staticmethod
            def data_ptr():
                return address
        return StandInTensor(getattr(torch, _TRITON_TO_TORCH[ty[1:]]))
    base = {"i32": 16, "i64": 2**40, "u64": 2**63}.get(ty)
    if base is not None:
        return base if divisible else base + 1
    if ty == "fp32":
        return 1.5
    if ty == "u1":
        return True
    raise ValueError(f"{record.kernel_name}: cannot stand in for argument {name} of type {ty!r}")


class _RecordingDriver:
    """The minimum of a Triton driver the JIT asks for before it compiles: a device, a stream
    and the target (no GPU behind it)."""
    device = "tools.aot_compile"       # a device key no real launch uses

    def __init__(self, capability: int):
        from triton.backends.compiler import GPUTarget
        self.target = GPUTarget("cuda", capability, 32)

    def get_current_device(self):
        return self.device

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target


def jit_compile_inputs(record: LaunchRecord, capability: int = 90):
    """(ASTSource, options dict) exactly as Triton's JIT builds them for this launch on an
    sm_`capability` GPU, with the installed Triton.

    Runs the kernel's own `JITFunction.run(..., warmup=True)` on stand-in arguments that the JIT
    specialises as recorded (`_stand_in_value`), against a driver that only names the target,
    and catches the source and options the JIT hands to `triton.compile` instead of compiling.
    So the source carries the JIT's attrs to the letter (e.g. an empty attr list for every
    specialisable int or pointer that is not a multiple of 16; Triton 3.6 also attrs string
    constexprs) and the options its defaults (debug, instrumentation mode), and the compile
    lands in the same cache entry as the JIT's: compiling ahead of time warms the cache.
    """
    from triton.runtime.driver import driver
    fn = load_kernel(record)
    names = list(fn.arg_names)
    unknown = (set(record.signature) | set(record.constexprs) | set(record.divisible_by_16)) - set(names)
    if unknown:
        raise ValueError(f"{record.kernel_name}: recorded arguments {sorted(unknown)} are not "
                         f"parameters of the kernel ({names}); record again")
    missing = [n for n in names if n not in record.signature and n not in record.constexprs]
    if missing:
        raise ValueError(f"{record.kernel_name}: no recorded type or value for {missing}")
    args = {n: _stand_in_value(record, n) for n in names}
    caught = {}

    def catch_compile(src, target=None, options=None, **_):
        caught.update(src=src, options=dict(options))
        return object()                   # the JIT keeps it as the "kernel"; it is never run

    recording_driver = _RecordingDriver(capability)
    previous_driver = driver._active
    previous_compile = fn.__dict__.get("compile")    # set by the binder of a real launch
    driver.set_active(recording_driver)
    try:
        fn.device_caches[recording_driver.device]      # the binder for this target
        fn.compile = catch_compile
        fn.run(grid=(1,), warmup=True, num_warps=record.num_warps,
               num_stages=record.num_stages, **args)
    finally:
        driver._active = previous_driver
        fn.device_caches.pop(recording_driver.device, None)
        if previous_compile is None:
            del fn.compile
        else:
            fn.compile = previous_compile
    src = caught["src"]
    expected = {n: ("constexpr" if n in record.constexprs else record.signature[n]) for n in names}
    if dict(src.signature) != expected:
        raise ValueError(f"{record.kernel_name}: the JIT specialises the recorded launch as "
                         f"{dict(src.signature)}, not as recorded ({expected}); record again")
    return src, caught["options"]


def ast_source(record: LaunchRecord, capability: int = 90):
    """The `triton.compiler.ASTSource` the JIT builds for this launch (see `jit_compile_inputs`):
    signature {arg name: type, "constexpr" for the constant ones}, constexprs {(index,): value},
    attrs {(index,): [["tt.divisibility", 16]] for multiples of 16, [] for the other
    specialisable ints and pointers}."""
    return jit_compile_inputs(record, capability)[0]


def compile_record(record: LaunchRecord, capability: int):
    """Compile one recorded launch for NVIDIA compute capability `capability` (80, 90, ...).

    Returns Triton's `CompiledKernel` (`.asm["ptx"]`, `.asm["cubin"]`, `.metadata.shared`,
    `.hash`: the JIT's cache key for the same launch). Runs on a machine without a GPU. Raises if
    TRITON_INTERPRET is set, and whatever Triton raises when the kernel does not compile.
    """
    _require_compile_mode()
    import triton
    from triton.backends.compiler import GPUTarget
    src, options = jit_compile_inputs(record, capability)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")
        return triton.compile(src, target=GPUTarget("cuda", capability, 32), options=options)


def _cuobjdump_path() -> str:
    import triton
    try:
        return triton.knobs.nvidia.cuobjdump.path
    except Exception:
        return os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin",
                            "cuobjdump")


_RESOURCE_LINE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")
_SASS_INSTRUCTION = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)")


def _parse_resource_usage(text: str, kernel_name: str) -> dict:
    """{registers, stack_bytes, static_shared_bytes, local_bytes} of `kernel_name` from
    `cuobjdump --dump-resource-usage` output (the first function if the name is not found)."""
    found = None
    current = None
    for line in text.splitlines():
        m = re.match(r"\s*Function\s+(\S+?):?\s*$", line)
        if m:
            current = m.group(1)
            continue
        m = _RESOURCE_LINE.search(line)
        if m and current is not None:
            usage = dict(registers=int(m.group(1)), stack_bytes=int(m.group(2)),
                         static_shared_bytes=int(m.group(3)), local_bytes=int(m.group(4)))
            if current == kernel_name:
                return usage
            found = found or usage
    if found is None:
        raise RuntimeError(f"no resource usage line in cuobjdump output:\n{text}")
    return found


def resource_usage(compiled) -> dict:
    """Resources of a compiled kernel, read from its cubin with the wheel's cuobjdump.

    Returns a dict:
      registers            registers per thread (REG)
      stack_bytes          per-thread stack frame (STACK): register spills (0 = no spills)
      local_bytes          other local memory (LOCAL)
      shared_bytes         shared memory per block: Triton's dynamic allocation
                           (compiled.metadata.shared) + static shared memory in the cubin;
                           Triton's launcher allows dynamic <= opt-in limit - static, so this
                           total is what must fit SHARED_MEMORY_LIMIT_BYTES
      dynamic_shared_bytes compiled.metadata.shared
      static_shared_bytes  SHARED from cuobjdump (e.g. barriers)
      uses_wgmma           Hopper warpgroup MMA in the SASS (HGMMA) (or `wgmma` in the PTX
                           if the SASS cannot be read)
      mma_instructions     number of HMMA/HGMMA/IMMA instructions in the SASS
      n_instructions       SASS instruction count
      ptx_lines            lines of PTX
    """
    cuobjdump = _cuobjdump_path()
    name = compiled.metadata.name
    with tempfile.TemporaryDirectory() as tmp:
        cubin_path = os.path.join(tmp, f"{name}.cubin")
        with open(cubin_path, "wb") as f:
            f.write(compiled.asm["cubin"])
        res = subprocess.run([cuobjdump, "--dump-resource-usage", cubin_path],
                             capture_output=True, text=True, check=True)
        sass = subprocess.run([cuobjdump, "-sass", cubin_path], capture_output=True, text=True)
    usage = _parse_resource_usage(res.stdout, name)
    opcodes = [m.group(1) for line in sass.stdout.splitlines()
               if (m := _SASS_INSTRUCTION.match(line))]
    ptx = compiled.asm.get("ptx", "")
    if opcodes:
        uses_wgmma = any(op.startswith("HGMMA") for op in opcodes)
    else:
        uses_wgmma = "wgmma.mma_async" in ptx
    dynamic_shared = int(compiled.metadata.shared)
    usage.update(
        dynamic_shared_bytes=dynamic_shared,
        shared_bytes=dynamic_shared + usage["static_shared_bytes"],
        uses_wgmma=uses_wgmma,
        mma_instructions=sum(op.split(".")[0] in ("HMMA", "HGMMA", "IMMA", "IGMMA")
                             for op in opcodes),
        n_instructions=len(opcodes),
        ptx_lines=ptx.count("\n"),
    )
    return usage


# --------------------------------------------------------------------------------------------
# Many records x capabilities -> rows -> markdown
# --------------------------------------------------------------------------------------------

def measure_record(record: LaunchRecord, capability: int) -> dict:
    """Compile one record for one capability; a row dict with the record, the Triton version,
    the resource usage (None on error), the error text (None if it compiled) and the limit
    checks."""
    import triton
    row = dict(record=record_to_dict(record), capability=capability, triton=triton.__version__,
               usage=None, error=None, over_shared_limit=False, over_register_limit=False)
    try:
        usage = resource_usage(compile_record(record, capability))
    except Exception as e:  # noqa: BLE001 - the report lists every failure
        row["error"] = f"{type(e).__name__}: {e}"
        return row
    row["usage"] = usage
    limit = SHARED_MEMORY_LIMIT_BYTES.get(capability)
    row["over_shared_limit"] = limit is not None and usage["shared_bytes"] > limit
    row["over_register_limit"] = usage["registers"] > MAX_REGISTERS
    return row


def measure_records(records, capabilities=(80, 90)) -> list:
    """Compile every distinct record for every capability in this process (no interpreter)."""
    _require_compile_mode()
    return [measure_record(r, cap) for r in dedupe_records(records) for cap in capabilities]


def measure_records_in_subprocess(records, capabilities=(80, 90), sys_path=(),
                                  timeout: float = 3600, python: str = None) -> list:
    """`measure_records` in a child process without TRITON_INTERPRET (use it from a process that
    has the interpreter on). `sys_path`: directories needed to import the kernels' modules.
    `python`: the interpreter of the child (default this one), e.g. a virtual environment with
    another Triton version: the records are compiled by that Triton (the repository root is put
    on its path, so it needs torch and triton, not this package installed)."""
    sys_path = [os.path.abspath(p) for p in sys_path]
    with tempfile.TemporaryDirectory() as tmp:
        records_path = os.path.join(tmp, "records.json")
        rows_path = os.path.join(tmp, "rows.json")
        save_records(records, records_path)
        cmd = [python or sys.executable, "-m", "tools.aot_compile", records_path,
               "--capabilities", *map(str, capabilities), "--json", rows_path]
        for p in sys_path:
            cmd += ["--sys-path", p]
        proc = subprocess.run(cmd, env=_child_env(False, sys_path), cwd=_REPO_ROOT,
                              capture_output=True, text=True, timeout=timeout)
        if not os.path.exists(rows_path):
            raise RuntimeError(f"ahead-of-time compile process failed (exit {proc.returncode}):\n"
                               f"{proc.stdout[-4000:]}{proc.stderr[-8000:]}")
        with open(rows_path) as f:
            return json.load(f)


def measure_launches(records, capabilities=(80, 90), sys_path=(), python: str = None) -> list:
    """Compile and measure `records` for `capabilities`: in this process when TRITON_INTERPRET is
    off, else in a child process without it; with `python` given, always in a child process run
    by that interpreter (another Triton version). Returns the rows (see `measure_record`)."""
    if python or triton_interpret_enabled():
        return measure_records_in_subprocess(records, capabilities, sys_path, python=python)
    for p in sys_path:
        if os.path.abspath(p) not in sys.path:
            sys.path.insert(0, os.path.abspath(p))
    return measure_records(records, capabilities)


def row_failed(row: dict) -> bool:
    """A launch that would fail on that GPU: compile error or over a hardware limit."""
    return bool(row["error"] or row["over_shared_limit"] or row["over_register_limit"])


def _dtype_label(signature: dict) -> str:
    """The floating-point element types of the pointer arguments, e.g. "bf16,fp32"."""
    seen = []
    for ty in signature.values():
        if ty.startswith("*") and ty[1:] in ("fp16", "bf16", "fp32", "fp64", "fp8e4nv", "fp8e5"):
            if ty[1:] not in seen:
                seen.append(ty[1:])
    return ",".join(seen) or "-"


def _constexpr_label(constexprs: dict) -> str:
    def fmt(v):
        if isinstance(v, dict) and "tl_dtype" in v:
            return v["tl_dtype"]
        return repr(v) if isinstance(v, float) else str(v)
    return " ".join(f"{k}={fmt(v)}" for k, v in constexprs.items())


REPORT_PREAMBLE = (
    "Compiled with `triton.compile(ASTSource(...), target=GPUTarget(\"cuda\", cap, 32))` on a "
    "CPU-only machine from launches recorded under TRITON_INTERPRET=1. Registers, spills (stack "
    "bytes) and static shared memory from the wheel's `cuobjdump --dump-resource-usage`; shared KB "
    "= Triton's dynamic shared memory + static; wgmma = Hopper HGMMA instructions in the SASS. "
    "Shared memory limits per block: sm_80 163 KB, sm_90 227 KB.")


def markdown_table(rows) -> list:
    """Markdown table lines, one per row: kernel, constexprs, dtype, warps, stages, target,
    registers, spill bytes, shared KB, wgmma (sm_90 and later), status."""
    lines = ["| kernel | constexprs | dtype | warps | stages | target | regs | spill B | "
             "shared KB | wgmma | status |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for row in rows:
        rec = row["record"]
        u = row["usage"]
        cap = row["capability"]
        if row["error"]:
            status = "**compile error**: " + row["error"].strip().splitlines()[0][:120]
            cells = ["-"] * 4
        else:
            problems = []
            if row["over_shared_limit"]:
                problems.append("**over shared limit**")
            if row["over_register_limit"]:
                problems.append("**over 255 registers**")
            if u["stack_bytes"]:
                problems.append("spills")
            status = ", ".join(problems) or "ok"
            cells = [str(u["registers"]), str(u["stack_bytes"]),
                     f"{u['shared_bytes'] / 1024:.1f}",
                     ("yes" if u["uses_wgmma"] else "no") if cap >= 90 else "-"]
        lines.append("| " + " | ".join([
            f"`{rec['kernel_name']}`", _constexpr_label(rec["constexprs"]),
            _dtype_label(rec["signature"]), str(rec["num_warps"]), str(rec["num_stages"]),
            f"sm_{cap}", *cells, status.replace("|", "\\|")]) + " |")
    return lines


def summary_line(rows, extra_failures: int = 0) -> str:
    """"**PASS**: ..." or "**FAIL**: ..." for `rows` (plus `extra_failures` found elsewhere,
    e.g. launches that could not be recorded)."""
    n_errors = sum(bool(r["error"]) for r in rows)
    n_limits = sum(bool(not r["error"] and (r["over_shared_limit"] or r["over_register_limit"]))
                   for r in rows)
    n_spill = sum(bool(r["usage"] and r["usage"]["stack_bytes"]) for r in rows)
    if n_errors or n_limits or extra_failures:
        extra = f", {extra_failures} other failure(s)" if extra_failures else ""
        return (f"**FAIL**: {n_errors} compile error(s), {n_limits} over a hardware limit{extra}, "
                f"out of {len(rows)} compiles ({n_spill} with spills).")
    return (f"**PASS**: all {len(rows)} compiles succeeded within the hardware limits "
            f"({n_spill} with spills).")


def error_details(rows) -> list:
    """Markdown lines with the full text of every compile error in `rows` (empty if none)."""
    errors = [r for r in rows if r["error"]]
    if not errors:
        return []
    lines = ["## Compile errors", ""]
    for r in errors:
        lines += [f"### `{r['record']['kernel_name']}` sm_{r['capability']} "
                  f"({_constexpr_label(r['record']['constexprs'])})", "", "```",
                  r["error"].strip()[-6000:], "```", ""]
    return lines


def render_markdown(rows, title: str = "Ahead-of-time compile report", notes: str = "") -> str:
    """A markdown report of `rows`: the table, a PASS/FAIL line, and every compile error."""
    import triton
    lines = [f"# {title}", ""]
    if notes:
        lines += [notes, ""]
    lines += [f"Triton {triton.__version__}. " + REPORT_PREAMBLE, ""]
    lines += markdown_table(rows) + ["", summary_line(rows), ""] + error_details(rows)
    return "\n".join(lines).rstrip("\n") + "\n"


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------

def main(argv=None) -> int:
    """`python -m tools.aot_compile records.json [...] --capabilities 80 90
    --markdown out.md [--json rows.json] [--sys-path DIR]`; exit status 1 if any compile fails or
    exceeds a hardware limit."""
    parser = argparse.ArgumentParser(prog="python -m tools.aot_compile",
                                     description=__doc__.splitlines()[0])
    parser.add_argument("records", nargs="+", help="JSON files written by save_records")
    parser.add_argument("--capabilities", nargs="+", type=int, default=[80, 90])
    parser.add_argument("--markdown", help="write the markdown report here (default: stdout)")
    parser.add_argument("--json", help="also write the result rows as JSON here")
    parser.add_argument("--sys-path", action="append", default=[],
                        help="directory to put on sys.path to import the kernels' modules")
    parser.add_argument("--title", default="Ahead-of-time compile report")
    args = parser.parse_args(argv)
    if triton_interpret_enabled():
        parser.error("TRITON_INTERPRET is set: unset it to compile (env -u TRITON_INTERPRET ...)")
    for p in args.sys_path:
        sys.path.insert(0, os.path.abspath(p))
    records = [r for path in args.records for r in load_records(path)]
    rows = measure_records(records, args.capabilities)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1, default=str)
    report = render_markdown(rows, title=args.title)
    if args.markdown:
        os.makedirs(os.path.dirname(os.path.abspath(args.markdown)), exist_ok=True)
        with open(args.markdown, "w") as f:
            f.write(report)
    else:
        print(report)
    failed = [r for r in rows if row_failed(r)]
    print(f"{len(rows) - len(failed)}/{len(rows)} compiles ok", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
