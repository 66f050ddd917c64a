"""Kernel code paths that only another Triton version compiles, run here under the interpreter.

The query backward reads its dS tiles back in DBIAS_ROW_SLABS row slabs to sum their diagonals:
1 with Triton 3.9 (CI), 2 with Triton < 3.7 (the GPU machines), chosen per version to stay
spill-free (kernels/mixed_chunk_bwd.py). Every slab count must give the same rel_bias gradient.
"""

import pytest
import torch
import triton.language as tl
from helpers import assert_close, make_problem, run_with_grads, tile_override

import flash_kernels.backends.triton.kernels.mixed_chunk_bwd as bwd
from flash_kernels.core.environment import INTERPRETED_KERNELS
from flash_kernels.core.tolerances import rms_ratio

pytestmark = pytest.mark.slow  # the other Triton version's code path, twice

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.mark.skipif(
    not INTERPRETED_KERNELS,
    reason="the interpreter reads the module global at "
    "each launch; compiled kernels are cached with the value they were built with",
)
@pytest.mark.parametrize("slabs", [2, 4])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_rel_bias_gradient_in_row_slabs(slabs, causal, monkeypatch):
    monkeypatch.setattr(bwd, "DBIAS_ROW_SLABS", tl.constexpr(slabs))
    problem = make_problem((2,), 90, 5, 6, bias_chunk=40, seed=21)
    low = {
        n: x.detach().float().requires_grad_() if x is not None else None
        for n, x in problem.items()
    }
    with tile_override(block=16, state_block_t=16):
        out, grads, grad_out = run_with_grads(low, chunk_size=40, causal=causal, backend="triton")
    _, expected, _ = run_with_grads(
        problem, grad_out.double(), chunk_size=40, causal=causal, backend="reference"
    )
    assert_close(
        "drel_bias",
        grads["rel_bias"],
        expected["rel_bias"],
        rms_ratio("mixed_chunk_attention", torch.float32),
    )
