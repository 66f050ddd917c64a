"""The one place kernels launch, and how their arguments and buffers are made.

Every kernel launch goes through `launch`, so that
- launches under the Triton interpreter are serialised (see `_interpreter_lock`), and
- a tool may watch them: `launch_callback` installs a function called with each launch's
  arguments before it runs (tools/launch_recording.py records launches with it for the
  ahead-of-time compile; the self-test checks which kernels a path launched).

Override points for the test helpers and the self-test (tests/helpers.py, tile_override and
nan_filled_buffers; flash_kernels/selftest): `_buffer_fill` below and
kernel_config._tile_overrides. Nothing else sets them.
"""

import contextlib
import threading

import torch

from ...core.environment import INTERPRETED_KERNELS

_launch_callbacks: list = []

#: None: `new_buffer` leaves buffers uninitialised; a float: it fills them with it (NaN makes
#: an unwritten output, or a read of memory nobody wrote, visible).
_buffer_fill = None


@contextlib.contextmanager
def launch_callback(callback):
    """Inside the block, call `callback(kernel, grid, args, constexprs, num_warps, num_stages)`
    before every launch (the arguments of `launch`). Blocks nest: each callback sees every
    launch of its block, and leaving a block removes its own callback (found by identity)."""
    _launch_callbacks.append(callback)
    try:
        yield
    finally:
        del _launch_callbacks[
            next(i for i, active in enumerate(_launch_callbacks) if active is callback)
        ]


# The Triton interpreter is not thread-safe: a launch sets the program id in one module-level
# builder and patches triton.language's functions for its duration, so two launches running at
# once read each other's program ids and restore each other's patches (wrong outputs, or
# "z >= grid_dim[2]" crashes). Locking each launch is enough; an op need not hold the lock
# between its launches: an interpreted launch copies its arguments in, runs every program,
# copies them back and undoes its patches before it returns, so nothing of it outlives the
# launch, and the buffers one op passes from a launch to the next are its own (allocated per
# call), which another thread's launches never touch. Locking whole ops would buy nothing more
# and would also serialise their PyTorch work between launches. Compiled (GPU) launches need
# no lock.
_interpreter_lock = threading.Lock()


def launch(kernel, grid, args: dict, constexprs: dict, num_warps: int, num_stages: int):
    """Launch `kernel[grid](**args, **constexprs)`.

    `args` are the run-time arguments (tensors, ints, floats; None for an absent optional
    pointer, which Triton treats as a constexpr), `constexprs` the compile-time ones.
    Under the interpreter, one launch runs at a time (threads wait for each other).
    """
    for callback in _launch_callbacks:
        callback(kernel, grid, args, constexprs, num_warps, num_stages)
    with _interpreter_lock if INTERPRETED_KERNELS else contextlib.nullcontext():
        kernel[grid](**args, **constexprs, num_warps=num_warps, num_stages=num_stages)


def new_buffer(shape, dtype, device):
    """An output or scratch buffer every element of which a kernel is expected to write."""
    if _buffer_fill is not None:
        return torch.full(shape, _buffer_fill, dtype=dtype, device=device)
    return torch.empty(shape, dtype=dtype, device=device)


def cdiv(a, b):
    return -(-a // b)


def row_strides(x):
    """(batch stride, token stride) of a (B, T, W) view whose features are contiguous."""
    return x.stride(0), x.stride(1)


def feature_contiguous(x):
    """x itself when its last dim has unit stride (the kernels take batch and token strides,
    so slices of a fused projection need no copy), else a contiguous copy."""
    return x if x is None or x.stride(-1) == 1 else x.contiguous()


def stride_arguments(**tensors):
    """Kernel arguments stride_<name>b, stride_<name>t of each (B, T, W) input (0 when absent)."""
    args = {}
    for name, x in tensors.items():
        batch_stride, token_stride = row_strides(x) if x is not None else (0, 0)
        args[f"stride_{name}b"], args[f"stride_{name}t"] = batch_stride, token_stride
    return args
