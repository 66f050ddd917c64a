"""Triton backend of mixed chunk attention: the kernels registered as PyTorch custom ops
(flash_kernels::mixed_chunk_fwd / _bwd, with fake implementations and an autograd formula, so
torch.compile traces them without a graph break), and the design of the kernels.

Inputs are (B, T, W) views with unit feature stride; batch and token strides go to the kernels,
so slices of a fused projection are not copied. The launches are in forward.py and backward.py
(tiles: kernel_config.py); `problem.Roles` lets flash_attention reuse them with z in place of
the four role tensors (fused.py).

Design (numbers for the paper shape: S = 128, E = 1536, C = 256, causal, bf16, per token)

Work. The quadratic part costs C (S + E) = 426 kflop per token causal (2 C (S + E) dense), the
linear part 2 S E = 393 kflop for the output plus 2 S E for the state. The kernels read the
inputs (4 S + E) * 2 B = 4.1 KB and write E * 2 B = 3.1 KB per token, so the forward runs at
~170 flop/byte: compute bound on an H100 (~990 Tflop/s bf16, 3.35 TB/s: ridge ~300 flop/byte
for DRAM, far lower for L2-resident tiles), hence the plan is to keep tensor cores busy.

Forward = a sequential state pass + a parallel output pass (not one fused kernel):
- `chunk_state_scan_kernel` walks the chunks in order per (batch, S tile, E tile) and stores
  each float32 state P_g before adding chunk g (the exclusive cumsum). Its parallelism is
  B * (S / 64) * (E / 64) = 48 programs per sequence at the paper shape, each a chain of
  T / C small (64 x 64 x 256) products: 2 S E flop per token (a third of the forward's), and
  its output, S E * 4 B / C = 3 KB per token, is about one input's size.
  A single fused kernel would have to run the chunks of a sequence one after another in one
  program (T / C = 256 steps at 64K tokens) with only B * E / 64 programs: on a 132-SM GPU
  that leaves most of the machine idle, which is why the state pass is split off.
- `mixed_chunk_fwd_kernel`, one program per (chunk, 64 query rows), forms relu^2(S) for its
  rows against all C keys of the chunk ONCE (two 64 x 128 tiles, fp32 then rounded to bf16:
  32 KB) and loops over the 24 value tiles of 64 columns: out = A V + q_lin P. Public chunked
  linear-attention kernels recompute q k^T for each value tile: with E / 64 = 24 tiles that is
  24 x 2 * 64 * 256 * 128 flop per program against 2 * 64 * 256 * 1536 for A V, i.e. twice
  the useful work again; here the scores cost 1/12 of A V. Holding the whole chunk costs the
  causal upper triangle: query block m needs (m + 1) * 64 keys; with the chunk held as two
  128-key tiles and the second skipped by blocks before it, 12 units of 64 keys are computed
  where 10 are needed (1.2x on the quadratic flops; one 256-wide tile would be 1.6x).
- Chunks longer than 256 (chunk_size=None, full GAU attention) do not fit one tile; there
  the program loops over key tiles up to the diagonal for each value tile (recomputing scores,
  memory O(T)).

Backward = a reverse state scan (D_g, float32) + two parallel kernels, no atomics:
- `mixed_chunk_bwd_query_kernel` per (chunk, query block): dA = dO V^T (the E-wide product),
  dS, dq_quad, dq_lin, the diagonal sums of dS for drel_bias, and dS itself in float32
  (C * 4 B = 1 KB per token) for chunks up to 256 tokens;
- `mixed_chunk_bwd_key_kernel` per (chunk, key block): dk_quad from the stored dS (no second
  dA: that would add another E-wide product, +40% backward flops), dv = A^T dO + k_lin D with
  A^T formed once per chunk like the forward, and dk_lin = V D^T.

Resources, compiled ahead of time for sm_90 at the paper shape (bench/results/compile_report.md,
Triton 3.9): every kernel uses wgmma, none spills, 206-250 registers at 8 warps, shared memory
at most 113 KB (limit 227 KB). Three measured choices got there: 8 warps (4 spill), the
chunk held as two key tiles, and the bias read as a (C, C) Toeplitz-matrix tile instead of a
(2C - 1,) gather (a gather needs a 64-bit address per element: 200-500 bytes of spills).

Precision: all products accumulate in fp32; scores and relu^2 are formed in fp32; states are
fp32. For bf16 inputs the weights relu^2(S) and the states are rounded to bf16 at the tensor-core
operand (as FlashAttention rounds its probabilities); for fp16 they stay fp32 (relu^2 overflows
fp16 once s > 255) and those products use tf32; fp32 inputs follow
torch.backends.cuda.matmul.allow_tf32 ("ieee" when it is False).
"""

