"""Dense O(T^2) reference of mixed chunk attention: the simplest code that can be right.

Everything is written as one T x T matrix product so that each term of the contract
(docs/contract.md section 2) is visible in a single line, and packed documents (section 7) are
literally a loop over the documents. Gradients come from autograd. Use float64 inputs for ground
truth.
"""

import torch


def nan_where(mask):
    """NaN where mask is True, else 0: added to a result, it marks what attends a non-finite
    value without cutting the gradient of the other terms (as torch.where would)."""
    return torch.zeros_like(mask, dtype=torch.float32).masked_fill(mask, float("nan"))


def _finite_rows(x):
    """x with its non-finite rows zeroed, and the (..., T) mask of those rows."""
    bad = ~torch.isfinite(x).all(dim=-1)
    return torch.where(bad[..., None], torch.zeros((), dtype=x.dtype, device=x.device), x), bad


def _pair_products(q, k, scale):
    """scale * q @ k^T, NaN where the query or the key row is non-finite: formed from finite
    rows, so a masked pair's gradient, zero, never meets a non-finite row in the backward."""
    q, bad_q = _finite_rows(q)
    k, bad_k = _finite_rows(k)
    products = scale * (q @ k.transpose(-1, -2))
    return products + nan_where(bad_q[..., :, None] | bad_k[..., None, :])


def dense_reference(
    q_quad, k_quad, q_lin, k_lin, v, *, chunk_size, causal, rel_bias, quad_scale, lin_scale
):
    """out = (A + L) @ v with, for tokens i, j and chunks c(i) = i // chunk_size:

    A_ij = relu(quad_scale * <q_quad_i, k_quad_j> + rel_bias[i - j + C - 1])^2
           if c(i) == c(j) (and j <= i when causal), else 0
    L_ij = lin_scale * <q_lin_i, k_lin_j> if c(j) < c(i) (causal) or always (non-causal), else 0

    Pairs outside those sets are removed by selection, not multiplied by zero: whatever a token
    that query i may not attend holds (NaN, inf), out_i does not see it; an output entry that
    attends a non-finite value is NaN.
    `chunk_size`, `quad_scale` and `lin_scale` must already be resolved (ints and floats).
    Computes in float32 at least (float64 stays float64); returns v's dtype.
    """
    T = v.shape[-2]
    C = chunk_size
    out_dtype = v.dtype
    compute_dtype = torch.promote_types(v.dtype, torch.float32)
    zero = torch.zeros((), dtype=compute_dtype, device=v.device)

    pos = torch.arange(T, device=v.device)
    offset = pos[:, None] - pos[None, :]  # i - j
    chunk = pos // C
    same_chunk = chunk[:, None] == chunk[None, :]
    quad_pairs = same_chunk & (offset >= 0) if causal else same_chunk

    scores = _pair_products(q_quad.to(compute_dtype), k_quad.to(compute_dtype), quad_scale)
    if rel_bias is not None:
        bias_index = (offset + C - 1).clamp(0, 2 * C - 2)  # clamped entries are masked below
        scores = scores + rel_bias.to(compute_dtype)[bias_index]
    weights = torch.relu(torch.where(quad_pairs, scores, zero)) ** 2
    attended = quad_pairs
    if q_lin is not None:
        lin_pairs = chunk[None, :] < chunk[:, None] if causal else torch.ones_like(same_chunk)
        lin = _pair_products(q_lin.to(compute_dtype), k_lin.to(compute_dtype), lin_scale)
        weights = weights + torch.where(lin_pairs, lin, zero)
        attended = attended | lin_pairs

    v = v.to(compute_dtype)
    bad_v = ~torch.isfinite(v)
    out = weights @ torch.where(bad_v, zero, v)
    if bad_v.any():  # which outputs attend a non-finite value (ground truth: a plain count)
        seen = (attended.to(compute_dtype) @ bad_v.to(compute_dtype)) > 0
        out = out + nan_where(seen)
    return out.to(out_dtype)


def reference_attention(
    q_quad,
    k_quad,
    q_lin,
    k_lin,
    v,
    *,
    chunk_size,
    causal,
    rel_bias,
    quad_scale,
    lin_scale,
    cu_seqlens=None,
    initial_state=None,
    store_total=False,
):
    """The contract's section 7 as a loop over the packed documents (cu_seqlens; without it the
    sequence is one document), each run through `dense_reference` alone:

        out[bos:eos] = dense_reference(document n) + lin_scale * q_lin[bos:eos] @ initial_state[n]
        total[n]     = sum over the document's complete chunks g of H_g

    (the final state is initial_state + total: core/plan.py, Documents.finish).
    initial_state: (*batch, N, S, E) with cu_seqlens, else (*batch, S, E). Returns (out, total)
    with total (*batch, N, S, E) with cu_seqlens, else (*batch, S, E), in float32 (float64 for
    float64 inputs) when store_total, else None.
    """
    packed = cu_seqlens is not None
    bounds = cu_seqlens.tolist() if packed else [0, v.shape[-2]]
    compute_dtype = torch.promote_types(v.dtype, torch.float32)
    outs, totals = [], []
    for n, (bos, eos) in enumerate(zip(bounds[:-1], bounds[1:])):

        def doc(x):
            return None if x is None else x[..., bos:eos, :]

        out = dense_reference(
            doc(q_quad),
            doc(k_quad),
            doc(q_lin),
            doc(k_lin),
            doc(v),
            chunk_size=chunk_size,
            causal=causal,
            rel_bias=rel_bias,
            quad_scale=quad_scale,
            lin_scale=lin_scale,
        )
        if initial_state is not None:
            start = (initial_state[..., n, :, :] if packed else initial_state).to(compute_dtype)
            out = (out.to(compute_dtype) + lin_scale * (doc(q_lin).to(compute_dtype) @ start)).to(
                v.dtype
            )
        outs.append(out)
        if store_total:
            complete = (eos - bos) // chunk_size * chunk_size
            k_done = doc(k_lin)[..., :complete, :].to(compute_dtype)
            v_done = doc(v)[..., :complete, :].to(compute_dtype)
            totals.append(k_done.transpose(-1, -2) @ v_done)
    out = torch.cat(outs, dim=-2) if outs else v[..., :0, :].clone()
    if not store_total:
        return out, None
    if not packed:
        return out, totals[0]
    S, E = q_lin.shape[-1], v.shape[-1]
    total = (
        torch.stack(totals, dim=-3)
        if totals
        else v.new_zeros(*v.shape[:-2], 0, S, E, dtype=compute_dtype)
    )
    return out, total
