"""Batched decoding: one new token per sequence against a constant-size cache.

    mixed_chunk_decode(q_quad, k_quad, q_lin, k_lin, v, cache, ...)   -> (B, E)
    flash_attention_decode(z, gamma, beta, v, cache, u=None, ...)     -> (B, E)

FLASH needs, per sequence, the float32 S x E state of its completed chunks plus the keys and
values of its current chunk (at most C tokens): a `DecodeCache`, whose size does not depend on
how many tokens came before. Each call takes the new token of every sequence (sequences may
sit at different positions in their chunks), returns its output -- exactly the full op's output
for that token -- and updates the cache in place (keys and values written, the chunk folded
into the state when it completes, positions advanced). Shapes are static and nothing reads a
value back to the host, so a whole model's decoding step can be captured in a CUDA graph
(torch.cuda.graphs, or torch.compile(mode="reduce-overhead")).

Backends: "triton" is one kernel launch per call (kernels/mixed_chunk_decode.py); "torch" (and
"reference") is plain tensor code; "auto" picks as the full ops do (`pick_backend`).
"""
from typing import Optional

import torch

from .mixed_chunk_attention import pick_backend
from .utils import cuda_graph_capturing, launch, next_power_of_2, resolve_scales
from .validation import BACKENDS, check_int, check_scale, check_tensor, type_name

try:    # the kernel needs triton; the torch path does not
    from .kernels.mixed_chunk_decode import mixed_chunk_decode_kernel
    from .triton_mixed_chunk import _dot_precision, check_triton_inputs
except ImportError as error:                  # pragma: no cover - no usable triton
    mixed_chunk_decode_kernel = None
    _TRITON_IMPORT_ERROR = error


def _mark_static(tensor):
    """Tell torch.compile that the tensor keeps its address (a cache updated in place), so
    mode="reduce-overhead" may put the step that mutates it in a CUDA graph."""
    if tensor is not None and tensor.is_cuda and not torch.compiler.is_compiling():
        torch._dynamo.mark_static_address(tensor)


