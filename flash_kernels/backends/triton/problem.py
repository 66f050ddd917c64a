"""What the forward and backward launches of one call share: where the kernels read the four
roles (`Roles`), the sizes and tiles of the call (`Problem`), the operands built for the kernels
(the bias's Toeplitz matrix, the scaled state offset) and the state scan, which runs forward in
the forward pass and in reverse in the backward."""

from dataclasses import dataclass

import torch

from ...core.packing import toeplitz_bias
from ...core.roles import LIN_K, LIN_Q
from .gpu_target import current_target, planned_dtype
from .kernel_config import dot_precision, kernel_config
from .kernels.chunk_state import chunk_state_scan_kernel
from .launch import cdiv, launch, new_buffer, row_strides


@dataclass
class Roles:
    """Where the kernels read the four roles (quad_q, quad_k, lin_q, lin_k).

    Either the role tensors themselves (mixed_chunk_attention), or z for all four with
    `affine` the float32 (2, 4, S) stack [gamma; beta] (flash_attention forms the roles on the
    fly: core.roles.affine_stack). `q_lin is None` means quadratic attention only.
    """

    q_quad: torch.Tensor
    k_quad: torch.Tensor
    q_lin: torch.Tensor = None
    k_lin: torch.Tensor = None
    affine: torch.Tensor = None

    @classmethod
    def from_z(cls, z, affine, num_roles):
        """All roles read from z and formed with `affine` (num_roles 4, or 2: quadratic only)."""
        linear = z if num_roles == 4 else None
        return cls(z, z, linear, linear, affine)

    @property
    def fused(self):
        """Whether the kernels form the roles from z (FROM_Z)."""
        return self.affine is not None

    @property
    def has_linear(self):
        return self.q_lin is not None


class Problem:
    """Sizes and tiles shared by the forward and backward launches. `tables`
    (core.packing.ChunkTables) when the sequence packs several documents: the kernels then run
    one program per chunk slot."""

    def __init__(self, q_quad, v, chunk_size, tables=None):
        self.B, self.T, self.S = q_quad.shape
        self.E = v.shape[-1]
        self.chunk_size = chunk_size
        self.chunk_len = min(chunk_size, self.T)  # no chunk is longer
        self.tables = tables
        self.num_chunks = tables.num_slots if tables else cdiv(self.T, chunk_size)
        self.num_docs = tables.num_docs if tables else 1
        self.config = kernel_config(
            self.chunk_len,
            self.S,
            self.E,
            planned_dtype(v.dtype, v.device),
            current_target(v.device),
        )
        self.dot_precision = dot_precision(v.dtype, v.device)

    def num_blocks(self, block):
        """Row blocks of `block` rows per chunk."""
        return cdiv(self.chunk_len, block)

    def grid(self, block):
        """One program per (batch, chunk slot, row block of `block` rows)."""
        return (self.B * self.num_chunks * self.num_blocks(block),)

    def chunk_args(self):
        """The kernels' chunk-geometry arguments (common.program_chunk_block)."""
        tables = self.tables
        return dict(
            chunk_table_ptr=tables.chunk_table if tables else None,
            cu_seqlens_ptr=tables.cu_seqlens if tables else None,
            T=self.T,
            S=self.S,
            E=self.E,
            chunk_size=self.chunk_size,
            chunk_len=self.chunk_len,
            num_chunks=self.num_chunks,
            num_docs=self.num_docs,
        )

    def bias_operand(self, rel_bias):
        """What the kernels read for the bias: the (chunk_len, chunk_len) Toeplitz matrix of
        the float32 bias when the scores are hoisted (chunks of at most 256 tokens: C^2 floats,
        256 KB at C = 256), else the (2C - 1,) vector itself (see kernels/common.py,
        relu_scores_tile)."""
        if rel_bias is None or not self.config.hoist:
            return rel_bias
        return toeplitz_bias(rel_bias, self.chunk_size, self.chunk_len).contiguous()


def offset_operand(state_offset, lin_scale, dtype):
    """What the kernels read for a state offset: lin_scale * offset in the tensor-core operand
    dtype (bf16 for bf16 inputs, else float32; see kernels/common.py, state_offset_tile)."""
    if state_offset is None:
        return None
    operand = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
    return (lin_scale * state_offset).to(operand).contiguous()


def state_scan(roles, y, p, *, reverse, causal, lin_scale, store_total=False):
    """(states, total): the (B, num_chunks or num_docs, S, E) float32 states of X^T Y and,
    with store_total, the (B, num_docs, S, E) totals (kernels/chunk_state.py). Forward,
    X = k_lin and Y = v; reverse (the backward), X = q_lin and Y = dO."""
    x, role = (roles.q_lin, LIN_Q) if reverse else (roles.k_lin, LIN_K)
    B, T, S = x.shape
    E = y.shape[-1]
    cfg = p.config
    num_states = p.num_chunks if causal else p.num_docs
    states = new_buffer((B, num_states, S, E), torch.float32, x.device)
    total = new_buffer((B, p.num_docs, S, E), torch.float32, x.device) if store_total else None
    grid = (B * p.num_docs * cdiv(S, cfg.state_block_s) * cdiv(E, cfg.state_block_e),)
    (stride_xb, stride_xt), (stride_yb, stride_yt) = row_strides(x), row_strides(y)
    launch(
        chunk_state_scan_kernel,
        grid,
        dict(
            x_ptr=x,
            affine_ptr=roles.affine,
            y_ptr=y,
            states_ptr=states,
            total_ptr=total,
            cu_seqlens_ptr=p.tables.cu_seqlens if p.tables else None,
            chunk_offsets_ptr=p.tables.chunk_offsets if p.tables else None,
            stride_xb=stride_xb,
            stride_xt=stride_xt,
            stride_yb=stride_yb,
            stride_yt=stride_yt,
            T=T,
            S=S,
            E=E,
            chunk_size=p.chunk_size,
            num_states=num_states,
            num_docs=p.num_docs,
            lin_scale=lin_scale,
        ),
        dict(
            X_ROLE=role,
            FROM_Z=roles.fused,
            REVERSE=reverse,
            CAUSAL=causal,
            IS_VARLEN=p.tables is not None,
            STORE_TOTAL=store_total,
            BLOCK_T=cfg.state_block_t,
            BLOCK_S=cfg.state_block_s,
            BLOCK_E=cfg.state_block_e,
            DOT_PRECISION=dot_precision(x.dtype, x.device),
        ),
        num_warps=4,
        num_stages=2,
    )
    return states, total
