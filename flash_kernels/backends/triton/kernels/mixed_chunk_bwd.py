"""Backward kernels of mixed chunk attention (docs/contract.md section 3).

Per chunk, with relu_s = relu(S) masked (causal, chunk end), A = relu_s^2 and dO the incoming
gradient:

    dA = dO V^T        dS = 2 relu_s * dA
    dq_quad = quad_scale dS K        dk_quad = quad_scale dS^T Q
    dV = A^T dO + k_lin D        dq_lin = dO P^T        dk_lin = V D^T
    drel_bias[o + C - 1] = sum of dS_ij over i - j = o

P are the forward states and D the reverse states of `chunk_state.py` (lin_scale folded in).

`mixed_chunk_bwd_query_kernel`, one program per (chunk, query block), reduces over keys and
value columns: dq_quad, dq_lin, the per-program diagonal sums of dS for drel_bias and, for chunks
of at most 256 tokens, dS itself (float32, O(T * C) memory) so that the key-side kernel does not
recompute dA = dO V^T (the costly E-wide product). `mixed_chunk_bwd_key_kernel`, one program per
(chunk, key block), reduces over queries: dk_quad, dv and dk_lin. Neither needs atomics, so
gradients are deterministic.

The key kernel works with keys on the rows: it forms S^T = K Q^T, dA^T = V dO^T and reads dS^T,
P^T and D^T from memory transposed, instead of transposing tiles in registers (Triton 3.2 - 3.6
miscompile those on Hopper: see common.py).
"""

import triton
import triton.language as tl

from .common import (
    LIN_K,
    QUAD_K,
    QUAD_Q,
    hoisted_weights_tile,
    key_query_weights,
    linear_state_tile,
    load_role,
    load_role_t,
    load_tile,
    nonfinite_in,
    program_chunk_block,
    relu_scores_tile,
    state_offset_tile,
    state_tile,
)

TRITON_VERSION = tuple(int(part) for part in triton.__version__.split(".")[:2])

# The query backward reads each dS tile back skewed to sum its diagonals (d rel_bias). Triton
# before 3.7 keeps the whole 64 x 64 gather live and spills 160-232 bytes on sm_90 at the paper
# shape; read in 2 row slabs it does not (4 and 8 slabs still spill in some configurations).
# Triton 3.9 allocates the other way round (slabs spill, one read does not). A global, so an
# ahead-of-time compile under another Triton version takes that version's value
# (bench/results/compile_report.md); tests/test_kernel_variants.py runs both under the
# interpreter.
DBIAS_ROW_SLABS: tl.constexpr = tl.constexpr(2 if TRITON_VERSION < (3, 7) else 1)