class DecodeCache:
    """What mixed chunk attention keeps per sequence between decoding steps.

    Attributes (B sequences):
        k_quad, k_lin: (B, capacity, S) keys of the current chunk, row n = token n of the chunk,
            in the model's dtype; k_lin is None without a linear part.
        v: (B, capacity, E) values of the current chunk.
        state: (B, S, E) float32 (float64 for float64 models): sum of k_lin_j v_j^T over every
            COMPLETED chunk (the full op's `final_state`); None without a linear part.
        position: (B,) int64, tokens seen so far by each sequence (the next token's position);
            the current chunk holds `length` = position mod C of them (all, for one chunk),
            in rows [0, length); the rows after them hold zeros (the decode ops and
            DecodeCache.empty keep it so; a cache filled by hand must too).
        chunk_size: C, or None for one chunk that never completes (full GAU attention): then the
            buffers hold every token and `capacity` bounds the sequence length.

    The tensors keep their addresses for the cache's life (updated in place), as a CUDA graph
    needs.
    """

    def __init__(self, k_quad, k_lin, v, state, position, *, chunk_size):
        self._assign(k_quad, k_lin, v, state, position, chunk_size)

    def _assign(self, k_quad, k_lin, v, state, position, chunk_size):
        self.k_quad, self.k_lin, self.v, self.state = k_quad, k_lin, v, state
        self.position = position
        self.chunk_size = chunk_size
        # Per-sequence counters of the Triton kernel's programs (zero between calls).
        self.tickets = torch.zeros(position.shape, dtype=torch.int32, device=position.device)
        for tensor in (k_quad, k_lin, v, state, position, self.tickets):
            _mark_static(tensor)

    @classmethod
    def empty(cls, batch, S, E, *, chunk_size=256, capacity=None, linear=True,
              dtype=torch.float32, device="cpu"):
        """A cache of `batch` sequences at position 0. capacity: rows of the buffers, C by
        default; with chunk_size=None (one growing chunk) it is required: the longest
        sequence it can hold."""
        check_int("batch", batch, minimum=0)
        check_int("S", S, minimum=1)
        check_int("E", E, minimum=1)
        if chunk_size is None:
            if capacity is None:
                raise ValueError("chunk_size=None (one chunk that never completes) needs "
                                 "capacity: the longest sequence the cache will hold")
        else:
            check_int("chunk_size", chunk_size, minimum=1)
        capacity = chunk_size if capacity is None else capacity
        check_int("capacity", capacity, minimum=1)
        if chunk_size is not None and capacity != chunk_size:
            raise ValueError(f"a chunked cache holds one chunk: capacity must equal chunk_size "
                             f"({chunk_size}), got {capacity}")
        state_dtype = torch.promote_types(dtype, torch.float32)
        k_lin = torch.zeros(batch, capacity, S, dtype=dtype, device=device) if linear else None
        state = torch.zeros(batch, S, E, dtype=state_dtype, device=device) if linear else None
        return cls(torch.zeros(batch, capacity, S, dtype=dtype, device=device), k_lin,
                   torch.zeros(batch, capacity, E, dtype=dtype, device=device), state,
                   torch.zeros(batch, dtype=torch.int64, device=device), chunk_size=chunk_size)

    @property
    def capacity(self):
        return 0 if self.k_quad is None else self.k_quad.shape[1]

    def select_batch(self, indices):
        """Keep the sequences `indices` ((B',) integer tensor or list), in that order: sequence i
        becomes the old sequence indices[i]; repeats allowed. Beam search reorders its beams this
        way after each step, and batch pruning or expansion keeps or repeats sequences.

        With B' = B the tensors are rewritten in place and keep their addresses (a captured CUDA
        graph still sees them); another B' gets new tensors. An unallocated cache (k_quad None)
        is left as it is. The range check reads the indices (a device sync): skipped under
        torch.compile and CUDA graph capture.
        """
        if self.k_quad is None:
            return
        indices = torch.as_tensor(indices, device=self.position.device)
        if indices.dim() != 1 or indices.dtype not in (torch.int64, torch.int32):
            raise ValueError(f"indices must be a 1-D integer tensor of sequence indices, got "
                             f"{indices.dtype} of shape {tuple(indices.shape)}")
        batch = self.position.shape[0]
        if indices.numel() and not torch.compiler.is_compiling() and not cuda_graph_capturing():
            low, high = int(indices.min()), int(indices.max())
            if low < 0 or high >= batch:
                raise ValueError(f"indices must lie in [0, {batch}) (the cache's sequences), got "
                                 f"values from {low} to {high}")
        tensors = (self.k_quad, self.k_lin, self.v, self.state, self.position)
        selected = [None if t is None else t.index_select(0, indices) for t in tensors]
        if indices.numel() == batch:
            for tensor, new in zip(tensors, selected):
                if tensor is not None:
                    tensor.copy_(new)
        else:
            self._assign(*selected, self.chunk_size)

    @property
    def length(self):
        """(B,) tokens of the current chunk held in the buffers."""
        if self.chunk_size is None:
            return self.position
        return self.position % self.chunk_size

    @property
    def bias_chunk(self):
        """C of the rel_bias the decode ops take ((2C - 1,)): chunk_size, or the capacity."""
        return self.chunk_size if self.chunk_size is not None else self.capacity


