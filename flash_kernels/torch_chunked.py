"""Chunked PyTorch implementation of mixed chunk attention: O(T) memory, differentiated by autograd.

This is the default CPU path and the baseline the Triton kernels are measured against. Per chunk
of C tokens it forms the C x C relu^2 scores (so memory is O(T * C), linear in T); the linear
part keeps one S x E state per chunk, in float32 at least, combined by an exclusive cumulative sum.
"""
import torch
import torch.nn.functional as F


def toeplitz_bias(rel_bias, chunk_size, length):
    """(length, length) matrix whose (i, j) entry is rel_bias[i - j + chunk_size - 1]."""
    pos = torch.arange(length, device=rel_bias.device)
    return rel_bias[pos[:, None] - pos[None, :] + chunk_size - 1]


def mixed_chunk_attention_torch(q_quad, k_quad, q_lin, k_lin, v, *, chunk_size, causal, rel_bias,
                                quad_scale, lin_scale):
    """Inputs (B, T, S) and (B, T, E) with one flattened batch dim; resolved chunk_size and scales.

    Pads T to a multiple of C with zeros: a padded key has k = 0 and v = 0, so it adds nothing
    to the linear states, and its quadratic score (which may be relu(bias)^2 > 0) is masked.
    """
    B, T, S = q_quad.shape
    E = v.shape[-1]
    # A sequence shorter than one chunk is a single block of T tokens: no padding needed.
    C = min(chunk_size, T)
    num_chunks = -(-T // C)
    pad = num_chunks * C - T
    out_dtype = v.dtype
    compute_dtype = torch.promote_types(v.dtype, torch.float32)

    def chunked(x):
        x = x.to(compute_dtype)
        if pad:
            x = F.pad(x, (0, 0, 0, pad))
        return x.reshape(B, num_chunks, C, x.shape[-1])

    qq, kq, vc = chunked(q_quad), chunked(k_quad), chunked(v)

    scores = quad_scale * (qq @ kq.transpose(-1, -2))                 # (B, N, C, C)
    if rel_bias is not None:
        scores = scores + toeplitz_bias(rel_bias.to(compute_dtype), chunk_size, C)
    pos = torch.arange(num_chunks * C, device=v.device).reshape(num_chunks, 1, C)
    valid_key = pos < T                                                 # (N, 1, C)
    if causal:
        local = torch.arange(C, device=v.device)
        valid = valid_key & (local[None, :] <= local[:, None])          # (N, C, C)
    else:
        valid = valid_key.expand(num_chunks, C, C)
    attn = torch.where(valid, torch.relu(scores).square(), scores.new_zeros(()))
    out = attn @ vc                                                     # (B, N, C, E)

    if q_lin is not None:
        ql, kl = chunked(q_lin), chunked(k_lin)
        states = kl.transpose(-1, -2) @ vc                              # (B, N, S, E): H_g
        if causal:
            # exclusive prefix sum: P_g = H_0 + ... + H_{g-1}
            prefix = torch.cumsum(states, dim=1)
            prefix = torch.cat([torch.zeros_like(prefix[:, :1]), prefix[:, :-1]], dim=1)
            out = out + lin_scale * (ql @ prefix)
        else:
            out = out + lin_scale * (ql @ states.sum(dim=1, keepdim=True))

    return out.reshape(B, num_chunks * C, E)[:, :T].to(out_dtype)
