"""The decoding cache of one GAU / FLASH layer."""

import torch

from ..core.environment import cuda_graph_capturing
from ..core.validation import type_name
from ..decoding import DecodeCache


class AttentionCache(DecodeCache):
    """What one layer keeps between decoding steps: a `flash_kernels.DecodeCache` allocated on
    first use (the layer knows its sizes, the first input its batch, dtype and device).

    Attributes (see DecodeCache): position (B,) int64 tokens seen per sequence (sequences of
    one batch may be at different positions), length (B,) tokens of the current chunk, state
    (B, S, E) float32 (float64 for float64 models) over completed chunks, or None for
    quadratic-only layers; k_quad, k_lin, v (B, capacity, ...) the current chunk's keys (RoPE
    applied) and values. max_tokens: for one-chunk (GAU) buffers, a host-side bound on every
    position (prefilled tokens plus steps), kept without reading the device.

    A chunked layer's buffers hold one chunk (capacity C): memory and work per token stay
    bounded however long the sequence grows, and the tensors never change (a decoding step
    can be captured in a CUDA graph). A GAU layer (chunk_size=None) has one chunk that never
    completes: its buffers hold every token and grow (doubling, new tensors) when max_tokens
    would pass the capacity; every token attends to all before it, O(t) work for token t.
    To capture GAU decoding in a CUDA graph, `reserve` the capacity first.
    """

    def __init__(self):
        self.k_quad = self.k_lin = self.v = self.state = self.position = self.tickets = None
        self.chunk_size = None
        self.max_tokens = 0
        self.min_capacity = 0

    @property
    def initialized(self):
        return self.k_quad is not None

    def reserve(self, tokens):
        """Make room for `tokens` tokens per sequence in one-chunk (GAU) buffers, at allocation
        or now, so no step reallocates them (chunked buffers always hold one chunk)."""
        self.min_capacity = max(self.min_capacity, int(tokens))
        if self.initialized and self.chunk_size is None and self.capacity < tokens:
            self.grow(int(tokens))

    def allocate(self, batch, S, E, capacity, *, chunk_size, linear, dtype, device):
        empty = DecodeCache.empty(
            batch,
            S,
            E,
            chunk_size=chunk_size,
            capacity=capacity,
            linear=linear,
            dtype=dtype,
            device=device,
        )
        self._assign(empty.k_quad, empty.k_lin, empty.v, empty.state, empty.position, chunk_size)

    def grow(self, capacity):
        """Enlarge one-chunk buffers to `capacity` rows, keeping their contents (new tensors)."""

        def grown(buf):
            if buf is None:
                return None
            new = buf.new_zeros(buf.shape[0], capacity, buf.shape[2])
            new[:, : buf.shape[1]] = buf
            return new

        self._assign(
            grown(self.k_quad),
            grown(self.k_lin),
            grown(self.v),
            self.state,
            self.position,
            self.chunk_size,
        )


def check_lengths(lengths, batch, T, device, *, minimum=0):
    """lengths: None, or a (batch,) integer tensor (or list) of per-row token counts in
    [minimum, T] -> None or an int64 tensor on `device`. The range check reads the values (a
    device sync): skipped under torch.compile and CUDA graph capture."""
    if lengths is None:
        return None
    if isinstance(lengths, (list, tuple)):
        if not all(isinstance(n, int) and not isinstance(n, bool) for n in lengths):
            raise TypeError("lengths must hold ints")
        lengths = torch.tensor(lengths, dtype=torch.int64)
    if not isinstance(lengths, torch.Tensor):
        raise TypeError(
            f"lengths must be a (batch,) integer tensor or a list of ints, got {type_name(lengths)}"
        )
    if lengths.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"lengths must be int64 or int32, got {lengths.dtype}")
    if tuple(lengths.shape) != (batch,):
        raise ValueError(
            f"lengths must have shape ({batch},) (one length per row), got {tuple(lengths.shape)}"
        )
    lengths = lengths.to(device=device, dtype=torch.int64)
    if batch and not torch.compiler.is_compiling() and not cuda_graph_capturing():
        low, high = int(lengths.min()), int(lengths.max())
        if low < minimum or high > T:
            raise ValueError(
                f"lengths must lie in [{minimum}, {T}] (T = the rows' length), got "
                f"values from {low} to {high}"
            )
    return lengths
