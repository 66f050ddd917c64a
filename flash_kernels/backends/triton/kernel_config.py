"""Tile sizes of the Triton kernels per problem, dtype and target: the one place they are
chosen (numbers from the ahead-of-time compile report, bench/results/compile_report.md)."""

from dataclasses import dataclass

import torch

from .gpu_target import current_target


def next_power_of_2(n: int) -> int:
    return 1 << max(int(n) - 1, 0).bit_length()


MAX_HOIST_KEYS = 256  # longest chunk whose relu^2 weights are formed once per query block
#: The most chunk keys x features held on chip for hoisting: the paper shape's 256 x 128. A wider
#: S (256) at C = 256 recomputes the weights per key tile instead (hoisted it asked 144-257 KB of
#: shared memory, over sm_86/89/120's 99 KB in bf16 / fp16 and every target's limit in fp32).
MAX_HOISTED_KEY_FEATURES = 256 * 128


@dataclass(frozen=True)
class KernelConfig:
    """Tile sizes of one problem on one target. Each per-chunk kernel has its own row block
    (queries for the forward and the query backward, keys for the key backward), warps and
    value-tile width; the chunk is held as two key (or query) tiles of `block_n` when hoisted."""

    fwd_block: int
    fwd_warps: int
    fwd_stages: int
    fwd_block_e: int  # the forward's value tile, dense and unfused
    narrow_fwd_block_e: int  # ... when causal or fused (roles from z, gate)
    query_block: int  # the query backward (also the drel_bias segment length)
    query_warps: int
    query_block_e: int  # its dA = dO V^T reduces over E in these steps
    key_block: int  # the key backward
    key_warps: int
    key_block_e: int
    block_n: int  # key tile of the forward, query tile of the key backward
    block_s: int
    hoist: bool  # relu^2 weights formed once per program (chunk <= MAX_HOIST_KEYS)
    state_block_s: int
    state_block_e: int
    state_block_t: int


#: Tile sizes forced by tests (tests/helpers.py, tile_override; launch.py says who sets it):
#: `block` (every kernel's row block), `max_hoist_keys`, `block_e` (every value tile),
#: `state_block_t`. Small tiles give short test sequences several blocks per chunk, and
#: `max_hoist_keys` forces the long-chunk path.
_tile_overrides: dict = {}


#: Targets with less shared memory per block than this (A10, L4, L40S, RTX 30/40/50: 99 KB;
#: AMD Instinct: 64 KB) get the smaller tiles below.
LARGE_SHARED_MEMORY_BYTES = 160 * 1024
#: S > 128 runs every per-chunk kernel in 32-row blocks below this much shared memory per block
#: (sm_80's 163 KB included: 64 rows of fp16 / fp32 asked up to 208 KB there).
WIDE_FEATURES_BYTES = 200 * 1024


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
      112-128 KB);
    - S = 256 (C = 256): the chunk's 256 keys x 256 features are not hoisted
      (MAX_HOISTED_KEY_FEATURES; hoisted they asked 144-257 KB), and below
      WIDE_FEATURES_BYTES (sm_80 too) every per-chunk kernel runs 32-row blocks at one stage
      with 32-wide value tiles (64 rows asked 114-208 KB), float32's key backward 16 rows (32
      asked 100 KB on sm_86).
    Tests may override fields (`_tile_overrides`)."""
    chunk_pow2 = max(16, next_power_of_2(chunk_len))
    shared = target.shared_memory_bytes if target is not None else None
    small_shared = shared is not None and shared < LARGE_SHARED_MEMORY_BYTES
    wide_operands = dtype != torch.bfloat16  # float32 weights at the tensor cores
    block = min(64, chunk_pow2)
    narrow_block = min(32, chunk_pow2)
    block_s = max(16, next_power_of_2(S))
    # S > 128 below WIDE_FEATURES_BYTES: every per-chunk kernel in 32-row blocks at one stage.
    wide_features = block_s > 128 and shared is not None and shared < WIDE_FEATURES_BYTES
    narrow_rows = (small_shared and wide_operands) or wide_features
    fwd_block = key_block = narrow_block if narrow_rows else block
    if wide_features and dtype == torch.float32:
        key_block = min(16, chunk_pow2)  # 32 rows of float32 asked 100 KB, over sm_86's 99 KB
    query_block = narrow_block if (wide_operands or wide_features) else block
    if "block" in _tile_overrides:
        fwd_block = key_block = query_block = _tile_overrides["block"]
    max_hoist = _tile_overrides.get("max_hoist_keys", MAX_HOIST_KEYS)
    hoist = chunk_pow2 <= max_hoist and chunk_pow2 * block_s <= MAX_HOISTED_KEY_FEATURES
    block_e = _tile_overrides.get("block_e", min(64, max(16, next_power_of_2(E))))
    narrow_e = min(32, block_e)

    def warps(rows):
        return 8 if rows >= 64 else 4

    return KernelConfig(
        fwd_block=fwd_block,
        fwd_warps=warps(fwd_block),
        fwd_stages=1 if (wide_operands or wide_features) else 2,
        fwd_block_e=narrow_e if (wide_operands or small_shared) else block_e,
        narrow_fwd_block_e=narrow_e,
        query_block=query_block,
        query_warps=warps(query_block),
        query_block_e=min(16, block_e) if query_block >= 64 else block_e,
        key_block=key_block,
        key_warps=warps(key_block),
        key_block_e=narrow_e if wide_features else block_e,
        block_n=max(16, chunk_pow2 // 2) if hoist else fwd_block if wide_features else block,
        block_s=block_s,
        hoist=hoist,
        state_block_s=min(64, block_s),
        state_block_e=min(64, max(16, next_power_of_2(E))),
        state_block_t=_tile_overrides.get("state_block_t", 64),
    )


def dot_precision(dtype, device):
    """The kernels' DOT_PRECISION for float32 products of `dtype` inputs on `device`: tf32,
    unless fp32 inputs ask otherwise (torch.backends.cuda.matmul.allow_tf32 False) or the
    target has no tf32 (CDNA 2: gfx90a): "ieee" then."""
    if dtype == torch.float32 and not torch.backends.cuda.matmul.allow_tf32:
        return "ieee"
    return "tf32" if current_target(device).has_tf32 else "ieee"
