"""Batched decoding: one new token per sequence against a constant-size cache.

    mixed_chunk_decode(q_quad, k_quad, q_lin, k_lin, v, cache, ...)   -> (B, E)
    flash_attention_decode(z, gamma, beta, v, cache, u=None, ...)     -> (B, E)

FLASH needs, per sequence, the float32 S x E state of its completed chunks plus the keys and
values of its current chunk (at most C tokens): a `DecodeCache`, whose size does not depend on
how many tokens came before. Each call takes the new token of every sequence (sequences may
sit at different positions in their chunks), returns its output -- exactly the full op's output
for that token -- and updates the cache in place (keys and values written, the chunk folded
into the state when it completes, positions advanced). Shapes are static and nothing reads a
value back to the host, so a whole model's decoding step can be captured in a CUDA graph
(torch.cuda.graphs, or torch.compile(mode="reduce-overhead")).

Backends: "triton" is one kernel launch per call (backends/triton/decode.py and
kernels/mixed_chunk_decode.py); "torch" (and "reference") is plain tensor code
(backends/torch/decode.py); "auto" picks as the full ops do (core.plan.pick_backend). The cache
is decoding/cache.py's DecodeCache.
"""

import torch

from ..backends import triton as triton_backend
from ..backends.torch.decode import decode_torch
from ..core.plan import pick_backend, resolve_scales
from ..core.roles import affine_stack, scale_offset_roles
from ..core.validation import BACKENDS, check_scale, check_tensor, type_name
from .cache import check_cache


def _check_rows(named, B, device, dtype):
    """Every (name, tensor, width) is a (B, width) tensor of `dtype` on `device`."""
    for name, x, width in named:
        check_tensor(name, x, min_dim=2)
        if x.dim() != 2 or x.shape[0] != B or x.shape[1] != width:
            raise ValueError(
                f"{name} must have shape ({B}, {width}) (one new token per "
                f"sequence), got {tuple(x.shape)}"
            )
        if x.dtype != dtype:
            raise TypeError(
                f"{name} has dtype {x.dtype} but v has {dtype}: the new token's "
                f"tensors share one dtype"
            )
        if x.device != device:
            raise ValueError(f"{name} is on {x.device} but v is on {device}")


def _check_decode_options(cache, rel_bias, quad_scale, lin_scale, backend, device):
    check_scale("quad_scale", quad_scale)
    check_scale("lin_scale", lin_scale)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if cache.chunk_size is None and quad_scale is None:
        raise ValueError(
            "one growing chunk (chunk_size=None) needs an explicit quad_scale: the "
            "full op's default 1 / T depends on the whole sequence's length, which "
            "a decoder cannot know"
        )
    if rel_bias is None:
        return
    if not isinstance(rel_bias, torch.Tensor) or not rel_bias.is_floating_point():
        raise TypeError(
            f"rel_bias must be a floating torch.Tensor or None, got {type_name(rel_bias)}"
        )
    C = cache.bias_chunk
    if tuple(rel_bias.shape) != (2 * C - 1,):
        what = f"chunk_size={C}" if cache.chunk_size is not None else f"capacity={C}"
        raise ValueError(
            f"rel_bias must have shape (2 * C - 1,) = ({2 * C - 1},) for the "
            f"cache's {what}, got {tuple(rel_bias.shape)}"
        )
    if rel_bias.device != device:
        raise ValueError(f"rel_bias is on {rel_bias.device} but the inputs are on {device}")


def _scales(cache, quad_scale, lin_scale):
    return resolve_scales(quad_scale, lin_scale, cache.bias_chunk)


def mixed_chunk_decode(
    q_quad,
    k_quad,
    q_lin,
    k_lin,
    v,
    cache,
    *,
    rel_bias=None,
    quad_scale=None,
    lin_scale=None,
    backend="auto",
):
    """One decoding step of mixed chunk attention for a batch of sequences.

    Sequence b has seen p_b = cache.position[b] tokens; its new token is row n = p_b mod C of
    the current chunk (n = p_b with cache.chunk_size=None). With j over the chunk's rows:

        s_j  = quad_scale * <q_quad, k_quad_j> + rel_bias[(n - j) + C - 1]     (j <= n)
        out  = sum_{j <= n} relu(s_j)^2 v_j  +  lin_scale * q_lin^T state

    where row n holds the new token's own k_quad and v, and state is the float32 sum of
    k_lin^T v over the sequence's completed chunks: exactly the output of
    `mixed_chunk_attention` (causal, same chunk_size, rel_bias and scales) at that token.
    Then, in place: the token's k_quad, k_lin and v are written to row n; if the chunk is now
    complete (n = C - 1) its k_lin^T v is added to the state (float32) and the buffers restart;
    cache.position[b] += 1. A sequence whose row does not fit (n >= capacity: a full one-chunk
    cache) gets a NaN output and an unchanged cache.

    Args:
        q_quad, k_quad: (B, S) the new token's quadratic query and key, one row per sequence.
        q_lin, k_lin: (B, S) its linear query and key, or both None (quadratic only; the cache
            then has no state).
        v: (B, E) its value. All five share dtype and device (fold heads into B).
        cache: a `DecodeCache` for B sequences (DecodeCache.empty, or a prefill's); its
            chunk_size is C (None: one chunk that never completes).
        rel_bias: optional (2C - 1,) Toeplitz bias (C = the cache's chunk_size, or its capacity
            with chunk_size=None), entry o + C - 1 for offset o = i - j, as the full op's.
        quad_scale, lin_scale: default 1 / C like the full op (with chunk_size=None, quad_scale
            is required: 1 / T has no decoding equivalent).
        backend: "auto" (Triton on CUDA, or on CPU under TRITON_INTERPRET=1; else "torch"),
            "triton" (one kernel launch; float64 goes to "torch"), "torch" or "reference"
            (tensor code, float64 exact).

    Returns:
        (B, E) tensor in v's dtype. Inference only: no autograd through the cache updates.
    """
    return _decode(
        "mixed_chunk_decode",
        q_quad,
        k_quad,
        q_lin,
        k_lin,
        v,
        cache,
        gate=None,
        gamma_beta=None,
        rel_bias=rel_bias,
        quad_scale=quad_scale,
        lin_scale=lin_scale,
        backend=backend,
    )


