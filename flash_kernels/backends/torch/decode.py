"""One decoding step in tensor code: the "torch" (and "reference") backend of the decode ops
(flash_kernels/decoding/step.py), the same arithmetic and cache update as the Triton kernel
(backends/triton/kernels/mixed_chunk_decode.py)."""

import torch

from ...core.environment import cuda_graph_capturing


def _select(mask, x, other):
    """torch.where(mask, x, other) with the mask expanded to x's shape first: on the CPU (torch
    2.13) a mask broadcast along the last dim takes a slow path, ~40x slower."""
    return torch.where(mask.expand_as(x), x, other)


def decode_torch(q_quad, k_quad, q_lin, k_lin, v, cache, *, rel_bias, quad_scale, lin_scale):
    """The decode step in tensor code (inputs (B, S) / (B, E), scales resolved): the output
    (B, E) in the compute dtype, the cache updated in place, as the kernel does (see
    kernels/mixed_chunk_decode.py). Rows past a sequence's length hold zeros (the cache's
    invariant), so the products run over whole buffers and only the weights are masked.
    Static shapes; no value read back to the host except one `any()` deciding whether a
    chunk completes, skipped under torch.compile and CUDA graph capture (the fold is then
    computed for every sequence and selected)."""
    B, S = q_quad.shape
    cap = cache.capacity
    compute = torch.promote_types(v.dtype, torch.float32)
    zero = torch.zeros((), dtype=compute, device=v.device)
    n = cache.length  # (B,) row of the token
    fits = n < cap
    row = n.clamp(max=cap - 1)
    rows = torch.arange(cap, device=v.device)
    attended = (rows[None, :] <= n[:, None]) & fits[:, None]  # (B, cap)
    completes = (n == cache.chunk_size - 1) if cache.chunk_size is not None else None

    for buffer, new in ((cache.k_quad, k_quad), (cache.k_lin, k_lin), (cache.v, v)):
        if buffer is not None:  # buffer[b, n_b] = new[b] where the row fits
            index = row.view(B, 1, 1).expand(B, 1, buffer.shape[-1])
            old = buffer.gather(1, index)
            buffer.scatter_(
                1, index, _select(fits.view(B, 1, 1), new[:, None].to(buffer.dtype), old)
            )

    scores = quad_scale * (cache.k_quad.to(compute) @ q_quad.to(compute)[:, :, None])[..., 0]
    if rel_bias is not None:
        C = cache.bias_chunk
        offsets = (n[:, None] - rows[None, :]).clamp(0, C - 1)  # masked rows: any index
        scores = scores + rel_bias.to(compute)[offsets + C - 1]
    weights = torch.where(attended, torch.relu(scores).square(), zero)  # (B, cap)
    values = cache.v.to(compute)
    out = (weights[:, None, :] @ values)[:, 0]  # (B, E)
    if q_lin is not None:
        out = out + lin_scale * (q_lin.to(compute)[:, None, :] @ cache.state)[:, 0]
    out = _select(fits[:, None], out, torch.full_like(out, float("nan")))

    if completes is not None and (
        torch.compiler.is_compiling() or cuda_graph_capturing() or bool(completes.any())
    ):
        restart = completes.view(B, 1, 1)
        if cache.state is not None:
            fold = cache.k_lin.to(compute).transpose(1, 2) @ values  # (B, S, E)
            cache.state.add_(_select(restart, fold, zero))
        for buffer in (cache.k_quad, cache.k_lin, cache.v):
            if buffer is not None:
                buffer.masked_fill_(restart.expand_as(buffer), 0)
    cache.position.add_(fits.to(cache.position.dtype))
    return out
