"""Triton backend of mixed chunk attention: tile configuration, launch helpers, and the
kernels registered as PyTorch custom ops (flash_kernels::mixed_chunk_fwd / _bwd, with fake
implementations and an autograd formula, so torch.compile traces them without a graph break).
Inputs are (B, T, W) views with unit feature stride; batch and token strides go to the kernels,
so slices of a fused projection are not copied. `Roles` lets flash_attention reuse everything
with z in place of the four role tensors (triton_flash_attention.py).

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
import contextlib
from dataclasses import dataclass
from typing import List, Optional, Tuple

import torch

from .gpu_target import current_target, planned_dtype
from .kernels.chunk_state import chunk_state_scan_kernel
from .kernels.mixed_chunk_bwd import mixed_chunk_bwd_key_kernel, mixed_chunk_bwd_query_kernel
from .kernels.mixed_chunk_fwd import mixed_chunk_fwd_kernel
from .packing import ChunkTables
from .torch_chunked import toeplitz_bias
from .utils import (INTERPRETED_KERNELS, TRITON_MAX_S, functorch_transform_active, launch,
                    new_buffer, next_power_of_2, resolve_scales, triton_interpret_enabled)

MAX_HOIST_KEYS = 256  # longest chunk whose relu^2 weights are formed once per query block


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes of one problem on one target. Each per-chunk kernel has its own row block
    (queries for the forward and the query backward, keys for the key backward), warps and
    value-tile width; the chunk is held as two key (or query) tiles of `block_n` when hoisted."""
    fwd_block: int
    fwd_warps: int
    fwd_stages: int
    fwd_block_e: int          # the forward's value tile, dense and unfused
    narrow_fwd_block_e: int   # ... when causal or fused (roles from z, gate)
    query_block: int          # the query backward (also the drel_bias segment length)
    query_warps: int
    query_block_e: int        # its dA = dO V^T reduces over E in these steps
    key_block: int            # the key backward
    key_warps: int
    key_block_e: int
    block_n: int              # key tile of the forward, query tile of the key backward
    block_s: int
    hoist: bool               # relu^2 weights formed once per program (chunk <= MAX_HOIST_KEYS)
    state_block_s: int
    state_block_e: int
    state_block_t: int


_config_override: dict = {}


@contextlib.contextmanager
def tile_override(**fields):
    """Force tile sizes inside the block (tests): `block` (every kernel's row block),
    `max_hoist_keys`, `block_e` (every value tile), `state_block_t`. Small tiles give short test
    sequences several blocks per chunk, and `max_hoist_keys` forces the long-chunk path."""
    saved = dict(_config_override)
    _config_override.update(fields)
    try:
        yield
    finally:
        _config_override.clear()
        _config_override.update(saved)


#: Targets with less shared memory per block than this (A10, L4, L40S, RTX 30/40/50: 99 KB;
#: AMD Instinct: 64 KB) get the smaller tiles below.
LARGE_SHARED_MEMORY_BYTES = 160 * 1024


