"""flash-kernels: fused Triton kernels for FLASH mixed chunk attention (Hua et al., ICML 2022)."""
from .mixed_chunk_attention import mixed_chunk_attention

__version__ = "0.1.0"
__all__ = ["mixed_chunk_attention"]