def check_cache(cache, *, batch, S, E, linear, dtype, device, names):
    """The cache fits the new tokens: shapes, dtypes, device and layout, with errors naming
    what to fix. `names` = (queries/keys name, values name) for the messages."""
    qk_name, v_name = names
    if not isinstance(cache, DecodeCache):
        raise TypeError(f"cache must be a flash_kernels.DecodeCache, got {type_name(cache)}")
    if cache.k_quad is None:
        raise ValueError("cache holds no tensors yet (allocate it: DecodeCache.empty)")
    B = batch
    cap = cache.capacity
    expected = {"k_quad": (B, cap, S), "v": (B, cap, E)}
    if linear:
        if cache.k_lin is None or cache.state is None:
            raise ValueError("the linear part needs a cache with k_lin and state "
                             "(DecodeCache.empty(..., linear=True))")
        expected.update(k_lin=(B, cap, S), state=(B, S, E))
    elif cache.k_lin is not None:
        raise ValueError("quadratic-only decoding (no q_lin/k_lin) got a cache with a linear "
                         "part: use DecodeCache.empty(..., linear=False)")
    for name, shape in expected.items():
        tensor = getattr(cache, name)
        if tuple(tensor.shape) != shape:
            raise ValueError(f"cache.{name} must have shape {shape} for {B} sequences with "
                             f"S = {S} ({qk_name}) and E = {E} ({v_name}), got "
                             f"{tuple(tensor.shape)}")
        if tensor.device != device:
            raise ValueError(f"cache.{name} is on {tensor.device} but {v_name} is on {device}")
        if not tensor.is_contiguous():
            raise ValueError(f"cache.{name} must be contiguous (it is updated in place)")
        want = torch.promote_types(dtype, torch.float32) if name == "state" else dtype
        if tensor.dtype != want:
            raise TypeError(f"cache.{name} has dtype {tensor.dtype} but {v_name} is {dtype}: "
                            f"expected {want}")
    position = cache.position
    if (not isinstance(position, torch.Tensor) or position.dtype != torch.int64
            or tuple(position.shape) != (B,) or position.device != device):
        raise ValueError(f"cache.position must be an int64 tensor of shape ({B},) on {device}, "
                         f"got {type_name(position) if not isinstance(position, torch.Tensor) else f'{position.dtype} {tuple(position.shape)} on {position.device}'}")
    if cache.chunk_size is not None and cap != cache.chunk_size:
        raise ValueError(f"a chunked cache holds one chunk: capacity {cap} must equal "
                         f"chunk_size {cache.chunk_size}")


def _check_rows(named, B, device, dtype):
    """Every (name, tensor, width) is a (B, width) tensor of `dtype` on `device`."""
    for name, x, width in named:
        check_tensor(name, x, min_dim=2)
        if x.dim() != 2 or x.shape[0] != B or x.shape[1] != width:
            raise ValueError(f"{name} must have shape ({B}, {width}) (one new token per "
                             f"sequence), got {tuple(x.shape)}")
        if x.dtype != dtype:
            raise TypeError(f"{name} has dtype {x.dtype} but v has {dtype}: the new token's "
                            f"tensors share one dtype")
        if x.device != device:
            raise ValueError(f"{name} is on {x.device} but v is on {device}")


def _check_decode_options(cache, rel_bias, quad_scale, lin_scale, backend, device):
    check_scale("quad_scale", quad_scale)
    check_scale("lin_scale", lin_scale)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if cache.chunk_size is None and quad_scale is None:
        raise ValueError("one growing chunk (chunk_size=None) needs an explicit quad_scale: the "
                         "full op's default 1 / T depends on the whole sequence's length, which "
                         "a decoder cannot know")
    if rel_bias is None:
        return
    if not isinstance(rel_bias, torch.Tensor) or not rel_bias.is_floating_point():
        raise TypeError(f"rel_bias must be a floating torch.Tensor or None, got "
                        f"{type_name(rel_bias)}")
    C = cache.bias_chunk
    if tuple(rel_bias.shape) != (2 * C - 1,):
        what = f"chunk_size={C}" if cache.chunk_size is not None else f"capacity={C}"
        raise ValueError(f"rel_bias must have shape (2 * C - 1,) = ({2 * C - 1},) for the "
                         f"cache's {what}, got {tuple(rel_bias.shape)}")
    if rel_bias.device != device:
        raise ValueError(f"rel_bias is on {rel_bias.device} but the inputs are on {device}")


# -- the torch path --------------------------------------------------------------------------