def flash_attention_decode(
    z,
    gamma,
    beta,
    v,
    cache,
    *,
    u=None,
    rel_bias=None,
    quad_scale=None,
    lin_scale=None,
    backend="auto",
):
    """One decoding step of `flash_attention` (roles from z, optional gate) for a batch.

        q_quad = z * gamma[0] + beta[0]    k_quad = z * gamma[1] + beta[1]
        q_lin  = z * gamma[2] + beta[2]    k_lin  = z * gamma[3] + beta[3]   (rows 2, 3 optional)
        out    = u * mixed_chunk_decode(q_quad, k_quad, q_lin, k_lin, v, cache, ...)

    each role formed in float32 and rounded to z's dtype as flash_attention does; the Triton
    kernel forms them on the fly and applies the gate before rounding the output (as the full
    op's kernels). z: (B, S); gamma, beta: (4, S) or (2, S); v, u: (B, E). Other arguments
    and the cache update as `mixed_chunk_decode`; returns (B, E) in v's dtype.
    """
    return _decode(
        "flash_attention_decode",
        z,
        None,
        None,
        None,
        v,
        cache,
        gate=u,
        gamma_beta=(gamma, beta),
        rel_bias=rel_bias,
        quad_scale=quad_scale,
        lin_scale=lin_scale,
        backend=backend,
    )


def _check_gamma_beta(gamma, beta, S, device):
    for name, x in (("gamma", gamma), ("beta", beta)):
        if not isinstance(x, torch.Tensor) or not x.is_floating_point():
            raise TypeError(f"{name} must be a floating torch.Tensor, got {type_name(x)}")
        if x.dim() != 2 or x.shape[0] not in (2, 4) or x.shape[1] != S:
            raise ValueError(
                f"{name} must have shape (4, S) (rows quad_q, quad_k, lin_q, lin_k) "
                f"or (2, S) (quadratic only) with S = z.shape[-1] = {S}, got "
                f"{tuple(x.shape)}"
            )
        if x.device != device:
            raise ValueError(f"{name} is on {x.device} but z is on {device}")
    if gamma.shape != beta.shape:
        raise ValueError(
            f"gamma and beta must have the same shape, got {tuple(gamma.shape)} "
            f"and {tuple(beta.shape)}"
        )


def _decode(
    op,
    q_quad,
    k_quad,
    q_lin,
    k_lin,
    v,
    cache,
    *,
    gate,
    gamma_beta,
    rel_bias,
    quad_scale,
    lin_scale,
    backend,
):
    check_tensor("v", v, min_dim=2)
    if v.dim() != 2:
        raise ValueError(
            f"v must have shape (B, E) (one new token per sequence), got {tuple(v.shape)}"
        )
    B, E = v.shape
    device, dtype = v.device, v.dtype
    from_z = gamma_beta is not None
    if from_z:
        check_tensor("z", q_quad, min_dim=2)
        S = q_quad.shape[-1]
        _check_rows(
            [("z", q_quad, S)] + ([("u", gate, E)] if gate is not None else []), B, device, dtype
        )
        _check_gamma_beta(*gamma_beta, S, device)
        linear = gamma_beta[0].shape[0] == 4
        names = ("z", "v")
    else:
        if (q_lin is None) != (k_lin is None):
            given, missing = ("q_lin", "k_lin") if k_lin is None else ("k_lin", "q_lin")
            raise ValueError(
                f"{given} was given without {missing}: pass both (linear part) or "
                f"neither (quadratic only)"
            )
        check_tensor("q_quad", q_quad, min_dim=2)
        S = q_quad.shape[-1]
        linear = q_lin is not None
        named = [("q_quad", q_quad, S), ("k_quad", k_quad, S)]
        if linear:
            named += [("q_lin", q_lin, S), ("k_lin", k_lin, S)]
        _check_rows(named, B, device, dtype)
        names = ("q_quad", "v")
    if S == 0:
        raise ValueError(f"{names[0]} has S = 0 features: queries and keys need S >= 1")
    check_cache(cache, batch=B, S=S, E=E, linear=linear, dtype=dtype, device=device, names=names)
    _check_decode_options(cache, rel_bias, quad_scale, lin_scale, backend, device)
    quad, lin = _scales(cache, quad_scale, lin_scale)

    if pick_backend(backend, device, dtype, S) == "triton":
        triton_backend.require()
        affine = affine_stack(*gamma_beta) if from_z else None
        with torch.no_grad():
            return triton_backend.decode.decode_triton(
                q_quad,
                k_quad,
                q_lin,
                k_lin,
                v,
                cache,
                gate=gate,
                affine=affine,
                rel_bias=rel_bias,
                quad_scale=quad,
                lin_scale=lin,
            )
    if from_z:
        roles = scale_offset_roles(q_quad, *gamma_beta)
        q_quad, k_quad = roles[0], roles[1]
        q_lin, k_lin = (roles[2], roles[3]) if linear else (None, None)
    with torch.no_grad():
        out = decode_torch(
            q_quad,
            k_quad,
            q_lin,
            k_lin,
            v,
            cache,
            rel_bias=rel_bias,
            quad_scale=quad,
            lin_scale=lin,
        ).to(dtype)
    return out if gate is None else gate * out
