"""Ahead-of-time compile of recorded kernel launches for every GPU architecture, on a machine
with no GPU.

Every kernel launch of the ops goes through `flash_kernels.backends.triton.launch.launch`, whose
callback hook the recorder installs (tools/launch_recording.py: inside `record_launches()` each
launch writes a `LaunchRecord`: the kernel, its argument types, constexpr values,
16-divisibility specialisations and num_warps/num_stages, as Triton's JIT would specialise it).
This module records them under the interpreter (a child process with TRITON_INTERPRET=1, and
FLASH_KERNELS_TARGET naming the architecture the runtime should choose its tiles for), compiles
them with `triton.compile` for a target (the whole pipeline down to the cubin or the AMD code
object runs on the CPU) and reads the resources of the result:

- NVIDIA (`cuda:<capability>`): registers, stack (spills) and static shared memory from the
  cuobjdump bundled in the Triton wheel, tensor-core instructions (HMMA, HGMMA, tcgen05
  UTC*MMA, ...) counted in the SASS;
- AMD (`hip:<gfx arch>`): VGPRs / AGPRs / SGPRs, scratch (spills) and static LDS from the
  code object's metadata in the `amdgcn` assembly, MFMA instructions counted in it.

Dynamic shared memory (LDS) is Triton's `metadata.shared`. Each architecture's limits are in
`ARCHITECTURES` (the one table of them). On the targets in `codegen_gate.GATE_TARGETS` each row
also carries the code-generation gate's findings (tools/codegen_gate.py), computed in the
process that compiled, i.e. with that process's Triton.

Typical use, without a GPU (docs/contract.md section 6):

    records = record_in_interpreter("import ...; run the op once", target="cuda:90")
    rows = measure_launches(records, targets=("cuda:80", "cuda:90"))   # no interpreter
    print(render_markdown(rows))

or from the shell:

    python -m tools.aot_compile records.json --targets cuda:80 cuda:90 hip:gfx942 --markdown out.md

Compiling needs Triton's real JIT, so it refuses to run with TRITON_INTERPRET=1 set (under the
interpreter `triton.jit` makes interpreter objects that cannot be compiled); recording needs the
interpreter (no GPU here), hence the two processes. `measure_launches(..., python=OTHER)`
compiles in a child process run by another Python, e.g. a virtual environment with the Triton
version of the GPU machines; `jobs=N` spreads the compiles over N child processes.
"""

import argparse
import dataclasses
import hashlib
import importlib
import json
import os
import re
import subprocess
import sys
import tempfile
import time
import warnings
from concurrent.futures import ThreadPoolExecutor

from flash_kernels.core.environment import triton_interpret_enabled
from tools.launch_recording import LaunchRecord

_REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

#: The environment variable that tells the runtime, under the interpreter, which architecture to
#: choose its tiles for ("cuda:90", "hip:gfx942"; on a GPU it asks the device).
TARGET_VARIABLE = "FLASH_KERNELS_TARGET"


# --------------------------------------------------------------------------------------------
# Architectures: the one table of their limits
# --------------------------------------------------------------------------------------------


@dataclasses.dataclass(frozen=True)
class Architecture:
    """A compile target and the hardware limits a launch must fit."""

    target: str  # "cuda:90", "hip:gfx942": also the value of FLASH_KERNELS_TARGET
    label: str  # "sm_90", "gfx942"
    gpus: str  # who runs it
    shared_memory_bytes: int  # largest shared memory (LDS) one block may use (opt-in maximum)
    max_registers: int  # per thread (NVIDIA) / per lane, VGPRs + AGPRs (AMD CDNA)
    tensor_core: str  # the tensor-core instructions counted for it

    @property
    def backend(self) -> str:
        return self.target.split(":", 1)[0]

    @property
    def arch(self):
        """GPUTarget's arch: the capability as an int (cuda) or the gfx name (hip)."""
        value = self.target.split(":", 1)[1]
        return int(value) if self.backend == "cuda" else value

    @property
    def warp_size(self) -> int:
        return 32 if self.backend == "cuda" else 64


_NVIDIA_REGISTERS = 255  # the register file allows at most 255 registers per thread
_CDNA_REGISTERS = 512  # 256 architectural VGPRs + 256 AGPRs per lane (CDNA2/3)

#: Every architecture the report covers, by target name.
ARCHITECTURES = {
    a.target: a
    for a in [
        Architecture("cuda:80", "sm_80", "A100", 166_912, _NVIDIA_REGISTERS, "HMMA"),
        Architecture("cuda:86", "sm_86", "A10, RTX 3090", 101_376, _NVIDIA_REGISTERS, "HMMA"),
        Architecture("cuda:89", "sm_89", "RTX 4090, L4, L40S", 101_376, _NVIDIA_REGISTERS, "HMMA"),
        Architecture("cuda:90", "sm_90", "H100, H200", 232_448, _NVIDIA_REGISTERS, "HGMMA (wgmma)"),
        Architecture("cuda:100", "sm_100", "B200", 232_448, _NVIDIA_REGISTERS, "UTC*MMA (tcgen05)"),
        Architecture("cuda:120", "sm_120", "RTX 50xx", 101_376, _NVIDIA_REGISTERS, "HMMA"),
        Architecture("hip:gfx942", "gfx942", "MI300", 65_536, _CDNA_REGISTERS, "MFMA"),
        Architecture("hip:gfx90a", "gfx90a", "MI250", 65_536, _CDNA_REGISTERS, "MFMA (no tf32)"),
    ]
}
NVIDIA_TARGETS = tuple(t for t in ARCHITECTURES if t.startswith("cuda:"))
AMD_TARGETS = tuple(t for t in ARCHITECTURES if t.startswith("hip:"))


