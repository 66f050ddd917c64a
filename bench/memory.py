"""Peak memory of a call: CUDA's allocator statistics on a GPU, peak RSS in a child on a CPU."""

import ctypes
import ctypes.util
import multiprocessing

import torch

_M_MMAP_THRESHOLD = -3


def _proc_status_bytes(field):
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def _cpu_peaks(calls):
    # glibc serves small allocations, and any that fit a freed chunk, from its heap and keeps
    # freed heap pages resident, which hides them from RSS. In a fresh process with a 64 KiB
    # mmap threshold every tensor is its own mmap, returned to the system when freed.
    ctypes.CDLL(ctypes.util.find_library("c")).mallopt(_M_MMAP_THRESHOLD, 64 * 1024)
    peaks = []
    for fn, args in calls:
        with open("/proc/self/clear_refs", "w") as clear_refs:
            clear_refs.write("5")  # reset VmHWM to the current RSS (Linux)
        before = _proc_status_bytes("VmRSS")
        fn(*args)
        peaks.append(max(_proc_status_bytes("VmHWM") - before, 0))
    return peaks


def peak_memory_bytes(calls, device):
    """Peak bytes allocated above the level before each call, for a list of (fn, args).

    `fn` must be a module-level function (it is pickled into a child process on the CPU; the
    child makes its own inputs, so what it measures is only what the call allocates).
    """
    if device.type == "cuda":
        peaks = []
        for fn, args in calls:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
            before = torch.cuda.memory_allocated()
            fn(*args)
            torch.cuda.synchronize()
            peaks.append(torch.cuda.max_memory_allocated() - before)
        return peaks
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        return pool.apply(_cpu_peaks, (calls,))
