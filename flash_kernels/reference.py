"""Dense O(T^2) reference of mixed chunk attention: the simplest code that can be right.

Everything is written as one T x T matrix product so that each term of SPEC.md section 2 is
visible in a single line. Gradients come from autograd. Use float64 inputs for ground truth.
"""
import torch


def dense_reference(q_quad, k_quad, q_lin, k_lin, v, *, chunk_size, causal, rel_bias,
                    quad_scale, lin_scale):
    """out = (A + L) @ v with, for tokens i, j and chunks c(i) = i // chunk_size:

    A_ij = relu(quad_scale * <q_quad_i, k_quad_j> + rel_bias[i - j + C - 1])^2
           if c(i) == c(j) (and j <= i when causal), else 0
    L_ij = lin_scale * <q_lin_i, k_lin_j> if c(j) < c(i) (causal) or always (non-causal), else 0

    `chunk_size`, `quad_scale` and `lin_scale` must already be resolved (ints and floats).
    Computes in float32 at least (float64 stays float64); returns v's dtype.
    """
    T = v.shape[-2]
    C = chunk_size
    out_dtype = v.dtype
    compute_dtype = torch.promote_types(v.dtype, torch.float32)
    q_quad, k_quad, v = (x.to(compute_dtype) for x in (q_quad, k_quad, v))

    pos = torch.arange(T, device=v.device)
    offset = pos[:, None] - pos[None, :]                      # i - j
    chunk = pos // C
    same_chunk = chunk[:, None] == chunk[None, :]
    allowed = same_chunk & (offset >= 0) if causal else same_chunk

    scores = quad_scale * (q_quad @ k_quad.transpose(-1, -2))
    if rel_bias is not None:
        bias_index = (offset + C - 1).clamp(0, 2 * C - 2)      # clamped entries are masked below
        scores = scores + rel_bias.to(compute_dtype)[bias_index]
    attn = torch.where(allowed, torch.relu(scores) ** 2, torch.zeros((), dtype=compute_dtype,
                                                                      device=v.device))
    if q_lin is not None:
        earlier = chunk[None, :] < chunk[:, None] if causal else torch.ones_like(same_chunk)
        lin = lin_scale * (q_lin.to(compute_dtype) @ k_lin.to(compute_dtype).transpose(-1, -2))
        attn = attn + torch.where(earlier, lin, torch.zeros((), dtype=compute_dtype, device=v.device))
    return (attn @ v).to(out_dtype)
