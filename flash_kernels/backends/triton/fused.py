"""Triton backend of `flash_attention` (the fused op): the mixed chunk kernels reading z instead
of role tensors, registered as the custom ops flash_kernels::flash_fwd / _bwd.

Forward: the kernels form each role tile as z * gamma[r] + beta[r] when they load it (z is read
where a role would be, the four (T, S) role tensors never exist) and multiply the output tile by
the gate u before storing it; the ungated attention is stored too only when u needs a gradient.

Backward: the attention backward kernels run on grad_attn = dO * u and write the four role
gradients in float32; then, per role r (all sums over batch and tokens, deterministic):

    dz = sum_r d_role_r * gamma_r      dgamma_r = sum d_role_r * z      dbeta_r = sum d_role_r
    du = dO * attention
"""

from typing import List, Optional, Tuple

import torch

from ...core.roles import affine_stack
from ...core.validation import check_triton_inputs
from .backward import BackwardNeeds, mixed_chunk_backward
from .forward import mixed_chunk_forward
from .launch import feature_contiguous
from .mixed_chunk import packed_arguments, state_shapes, tables_from
from .problem import Roles


@torch.library.custom_op("flash_kernels::flash_fwd", mutates_args=())
def flash_fwd_op(
    z: torch.Tensor,
    affine: torch.Tensor,
    num_roles: int,
    v: torch.Tensor,
    u: Optional[torch.Tensor],
    rel_bias: Optional[torch.Tensor],
    cu_seqlens: Optional[torch.Tensor],
    chunk_offsets: Optional[torch.Tensor],
    chunk_table: Optional[torch.Tensor],
    state_offset: Optional[torch.Tensor],
    chunk_size: int,
    causal: bool,
    quad_scale: Optional[float],
    lin_scale: Optional[float],
    store_attn: bool,
    store_total: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, attn, states, total): attn is the ungated attention when store_attn (else empty),
    states the float32 forward states (empty without a linear part), total the per-document
    totals when store_total (see mixed_chunk_fwd_op)."""
    out, attn, states, total = mixed_chunk_forward(
        Roles.from_z(z, affine, num_roles),
        v,
        rel_bias,
        chunk_size,
        causal,
        quad_scale,
        lin_scale,
        tables=tables_from(cu_seqlens, chunk_offsets, chunk_table),
        state_offset=state_offset,
        store_total=store_total,
        gate=u,
        store_attn=store_attn,
    )
    empty = v.new_empty(0, dtype=torch.float32)
    return (
        out,
        attn if attn is not None else v.new_empty(0),
        states if states is not None else empty,
        total if total is not None else empty.clone(),
    )


@flash_fwd_op.register_fake
def _(
    z,
    affine,
    num_roles,
    v,
    u,
    rel_bias,
    cu_seqlens,
    chunk_offsets,
    chunk_table,
    state_offset,
    chunk_size,
    causal,
    quad_scale,
    lin_scale,
    store_attn,
    store_total,
):
    B, T, S = z.shape
    states, total = state_shapes(
        B,
        T,
        S,
        v.shape[-1],
        chunk_size,
        causal,
        num_roles == 4,
        store_total,
        cu_seqlens,
        chunk_table,
    )
    return (
        v.new_empty(v.shape),
        v.new_empty(v.shape if store_attn else (0,)),
        v.new_empty(states, dtype=torch.float32),
        v.new_empty(total, dtype=torch.float32),
    )


@torch.library.custom_op("flash_kernels::flash_bwd", mutates_args=())
def flash_bwd_op(
    grad_out: torch.Tensor,
    grad_total: Optional[torch.Tensor],
    z: torch.Tensor,
    affine: torch.Tensor,
    num_roles: int,
    v: torch.Tensor,
    u: Optional[torch.Tensor],
    rel_bias: Optional[torch.Tensor],
    states: torch.Tensor,
    attn: torch.Tensor,
    cu_seqlens: Optional[torch.Tensor],
    chunk_offsets: Optional[torch.Tensor],
    chunk_table: Optional[torch.Tensor],
    state_offset: Optional[torch.Tensor],
    chunk_size: int,
    causal: bool,
    quad_scale: Optional[float],
    lin_scale: Optional[float],
    needs: List[bool],
) -> List[torch.Tensor]:
    """Gradients of (z, gamma, beta, v, u, rel_bias, state_offset) (gamma and beta as float32
    (R, S)); an empty tensor where `needs` is False or the input is absent. See the module
    docstring."""
    need_z, need_gamma, need_beta, need_v, need_u, need_bias, need_offset = needs
    grad_attn, du = gate_gradients(grad_out, u, attn, v, need_u)
    grads = mixed_chunk_backward(
        grad_attn,
        Roles.from_z(z, affine, num_roles),
        v,
        rel_bias,
        states if num_roles == 4 else None,
        chunk_size,
        causal,
        quad_scale,
        lin_scale,
        attention_needs(
            need_z or need_gamma or need_beta, num_roles, need_v, need_bias, need_offset
        ),
        tables=tables_from(cu_seqlens, chunk_offsets, chunk_table),
        state_offset=state_offset,
        grad_total=grad_total.contiguous() if grad_total is not None else None,
        role_grad_dtype=torch.float32,
    )
    dz, dgamma, dbeta = reduce_role_grads(
        role_gradients(grads, num_roles), z, affine, need_z, need_gamma, need_beta
    )
    return [
        g if g is not None else v.new_empty(0)
        for g in (dz, dgamma, dbeta, grads.v, du, grads.rel_bias, grads.state_offset)
    ]


def gate_gradients(grad_out, u, attn, v, need_u):
    """(grad_attn, du): the gradient reaching the attention, dO * u (dO without a gate), and
    the gate's, dO * attention (None unless need_u), both formed in float32."""
    grad_out = grad_out.contiguous()
    du = (grad_out.float() * attn.float()).to(u.dtype) if u is not None and need_u else None
    grad_attn = grad_out if u is None else (grad_out.float() * u.float()).to(v.dtype)
    return grad_attn.contiguous(), du


