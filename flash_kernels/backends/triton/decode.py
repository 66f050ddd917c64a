"""The decoding step's Triton launch (kernels/mixed_chunk_decode.py), registered as the custom
op flash_kernels::mixed_chunk_decode so that a compiled or CUDA-graph-captured step sees one op
that mutates the cache."""

from typing import Optional

import torch

from ...core.validation import check_triton_inputs
from .kernel_config import dot_precision, next_power_of_2
from .kernels.mixed_chunk_decode import mixed_chunk_decode_kernel
from .launch import feature_contiguous, launch

DECODE_BLOCK_N = 32  # buffered rows per step of the key loop
DECODE_BLOCK_E = 64  # value columns per program
DECODE_BLOCK_SL = 32  # state rows per step of the linear part
DECODE_BLOCK_SF = 64  # state rows per step of the fold


def decode_config(S, E):
    """The decode kernel's tile constexprs and num_warps."""
    block_s = max(16, next_power_of_2(S))
    return dict(
        BLOCK_N=DECODE_BLOCK_N,
        BLOCK_S=block_s,
        BLOCK_SL=min(DECODE_BLOCK_SL, block_s),
        BLOCK_SF=min(DECODE_BLOCK_SF, block_s),
        BLOCK_E=min(DECODE_BLOCK_E, max(16, next_power_of_2(E))),
    ), 4


@torch.library.custom_op(
    "flash_kernels::mixed_chunk_decode",
    mutates_args=("k_quad_cache", "k_lin_cache", "v_cache", "state", "position", "tickets"),
)
def mixed_chunk_decode_op(
    q_quad: torch.Tensor,
    k_quad: torch.Tensor,
    q_lin: Optional[torch.Tensor],
    k_lin: Optional[torch.Tensor],
    v: torch.Tensor,
    gate: Optional[torch.Tensor],
    affine: Optional[torch.Tensor],
    rel_bias: Optional[torch.Tensor],
    k_quad_cache: torch.Tensor,
    k_lin_cache: Optional[torch.Tensor],
    v_cache: torch.Tensor,
    state: Optional[torch.Tensor],
    position: torch.Tensor,
    tickets: torch.Tensor,
    chunk_size: int,
    folds: bool,
    quad_scale: float,
    lin_scale: float,
) -> torch.Tensor:
    """The decode kernel as a custom op (the caches are mutated in place). With `affine`
    (the float32 (2, 4, S) [gamma; beta]) every role is read from q_quad = z."""
    B, S = q_quad.shape
    E = v.shape[-1]
    out = torch.empty(B, E, dtype=v.dtype, device=v.device)
    if B == 0:
        return out
    tiles, num_warps = decode_config(S, E)
    num_e_tiles = -(-E // tiles["BLOCK_E"])
    from_z = affine is not None
    linear = state is not None
    launch(
        mixed_chunk_decode_kernel,
        (B * num_e_tiles,),
        dict(
            q_quad_ptr=q_quad,
            k_quad_ptr=q_quad if from_z else k_quad,
            q_lin_ptr=q_quad if from_z and linear else q_lin,
            k_lin_ptr=q_quad if from_z and linear else k_lin,
            v_ptr=v,
            gate_ptr=gate,
            affine_ptr=affine,
            rel_bias_ptr=rel_bias,
            k_quad_cache_ptr=k_quad_cache,
            k_lin_cache_ptr=k_lin_cache,
            v_cache_ptr=v_cache,
            state_ptr=state,
            position_ptr=position,
            tickets_ptr=tickets,
            out_ptr=out,
            stride_qb=q_quad.stride(0),
            stride_kb=(q_quad if from_z else k_quad).stride(0),
            stride_qlb=0 if not linear else (q_quad if from_z else q_lin).stride(0),
            stride_klb=0 if not linear else (q_quad if from_z else k_lin).stride(0),
            stride_vb=v.stride(0),
            stride_gb=0 if gate is None else gate.stride(0),
            S=S,
            E=E,
            capacity=k_quad_cache.shape[1],
            chunk_size=chunk_size,
            num_e_tiles=num_e_tiles,
            quad_scale=quad_scale,
            lin_scale=lin_scale,
        ),
        dict(
            FROM_Z=from_z,
            HAS_GATE=gate is not None,
            HAS_LINEAR=linear,
            HAS_BIAS=rel_bias is not None,
            FOLDS=folds,
            **tiles,
            DOT_PRECISION=dot_precision(v.dtype, v.device),
        ),
        num_warps=num_warps,
        num_stages=1,
    )
    return out


@mixed_chunk_decode_op.register_fake
def _(
    q_quad,
    k_quad,
    q_lin,
    k_lin,
    v,
    gate,
    affine,
    rel_bias,
    k_quad_cache,
    k_lin_cache,
    v_cache,
    state,
    position,
    tickets,
    chunk_size,
    folds,
    quad_scale,
    lin_scale,
):
    return v.new_empty(q_quad.shape[0], v.shape[-1])


def decode_triton(
    q_quad, k_quad, q_lin, k_lin, v, cache, *, gate, affine, rel_bias, quad_scale, lin_scale
):
    """One decoding step (rows (B, S) / (B, E), scales resolved): the (B, E) output, the
    cache updated in place. With `affine` (core.roles.affine_stack) q_quad is z and every role
    is formed from it; gate: the optional (B, E) u."""
    check_triton_inputs(q_quad, v)
    rows = [feature_contiguous(x) for x in (q_quad, k_quad, q_lin, k_lin, v, gate)]
    bias32 = rel_bias.float().contiguous() if rel_bias is not None else None
    return mixed_chunk_decode_op(
        *rows[:5],
        rows[5],
        affine,
        bias32,
        cache.k_quad,
        cache.k_lin,
        cache.v,
        cache.state,
        cache.position,
        cache.tickets,
        cache.bias_chunk,
        cache.chunk_size is not None,
        float(quad_scale),
        float(lin_scale),
    )