def _select(mask, x, other):
    """torch.where(mask, x, other) with the mask expanded to x's shape first: on the CPU (torch
    2.13) a mask broadcast along the last dim takes a slow path, ~40x slower."""
    return torch.where(mask.expand_as(x), x, other)


def decode_torch(q_quad, k_quad, q_lin, k_lin, v, cache, *, rel_bias, quad_scale, lin_scale):
    """The decode step in tensor code (inputs (B, S) / (B, E), scales resolved): the output
    (B, E) in the compute dtype, the cache updated in place, as the kernel does (see
    kernels/mixed_chunk_decode.py). Rows past a sequence's length hold zeros (the cache's
    invariant), so the products run over whole buffers and only the weights are masked.
    Static shapes; no value read back to the host except one `any()` deciding whether a
    chunk completes, skipped under torch.compile and CUDA graph capture (the fold is then
    computed for every sequence and selected)."""
    B, S = q_quad.shape
    cap = cache.capacity
    compute = torch.promote_types(v.dtype, torch.float32)
    zero = torch.zeros((), dtype=compute, device=v.device)
    n = cache.length                                                    # (B,) row of the token
    fits = n < cap
    row = n.clamp(max=cap - 1)
    rows = torch.arange(cap, device=v.device)
    attended = (rows[None, :] <= n[:, None]) & fits[:, None]           # (B, cap)
    completes = (n == cache.chunk_size - 1) if cache.chunk_size is not None else None

    for buffer, new in ((cache.k_quad, k_quad), (cache.k_lin, k_lin), (cache.v, v)):
        if buffer is not None:                  # buffer[b, n_b] = new[b] where the row fits
            index = row.view(B, 1, 1).expand(B, 1, buffer.shape[-1])
            old = buffer.gather(1, index)
            buffer.scatter_(1, index, _select(fits.view(B, 1, 1), new[:, None].to(buffer.dtype),
                                              old))

    scores = quad_scale * (cache.k_quad.to(compute) @ q_quad.to(compute)[:, :, None])[..., 0]
    if rel_bias is not None:
        C = cache.bias_chunk
        offsets = (n[:, None] - rows[None, :]).clamp(0, C - 1)          # masked rows: any index
        scores = scores + rel_bias.to(compute)[offsets + C - 1]
    weights = torch.where(attended, torch.relu(scores).square(), zero)  # (B, cap)
    values = cache.v.to(compute)
    out = (weights[:, None, :] @ values)[:, 0]                          # (B, E)
    if q_lin is not None:
        out = out + lin_scale * (q_lin.to(compute)[:, None, :] @ cache.state)[:, 0]
    out = _select(fits[:, None], out, torch.full_like(out, float("nan")))

    if completes is not None and (torch.compiler.is_compiling() or cuda_graph_capturing()
                                  or bool(completes.any())):
        restart = completes.view(B, 1, 1)
        if cache.state is not None:
            fold = cache.k_lin.to(compute).transpose(1, 2) @ values        # (B, S, E)
            cache.state.add_(_select(restart, fold, zero))
        for buffer in (cache.k_quad, cache.k_lin, cache.v):
            if buffer is not None:
                buffer.masked_fill_(restart.expand_as(buffer), 0)
    cache.position.add_(fits.to(cache.position.dtype))
    return out


# -- the Triton path -------------------------------------------------------------------------

DECODE_BLOCK_N = 32     # buffered rows per step of the key loop
DECODE_BLOCK_E = 64     # value columns per program
DECODE_BLOCK_SL = 32    # state rows per step of the linear part
DECODE_BLOCK_SF = 64    # state rows per step of the fold


def decode_config(S, E):
    """The decode kernel's tile constexprs and num_warps."""
    block_s = max(16, next_power_of_2(S))
    return dict(BLOCK_N=DECODE_BLOCK_N, BLOCK_S=block_s,
                BLOCK_SL=min(DECODE_BLOCK_SL, block_s), BLOCK_SF=min(DECODE_BLOCK_SF, block_s),
                BLOCK_E=min(DECODE_BLOCK_E, max(16, next_power_of_2(E)))), 4