@triton.jit
def _score_grad_tile(
    row_base,
    row_stride,
    col_base,
    col_stride,
    relu_s,
    offs_rows,
    offs_cols,
    chunk_end,
    E,
    BLOCK: tl.constexpr,
    BLOCK_E: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """dS = 2 relu_s * dA for one tile, dA = X Y^T summed over E tiles with X the rows
    `offs_rows` of the (T, E) matrix at row_base and Y^T the rows `offs_cols` of the one at
    col_base, read transposed. Queries x keys: X = dO, Y = V (dA = dO V^T); keys x queries:
    X = V, Y = dO (dA^T = V dO^T), relu_s then being relu(S)^T."""
    offs_e = tl.arange(0, BLOCK_E)
    grad_scores = tl.zeros((BLOCK, BLOCK), dtype=tl.float32)
    for e0 in range(0, E, BLOCK_E):
        cols = e0 + offs_e
        x = tl.load(
            row_base + offs_rows.to(tl.int64)[:, None] * row_stride + cols[None, :],
            mask=(offs_rows[:, None] < chunk_end) & (cols[None, :] < E),
            other=0.0,
        )
        y_t = tl.load(
            col_base + offs_cols.to(tl.int64)[None, :] * col_stride + cols[:, None],
            mask=(offs_cols[None, :] < chunk_end) & (cols[:, None] < E),
            other=0.0,
        )
        grad_scores = tl.dot(x, y_t, grad_scores, input_precision=DOT_PRECISION)
    # Selected, not multiplied: a masked pair's dA may be NaN (a value its query never sees).
    return 2.0 * relu_s * tl.where(relu_s > 0, grad_scores, 0.0)


@triton.jit
def _diagonal_sums(tile_base, row_stride, row_limit, col_limit, BLOCK: tl.constexpr):
    """(low, high): the sums of a stored (BLOCK, BLOCK) dS tile over its diagonals, read back
    skewed: entry kk of `low` is the sum over offset i - j = kk - (BLOCK - 1), of `high` over
    offset kk + 1. Rows past row_limit and columns past col_limit are left out. The rows are
    read in DBIAS_ROW_SLABS slabs (see there); the barriers order the reads after the tile's
    store and before the next tile's."""
    local = tl.arange(0, BLOCK)
    tl.debug_barrier()
    low = tl.zeros((BLOCK,), dtype=tl.float32)
    high = tl.zeros((BLOCK,), dtype=tl.float32)
    for slab in tl.static_range(DBIAS_ROW_SLABS):
        rows = slab * (BLOCK // DBIAS_ROW_SLABS) + tl.arange(0, BLOCK // DBIAS_ROW_SLABS)
        rows_ok = rows < row_limit
        j_low = rows[:, None] + (BLOCK - 1) - local[None, :]
        j_high = rows[:, None] - 1 - local[None, :]
        low_ok = rows_ok[:, None] & (j_low < BLOCK) & (j_low < col_limit)
        high_ok = rows_ok[:, None] & (j_high >= 0) & (j_high < col_limit)
        low += tl.sum(
            tl.load(tile_base + rows[:, None] * row_stride + j_low, mask=low_ok, other=0.0), axis=0
        )
        high += tl.sum(
            tl.load(tile_base + rows[:, None] * row_stride + j_high, mask=high_ok, other=0.0),
            axis=0,
        )
    tl.debug_barrier()
    return low, high


@triton.jit
def _zero_untouched_segments(
    segments_base, block, num_blocks, num_key_blocks, pending, BLOCK: tl.constexpr
):
    """After the last key tile of a query block: store `pending` (its low half completes
    segment block - (num_key_blocks - 1)) and zero the segments no tile of the block reached,
    so that the host sums every program's 2 * num_blocks segments."""
    local = tl.arange(0, BLOCK)
    first_written = block - num_key_blocks + num_blocks
    if num_key_blocks > 0:
        tl.store(segments_base + first_written * BLOCK + local, pending)
    last_written = block + 1 + num_blocks - 1
    for segment in range(0, 2 * num_blocks):
        slot = tl.full((BLOCK,), segment, tl.int32)
        untouched = (
            (slot < first_written) | (slot > last_written) | (slot * 0 + num_key_blocks == 0)
        )
        tl.store(
            segments_base + segment * BLOCK + local,
            tl.zeros((BLOCK,), dtype=tl.float32),
            mask=untouched,
        )


@triton.jit(do_not_specialize=["T", "num_chunks", "num_docs"])
def mixed_chunk_bwd_query_kernel(
    q_quad_ptr,
    k_quad_ptr,
    affine_ptr,
    v_ptr,
    grad_out_ptr,
    states_ptr,
    state_offset_ptr,
    rel_bias_ptr,
    dq_quad_ptr,
    dq_lin_ptr,
    ds_ptr,
    dbias_partial_ptr,
    chunk_table_ptr,
    cu_seqlens_ptr,
    stride_qb,
    stride_qt,
    stride_kb,
    stride_kt,
    stride_vb,
    stride_vt,
    T,
    S,
    E,
    chunk_size,
    chunk_len,
    num_chunks,
    num_docs,
    num_blocks,
    quad_scale,
    FROM_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    CAUSAL: tl.constexpr,
    HOIST_SCORES: tl.constexpr,
    HAS_STATE_OFFSET: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    NEED_DQ_QUAD: tl.constexpr,
    NEED_DQ_LIN: tl.constexpr,
    STORE_DS: tl.constexpr,
    NEED_DBIAS: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_E: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Grid: (B * num_chunks * num_blocks,) (common.program_chunk_block); query and key blocks
    are both BLOCK rows. Inputs are strided views (unit feature stride), grad_out and the
    outputs contiguous. dq_lin = dO P^T with P the forward states plus the state offset
    (common.state_offset_tile).

    rel_bias: float32, the (2 * chunk_size - 1,) vector or, with HOIST_SCORES, its
    (chunk_len, chunk_len) Toeplitz matrix (common.relu_scores_tile).

    Writes dq_quad (B, T, S), dq_lin (B, T, S) and, when asked:
    - STORE_DS: ds (B, num_chunks, chunk_len, chunk_len) float32, every tile at or below the
      causal diagonal (the key kernel reads exactly those); else, for NEED_DBIAS, ds is a
      (grid, BLOCK, BLOCK) scratch tile per program;
    - NEED_DBIAS: dbias_partial (B, num_chunks, num_blocks, 2 * num_blocks, BLOCK): segment s of
      a program holds the sums of its dS over offsets i - j = s * BLOCK - (BLOCK - 1) + p,
      p < BLOCK.
    """
    batch, chunk, block, doc, chunk_start, chunk_end = program_chunk_block(
        num_blocks, num_chunks, chunk_size, T, chunk_table_ptr, cu_seqlens_ptr, IS_VARLEN
    )
    row_start = chunk_start + block * BLOCK
    # bf16 operands for bf16 inputs; fp32 (tf32) otherwise: see common.py.
    mma_dtype = tl.bfloat16 if v_ptr.dtype.element_ty == tl.bfloat16 else tl.float32
    offs_i = row_start + tl.arange(0, BLOCK)
    offs_s = tl.arange(0, BLOCK_S)
    offs_e = tl.arange(0, BLOCK_E)
    local = tl.arange(0, BLOCK)
    row_ok = offs_i < chunk_end
    grad_out_base = grad_out_ptr + batch * T * E
    out_mask = row_ok[:, None] & (offs_s[None, :] < S)

    if NEED_DQ_LIN:
        dq_lin = tl.zeros((BLOCK, BLOCK_S), dtype=tl.float32)
        # A block past its chunk's end (an idle slot: no state was stored for it) reads nothing.
        for e0 in range(0, tl.where(row_start < chunk_end, E, 0), BLOCK_E):
            cols = e0 + offs_e
            d_out = tl.load(
                grad_out_base + offs_i[:, None] * E + cols[None, :],
                mask=row_ok[:, None] & (cols[None, :] < E),
                other=0.0,
            )
            state_t = linear_state_tile(
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
                True,
            )
            dq_lin = tl.dot(
                d_out.to(mma_dtype), state_t.to(mma_dtype), dq_lin, input_precision=DOT_PRECISION
            )
            if HAS_STATE_OFFSET:
                offset_t = state_offset_tile(
                    state_offset_ptr, batch, doc, num_docs, S, E, offs_s, cols, True
                )
                dq_lin = tl.dot(
                    d_out.to(mma_dtype),
                    offset_t.to(mma_dtype),
                    dq_lin,
                    input_precision=DOT_PRECISION,
                )
        tl.store(
            dq_lin_ptr + batch * T * S + offs_i[:, None] * S + offs_s[None, :],
            dq_lin.to(dq_lin_ptr.dtype.element_ty),
            mask=out_mask,
        )

    if (NEED_DQ_QUAD or NEED_DBIAS) or STORE_DS:  # dS is needed
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
            num_key_blocks = block + 1
        else:
            num_key_blocks = num_blocks
        num_key_blocks = tl.where(row_start < chunk_end, num_key_blocks, 0)
        dq = tl.zeros((BLOCK, BLOCK_S), dtype=tl.float32)
        if STORE_DS:
            ds_base = ds_ptr + (batch * num_chunks + chunk) * chunk_len * chunk_len
            ds_row_stride = chunk_len
        elif NEED_DBIAS:
            ds_base = ds_ptr + tl.program_id(0).to(tl.int64) * BLOCK * BLOCK
            ds_row_stride = BLOCK
        if NEED_DBIAS:
            segments_base = (
                dbias_partial_ptr
                + ((batch * num_chunks + chunk) * num_blocks + block) * (2 * num_blocks) * BLOCK
            )
            pending = tl.zeros((BLOCK,), dtype=tl.float32)
        for key_block in range(0, num_key_blocks):
            offs_j = chunk_start + key_block * BLOCK + local
            # The keys twice from memory: transposed for the scores, as rows for dq = dS K.
            k_t = load_role_t(
                k_base, offs_j, chunk_end, S, stride_kt, affine_ptr, QUAD_K, FROM_Z, BLOCK_S
            )
            relu_s = relu_scores_tile(
                q,
                k_t,
                rel_bias_ptr,
                offs_i,
                offs_j,
                chunk_start,
                chunk_end,
                chunk_size,
                chunk_len,
                quad_scale,
                HAS_BIAS,
                HOIST_SCORES,
                CAUSAL,
                False,
                DOT_PRECISION,
            )
            ds = _score_grad_tile(
                grad_out_base,
                E,
                v_base,
                stride_vt,
                relu_s,
                offs_i,
                offs_j,
                chunk_end,
                E,
                BLOCK,
                BLOCK_E,
                DOT_PRECISION,
            )
            k = load_role(
                k_base, offs_j, chunk_end, S, stride_kt, affine_ptr, QUAD_K, FROM_Z, BLOCK_S
            )
            if CAUSAL:  # the diagonal block's later keys: see common.nonfinite_in
                k = tl.where(nonfinite_in(k, offs_j >= row_start), 0.0, k).to(k.dtype)
            dq = tl.dot(ds.to(mma_dtype), k.to(mma_dtype), dq, input_precision=DOT_PRECISION)
            if STORE_DS or NEED_DBIAS:
                if STORE_DS:
                    tile_base = ds_base + (block * BLOCK) * chunk_len + key_block * BLOCK
                    row_limit = chunk_len - block * BLOCK
                    col_limit = chunk_len - key_block * BLOCK
                else:
                    tile_base = ds_base
                    row_limit = BLOCK
                    col_limit = BLOCK
                rows_in = local < row_limit
                tl.store(
                    tile_base + local[:, None] * ds_row_stride + local[None, :],
                    ds,
                    mask=rows_in[:, None] & (local[None, :] < col_limit),
                )
            if NEED_DBIAS:
                diag_low, diag_high = _diagonal_sums(
                    tile_base, ds_row_stride, row_limit, col_limit, BLOCK
                )
                # Tile (block, key_block) covers segments block - key_block (low half) and
                # block - key_block + 1 (high half); the latter also got the previous tile's
                # low half, so it is complete now.
                segment = block - key_block + 1 + num_blocks - 1
                tl.store(segments_base + segment * BLOCK + local, pending + diag_high)
                pending = diag_low
        if NEED_DBIAS:
            _zero_untouched_segments(
                segments_base, block, num_blocks, num_key_blocks, pending, BLOCK
            )
        if NEED_DQ_QUAD:
            tl.store(
                dq_quad_ptr + batch * T * S + offs_i[:, None] * S + offs_s[None, :],
                (dq * quad_scale).to(dq_quad_ptr.dtype.element_ty),
                mask=out_mask,
            )


@triton.jit(do_not_specialize=["T", "num_chunks", "num_docs"])
def mixed_chunk_bwd_key_kernel(
    q_quad_ptr,
    k_quad_ptr,
    k_lin_ptr,
    affine_ptr,
    v_ptr,
    grad_out_ptr,
    dstates_ptr,
    dstate_offset_ptr,
    rel_bias_ptr,
    ds_ptr,
    dk_quad_ptr,
    dk_lin_ptr,
    dv_ptr,
    chunk_table_ptr,
    cu_seqlens_ptr,
    stride_qb,
    stride_qt,
    stride_kb,
    stride_kt,
    stride_klb,
    stride_klt,
    stride_vb,
    stride_vt,
    T,
    S,
    E,
    chunk_size,
    chunk_len,
    num_chunks,
    num_docs,
    num_blocks,
    quad_scale,
    FROM_Z: tl.constexpr,
    HAS_LINEAR: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    CAUSAL: tl.constexpr,
    HAS_DSTATE_OFFSET: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    STORE_DS: tl.constexpr,
    HOIST_SCORES: tl.constexpr,
    NEED_DK_QUAD: tl.constexpr,
    NEED_DK_LIN: tl.constexpr,
    NEED_DV: tl.constexpr,
    BLOCK: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_E: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """Grid: (B * num_chunks * num_blocks,), one program per block of BLOCK keys
    (common.program_chunk_block). Inputs are strided views (unit feature stride), grad_out and
    the outputs contiguous.

    dk_quad = quad_scale * sum_i dS_ij q_i (dS read back when the query kernel stored it,
    STORE_DS, else recomputed);
    dv = sum_i relu_s_ij^2 dO_i + k_lin_j D, the weights formed once against the whole chunk
    when HOIST_SCORES (chunk <= 2 * BLOCK_N, the bias then read as its Toeplitz matrix), else
    recomputed per value tile;
    dk_lin = V_j D^T.
    D is the reverse state dstates[b, chunk] (non-causal: dstates[b, doc]) plus, with
    HAS_DSTATE_OFFSET, the gradient dstate_offset[b, doc] that reaches the state from after this
    call (a final_state's gradient, or the later ranks' under context parallelism): causal, it
    reaches the chunks that went into that state, i.e. the complete ones; non-causal, all of them.
    """
    batch, chunk, block, doc, chunk_start, chunk_end = program_chunk_block(
        num_blocks, num_chunks, chunk_size, T, chunk_table_ptr, cu_seqlens_ptr, IS_VARLEN
    )
    key_start = chunk_start + block * BLOCK
    if key_start >= chunk_end:
        return
    # bf16 operands for bf16 inputs; fp32 (tf32) otherwise: see common.py.
    mma_dtype = tl.bfloat16 if v_ptr.dtype.element_ty == tl.bfloat16 else tl.float32
    local = tl.arange(0, BLOCK)
    offs_j = key_start + local
    offs_s = tl.arange(0, BLOCK_S)
    offs_e = tl.arange(0, BLOCK_E)
    key_ok = offs_j < chunk_end
    q_base = q_quad_ptr + batch * stride_qb
    v_base = v_ptr + batch * stride_vb
    grad_out_base = grad_out_ptr + batch * T * E
    k = load_role(
        k_quad_ptr + batch * stride_kb,
        offs_j,
        chunk_end,
        S,
        stride_kt,
        affine_ptr,
        QUAD_K,
        FROM_Z,
        BLOCK_S,
    )
    if CAUSAL:
        first_query = key_start  # query and key blocks are aligned: earlier ones are masked
    else:
        first_query = chunk_start
    out_mask = key_ok[:, None] & (offs_s[None, :] < S)

    if NEED_DK_QUAD:
        dk = tl.zeros((BLOCK, BLOCK_S), dtype=tl.float32)
        for i0 in range(first_query, chunk_end, BLOCK):
            offs_i = i0 + local
            if STORE_DS:  # dS^T: the query kernel's dS read back transposed
                ds_base = ds_ptr + (batch * num_chunks + chunk) * chunk_len * chunk_len
                ds_mask = key_ok[:, None] & (offs_i[None, :] < chunk_end)
                if CAUSAL:  # the query kernel's blocks may be narrower: pairs past the
                    ds_mask = ds_mask & (offs_j[:, None] <= offs_i[None, :])  # diagonal unread
                ds_t = tl.load(
                    ds_base
                    + (offs_i - chunk_start)[None, :] * chunk_len
                    + (offs_j - chunk_start)[:, None],
                    mask=ds_mask,
                    other=0.0,
                )
            else:  # dS^T = 2 relu(S^T) dA^T with S^T = K Q^T and dA^T = V dO^T
                q_t = load_role_t(
                    q_base, offs_i, chunk_end, S, stride_qt, affine_ptr, QUAD_Q, FROM_Z, BLOCK_S
                )
                relu_s_t = relu_scores_tile(
                    k,
                    q_t,
                    rel_bias_ptr,
                    offs_j,
                    offs_i,
                    chunk_start,
                    chunk_end,
                    chunk_size,
                    chunk_len,
                    quad_scale,
                    HAS_BIAS,
                    HOIST_SCORES,
                    CAUSAL,
                    True,
                    DOT_PRECISION,
                )
                ds_t = _score_grad_tile(
                    v_base,
                    stride_vt,
                    grad_out_base,
                    E,
                    relu_s_t,
                    offs_j,
                    offs_i,
                    chunk_end,
                    E,
                    BLOCK,
                    BLOCK_E,
                    DOT_PRECISION,
                )
            q = load_role(
                q_base, offs_i, chunk_end, S, stride_qt, affine_ptr, QUAD_Q, FROM_Z, BLOCK_S
            )
            if CAUSAL:  # queries before the block's last key: see common.nonfinite_in
                q = tl.where(nonfinite_in(q, offs_i < key_start + BLOCK), 0.0, q).to(q.dtype)
            dk = tl.dot(ds_t.to(mma_dtype), q.to(mma_dtype), dk, input_precision=DOT_PRECISION)
        tl.store(
            dk_quad_ptr + batch * T * S + offs_j[:, None] * S + offs_s[None, :],
            (dk * quad_scale).to(dk_quad_ptr.dtype.element_ty),
            mask=out_mask,
        )

    if NEED_DV or NEED_DK_LIN:
        if HAS_LINEAR:
            if CAUSAL:
                dstate_base = dstates_ptr + (batch * num_chunks + chunk) * S * E
                offset_reaches_chunk = chunk_end - chunk_start == chunk_size
            else:
                dstate_base = dstates_ptr + (batch * num_docs + doc) * S * E
                offset_reaches_chunk = True
            if HAS_DSTATE_OFFSET:
                dstate_offset_base = dstate_offset_ptr + (batch * num_docs + doc) * S * E
            k_lin = load_role(
                k_lin_ptr + batch * stride_klb,
                offs_j,
                chunk_end,
                S,
                stride_klt,
                affine_ptr,
                LIN_K,
                FROM_Z,
                BLOCK_S,
            ).to(mma_dtype)
            dk_lin = tl.zeros((BLOCK, BLOCK_S), dtype=tl.float32)
        if NEED_DV and HOIST_SCORES:
            # The chunk's queries as two tiles of BLOCK_N, the weights formed keys x queries;
            # a causal key block past the first tile skips it, like the forward.
            offs_lo = chunk_start + tl.arange(0, BLOCK_N)
            offs_hi = offs_lo + BLOCK_N
            use_lo = first_query < chunk_start + BLOCK_N
            use_hi = chunk_start + BLOCK_N < chunk_end
            weights_lo_t = hoisted_weights_tile(
                use_lo,
                k,
                q_base,
                stride_qt,
                affine_ptr,
                rel_bias_ptr,
                offs_j,
                offs_lo,
                chunk_start,
                chunk_end,
                chunk_size,
                chunk_len,
                S,
                quad_scale,
                mma_dtype,
                True,
                FROM_Z,
                HAS_BIAS,
                CAUSAL,
                BLOCK_S,
                BLOCK_N,
                DOT_PRECISION,
            )
            weights_hi_t = hoisted_weights_tile(
                use_hi,
                k,
                q_base,
                stride_qt,
                affine_ptr,
                rel_bias_ptr,
                offs_j,
                offs_hi,
                chunk_start,
                chunk_end,
                chunk_size,
                chunk_len,
                S,
                quad_scale,
                mma_dtype,
                True,
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
            dv = tl.zeros((BLOCK, BLOCK_E), dtype=tl.float32)
            if NEED_DV:
                if HOIST_SCORES:
                    if use_lo:
                        d_out = load_tile(grad_out_base, offs_lo, cols, chunk_end, E, E)
                        dv = tl.dot(
                            weights_lo_t, d_out.to(mma_dtype), dv, input_precision=DOT_PRECISION
                        )
                    if use_hi:
                        d_out = load_tile(grad_out_base, offs_hi, cols, chunk_end, E, E)
                        dv = tl.dot(
                            weights_hi_t, d_out.to(mma_dtype), dv, input_precision=DOT_PRECISION
                        )
                else:
                    for i0 in range(first_query, chunk_end, BLOCK):
                        offs_i = i0 + local
                        weights_t = key_query_weights(
                            k,
                            q_base,
                            stride_qt,
                            affine_ptr,
                            rel_bias_ptr,
                            offs_j,
                            offs_i,
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
                        d_out = load_tile(grad_out_base, offs_i, cols, chunk_end, E, E)
                        dv = tl.dot(
                            weights_t.to(mma_dtype),
                            d_out.to(mma_dtype),
                            dv,
                            input_precision=DOT_PRECISION,
                        )
            if HAS_LINEAR:
                # D as (S, cols) for dv = k_lin D, and D^T as (cols, S) for dk_lin = V D^T,
                # each read from memory in its orientation.
                if NEED_DV:
                    dstate = state_tile(dstate_base, S, E, offs_s, cols, False)
                    if HAS_DSTATE_OFFSET:
                        if offset_reaches_chunk:
                            dstate += state_tile(dstate_offset_base, S, E, offs_s, cols, False)
                    dv = tl.dot(k_lin, dstate.to(mma_dtype), dv, input_precision=DOT_PRECISION)
                if NEED_DK_LIN:
                    dstate_t = state_tile(dstate_base, S, E, offs_s, cols, True)
                    if HAS_DSTATE_OFFSET:
                        if offset_reaches_chunk:
                            dstate_t += state_tile(dstate_offset_base, S, E, offs_s, cols, True)
                    v = load_tile(v_base, offs_j, cols, chunk_end, E, stride_vt)
                    dk_lin = tl.dot(
                        v.to(mma_dtype),
                        dstate_t.to(mma_dtype),
                        dk_lin,
                        input_precision=DOT_PRECISION,
                    )
            if NEED_DV:
                tl.store(
                    dv_ptr + batch * T * E + offs_j[:, None] * E + cols[None, :],
                    dv.to(dv_ptr.dtype.element_ty),
                    mask=key_ok[:, None] & col_ok[None, :],
                )
        if HAS_LINEAR and NEED_DK_LIN:
            tl.store(
                dk_lin_ptr + batch * T * S + offs_j[:, None] * S + offs_s[None, :],
                dk_lin.to(dk_lin_ptr.dtype.element_ty),
                mask=out_mask,
            )
