"""The accuracy the kernels are held to: one table for the test suite and the self-test.

Every comparison of a kernel result against a float64 ground truth in this repository uses the
rms-ratio criterion

    rms(actual - expected) <= RMS_RATIO[check][dtype] * rms(expected)

with `expected` computed in float64 from the same inputs rounded to `dtype` (so input rounding
is not counted as error). A relative error of the whole tensor is robust for attention outputs
and gradients, whose entries can be near zero (an elementwise rtol would fail on those for no
reason). The tests (tests/helpers.py assert_close) and `flash_kernels.self_test` both read this
table, so a self-test verdict on a user's device means what the test suite means.

Within one check the output, the final state and every gradient share one ratio: each is an
fp32 accumulation rounded once to its dtype, and the tests have always held them alike.

The values are the ones the test suite used before this table existed, never loosened; where
two test files disagreed, the tighter value that passes all of them was kept (noted below).
"""

import torch

#: check -> dtype -> the largest allowed rms(error) / rms(expected).
#:
#: "mixed_chunk_attention": the op's output, final state and the gradients of q_quad, k_quad,
#: q_lin, k_lin, v, rel_bias and initial_state (Triton, or the PyTorch paths) against the dense
#: float64 reference or the C++ oracle.
#:   float64 1e-10: the exact PyTorch paths (float64 in, float64 arithmetic): only summation
#:       order differs from the reference.
#:   float32 2e-5: fp32 accumulation everywhere (IEEE products: under the interpreter, and on a
#:       GPU while torch.backends.cuda.matmul.allow_tf32 is False, its default); over the
#:       sums of a few hundred terms the rounding is tens of fp32 ulps (6e-8 each).
#:   float16 4e-3: inputs are rounded before both sides see them; the relu^2 weights stay fp32
#:       (they overflow fp16 above a score of 255) and meet the values in tf32 on a GPU (a 10-bit
#:       mantissa, as fp16); the output and each gradient are rounded once to fp16 (2^-11 =
#:       4.9e-4 relative): about 8x headroom. test_fuzz.py used 5e-3 for this op; 4e-3
#:       (test_triton_mixed_chunk.py, test_varlen_state.py) passes there too and is kept.
#:   bfloat16 3e-2: the weights and the states are rounded to bf16 (2^-9 = 2e-3 relative) where
#:       they enter a tensor-core product, as FlashAttention rounds its probabilities, and the
#:       output to bf16; sums of such roundings over a chunk reach ~1e-2.
#: "flash_attention": the fused op (roles z * gamma + beta formed in the kernels, the gate u):
#: its output, final state and the gradients of z, gamma, beta, v, u, rel_bias and
#: initial_state against the float64 composition of the roles, the reference and the gate.
#:   float32 2e-5: as above. test_flash_attention.py used 3e-5; 2e-5 (test_fuzz.py,
#:       test_varlen_state.py, test_cpp_reference.py) passes there too and is kept.
#:   float16 5e-3: as mixed_chunk_attention, plus the roles rounded to fp16 inside the op
#:       while the reference forms them in float64 (one more fp16 rounding of every score).
#:   bfloat16 3e-2, float64 1e-10: as mixed_chunk_attention.
#: "decode": one decoding step (mixed_chunk_decode, flash_attention_decode) against the full
#: op's output at that token in float64, and the cache's state after the steps against the
#: float64 sum of k_lin^T v over the completed chunks.
#:   float32 1e-5: one row of the forward's fp32 arithmetic over at most C keys plus one state
#:       product (test_decode.py).
#:   float16 4e-3, bfloat16 3e-2: the forward's arithmetic on one row, so the full op's values
#:       (test_decode.py checks float16, and bfloat16 on a GPU, with them).
RMS_RATIO = {
    "mixed_chunk_attention": {
        torch.float64: 1e-10,
        torch.float32: 2e-5,
        torch.float16: 4e-3,
        torch.bfloat16: 3e-2,
    },
    "flash_attention": {
        torch.float64: 1e-10,
        torch.float32: 2e-5,
        torch.float16: 5e-3,
        torch.bfloat16: 3e-2,
    },
    "decode": {torch.float32: 1e-5, torch.float16: 4e-3, torch.bfloat16: 3e-2},
}


def rms_ratio(check, dtype):
    """The tolerance of `check` ("mixed_chunk_attention", "flash_attention" or "decode") for
    inputs of `dtype`: the largest allowed rms(actual - expected) / rms(expected)."""
    try:
        return RMS_RATIO[check][dtype]
    except KeyError:
        raise KeyError(
            f"no tolerance for check {check!r} in {dtype}: the table has "
            f"{ {name: sorted(map(str, row)) for name, row in RMS_RATIO.items()} }"
        ) from None