@torch.library.custom_op("flash_kernels::mixed_chunk_decode",
                         mutates_args=("k_quad_cache", "k_lin_cache", "v_cache", "state",
                                       "position", "tickets"))
def mixed_chunk_decode_op(q_quad: torch.Tensor, k_quad: torch.Tensor,
                          q_lin: Optional[torch.Tensor], k_lin: Optional[torch.Tensor],
                          v: torch.Tensor, gate: Optional[torch.Tensor],
                          affine: Optional[torch.Tensor], rel_bias: Optional[torch.Tensor],
                          k_quad_cache: torch.Tensor, k_lin_cache: Optional[torch.Tensor],
                          v_cache: torch.Tensor, state: Optional[torch.Tensor],
                          position: torch.Tensor, tickets: torch.Tensor, chunk_size: int,
                          folds: bool, quad_scale: float, lin_scale: float) -> torch.Tensor:
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
    launch(mixed_chunk_decode_kernel, (B * num_e_tiles,),
           dict(q_quad_ptr=q_quad, k_quad_ptr=q_quad if from_z else k_quad,
                q_lin_ptr=q_quad if from_z and linear else q_lin,
                k_lin_ptr=q_quad if from_z and linear else k_lin, v_ptr=v, gate_ptr=gate,
                affine_ptr=affine, rel_bias_ptr=rel_bias, k_quad_cache_ptr=k_quad_cache,
                k_lin_cache_ptr=k_lin_cache, v_cache_ptr=v_cache, state_ptr=state,
                position_ptr=position, tickets_ptr=tickets, out_ptr=out,
                stride_qb=q_quad.stride(0), stride_kb=(q_quad if from_z else k_quad).stride(0),
                stride_qlb=0 if not linear else (q_quad if from_z else q_lin).stride(0),
                stride_klb=0 if not linear else (q_quad if from_z else k_lin).stride(0),
                stride_vb=v.stride(0), stride_gb=0 if gate is None else gate.stride(0),
                S=S, E=E, capacity=k_quad_cache.shape[1], chunk_size=chunk_size,
                num_e_tiles=num_e_tiles, quad_scale=quad_scale, lin_scale=lin_scale),
           dict(FROM_Z=from_z, HAS_GATE=gate is not None, HAS_LINEAR=linear,
                HAS_BIAS=rel_bias is not None, FOLDS=folds, **tiles,
                DOT_PRECISION=_dot_precision(v.dtype, v.device)),
           num_warps=num_warps, num_stages=1)
    return out


@mixed_chunk_decode_op.register_fake
def _(q_quad, k_quad, q_lin, k_lin, v, gate, affine, rel_bias, k_quad_cache, k_lin_cache,
      v_cache, state, position, tickets, chunk_size, folds, quad_scale, lin_scale):
    return v.new_empty(q_quad.shape[0], v.shape[-1])


def _unit_feature_stride(x):
    return x if x is None or x.stride(-1) == 1 else x.contiguous()


def _decode_triton(q_quad, k_quad, q_lin, k_lin, v, cache, *, gate, affine, rel_bias,
                   quad_scale, lin_scale):
    if mixed_chunk_decode_kernel is None:
        raise RuntimeError(f"backend='triton' is unavailable: importing triton failed "
                           f"({_TRITON_IMPORT_ERROR}); use backend='torch'")
    check_triton_inputs(q_quad, v)
    rows = [_unit_feature_stride(x) for x in (q_quad, k_quad, q_lin, k_lin, v, gate)]
    bias32 = rel_bias.float().contiguous() if rel_bias is not None else None
    return mixed_chunk_decode_op(*rows[:5], rows[5], affine, bias32, cache.k_quad, cache.k_lin,
                                 cache.v, cache.state, cache.position, cache.tickets,
                                 cache.bias_chunk, cache.chunk_size is not None,
                                 float(quad_scale), float(lin_scale))


