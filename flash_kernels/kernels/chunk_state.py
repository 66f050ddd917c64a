"""Inter-chunk state scan: one sequential pass over the chunks per (batch, S tile, E tile).

Forward (X = k_lin, Y = v):      P_g = lin_scale * sum_{h < g} X_h^T Y_h   (causal, exclusive)
Backward (X = q_lin, Y = dO):    D_g = lin_scale * sum_{h > g} X_h^T Y_h   (causal, reverse exclusive)
Non-causal, either direction:    one state, lin_scale * sum_h X_h^T Y_h, shared by every chunk.

Each state is stored *before* the current chunk is added, which is exactly FLASH's exclusive
cumulative sum, so the output kernels can run in parallel over chunks afterwards. States are
float32 (FLASH has no decay: the state grows with T, and half precision would lose the small
late additions). lin_scale is folded in here so the output kernels use the states as they are.
"""
import triton
import triton.language as tl


@triton.jit(do_not_specialize=["T", "num_chunks"])
def chunk_state_scan_kernel(
    x_ptr, affine_ptr, y_ptr, states_ptr,
    stride_xb, stride_xt, stride_yb, stride_yt,
    T, S, E, chunk_size, num_chunks, lin_scale,
    X_ROLE: tl.constexpr, FROM_Z: tl.constexpr, REVERSE: tl.constexpr, CAUSAL: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_S: tl.constexpr, BLOCK_E: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):
    """states[b, g, s, e] (causal) or states[b, 0, s, e] (non-causal), see the module docstring.

    x: (B, T, S), y: (B, T, E) views with unit feature stride and the given batch and token
    strides; states: (B, num_chunks or 1, S, E) float32, contiguous.
    FROM_Z: x is z and X = z * gamma[X_ROLE] + beta[X_ROLE] is formed on the fly (see
    common.load_role; affine_ptr is the float32 (2, 4, S) stack [gamma; beta]).
    Grid: (cdiv(E, BLOCK_E), cdiv(S, BLOCK_S), B).
    """
    pid_e = tl.program_id(0)
    pid_s = tl.program_id(1)
    batch = tl.program_id(1 + 1).to(tl.int64)
    offs_s = pid_s * BLOCK_S + tl.arange(0, BLOCK_S)
    offs_e = pid_e * BLOCK_E + tl.arange(0, BLOCK_E)
    offs_t = tl.arange(0, BLOCK_T)
    x_base = x_ptr + batch * stride_xb
    y_base = y_ptr + batch * stride_yb
    num_states = num_chunks if CAUSAL else 1
    state_offsets = offs_s[:, None] * E + offs_e[None, :]
    state_mask = (offs_s[:, None] < S) & (offs_e[None, :] < E)

    if FROM_Z:
        gamma = tl.load(affine_ptr + X_ROLE * S + offs_s, mask=offs_s < S, other=0.0)
        beta = tl.load(affine_ptr + (4 + X_ROLE) * S + offs_s, mask=offs_s < S, other=0.0)

    state = tl.zeros((BLOCK_S, BLOCK_E), dtype=tl.float32)
    for step in range(0, num_chunks):
        if REVERSE:
            chunk = num_chunks - 1 - step
        else:
            chunk = step
        if CAUSAL:
            tl.store(states_ptr + ((batch * num_states + chunk) * S * E + state_offsets),
                     state * lin_scale, mask=state_mask)
        chunk_start = chunk.to(tl.int64) * chunk_size
        # Only the chunk's tokens that exist: chunk_size may exceed T by far (one short chunk).
        for t0 in range(0, tl.minimum(chunk_size, T - chunk_start), BLOCK_T):
            rows = chunk_start + t0 + offs_t
            row_ok = (t0 + offs_t < chunk_size) & (rows < T)
            x_t = tl.load(x_base + rows[None, :] * stride_xt + offs_s[:, None],  # (BLOCK_S, BLOCK_T)
                          mask=row_ok[None, :] & (offs_s[:, None] < S), other=0.0)
            if FROM_Z:
                role = x_t.to(tl.float32) * gamma[:, None] + beta[:, None]
                x_t = tl.where(row_ok[None, :], role, 0.0).to(x_t.dtype)
            y = tl.load(y_base + rows[:, None] * stride_yt + offs_e[None, :],    # (BLOCK_T, BLOCK_E)
                        mask=row_ok[:, None] & (offs_e[None, :] < E), other=0.0)
            state = tl.dot(x_t, y, state, input_precision=DOT_PRECISION)
    if not CAUSAL:
        tl.store(states_ptr + (batch * S * E + state_offsets), state * lin_scale, mask=state_mask)