from typing import List, Optional, Tuple

import torch

from ...core.packing import ChunkTables
from ...core.validation import check_triton_inputs
from .backward import BackwardNeeds, mixed_chunk_backward
from .forward import mixed_chunk_forward
from .launch import cdiv, feature_contiguous
from .problem import Roles

# The kernels are registered as PyTorch custom ops (forward and backward), with fake (meta)
# implementations and an autograd formula, so torch.compile(fullgraph=True) traces through
# them without a graph break and torch.library.opcheck can verify them. Packed documents enter
# as their three index tables (core.packing.chunk_tables, computed outside so that torch.compile
# sees plain tensor code), the state offset as an optional (B, N, S, E) float32 tensor.


def tables_from(cu_seqlens, chunk_offsets, chunk_table):
    """core.packing.ChunkTables from the custom ops' three table arguments (all None: dense)."""
    if cu_seqlens is None:
        return None
    return ChunkTables(
        cu_seqlens, chunk_offsets, chunk_table, cu_seqlens.shape[0] - 1, chunk_table.shape[0]
    )


def state_shapes(B, T, S, E, chunk_size, causal, has_linear, store_total, cu_seqlens, chunk_table):
    """Shapes of the forward's states and totals ((0,) when absent), from shapes alone."""
    if not has_linear:
        return (0,), (0,)
    num_docs = cu_seqlens.shape[0] - 1 if cu_seqlens is not None else 1
    if causal:
        num_states = chunk_table.shape[0] if chunk_table is not None else cdiv(T, chunk_size)
    else:
        num_states = num_docs
    return (B, num_states, S, E), ((B, num_docs, S, E) if store_total else (0,))