# -- the public ops --------------------------------------------------------------------------

def _scales(cache, quad_scale, lin_scale):
    return resolve_scales(quad_scale, lin_scale, cache.bias_chunk)


def mixed_chunk_decode(q_quad, k_quad, q_lin, k_lin, v, cache, *, rel_bias=None,
                       quad_scale=None, lin_scale=None, backend="auto"):
    """One decoding step of mixed chunk attention for a batch of sequences.

    Sequence b has seen p_b = cache.position[b] tokens; its new token is row n = p_b mod C of
    the current chunk (n = p_b with cache.chunk_size=None). With j over the chunk's rows:

        s_j  = quad_scale * <q_quad, k_quad_j> + rel_bias[(n - j) + C - 1]     (j <= n)
        out  = sum_{j <= n} relu(s_j)^2 v_j  +  lin_scale * q_lin^T state

    where row n holds the new token's own k_quad and v, and state is the float32 sum of
    k_lin^T v over the sequence's completed chunks: exactly the output of
    `mixed_chunk_attention` (causal, same chunk_size, rel_bias and scales) at that token.
    Then, in place: the token's k_quad, k_lin and v are written to row n; if the chunk is now
    complete (n = C - 1) its k_lin^T v is added to the state (float32) and the buffers restart;
    cache.position[b] += 1. A sequence whose row does not fit (n >= capacity: a full one-chunk
    cache) gets a NaN output and an unchanged cache.

    Args:
        q_quad, k_quad: (B, S) the new token's quadratic query and key, one row per sequence.
        q_lin, k_lin: (B, S) its linear query and key, or both None (quadratic only; the cache
            then has no state).
        v: (B, E) its value. All five share dtype and device (fold heads into B).
        cache: a `DecodeCache` for B sequences (DecodeCache.empty, or a prefill's); its
            chunk_size is C (None: one chunk that never completes).
        rel_bias: optional (2C - 1,) Toeplitz bias (C = the cache's chunk_size, or its capacity
            with chunk_size=None), entry o + C - 1 for offset o = i - j, as the full op's.
        quad_scale, lin_scale: default 1 / C like the full op (with chunk_size=None, quad_scale
            is required: 1 / T has no decoding equivalent).
        backend: "auto" (Triton on CUDA, or on CPU under TRITON_INTERPRET=1; else "torch"),
            "triton" (one kernel launch; float64 goes to "torch"), "torch" or "reference"
            (tensor code, float64 exact).

    Returns:
        (B, E) tensor in v's dtype. Inference only: no autograd through the cache updates.
    """
    return _decode("mixed_chunk_decode", q_quad, k_quad, q_lin, k_lin, v, cache, gate=None,
                   gamma_beta=None, rel_bias=rel_bias, quad_scale=quad_scale,
                   lin_scale=lin_scale, backend=backend)


def flash_attention_decode(z, gamma, beta, v, cache, *, u=None, rel_bias=None, quad_scale=None,
                           lin_scale=None, backend="auto"):
    """One decoding step of `flash_attention` (roles from z, optional gate) for a batch.

        q_quad = z * gamma[0] + beta[0]    k_quad = z * gamma[1] + beta[1]
        q_lin  = z * gamma[2] + beta[2]    k_lin  = z * gamma[3] + beta[3]   (rows 2, 3 optional)
        out    = u * mixed_chunk_decode(q_quad, k_quad, q_lin, k_lin, v, cache, ...)

    each role formed in float32 and rounded to z's dtype as flash_attention does; the Triton
    kernel forms them on the fly and applies the gate before rounding the output (as the full
    op's kernels). z: (B, S); gamma, beta: (4, S) or (2, S); v, u: (B, E). Other arguments
    and the cache update as `mixed_chunk_decode`; returns (B, E) in v's dtype.
    """
    return _decode("flash_attention_decode", z, None, None, None, v, cache, gate=u,
                   gamma_beta=(gamma, beta), rel_bias=rel_bias, quad_scale=quad_scale,
                   lin_scale=lin_scale, backend=backend)


