"""Inter-chunk state scan: one sequential pass over a document's chunks per (batch, document,
S tile, E tile).

Forward (X = k_lin, Y = v):      P_g = lin_scale * sum_{h < g} X_h^T Y_h   (causal, exclusive)
Backward (X = q_lin, Y = dO):    D_g = lin_scale * sum_{h > g} X_h^T Y_h   (causal, reverse)
Non-causal, either direction:    one state per document, lin_scale * sum_h X_h^T Y_h, shared by
                                 every chunk of it.

Each state is stored *before* the current chunk is added, which is exactly FLASH's exclusive
cumulative sum, so the output kernels can run in parallel over chunks afterwards. States are
float32 (FLASH has no decay: the state grows with T, and half precision would lose the small
late additions). lin_scale is folded in here so the output kernels use the states as they are.

Without packing the whole sequence is one document. With packed documents (IS_VARLEN), each
program scans its own document from zero: nothing crosses a document boundary.
"""

import triton
import triton.language as tl


@triton.jit(do_not_specialize=["T", "num_states", "num_docs"])
def chunk_state_scan_kernel(
    x_ptr,
    affine_ptr,
    y_ptr,
    states_ptr,
    total_ptr,
    cu_seqlens_ptr,
    chunk_offsets_ptr,
    stride_xb,
    stride_xt,
    stride_yb,
    stride_yt,
    T,
    S,
    E,
    chunk_size,
    num_states,
    num_docs,
    lin_scale,
    X_ROLE: tl.constexpr,
    FROM_Z: tl.constexpr,
    REVERSE: tl.constexpr,
    CAUSAL: tl.constexpr,
    IS_VARLEN: tl.constexpr,
    STORE_TOTAL: tl.constexpr,
    BLOCK_T: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_E: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """states[b, first + g] (causal) or states[b, doc] (non-causal), see the module docstring.

    x: (B, T, S), y: (B, T, E) views with unit feature stride and the given batch and token
    strides; states: (B, num_states, S, E) float32, contiguous, num_states the chunk slots
    (causal) or num_docs (non-causal). A document's chunks go to consecutive slots from
    first = chunk_offsets[doc] (0 without packing).
    FROM_Z: x is z and X = z * gamma[X_ROLE] + beta[X_ROLE] is formed on the fly (see
    common.load_role; affine_ptr is the float32 (2, 4, S) stack [gamma; beta]).
    IS_VARLEN: document doc is tokens [cu_seqlens[doc], cu_seqlens[doc + 1]); else [0, T).
    STORE_TOTAL writes total[b, doc] (B, num_docs, S, E) float32:
      forward, causal:      sum_g X_g^T Y_g over the document's COMPLETE chunks, unscaled
                            (its final state: a partial last chunk stays with the decoder);
      forward, non-causal:  sum over all its chunks, unscaled (its total);
      reverse:              lin_scale * sum over all its chunks (what an initial state gets).
    Grid: (B * num_docs * cdiv(S, BLOCK_S) * cdiv(E, BLOCK_E),), E tiles fastest (they share
    the X rows), the batch folded into axis 0 (CUDA limits axes 1 and 2 to 65535).
    """
    pid = tl.program_id(0)
    num_e_tiles = tl.cdiv(E, BLOCK_E)
    num_s_tiles = tl.cdiv(S, BLOCK_S)
    pid_e = pid % num_e_tiles
    pid_s = (pid // num_e_tiles) % num_s_tiles
    batch_doc = pid // num_e_tiles // num_s_tiles
    doc = batch_doc % num_docs
    batch = (batch_doc // num_docs).to(tl.int64)
    if IS_VARLEN:
        doc_start = tl.load(cu_seqlens_ptr + doc).to(tl.int64)
        doc_end = tl.load(cu_seqlens_ptr + doc + 1).to(tl.int64)
        first_state = tl.load(chunk_offsets_ptr + doc).to(tl.int64)
    else:
        doc_start = 0
        doc_end = T
        first_state = 0
    doc_len = doc_end - doc_start
    num_doc_chunks = tl.cdiv(doc_len, chunk_size)
    num_complete = doc_len // chunk_size

    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    offs_t = tl.arange(0, BLOCK_T)
    x_base = x_ptr + batch * stride_xb
    y_base = y_ptr + batch * stride_yb
    state_offsets = offs_s[:, None] * E + offs_e[None, :]
    state_mask = (offs_s[:, None] < S) & (offs_e[None, :] < E)
    if STORE_TOTAL:
        total_base = total_ptr + (batch * num_docs + doc) * S * E

    if FROM_Z:
        gamma = tl.load(affine_ptr + X_ROLE * S + offs_s, mask=offs_s < S, other=0.0)
        beta = tl.load(affine_ptr + (4 + X_ROLE) * S + offs_s, mask=offs_s < S, other=0.0)

    state = tl.zeros((BLOCK_S, BLOCK_E), dtype=tl.float32)
    for step in range(0, num_doc_chunks):
        if REVERSE:
            chunk = num_doc_chunks - 1 - step
        else:
            chunk = step
        if CAUSAL:
            tl.store(
                states_ptr + ((batch * num_states + first_state + chunk) * S * E + state_offsets),
                state * lin_scale,
                mask=state_mask,
            )
            if STORE_TOTAL and not REVERSE:
                if chunk == num_complete:  # the partial last chunk: the complete ones are in
                    tl.store(total_base + state_offsets, state, mask=state_mask)
        chunk_start = doc_start + chunk.to(tl.int64) * chunk_size
        chunk_end = tl.minimum(chunk_start + chunk_size, doc_end)
        # Only the chunk's tokens that exist: chunk_size may exceed T by far (one short chunk).
        for t0 in range(0, chunk_end - chunk_start, BLOCK_T):
            rows = chunk_start + t0 + offs_t
            row_ok = rows < chunk_end
            x_t = tl.load(
                x_base + rows[None, :] * stride_xt + offs_s[:, None],  # (BLOCK_S, BLOCK_T)
                mask=row_ok[None, :] & (offs_s[:, None] < S),
                other=0.0,
            )
            if FROM_Z:
                role = x_t.to(tl.float32) * gamma[:, None] + beta[:, None]
                x_t = tl.where(row_ok[None, :], role, 0.0).to(x_t.dtype)
            y = tl.load(
                y_base + rows[:, None] * stride_yt + offs_e[None, :],  # (BLOCK_T, BLOCK_E)
                mask=row_ok[:, None] & (offs_e[None, :] < E),
                other=0.0,
            )
            state = tl.dot(x_t, y, state, input_precision=DOT_PRECISION)
    if not CAUSAL:
        tl.store(
            states_ptr + ((batch * num_states + doc) * S * E + state_offsets),
            state * lin_scale,
            mask=state_mask,
        )
    if STORE_TOTAL:
        if REVERSE:
            tl.store(total_base + state_offsets, state * lin_scale, mask=state_mask)
        elif CAUSAL:
            if num_complete == num_doc_chunks:
                tl.store(total_base + state_offsets, state, mask=state_mask)
        else:
            tl.store(total_base + state_offsets, state, mask=state_mask)
