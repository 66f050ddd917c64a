"""Decoding: `DecodeCache` (cache.py), the one-token decode ops `mixed_chunk_decode` and
`flash_attention_decode` (step.py, on the backends' decoding steps), and prefill by packing
(prefill.py, which calls the public op flash_kernels.attention.mixed_chunk_attention)."""

from .cache import DecodeCache
from .prefill import prefill_attention
from .step import flash_attention_decode, mixed_chunk_decode

__all__ = ["DecodeCache", "flash_attention_decode", "mixed_chunk_decode", "prefill_attention"]
