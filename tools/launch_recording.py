"""The launch recorder: a LaunchRecord of every kernel launch (installed as the one callback
hook of flash_kernels/backends/triton/launch.py, `launch_callback`), with the argument types,
constexprs and 16-divisibility specialisations Triton 3.9's JIT would compile it with, so that
the ahead-of-time compile (tools/aot_compile.py) can compile it again in another process.

Developer tooling, not installed with the package: it mirrors Triton's JIT specialisation rules,
which change between Triton versions (tests/test_aot_compile.py checks the mirror)."""

import contextlib
import inspect
from dataclasses import dataclass, field

import torch

from flash_kernels.backends.triton.launch import launch_callback


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
        return (
            self.kernel_module,
            self.kernel_name,
            tuple(sorted(self.signature.items())),
            tuple(sorted(self.constexprs.items())),
            tuple(sorted(self.divisible_by_16)),
            self.num_warps,
            self.num_stages,
        )


_TORCH_TO_TRITON = {  # as Triton 3.9 names pointer element types (torch.bool -> "u1")
    torch.float16: "fp16",
    torch.bfloat16: "bf16",
    torch.float32: "fp32",
    torch.float64: "fp64",
    torch.int32: "i32",
    torch.int64: "i64",
    torch.int16: "i16",
    torch.int8: "i8",
    torch.uint8: "u8",
    torch.bool: "u1",
    torch.float8_e4m3fn: "fp8e4nv",
    torch.float8_e5m2: "fp8e5",
}


@contextlib.contextmanager
def record_launches():
    """Collect a LaunchRecord for every kernel launch inside the block (yields the list).
    Blocks may nest (the self-test watches launches inside a recording caller)."""
    records: list = []

    def record(kernel, grid, args, constexprs, num_warps, num_stages):
        records.append(make_launch_record(kernel, grid, args, constexprs, num_warps, num_stages))

    with launch_callback(record):
        yield records


def _triton_type(value):
    """Triton's type string for a run-time argument, as Triton 3.9's JIT mangles it."""
    if isinstance(value, torch.Tensor):
        return "*" + _TORCH_TO_TRITON[value.dtype]
    if isinstance(value, bool):
        return "u1"  # Triton 3.9: Python bools are "u1" (not "i1")
    if isinstance(value, int):
        if -(2**31) <= value < 2**31:
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
    """("constexpr", None), ("typed", type string) or ("plain", None) from a parameter
    annotation."""
    ann = param.annotation
    if ann is inspect.Parameter.empty or not ann:
        return "plain", None
    try:
        from triton.runtime.jit import KernelParam  # a Triton internal: probed, may move

        kp = KernelParam(0, param, False, False)
        if kp.is_constexpr:
            return "constexpr", None
        return ("typed", kp.annotation_type) if kp.annotation_type else ("plain", None)
    except Exception:  # older/newer Triton: fall back on the annotation text
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
    elif specialize and isinstance(value, int) and not isinstance(value, bool) and value == 1:
        return "constexpr", True, False
    div16 = specialize and align and _divisible_by_16(value)
    return ty, False, div16


def make_launch_record(
    kernel, grid, args: dict, constexprs: dict, num_warps: int, num_stages: int
) -> LaunchRecord:
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
        if kind == "constexpr":  # the JIT decides by the annotation, not by which dict
            constants[name] = value
            continue
        ty, is_constant, div16 = specialize_argument(
            value,
            specialize=name not in no_specialize,
            align=name not in no_align,
            annotation_type=annotation_type,
        )
        signature[name] = ty
        if is_constant:
            constants[name] = value
        if div16:
            divisible.append(name)
    return LaunchRecord(
        kernel_module=fn.__module__,
        kernel_name=fn.__name__,
        signature=signature,
        constexprs=constants,
        divisible_by_16=divisible,
        num_warps=num_warps,
        num_stages=num_stages,
        grid=() if callable(grid) else tuple(grid),
    )