def target_name(target) -> str:
    """The canonical name of a target: 90, "90", "sm_90" and "cuda:90" are "cuda:90";
    "gfx942" and "hip:gfx942" are "hip:gfx942"."""
    text = str(target).strip()
    if text.startswith(("cuda:", "hip:")):
        return text
    text = text.removeprefix("sm_")
    if text.isdigit():
        return f"cuda:{int(text)}"
    if text.startswith("gfx"):
        return f"hip:{text}"
    raise ValueError(f"unknown target {target!r}: use cuda:<capability> or hip:<gfx arch>")


def architecture(target) -> Architecture:
    """The `Architecture` of a target; one with unknown limits (0) if it is not in the table."""
    name = target_name(target)
    if name in ARCHITECTURES:
        return ARCHITECTURES[name]
    backend, arch = name.split(":", 1)
    label = f"sm_{arch}" if backend == "cuda" else arch
    return Architecture(
        name, label, "?", 0, _NVIDIA_REGISTERS if backend == "cuda" else _CDNA_REGISTERS, "?"
    )


def gpu_target(target):
    """Triton's `GPUTarget` for a target name."""
    from triton.backends.compiler import GPUTarget

    arch = architecture(target)
    return GPUTarget(arch.backend, arch.arch, arch.warp_size)


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
    (which cannot run bf16 dots); record with FLASH_KERNELS_PLAN_DTYPE=bfloat16 so that the runtime
    chooses bf16's constexprs."""
    signature = {
        name: (ty[: -len(old)] + new if ty.lstrip("*") == old else ty)
        for name, ty in record.signature.items()
    }
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
import json, os, sys, traceback
sys.path[:0] = {sys_path!r}
from tools.launch_recording import record_launches
from tools.aot_compile import record_to_dict
with open({snippets_path!r}) as _f:
    _snippets = json.load(_f)
_out = {{}}
_environ = dict(os.environ)
for _name, _code in _snippets.items():
    os.environ.clear()                     # a snippet's environment does not reach the next
    os.environ.update(_environ)
    try:
        with record_launches() as _records:
            exec(compile(_code, "<recorded snippet " + _name + ">", "exec"),
                 {{"__name__": "__recorded_snippet__"}})
        _out[_name] = {{"records": [record_to_dict(r) for r in _records]}}
    except Exception:
        _out[_name] = {{"error": traceback.format_exc()}}
    with open({out_path!r}, "w") as _f:       # after each snippet: a crash keeps the others
        json.dump(_out, _f)