def kernel_config(chunk_len, S, E, dtype=torch.bfloat16, target=None):
    """Tile sizes for chunks of `chunk_len` tokens of `dtype` inputs on `target`
    (gpu_target.GpuTarget; default: an H100). The one place tiles are chosen per architecture.

    Measured ahead of time (tools/aot_compile.py; bench/results/compile_report.md) at the paper
    shape (S = 128, E = 1536, C = 256):
    - bf16 on sm_90: 64-row blocks at 8 warps (4 warps spill), the forward's value tile 64
      dense and 32 causal or fused (the non-finite guard, roles from z and the gate made 64
      spill), the query backward's dA in 16-column steps (32 spilled with Triton 3.6);
    - fp16 and fp32 inputs use float32 tensor-core operands for the relu^2 weights (and fp32
      everywhere), twice the bytes: the forward at one pipeline stage with 32-column value tiles
      (two stages asked 121-225 KB and spilled), the query backward in 32-row blocks at 4 warps
      (64 rows spilled 136-224 bytes);
    - targets with less than LARGE_SHARED_MEMORY_BYTES per block: the forward's value tile is
      32 for every dtype (64 asked 112 KB in bf16, over the 99 KB of sm_86/89/120), and fp16 /
      fp32 run the forward and the key backward in 32-row blocks at 4 warps (64 rows asked
      112-128 KB).
    Tests may override fields (`tile_override`)."""
    chunk_pow2 = max(16, next_power_of_2(chunk_len))
    small_shared = target is not None and target.shared_memory_bytes < LARGE_SHARED_MEMORY_BYTES
    wide_operands = dtype != torch.bfloat16           # float32 weights at the tensor cores
    block = min(64, chunk_pow2)
    narrow_block = min(32, chunk_pow2)
    fwd_block = key_block = narrow_block if (wide_operands and small_shared) else block
    query_block = narrow_block if wide_operands else block
    if "block" in _config_override:
        fwd_block = key_block = query_block = _config_override["block"]
    max_hoist = _config_override.get("max_hoist_keys", MAX_HOIST_KEYS)
    hoist = chunk_pow2 <= max_hoist
    block_s = max(16, next_power_of_2(S))
    block_e = _config_override.get("block_e", min(64, max(16, next_power_of_2(E))))
    narrow_e = min(32, block_e)

    def warps(rows):
        return 8 if rows >= 64 else 4

    return KernelConfig(
        fwd_block=fwd_block, fwd_warps=warps(fwd_block), fwd_stages=1 if wide_operands else 2,
        fwd_block_e=narrow_e if (wide_operands or small_shared) else block_e,
        narrow_fwd_block_e=narrow_e,
        query_block=query_block, query_warps=warps(query_block),
        query_block_e=min(16, block_e) if query_block >= 64 else block_e,
        key_block=key_block, key_warps=warps(key_block), key_block_e=block_e,
        block_n=max(16, chunk_pow2 // 2) if hoist else block,
        block_s=block_s, hoist=hoist,
        state_block_s=min(64, block_s), state_block_e=min(64, max(16, next_power_of_2(E))),
        state_block_t=_config_override.get("state_block_t", 64))


def _dot_precision(dtype, device):
    """How the float32 dots run: tf32 unless fp32 inputs ask otherwise
    (torch.backends.cuda.matmul.allow_tf32 False) or the target has no tf32 (CDNA 2: gfx90a)."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32" if current_target(device).has_tf32 else "ieee"


def triton_cdiv(a, b):
    return -(-a // b)


@dataclass
class Roles:
    """Where the kernels read the four roles (quad_q, quad_k, lin_q, lin_k).

    Either the role tensors themselves (mixed_chunk_attention), or z for all four with
    `affine` the float32 (2, 4, S) stack [gamma; beta] (flash_attention forms the roles on the
    fly). `q_lin is None` means quadratic attention only.
    """
    q_quad: torch.Tensor
    k_quad: torch.Tensor
    q_lin: torch.Tensor = None
    k_lin: torch.Tensor = None
    affine: torch.Tensor = None

    @property
    def from_z(self):
        return self.affine is not None

    @property
    def has_linear(self):
        return self.q_lin is not None


def row_strides(x):
    """(batch stride, token stride) of a (B, T, W) view whose features are contiguous."""
    return x.stride(0), x.stride(1)


def feature_contiguous(x):
    """x itself when its last dim has unit stride (the kernels take batch and token strides,
    so slices of a fused projection need no copy), else a contiguous copy."""
    return x if x is None or x.stride(-1) == 1 else x.contiguous()


def _state_scan(x, y, affine, x_role, p, *, causal, reverse, lin_scale, store_total=False):
    """(states, total): the (B, num_chunks or num_docs, S, E) float32 states and, with
    store_total, the (B, num_docs, S, E) totals; see kernels/chunk_state.py."""
    B, T, S = x.shape
    E = y.shape[-1]
    cfg = p.config
    num_states = p.num_chunks if causal else p.num_docs
    states = new_buffer((B, num_states, S, E), torch.float32, x.device)
    total = new_buffer((B, p.num_docs, S, E), torch.float32, x.device) if store_total else None
    grid = (B * p.num_docs * triton_cdiv(S, cfg.state_block_s) * triton_cdiv(E, cfg.state_block_e),)
    (stride_xb, stride_xt), (stride_yb, stride_yt) = row_strides(x), row_strides(y)
    launch(chunk_state_scan_kernel, grid,
           dict(x_ptr=x, affine_ptr=affine, y_ptr=y, states_ptr=states, total_ptr=total,
                cu_seqlens_ptr=p.tables.cu_seqlens if p.tables else None,
                chunk_offsets_ptr=p.tables.chunk_offsets if p.tables else None,
                stride_xb=stride_xb, stride_xt=stride_xt, stride_yb=stride_yb, stride_yt=stride_yt,
                T=T, S=S, E=E, chunk_size=p.chunk_size, num_states=num_states,
                num_docs=p.num_docs, lin_scale=lin_scale),
           dict(X_ROLE=x_role, FROM_Z=affine is not None, REVERSE=reverse, CAUSAL=causal,
                IS_VARLEN=p.tables is not None, STORE_TOTAL=store_total,
                BLOCK_T=cfg.state_block_t, BLOCK_S=cfg.state_block_s,
                BLOCK_E=cfg.state_block_e, DOT_PRECISION=_dot_precision(x.dtype, x.device)),
           num_warps=4, num_stages=2)
    return states, total


class Problem:
    """Sizes shared by the forward and backward launches. `tables` (packing.ChunkTables) when
    the sequence packs several documents: the kernels then run one program per chunk slot."""

    def __init__(self, q_quad, v, chunk_size, tables=None):
        self.B, self.T, self.S = q_quad.shape
        self.E = v.shape[-1]
        self.chunk_size = chunk_size
        self.chunk_len = min(chunk_size, self.T)       # no chunk is longer
        self.tables = tables
        self.num_chunks = tables.num_slots if tables else triton_cdiv(self.T, chunk_size)
        self.num_docs = tables.num_docs if tables else 1
        self.config = kernel_config(self.chunk_len, self.S, self.E,
                                    planned_dtype(v.dtype, v.device), current_target(v.device))

    def num_blocks(self, block):
        """Row blocks of `block` rows per chunk."""
        return triton_cdiv(self.chunk_len, block)

    def grid(self, block):
        """One program per (batch, chunk slot, row block of `block` rows)."""
        return (self.B * self.num_chunks * self.num_blocks(block),)

    def chunk_args(self):
        """The kernels' chunk-geometry arguments (common.program_chunk_block)."""
        tables = self.tables
        return dict(chunk_table_ptr=tables.chunk_table if tables else None,
                    cu_seqlens_ptr=tables.cu_seqlens if tables else None,
                    T=self.T, S=self.S, E=self.E, chunk_size=self.chunk_size,
                    chunk_len=self.chunk_len, num_chunks=self.num_chunks, num_docs=self.num_docs)


def _strides(**tensors):
    """Kernel arguments stride_<name>b, stride_<name>t of each (B, T, W) input (0 when absent)."""
    args = {}
    for name, x in tensors.items():
        batch_stride, token_stride = row_strides(x) if x is not None else (0, 0)
        args[f"stride_{name}b"], args[f"stride_{name}t"] = batch_stride, token_stride
    return args


def _bias_operand(rel_bias, p):
    """What the kernels read for the bias: the (chunk_len, chunk_len) Toeplitz matrix of the
    float32 bias when chunks are short enough to hoist (C^2 floats: 256 KB at C = 256), else
    the (2C - 1,) vector itself (see kernels/common.py, relu_scores_tile)."""
    if rel_bias is None or not p.config.hoist:
        return rel_bias
    return toeplitz_bias(rel_bias, p.chunk_size, p.chunk_len).contiguous()


def forward_state_scan(roles, v, p, *, causal, lin_scale, store_total=False):
    """The forward's state pass (states, total): P_g of every chunk (causal) or of every
    document (non-causal), float32 with lin_scale folded in, and with store_total the unscaled
    per-document totals (chunk_state.py, STORE_TOTAL). The output launch needs the states;
    context parallelism sends the totals to the other ranks between the two launches."""
    return _state_scan(roles.k_lin, v, roles.affine, 3, p, causal=causal, reverse=False,
                       lin_scale=lin_scale, store_total=store_total)


def _offset_operand(state_offset, lin_scale, dtype):
    """What the kernels read for a state offset: lin_scale * offset in the tensor-core operand
    dtype (bf16 for bf16 inputs, else float32; see kernels/common.py, state_offset_tile)."""
    if state_offset is None:
        return None
    operand = torch.bfloat16 if dtype == torch.bfloat16 else torch.float32
    return (lin_scale * state_offset).to(operand).contiguous()


def forward_output(roles, v, rel_bias, p, *, causal, quad_scale, lin_scale, states,
                   state_offset=None, gate=None, store_attn=False):
    """The forward's output launch: (out, attn or None) from the states of forward_state_scan
    (None without a linear part) plus, with state_offset, lin_scale * state_offset[b, doc]
    (common.state_offset_tile). Scales are resolved numbers."""
    cfg = p.config
    bias = _bias_operand(rel_bias, p)
    out = new_buffer((p.B, p.T, p.E), v.dtype, v.device)
    attn = new_buffer((p.B, p.T, p.E), v.dtype, v.device) if store_attn else None
    launch(mixed_chunk_fwd_kernel, p.grid(cfg.fwd_block),
           dict(q_quad_ptr=roles.q_quad, k_quad_ptr=roles.k_quad, q_lin_ptr=roles.q_lin,
                affine_ptr=roles.affine, states_ptr=states,
                state_offset_ptr=_offset_operand(state_offset, lin_scale, v.dtype), v_ptr=v, rel_bias_ptr=bias, gate_ptr=gate, out_ptr=out, attn_ptr=attn,
                **_strides(q=roles.q_quad, k=roles.k_quad, ql=roles.q_lin, v=v, g=gate),
                **p.chunk_args(), num_query_blocks=p.num_blocks(cfg.fwd_block),
                quad_scale=quad_scale),
           dict(FROM_Z=roles.from_z, HAS_GATE=gate is not None, STORE_ATTN=store_attn,
                HAS_LINEAR=roles.has_linear,
                HAS_STATE_OFFSET=roles.has_linear and state_offset is not None,
                HAS_BIAS=bias is not None, BIAS_MATRIX=cfg.hoist, CAUSAL=causal,
                HOIST_SCORES=cfg.hoist, IS_VARLEN=p.tables is not None, BLOCK_M=cfg.fwd_block,
                BLOCK_N=cfg.block_n, BLOCK_S=cfg.block_s,
                BLOCK_E=cfg.narrow_fwd_block_e if causal or roles.from_z else cfg.fwd_block_e,
                DOT_PRECISION=_dot_precision(v.dtype, v.device)),
           num_warps=cfg.fwd_warps, num_stages=cfg.fwd_stages)
    return out, attn


def mixed_chunk_forward(roles, v, rel_bias, chunk_size, causal, quad_scale, lin_scale, *,
                        tables=None, state_offset=None, store_total=False, gate=None,
                        store_attn=False):
    """Launch the forward: returns (out, attn or None, states or None, total or None).

    out = gate * attention when a gate is given (else the attention); with store_attn the
    ungated attention is also returned (the gate's gradient needs it). tables: packed
    documents (packing.ChunkTables). state_offset: (B, num_docs, S, E) float32, the unscaled
    state every chunk of a document starts from (see common.state_offset_tile). store_total:
    also return the scan's per-document totals (chunk_state.py, STORE_TOTAL).
    """
    quad_scale, lin_scale = (float(x) for x in resolve_scales(quad_scale, lin_scale, chunk_size))
    p = Problem(roles.q_quad, v, chunk_size, tables)
    states = total = None
    if roles.has_linear:
        states, total = forward_state_scan(roles, v, p, causal=causal, lin_scale=lin_scale,
                                           store_total=store_total)
    out, attn = forward_output(roles, v, rel_bias, p, causal=causal, quad_scale=quad_scale,
                               lin_scale=lin_scale, states=states, state_offset=state_offset,
                               gate=gate, store_attn=store_attn)
    return out, attn, states, total


def _rel_bias_grad(dbias_partial, chunk_size, block):
    """Sum the per-program diagonal segments into the (2C - 1,) bias gradient.

    Segment slot t (s = t - (num_blocks - 1)) position p holds offset
    o = s * block - (block - 1) + p, so the flattened slots are consecutive offsets starting at
    -(num_blocks - 1) * block - (block - 1).
    """
    num_blocks = dbias_partial.shape[2]
    flat = dbias_partial.sum(dim=(0, 1, 2)).reshape(-1)          # deterministic reduction
    first_offset = -(num_blocks - 1) * block - (block - 1)
    grad = flat.new_zeros(2 * chunk_size - 1)
    lo = max(first_offset, -(chunk_size - 1))
    hi = min(first_offset + flat.numel() - 1, chunk_size - 1)
    grad[lo + chunk_size - 1: hi + chunk_size] = flat[lo - first_offset: hi - first_offset + 1]
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
    `needs` = which of (q_quad, k_quad, q_lin, k_lin, v, rel_bias, state_offset) need a gradient.
    Role gradients are written in `role_grad_dtype` (default v's dtype).
    """

    def __init__(self, grad_out, roles, v, rel_bias, chunk_size, causal, quad_scale, lin_scale,
                 needs, *, tables=None, role_grad_dtype=None):
        self.quad_scale, self.lin_scale = (
            float(x) for x in resolve_scales(quad_scale, lin_scale, chunk_size))
        self.p = p = Problem(roles.q_quad, v, chunk_size, tables)
        self.grad_out, self.roles, self.v, self.causal = grad_out, roles, v, causal
        self.bias = _bias_operand(rel_bias, p)
        (self.need_dq_quad, self.need_dk_quad, need_dq_lin, need_dk_lin, self.need_dv,
         self.need_dbias, need_doffset) = needs
        self.need_dq_lin = need_dq_lin and roles.has_linear
        self.need_dk_lin = need_dk_lin and roles.has_linear
        self.need_doffset = need_doffset and roles.has_linear
        self.store_ds = p.config.hoist and self.need_dk_quad
        self.need_ds = self.need_dq_quad or self.need_dbias or self.store_ds
        self.role_grad_dtype = role_grad_dtype or v.dtype
        self.dot_precision = _dot_precision(v.dtype, v.device)
        self.dq_quad = self.dq_lin = self.dk_quad = self.dk_lin = self.dv = None
        self.ds = self.dbias_partial = None

    @property
    def needs_reverse_states(self):
        """Whether any gradient needs the reverse states D (or their totals)."""
        return self.roles.has_linear and (self.need_dk_lin or self.need_dv or self.need_doffset)

    def query_side(self, states, state_offset):
        p, cfg, roles, v = self.p, self.p.config, self.roles, self.v
        shape_s = (p.B, p.T, p.S)
        device = v.device
        if self.need_dq_quad:
            self.dq_quad = new_buffer(shape_s, self.role_grad_dtype, device)
        if self.need_dq_lin:
            self.dq_lin = new_buffer(shape_s, self.role_grad_dtype, device)
        if self.store_ds:
            self.ds = new_buffer((p.B, p.num_chunks, p.chunk_len, p.chunk_len), torch.float32,
                                 device)
        block, num_blocks = cfg.query_block, p.num_blocks(cfg.query_block)
        if not self.store_ds and self.need_dbias:
            self.ds = new_buffer((p.grid(block)[0], block, block), torch.float32, device)
        if self.need_dbias:
            self.dbias_partial = new_buffer(
                (p.B, p.num_chunks, num_blocks, 2 * num_blocks, block), torch.float32, device)
        if not (self.need_ds or self.need_dq_lin):
            return
        need_dq_lin = self.need_dq_lin
        launch(mixed_chunk_bwd_query_kernel, p.grid(block),
               dict(q_quad_ptr=roles.q_quad, k_quad_ptr=roles.k_quad, affine_ptr=roles.affine,
                    v_ptr=v, grad_out_ptr=self.grad_out,
                    states_ptr=states if need_dq_lin else None,
                    state_offset_ptr=_offset_operand(state_offset, self.lin_scale, v.dtype)
                    if need_dq_lin else None,
                    rel_bias_ptr=self.bias, dq_quad_ptr=self.dq_quad, dq_lin_ptr=self.dq_lin,
                    ds_ptr=self.ds, dbias_partial_ptr=self.dbias_partial,
                    **_strides(q=roles.q_quad, k=roles.k_quad, v=v), **p.chunk_args(),
                    num_blocks=num_blocks, quad_scale=self.quad_scale),
               dict(FROM_Z=roles.from_z, HAS_BIAS=self.bias is not None, BIAS_MATRIX=cfg.hoist,
                    CAUSAL=self.causal,
                    HAS_STATE_OFFSET=need_dq_lin and state_offset is not None,
                    IS_VARLEN=p.tables is not None, NEED_DS=self.need_ds,
                    NEED_DQ_QUAD=self.need_dq_quad, NEED_DQ_LIN=need_dq_lin,
                    STORE_DS=self.store_ds, NEED_DBIAS=self.need_dbias,
                    BLOCK=block, BLOCK_S=cfg.block_s, BLOCK_E=cfg.query_block_e,
                    DOT_PRECISION=self.dot_precision),
               num_warps=cfg.query_warps, num_stages=1)

    def reverse_scan(self, store_total):
        """(dstates, total or None): see chunk_state.py (REVERSE)."""
        return _state_scan(self.roles.q_lin, self.grad_out, self.roles.affine, 2, self.p,
                           causal=self.causal, reverse=True, lin_scale=self.lin_scale,
                           store_total=store_total)

    def key_side(self, dstates, grad_total):
        p, cfg, roles, v = self.p, self.p.config, self.roles, self.v
        need_dk_quad, need_dk_lin, need_dv = self.need_dk_quad, self.need_dk_lin, self.need_dv
        shape_s = (p.B, p.T, p.S)
        if need_dk_quad:
            self.dk_quad = new_buffer(shape_s, self.role_grad_dtype, v.device)
        if need_dk_lin:
            self.dk_lin = new_buffer(shape_s, self.role_grad_dtype, v.device)
        if need_dv:
            self.dv = new_buffer(v.shape, v.dtype, v.device)
        if not (need_dk_quad or need_dk_lin or need_dv):
            return
        has_linear = dstates is not None and (need_dk_lin or need_dv)
        launch(mixed_chunk_bwd_key_kernel, p.grid(cfg.key_block),
               dict(q_quad_ptr=roles.q_quad, k_quad_ptr=roles.k_quad,
                    k_lin_ptr=roles.k_lin if has_linear else None,
                    affine_ptr=roles.affine, v_ptr=v, grad_out_ptr=self.grad_out,
                    dstates_ptr=dstates if has_linear else None,
                    dstate_offset_ptr=grad_total if has_linear else None,
                    rel_bias_ptr=self.bias, ds_ptr=self.ds if self.store_ds else None,
                    dk_quad_ptr=self.dk_quad, dk_lin_ptr=self.dk_lin, dv_ptr=self.dv,
                    **_strides(q=roles.q_quad, k=roles.k_quad, kl=roles.k_lin, v=v),
                    **p.chunk_args(), num_blocks=p.num_blocks(cfg.key_block),
                    quad_scale=self.quad_scale),
               dict(FROM_Z=roles.from_z, HAS_LINEAR=has_linear,
                    HAS_BIAS=self.bias is not None, BIAS_MATRIX=cfg.hoist, CAUSAL=self.causal,
                    HAS_DSTATE_OFFSET=has_linear and grad_total is not None,
                    IS_VARLEN=p.tables is not None, DS_STORED=self.store_ds,
                    HOIST_SCORES=cfg.hoist, NEED_DK_QUAD=need_dk_quad, NEED_DK_LIN=need_dk_lin,
                    NEED_DV=need_dv, BLOCK=cfg.key_block, BLOCK_QH=cfg.block_n,
                    BLOCK_S=cfg.block_s, BLOCK_E=cfg.key_block_e,
                    DOT_PRECISION=self.dot_precision),
               num_warps=cfg.key_warps, num_stages=1)

    def gradients(self, doffset=None):
        """(dq_quad, dk_quad, dq_lin, dk_lin, dv, drel_bias, doffset), None where not needed."""
        drel_bias = None
        if self.need_dbias:
            drel_bias = _rel_bias_grad(self.dbias_partial, self.p.chunk_size,
                                       self.p.config.query_block)
        return (self.dq_quad, self.dk_quad, self.dq_lin, self.dk_lin, self.dv, drel_bias,
                doffset)


def mixed_chunk_backward(grad_out, roles, v, rel_bias, states, chunk_size, causal, quad_scale,
                         lin_scale, needs, *, tables=None, state_offset=None, grad_total=None,
                         role_grad_dtype=None):
    """Launch the backward. `needs` = which of (q_quad, k_quad, q_lin, k_lin, v, rel_bias,
    state_offset) need a gradient; returns those gradients (None for the rest). Role gradients
    are written in `role_grad_dtype` (default v's dtype; flash_attention asks for float32 and
    reduces them). grad_total: the gradient reaching the forward's totals (the final state),
    added to the reverse states of the chunks that went into them."""
    launches = BackwardLaunches(grad_out, roles, v, rel_bias, chunk_size, causal, quad_scale,
                                lin_scale, needs, tables=tables, role_grad_dtype=role_grad_dtype)
    launches.query_side(states, state_offset)
    dstates = doffset = None
    if launches.needs_reverse_states:
        # Causal: the scan's totals are d state_offset; non-causal: its one state per document is.
        need_doffset = launches.need_doffset
        dstates, doffset = launches.reverse_scan(store_total=need_doffset and causal)
        if need_doffset and not causal:
            doffset = dstates
    launches.key_side(dstates, grad_total)
    return launches.gradients(doffset)


# The kernels are registered as PyTorch custom ops (forward and backward), with fake (meta)
# implementations and an autograd formula, so torch.compile(fullgraph=True) traces through
# them without a graph break and torch.library.opcheck can verify them. Packed documents enter
# as their three index tables (packing.chunk_tables, computed outside so that torch.compile
# sees plain tensor code), the state offset as an optional (B, N, S, E) float32 tensor.

def tables_from(cu_seqlens, chunk_offsets, chunk_table):
    """packing.ChunkTables from the custom ops' three table arguments (all None: dense)."""
    if cu_seqlens is None:
        return None
    return ChunkTables(cu_seqlens, chunk_offsets, chunk_table, cu_seqlens.shape[0] - 1,
                       chunk_table.shape[0])


def state_shapes(B, T, S, E, chunk_size, causal, has_linear, store_total, cu_seqlens,
                 chunk_table):
    """Shapes of the forward's states and totals ((0,) when absent), from shapes alone."""
    if not has_linear:
        return (0,), (0,)
    num_docs = cu_seqlens.shape[0] - 1 if cu_seqlens is not None else 1
    if causal:
        num_states = chunk_table.shape[0] if chunk_table is not None else triton_cdiv(T, chunk_size)
    else:
        num_states = num_docs
    return (B, num_states, S, E), ((B, num_docs, S, E) if store_total else (0,))


@torch.library.custom_op("flash_kernels::mixed_chunk_fwd", mutates_args=())
def mixed_chunk_fwd_op(q_quad: torch.Tensor, k_quad: torch.Tensor, q_lin: Optional[torch.Tensor],
                       k_lin: Optional[torch.Tensor], v: torch.Tensor,
                       rel_bias: Optional[torch.Tensor], cu_seqlens: Optional[torch.Tensor],
                       chunk_offsets: Optional[torch.Tensor], chunk_table: Optional[torch.Tensor],
                       state_offset: Optional[torch.Tensor], chunk_size: int, causal: bool,
                       quad_scale: Optional[float], lin_scale: Optional[float],
                       store_total: bool) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(out, states, total): states are the float32 forward states (empty without a linear
    part), total the per-document totals when store_total (else empty). rel_bias is float32."""
    out, _, states, total = mixed_chunk_forward(
        Roles(q_quad, k_quad, q_lin, k_lin), v, rel_bias, chunk_size, causal, quad_scale,
        lin_scale, tables=tables_from(cu_seqlens, chunk_offsets, chunk_table),
        state_offset=state_offset, store_total=store_total)
    empty = v.new_empty(0, dtype=torch.float32)
    return out, states if states is not None else empty, total if total is not None else empty.clone()


@mixed_chunk_fwd_op.register_fake
def _(q_quad, k_quad, q_lin, k_lin, v, rel_bias, cu_seqlens, chunk_offsets, chunk_table,
      state_offset, chunk_size, causal, quad_scale, lin_scale, store_total):
    B, T, S = q_quad.shape
    states, total = state_shapes(B, T, S, v.shape[-1], chunk_size, causal, q_lin is not None,
                                 store_total, cu_seqlens, chunk_table)
    return (v.new_empty(v.shape), v.new_empty(states, dtype=torch.float32),
            v.new_empty(total, dtype=torch.float32))


@torch.library.custom_op("flash_kernels::mixed_chunk_bwd", mutates_args=())
def mixed_chunk_bwd_op(grad_out: torch.Tensor, grad_total: Optional[torch.Tensor],
                       q_quad: torch.Tensor, k_quad: torch.Tensor, q_lin: Optional[torch.Tensor],
                       k_lin: Optional[torch.Tensor], v: torch.Tensor,
                       rel_bias: Optional[torch.Tensor], states: torch.Tensor,
                       cu_seqlens: Optional[torch.Tensor], chunk_offsets: Optional[torch.Tensor],
                       chunk_table: Optional[torch.Tensor], state_offset: Optional[torch.Tensor],
                       chunk_size: int, causal: bool, quad_scale: Optional[float],
                       lin_scale: Optional[float], needs: List[bool]) -> List[torch.Tensor]:
    """Gradients of (q_quad, k_quad, q_lin, k_lin, v, rel_bias, state_offset); an empty tensor
    where `needs` is False or the input is absent."""
    grads = mixed_chunk_backward(
        grad_out.contiguous(), Roles(q_quad, k_quad, q_lin, k_lin), v, rel_bias,
        states if q_lin is not None else None, chunk_size, causal, quad_scale, lin_scale, needs,
        tables=tables_from(cu_seqlens, chunk_offsets, chunk_table), state_offset=state_offset,
        grad_total=grad_total.contiguous() if grad_total is not None else None)
    return [g if g is not None else v.new_empty(0) for g in grads]


@mixed_chunk_bwd_op.register_fake
def _(grad_out, grad_total, q_quad, k_quad, q_lin, k_lin, v, rel_bias, states, cu_seqlens,
      chunk_offsets, chunk_table, state_offset, chunk_size, causal, quad_scale, lin_scale, needs):
    like = (q_quad, k_quad, q_lin, k_lin, v, rel_bias, state_offset)
    return [x.new_empty(x.shape)
            if need and x is not None else v.new_empty(0) for x, need in zip(like, needs)]


# Positions in mixed_chunk_fwd_op's inputs of the tensors that may need a gradient.
_DIFFERENTIABLE_INPUTS = (0, 1, 2, 3, 4, 5, 9)


def _mixed_chunk_setup_context(ctx, inputs, output):
    (q_quad, k_quad, q_lin, k_lin, v, rel_bias, cu_seqlens, chunk_offsets, chunk_table,
     state_offset, chunk_size, causal, quad_scale, lin_scale, store_total) = inputs
    ctx.save_for_backward(q_quad, k_quad, q_lin, k_lin, v, rel_bias, output[1], cu_seqlens,
                          chunk_offsets, chunk_table, state_offset)
    ctx.options = (chunk_size, causal, quad_scale, lin_scale)
    ctx.store_total = store_total


def _mixed_chunk_backward(ctx, grad_out, grad_states, grad_total):
    (q_quad, k_quad, q_lin, k_lin, v, rel_bias, states, cu_seqlens, chunk_offsets, chunk_table,
     state_offset) = ctx.saved_tensors
    needs = [bool(ctx.needs_input_grad[i]) for i in _DIFFERENTIABLE_INPUTS]
    grads = mixed_chunk_bwd_op(grad_out, grad_total if ctx.store_total else None, q_quad, k_quad,
                               q_lin, k_lin, v, rel_bias, states, cu_seqlens, chunk_offsets,
                               chunk_table, state_offset, *ctx.options, needs)
    grads = [g if need else None for g, need in zip(grads, needs)]
    return (*grads[:6], None, None, None, grads[6], None, None, None, None, None)


mixed_chunk_fwd_op.register_autograd(_mixed_chunk_backward, setup_context=_mixed_chunk_setup_context)
def check_triton_inputs(q, v):
    """What the Triton backend cannot take, with the way out."""
    if q.shape[-1] > TRITON_MAX_S:
        raise ValueError(f"backend='triton' holds q/k in one tile: S (their last dim) must be at "
                         f"most {TRITON_MAX_S}, got {q.shape[-1]}; use backend='torch'")
    if triton_interpret_enabled() and not INTERPRETED_KERNELS:
        raise RuntimeError("TRITON_INTERPRET=1 was set after flash_kernels was imported: Triton "
                           "reads it when it defines the kernels, at import, so they are not "
                           "interpreted. TRITON_INTERPRET must be set before flash_kernels (and "
                           "triton) is imported; or use backend='torch'")
    if v.device.type != "cuda" and not triton_interpret_enabled():
        raise ValueError(f"backend='triton' needs CUDA tensors (got {v.device}) or TRITON_INTERPRET=1 "
                         f"set before flash_kernels is imported; use backend='torch' on the CPU")
    if INTERPRETED_KERNELS and v.dtype == torch.bfloat16:
        raise TypeError("backend='triton' cannot take torch.bfloat16 inputs under the Triton "
                        "interpreter (TRITON_INTERPRET=1): it has no bfloat16 arithmetic and would "
                        "return wrong values. Use backend='torch' (backend='auto' does), or "
                        "float16/float32 inputs, or a GPU without TRITON_INTERPRET")
    if functorch_transform_active():
        raise RuntimeError("backend='triton' does not work inside torch.func transforms (grad, "
                           "vmap, jacrev, jvp, ...): its custom ops have no functorch rules. Use "
                           "backend='torch' (backend='auto' does inside torch.func), or "
                           "torch.autograd.grad / .backward()")


def packed_arguments(tables):
    """The custom ops' three table arguments of packing.ChunkTables (None: dense)."""
    if tables is None:
        return None, None, None
    return tables.cu_seqlens, tables.chunk_offsets, tables.chunk_table


def mixed_chunk_attention_triton(q_quad, k_quad, q_lin, k_lin, v, *, chunk_size, causal, rel_bias,
                                 quad_scale, lin_scale, tables=None, state_offset=None,
                                 store_total=False):
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
    out, _, total = mixed_chunk_fwd_op(*views, bias32, *packed_arguments(tables), offset32,
                                       chunk_size, causal, quad_scale, lin_scale, store_total)
    return out, (total if store_total else None)
