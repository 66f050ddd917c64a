"""The decoding cache of one GAU / FLASH layer."""
import torch


class AttentionCache:
    """What one layer keeps between decoding steps.

    Attributes:
        position: absolute position of the next token (RoPE angles and chunk membership).
        length: tokens of the current, incomplete chunk held in the buffers.
        state: (B, S, E) sum of k_lin_j v_j^T over every *completed* chunk, in float32 (float64
            for float64 models): the exclusive inter-chunk state of the linear part. None for
            quadratic-only layers.
        k_quad, k_lin, v: (B, capacity, S / S / E) buffers; rows [:length] are the current chunk's
            keys (RoPE applied) and values, in the model's dtype. k_lin is None without a
            linear part.

    The buffers of a chunked layer hold one chunk (capacity C), so memory and work per token stay
    bounded however long the sequence grows. A GAU layer (chunk_size=None) has one chunk that
    never completes: its buffers grow (doubling capacity) and every token attends to all before
    it, O(t) work for token t: quadratic attention is quadratic by nature.
    """

    def __init__(self):
        self.position = 0
        self.length = 0
        self.state = None
        self.k_quad = None
        self.k_lin = None
        self.v = None

    @property
    def initialized(self):
        return self.k_quad is not None

    @property
    def capacity(self):
        return 0 if self.k_quad is None else self.k_quad.shape[1]

    def allocate(self, batch, S, E, capacity, *, linear, dtype, device):
        self.k_quad = torch.zeros(batch, capacity, S, dtype=dtype, device=device)
        self.k_lin = torch.zeros(batch, capacity, S, dtype=dtype, device=device) if linear else None
        self.v = torch.zeros(batch, capacity, E, dtype=dtype, device=device)
        compute = torch.promote_types(dtype, torch.float32)
        self.state = torch.zeros(batch, S, E, dtype=compute, device=device) if linear else None

    def grow(self, capacity):
        """Enlarge the buffers to `capacity` rows, keeping rows [:length] (GAU decoding)."""
        def grown(buf):
            if buf is None:
                return None
            new = buf.new_zeros(buf.shape[0], capacity, buf.shape[2])
            new[:, :self.length] = buf[:, :self.length]
            return new
        self.k_quad, self.k_lin, self.v = grown(self.k_quad), grown(self.k_lin), grown(self.v)

    def append(self, k_quad, k_lin, v):
        """Write one token's (B, S), (B, S), (B, E) rows at index `length`."""
        n = self.length
        self.k_quad[:, n] = k_quad
        if self.k_lin is not None:
            self.k_lin[:, n] = k_lin
        self.v[:, n] = v
        self.length = n + 1
        self.position += 1

    def fold_chunk(self):
        """The current chunk is complete: add its k_lin^T v to the state and empty the buffers.

        Tokens of later chunks see this chunk through the state only (SPEC section 2: the linear
        part uses earlier chunks, the quadratic part the token's own chunk).
        """
        if self.state is not None:
            n = self.length
            kl = self.k_lin[:, :n].to(self.state.dtype)
            vv = self.v[:, :n].to(self.state.dtype)
            self.state += kl.transpose(1, 2) @ vv
        self.length = 0
