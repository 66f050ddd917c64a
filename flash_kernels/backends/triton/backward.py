"""The backward launches: the query-side kernel, the reverse state scan and the key-side kernel
(design in mixed_chunk.py; the kernels in kernels/mixed_chunk_bwd.py)."""

from typing import NamedTuple, Optional

import torch

from ...core.plan import resolve_scales
from .kernels.mixed_chunk_bwd import mixed_chunk_bwd_key_kernel, mixed_chunk_bwd_query_kernel
from .launch import launch, new_buffer, stride_arguments
from .problem import Problem, offset_operand, state_scan


class BackwardNeeds(NamedTuple):
    """Which inputs of the forward need a gradient."""

    q_quad: bool = False
    k_quad: bool = False
    q_lin: bool = False
    k_lin: bool = False
    v: bool = False
    rel_bias: bool = False
    state_offset: bool = False


class Gradients(NamedTuple):
    """The gradients of the forward's inputs (None where not needed)."""

    q_quad: Optional[torch.Tensor] = None
    k_quad: Optional[torch.Tensor] = None
    q_lin: Optional[torch.Tensor] = None
    k_lin: Optional[torch.Tensor] = None
    v: Optional[torch.Tensor] = None
    rel_bias: Optional[torch.Tensor] = None
    state_offset: Optional[torch.Tensor] = None


def rel_bias_grad(dbias_partial, chunk_size, block):
    """Sum the per-program diagonal segments into the (2C - 1,) bias gradient.

    Segment slot t (s = t - (num_blocks - 1)) position p holds offset
    o = s * block - (block - 1) + p, so the flattened slots are consecutive offsets starting at
    -(num_blocks - 1) * block - (block - 1).
    """
    num_blocks = dbias_partial.shape[2]
    flat = dbias_partial.sum(dim=(0, 1, 2)).reshape(-1)  # deterministic reduction
    first_offset = -(num_blocks - 1) * block - (block - 1)
    grad = flat.new_zeros(2 * chunk_size - 1)
    lo = max(first_offset, -(chunk_size - 1))
    hi = min(first_offset + flat.numel() - 1, chunk_size - 1)
    grad[lo + chunk_size - 1 : hi + chunk_size] = flat[lo - first_offset : hi - first_offset + 1]
    return grad


