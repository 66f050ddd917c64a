"""Flop counts used for every TFLOP/s figure of the benchmarks (one formula per kind of attention).

A multiply-add counts as 2 flop. Only the matrix products are counted (relu^2, masks, the bias,
the state cumsum and softmax exponentials are not): these are the "useful" flops of the
algorithm, the same whatever implementation runs it (the dense reference does more work but is
credited with the same count, so its TFLOP/s is an effective rate).
"""

MODES = ("fwd", "bwd", "fwd+bwd")
MODE_NAMES = {"fwd": "forward", "bwd": "backward", "fwd+bwd": "forward+backward"}
# backward ~ 2x forward (the usual convention for attention: two products per forward product)
MODE_FACTOR = {"fwd": 1.0, "bwd": 2.0, "fwd+bwd": 3.0}


def _check_mode(mode):
    if mode not in MODE_FACTOR:
        raise ValueError(f"mode must be one of {MODES}, got {mode!r}")


def flash_flops(T, S, E, chunk_size=256, *, causal=True, linear=True, mode="fwd", batch=1):
    """Flop of FLASH mixed chunk attention (docs/contract.md section 5) for `batch` sequences
    of T tokens.

    Per token, forward, with C = min(chunk_size, T) (chunk_size=None: C = T, one chunk):
      quadratic part  2*C*(S + E)  non-causal: each query meets the C keys of its chunk,
                                   <q, k> costs 2S flop and a_ij * v_j costs 2E flop;
                      C*(S + E)    causal: half the pairs are masked (the contract's approximation;
                                   exactly (C + 1) / 2 keys on average);
      linear part     4*S*E        2SE to add k_j v_j^T to its chunk state H_g and 2SE for
                                   q_lin^T P; zero when linear=False (chunk-local only).
    Backward = 2 x forward; forward+backward ("fwd+bwd") = 3 x forward.

    Example: T=512, S=128, E=1536, C=256, causal, forward:
    512 * (256*1664 + 4*128*1536) = 512 * 1_212_416 = 620_756_992 flop.
    """
    _check_mode(mode)
    C = T if chunk_size is None else min(chunk_size, T)
    quad = C * (S + E) if causal else 2 * C * (S + E)
    lin = 4 * S * E if linear else 0
    return float(batch) * T * (quad + lin) * MODE_FACTOR[mode]


def packed_flops(doc_lens, S, E, chunk_size=256, *, causal=True, linear=True, mode="fwd"):
    """Flop of FLASH over packed documents: the sum of `flash_flops` over the documents, each
    one sequence whose chunks restart at its first token (a document shorter than a chunk is
    one chunk of its own length). This is the useful work of the documents however they are
    laid out: padding them to a batch adds work, but not useful flops.

    Example: documents of 1 and 4 tokens, S=2, E=3, C=2, causal: 1 * (1*5 + 4*2*3) = 29 and
    4 * (2*5 + 24) = 136, 165 in all (one sequence of 5 tokens: 5 * 34 = 170).
    """
    return sum(
        flash_flops(length, S, E, chunk_size, causal=causal, linear=linear, mode=mode)
        for length in doc_lens
        if length > 0
    )


def softmax_flops(T, heads, head_dim, *, causal=True, mode="fwd", batch=1):
    """Flop of softmax attention (scaled_dot_product_attention) with `heads` heads of `head_dim`.

    Forward: QK^T and PV, each 2 * T * T * head_dim per head: 4 * T^2 * head_dim, half causal.
    Backward = 2 x forward (the same convention as `flash_flops`; FlashAttention's backward does
    2.5x with its recomputation, which is not credited).
    """
    _check_mode(mode)
    per_head = 4.0 * T * T * head_dim
    if causal:
        per_head /= 2
    return float(batch) * heads * per_head * MODE_FACTOR[mode]


def matmul_flops(m, n, k):
    """An (m x k) @ (k x n) product: 2mnk flop."""
    return 2.0 * m * n * k
