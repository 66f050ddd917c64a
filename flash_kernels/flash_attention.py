"""The fused FLASH op `flash_attention` (SPEC.md section 4): roles from z, attention, gate.

    q_quad = z * gamma[0] + beta[0]      k_quad = z * gamma[1] + beta[1]
    q_lin  = z * gamma[2] + beta[2]      k_lin  = z * gamma[3] + beta[3]     (rows 2, 3 optional)
    out    = u * mixed_chunk_attention(q_quad, k_quad, q_lin, k_lin, v, ...)   (u optional)

Each role is formed in float32 and rounded to z's dtype, exactly as the composition below does.
"""
import torch

from .mixed_chunk_attention import mixed_chunk_attention
from .validation import BACKENDS, check_tensor

ROLE_NAMES = ("quad_q", "quad_k", "lin_q", "lin_k")


def scale_offset_roles(z, gamma, beta):
    """The len(gamma) role tensors z * gamma[r] + beta[r], formed in float32, in z's dtype."""
    z32 = z.float() if z.dtype != torch.float64 else z
    compute = z32.dtype
    return [(z32 * gamma[r].to(compute) + beta[r].to(compute)).to(z.dtype) for r in range(gamma.shape[0])]


def check_flash_inputs(z, gamma, beta, v, u):
    check_tensor("z", z, min_dim=2)
    check_tensor("v", v, min_dim=2)
    for name, x in (("gamma", gamma), ("beta", beta)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if not x.is_floating_point():
            raise TypeError(f"{name} must be a floating tensor, got {x.dtype}")
        S = z.shape[-1]
        if x.dim() != 2 or x.shape[0] not in (2, 4) or x.shape[1] != S:
            raise ValueError(f"{name} must have shape (4, S) (rows quad_q, quad_k, lin_q, lin_k) or "
                             f"(2, S) (quadratic only) with S = z.shape[-1] = {S}, got {tuple(x.shape)}")
        if x.device != z.device:
            raise ValueError(f"{name} is on {x.device} but z is on {z.device}: all inputs must be on one device")
    if gamma.shape != beta.shape:
        raise ValueError(f"gamma and beta must have the same shape, got {tuple(gamma.shape)} and {tuple(beta.shape)}")
    if tuple(v.shape[:-1]) != tuple(z.shape[:-1]):
        raise ValueError(f"v must have shape (*batch, T, E) = {tuple(z.shape[:-1]) + ('E',)} matching z's "
                         f"batch dims and T, got {tuple(v.shape)}")
    if v.dtype != z.dtype:
        raise TypeError(f"v has dtype {v.dtype} but z has {z.dtype}: z, v and u must share one dtype")
    if v.device != z.device:
        raise ValueError(f"v is on {v.device} but z is on {z.device}: all inputs must be on one device")
    if u is not None:
        check_tensor("u", u, min_dim=2)
        if u.shape != v.shape:
            raise ValueError(f"u must have v's shape {tuple(v.shape)}, got {tuple(u.shape)}")
        if u.dtype != v.dtype:
            raise TypeError(f"u has dtype {u.dtype} but v has {v.dtype}: z, v and u must share one dtype")
        if u.device != v.device:
            raise ValueError(f"u is on {u.device} but v is on {v.device}: all inputs must be on one device")


def flash_attention(z, gamma, beta, v, *, u=None, chunk_size=256, causal=True, rel_bias=None,
                    quad_scale=None, lin_scale=None, backend="auto"):
    """FLASH attention from the shared z: per-role scale-offsets, mixed chunk attention, gate.

    Args:
        z: (*batch, T, S) shared base of the queries and keys.
        gamma, beta: (4, S) scale and offset rows (quad_q, quad_k, lin_q, lin_k), or (2, S) for
            quadratic attention only. May be float32 while z is half; their gradients are
            returned in their own dtype.
        v: (*batch, T, E) values; u: optional (*batch, T, E) gate, the output is u * attention.
        chunk_size, causal, rel_bias, quad_scale, lin_scale, backend: as mixed_chunk_attention.

    Returns:
        (*batch, T, E) in v's dtype. Gradients flow to z, gamma, beta, v, u and rel_bias.
    """
    check_flash_inputs(z, gamma, beta, v, u)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    roles = scale_offset_roles(z, gamma, beta)
    q_quad, k_quad = roles[0], roles[1]
    q_lin, k_lin = (roles[2], roles[3]) if len(roles) == 4 else (None, None)
    out = mixed_chunk_attention(q_quad, k_quad, q_lin, k_lin, v, chunk_size=chunk_size, causal=causal,
                                rel_bias=rel_bias, quad_scale=quad_scale, lin_scale=lin_scale,
                                backend=backend)
    return out if u is None else u * out
