"""Out-of-bounds checks for kernels run under the Triton interpreter (tests only).

On a GPU an unmasked load or store past a tensor faults ("an illegal memory access was
encountered") or silently reads a neighbour's bytes; under the interpreter the same access
reads or writes whatever host memory lies there, so the CPU suite cannot see it. This module
wraps the interpreter's masked load and store: every address a launch touches (mask true) must
lie inside one of the tensors passed to that launch, within the span its sizes and strides
address. A violation raises `OutOfBoundsAccess` naming the kernel, the access and the nearest
tensor argument, at the access.

Installed by tests/conftest.py (and tests/helpers.py, for spawned processes) under the
interpreter unless FLASH_KERNELS_MEMCHECK=0. The package itself is never patched.
"""

import os
import threading

import numpy as np


class OutOfBoundsAccess(AssertionError):
    """A kernel touched memory outside every tensor argument of its launch."""


_state = threading.local()


def _spans(named_args):
    """[(name, first byte, end byte)] of every tensor among the launch's arguments."""
    spans = []
    for name, arg in named_args:
        if not hasattr(arg, "data_ptr") or not hasattr(arg, "stride"):
            continue
        if arg.numel() == 0:
            continue
        low = high = 0
        for size, stride in zip(arg.shape, arg.stride()):
            reach = (size - 1) * stride
            if reach >= 0:
                high += reach
            else:
                low += reach
        size_bytes = arg.element_size()
        start = arg.data_ptr() + low * size_bytes
        spans.append((name, start, arg.data_ptr() + (high + 1) * size_bytes))
    return spans


def _check(kind, ptrs, mask):
    spans = getattr(_state, "spans", None)
    if spans is None:
        return
    addresses = np.asarray(ptrs.data).astype(np.uint64)
    selected = np.broadcast_to(np.asarray(mask.data, dtype=bool), addresses.shape)
    addresses = addresses[selected]
    if addresses.size == 0:
        return
    width = max(1, ptrs.get_element_ty().primitive_bitwidth // 8)
    inside = np.zeros(addresses.shape, dtype=bool)
    for _, start, end in spans:
        inside |= (addresses >= start) & (addresses + width <= end)
    if inside.all():
        return
    bad = int(addresses[~inside][0])
    name, start, end = min(
        spans,
        key=lambda s: min(abs(bad - s[1]), abs(bad - s[2])),
        default=("(no tensor argument)", 0, 0),
    )
    raise OutOfBoundsAccess(
        f"{_state.kernel}: {kind} of {int((~inside).sum())} element(s) outside every tensor "
        f"argument; first at byte {bad - start:+d} from the start of '{name}' "
        f"({end - start} bytes long)"
    )


def install():
    """Wrap the interpreter (idempotent)."""
    from triton.runtime import interpreter

    builder = interpreter.InterpreterBuilder
    if getattr(builder.create_masked_load, "memchecked", False):
        return
    load, store = builder.create_masked_load, builder.create_masked_store
    call = interpreter.GridExecutor.__call__

    def checked_load(self, ptrs, mask, other, cache_policy, is_volatile):
        _check("load", ptrs, mask)
        return load(self, ptrs, mask, other, cache_policy, is_volatile)

    def checked_store(self, ptrs, value, mask, cache_policy):
        _check("store", ptrs, mask)
        return store(self, ptrs, value, mask, cache_policy)

    def checked_call(self, *args, **kwargs):
        names = list(self.arg_names)
        named = list(zip(names, args)) + list(kwargs.items())
        saved = getattr(_state, "spans", None), getattr(_state, "kernel", None)
        _state.spans, _state.kernel = _spans(named), getattr(self.fn, "__name__", "kernel")
        try:
            return call(self, *args, **kwargs)
        finally:
            _state.spans, _state.kernel = saved

    checked_load.memchecked = checked_store.memchecked = True
    builder.create_masked_load, builder.create_masked_store = checked_load, checked_store
    interpreter.GridExecutor.__call__ = checked_call


def enabled():
    return (
        os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
        and os.environ.get("FLASH_KERNELS_MEMCHECK", "1") != "0"
    )


if enabled():
    install()