class BackwardLaunches:
    """The backward's three launches for one call, in an order the caller picks:

    - `query_side(states, state_offset)`: dq_quad, dq_lin, dS and the bias partial sums; it
      needs the forward states P, not the reverse states D;
    - `reverse_scan(store_total)`: the reverse states D and, with store_total, the reverse
      per-document totals lin_scale * sum q_lin^T dO (chunk_state.py);
    - `key_side(dstates, grad_total)`: dk_quad, dk_lin, dv from D plus grad_total (the
      gradient reaching the forward's totals) on the chunks that went into them.

    mixed_chunk_backward runs them in that order; context parallelism runs the reverse scan
    first, sends its totals to the other ranks while the query side runs, then the key side.
    `needs`: a BackwardNeeds. Role gradients are written in `role_grad_dtype` (default v's).
    """

    def __init__(
        self,
        grad_out,
        roles,
        v,
        rel_bias,
        chunk_size,
        causal,
        quad_scale,
        lin_scale,
        needs,
        *,
        tables=None,
        role_grad_dtype=None,
    ):
        self.quad_scale, self.lin_scale = (
            float(x) for x in resolve_scales(quad_scale, lin_scale, chunk_size)
        )
        self.p = p = Problem(roles.q_quad, v, chunk_size, tables)
        self.grad_out, self.roles, self.v, self.causal = grad_out, roles, v, causal
        self.bias = p.bias_operand(rel_bias)
        linear = roles.has_linear  # no linear part: no gradient of its inputs
        self.needs = needs._replace(
            q_lin=needs.q_lin and linear,
            k_lin=needs.k_lin and linear,
            state_offset=needs.state_offset and linear,
        )
        # The query side stores dS for the key side where the scores are hoisted.
        self.store_ds = p.config.hoist and self.needs.k_quad
        self.role_grad_dtype = role_grad_dtype or v.dtype
        self.grads = Gradients()
        self.ds = self.dbias_partial = None

    @property
    def needs_reverse_states(self):
        """Whether any gradient needs the reverse states D (or their totals)."""
        needs = self.needs
        return self.roles.has_linear and (needs.k_lin or needs.v or needs.state_offset)

    def query_side(self, states, state_offset):
        p, cfg, roles, v, needs = self.p, self.p.config, self.roles, self.v, self.needs
        shape_s = (p.B, p.T, p.S)
        device = v.device
        dq_quad = new_buffer(shape_s, self.role_grad_dtype, device) if needs.q_quad else None
        dq_lin = new_buffer(shape_s, self.role_grad_dtype, device) if needs.q_lin else None
        self.grads = self.grads._replace(q_quad=dq_quad, q_lin=dq_lin)
        if self.store_ds:
            self.ds = new_buffer(
                (p.B, p.num_chunks, p.chunk_len, p.chunk_len), torch.float32, device
            )
        block, num_blocks = cfg.query_block, p.num_blocks(cfg.query_block)
        if not self.store_ds and needs.rel_bias:
            self.ds = new_buffer((p.grid(block)[0], block, block), torch.float32, device)
        if needs.rel_bias:
            self.dbias_partial = new_buffer(
                (p.B, p.num_chunks, num_blocks, 2 * num_blocks, block), torch.float32, device
            )
        if not (needs.q_quad or needs.rel_bias or self.store_ds or needs.q_lin):
            return
        launch(
            mixed_chunk_bwd_query_kernel,
            p.grid(block),
            dict(
                q_quad_ptr=roles.q_quad,
                k_quad_ptr=roles.k_quad,
                affine_ptr=roles.affine,
                v_ptr=v,
                grad_out_ptr=self.grad_out,
                states_ptr=states if needs.q_lin else None,
                state_offset_ptr=offset_operand(state_offset, self.lin_scale, v.dtype)
                if needs.q_lin
                else None,
                rel_bias_ptr=self.bias,
                dq_quad_ptr=dq_quad,
                dq_lin_ptr=dq_lin,
                ds_ptr=self.ds,
                dbias_partial_ptr=self.dbias_partial,
                **stride_arguments(q=roles.q_quad, k=roles.k_quad, v=v),
                **p.chunk_args(),
                num_blocks=num_blocks,
                quad_scale=self.quad_scale,
            ),
            dict(
                FROM_Z=roles.fused,
                HAS_BIAS=self.bias is not None,
                CAUSAL=self.causal,
                HOIST_SCORES=cfg.hoist,
                HAS_STATE_OFFSET=needs.q_lin and state_offset is not None,
                IS_VARLEN=p.tables is not None,
                NEED_DQ_QUAD=needs.q_quad,
                NEED_DQ_LIN=needs.q_lin,
                STORE_DS=self.store_ds,
                NEED_DBIAS=needs.rel_bias,
                BLOCK=block,
                BLOCK_S=cfg.block_s,
                BLOCK_E=cfg.query_block_e,
                DOT_PRECISION=p.dot_precision,
            ),
            num_warps=cfg.query_warps,
            num_stages=1,
        )

    def reverse_scan(self, store_total):
        """(dstates, total or None): see chunk_state.py (REVERSE)."""
        return state_scan(
            self.roles,
            self.grad_out,
            self.p,
            reverse=True,
            causal=self.causal,
            lin_scale=self.lin_scale,
            store_total=store_total,
        )

    def key_side(self, dstates, grad_total):
        p, cfg, roles, v, needs = self.p, self.p.config, self.roles, self.v, self.needs
        shape_s = (p.B, p.T, p.S)
        dk_quad = new_buffer(shape_s, self.role_grad_dtype, v.device) if needs.k_quad else None
        dk_lin = new_buffer(shape_s, self.role_grad_dtype, v.device) if needs.k_lin else None
        dv = new_buffer(v.shape, v.dtype, v.device) if needs.v else None
        self.grads = self.grads._replace(k_quad=dk_quad, k_lin=dk_lin, v=dv)
        if not (needs.k_quad or needs.k_lin or needs.v):
            return
        has_linear = dstates is not None and (needs.k_lin or needs.v)
        launch(
            mixed_chunk_bwd_key_kernel,
            p.grid(cfg.key_block),
            dict(
                q_quad_ptr=roles.q_quad,
                k_quad_ptr=roles.k_quad,
                k_lin_ptr=roles.k_lin if has_linear else None,
                affine_ptr=roles.affine,
                v_ptr=v,
                grad_out_ptr=self.grad_out,
                dstates_ptr=dstates if has_linear else None,
                dstate_offset_ptr=grad_total if has_linear else None,
                rel_bias_ptr=self.bias,
                ds_ptr=self.ds if self.store_ds else None,
                dk_quad_ptr=dk_quad,
                dk_lin_ptr=dk_lin,
                dv_ptr=dv,
                **stride_arguments(q=roles.q_quad, k=roles.k_quad, kl=roles.k_lin, v=v),
                **p.chunk_args(),
                num_blocks=p.num_blocks(cfg.key_block),
                quad_scale=self.quad_scale,
            ),
            dict(
                FROM_Z=roles.fused,
                HAS_LINEAR=has_linear,
                HAS_BIAS=self.bias is not None,
                CAUSAL=self.causal,
                HAS_DSTATE_OFFSET=has_linear and grad_total is not None,
                IS_VARLEN=p.tables is not None,
                STORE_DS=self.store_ds,
                HOIST_SCORES=cfg.hoist,
                NEED_DK_QUAD=needs.k_quad,
                NEED_DK_LIN=needs.k_lin,
                NEED_DV=needs.v,
                BLOCK=cfg.key_block,
                BLOCK_N=cfg.block_n,
                BLOCK_S=cfg.block_s,
                BLOCK_E=cfg.key_block_e,
                DOT_PRECISION=p.dot_precision,
            ),
            num_warps=cfg.key_warps,
            num_stages=1,
        )

    def gradients(self, doffset=None):
        """The Gradients (drel_bias summed from the query side's partial sums; doffset, the
        state offset's, as the caller formed it)."""
        drel_bias = None
        if self.needs.rel_bias:
            drel_bias = rel_bias_grad(
                self.dbias_partial, self.p.chunk_size, self.p.config.query_block
            )
        return self.grads._replace(rel_bias=drel_bias, state_offset=doffset)


