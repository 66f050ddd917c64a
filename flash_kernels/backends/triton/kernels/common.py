"""Pieces shared by the mixed chunk attention kernels.

Tensor-core operand dtype (`mma_dtype` in the kernels): relu^2 weights, score gradients and
the float32 states are rounded to bf16 before a product when the inputs are bf16 (fp32's range,
as FlashAttention rounds its probabilities), and stay float32 otherwise: relu(s)^2 overflows
fp16 once s > 255, so for fp16 inputs those products run in tf32, whose 10-bit mantissa equals
fp16's. Decided at compile time from the pointer type.

Transposes (the rule every kernel here follows): no tensor computed in registers is transposed
with `tl.trans` and fed to `tl.dot`, and a dot result is only ever the LEFT operand of the next
dot. Triton 3.2 - 3.6 on sm_90 (Hopper) miscompile a register tensor that is transposed and then
used as a dot operand: wrong numbers for some tile widths, silently (triton-lang/triton issue
#6124 on Triton 3.2; flash-linear-attention issue #640 and PR #826, wrong dk of up to 14.65 at
a 64-wide tile with Triton 3.4 - 3.6). Forward passes of such kernels were unaffected and their
gradients wrong; the interpreter cannot see it. So a transposed operand is either read from
memory with transposed addressing (`load_rows_t`, `load_role_t`, `state_tile(TRANSPOSED=True)`:
the layout is chosen at the load, and any transpose Triton still needs stays on shared-memory
descriptors), or computed in the orientation it is used: the key-side backward forms
S^T = K Q^T (`relu_scores_tile(KEYS_ON_ROWS=True)`) and dA^T = V dO^T itself instead of
transposing S and dA. tools/codegen_gate.py checks the compiled IR of every kernel for this.
"""

import triton
import triton.language as tl

from ....core import roles

# The four roles of z as the kernels' constexprs (core/roles.py; rows of gamma and beta).
QUAD_Q: tl.constexpr = tl.constexpr(roles.QUAD_Q)
QUAD_K: tl.constexpr = tl.constexpr(roles.QUAD_K)
LIN_Q: tl.constexpr = tl.constexpr(roles.LIN_Q)
LIN_K: tl.constexpr = tl.constexpr(roles.LIN_K)