def attention_needs(need_roles, num_roles, need_v, need_bias, need_offset=False):
    """The BackwardNeeds of the attention inside the fused op: every role when z, gamma or
    beta needs a gradient (the linear ones only if there are four)."""
    linear = need_roles and num_roles == 4
    return BackwardNeeds(
        q_quad=need_roles,
        k_quad=need_roles,
        q_lin=linear,
        k_lin=linear,
        v=need_v,
        rel_bias=need_bias,
        state_offset=need_offset,
    )


def role_gradients(grads, num_roles):
    """The float32 gradients of the num_roles roles, in role order (core/roles.py)."""
    return [grads.q_quad, grads.k_quad, grads.q_lin, grads.k_lin][:num_roles]


def reduce_role_grads(role_grads, z, affine, need_z, need_gamma, need_beta):
    """(dz, dgamma, dbeta) from the float32 gradients of the R roles (None where not needed):
    dz = sum_r d_role_r * gamma_r, dgamma_r = sum d_role_r * z, dbeta_r = sum d_role_r (sums
    over batch and tokens, deterministic)."""
    dz = dgamma = dbeta = None
    if need_z or need_gamma or need_beta:
        num_roles = len(role_grads)
        d_roles = torch.stack(role_grads)  # (R, B, T, S) float32
        if need_z:
            dz = torch.einsum("rbts,rs->bts", d_roles, affine[0, :num_roles]).to(z.dtype)
        if need_gamma:
            dgamma = torch.einsum("rbts,bts->rs", d_roles, z.float())
        if need_beta:
            dbeta = d_roles.sum(dim=(1, 2))
    return dz, dgamma, dbeta


@flash_bwd_op.register_fake
def _(
    grad_out,
    grad_total,
    z,
    affine,
    num_roles,
    v,
    u,
    rel_bias,
    states,
    attn,
    cu_seqlens,
    chunk_offsets,
    chunk_table,
    state_offset,
    chunk_size,
    causal,
    quad_scale,
    lin_scale,
    needs,
):
    S = z.shape[-1]
    shapes = (
        z.shape,
        (num_roles, S),
        (num_roles, S),
        v.shape,
        None if u is None else u.shape,
        None if rel_bias is None else rel_bias.shape,
        None if state_offset is None else state_offset.shape,
    )
    dtypes = (z.dtype, torch.float32, torch.float32, v.dtype, v.dtype, torch.float32, torch.float32)
    return [
        v.new_empty(shape, dtype=dtype) if need and shape is not None else v.new_empty(0)
        for shape, dtype, need in zip(shapes, dtypes, needs)
    ]


