"""Toy Triton kernels (and their launchers) for the ahead-of-time compile tests.

`matmul_tile_kernel` multiplies one BLOCK x BLOCK tile pair with `tl.dot` (fp32 accumulation), the
smallest kernel that uses the tensor cores (HMMA on sm_80, Hopper wgmma / HGMMA on sm_90 for
16-bit inputs at num_warps=4). Its launcher goes through `flash_kernels.utils.launch`, like the
ops, so that `record_launches` sees it; it also passes an int equal to 1 (`n_tiles`), which
Triton 3.9 specialises to the constexpr 1, and a `do_not_specialize` length (`T`).
"""
import torch
import triton
import triton.language as tl

from flash_kernels.utils import launch


@triton.jit(do_not_specialize=["T"])
def matmul_tile_kernel(a_ptr, b_ptr, c_ptr, T, n_tiles, stride_a, scale, HAS_SCALE: tl.constexpr,
                       BLOCK: tl.constexpr, ACC_EXTRA=None):
    """c = a @ b for one BLOCK x BLOCK tile (row-major, row stride `stride_a` for a, BLOCK else)."""
    rows = tl.arange(0, BLOCK)
    a = tl.load(a_ptr + rows[:, None] * stride_a + rows[None, :], mask=rows[:, None] < T, other=0.0)
    b = tl.load(b_ptr + rows[:, None] * BLOCK + rows[None, :])
    acc = tl.dot(a, b) * n_tiles
    if HAS_SCALE:
        acc = acc * scale
    tl.store(c_ptr + rows[:, None] * BLOCK + rows[None, :], acc)


def matmul_tile(a: torch.Tensor, b: torch.Tensor, block: int = 64, num_warps: int = 4,
                num_stages: int = 2) -> torch.Tensor:
    """fp32 a[:block, :block] @ b through `launch` (T = a.shape[0] rows of a are valid)."""
    c = torch.empty(block, block, dtype=torch.float32, device=a.device)
    launch(matmul_tile_kernel, (1,),
           dict(a_ptr=a, b_ptr=b, c_ptr=c, T=a.shape[0], n_tiles=1, stride_a=a.stride(0),
                scale=1.0),
           dict(HAS_SCALE=False, BLOCK=block), num_warps=num_warps, num_stages=num_stages)
    return c