@triton.jit
def program_chunk_block(
    num_blocks, num_chunks, chunk_size, T, chunk_table_ptr, cu_seqlens_ptr, IS_VARLEN: tl.constexpr
):
    """This program's (batch, chunk, block, doc, chunk_start, chunk_end).

    The grid is one-dimensional, program (batch * num_chunks + chunk) * num_blocks + block: the
    batch is folded into axis 0 (up to 2^31 - 1 programs) because CUDA limits axes 1 and 2 to
    65535, and the blocks of one chunk stay neighbours (they read the same keys and values).

    Dense: chunk `chunk` covers tokens [chunk * chunk_size, min(... + chunk_size, T)) and doc is 0.
    IS_VARLEN (packed documents): chunk is a slot of the (num_chunks, 2) int32 table of
    (document, chunk of that document) rows, -1 for idle slots; the chunk starts at the
    document's first token cu_seqlens[doc] plus chunk * chunk_size and ends at the document's
    end at the latest. An idle slot gets an empty chunk (chunk_start == chunk_end == 0, doc 0), so
    every mask is false and nothing is read or written. Token offsets are int64.
    """
    pid = tl.program_id(0)
    block = pid % num_blocks
    chunk = (pid // num_blocks) % num_chunks
    batch = (pid // num_blocks // num_chunks).to(tl.int64)
    if IS_VARLEN:
        doc = tl.load(chunk_table_ptr + 2 * chunk)
        chunk_of_doc = tl.load(chunk_table_ptr + 2 * chunk + 1)
        idle = doc < 0
        doc = tl.maximum(doc, 0)
        doc_start = tl.load(cu_seqlens_ptr + doc).to(tl.int64)
        doc_end = tl.load(cu_seqlens_ptr + doc + 1).to(tl.int64)
        chunk_start = tl.where(idle, 0, doc_start + chunk_of_doc.to(tl.int64) * chunk_size)
        chunk_end = tl.where(idle, 0, tl.minimum(chunk_start + chunk_size, doc_end))
    else:
        doc = 0
        chunk_start = chunk.to(tl.int64) * chunk_size
        chunk_end = tl.minimum(chunk_start + chunk_size, T)
    return batch, chunk, block, doc, chunk_start, chunk_end


@triton.jit
def state_tile(base, S, E, offs_s, cols, TRANSPOSED: tl.constexpr):
    """The (S, cols) tile of a float32 (S, E) state at `base` (zero outside S and E), or with
    TRANSPOSED its transpose (cols, S) read with transposed addressing (see the module doc)."""
    # One return: Triton type-checks every return statement of a function, constexpr
    # branches included, and the two orientations differ in shape.
    if TRANSPOSED:
        tile = tl.load(
            base + offs_s[None, :] * E + cols[:, None],
            mask=(offs_s[None, :] < S) & (cols[:, None] < E),
            other=0.0,
        )
    else:
        tile = tl.load(
            base + offs_s[:, None] * E + cols[None, :],
            mask=(offs_s[:, None] < S) & (cols[None, :] < E),
            other=0.0,
        )
    return tile


@triton.jit
def linear_state_tile(
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
    CAUSAL: tl.constexpr,
    TRANSPOSED: tl.constexpr,
):
    """The (S, cols) tile (TRANSPOSED: (cols, S)) of the float32 state P (lin_scale folded in)
    that the chunk's queries read: states[batch, chunk] when causal, states[batch, doc] when
    not."""
    if CAUSAL:
        index = batch * num_chunks + chunk
    else:
        index = batch * num_docs + doc
    return state_tile(states_ptr + index * S * E, S, E, offs_s, cols, TRANSPOSED)


@triton.jit
def state_offset_tile(
    offset_ptr, batch, doc, num_docs, S, E, offs_s, cols, TRANSPOSED: tl.constexpr
):
    """The (S, cols) tile (TRANSPOSED: (cols, S)) of lin_scale * offset[batch, doc]: the state
    of the tokens before this call's (a caller's initial_state, or the earlier ranks' total
    under context parallelism), the one way state from elsewhere enters. The launcher stores it
    scaled and already in the tensor-core operand dtype, so the kernels multiply it as it is
    loaded (a second product beside the state's) instead of holding another float32 tile."""
    return state_tile(offset_ptr + (batch * num_docs + doc) * S * E, S, E, offs_s, cols, TRANSPOSED)


@triton.jit
def load_rows(base, rows, row_end, width, row_stride, BLOCK_W: tl.constexpr):
    """x[rows, :width] of a (T, width) matrix with unit column stride, zero for rows >= row_end."""
    cols = tl.arange(0, BLOCK_W)
    return tl.load(
        base + rows.to(tl.int64)[:, None] * row_stride + cols[None, :],
        mask=(rows[:, None] < row_end) & (cols[None, :] < width),
        other=0.0,
    )


@triton.jit
def load_rows_t(base, rows, row_end, width, row_stride, BLOCK_W: tl.constexpr):
    """x[rows, :width] transposed, the (BLOCK_W, rows) tile, read with transposed addressing
    (never a register transpose: see the module doc); zero for rows >= row_end."""
    cols = tl.arange(0, BLOCK_W)
    return tl.load(
        base + rows.to(tl.int64)[None, :] * row_stride + cols[:, None],
        mask=(rows[None, :] < row_end) & (cols[:, None] < width),
        other=0.0,
    )


@triton.jit
def load_role(
    base,
    rows,
    row_end,
    width,
    row_stride,
    affine_ptr,
    ROLE: tl.constexpr,
    FROM_Z: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    """Rows of one role tensor (ROLE: QUAD_Q, QUAD_K, LIN_Q or LIN_K).

    Without FROM_Z, `base` is the role tensor itself. With FROM_Z it is z, and the role is
    formed on the fly (flash_attention: z is read once instead of four role tensors):

        role = z * gamma[ROLE] + beta[ROLE]   in float32, rounded to z's dtype,

    with affine_ptr the float32 (2, 4, width) stack [gamma; beta]. Rows outside row_end are 0
    (not beta), as a role tensor padded with zeros would be.
    """
    x = load_rows(base, rows, row_end, width, row_stride, BLOCK_W)
    if FROM_Z:
        cols = tl.arange(0, BLOCK_W)
        gamma = tl.load(affine_ptr + ROLE * width + cols, mask=cols < width, other=0.0)
        beta = tl.load(affine_ptr + (4 + ROLE) * width + cols, mask=cols < width, other=0.0)
        role = x.to(tl.float32) * gamma[None, :] + beta[None, :]
        x = tl.where(rows[:, None] < row_end, role, 0.0).to(x.dtype)
    return x


@triton.jit
def load_role_t(
    base,
    rows,
    row_end,
    width,
    row_stride,
    affine_ptr,
    ROLE: tl.constexpr,
    FROM_Z: tl.constexpr,
    BLOCK_W: tl.constexpr,
):
    """`load_role` transposed, the (BLOCK_W, rows) tile, formed from a transposed read."""
    x_t = load_rows_t(base, rows, row_end, width, row_stride, BLOCK_W)
    if FROM_Z:
        cols = tl.arange(0, BLOCK_W)
        gamma = tl.load(affine_ptr + ROLE * width + cols, mask=cols < width, other=0.0)
        beta = tl.load(affine_ptr + (4 + ROLE) * width + cols, mask=cols < width, other=0.0)
        role = x_t.to(tl.float32) * gamma[:, None] + beta[:, None]
        x_t = tl.where(rows[None, :] < row_end, role, 0.0).to(x_t.dtype)
    return x_t


@triton.jit
def relu_scores_tile(
    a,
    b_t,
    rel_bias_ptr,
    offs_rows,
    offs_cols,
    chunk_start,
    chunk_end,
    chunk_size,
    chunk_len,
    quad_scale,
    HAS_BIAS: tl.constexpr,
    BIAS_MATRIX: tl.constexpr,
    CAUSAL: tl.constexpr,
    KEYS_ON_ROWS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """relu(s) for one tile of queries i and keys j of a chunk:

        s_ij = quad_scale * <q_i, k_j> + rel_bias[i - j + chunk_size - 1]
        relu(s_ij), or 0 where i or j is past the chunk's end, or (causal) j > i.

    The tile is a @ b_t: queries x keys (a = queries `offs_rows`, b_t = keys `offs_cols`
    transposed), or with KEYS_ON_ROWS its transpose keys x queries, computed as such
    (S^T = K Q^T: a = keys `offs_rows`, b_t = queries `offs_cols` transposed), never by
    transposing the other (see the module doc). Index vectors are global token positions
    inside the chunk starting at chunk_start.
    The bias comes either from the (2 C - 1,) vector (a gather), or, with BIAS_MATRIX, from its
    (chunk_len, chunk_len) Toeplitz matrix: a plain tile load that the compiler vectorises,
    where the gather's per-element 64-bit addresses cost registers (they made the paper-shape
    kernels spill). The matrix is C^2 floats, so only short chunks use it.
    Returned in float32; the attention weight is its square, the score gradient is 2 * it.
    """
    scores = tl.dot(a, b_t, input_precision=DOT_PRECISION) * quad_scale
    if KEYS_ON_ROWS:
        offs_i = offs_cols[None, :]
        offs_j = offs_rows[:, None]
    else:
        offs_i = offs_rows[:, None]
        offs_j = offs_cols[None, :]
    valid = (offs_i < chunk_end) & (offs_j < chunk_end)
    if CAUSAL:
        valid = valid & (offs_j <= offs_i)
    if HAS_BIAS:
        local_i = offs_i - chunk_start
        local_j = offs_j - chunk_start
        if BIAS_MATRIX:
            scores += tl.load(
                rel_bias_ptr + local_i * chunk_len + local_j,
                mask=(local_i < chunk_len) & (local_j < chunk_len),
                other=0.0,
            )
        else:
            # i and j are in the same chunk, so the index lies in [0, 2 * chunk_size - 2].
            scores += tl.load(
                rel_bias_ptr + (local_i - local_j + chunk_size - 1), mask=valid, other=0.0
            )
    # NaN in q, k or the bias must reach the output, as it does in the PyTorch paths.
    return tl.where(valid, tl.maximum(scores, 0.0, propagate_nan=tl.PropagateNan.ALL), 0.0)


@triton.jit
def load_tile(base, rows, cols, row_end, width, row_stride):
    """x[rows, cols] of a (T, width) matrix with unit column stride, zero outside rows < row_end,
    cols < width."""
    return tl.load(
        base + rows.to(tl.int64)[:, None] * row_stride + cols[None, :],
        mask=(rows[:, None] < row_end) & (cols[None, :] < width),
        other=0.0,
    )


@triton.jit
def relu2_weights(
    q,
    k_base,
    k_row_stride,
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
    FROM_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BIAS_MATRIX: tl.constexpr,
    CAUSAL: tl.constexpr,
    BLOCK_S: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """The attention weights relu(s_ij)^2 (float32) of queries q (rows offs_i) and keys offs_j,
    the keys read transposed."""
    k_t = load_role_t(
        k_base, offs_j, chunk_end, S, k_row_stride, affine_ptr, QUAD_K, FROM_Z, BLOCK_S
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
        BIAS_MATRIX,
        CAUSAL,
        False,
        DOT_PRECISION,
    )
    return relu_s * relu_s


@triton.jit
def key_query_weights(
    k,
    q_base,
    q_row_stride,
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
    FROM_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    BIAS_MATRIX: tl.constexpr,
    CAUSAL: tl.constexpr,
    BLOCK_S: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """`relu2_weights` with keys on the rows: relu(S^T)^2 of the loaded keys k (rows offs_j)
    against the queries offs_i (float32), formed as K Q^T with the queries read transposed."""
    q_t = load_role_t(
        q_base, offs_i, chunk_end, S, q_row_stride, affine_ptr, QUAD_Q, FROM_Z, BLOCK_S
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
        BIAS_MATRIX,
        CAUSAL,
        True,
        DOT_PRECISION,
    )
    return relu_s_t * relu_s_t


@triton.jit
def hoisted_weights_tile(
    use,
    rows,
    base,
    row_stride,
    affine_ptr,
    rel_bias_ptr,
    offs_rows,
    offs_cols,
    chunk_start,
    chunk_end,
    chunk_size,
    chunk_len,
    S,
    quad_scale,
    MMA_DTYPE: tl.constexpr,
    KEYS_ON_ROWS: tl.constexpr,
    FROM_Z: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    CAUSAL: tl.constexpr,
    BLOCK_S: tl.constexpr,
    COLS: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """One of the two tiles a chunk's hoisted weights are held in (HOIST_SCORES: the chunk is
    at most two tiles of COLS, and the bias is read as its Toeplitz matrix): the weights of the
    loaded rows (`rows`, at offs_rows) against the tile's columns offs_cols, in MMA_DTYPE, or
    zeros when the tile is not `use`d (causal: it lies past the rows' diagonal). Queries x keys
    (`relu2_weights`, keys read from `base`), or with KEYS_ON_ROWS keys x queries
    (`key_query_weights`, queries read from `base`)."""
    if use:
        if KEYS_ON_ROWS:
            weights = key_query_weights(
                rows,
                base,
                row_stride,
                affine_ptr,
                rel_bias_ptr,
                offs_rows,
                offs_cols,
                chunk_start,
                chunk_end,
                chunk_size,
                chunk_len,
                S,
                quad_scale,
                FROM_Z,
                HAS_BIAS,
                True,
                CAUSAL,
                BLOCK_S,
                DOT_PRECISION,
            ).to(MMA_DTYPE)
        else:
            weights = relu2_weights(
                rows,
                base,
                row_stride,
                affine_ptr,
                rel_bias_ptr,
                offs_rows,
                offs_cols,
                chunk_start,
                chunk_end,
                chunk_size,
                chunk_len,
                S,
                quad_scale,
                FROM_Z,
                HAS_BIAS,
                True,
                CAUSAL,
                BLOCK_S,
                DOT_PRECISION,
            ).to(MMA_DTYPE)
    else:
        weights = tl.zeros((rows.shape[0], COLS), dtype=MMA_DTYPE)
    return weights


@triton.jit
def nonfinite_in(x, partial_rows):
    """True at the non-finite entries of the rows `partial_rows` ((rows,) bool) of a tile x.

    A causal tile pairs some rows with rows that may attend them and with rows that may not,
    and a product multiplies the masked pairs' zero weights too: 0 * NaN = NaN would leak a
    non-finite value into rows that never attend it. So before a product the kernels zero the
    non-finite entries of such partially attended rows (rows attended by the whole other side
    keep theirs: those do reach every output). A value is finite iff x - x == 0 (inf - inf and
    NaN - NaN are NaN).
    """
    return ((x - x) != 0) & partial_rows[:, None]


@triton.jit
def zero_unattended_nonfinite(x, rows, partial_rows, first_bad):
    """x with `nonfinite_in(x, partial_rows)` zeroed, and first_bad (per column) lowered to the
    first row where that happened: the caller poisons the outputs at or after that row (a
    causal query attends every key up to itself), exactly those that do attend the value."""
    bad = nonfinite_in(x, partial_rows)
    first_bad = tl.minimum(
        first_bad, tl.min(tl.where(bad, rows[:, None], first_bad[None, :]), axis=0)
    )
    return tl.where(bad, 0.0, x).to(x.dtype), first_bad
