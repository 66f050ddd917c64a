"""Helpers shared by the ops: Triton availability, dtype maps, and the one place kernels launch.

Every kernel launch goes through `launch`, so that tests and the ahead-of-time compile report can
record exactly which kernels, argument dtypes, constexprs and warp counts the ops really use, and
so that launches under the Triton interpreter can be serialised (see `launch`).
"""
import contextlib
import inspect
import os
import threading
from dataclasses import dataclass, field

import torch


TRITON_MAX_S = 256   # the Triton kernels hold a row of q/k (S features) in one tile


def autocast_dtype(x):
    """The dtype autocast casts x's device's matmul inputs to, or None outside autocast."""
    device_type = x.device.type if isinstance(x, torch.Tensor) else None
    if device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def autocast_cast(x, dtype):
    """x in the autocast dtype, as autocast casts a matmul's inputs (float64 and non-floating
    tensors, and None, are left alone)."""
    if isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != torch.float64:
        return x.to(dtype)
    return x


def cuda_graph_capturing() -> bool:
    """Whether the current CUDA stream is capturing a graph (host reads are then not allowed).
    False under torch.compile, which cannot trace the query (it returns a bool); the callers
    skip their host reads while compiling anyway."""
    return (not torch.compiler.is_compiling() and torch.cuda.is_available()
            and torch.cuda.is_current_stream_capturing())


def triton_interpret_enabled() -> bool:
    """Whether TRITON_INTERPRET is set now (read when an op runs). It only takes effect if it
    was already set when flash_kernels was imported: see INTERPRETED_KERNELS."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Whether the package's kernels run under the Triton interpreter. triton.jit reads
# TRITON_INTERPRET once, when it defines a kernel, and the kernels are defined while
# flash_kernels is imported: importing any part of the package runs flash_kernels/__init__.py,
# which imports this module and then, in the same import, the kernel modules. Setting or unsetting
# the variable later changes nothing for them (check_triton_inputs says so instead of letting
# Triton fail with "0 active drivers").
INTERPRETED_KERNELS = triton_interpret_enabled()


def functorch_transform_active() -> bool:
    """Whether a torch.func transform (grad, vmap, jacrev, jvp, ...) is running. The Triton
    custom ops have no functorch rules, so the public ops must not reach them there. Skipped
    under torch.compile, where Dynamo answers with its own functorch state, not the caller's."""
    return (not torch.compiler.is_compiling()
            and torch._C._functorch.peek_interpreter_stack() is not None)


@dataclass
class LaunchRecord:
    """One kernel launch, enough to compile it again ahead of time in another process.

    `signature` maps every non-constexpr argument name to a Triton type string ("*fp32", "i32",
    "i64", "fp32", "u1"), or to "constexpr" for the run-time arguments the JIT turns into
    constants (None, and ints equal to 1 unless in `do_not_specialize`); `constexprs` maps those
    and the `tl.constexpr` parameters to their values; `divisible_by_16` names the integer/pointer
    arguments the JIT would specialise as multiples of 16 ("tt.divisibility" = 16).
    `make_launch_record` builds one as Triton 3.9's JIT specialises a launch.
    """
    kernel_module: str
    kernel_name: str
    signature: dict
    constexprs: dict
    divisible_by_16: list
    num_warps: int
    num_stages: int
    grid: tuple = field(default=())

    def key(self):
        return (self.kernel_module, self.kernel_name, tuple(sorted(self.signature.items())),
                tuple(sorted(self.constexprs.items())), tuple(sorted(self.divisible_by_16)),
                self.num_warps, self.num_stages)


_TORCH_TO_TRITON = {    # as Triton 3.9 names pointer element types (torch.bool -> "u1")
    torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32", torch.float64: "fp64",
    torch.int32: "i32", torch.int64: "i64", torch.int16: "i16", torch.int8: "i8",
    torch.uint8: "u8", torch.bool: "u1",
    torch.float8_e4m3fn: "fp8e4nv", torch.float8_e5m2: "fp8e5",
}

_recorders: list = []


@contextlib.contextmanager
def record_launches():
    """Collect a LaunchRecord for every `launch` inside the block (yields the list). Blocks
    may nest (the self-test records inside a recording caller): each removes its own list,
    found by identity (list.remove compares by value, and nested lists can be equal)."""
    records: list = []
    _recorders.append(records)
    try:
        yield records
    finally:
        del _recorders[next(i for i, active in enumerate(_recorders) if active is records)]


