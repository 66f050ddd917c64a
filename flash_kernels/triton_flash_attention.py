"""Triton backend of `flash_attention`: the mixed chunk kernels reading z instead of role tensors.

Forward: the kernels form each role tile as z * gamma[r] + beta[r] when they load it (z is read
where a role would be, the four (T, S) role tensors never exist) and multiply the output tile by
the gate u before storing it; the ungated attention is stored too only when u needs a gradient.

Backward: the attention backward kernels run on grad_attn = dO * u and write the four role
gradients in float32; then, per role r (all sums over batch and tokens, deterministic):

    dz = sum_r d_role_r * gamma_r      dgamma_r = sum d_role_r * z      dbeta_r = sum d_role_r
    du = dO * attention
"""
import torch

from .triton_mixed_chunk import (Roles, check_triton_inputs, feature_contiguous, mixed_chunk_backward,
                                 mixed_chunk_forward)


def _affine_stack(gamma, beta):
    """float32 (2, 4, S) [gamma; beta], zero rows for the linear roles when there are only two."""
    affine = gamma.new_zeros((2, 4, gamma.shape[1]), dtype=torch.float32)
    affine[0, :gamma.shape[0]] = gamma.float()
    affine[1, :beta.shape[0]] = beta.float()
    return affine


def _roles_from_z(z, affine, num_roles):
    linear = z if num_roles == 4 else None
    return Roles(z, z, linear, linear, affine)


class FlashAttentionFunction(torch.autograd.Function):
    """Autograd of the fused op. z (B, T, S), v and u (B, T, E), unit feature stride."""

    @staticmethod
    def forward(ctx, z, gamma, beta, v, u, rel_bias, chunk_size, causal, quad_scale, lin_scale):
        affine = _affine_stack(gamma, beta)
        bias32 = rel_bias.float().contiguous() if rel_bias is not None else None
        store_attn = u is not None and ctx.needs_input_grad[4]
        out, attn, states = mixed_chunk_forward(_roles_from_z(z, affine, gamma.shape[0]), v, bias32,
                                                chunk_size, causal, quad_scale, lin_scale,
                                                gate=u, store_attn=store_attn)
        ctx.save_for_backward(z, affine, v, u, bias32, states, attn)
        ctx.options = (chunk_size, causal, quad_scale, lin_scale)
        ctx.dtypes = (gamma.dtype, beta.dtype, None if rel_bias is None else rel_bias.dtype)
        ctx.num_roles = gamma.shape[0]
        return out

    @staticmethod
    def backward(ctx, grad_out):
        z, affine, v, u, bias32, states, attn = ctx.saved_tensors
        chunk_size, causal, quad_scale, lin_scale = ctx.options
        gamma_dtype, beta_dtype, bias_dtype = ctx.dtypes
        need_z, need_gamma, need_beta, need_v, need_u, need_bias = ctx.needs_input_grad[:6]
        num_roles = ctx.num_roles
        grad_out = grad_out.contiguous()

        du = None
        if u is not None and need_u:
            du = (grad_out.float() * attn.float()).to(u.dtype)
        grad_attn = grad_out if u is None else (grad_out.float() * u.float()).to(v.dtype)

        need_roles = need_z or need_gamma or need_beta
        needs = (need_roles, need_roles, need_roles and num_roles == 4, need_roles and num_roles == 4,
                 need_v, need_bias)
        grads = mixed_chunk_backward(grad_attn, _roles_from_z(z, affine, num_roles), v, bias32, states,
                                     chunk_size, causal, quad_scale, lin_scale, needs,
                                     role_grad_dtype=torch.float32)
        role_grads, dv, drel_bias = grads[:num_roles], grads[4], grads[5]

        dz = dgamma = dbeta = None
        if need_roles:
            d_roles = torch.stack(role_grads)                          # (R, B, T, S) float32
            if need_z:
                gamma = affine[0, :num_roles]
                dz = torch.einsum("rbts,rs->bts", d_roles, gamma).to(z.dtype)
            if need_gamma:
                dgamma = torch.einsum("rbts,bts->rs", d_roles, z.float()).to(gamma_dtype)
            if need_beta:
                dbeta = d_roles.sum(dim=(1, 2)).to(beta_dtype)
        if drel_bias is not None:
            drel_bias = drel_bias.to(bias_dtype)
        return dz, dgamma, dbeta, dv, du, drel_bias, None, None, None, None


def flash_attention_triton(z, gamma, beta, v, u, *, chunk_size, causal, rel_bias, quad_scale,
                           lin_scale):
    """z (B, T, S), v and u (B, T, E) with one flattened batch dim; resolved options."""
    check_triton_inputs(z, v)
    return FlashAttentionFunction.apply(feature_contiguous(z), gamma, beta, feature_contiguous(v),
                                        feature_contiguous(u), rel_bias, chunk_size, causal,
                                        float(quad_scale), float(lin_scale))