"""


def _child_env(interpret: bool, sys_path=(), target=None) -> dict:
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    if target is not None:
        env[TARGET_VARIABLE] = target_name(target)
    paths = [_REPO_ROOT, *sys_path] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    return env


def record_snippets_in_interpreter(
    snippets: dict, sys_path=(), target=None, timeout: float = 3600
) -> tuple:
    """Run each Python snippet of `snippets` ({name: code}) in one child process with
    TRITON_INTERPRET=1 (and FLASH_KERNELS_TARGET=`target` when given, so that the runtime picks
    that architecture's tiles) and record the launches of each.

    Returns ({name: [LaunchRecord]}, {name: error text}): a snippet that raises is listed with
    its traceback and the others still record. `sys_path`: extra directories the child needs to
    import the snippets' modules (the repository root is always added). The kernels must live
    in importable modules (not in a snippet), so that `compile_record` can import them again by
    name. Raises RuntimeError with the child's output if the child itself fails.
    """
    sys_path = [os.path.abspath(p) for p in sys_path]
    with tempfile.TemporaryDirectory() as tmp:
        snippets_path = os.path.join(tmp, "snippets.json")
        out_path = os.path.join(tmp, "records.json")
        with open(snippets_path, "w") as f:
            json.dump(dict(snippets), f)
        script = _RECORDER_TEMPLATE.format(
            sys_path=[_REPO_ROOT, *sys_path], snippets_path=snippets_path, out_path=out_path
        )
        proc = subprocess.run(
            [sys.executable, "-c", script],
            env=_child_env(True, sys_path, target),
            cwd=_REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        done = {}
        if os.path.exists(out_path):
            with open(out_path) as f:
                done = json.load(f)
    if proc.returncode != 0 or set(done) != set(snippets):
        raise RuntimeError(
            f"recording under TRITON_INTERPRET=1 failed (exit {proc.returncode}, "
            f"{len(done)} of {len(snippets)} snippets done)\n--- output ---\n"
            f"{proc.stdout[-4000:]}{proc.stderr[-8000:]}"
        )
    records = {
        name: [record_from_dict(d) for d in result["records"]]
        for name, result in done.items()
        if "records" in result
    }
    errors = {name: result["error"] for name, result in done.items() if "error" in result}
    return records, errors


def record_concurrently(items, jobs: int = 2, timeout: float = 3600) -> list:
    """`record_snippets_in_interpreter` for each item (a dict with `snippets`, and optionally
    `target` and `sys_path`), at most `jobs` child processes at a time; returns each item's
    (records, errors) in order."""

    def run(item):
        return record_snippets_in_interpreter(
            item["snippets"], item.get("sys_path", ()), item.get("target"), timeout
        )

    with ThreadPoolExecutor(max_workers=max(1, int(jobs))) as pool:
        return list(pool.map(run, items))


def record_in_interpreter(snippet: str, sys_path=(), timeout: float = 1800, target=None) -> list:
    """The `LaunchRecord`s of every kernel launch (`flash_kernels.backends.triton.launch.launch`)
    the Python `snippet` makes, run in a child process with TRITON_INTERPRET=1 (see
    `record_snippets_in_interpreter`). Raises RuntimeError with the traceback if the snippet
    fails."""
    records, errors = record_snippets_in_interpreter(
        {"snippet": snippet}, sys_path, target, timeout
    )
    if errors:
        raise RuntimeError(
            f"recording under TRITON_INTERPRET=1 failed\n--- snippet ---\n"
            f"{snippet}\n--- output ---\n{errors['snippet'][-8000:]}"
        )
    return records["snippet"]


# --------------------------------------------------------------------------------------------
# Compiling one record, reading its resources
# --------------------------------------------------------------------------------------------


def _require_compile_mode():
    if triton_interpret_enabled():
        raise RuntimeError(
            "tools.aot_compile cannot compile with TRITON_INTERPRET=1 set: under the "
            "interpreter triton.jit returns interpreter objects. Compile in a process without it "
            "(measure_launches does this for you, or run `env -u TRITON_INTERPRET python -m "
            "tools.aot_compile ...`)."
        )


def load_kernel(record: LaunchRecord):
    """Import the recorded kernel and return its `triton.runtime.JITFunction` (unwrapping
    autotuner/heuristics wrappers)."""
    _require_compile_mode()
    from triton.runtime.jit import JITFunction

    if record.kernel_module in ("__main__", "__recorded_snippet__"):
        raise ValueError(
            f"kernel {record.kernel_name} was defined in a script, not an importable "
            "module: it cannot be compiled again by name"
        )
    obj = getattr(importlib.import_module(record.kernel_module), record.kernel_name)
    while not isinstance(obj, JITFunction) and hasattr(obj, "fn"):
        obj = obj.fn
    if not isinstance(obj, JITFunction):
        raise TypeError(
            f"{record.kernel_module}.{record.kernel_name} is {type(obj).__name__}, not "
            "a triton.jit function (was TRITON_INTERPRET set when it was imported?)"
        )
    return obj


_TRITON_TO_TORCH = {
    "fp16": "float16",
    "bf16": "bfloat16",
    "fp32": "float32",
    "fp64": "float64",
    "i32": "int32",
    "i64": "int64",
    "i16": "int16",
    "i8": "int8",
    "u8": "uint8",
    "u1": "bool",
    "fp8e4nv": "float8_e4m3fn",
    "fp8e5": "float8_e5m2",
}


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

    device = "tools.aot_compile"  # a device key no real launch uses

    def __init__(self, target):
        self.target = gpu_target(target)

    def get_current_device(self):
        return self.device

    def get_current_stream(self, device=None):
        return 0

    def get_current_target(self):
        return self.target


def jit_compile_inputs(record: LaunchRecord, target="cuda:90"):
    """(ASTSource, options dict) exactly as Triton's JIT builds them for this launch on a
    `target` GPU ("cuda:90", "hip:gfx942"; see `target_name`), with the installed Triton.

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
    unknown = (set(record.signature) | set(record.constexprs) | set(record.divisible_by_16)) - set(
        names
    )
    if unknown:
        raise ValueError(
            f"{record.kernel_name}: recorded arguments {sorted(unknown)} are not "
            f"parameters of the kernel ({names}); record again"
        )
    missing = [n for n in names if n not in record.signature and n not in record.constexprs]
    if missing:
        raise ValueError(f"{record.kernel_name}: no recorded type or value for {missing}")
    args = {n: _stand_in_value(record, n) for n in names}
    caught = {}

    def catch_compile(src, target=None, options=None, **_):
        caught.update(src=src, options=dict(options))
        return object()  # the JIT keeps it as the "kernel"; it is never run

    recording_driver = _RecordingDriver(target)
    previous_driver = driver._active
    previous_compile = fn.__dict__.get("compile")  # set by the binder of a real launch
    driver.set_active(recording_driver)
    try:
        fn.device_caches[recording_driver.device]  # the binder for this target
        fn.compile = catch_compile
        fn.run(
            grid=(1,), warmup=True, num_warps=record.num_warps, num_stages=record.num_stages, **args
        )
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
        raise ValueError(
            f"{record.kernel_name}: the JIT specialises the recorded launch as "
            f"{dict(src.signature)}, not as recorded ({expected}); record again"
        )
    return src, caught["options"]


def compile_record(record: LaunchRecord, target):
    """Compile one recorded launch for `target` ("cuda:90", "hip:gfx942"; an int is an NVIDIA
    compute capability).

    Returns Triton's `CompiledKernel` (`.asm["ttgir"]`, `.asm["cubin"]` or `.asm["amdgcn"]`,
    `.metadata.shared`, `.hash`: the JIT's cache key for the same launch). Runs on a machine
    without a GPU. Raises if TRITON_INTERPRET is set, and whatever Triton raises when the
    kernel does not compile.
    """
    _require_compile_mode()
    import triton

    src, options = jit_compile_inputs(record, target)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")
        return triton.compile(src, target=gpu_target(target), options=options)


def compile_to_ttgir(record: LaunchRecord, target) -> str:
    """The TTGIR text of one recorded launch for `target`, exactly as `compile_record(...)
    .asm["ttgir"]` has it, without the later stages (LLVM, ptxas: most of a compile's time, a
    minute for the largest fp32 tiles) and without touching Triton's cache.

    Runs the first two stages of `triton.compile`'s pipeline the way it does (the backend's
    options, dialects, code generator and stage functions; Triton 3.6 and 3.9 agree on these
    calls), which is all the codegen gate reads (tests/test_codegen_gate.py checks the text
    equals the full compile's)."""
    _require_compile_mode()
    from triton._C.libtriton import ir
    from triton.compiler.compiler import make_backend

    src, options = jit_compile_inputs(record, target)
    gpu = gpu_target(target)
    backend = make_backend(gpu)
    options = backend.parse_options(dict(options or {}, **src.parse_options()))
    stages = {}
    backend.add_stages(stages, options, src.language)
    context = ir.context()
    ir.load_dialects(context)
    backend.load_dialects(context)
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*TRITON_DEFAULT_FP_FUSION.*")
        module = src.make_ir(
            gpu,
            options,
            backend.get_codegen_implementation(options),
            backend.get_module_map(),
            context,
        )
        metadata = {"hash": "ttgir-only", "target": gpu, **options.__dict__}
        for stage in ("ttir", "ttgir"):
            module = stages[stage](module, metadata)
    return str(module)


def _cuobjdump_path() -> str:
    import triton

    try:
        return triton.knobs.nvidia.cuobjdump.path
    except AttributeError:  # Triton before knobs
        return os.path.join(
            os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump"
        )


_LOCATION_ALIAS = re.compile(r"^#loc\d*\s*=\s*loc\(.*\)\s*$")
_LOCATION_SUFFIX = re.compile(r"\s+loc\([^()]*(?:\([^()]*\)[^()]*)*\)")


def _without_locations(ir_text: str) -> str:
    """MLIR text without its location aliases (`#loc3 = loc("file.py":51:26)`) and the
    `loc(...)` references of its operations."""
    lines = [line for line in ir_text.splitlines() if not _LOCATION_ALIAS.match(line)]
    return "\n".join(_LOCATION_SUFFIX.sub("", line) for line in lines)


_RESOURCE_LINE = re.compile(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)")
_SASS_INSTRUCTION = re.compile(r"^\s*/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)")
#: SASS opcodes (before the first ".") of tensor-core instructions: warp-level mma (HMMA, IMMA,
#: DMMA, fp8 QMMA/OMMA), Hopper warpgroup mma (HGMMA, IGMMA, QGMMA, BGMMA) and Blackwell
#: tcgen05 mma (UTCHMMA, UTCIMMA, UTCQMMA, UTCOMMA, ...).
_TENSOR_CORE_OPCODE = re.compile(r"^(?:[HIDQO]MMA|[HIQB]GMMA|UTC[A-Z]*MMA)$")
#: AMD matrix-core instructions: dense MFMA and sparse SMFMAC.
_AMD_TENSOR_CORE = re.compile(r"^\s+(v_mfma\w*|v_smfmac\w*)\b")
_AMD_INSTRUCTION = re.compile(r"^\s+(?:s|v|ds|buffer|global|flat|scratch|exp)_\w+")
_AMD_METADATA_FIELD = re.compile(r"^\s*\.(\w+):\s+(\d+)\s*$")


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
            usage = dict(
                registers=int(m.group(1)),
                stack_bytes=int(m.group(2)),
                static_shared_bytes=int(m.group(3)),
                local_bytes=int(m.group(4)),
            )
            if current == kernel_name:
                return usage
            found = found or usage
    if found is None:
        raise RuntimeError(f"no resource usage line in cuobjdump output:\n{text}")
    return found


def _count_opcodes(opcodes) -> dict:
    counts = {}
    for opcode in opcodes:
        counts[opcode] = counts.get(opcode, 0) + 1
    return dict(sorted(counts.items()))


def _nvidia_resource_usage(compiled) -> dict:
    cuobjdump = _cuobjdump_path()
    name = compiled.metadata.name
    with tempfile.TemporaryDirectory() as tmp:
        cubin_path = os.path.join(tmp, f"{name}.cubin")
        with open(cubin_path, "wb") as f:
            f.write(compiled.asm["cubin"])
        res = subprocess.run(
            [cuobjdump, "--dump-resource-usage", cubin_path],
            capture_output=True,
            text=True,
            check=True,
        )
        sass = subprocess.run(
            [cuobjdump, "-sass", cubin_path], capture_output=True, text=True, check=False
        )
    usage = _parse_resource_usage(res.stdout, name)
    opcodes = [
        m.group(1) for line in sass.stdout.splitlines() if (m := _SASS_INSTRUCTION.match(line))
    ]
    ptx = compiled.asm.get("ptx", "")
    if opcodes:
        uses_wgmma = any(op.startswith("HGMMA") for op in opcodes)
    else:
        uses_wgmma = "wgmma.mma_async" in ptx
    tensor_core = _count_opcodes(
        base for op in opcodes if _TENSOR_CORE_OPCODE.match(base := op.split(".")[0])
    )
    dynamic_shared = int(compiled.metadata.shared)
    usage.update(
        spill_bytes=usage["stack_bytes"],
        dynamic_shared_bytes=dynamic_shared,
        shared_bytes=dynamic_shared + usage["static_shared_bytes"],
        uses_wgmma=uses_wgmma,
        tensor_core_instructions=sum(tensor_core.values()),
        tensor_core_opcodes=tensor_core,
        n_instructions=len(opcodes),
        ptx_lines=ptx.count("\n"),
    )
    return usage


def _amd_resource_usage(compiled) -> dict:
    amdgcn = compiled.asm["amdgcn"]
    fields = {}
    for line in amdgcn.splitlines():  # the code object's metadata (one kernel)
        if m := _AMD_METADATA_FIELD.match(line):
            fields.setdefault(m.group(1), int(m.group(2)))
    lines = amdgcn.splitlines()
    tensor_core = _count_opcodes(
        m.group(1) for line in lines if (m := _AMD_TENSOR_CORE.match(line))
    )
    dynamic_shared = int(compiled.metadata.shared)
    static_shared = fields.get("group_segment_fixed_size", 0)
    return dict(
        registers=fields.get("vgpr_count", 0),
        agprs=fields.get("agpr_count", 0),
        sgprs=fields.get("sgpr_count", 0),
        vgpr_spills=fields.get("vgpr_spill_count", 0),
        sgpr_spills=fields.get("sgpr_spill_count", 0),
        spill_bytes=fields.get("private_segment_fixed_size", 0),  # scratch per lane
        static_shared_bytes=static_shared,
        dynamic_shared_bytes=dynamic_shared,
        shared_bytes=dynamic_shared + static_shared,
        uses_wgmma=False,
        tensor_core_instructions=sum(tensor_core.values()),
        tensor_core_opcodes=tensor_core,
        n_instructions=sum(bool(_AMD_INSTRUCTION.match(line)) for line in lines),
    )


def resource_usage(compiled) -> dict:
    """Resources of a compiled kernel.

    Returns a dict; on every target:
      registers            registers per thread (NVIDIA REG) / VGPRs per lane incl. AGPRs (AMD)
      spill_bytes          NVIDIA: per-thread stack frame (STACK), i.e. register spills;
                           AMD: scratch per lane (private segment), spills included (0 = none)
      shared_bytes         shared memory (LDS) per block: Triton's dynamic allocation
                           (compiled.metadata.shared) + static shared memory in the binary;
                           this total is what must fit the architecture's limit
      dynamic_shared_bytes, static_shared_bytes   the two parts
      tensor_core_instructions   tensor-core instructions in the binary (static count):
                           HMMA / HGMMA / UTC*MMA / ... in the SASS, MFMA in the AMD assembly
      tensor_core_opcodes  {opcode: count} of those
      uses_wgmma           Hopper warpgroup MMA in the SASS (HGMMA) (or `wgmma` in the PTX if
                           the SASS cannot be read); False on AMD
      n_instructions       instruction count
    NVIDIA only: stack_bytes (= spill_bytes), local_bytes, ptx_lines; AMD only: agprs, sgprs,
    vgpr_spills, sgpr_spills.
    """
    if "amdgcn" in compiled.asm:
        return _amd_resource_usage(compiled)
    return _nvidia_resource_usage(compiled)


# --------------------------------------------------------------------------------------------
# Many records x targets -> rows -> markdown
# --------------------------------------------------------------------------------------------


def measure_record(
    record: LaunchRecord, target, check_codegen: bool = True, ttgir_only: bool = False
) -> dict:
    """Compile one record for one target (`ttgir_only`: only to TTGIR, for the codegen gate:
    no usage then). A row dict:
      record, target ("cuda:90"), arch ("sm_90"), triton (version), usage (`resource_usage`,
      None on error or ttgir_only), error (None if it compiled), stage ("binary" or "ttgir":
      how far it was compiled), over_shared_limit, over_register_limit,
      codegen_findings (the gate's findings as dicts on codegen_gate.GATE_TARGETS, else None),
      codegen_transposes (the 2-D register transposes the gate looked at, rejected or not),
      ttgir_sha256 (of the TTGIR text without its source locations: equal code, equal hash,
      wherever the kernel's file lies; Triton's cache may return a binary compiled from
      another checkout's copy of the file),
      compile_seconds (compile + resource reading).
    """
    import triton

    from tools import codegen_gate

    arch = architecture(target)
    row = dict(
        record=record_to_dict(record),
        target=arch.target,
        arch=arch.label,
        triton=triton.__version__,
        usage=None,
        error=None,
        stage="ttgir" if ttgir_only else "binary",
        over_shared_limit=False,
        over_register_limit=False,
        codegen_findings=None,
        codegen_transposes=None,
        ttgir_sha256=None,
        compile_seconds=None,
    )
    start = time.perf_counter()
    try:
        if ttgir_only:
            ttgir, usage = compile_to_ttgir(record, arch.target), None
        else:
            compiled = compile_record(record, arch.target)
            ttgir, usage = compiled.asm["ttgir"], resource_usage(compiled)
        row["ttgir_sha256"] = hashlib.sha256(_without_locations(ttgir).encode()).hexdigest()
        if check_codegen and arch.target in codegen_gate.GATE_TARGETS:
            row["codegen_findings"], row["codegen_transposes"] = codegen_gate.check_ttgir(ttgir)
    except Exception as e:  # noqa: BLE001 - the report lists every failure
        row["error"] = f"{type(e).__name__}: {e}"
        return row
    finally:
        row["compile_seconds"] = round(time.perf_counter() - start, 2)
    row["usage"] = usage
    if usage is None:
        return row
    row["over_shared_limit"] = bool(
        arch.shared_memory_bytes and usage["shared_bytes"] > arch.shared_memory_bytes
    )
    row["over_register_limit"] = usage["registers"] > arch.max_registers
    return row


def _work(records, targets) -> list:
    """(record, target) pairs: every distinct record for every target."""
    return [(record, target_name(t)) for record in dedupe_records(records) for t in targets]


def measure_work(work, check_codegen: bool = True, ttgir_only: bool = False) -> list:
    """`measure_record` of every (record, target) or (record, target, ttgir_only) item of `work`
    (`ttgir_only` where an item does not say), in this process."""
    _require_compile_mode()
    return [
        measure_record(item[0], item[1], check_codegen, item[2] if len(item) > 2 else ttgir_only)
        for item in work
    ]


def measure_records(records, targets=("cuda:80", "cuda:90")) -> list:
    """Compile every distinct record for every target in this process (no interpreter)."""
    return measure_work(_work(records, targets))


def _measure_work_in_subprocess(
    work,
    sys_path=(),
    timeout: float = 3600,
    python: str | None = None,
    check_codegen: bool = True,
    ttgir_only: bool = False,
) -> list:
    sys_path = [os.path.abspath(p) for p in sys_path]
    with tempfile.TemporaryDirectory() as tmp:
        work_path = os.path.join(tmp, "work.json")
        rows_path = os.path.join(tmp, "rows.json")
        with open(work_path, "w") as f:
            json.dump(
                [
                    dict(
                        record=record_to_dict(item[0]),
                        target=item[1],
                        ttgir_only=item[2] if len(item) > 2 else ttgir_only,
                    )
                    for item in work
                ],
                f,
            )
        cmd = [
            python or sys.executable,
            "-m",
            "tools.aot_compile",
            "--work",
            work_path,
            "--json",
            rows_path,
            "--quiet",
        ]
        if not check_codegen:
            cmd.append("--no-codegen-gate")
        for p in sys_path:
            cmd += ["--sys-path", p]
        proc = subprocess.run(
            cmd,
            env=_child_env(False, sys_path),
            cwd=_REPO_ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
            check=False,
        )
        if not os.path.exists(rows_path):
            raise RuntimeError(
                f"ahead-of-time compile process failed (exit {proc.returncode}):\n"
                f"{proc.stdout[-4000:]}{proc.stderr[-8000:]}"
            )
        with open(rows_path) as f:
            return json.load(f)


#: Fewest (record, target) pairs worth a child process of their own (each child spends a few
#: seconds importing torch and Triton).
MIN_PAIRS_PER_CHILD = 6


def measure_concurrently(tasks, jobs: int = 2, timeout: float = 3600) -> list:
    """Run several compile tasks at once on child processes without TRITON_INTERPRET; returns
    each task's rows.

    A task is a dict with `records` and `targets`, and optionally `python` (the interpreter of
    the children, e.g. a virtual environment with another Triton version: the records are
    compiled, and the codegen gate run, by that Triton; the repository root is put on its path,
    so it needs torch and triton, not this package installed), `sys_path` (directories needed
    to import the kernels' modules) and `ttgir_only` (compile only to TTGIR, for the gate).
    The (record, target) pairs of the tasks that share a Python are pooled (with the union of
    their sys_paths) and dealt round-robin into up to `jobs` shares of at least
    MIN_PAIRS_PER_CHILD pairs, each share compiled by one child process, at most `jobs` children
    running at a time; rows come back in each task's order (distinct records, each for every
    target)."""
    jobs = max(1, int(jobs))
    groups = {}  # python -> ([(task, position, item)], sys_path)
    works = []
    for index, task in enumerate(tasks):
        work = _work(task["records"], task["targets"])
        works.append(work)
        entries, sys_path = groups.setdefault(task.get("python"), ([], []))
        entries += [
            (index, position, (record, target, bool(task.get("ttgir_only"))))
            for position, (record, target) in enumerate(work)
        ]
        sys_path += [p for p in task.get("sys_path", ()) if p not in sys_path]
    shares = []
    for python, (entries, sys_path) in groups.items():
        count = max(1, min(jobs, len(entries) // MIN_PAIRS_PER_CHILD))
        shares += [(python, sys_path, entries[i::count]) for i in range(count)]
    results = [[None] * len(work) for work in works]

    def run(share):
        python, sys_path, entries = share
        rows = _measure_work_in_subprocess(
            [item for _, _, item in entries], sys_path, timeout, python
        )
        for (index, position, _), row in zip(entries, rows):
            results[index][position] = row

    with ThreadPoolExecutor(max_workers=jobs) as pool:
        for future in [pool.submit(run, share) for share in shares]:
            future.result()
    return results


def measure_launches(
    records, targets=("cuda:80", "cuda:90"), sys_path=(), python: str | None = None, jobs: int = 1
) -> list:
    """Compile and measure `records` for `targets`: in this process when TRITON_INTERPRET is off
    and jobs == 1, else in child processes without it (`jobs` of them at once); with `python`
    given, always in child processes run by that interpreter (another Triton version). Returns
    the rows (see `measure_record`)."""
    if python or jobs > 1 or triton_interpret_enabled():
        return measure_concurrently(
            [dict(records=records, targets=targets, python=python, sys_path=sys_path)], jobs
        )[0]
    for p in sys_path:
        if os.path.abspath(p) not in sys.path:
            sys.path.insert(0, os.path.abspath(p))
    return measure_records(records, targets)


def row_failed(row: dict) -> bool:
    """A launch that would fail on that GPU: compile error or over a hardware limit."""
    return bool(row["error"] or row["over_shared_limit"] or row["over_register_limit"])


def _dtype_label(signature: dict) -> str:
    """The floating-point element types of the pointer arguments, e.g. "bf16,fp32"."""
    seen = []
    for ty in signature.values():
        element = ty[1:] if ty.startswith("*") else None
        if element in ("fp16", "bf16", "fp32", "fp64", "fp8e4nv", "fp8e5") and element not in seen:
            seen.append(element)
    return ",".join(seen) or "-"


def constexpr_label(constexprs: dict) -> str:
    """ "NAME=value ..." of a record's (JSON form) constexprs."""

    def fmt(v):
        if isinstance(v, dict) and "tl_dtype" in v:
            return v["tl_dtype"]
        return repr(v) if isinstance(v, float) else str(v)

    return " ".join(f"{k}={fmt(v)}" for k, v in constexprs.items())


def tensor_core_label(usage) -> str:
    """ "56 HGMMA", "40 UTCHMMA", "128 MFMA", "0" (none), "-" (not compiled)."""
    if usage is None:
        return "-"
    opcodes = usage.get("tensor_core_opcodes") or {}
    if not opcodes:
        return "0"
    kinds = {}
    for opcode, count in opcodes.items():
        kind = "MFMA" if opcode.startswith(("v_mfma", "v_smfmac")) else opcode
        kinds[kind] = kinds.get(kind, 0) + count
    return ", ".join(f"{count} {kind}" for kind, count in kinds.items())


def limits_table() -> list:
    """Markdown lines: every architecture of ARCHITECTURES with its shared memory limit."""
    lines = [
        (
            "| target | GPUs | shared memory / LDS per block | registers per thread (lane) "
            "| tensor-core instructions counted |"
        ),
        "|---|---|---|---|---|",
    ]
    for arch in ARCHITECTURES.values():
        lines.append(
            f"| {arch.label} (`{arch.target}`) | {arch.gpus} | "
            f"{arch.shared_memory_bytes:,} B ({arch.shared_memory_bytes / 1024:.0f} KB) | "
            f"{arch.max_registers} | {arch.tensor_core} |"
        )
    return lines


REPORT_PREAMBLE = (
    "Compiled with `triton.compile(ASTSource(...), target=GPUTarget(...))` on a CPU-only machine "
    "from launches recorded under TRITON_INTERPRET=1 (tools/aot_compile.py). NVIDIA: registers, "
    "spills (stack bytes) and static shared memory from the wheel's `cuobjdump "
    "--dump-resource-usage`, tensor-core instructions (static count) from its SASS; AMD: VGPRs, "
    "scratch bytes per lane (spills) and static LDS from the code object's metadata, MFMA "
    "instructions from the assembly. Shared KB = Triton's dynamic shared memory (LDS) + static."
)


def _status(row) -> str:
    if row["error"]:
        return "**compile error**: " + row["error"].strip().splitlines()[0][:120]
    problems = []
    if row["over_shared_limit"]:
        problems.append("**over shared limit**")
    if row["over_register_limit"]:
        problems.append("**over the register limit**")
    if row["usage"] is None:
        problems.append("compiled to TTGIR only")
    elif row["usage"]["spill_bytes"]:
        problems.append("spills")
    if row.get("codegen_findings"):
        problems.append(f"**codegen gate: {len(row['codegen_findings'])} register transpose(s)**")
    return ", ".join(problems) or "ok"


def markdown_table(rows) -> list:
    """Markdown table lines, one per row: kernel, constexprs, dtype, warps, stages, target,
    registers, spill bytes, shared KB, tensor-core instructions, status."""
    lines = [
        (
            "| kernel | constexprs | dtype | warps | stages | target | regs | spill B | "
            "shared KB | tensor-core instrs | status |"
        ),
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        rec = row["record"]
        u = row["usage"]
        if row["error"] or u is None:
            cells = ["-"] * 4
        else:
            cells = [
                str(u["registers"]),
                str(u["spill_bytes"]),
                f"{u['shared_bytes'] / 1024:.1f}",
                tensor_core_label(u),
            ]
        lines.append(
            "| "
            + " | ".join(
                [
                    f"`{rec['kernel_name']}`",
                    constexpr_label(rec["constexprs"]),
                    _dtype_label(rec["signature"]),
                    str(rec["num_warps"]),
                    str(rec["num_stages"]),
                    row["arch"],
                    *cells,
                    _status(row).replace("|", "\\|"),
                ]
            )
            + " |"
        )
    return lines


def summary_line(rows, extra_failures: int = 0) -> str:
    """ "**PASS**: ..." or "**FAIL**: ..." for `rows` (plus `extra_failures` found elsewhere,
    e.g. launches that could not be recorded): compile errors and hardware limits."""
    n_errors = sum(bool(r["error"]) for r in rows)
    n_limits = sum(
        bool(not r["error"] and (r["over_shared_limit"] or r["over_register_limit"])) for r in rows
    )
    n_spill = sum(bool(r["usage"] and r["usage"]["spill_bytes"]) for r in rows)
    if n_errors or n_limits or extra_failures:
        extra = f", {extra_failures} other failure(s)" if extra_failures else ""
        return (
            f"**FAIL**: {n_errors} compile error(s), {n_limits} over a hardware limit{extra}, "
            f"out of {len(rows)} compiles ({n_spill} with spills)."
        )
    return (
        f"**PASS**: all {len(rows)} compiles succeeded within the hardware limits "
        f"({n_spill} with spills)."
    )


def error_details(rows) -> list:
    """Markdown lines with the full text of every compile error in `rows` (empty if none)."""
    errors = [r for r in rows if r["error"]]
    if not errors:
        return []
    lines = ["## Compile errors", ""]
    for r in errors:
        lines += [
            (
                f"### `{r['record']['kernel_name']}` {r['arch']}, Triton {r['triton']} "
                f"({constexpr_label(r['record']['constexprs'])})"
            ),
            "",
            "```",
            r["error"].strip()[-6000:],
            "```",
            "",
        ]
    return lines


def render_markdown(rows, title: str = "Ahead-of-time compile report", notes: str = "") -> str:
    """A markdown report of `rows`: the table, a PASS/FAIL line, the codegen gate's findings and
    every compile error."""
    import triton

    from tools import codegen_gate

    lines = [f"# {title}", ""]
    if notes:
        lines += [notes, ""]
    lines += [f"Triton {triton.__version__}. " + REPORT_PREAMBLE, ""]
    lines += markdown_table(rows) + [
        "",
        summary_line(rows),
        "",
        codegen_gate.summary_line(rows),
        "",
    ]
    lines += codegen_gate.findings_table(rows) + error_details(rows)
    return "\n".join(lines).rstrip("\n") + "\n"


# --------------------------------------------------------------------------------------------
# Command line
# --------------------------------------------------------------------------------------------


def main(argv=None) -> int:
    """`python -m tools.aot_compile records.json [...] --targets cuda:80 cuda:90 hip:gfx942
    --markdown out.md [--json rows.json] [--sys-path DIR]`; exit status 1 if any compile fails,
    exceeds a hardware limit or fails the codegen gate."""
    parser = argparse.ArgumentParser(
        prog="python -m tools.aot_compile", description=__doc__.splitlines()[0]
    )
    parser.add_argument("records", nargs="*", help="JSON files written by save_records")
    parser.add_argument(
        "--targets",
        nargs="+",
        default=["cuda:80", "cuda:90"],
        help="cuda:<capability> or hip:<gfx arch> (a bare number is cuda)",
    )
    parser.add_argument(
        "--work",
        help="instead of records x targets: a JSON list of "
        "{record, target, ttgir_only} items (what measure_concurrently hands "
        "its children)",
    )
    parser.add_argument("--markdown", help="write the markdown report here (default: stdout)")
    parser.add_argument("--json", help="also write the result rows as JSON here")
    parser.add_argument(
        "--sys-path",
        action="append",
        default=[],
        help="directory to put on sys.path to import the kernels' modules",
    )
    parser.add_argument("--title", default="Ahead-of-time compile report")
    parser.add_argument(
        "--no-codegen-gate",
        action="store_true",
        help="do not run the codegen gate (tools/codegen_gate.py)",
    )
    parser.add_argument(
        "--ttgir-only",
        action="store_true",
        help="compile only to TTGIR (the codegen gate's input; no resources)",
    )
    parser.add_argument("--quiet", action="store_true", help="no markdown report on stdout")
    args = parser.parse_args(argv)
    if triton_interpret_enabled():
        parser.error("TRITON_INTERPRET is set: unset it to compile (env -u TRITON_INTERPRET ...)")
    if not args.records and not args.work:
        parser.error("give records files or --work")
    for p in args.sys_path:
        sys.path.insert(0, os.path.abspath(p))
    if args.work:
        with open(args.work) as f:
            work = [
                (
                    record_from_dict(d["record"]),
                    target_name(d["target"]),
                    d.get("ttgir_only", args.ttgir_only),
                )
                for d in json.load(f)
            ]
    else:
        records = [r for path in args.records for r in load_records(path)]
        work = _work(records, args.targets)
    rows = measure_work(work, check_codegen=not args.no_codegen_gate, ttgir_only=args.ttgir_only)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1, default=str)
    if args.markdown or not args.quiet:
        report = render_markdown(rows, title=args.title)
        if args.markdown:
            os.makedirs(os.path.dirname(os.path.abspath(args.markdown)), exist_ok=True)
            with open(args.markdown, "w") as f:
                f.write(report)
        else:
            print(report)
    failed = [r for r in rows if row_failed(r) or r.get("codegen_findings")]
    print(f"{len(rows) - len(failed)}/{len(rows)} compiles ok", file=sys.stderr)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