def mixed_chunk_backward(
    grad_out,
    roles,
    v,
    rel_bias,
    states,
    chunk_size,
    causal,
    quad_scale,
    lin_scale,
    needs,
    *,
    tables=None,
    state_offset=None,
    grad_total=None,
    role_grad_dtype=None,
):
    """Launch the backward: the Gradients of the inputs `needs` (a BackwardNeeds) names. Role
    gradients are written in `role_grad_dtype` (default v's dtype; flash_attention asks for
    float32 and reduces them). grad_total: the gradient reaching the forward's totals (the
    final state), added to the reverse states of the chunks that went into them."""
    launches = BackwardLaunches(
        grad_out,
        roles,
        v,
        rel_bias,
        chunk_size,
        causal,
        quad_scale,
        lin_scale,
        needs,
        tables=tables,
        role_grad_dtype=role_grad_dtype,
    )
    launches.query_side(states, state_offset)
    dstates = doffset = None
    if launches.needs_reverse_states:
        # Causal: the scan's totals are d state_offset; non-causal: its one state per document is.
        need_doffset = launches.needs.state_offset
        dstates, doffset = launches.reverse_scan(store_total=need_doffset and causal)
        if need_doffset and not causal:
            doffset = dstates
    launches.key_side(dstates, grad_total)
    return launches.gradients(doffset)
