"""The fused FLASH op `flash_attention` (docs/contract.md sections 4 and 7): roles from z,
attention, gate.

    q_quad = z * gamma[0] + beta[0]      k_quad = z * gamma[1] + beta[1]
    q_lin  = z * gamma[2] + beta[2]      k_lin  = z * gamma[3] + beta[3]     (rows 2, 3 optional)
    out    = u * mixed_chunk_attention(q_quad, k_quad, q_lin, k_lin, v, ...)   (u optional)

Each role is formed in float32 and rounded to z's dtype, in the Triton kernels (which read z
instead of four role tensors, and multiply by u when they store) and in the composition below.
"""
import math

import torch

from .context_parallel import flash_attention_cp
from .mixed_chunk_attention import Documents, mixed_chunk_attention, pick_backend
from .utils import autocast_cast, autocast_dtype
from .validation import check_flash_inputs, check_options, check_rel_bias

try:    # imported here so the custom ops are registered before anything is traced or compiled
    from .triton_flash_attention import flash_attention_triton
except ImportError:                  # no usable triton: mixed_chunk_attention says why on use
    flash_attention_triton = None

ROLE_NAMES = ("quad_q", "quad_k", "lin_q", "lin_k")


def scale_offset_roles(z, gamma, beta):
    """The len(gamma) role tensors z * gamma[r] + beta[r], formed in float32, in z's dtype."""
    compute = torch.promote_types(z.dtype, torch.float32)
    z_wide = z.to(compute)
    return [(z_wide * gamma[r].to(compute) + beta[r].to(compute)).to(z.dtype)
            for r in range(gamma.shape[0])]


def flash_attention(z, gamma, beta, v, *, u=None, chunk_size=256, causal=True, rel_bias=None,
                    quad_scale=None, lin_scale=None, cu_seqlens=None, max_seqlen=None,
                    initial_state=None, output_final_state=False, backend="auto",
                    cp_group=None):
    """FLASH attention from the shared z: per-role scale-offsets, mixed chunk attention, gate.

    Args:
        z: (*batch, T, S) shared base of the queries and keys.
        gamma, beta: (4, S) scale and offset rows (quad_q, quad_k, lin_q, lin_k), or (2, S) for
            quadratic attention only. May be float32 while z is half; their gradients are
            returned in their own dtype (reduced over tokens deterministically).
        v: (*batch, T, E) values; u: optional (*batch, T, E) gate, the output is u * attention.
        chunk_size, causal, rel_bias, quad_scale, lin_scale, cu_seqlens, max_seqlen,
            initial_state, output_final_state, backend: as mixed_chunk_attention ("triton"
            fuses the roles and the gate into the kernels; float64 takes the composed PyTorch
            path). The final state is the ungated attention's (u gates outputs, not the state).
        cp_group: context parallelism, as mixed_chunk_attention: outputs and the gradients of
            z, v and u are the whole-sequence op's on this rank's slice; gamma, beta and
            rel_bias get this rank's partial gradients (their sum over the ranks is the
            whole-sequence gradient).

    Returns:
        (*batch, T, E) in v's dtype, or (out, final_state) with output_final_state. Gradients
        flow to z, gamma, beta, v, u, rel_bias and initial_state. Inside torch.autocast, z, v
        and u are cast to the autocast dtype first (so is the output); gamma, beta, rel_bias
        and initial_state keep theirs.
    """
    options = dict(chunk_size=chunk_size, causal=causal, rel_bias=rel_bias, quad_scale=quad_scale,
                   lin_scale=lin_scale, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
                   initial_state=initial_state, output_final_state=output_final_state)
    cast = autocast_dtype(v)
    if cast is not None:
        z, v, u = (autocast_cast(x, cast) for x in (z, v, u))
        with torch.autocast(v.device.type, enabled=False):
            return flash_attention(z, gamma, beta, v, u=u, backend=backend, cp_group=cp_group,
                                   **options)
    if cp_group is not None:
        return flash_attention_cp(z, gamma, beta, v, u=u, cp_group=cp_group, backend=backend,
                                  **options)
    check_flash_inputs(z, gamma, beta, v, u)
    check_options(chunk_size, causal, quad_scale, lin_scale, backend)
    *batch, T, S = z.shape
    E = v.shape[-1]
    resolved = pick_backend(backend, v.device, v.dtype, S)
    if resolved != "triton" or T == 0 or flash_attention_triton is None:
        roles = scale_offset_roles(z, gamma, beta)
        q_lin, k_lin = (roles[2], roles[3]) if len(roles) == 4 else (None, None)
        result = mixed_chunk_attention(roles[0], roles[1], q_lin, k_lin, v, backend=resolved,
                                       **options)
        if u is None:
            return result
        if output_final_state:
            return u * result[0], result[1]
        return u * result

    docs = Documents(batch=batch, T=T, S=S, E=E, chunk_size=chunk_size, cu_seqlens=cu_seqlens,
                     max_seqlen=max_seqlen, initial_state=initial_state,
                     output_final_state=output_final_state, has_linear=gamma.shape[0] == 4,
                     causal=causal, device=z.device, dtype=v.dtype)
    check_rel_bias(rel_bias, C=docs.chunk_size, chunk_size=chunk_size, packed=docs.packed,
                   device=z.device, device_owner="z")
    B = math.prod(batch)
    out, total = flash_attention_triton(
        z.reshape(B, T, S), gamma, beta, v.reshape(B, T, E),
        None if u is None else u.reshape(B, T, E), chunk_size=docs.chunk_size, causal=causal,
        rel_bias=rel_bias, quad_scale=quad_scale, lin_scale=lin_scale, tables=docs.tables(),
        state_offset=docs.state_offset(B), store_total=output_final_state)
    return docs.finish(out, total)