@torch.library.custom_op("flash_kernels::mixed_chunk_fwd", mutates_args=())
def mixed_chunk_fwd_op(
    q_quad: torch.Tensor,
    k_quad: torch.Tensor,
    q_lin: Optional[torch.Tensor],
    k_lin: Optional[torch.Tensor],
    v: torch.Tensor,
    rel_bias: Optional[torch.Tensor],
    cu_seqlens: Optional[torch.Tensor],
    chunk_offsets: Optional[torch.Tensor],
    chunk_table: Optional[torch.Tensor],
    state_offset: Optional[torch.Tensor],
    chunk_size: int,
    causal: bool,
    quad_scale: Optional[float],
    lin_scale: Optional[float],
    store_total: bool,
) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, states, total): states are the float32 forward states (empty without a linear
    part), total the per-document totals when store_total (else empty). rel_bias is float32."""
    out, _, states, total = mixed_chunk_forward(
        Roles(q_quad, k_quad, q_lin, k_lin),
        v,
        rel_bias,
        chunk_size,
        causal,
        quad_scale,
        lin_scale,
        tables=tables_from(cu_seqlens, chunk_offsets, chunk_table),
        state_offset=state_offset,
        store_total=store_total,
    )
    empty = v.new_empty(0, dtype=torch.float32)
    return (
        out,
        states if states is not None else empty,
        total if total is not None else empty.clone(),
    )


@mixed_chunk_fwd_op.register_fake
def _(
    q_quad,
    k_quad,
    q_lin,
    k_lin,
    v,
    rel_bias,
    cu_seqlens,
    chunk_offsets,
    chunk_table,
    state_offset,
    chunk_size,
    causal,
    quad_scale,
    lin_scale,
    store_total,
):
    B, T, S = q_quad.shape
    states, total = state_shapes(
        B,
        T,
        S,
        v.shape[-1],
        chunk_size,
        causal,
        q_lin is not None,
        store_total,
        cu_seqlens,
        chunk_table,
    )
    return (
        v.new_empty(v.shape),
        v.new_empty(states, dtype=torch.float32),
        v.new_empty(total, dtype=torch.float32),
    )


@torch.library.custom_op("flash_kernels::mixed_chunk_bwd", mutates_args=())
def mixed_chunk_bwd_op(
    grad_out: torch.Tensor,
    grad_total: Optional[torch.Tensor],
    q_quad: torch.Tensor,
    k_quad: torch.Tensor,
    q_lin: Optional[torch.Tensor],
    k_lin: Optional[torch.Tensor],
    v: torch.Tensor,
    rel_bias: Optional[torch.Tensor],
    states: torch.Tensor,
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
    """Gradients of (q_quad, k_quad, q_lin, k_lin, v, rel_bias, state_offset) (the fields of
    BackwardNeeds, whose values `needs` lists); an empty tensor where `needs` is False or the
    input is absent."""
    grads = mixed_chunk_backward(
        grad_out.contiguous(),
        Roles(q_quad, k_quad, q_lin, k_lin),
        v,
        rel_bias,
        states if q_lin is not None else None,
        chunk_size,
        causal,
        quad_scale,
        lin_scale,
        BackwardNeeds(*needs),
        tables=tables_from(cu_seqlens, chunk_offsets, chunk_table),
        state_offset=state_offset,
        grad_total=grad_total.contiguous() if grad_total is not None else None,
    )
    return [g if g is not None else v.new_empty(0) for g in grads]


@mixed_chunk_bwd_op.register_fake
def _(
    grad_out,
    grad_total,
    q_quad,
    k_quad,
    q_lin,
    k_lin,
    v,
    rel_bias,
    states,
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
    like = (q_quad, k_quad, q_lin, k_lin, v, rel_bias, state_offset)
    return [
        x.new_empty(x.shape) if need and x is not None else v.new_empty(0)
        for x, need in zip(like, needs)
    ]


#: mixed_chunk_fwd_op's inputs by name, in order: the autograd formula maps them to
#: BackwardNeeds and back.
_FORWARD_INPUTS = (
    "q_quad",
    "k_quad",
    "q_lin",
    "k_lin",
    "v",
    "rel_bias",
    "cu_seqlens",
    "chunk_offsets",
    "chunk_table",
    "state_offset",
    "chunk_size",
    "causal",
    "quad_scale",
    "lin_scale",
    "store_total",
)


def _mixed_chunk_setup_context(ctx, inputs, output):
    (
        q_quad,
        k_quad,
        q_lin,
        k_lin,
        v,
        rel_bias,
        cu_seqlens,
        chunk_offsets,
        chunk_table,
        state_offset,
        chunk_size,
        causal,
        quad_scale,
        lin_scale,
        store_total,
    ) = inputs
    ctx.save_for_backward(
        q_quad,
        k_quad,
        q_lin,
        k_lin,
        v,
        rel_bias,
        output[1],
        cu_seqlens,
        chunk_offsets,
        chunk_table,
        state_offset,
    )
    ctx.options = (chunk_size, causal, quad_scale, lin_scale)
    ctx.store_total = store_total


def _mixed_chunk_backward(ctx, grad_out, grad_states, grad_total):
    (
        q_quad,
        k_quad,
        q_lin,
        k_lin,
        v,
        rel_bias,
        states,
        cu_seqlens,
        chunk_offsets,
        chunk_table,
        state_offset,
    ) = ctx.saved_tensors
    need = dict(zip(_FORWARD_INPUTS, ctx.needs_input_grad))
    needs = BackwardNeeds(*(bool(need[name]) for name in BackwardNeeds._fields))
    grads = mixed_chunk_bwd_op(
        grad_out,
        grad_total if ctx.store_total else None,
        q_quad,
        k_quad,
        q_lin,
        k_lin,
        v,
        rel_bias,
        states,
        cu_seqlens,
        chunk_offsets,
        chunk_table,
        state_offset,
        *ctx.options,
        list(needs),
    )
    by_name = {
        name: grad if wanted else None
        for name, grad, wanted in zip(BackwardNeeds._fields, grads, needs)
    }
    return tuple(by_name.get(name) for name in _FORWARD_INPUTS)


mixed_chunk_fwd_op.register_autograd(
    _mixed_chunk_backward, setup_context=_mixed_chunk_setup_context
)


def packed_arguments(tables):
    """The custom ops' three table arguments of core.packing.ChunkTables (None: dense)."""
    if tables is None:
        return None, None, None
    return tables.cu_seqlens, tables.chunk_offsets, tables.chunk_table


def mixed_chunk_attention_triton(
    q_quad,
    k_quad,
    q_lin,
    k_lin,
    v,
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
    """Inputs with one flattened batch dim (B, T, S) / (B, T, E); resolved chunk size, scales
    left None for the default 1 / chunk_size (resolve_scales). tables: packed documents;
    state_offset: (B, num_docs, S, E) unscaled initial state. Returns (out, total) with total
    the (B, num_docs, S, E) float32 sums over each document's complete chunks when store_total,
    else None."""
    check_triton_inputs(q_quad, v)
    views = [feature_contiguous(x) for x in (q_quad, k_quad, q_lin, k_lin, v)]
    # float32 and contiguous (the long-chunk kernels read it through a raw pointer); the
    # conversion is differentiable, so its gradient comes back in rel_bias's dtype.
    bias32 = rel_bias.float().contiguous() if rel_bias is not None else None
    offset32 = state_offset.float().contiguous() if state_offset is not None else None
    out, _, total = mixed_chunk_fwd_op(
        *views,
        bias32,
        *packed_arguments(tables),
        offset32,
        chunk_size,
        causal,
        quad_scale,
        lin_scale,
        store_total,
    )
    return out, (total if store_total else None)