def _triton_type(value):
    """Triton's type string for a run-time argument, as Triton 3.9's JIT mangles it."""
    if isinstance(value, torch.Tensor):
        return "*" + _TORCH_TO_TRITON[value.dtype]
    if isinstance(value, bool):
        return "u1"                       # Triton 3.9: Python bools are "u1" (not "i1")
    if isinstance(value, int):
        if -2**31 <= value < 2**31:
            return "i32"
        return "u64" if value >= 2**63 else "i64"
    if isinstance(value, float):
        return "fp32"
    if value is None:
        return "constexpr"
    raise TypeError(f"cannot describe kernel argument {value!r} for the launch record")


def _divisible_by_16(value):
    if isinstance(value, torch.Tensor):
        return value.data_ptr() % 16 == 0
    return isinstance(value, int) and not isinstance(value, bool) and value % 16 == 0


def _jit_object(kernel):
    """The triton.jit object (JITFunction, or InterpretedFunction under TRITON_INTERPRET=1) inside
    `kernel`, unwrapping autotuner/heuristics wrappers (whose `.fn` is the next object)."""
    obj = kernel
    while hasattr(obj, "fn") and not inspect.isfunction(obj.fn):
        obj = obj.fn
    return obj


def _python_function(kernel):
    """The plain Python function a (possibly wrapped) triton.jit kernel was made from."""
    obj = kernel
    while hasattr(obj, "fn"):
        obj = obj.fn
    return obj


def _no_specialize_names(jit_obj, option):
    """Argument names listed in the kernel's `do_not_specialize` / `..._on_alignment` option.

    A JITFunction keeps the option as an attribute; Triton 3.9's InterpretedFunction (under
    TRITON_INTERPRET=1) only keeps the decorator keywords in `.kwargs`. Entries are names or
    positional indices.
    """
    entries = getattr(jit_obj, option, None)
    if entries is None:
        entries = (getattr(jit_obj, "kwargs", None) or {}).get(option)
    names = jit_obj.arg_names
    return {names[i] if isinstance(i, int) else i for i in (entries or ())}


def _param_kind(param):
    """("constexpr", None), ("typed", type string) or ("plain", None) from a parameter annotation."""
    ann = param.annotation
    if ann is inspect.Parameter.empty or not ann:
        return "plain", None
    try:
        from triton.runtime.jit import KernelParam
        kp = KernelParam(0, param, False, False)
        if kp.is_constexpr:
            return "constexpr", None
        return ("typed", kp.annotation_type) if kp.annotation_type else ("plain", None)
    except Exception:                     # older/newer Triton: fall back on the annotation text
        return ("constexpr", None) if "constexpr" in str(ann) else ("plain", None)


def specialize_argument(value, specialize=True, align=True, annotation_type=None):
    """What Triton 3.9's JIT makes of one non-constexpr argument: (type, is_constant, div16).

    Mirrors `triton._C.libtriton.native_specialize_impl` plus `create_function_from_signature`:
    None becomes a constexpr; an int equal to 1 becomes the constexpr 1 (unless the argument is in
    `do_not_specialize`, or annotated with a type); ints and pointers whose value / address is a
    multiple of 16 get the "tt.divisibility"=16 attribute unless in `do_not_specialize` or
    `do_not_specialize_on_alignment`; bools ("u1") and floats ("fp32") are never specialised.
    An annotated type (`x: tl.int64`) replaces the inferred type; fp/bf/u1 annotations turn off
    specialisation.
    """
    if value is None:
        return "constexpr", True, False
    ty = _triton_type(value)
    if annotation_type:
        ty = annotation_type
        if annotation_type == "u1" or annotation_type[:2] in ("fp", "bf"):
            return ty, False, False
    elif (specialize and isinstance(value, int) and not isinstance(value, bool) and value == 1):
        return "constexpr", True, False
    div16 = specialize and align and _divisible_by_16(value)
    return ty, False, div16


