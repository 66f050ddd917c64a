"""Launch grids respect CUDA's limits: axis 0 up to 2^31 - 1 programs, axes 1 and 2 up to 65535.

The interpreter has no such limits, so on the CPU the grids are checked as the ops compute
them (the kernels are not run: 70000 batch entries would take minutes under the interpreter);
on a GPU the op runs for real on such a batch.
"""

import pytest
import torch

from flash_kernels import flash_attention, mixed_chunk_attention
from flash_kernels.backends.triton import backward, forward, problem
from flash_kernels.core.environment import INTERPRETED_KERNELS

CUDA_GRID_LIMITS = (2**31 - 1, 65535, 65535)
KERNELS = {
    "chunk_state_scan_kernel",
    "mixed_chunk_fwd_kernel",
    "mixed_chunk_bwd_query_kernel",
    "mixed_chunk_bwd_key_kernel",
}
BATCH, T, S, E = 70000, 3, 4, 4


def _run(op, device, backend, packed):
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device).requires_grad_()

    options = dict(chunk_size=2, backend=backend, rel_bias=rand(3))
    if packed:
        options["cu_seqlens"] = torch.tensor([0, 1, 3])
    if op == "mixed_chunk_attention":
        out = mixed_chunk_attention(
            rand(BATCH, T, S),
            rand(BATCH, T, S),
            rand(BATCH, T, S),
            rand(BATCH, T, S),
            rand(BATCH, T, E),
            **options,
        )
    else:
        out = flash_attention(
            rand(BATCH, T, S),
            rand(4, S),
            rand(4, S),
            rand(BATCH, T, E),
            u=rand(BATCH, T, E),
            **options,
        )
    out.sum().backward()
    return out


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize("op", ["mixed_chunk_attention", "flash_attention"])
def test_grids_respect_cuda_limits_for_a_huge_batch(op, packed, monkeypatch):
    grids = {}

    def record_grid(kernel, grid, args, constexprs, num_warps, num_stages):
        grids.setdefault(kernel.__name__, []).append(tuple(grid))

    for module in (forward, backward, problem):  # every module that launches a kernel
        monkeypatch.setattr(module, "launch", record_grid)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    if device == "cpu" and not INTERPRETED_KERNELS:
        pytest.skip("the Triton backend needs CUDA or the interpreter")
    _run(op, device, "triton", packed)
    assert set(grids) == KERNELS
    for name, launched in grids.items():
        for grid in launched:
            assert len(grid) <= 3 and all(n <= limit for n, limit in zip(grid, CUDA_GRID_LIMITS)), (
                f"{name}: grid {grid}"
            )
            assert grid[0] >= BATCH, f"{name}: grid {grid} does not cover the batch"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU: runs 70000 batch entries")
@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
def test_huge_batch_runs_on_the_gpu(packed):
    torch.manual_seed(0)
    out = _run("mixed_chunk_attention", "cuda", "triton", packed)
    expected = _run("mixed_chunk_attention", "cuda", "torch", packed)
    torch.testing.assert_close(out, expected, rtol=1e-3, atol=1e-3)
