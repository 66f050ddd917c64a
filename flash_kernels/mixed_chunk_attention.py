"""The public op `mixed_chunk_attention` (SPEC.md section 2): checks, defaults, backend choice."""
import math

import torch

from .reference import dense_reference
from .torch_chunked import mixed_chunk_attention_torch
from .utils import (INTERPRETED_KERNELS, TRITON_MAX_S, autocast_cast, autocast_dtype,
                    functorch_transform_active, triton_interpret_enabled)
from .validation import check_mixed_chunk_inputs

try:    # imported here so the custom ops are registered before anything is traced or compiled
    from .triton_mixed_chunk import mixed_chunk_attention_triton
except ImportError as error:         # no usable triton: the PyTorch backends still work
    _TRITON_IMPORT_ERROR = error

    def mixed_chunk_attention_triton(*args, **kwargs):
        raise RuntimeError(f"backend='triton' is unavailable: importing triton failed "
                           f"({_TRITON_IMPORT_ERROR}); use backend='torch'")


def pick_backend(backend, device, dtype, s):
    """The backend that runs: "auto" resolved, and float64 on "triton" sent to "torch".

    "auto" takes "torch" where the kernels cannot give the right answer: S > 256, float64,
    CPU tensors without the interpreter, bfloat16 under the interpreter (it cannot compute in
    bfloat16: SPEC section 6) and inside torch.func transforms. An explicit "triton" in the
    last two cases raises instead (check_triton_inputs).
    """
    if backend == "auto":
        on_triton_device = device.type == "cuda" or (device.type == "cpu" and triton_interpret_enabled())
        interpreter_bf16 = INTERPRETED_KERNELS and dtype == torch.bfloat16
        usable = (on_triton_device and dtype != torch.float64 and s <= TRITON_MAX_S
                  and not interpreter_bf16 and not functorch_transform_active())
        return "triton" if usable else "torch"
    if backend == "triton" and dtype == torch.float64:
        return "torch"          # the kernels compute in fp32; float64 (gradcheck) takes the exact path
    return backend


def resolve_options(T, chunk_size, causal, rel_bias, quad_scale, lin_scale):
    """Keyword options with chunk_size=None and the default scales (1 / C) resolved."""
    C = chunk_size if chunk_size is not None else T
    return dict(chunk_size=C, causal=causal, rel_bias=rel_bias,
                quad_scale=float(quad_scale) if quad_scale is not None else 1.0 / C,
                lin_scale=float(lin_scale) if lin_scale is not None else 1.0 / C)


def mixed_chunk_attention(q_quad, k_quad, q_lin, k_lin, v, *, chunk_size=256, causal=True,
                          rel_bias=None, quad_scale=None, lin_scale=None, backend="auto"):
    """FLASH mixed chunk attention: relu^2 attention inside chunks, linear attention across them.

    For tokens i, j in the same chunk of C tokens (c(i) = i // C):
        a_ij   = relu(quad_scale * <q_quad_i, k_quad_j> + rel_bias[i - j + C - 1])^2,
                 zero when causal and j > i
        quad_i = sum_j a_ij v_j
        lin_i  = lin_scale * q_lin_i^T sum_{g < c(i)} H_g   (all g when not causal),
                 with H_g = sum_{j in chunk g} k_lin_j v_j^T kept in float32
        out_i  = quad_i + lin_i

    Args:
        q_quad, k_quad: (*batch, T, S) queries and keys of the quadratic (intra-chunk) part.
        q_lin, k_lin: (*batch, T, S) queries and keys of the linear (inter-chunk) part, or both
            None for quadratic attention only.
        v: (*batch, T, E) values. All five tensors share dtype and device.
        chunk_size: C, any positive int; None means one chunk as long as the sequence.
        causal: causal mask inside chunks and an exclusive (earlier chunks only) linear state.
        rel_bias: optional (2C - 1,) Toeplitz bias, entry o + C - 1 for offset o = i - j.
            It may be float32 while the inputs are half; its gradient is returned.
        quad_scale, lin_scale: default 1 / C (constant, so causal outputs never depend on
            tokens that come later).
        backend: "auto" (Triton on CUDA, or on CPU when TRITON_INTERPRET=1, for S <= 256;
            else "torch"),
            "triton", "torch" (chunked PyTorch, O(T) memory) or "reference" (dense, O(T^2)).
            float64 inputs on the Triton backend run the "torch" path, so
            torch.autograd.gradcheck works on this op whatever the backend.
            "auto" also takes "torch" for bfloat16 under the Triton interpreter (which has no
            bfloat16 arithmetic) and inside torch.func transforms (grad, vmap, ...: the Triton
            custom ops have no functorch rules); an explicit "triton" raises in both cases.
            TRITON_INTERPRET must be set before flash_kernels is imported: the Triton
            backend ("auto" on CPU tensors included) raises if it was set later. Interpreted kernel launches are serialised (the interpreter is
            not thread-safe), so threads may call the op at once.

    Returns:
        (*batch, T, E) tensor in v's dtype. Inside torch.autocast, the five tensors are first
        cast to the autocast dtype (as a matmul's inputs are; float64 is left alone), so the
        output has that dtype; rel_bias keeps its own (float32 parameters stay float32).
    """
    cast = autocast_dtype(v)
    if cast is not None:
        q_quad, k_quad, q_lin, k_lin, v = (autocast_cast(x, cast) for x in (q_quad, k_quad, q_lin, k_lin, v))
        # Inside, every product is already in the precision chosen for it (fp32 accumulation,
        # fp32 states): autocast must not re-cast the PyTorch paths' float32 matmuls.
        with torch.autocast(v.device.type, enabled=False):
            return mixed_chunk_attention(q_quad, k_quad, q_lin, k_lin, v, chunk_size=chunk_size,
                                         causal=causal, rel_bias=rel_bias, quad_scale=quad_scale,
                                         lin_scale=lin_scale, backend=backend)
    check_mixed_chunk_inputs(q_quad, k_quad, q_lin, k_lin, v, chunk_size, causal, rel_bias,
                             quad_scale, lin_scale, backend)
    *batch, T, S = q_quad.shape
    E = v.shape[-1]
    if T == 0:
        return v[..., :0, :].clone()
    options = resolve_options(T, chunk_size, causal, rel_bias, quad_scale, lin_scale)

    backend = pick_backend(backend, v.device, v.dtype, S)
    if backend == "reference":
        return dense_reference(q_quad, k_quad, q_lin, k_lin, v, **options)

    B = math.prod(batch)

    def flat(x):
        return None if x is None else x.reshape(B, T, x.shape[-1])

    args = (flat(q_quad), flat(k_quad), flat(q_lin), flat(k_lin), flat(v))
    if backend == "torch":
        out = mixed_chunk_attention_torch(*args, **options)
    else:
        out = mixed_chunk_attention_triton(*args, **options)
    return out.reshape(*batch, T, E)
