"""flash-kernels: fused Triton kernels for FLASH mixed chunk attention (Hua et al., ICML 2022).

The public API. The layers of the package, each importing only those below it
(docs/architecture.md): nn/ and selftest/, decoding/, attention.py (the two ops),
distributed/ (context parallelism), backends/ (torch, triton), core/.
"""

from . import nn
from ._version import __version__
from .attention import flash_attention, mixed_chunk_attention
from .decoding import DecodeCache, flash_attention_decode, mixed_chunk_decode
from .selftest import self_test

__all__ = [
    "flash_attention",
    "mixed_chunk_attention",
    "DecodeCache",
    "mixed_chunk_decode",
    "flash_attention_decode",
    "nn",
    "self_test",
    "__version__",
]
