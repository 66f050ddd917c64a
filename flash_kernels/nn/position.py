"""Position information: relative position biases (Toeplitz, learned or T5-bucketed) and RoPE.

Both are functions of token positions only, never of the sequence length, so the chunked forward
and one-token decoding (which sees absolute positions one at a time) agree.
"""

import math

import torch
from torch import nn


class RelativePositionBias(nn.Module):
    """Base: a scalar bias b(o) for the offset o = i - j between query i and key j.

    `toeplitz(C)` is the (2C - 1,) vector the attention ops take: entry o + C - 1 is b(o) for
    o = -(C - 1) .. C - 1. `forward(offsets)` evaluates b at any integer offsets (decoding).
    """

    def __init__(self, causal):
        super().__init__()
        self.causal = causal

    def forward(self, offsets):
        raise NotImplementedError

    def toeplitz(self, chunk_len):
        offsets = torch.arange(-(chunk_len - 1), chunk_len, device=self._device())
        return self(offsets)

    def _device(self):
        return next(self.parameters()).device


class LearnedRelativePositionBias(RelativePositionBias):
    """b(o) = w[clamp(o, lo, max_distance - 1) - lo], one learned scalar per offset (zeros at init,
    as in the paper's code). lo = -(max_distance - 1), or 0 when causal: a causal layer never
    attends to o < 0 (those scores are masked, and get no gradient), so it stores max_distance
    weights instead of 2 max_distance - 1. Offsets beyond max_distance - 1 share the last weight.
    """

    def __init__(self, max_distance, causal):
        super().__init__(causal)
        if max_distance < 1:
            raise ValueError(f"max_distance must be >= 1, got {max_distance}")
        self.max_distance = max_distance
        self.low = 0 if causal else -(max_distance - 1)
        self.weight = nn.Parameter(torch.zeros(max_distance - self.low))

    def forward(self, offsets):
        return self.weight[offsets.clamp(self.low, self.max_distance - 1) - self.low]


def t5_bucket(relative_position, *, bidirectional, num_buckets, max_distance):
    """T5's bucket of relative_position = j - i (key minus query), as in Raffel et al.'s code.

    Bidirectional: half the buckets for each sign. Within a sign, distances below
    max_exact = buckets / 2 get a bucket each, larger ones share logarithmically spaced buckets up
    to max_distance, beyond which everything falls in the last bucket. Causal (not
    bidirectional): keys after the query (j > i) all map to bucket 0 (they are masked anyway).
    """
    bucket = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        bucket = bucket + (relative_position > 0).long() * num_buckets
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp_min(0)
    max_exact = num_buckets // 2
    is_small = distance < max_exact
    # log-spaced buckets between max_exact and max_distance (the float ops mirror T5's code)
    large = (
        max_exact
        + (
            torch.log(distance.float().clamp_min(1) / max_exact)
            / math.log(max_distance / max_exact)
            * (num_buckets - max_exact)
        ).long()
    )
    large = large.clamp_max(num_buckets - 1)
    return bucket + torch.where(is_small, distance, large)


class T5RelativePositionBias(RelativePositionBias):
    """b(o) = w[bucket(-o)], T5's bucketed relative position bias with one head (zeros at init).

    Bidirectional bucketing for non-causal layers, causal bucketing (distances into the past
    only) for causal ones; num_buckets learned scalars.
    """

    def __init__(self, causal, num_buckets=32, max_distance=128):
        super().__init__(causal)
        if num_buckets < (2 if causal else 4):
            raise ValueError(f"num_buckets is too small: {num_buckets}")
        self.num_buckets = num_buckets
        self.max_distance = max_distance
        self.weight = nn.Parameter(torch.zeros(num_buckets))

    def forward(self, offsets):
        bucket = t5_bucket(
            -offsets,
            bidirectional=not self.causal,
            num_buckets=self.num_buckets,
            max_distance=self.max_distance,
        )
        return self.weight[bucket]


class RotaryEmbedding(nn.Module):
    """RoPE (Su et al.): rotate feature pairs (x_k, x_{k+h}) of token t by the angle
    t * base^(-k / h), k < h = floor(dim / 2); an odd last feature is left as is.

    <R_i q, R_j k> depends on i - j only, so rotating queries and keys by their absolute positions
    gives relative position information; decoding rotates token t by the same angle as the full
    forward does. Angles are formed in float64 and the rotation in float32 at least.
    """

    def __init__(self, dim, base=10000.0):
        super().__init__()
        self.dim = dim
        self.half = dim // 2
        self.base = base

    def angles(self, positions):
        k = torch.arange(self.half, device=positions.device, dtype=torch.float64)
        inv_freq = self.base ** (-k / max(self.half, 1))
        return positions.to(torch.float64)[:, None] * inv_freq  # (T, half)

    def forward(self, x, positions):
        """x: (*batch, T, dim); positions: (T,) absolute token positions."""
        if self.half == 0:
            return x
        compute = torch.promote_types(x.dtype, torch.float32)
        theta = self.angles(positions)
        cos, sin = theta.cos().to(compute), theta.sin().to(compute)
        h = self.half
        x1, x2, rest = x[..., :h].to(compute), x[..., h : 2 * h].to(compute), x[..., 2 * h :]
        rotated = torch.cat([x1 * cos - x2 * sin, x1 * sin + x2 * cos], dim=-1).to(x.dtype)
        return torch.cat([rotated, rest], dim=-1) if rest.shape[-1] else rotated


REL_POS = (None, "learned", "t5")


def make_rel_pos(kind, *, causal, max_distance, t5_buckets=32, t5_max_distance=128):
    if kind is None:
        return None
    if kind == "learned":
        return LearnedRelativePositionBias(max_distance, causal)
    if kind == "t5":
        return T5RelativePositionBias(causal, num_buckets=t5_buckets, max_distance=t5_max_distance)
    raise ValueError(f"rel_pos must be one of {REL_POS}, got {kind!r}")
