"""What the process is doing when an op runs: the Triton interpreter, torch.func transforms,
CUDA graph capture, torch.compile tracing and autocast. The backend choice and the checks read
these; nothing here imports triton."""

import os

import torch


def triton_interpret_enabled() -> bool:
    """Whether TRITON_INTERPRET is set now (read when an op runs). It only takes effect if it
    was already set when flash_kernels was imported: see INTERPRETED_KERNELS."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


# Whether the package's kernels run under the Triton interpreter. triton.jit reads
# TRITON_INTERPRET once, when it defines a kernel, and the kernels are defined while
# flash_kernels is imported: importing any part of the package runs flash_kernels/__init__.py,
# which imports this module and then, in the same import, the kernel modules. Setting or
# unsetting the variable later changes nothing for them (check_triton_inputs says so instead
# of letting Triton fail with "0 active drivers").
INTERPRETED_KERNELS = triton_interpret_enabled()


def functorch_transform_active() -> bool:
    """Whether a torch.func transform (grad, vmap, jacrev, jvp, ...) is running. The Triton
    custom ops have no functorch rules, so the public ops must not reach them there. Skipped
    under torch.compile, where Dynamo answers with its own functorch state, not the caller's."""
    return (
        not torch.compiler.is_compiling()
        and torch._C._functorch.peek_interpreter_stack() is not None
    )


def cuda_graph_capturing() -> bool:
    """Whether the current CUDA stream is capturing a graph (host reads are then not allowed).
    False under torch.compile, which cannot trace the query (it returns a bool); the callers
    skip their host reads while compiling anyway."""
    return (
        not torch.compiler.is_compiling()
        and torch.cuda.is_available()
        and torch.cuda.is_current_stream_capturing()
    )


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
