"""Decoding kernel of mixed chunk attention: one new token per sequence, the cache updated in place.

For sequence b with p = position[b] tokens already seen, the new token sits at row n of its
chunk's buffers (n = p mod C for chunked attention, n = p for one growing chunk) and

    s_j   = quad_scale * <q_quad, k_quad_j> + rel_bias[(n - j) + C - 1]      rows j = 0 .. n
    quad  = sum_{j <= n} relu(s_j)^2 v_j                 (row n: the new token's own k_quad, v)
    lin   = lin_scale * q_lin^T state                    (state: completed chunks only, float32)
    out   = quad + lin,    times the gate u when given

exactly the full op's output for that token. Then the new token's k_quad, k_lin and v go to
row n; or, when the chunk completes (n = C - 1, chunked only), its keys and values are folded
into the state, state += sum_{j <= n} k_lin_j v_j^T (float32), and the buffers restart: their
rows are zeroed. position[b] becomes p + 1. So rows at or after a sequence's length always
hold zeros (the cache's invariant, which the torch path relies on); the kernel itself never
reads them.

A row outside the buffers (n >= capacity: one growing chunk whose buffers are full) gets a NaN
output and changes nothing, rather than writing out of bounds.

Grid: (B * num_e_tiles,), program = batch * num_e_tiles + value tile (the batch folded into axis
0: CUDA caps axes 1 and 2 at 65535). Each program forms the scores of its sequence's buffered
keys (a matrix-vector product: one query per sequence, no tensor-core tile to fill) and
reduces its BLOCK_E columns of the values and of the state; the fold is a
(BLOCK_S x C) @ (C x BLOCK_E) tensor-core product into the program's state tile.

FROM_Z: the four inputs q_quad, k_quad, q_lin, k_lin all point at z and each role is formed as
z * gamma[r] + beta[r] in float32 and rounded to z's dtype (flash_attention's roles), with
affine_ptr the float32 (2, 4, S) stack [gamma; beta].

The position update needs every program of the sequence to have read the old position first.
Programs run in no fixed order, so each takes a ticket (an integer atomic add on the
sequence's counter, acquire-release) when done; the one that draws the last ticket writes the
new position and resets the counter to 0. Integer atomics: the result is deterministic.
"""

import triton
import triton.language as tl

from .common import LIN_K, LIN_Q, QUAD_K, QUAD_Q


@triton.jit
def _token_role(base, offs_s, S, affine_ptr, ROLE: tl.constexpr, FROM_Z: tl.constexpr):
    """One token's role row (BLOCK_S,) in the inputs' dtype: the role tensor's row, or with
    FROM_Z z * gamma[ROLE] + beta[ROLE] formed in float32 and rounded to z's dtype. Zero past S."""
    mask = offs_s < S
    x = tl.load(base + offs_s, mask=mask, other=0.0)
    if FROM_Z:
        gamma = tl.load(affine_ptr + ROLE * S + offs_s, mask=mask, other=0.0)
        beta = tl.load(affine_ptr + (4 + ROLE) * S + offs_s, mask=mask, other=0.0)
        x = tl.where(mask, x.to(tl.float32) * gamma + beta, 0.0).to(x.dtype)
    return x


