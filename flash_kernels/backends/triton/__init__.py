"""The Triton backend: the kernels (kernels/), their tiles per target (gpu_target.py,
kernel_config.py), the one launch point (launch.py), the forward and backward launches
(problem.py, forward.py, backward.py), the custom ops of mixed_chunk_attention (mixed_chunk.py,
with the kernels' design notes), of the fused flash_attention (fused.py) and of the decoding
step (decode.py).

The Triton-availability guard: importing this package never fails. Its modules import triton
at their top; without a usable triton, IMPORT_ERROR says why and `require()` raises the error
an explicit backend='triton' gets (the PyTorch backends still work). The layers above reach the
modules through this package (`triton_backend.mixed_chunk...`), after `require()`. Importing
them here also registers the custom ops (torch.ops.flash_kernels.*) before anything is traced.
"""

try:
    from . import backward, decode, forward, fused, launch, mixed_chunk, problem  # noqa: F401
except ImportError as error:  # no usable triton
    IMPORT_ERROR = error
else:
    IMPORT_ERROR = None


def require():
    """Raise, with the reason, if the Triton backend cannot be used (triton failed to import)."""
    if IMPORT_ERROR is not None:
        raise RuntimeError(
            f"backend='triton' is unavailable: importing triton failed "
            f"({IMPORT_ERROR}); use backend='torch'"
        )
