"""Forward output kernel of mixed chunk attention: one program per (chunk, block of query rows).

    out_i = sum_{j in chunk(i)} relu(s_ij)^2 v_j  +  q_lin_i^T P_{chunk(i)}

with s_ij from `common.relu_scores_tile` and P the float32 states of `chunk_state.py` (lin_scale
already folded in). See `flash_kernels/backends/triton/mixed_chunk.py` for the design and its
numbers.

Two loop orders, chosen at compile time by HOIST_SCORES:
- the chunk fits two key tiles (2 * BLOCK_N >= chunk length, at most 256): the program forms
  relu^2(S) for its query rows against every key of the chunk once, then loops over value tiles
  (out[:, e] = A @ V[:, e]): scores are computed once per chunk, not once per value tile;
- longer chunks (chunk_size=None over a long sequence): for each value tile, loop over key tiles
  up to the causal diagonal and recompute the scores; memory stays O(T).
"""

import triton
import triton.language as tl

from .common import (
    LIN_Q,
    QUAD_Q,
    hoisted_weights_tile,
    linear_state_tile,
    load_role,
    load_tile,
    program_chunk_block,
    relu2_weights,
    state_offset_tile,
    zero_unattended_nonfinite,
)


@triton.jit(do_not_specialize=["T", "num_chunks", "num_docs"])
def mixed_chunk_fwd_kernel(
    q_quad_ptr,
    k_quad_ptr,
    q_lin_ptr,
    affine_ptr,
    states_ptr,
    state_offset_ptr,
    v_ptr,
    rel_bias_ptr,
    gate_ptr,
    out_ptr,
    attn_ptr,
    chunk_table_ptr,
    cu_seqlens_ptr,
    stride_qb,
    stride_qt,
    stride_kb,
    stride_kt,
    stride_qlb,
    stride_qlt,
    stride_vb,
    stride_vt,
    stride_gb,
    stride_gt,
    T,
    S,
    E,
    chunk_size,
    chunk_len,
    num_chunks,
    num_docs,
    num_query_blocks,
    quad_scale,
    FROM_Z: tl.constexpr,
    HAS_GATE: tl.constexpr,
    STORE_ATTN: tl.constexpr,
    HAS_LINEAR: tl.constexpr,
    HAS_STATE_OFFSET: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    CAUSAL: tl.constexpr,
    HOIST_SCORES: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_E: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Grid: (B * num_chunks * num_query_blocks,), see common.program_chunk_block (IS_VARLEN:
    packed documents through chunk_table and cu_seqlens).

    Inputs are (B, T, S) / (B, T, E) views with unit feature stride and the given batch and
    token strides (slices of a fused projection need no copy); out and attn are contiguous.
    FROM_Z: q_quad/k_quad/q_lin are all z and the roles are formed on the fly (`load_role`).
    HAS_GATE: out = gate * attention; STORE_ATTN also writes the ungated attention to attn.
    states: (B, num_chunks, S, E) float32 (non-causal: (B, num_docs, S, E)); HAS_STATE_OFFSET
    adds the (B, num_docs, S, E) lin_scale * state_offset[b, doc] (common.state_offset_tile).
    rel_bias: float32, the (2 * chunk_size - 1,) vector or, with HOIST_SCORES, its
    (chunk_len, chunk_len) Toeplitz matrix (common.relu_scores_tile).
    The weights relu^2(S) and the states enter the tensor cores as bf16 for bf16 inputs, else
    as float32 (common.py).
    """
    batch, chunk, block, doc, chunk_start, chunk_end = program_chunk_block(
        num_query_blocks, num_chunks, chunk_size, T, chunk_table_ptr, cu_seqlens_ptr, IS_VARLEN
    )
    row_start = chunk_start + block * BLOCK_M
    if row_start >= chunk_end:
        return
    mma_dtype = tl.bfloat16 if v_ptr.dtype.element_ty == tl.bfloat16 else tl.float32

    offs_i = row_start + tl.arange(0, BLOCK_M)
    offs_s = tl.arange(0, BLOCK_S)
    offs_e = tl.arange(0, BLOCK_E)
    row_ok = offs_i < chunk_end
    q = load_role(
        q_quad_ptr + batch * stride_qb,
        offs_i,
        chunk_end,
        S,
        stride_qt,
        affine_ptr,
        QUAD_Q,
        FROM_Z,
        BLOCK_S,
    )
    k_base = k_quad_ptr + batch * stride_kb
    v_base = v_ptr + batch * stride_vb
    if CAUSAL:
        keys_end = tl.minimum(row_start + BLOCK_M, chunk_end)
    else:
        keys_end = chunk_end
    if HAS_LINEAR:
        q_lin = load_role(
            q_lin_ptr + batch * stride_qlb,
            offs_i,
            chunk_end,
            S,
            stride_qlt,
            affine_ptr,
            LIN_Q,
            FROM_Z,
            BLOCK_S,
        ).to(mma_dtype)

    if HOIST_SCORES:
        # The chunk's keys as two tiles of BLOCK_N: each tile's scores are formed on their own
        # (half the registers at the peak), and a causal query block before the second tile
        # skips it (2 + 2 + 4 + 4 tiles of 64 keys for C = 256 instead of 4 x 4).
        offs_lo = chunk_start + tl.arange(0, BLOCK_N)
        offs_hi = offs_lo + BLOCK_N
        use_hi = chunk_start + BLOCK_N < keys_end
        weights_lo = hoisted_weights_tile(
            True,
            q,
            k_base,
            stride_kt,
            affine_ptr,
            rel_bias_ptr,
            offs_i,
            offs_lo,
            chunk_start,
            chunk_end,
            chunk_size,
            chunk_len,
            S,
            quad_scale,
            mma_dtype,
            False,
            FROM_Z,
            HAS_BIAS,
            CAUSAL,
            BLOCK_S,
            BLOCK_N,
            DOT_PRECISION,
        )
        weights_hi = hoisted_weights_tile(
            use_hi,
            q,
            k_base,
            stride_kt,
            affine_ptr,
            rel_bias_ptr,
            offs_i,
            offs_hi,
            chunk_start,
            chunk_end,
            chunk_size,
            chunk_len,
            S,
            quad_scale,
            mma_dtype,
            False,
            FROM_Z,
            HAS_BIAS,
            CAUSAL,
            BLOCK_S,
            BLOCK_N,
            DOT_PRECISION,
        )

    for e0 in range(0, E, BLOCK_E):
        cols = e0 + offs_e
        col_ok = cols < E
        # Values are read up to keys_end only (causal: no row after the block's last query).
        # Causal, the block's own keys meet masked (zero) weights: see zero_unattended_nonfinite.
        first_bad = tl.zeros((BLOCK_E,), dtype=tl.int64) + chunk_end
        if HOIST_SCORES:
            v = load_tile(v_base, offs_lo, cols, keys_end, E, stride_vt)
            if CAUSAL:
                v, first_bad = zero_unattended_nonfinite(
                    v, offs_lo, offs_lo >= row_start, first_bad
                )
            acc = tl.dot(weights_lo, v.to(mma_dtype), input_precision=DOT_PRECISION)
            if use_hi:
                v = load_tile(v_base, offs_hi, cols, keys_end, E, stride_vt)
                if CAUSAL:
                    v, first_bad = zero_unattended_nonfinite(
                        v, offs_hi, offs_hi >= row_start, first_bad
                    )
                acc = tl.dot(weights_hi, v.to(mma_dtype), acc, input_precision=DOT_PRECISION)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_E), dtype=tl.float32)
            for j0 in range(chunk_start, keys_end, BLOCK_N):
                offs_j = j0 + tl.arange(0, BLOCK_N)
                weights = relu2_weights(
                    q,
                    k_base,
                    stride_kt,
                    affine_ptr,
                    rel_bias_ptr,
                    offs_i,
                    offs_j,
                    chunk_start,
                    chunk_end,
                    chunk_size,
                    chunk_len,
                    S,
                    quad_scale,
                    FROM_Z,
                    HAS_BIAS,
                    HOIST_SCORES,
                    CAUSAL,
                    BLOCK_S,
                    DOT_PRECISION,
                )
                v = load_tile(v_base, offs_j, cols, keys_end, E, stride_vt)
                if CAUSAL:
                    v, first_bad = zero_unattended_nonfinite(
                        v, offs_j, offs_j >= row_start, first_bad
                    )
                acc = tl.dot(
                    weights.to(mma_dtype), v.to(mma_dtype), acc, input_precision=DOT_PRECISION
                )
        if CAUSAL:  # the outputs that do attend a zeroed non-finite value
            acc = tl.where(offs_i[:, None] >= first_bad[None, :], float("nan"), acc)
        if HAS_LINEAR:
            state = linear_state_tile(
                states_ptr,
                batch,
                chunk,
                doc,
                num_chunks,
                num_docs,
                S,
                E,
                offs_s,
                cols,
                CAUSAL,
                False,
            )
            acc = tl.dot(q_lin, state.to(mma_dtype), acc, input_precision=DOT_PRECISION)
            if HAS_STATE_OFFSET:
                offset = state_offset_tile(
                    state_offset_ptr, batch, doc, num_docs, S, E, offs_s, cols, False
                )
                acc = tl.dot(q_lin, offset.to(mma_dtype), acc, input_precision=DOT_PRECISION)
        tile = batch * T * E + offs_i[:, None] * E + cols[None, :]
        tile_mask = row_ok[:, None] & col_ok[None, :]
        if STORE_ATTN:  # the ungated attention, kept for the gate's gradient
            tl.store(attn_ptr + tile, acc.to(attn_ptr.dtype.element_ty), mask=tile_mask)
        if HAS_GATE:
            gate = load_tile(gate_ptr + batch * stride_gb, offs_i, cols, chunk_end, E, stride_gt)
            acc = acc * gate.to(tl.float32)
        tl.store(out_ptr + tile, acc.to(out_ptr.dtype.element_ty), mask=tile_mask)
