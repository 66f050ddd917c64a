"""Toy Triton kernels (and their launchers) for the ahead-of-time compile tests.

`matmul_tile_kernel` multiplies one BLOCK x BLOCK tile pair with `tl.dot` (fp32 accumulation), the
smallest kernel that uses the tensor cores (HMMA on sm_80, Hopper wgmma / HGMMA on sm_90 for
16-bit inputs at num_warps=4). Its launcher goes through
`flash_kernels.backends.triton.launch.launch`, like the ops, so that `record_launches` sees it; it
also passes an int equal to 1 (`n_tiles`), which Triton 3.9 specialises to the constexpr 1, and a
`do_not_specialize` length (`T`).
"""

import torch
import triton
import triton.language as tl

from flash_kernels.backends.triton.launch import launch


@triton.jit(do_not_specialize=["T"])
def matmul_tile_kernel(
    a_ptr,
    b_ptr,
    c_ptr,
    T,
    n_tiles,
    stride_a,
    scale,
    HAS_SCALE: tl.constexpr,
    BLOCK: tl.constexpr,
    ACC_EXTRA=None,
):
    """c = a @ b for one BLOCK x BLOCK tile (row-major, row stride `stride_a` for a, BLOCK else)."""
    rows = tl.arange(0, BLOCK)
    a = tl.load(a_ptr + rows[:, None] * stride_a + rows[None, :], mask=rows[:, None] < T, other=0.0)
    b = tl.load(b_ptr + rows[:, None] * BLOCK + rows[None, :])
    acc = tl.dot(a, b) * n_tiles
    if HAS_SCALE:
        acc = acc * scale
    tl.store(c_ptr + rows[:, None] * BLOCK + rows[None, :], acc)


def matmul_tile(
    a: torch.Tensor, b: torch.Tensor, block: int = 64, num_warps: int = 4, num_stages: int = 2
) -> torch.Tensor:
    """fp32 a[:block, :block] @ b through `launch` (T = a.shape[0] rows of a are valid)."""
    c = torch.empty(block, block, dtype=torch.float32, device=a.device)
    launch(
        matmul_tile_kernel,
        (1,),
        dict(a_ptr=a, b_ptr=b, c_ptr=c, T=a.shape[0], n_tiles=1, stride_a=a.stride(0), scale=1.0),
        dict(HAS_SCALE=False, BLOCK=block),
        num_warps=num_warps,
        num_stages=num_stages,
    )
    return c


# ---------------------------------------------------------------------------------------------
# Transposes into a second product: what the codegen gate (tools/codegen_gate.py) must reject
# and what it must accept. Each computes out = (q k^T)^T v or a relative of it for one tile
# (q, k: BLOCK x BLOCK_S, v: BLOCK x BLOCK_S, all row-major and contiguous).
# ---------------------------------------------------------------------------------------------


@triton.jit
def _tile(ptr, ROWS: tl.constexpr, COLS: tl.constexpr):
    """The row-major ROWS x COLS tile at ptr."""
    rows = tl.arange(0, ROWS)
    cols = tl.arange(0, COLS)
    return tl.load(ptr + rows[:, None] * COLS + cols[None, :])


@triton.jit
def _tile_transposed(ptr, ROWS: tl.constexpr, COLS: tl.constexpr):
    """The transpose (COLS x ROWS) of the row-major ROWS x COLS tile at ptr, loaded with
    transposed addressing: no transpose instruction anywhere."""
    rows = tl.arange(0, ROWS)
    cols = tl.arange(0, COLS)
    return tl.load(ptr + cols[:, None] + rows[None, :] * COLS)


@triton.jit
def _store_tile(ptr, x, ROWS: tl.constexpr, COLS: tl.constexpr):
    rows = tl.arange(0, ROWS)
    cols = tl.arange(0, COLS)
    tl.store(ptr + rows[:, None] * COLS + cols[None, :], x)


@triton.jit
def dot_result_transposed_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, n_rows, BLOCK: tl.constexpr, BLOCK_S: tl.constexpr
):
    """BAD: out = (q k^T)^T v with the product q k^T transposed in registers (tl.trans of a dot
    result, which sits in the MMA accumulator layout) and fed to the next dot."""
    q = _tile(q_ptr, BLOCK, BLOCK_S)
    k_t = _tile_transposed(k_ptr, BLOCK, BLOCK_S)
    v = _tile(v_ptr, BLOCK, BLOCK_S)
    scores = tl.dot(q, k_t)
    out = tl.dot(tl.trans(scores).to(v.dtype), v)
    _store_tile(out_ptr, out, BLOCK, BLOCK_S)