def _check_gamma_beta(gamma, beta, S, device):
    for name, x in (("gamma", gamma), ("beta", beta)):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"{name} must be a floating torch.Tensor, got {type_name(x)}")
        if x.dim() != 2 or x.shape[0] not in (2, 4) or x.shape[1] != S:
            raise ValueError(f"{name} must have shape (4, S) (rows quad_q, quad_k, lin_q, lin_k) "
                             f"or (2, S) (quadratic only) with S = z.shape[-1] = {S}, got "
                             f"{tuple(x.shape)}")
        if x.device != device:
            raise ValueError(f"{name} is on {x.device} but z is on {device}")
    if gamma.shape != beta.shape:
        raise ValueError(f"gamma and beta must have the same shape, got {tuple(gamma.shape)} "
                         f"and {tuple(beta.shape)}")


def _decode(op, q_quad, k_quad, q_lin, k_lin, v, cache, *, gate, gamma_beta, rel_bias,
            quad_scale, lin_scale, backend):
    check_tensor("v", v, min_dim=2)
    if v.dim() != 2:
        raise ValueError(f"v must have shape (B, E) (one new token per sequence), got "
                         f"{tuple(v.shape)}")
    B, E = v.shape
    device, dtype = v.device, v.dtype
    from_z = gamma_beta is not None
    if from_z:
        check_tensor("z", q_quad, min_dim=2)
        S = q_quad.shape[-1]
        _check_rows([("z", q_quad, S)] + ([("u", gate, E)] if gate is not None else []),
                    B, device, dtype)
        _check_gamma_beta(*gamma_beta, S, device)
        linear = gamma_beta[0].shape[0] == 4
        names = ("z", "v")
    else:
        if (q_lin is None) != (k_lin is None):
            given, missing = ("q_lin", "k_lin") if k_lin is None else ("k_lin", "q_lin")
            raise ValueError(f"{given} was given without {missing}: pass both (linear part) or "
                             f"neither (quadratic only)")
        check_tensor("q_quad", q_quad, min_dim=2)
        S = q_quad.shape[-1]
        linear = q_lin is not None
        named = [("q_quad", q_quad, S), ("k_quad", k_quad, S)]
        if linear:
            named += [("q_lin", q_lin, S), ("k_lin", k_lin, S)]
        _check_rows(named, B, device, dtype)
        names = ("q_quad", "v")
    if S == 0:
        raise ValueError(f"{names[0]} has S = 0 features: queries and keys need S >= 1")
    check_cache(cache, batch=B, S=S, E=E, linear=linear, dtype=dtype, device=device,
                names=names)
    _check_decode_options(cache, rel_bias, quad_scale, lin_scale, backend, device)
    quad, lin = _scales(cache, quad_scale, lin_scale)

    if pick_backend(backend, device, dtype, S) == "triton":
        affine = None
        if from_z:
            gamma, beta = gamma_beta
            pad = gamma.new_zeros((4 - gamma.shape[0], S), dtype=torch.float32)
            affine = torch.stack([torch.cat([gamma.float(), pad]), torch.cat([beta.float(), pad])])
        with torch.no_grad():
            return _decode_triton(q_quad, k_quad, q_lin, k_lin, v, cache, gate=gate,
                                  affine=affine, rel_bias=rel_bias, quad_scale=quad,
                                  lin_scale=lin)
    if from_z:
        from .flash_attention import scale_offset_roles
        roles = scale_offset_roles(q_quad, *gamma_beta)
        q_quad, k_quad = roles[0], roles[1]
        q_lin, k_lin = (roles[2], roles[3]) if linear else (None, None)
    with torch.no_grad():
        out = decode_torch(q_quad, k_quad, q_lin, k_lin, v, cache, rel_bias=rel_bias,
                           quad_scale=quad, lin_scale=lin).to(dtype)
    return out if gate is None else gate * out
