"""flash-kernels: fused Triton kernels for FLASH mixed chunk attention (Hua et al., ICML 2022)."""
from .decode import DecodeCache, flash_attention_decode, mixed_chunk_decode
from .flash_attention import flash_attention
from .mixed_chunk_attention import mixed_chunk_attention
from . import nn  # noqa: E402  (layers built on the two ops)

__version__ = "0.1.0"
__all__ = ["flash_attention", "mixed_chunk_attention", "DecodeCache", "mixed_chunk_decode",
           "flash_attention_decode", "nn", "self_test"]


def __getattr__(name):
    """`flash_kernels.self_test` (flash_kernels/selftest.py), imported on first use: importing
    it here eagerly would make `python -m flash_kernels.selftest` find the module already
    loaded (runpy warns) and would load the self-test into every program that uses the ops."""
    if name == "self_test":
        from .selftest import self_test
        return self_test
    raise AttributeError(f"module 'flash_kernels' has no attribute {name!r}")
