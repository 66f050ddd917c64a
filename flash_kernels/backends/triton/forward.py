"""The forward launches: the state scan, then the output kernel (design in mixed_chunk.py).

`mixed_chunk_forward` runs both; context parallelism (flash_kernels/distributed) runs them
apart and exchanges the scan's totals between the ranks in between.
"""

from ...core.plan import resolve_scales
from .kernels.mixed_chunk_fwd import mixed_chunk_fwd_kernel
from .launch import launch, new_buffer, stride_arguments
from .problem import Problem, offset_operand, state_scan


def forward_state_scan(roles, v, p, *, causal, lin_scale, store_total=False):
    """The forward's state pass (states, total): P_g of every chunk (causal) or of every
    document (non-causal), float32 with lin_scale folded in, and with store_total the unscaled
    per-document totals (chunk_state.py, STORE_TOTAL). The output launch needs the states."""
    return state_scan(
        roles, v, p, reverse=False, causal=causal, lin_scale=lin_scale, store_total=store_total
    )


def forward_output(
    roles,
    v,
    rel_bias,
    p,
    *,
    causal,
    quad_scale,
    lin_scale,
    states,
    state_offset=None,
    gate=None,
    store_attn=False,
):
    """The forward's output launch: (out, attn or None) from the states of forward_state_scan
    (None without a linear part) plus, with state_offset, lin_scale * state_offset[b, doc]
    (common.state_offset_tile). Scales are resolved numbers."""
    cfg = p.config
    bias = p.bias_operand(rel_bias)
    out = new_buffer((p.B, p.T, p.E), v.dtype, v.device)
    attn = new_buffer((p.B, p.T, p.E), v.dtype, v.device) if store_attn else None
    launch(
        mixed_chunk_fwd_kernel,
        p.grid(cfg.fwd_block),
        dict(
            q_quad_ptr=roles.q_quad,
            k_quad_ptr=roles.k_quad,
            q_lin_ptr=roles.q_lin,
            affine_ptr=roles.affine,
            states_ptr=states,
            state_offset_ptr=offset_operand(state_offset, lin_scale, v.dtype),
            v_ptr=v,
            rel_bias_ptr=bias,
            gate_ptr=gate,
            out_ptr=out,
            attn_ptr=attn,
            **stride_arguments(q=roles.q_quad, k=roles.k_quad, ql=roles.q_lin, v=v, g=gate),
            **p.chunk_args(),
            num_query_blocks=p.num_blocks(cfg.fwd_block),
            quad_scale=quad_scale,
        ),
        dict(
            FROM_Z=roles.fused,
            HAS_GATE=gate is not None,
            STORE_ATTN=store_attn,
            HAS_LINEAR=roles.has_linear,
            HAS_STATE_OFFSET=roles.has_linear and state_offset is not None,
            HAS_BIAS=bias is not None,
            CAUSAL=causal,
            HOIST_SCORES=cfg.hoist,
            IS_VARLEN=p.tables is not None,
            BLOCK_M=cfg.fwd_block,
            BLOCK_N=cfg.block_n,
            BLOCK_S=cfg.block_s,
            BLOCK_E=cfg.narrow_fwd_block_e if causal or roles.fused else cfg.fwd_block_e,
            DOT_PRECISION=p.dot_precision,
        ),
        num_warps=cfg.fwd_warps,
        num_stages=cfg.fwd_stages,
    )
    return out, attn


def mixed_chunk_forward(
    roles,
    v,
    rel_bias,
    chunk_size,
    causal,
    quad_scale,
    lin_scale,
    *,
    tables=None,
    state_offset=None,
    store_total=False,
    gate=None,
    store_attn=False,
):
    """Launch the forward: returns (out, attn or None, states or None, total or None).

    out = gate * attention when a gate is given (else the attention); with store_attn the
    ungated attention is also returned (the gate's gradient needs it). tables: packed
    documents (core.packing.ChunkTables). state_offset: (B, num_docs, S, E) float32, the
    unscaled state every chunk of a document starts from (see common.state_offset_tile).
    store_total: also return the scan's per-document totals (chunk_state.py, STORE_TOTAL).
    """
    quad_scale, lin_scale = (float(x) for x in resolve_scales(quad_scale, lin_scale, chunk_size))
    p = Problem(roles.q_quad, v, chunk_size, tables)
    states = total = None
    if roles.has_linear:
        states, total = forward_state_scan(
            roles, v, p, causal=causal, lin_scale=lin_scale, store_total=store_total
        )
    out, attn = forward_output(
        roles,
        v,
        rel_bias,
        p,
        causal=causal,
        quad_scale=quad_scale,
        lin_scale=lin_scale,
        states=states,
        state_offset=state_offset,
        gate=gate,
        store_attn=store_attn,
    )
    return out, attn, states, total