@triton.jit
def computed_tile_transposed_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, n_rows, BLOCK: tl.constexpr, BLOCK_S: tl.constexpr
):
    """BAD: out = exp(k)^T v with exp(k) (computed from a loaded tile, no dot involved)
    transposed by tl.trans into the dot. Chosen at run time (n_rows > 0), as the old key
    backward chose its weight tiles: the transpose then stays in a blocked layout and its
    result reaches the dot through the branch's result and shared memory, so only the gate's
    "result reaches a dot operand" rule sees it."""
    k = _tile(k_ptr, BLOCK, BLOCK_S)
    v = _tile(v_ptr, BLOCK, BLOCK_S)
    weights = tl.exp(k.to(tl.float32))
    if n_rows > 0:
        weights_t = tl.trans(weights).to(v.dtype)
    else:
        weights_t = tl.zeros((BLOCK_S, BLOCK), dtype=v.dtype)
    out = tl.dot(weights_t, v)
    _store_tile(out_ptr, out, BLOCK_S, BLOCK_S)


@triton.jit
def scores_transposed_directly_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, n_rows, BLOCK: tl.constexpr, BLOCK_S: tl.constexpr
):
    """SAFE: the same out = (q k^T)^T v with S^T = k q^T computed directly (q^T loaded with
    transposed addressing): no transpose of a register tensor."""
    q_t = _tile_transposed(q_ptr, BLOCK, BLOCK_S)
    k = _tile(k_ptr, BLOCK, BLOCK_S)
    v = _tile(v_ptr, BLOCK, BLOCK_S)
    scores_t = tl.dot(k, q_t)
    out = tl.dot(scores_t.to(v.dtype), v)
    _store_tile(out_ptr, out, BLOCK, BLOCK_S)


@triton.jit
def loaded_tile_transposed_kernel(
    q_ptr, k_ptr, v_ptr, out_ptr, n_rows, BLOCK: tl.constexpr, BLOCK_S: tl.constexpr
):
    """SAFE: out = (q k^T) v with tl.trans of k straight from memory, which Triton turns into a
    transposed shared-memory descriptor (ttg.memdesc_trans), and exp(k)^T stored to memory
    (a register transpose that reaches no dot) as a second output."""
    q = _tile(q_ptr, BLOCK, BLOCK_S)
    k = _tile(k_ptr, BLOCK, BLOCK_S)
    v = _tile(v_ptr, BLOCK, BLOCK_S)
    scores = tl.dot(q, tl.trans(k))
    out = tl.dot(scores.to(v.dtype), v)
    _store_tile(out_ptr, out, BLOCK, BLOCK_S)
    _store_tile(out_ptr + BLOCK * BLOCK_S, tl.trans(tl.exp(k.to(tl.float32))), BLOCK_S, BLOCK)


#: name -> (kernel, what the codegen gate must say: True = reject)
TRANSPOSE_KERNELS = {
    "dot_result_transposed": (dot_result_transposed_kernel, True),
    "computed_tile_transposed": (computed_tile_transposed_kernel, True),
    "scores_transposed_directly": (scores_transposed_directly_kernel, False),
    "loaded_tile_transposed": (loaded_tile_transposed_kernel, False),
}


def transposed_product_reference(name: str, q, k, v) -> torch.Tensor:
    """What `transposed_product(name, q, k, v)` computes, in float32 with PyTorch."""
    q, k, v = q.float(), k.float(), v.float()
    if name == "computed_tile_transposed":
        return torch.exp(k).T @ v
    if name == "loaded_tile_transposed":
        return torch.cat([((q @ k.T) @ v).flatten(), torch.exp(k).T.flatten()])
    return (q @ k.T).T @ v


def transposed_product(
    name: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, num_warps: int = 4
) -> torch.Tensor:
    """Run TRANSPOSE_KERNELS[name] on one (BLOCK, BLOCK_S) tile each of q, k, v through
    `launch`; returns its float32 output, shaped as `transposed_product_reference`'s."""
    block, block_s = q.shape
    out = torch.empty(
        transposed_product_reference(name, q, k, v).shape, dtype=torch.float32, device=q.device
    )
    launch(
        TRANSPOSE_KERNELS[name][0],
        (1,),
        dict(q_ptr=q, k_ptr=k, v_ptr=v, out_ptr=out, n_rows=block),
        dict(BLOCK=block, BLOCK_S=block_s),
        num_warps=num_warps,
        num_stages=1,
    )
    return out