def make_launch_record(kernel, grid, args: dict, constexprs: dict, num_warps: int,
                       num_stages: int) -> LaunchRecord:
    """The LaunchRecord of `kernel[grid](**args, **constexprs)`: what Triton's JIT would compile.

    Arguments annotated `tl.constexpr` go to `constexprs` whichever dict they came in; parameters
    left out take their defaults (as the JIT binds them); see `specialize_argument` for the rest.
    """
    jit_obj = _jit_object(kernel)
    fn = _python_function(kernel)
    no_specialize = _no_specialize_names(jit_obj, "do_not_specialize")
    no_align = _no_specialize_names(jit_obj, "do_not_specialize_on_alignment")
    passed = {**args, **constexprs}
    signature, constants, divisible = {}, {}, []
    for name, param in inspect.signature(fn).parameters.items():
        if name in passed:
            value = passed[name]
        elif param.default is not inspect.Parameter.empty:
            value = param.default
        else:
            raise TypeError(f"{fn.__name__}: missing kernel argument {name!r}")
        kind, annotation_type = _param_kind(param)
        if kind == "constexpr":        # the JIT decides by the annotation, not by which dict
            constants[name] = value
            continue
        ty, is_constant, div16 = specialize_argument(
            value, specialize=name not in no_specialize, align=name not in no_align,
            annotation_type=annotation_type)
        signature[name] = ty
        if is_constant:
            constants[name] = value
        if div16:
            divisible.append(name)
    return LaunchRecord(
        kernel_module=fn.__module__, kernel_name=fn.__name__, signature=signature,
        constexprs=constants, divisible_by_16=divisible, num_warps=num_warps,
        num_stages=num_stages, grid=() if callable(grid) else tuple(grid))


# The Triton interpreter is not thread-safe: a launch sets the program id in one module-level
# builder and patches triton.language's functions for its duration, so two launches running at
# once read each other's program ids and restore each other's patches (wrong outputs, or
# "z >= grid_dim[2]" crashes). Locking each launch is enough; an op need not hold the lock
# between its launches: an interpreted launch copies its arguments in, runs every program, copies
# them back and undoes its patches before it returns, so nothing of it outlives the launch, and
# the buffers one op passes from a launch to the next are its own (allocated per call), which
# another thread's launches never touch. Locking whole ops would buy nothing more and would
# also serialise their PyTorch work between launches. Compiled (GPU) launches need no lock.
_interpreter_lock = threading.Lock()


def launch(kernel, grid, args: dict, constexprs: dict, num_warps: int, num_stages: int):
    """Launch `kernel[grid](**args, **constexprs)`; record it when a recorder is active.

    `args` are the run-time arguments (tensors, ints, floats; None for an absent optional
    pointer, which Triton treats as a constexpr), `constexprs` the compile-time ones.
    Under the interpreter, one launch runs at a time (threads wait for each other).
    """
    if _recorders:
        record = make_launch_record(kernel, grid, args, constexprs, num_warps, num_stages)
        for records in _recorders:
            records.append(record)
    with _interpreter_lock if INTERPRETED_KERNELS else contextlib.nullcontext():
        kernel[grid](**args, **constexprs, num_warps=num_warps, num_stages=num_stages)


_nan_fill_depth = 0


@contextlib.contextmanager
def nan_filled_buffers():
    """Inside the block, `new_buffer` fills with NaN, so a kernel that reads memory nobody
    wrote (or leaves part of an output unwritten) produces NaN that a test catches."""
    global _nan_fill_depth
    _nan_fill_depth += 1
    try:
        yield
    finally:
        _nan_fill_depth -= 1


def new_buffer(shape, dtype, device):
    """An output or scratch buffer every element of which a kernel is expected to write."""
    if _nan_fill_depth:
        return torch.full(shape, float("nan"), dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def next_power_of_2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


def resolve_scales(quad_scale, lin_scale, chunk_size):
    """The scales as numbers, None meaning the default 1 / chunk_size. The Triton path passes
    None through to here, inside its custom ops, so that torch.compile never sees 1 / T as a
    constant (chunk_size=None makes C = T: a guard on it would recompile for every length)."""
    return (quad_scale if quad_scale is not None else 1.0 / chunk_size,
            lin_scale if lin_scale is not None else 1.0 / chunk_size)


def triton_version():
    """The installed Triton's (major, minor), e.g. (3, 9)."""
    import triton
    return tuple(int(part) for part in triton.__version__.split(".")[:2])