def _flash_setup_context(ctx, inputs, output):
    (
        z,
        affine,
        num_roles,
        v,
        u,
        rel_bias,
        cu_seqlens,
        chunk_offsets,
        chunk_table,
        state_offset,
        chunk_size,
        causal,
        quad_scale,
        lin_scale,
        _,
        store_total,
    ) = inputs
    ctx.save_for_backward(
        z,
        affine,
        v,
        u,
        rel_bias,
        output[2],
        output[1],
        cu_seqlens,
        chunk_offsets,
        chunk_table,
        state_offset,
    )
    ctx.options = (chunk_size, causal, quad_scale, lin_scale)
    ctx.num_roles = num_roles
    ctx.store_total = store_total


#: flash_fwd_op's inputs by name, in order: the autograd formula maps them to gradients.
_FORWARD_INPUTS = (
    "z",
    "affine",
    "num_roles",
    "v",
    "u",
    "rel_bias",
    "cu_seqlens",
    "chunk_offsets",
    "chunk_table",
    "state_offset",
    "chunk_size",
    "causal",
    "quad_scale",
    "lin_scale",
    "store_attn",
    "store_total",
)


def affine_gradient(affine, dgamma, dbeta, num_roles):
    """The gradient of the (2, 4, S) affine stack from those of gamma and beta (its rows)."""
    daffine = torch.zeros_like(affine)
    daffine[0, :num_roles] = dgamma
    daffine[1, :num_roles] = dbeta
    return daffine


def _flash_backward(ctx, grad_out, grad_attn, grad_states, grad_total):
    (
        z,
        affine,
        v,
        u,
        rel_bias,
        states,
        attn,
        cu_seqlens,
        chunk_offsets,
        chunk_table,
        state_offset,
    ) = ctx.saved_tensors
    num_roles = ctx.num_roles
    need = {name: bool(n) for name, n in zip(_FORWARD_INPUTS, ctx.needs_input_grad)}
    # affine holds gamma (row 0) and beta (row 1): its gradient is assembled from both.
    needs = [
        need["z"],
        need["affine"],
        need["affine"],
        need["v"],
        need["u"],
        need["rel_bias"],
        need["state_offset"],
    ]
    dz, dgamma, dbeta, dv, du, drel_bias, doffset = flash_bwd_op(
        grad_out,
        grad_total if ctx.store_total else None,
        z,
        affine,
        num_roles,
        v,
        u,
        rel_bias,
        states,
        attn,
        cu_seqlens,
        chunk_offsets,
        chunk_table,
        state_offset,
        *ctx.options,
        needs,
    )
    daffine = affine_gradient(affine, dgamma, dbeta, num_roles) if need["affine"] else None
    grads = dict(z=dz, affine=daffine, v=dv, u=du, rel_bias=drel_bias, state_offset=doffset)
    return tuple(grads.get(name) if need[name] else None for name in _FORWARD_INPUTS)


flash_fwd_op.register_autograd(_flash_backward, setup_context=_flash_setup_context)


def flash_attention_triton(
    z,
    gamma,
    beta,
    v,
    u,
    *,
    chunk_size,
    causal,
    rel_bias,
    quad_scale,
    lin_scale,
    tables=None,
    state_offset=None,
    store_total=False,
):
    """z (B, T, S), v and u (B, T, E) with one flattened batch dim; resolved chunk size, scales
    as mixed_chunk_attention_triton; returns (out, total or None) like it.

    gamma and beta enter the op stacked as the float32 (2, 4, S) `affine` (differentiable, so
    their gradients come back through the stack in their own dtypes)."""
    check_triton_inputs(z, v)
    num_roles = gamma.shape[0]
    affine = affine_stack(gamma, beta)
    store_attn = u is not None and u.requires_grad and torch.is_grad_enabled()
    # float32 and contiguous: the long-chunk kernels read it through a raw pointer.
    bias32 = rel_bias.float().contiguous() if rel_bias is not None else None
    offset32 = state_offset.float().contiguous() if state_offset is not None else None
    out, _, _, total = flash_fwd_op(
        feature_contiguous(z),
        affine,
        num_roles,
        feature_contiguous(v),
        feature_contiguous(u),
        bias32,
        *packed_arguments(tables),
        offset32,
        chunk_size,
        causal,
        quad_scale,
        lin_scale,
        store_attn,
        store_total,
    )
    return out, (total if store_total else None)