@triton.jit(do_not_specialize=["capacity", "chunk_size"])
def mixed_chunk_decode_kernel(
    q_quad_ptr,
    k_quad_ptr,
    q_lin_ptr,
    k_lin_ptr,
    v_ptr,
    gate_ptr,
    affine_ptr,
    rel_bias_ptr,
    k_quad_cache_ptr,
    k_lin_cache_ptr,
    v_cache_ptr,
    state_ptr,
    position_ptr,
    tickets_ptr,
    out_ptr,
    stride_qb,
    stride_kb,
    stride_qlb,
    stride_klb,
    stride_vb,
    stride_gb,
    S,
    E,
    capacity,
    chunk_size,
    num_e_tiles,
    quad_scale,
    lin_scale,
    FROM_Z: tl.constexpr,
    HAS_GATE: tl.constexpr,
    HAS_LINEAR: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    FOLDS: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_S: tl.constexpr,
    BLOCK_SL: tl.constexpr,
    BLOCK_SF: tl.constexpr,
    BLOCK_E: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """New-token inputs are (B, S) / (B, E) rows with unit feature stride and the given batch
    strides; the caches are contiguous: k_quad/k_lin (B, capacity, S), v (B, capacity, E) in
    the inputs' dtype, state (B, S, E) float32, position (B,) int64, tickets (B,) int32 (zero
    between launches), out (B, E). rel_bias: float32 (2 C - 1,), C = chunk_size (the buffers'
    capacity for one growing chunk). FOLDS: chunked attention (n = position mod C and the fold).
    The state is read in blocks of BLOCK_SL rows and folded in blocks of BLOCK_SF rows, so no
    whole (S, BLOCK_E) float32 tile stays in registers (it made the program hold ~180)."""
    pid = tl.program_id(0)
    batch = (pid // num_e_tiles).to(tl.int64)
    e_tile = pid % num_e_tiles
    position = tl.load(position_ptr + batch)
    if FOLDS:
        n = position % chunk_size
    else:
        n = position
    fits = n < capacity
    rows_held = tl.where(fits, n, 0)  # buffered rows this token attends

    offs_s = tl.arange(0, BLOCK_S)
    s_ok = offs_s < S
    cols = e_tile * BLOCK_E + tl.arange(0, BLOCK_E)
    col_ok = cols < E
    q = _token_role(q_quad_ptr + batch * stride_qb, offs_s, S, affine_ptr, QUAD_Q, FROM_Z).to(
        tl.float32
    )
    k_new = _token_role(k_quad_ptr + batch * stride_kb, offs_s, S, affine_ptr, QUAD_K, FROM_Z)
    v_new = tl.load(v_ptr + batch * stride_vb + cols, mask=col_ok, other=0.0)

    # Buffered rows j < n, then the token's own row n (offset 0).
    acc = tl.zeros((BLOCK_E,), dtype=tl.float32)
    k_cache = k_quad_cache_ptr + batch * capacity * S
    v_cache = v_cache_ptr + batch * capacity * E
    for j0 in range(0, rows_held, BLOCK_N):
        rows = j0 + tl.arange(0, BLOCK_N)
        row_ok = rows < rows_held
        keys = tl.load(
            k_cache + rows[:, None] * S + offs_s[None, :],
            mask=row_ok[:, None] & s_ok[None, :],
            other=0.0,
        )
        scores = quad_scale * tl.sum(keys.to(tl.float32) * q[None, :], axis=1)
        if HAS_BIAS:
            scores += tl.load(rel_bias_ptr + (n - rows) + chunk_size - 1, mask=row_ok, other=0.0)
        relu_s = tl.where(row_ok, tl.maximum(scores, 0.0, propagate_nan=tl.PropagateNan.ALL), 0.0)
        values = tl.load(
            v_cache + rows[:, None] * E + cols[None, :],
            mask=row_ok[:, None] & col_ok[None, :],
            other=0.0,
        )
        acc += tl.sum((relu_s * relu_s)[:, None] * values.to(tl.float32), axis=0)
    own = quad_scale * tl.sum(q * k_new.to(tl.float32), axis=0)
    if HAS_BIAS:
        own += tl.load(rel_bias_ptr + chunk_size - 1)
    own = tl.maximum(own, 0.0, propagate_nan=tl.PropagateNan.ALL)
    acc += (own * own) * v_new.to(tl.float32)

    if HAS_LINEAR:  # the state in row blocks: a short-lived (BLOCK_SL, BLOCK_E) tile
        for s0 in range(0, S, BLOCK_SL):
            offs = s0 + tl.arange(0, BLOCK_SL)
            q_lin = _token_role(
                q_lin_ptr + batch * stride_qlb, offs, S, affine_ptr, LIN_Q, FROM_Z
            ).to(tl.float32)
            state = tl.load(
                state_ptr + batch * S * E + offs[:, None] * E + cols[None, :],
                mask=(offs[:, None] < S) & col_ok[None, :],
                other=0.0,
            )
            acc += lin_scale * tl.sum(q_lin[:, None] * state, axis=0)
    acc = tl.where(fits, acc, float("nan"))
    if HAS_GATE:
        acc = acc * tl.load(gate_ptr + batch * stride_gb + cols, mask=col_ok, other=0.0).to(
            tl.float32
        )
    tl.store(out_ptr + batch * E + cols, acc.to(out_ptr.dtype.element_ty), mask=col_ok)

    completes = False  # one growing chunk never completes
    joins = fits
    if FOLDS:
        completes = fits & (n == chunk_size - 1)
        joins = fits & (n != chunk_size - 1)
    if joins:  # the token joins the buffers at row n
        if e_tile == 0:
            tl.store(k_cache + n * S + offs_s, k_new, mask=s_ok)
            if HAS_LINEAR:
                k_lin_new = _token_role(
                    k_lin_ptr + batch * stride_klb, offs_s, S, affine_ptr, LIN_K, FROM_Z
                )
                tl.store(
                    k_lin_cache_ptr + batch * capacity * S + n * S + offs_s, k_lin_new, mask=s_ok
                )
        tl.store(v_cache + n * E + cols, v_new, mask=col_ok)
    if completes:  # the chunk is complete: fold it, clear the buffers
        if HAS_LINEAR:
            kl_cache = k_lin_cache_ptr + batch * capacity * S
            for s0 in range(0, S, BLOCK_SF):
                offs = s0 + tl.arange(0, BLOCK_SF)
                tile = state_ptr + batch * S * E + offs[:, None] * E + cols[None, :]
                tile_mask = (offs[:, None] < S) & col_ok[None, :]
                k_lin_new = _token_role(
                    k_lin_ptr + batch * stride_klb, offs, S, affine_ptr, LIN_K, FROM_Z
                )
                state = tl.load(tile, mask=tile_mask, other=0.0)
                state += k_lin_new.to(tl.float32)[:, None] * v_new.to(tl.float32)[None, :]
                for j0 in range(0, rows_held, BLOCK_N):
                    rows = j0 + tl.arange(0, BLOCK_N)
                    row_ok = rows < rows_held
                    # K^T read transposed (no register transpose into a dot: common.py)
                    keys_t = tl.load(
                        kl_cache + rows[None, :] * S + offs[:, None],
                        mask=row_ok[None, :] & (offs[:, None] < S),
                        other=0.0,
                    )
                    values = tl.load(
                        v_cache + rows[:, None] * E + cols[None, :],
                        mask=row_ok[:, None] & col_ok[None, :],
                        other=0.0,
                    )
                    state = tl.dot(keys_t, values, state, input_precision=DOT_PRECISION)
                tl.store(tile, state, mask=tile_mask)
        # This program's value columns are its own; the keys (read by every program of the
        # sequence) are cleared by the last one, below.
        for j0 in range(0, rows_held, BLOCK_N):
            rows = j0 + tl.arange(0, BLOCK_N)
            tl.store(
                v_cache + rows[:, None] * E + cols[None, :],
                tl.zeros((BLOCK_N, BLOCK_E), dtype=v_new.dtype),
                mask=(rows[:, None] < rows_held) & col_ok[None, :],
            )

    # The last program of the sequence to finish advances its position (see the module doc).
    tl.debug_barrier()
    ticket = tl.atomic_add(tickets_ptr + batch, 1)
    if ticket == num_e_tiles - 1:
        if completes:
            for j0 in range(0, rows_held, BLOCK_N):
                rows = j0 + tl.arange(0, BLOCK_N)
                row_mask = (rows[:, None] < rows_held) & s_ok[None, :]
                tl.store(
                    k_cache + rows[:, None] * S + offs_s[None, :],
                    tl.zeros((BLOCK_N, BLOCK_S), dtype=k_new.dtype),
                    mask=row_mask,
                )
                if HAS_LINEAR:
                    tl.store(
                        k_lin_cache_ptr
                        + batch * capacity * S
                        + rows[:, None] * S
                        + offs_s[None, :],
                        tl.zeros((BLOCK_N, BLOCK_S), dtype=k_new.dtype),
                        mask=row_mask,
                    )
        tl.store(tickets_ptr + batch, 0)
        tl.store(position_ptr + batch, tl.where(fits, position + 1, position))
