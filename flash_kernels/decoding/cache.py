"""The decoding cache: what mixed chunk attention keeps per sequence between decoding steps
(the float32 S x E state of the completed chunks and the keys and values of the current chunk),
and the check that a cache fits the tokens of a step."""

import torch

from ..core.environment import cuda_graph_capturing
from ..core.validation import check_int, type_name


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
    def empty(
        cls,
        batch,
        S,
        E,
        *,
        chunk_size=256,
        capacity=None,
        linear=True,
        dtype=torch.float32,
        device="cpu",
    ):
        """A cache of `batch` sequences at position 0. capacity: rows of the buffers, C by
        default; with chunk_size=None (one growing chunk) it is required: the longest
        sequence it can hold."""
        check_int("batch", batch, minimum=0)
        check_int("S", S, minimum=1)
        check_int("E", E, minimum=1)
        if chunk_size is None:
            if capacity is None:
                raise ValueError(
                    "chunk_size=None (one chunk that never completes) needs "
                    "capacity: the longest sequence the cache will hold"
                )
        else:
            check_int("chunk_size", chunk_size, minimum=1)
        capacity = chunk_size if capacity is None else capacity
        check_int("capacity", capacity, minimum=1)
        if chunk_size is not None and capacity != chunk_size:
            raise ValueError(
                f"a chunked cache holds one chunk: capacity must equal chunk_size "
                f"({chunk_size}), got {capacity}"
            )
        state_dtype = torch.promote_types(dtype, torch.float32)
        k_lin = torch.zeros(batch, capacity, S, dtype=dtype, device=device) if linear else None
        state = torch.zeros(batch, S, E, dtype=state_dtype, device=device) if linear else None
        return cls(
            torch.zeros(batch, capacity, S, dtype=dtype, device=device),
            k_lin,
            torch.zeros(batch, capacity, E, dtype=dtype, device=device),
            state,
            torch.zeros(batch, dtype=torch.int64, device=device),
            chunk_size=chunk_size,
        )

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
            raise ValueError(
                f"indices must be a 1-D integer tensor of sequence indices, got "
                f"{indices.dtype} of shape {tuple(indices.shape)}"
            )
        batch = self.position.shape[0]
        if indices.numel() and not torch.compiler.is_compiling() and not cuda_graph_capturing():
            low, high = int(indices.min()), int(indices.max())
            if low < 0 or high >= batch:
                raise ValueError(
                    f"indices must lie in [0, {batch}) (the cache's sequences), got "
                    f"values from {low} to {high}"
                )
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
            raise ValueError(
                "the linear part needs a cache with k_lin and state "
                "(DecodeCache.empty(..., linear=True))"
            )
        expected.update(k_lin=(B, cap, S), state=(B, S, E))
    elif cache.k_lin is not None:
        raise ValueError(
            "quadratic-only decoding (no q_lin/k_lin) got a cache with a linear "
            "part: use DecodeCache.empty(..., linear=False)"
        )
    for name, shape in expected.items():
        tensor = getattr(cache, name)
        if tuple(tensor.shape) != shape:
            raise ValueError(
                f"cache.{name} must have shape {shape} for {B} sequences with "
                f"S = {S} ({qk_name}) and E = {E} ({v_name}), got "
                f"{tuple(tensor.shape)}"
            )
        if tensor.device != device:
            raise ValueError(f"cache.{name} is on {tensor.device} but {v_name} is on {device}")
        if not tensor.is_contiguous():
            raise ValueError(f"cache.{name} must be contiguous (it is updated in place)")
        want = torch.promote_types(dtype, torch.float32) if name == "state" else dtype
        if tensor.dtype != want:
            raise TypeError(
                f"cache.{name} has dtype {tensor.dtype} but {v_name} is {dtype}: expected {want}"
            )
    position = cache.position
    if (
        not isinstance(position, torch.Tensor)
        or position.dtype != torch.int64
        or tuple(position.shape) != (B,)
        or position.device != device
    ):
        if isinstance(position, torch.Tensor):
            got = f"{position.dtype} {tuple(position.shape)} on {position.device}"
        else:
            got = type_name(position)
        raise ValueError(
            f"cache.position must be an int64 tensor of shape ({B},) on {device}, got {got}"
        )
    if cache.chunk_size is not None and cap != cache.chunk_size:
        raise ValueError(
            f"a chunked cache holds one chunk: capacity {cap} must equal "
            f"chunk_size {cache.chunk_size}"
        )
