"""The GPU the Triton kernels are planned for: architecture and shared memory per block.

Tile sizes are chosen per target (`kernel_config.kernel_config`), because the shared
memory a block may use differs by a factor of 3.6 across the GPUs people run: 227 KB on
H100/H200 and B200, 163 KB on A100, 99 KB on A10, L4, L40S and the RTX 30/40/50 series, 64 KB
of LDS on AMD Instinct. A tile choice that fits an H100 fails to launch on an RTX 4090.

On a GPU the target is read from the device. Under TRITON_INTERPRET=1 (no GPU) the kernels
run on the CPU and any target works; FLASH_KERNELS_TARGET names the one to plan for
(`cuda:90`, `cuda:86`, `hip:gfx942`, ...; default `cuda:90`), so that launches recorded under
the interpreter (tools/aot_compile.py) are those a GPU of that architecture would make. Tiles
also depend on the dtype, and the interpreter cannot run bfloat16 dots: launches recorded in
float16 for a bfloat16 compile set FLASH_KERNELS_PLAN_DTYPE=bfloat16 to get bfloat16's tiles.
"""

import functools
import os
from dataclasses import dataclass

import torch

#: Opt-in maximum of shared memory per block (bytes), by NVIDIA compute capability.
CUDA_SHARED_MEMORY_BYTES = {
    70: 98_304,
    75: 65_536,
    80: 166_912,
    86: 101_376,
    87: 166_912,
    89: 101_376,
    90: 232_448,
    100: 232_448,
    103: 232_448,
    110: 232_448,
    120: 101_376,
    121: 101_376,
}
#: LDS per workgroup on AMD Instinct (CDNA 2 and 3).
HIP_SHARED_MEMORY_BYTES = 65_536
TARGET_VARIABLE = "FLASH_KERNELS_TARGET"
PLAN_DTYPE_VARIABLE = "FLASH_KERNELS_PLAN_DTYPE"
DEFAULT_INTERPRETER_TARGET = "cuda:90"


@dataclass(frozen=True)
class GpuTarget:
    """What tile choices depend on. `arch`: the compute capability as an int (90) for CUDA,
    the gfx name ("gfx942") for HIP."""

    backend: str
    arch: object
    shared_memory_bytes: int

    @property
    def name(self):
        return f"sm_{self.arch}" if self.backend == "cuda" else str(self.arch)

    @property
    def has_tf32(self):
        """Whether float32 dots may run in tf32 (NVIDIA sm_80+; not CDNA 2)."""
        if self.backend == "cuda":
            return self.arch >= 80
        return str(self.arch) not in ("gfx90a", "gfx908")


def parse_target(text):
    """A GpuTarget from `cuda:CAPABILITY` (e.g. cuda:86) or `hip:GFXNAME` (e.g. hip:gfx942)."""
    backend, _, arch = str(text).strip().partition(":")
    if backend == "cuda" and arch.isdigit():
        capability = int(arch)
        if capability not in CUDA_SHARED_MEMORY_BYTES:
            raise ValueError(
                f"{TARGET_VARIABLE}={text!r}: unknown compute capability "
                f"{capability}; known: {sorted(CUDA_SHARED_MEMORY_BYTES)}"
            )
        return GpuTarget("cuda", capability, CUDA_SHARED_MEMORY_BYTES[capability])
    if backend == "hip" and arch.startswith("gfx"):
        return GpuTarget("hip", arch, HIP_SHARED_MEMORY_BYTES)
    raise ValueError(f"{TARGET_VARIABLE} must look like 'cuda:90' or 'hip:gfx942', got {text!r}")


@functools.lru_cache(maxsize=None)
def _device_target(index):
    props = torch.cuda.get_device_properties(index)
    shared = getattr(props, "shared_memory_per_block_optin", 0)
    if torch.version.hip is not None:
        arch = getattr(props, "gcnArchName", "gfx942").split(":")[0]
        return GpuTarget("hip", arch, shared or HIP_SHARED_MEMORY_BYTES)
    capability = props.major * 10 + props.minor
    return GpuTarget(
        "cuda", capability, shared or CUDA_SHARED_MEMORY_BYTES.get(capability, 101_376)
    )


def current_target(device):
    """The target of launches on `device`: the GPU's own, or FLASH_KERNELS_TARGET's (default
    cuda:90) for CPU tensors under the interpreter."""
    device = torch.device(device)
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        return _device_target(index)
    return parse_target(os.environ.get(TARGET_VARIABLE, DEFAULT_INTERPRETER_TARGET))


def planned_dtype(dtype, device):
    """The dtype tiles are chosen for: the inputs', or under the interpreter (CPU tensors)
    FLASH_KERNELS_PLAN_DTYPE's when set (see the module doc)."""
    name = os.environ.get(PLAN_DTYPE_VARIABLE)
    if not name or torch.device(device).type == "cuda":
        return dtype
    planned = getattr(torch, name, None)
    if not isinstance(planned, torch.dtype) or not planned.is_floating_point:
        raise ValueError(
            f"{PLAN_DTYPE_VARIABLE} must name a torch floating dtype such as "
            f"'bfloat16', got {name!r}"
        )
    return planned
