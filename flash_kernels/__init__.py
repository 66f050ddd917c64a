"""flash-kernels: fused Triton kernels for FLASH mixed chunk attention (Hua et al., ICML 2022)."""
from .decode import DecodeCache, flash_attention_decode, mixed_chunk_decode
from .flash_attention import flash_attention
from .mixed_chunk_attention import mixed_chunk_attention
from . import nn  # noqa: E402  (layers built on the two ops)

__version__ = "0.1.0"
__all__ = ["flash_attention", "mixed_chunk_attention", "DecodeCache", "mixed_chunk_decode",
           "flash_attention_decode", "nn"]
