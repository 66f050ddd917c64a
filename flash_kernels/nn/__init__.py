"""PyTorch modules for FLASH (Hua et al., ICML 2022) built on the package's attention ops.

- `ScaleOffset`: per-role gamma/beta of the shared z.
- `LearnedRelativePositionBias`, `T5RelativePositionBias`: the (2C - 1,) Toeplitz bias.
- `RotaryEmbedding`: RoPE at absolute positions.
- `GAU` (full quadratic attention), `FLASH` (mixed chunk attention): pre-norm layers with
  residual and a one-token `step` for decoding with an `AttentionCache`.
- `FLASHLM`: embedding, layers, tied head; `prefill`, `step`, `generate`.
"""

from .cache import AttentionCache
from .layers import FLASH, GAU, GatedAttentionLayer
from .lm import FLASHLM, sample_next
from .norms import ScaleNorm, make_norm
from .position import (
    LearnedRelativePositionBias,
    RelativePositionBias,
    RotaryEmbedding,
    T5RelativePositionBias,
    make_rel_pos,
    t5_bucket,
)
from .scale_offset import ScaleOffset

__all__ = [
    "AttentionCache",
    "FLASH",
    "FLASHLM",
    "GAU",
    "GatedAttentionLayer",
    "LearnedRelativePositionBias",
    "RelativePositionBias",
    "RotaryEmbedding",
    "ScaleNorm",
    "ScaleOffset",
    "T5RelativePositionBias",
    "make_norm",
    "make_rel_pos",
    "sample_next",
    "t5_bucket",
]
