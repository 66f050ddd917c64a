"""Prefill by packing: the attention of a prompt's tokens after those a DecodeCache holds, and
the cache moved past them, in ONE call of `flash_kernels.attention.mixed_chunk_attention` (the
public op, forward and backward: a prefill may be trained through). So decoding sits above the
public ops in the package's one-way order (docs/architecture.md)."""

import torch

from ..attention import mixed_chunk_attention


def prefill_attention(
    cache,
    q_quad,
    k_quad,
    q_lin,
    k_lin,
    v,
    *,
    held_rows,
    lengths=None,
    rel_bias_for=None,
    quad_scale=None,
    lin_scale=None,
    backend="auto",
):
    """The (B, T, E) attention of T new tokens per sequence after those `cache` holds, the
    cache advanced past them (keys, values, state and positions, in place).

    q_quad, k_quad, q_lin, k_lin: (B, T, S) roles of the new tokens (q_lin, k_lin None for
    quadratic attention only), v: (B, T, E). cache: a DecodeCache for the B sequences,
    allocated (its chunk_size is C; None: one chunk that never completes); held_rows: the rows
    of its buffers before this call (0 for a fresh cache, whose positions are 0). Row b
    continues its sequence by its first lengths[b] tokens (all T without lengths; the rest of
    the row is padding, its outputs meaningless). rel_bias_for(C): the (2C - 1,) bias of the
    op's chunk length C, or None; quad_scale, lin_scale, backend: as mixed_chunk_attention.

    Each row becomes one packed document that starts at its current chunk's first token: the
    chunk's buffered keys and values (queries zero, outputs dropped), then the new tokens;
    padding forms a document of its own. The op starts each document from the cache's state,
    and its final state (the completed chunks) and the new partial chunk become the cache.
    Shapes come from T and held_rows; nothing is read back from the device. A fresh cache and
    equal lengths take the op on the (B, T) rows directly.
    """
    B, T, E = v.shape
    linear = q_lin is not None
    new_tokens = (
        lengths if lengths is not None else torch.full((B,), T, dtype=torch.long, device=v.device)
    )
    held = cache.length if held_rows else torch.zeros_like(new_tokens)
    C = cache.chunk_size

    def rel_bias(chunk_len):
        return rel_bias_for(chunk_len) if rel_bias_for is not None else None

    roles = dict(q_quad=q_quad, k_quad=k_quad, q_lin=q_lin, k_lin=k_lin)
    if not held_rows and lengths is None:  # fresh cache, whole rows
        layout = dict(v=v, **{name: x for name, x in roles.items() if x is not None})
        packing = dict(chunk_size=C, rel_bias=rel_bias(C if C is not None else T))
        L = T
    else:
        L = held_rows + T
        layout = _continuation_layout(cache, roles, v, held, held_rows)
        ends = torch.arange(B, device=v.device) * L
        cu = torch.stack([ends, ends + held + new_tokens], dim=1).reshape(-1)
        packing = dict(
            chunk_size=C,
            rel_bias=rel_bias(C if C is not None else L),
            cu_seqlens=torch.cat([cu, cu.new_full((1,), B * L)]),
            max_seqlen=L,
        )
        layout = {name: x.reshape(1, B * L, x.shape[-1]) for name, x in layout.items()}
        if linear:  # document 2b is row b's sequence, 2b + 1 its padding
            initial = cache.state.new_zeros(1, 2 * B, q_quad.shape[-1], E)
            initial[0, 0::2] = cache.state
            packing["initial_state"] = initial
    result = mixed_chunk_attention(
        layout["q_quad"],
        layout["k_quad"],
        layout.get("q_lin"),
        layout.get("k_lin"),
        layout["v"],
        causal=True,
        quad_scale=quad_scale,
        lin_scale=lin_scale,
        output_final_state=linear,
        backend=backend,
        **packing,
    )
    out, final = result if linear else (result, None)
    out = out.reshape(B, L, E)
    if final is not None and final.dim() == 4:
        final = final[0, 0::2]
    with torch.no_grad():
        _fill_cache(
            cache, {k: x.reshape(B, L, -1) for k, x in layout.items()}, final, held + new_tokens
        )
        cache.position += new_tokens
    if L != T:  # the new tokens' rows of each document
        rows = (held[:, None] + torch.arange(T, device=v.device)).clamp(max=L - 1)
        out = out.gather(1, rows[..., None].expand(B, T, E))
    return out


def _continuation_layout(cache, roles, v, held, held_rows):
    """(B, held_rows + T, W) rows of every op input: row b's `held[b]` buffered keys and
    values (zero queries), its T new tokens, then zeros. A static-shape gather."""
    B, T, _ = v.shape
    r = torch.arange(held_rows + T, device=v.device)
    source = torch.where(
        r < held[:, None],
        r,
        torch.where(r < held[:, None] + T, held_rows + r - held[:, None], held_rows + T),
    )  # (B, L)

    def arrange(buffer, new):
        parts = [
            buffer[:, :held_rows].to(new.dtype)
            if buffer is not None
            else new.new_zeros(B, held_rows, new.shape[-1]),
            new,
            new.new_zeros(B, 1, new.shape[-1]),
        ]
        rows = torch.cat(parts, dim=1)
        return rows.gather(1, source[..., None].expand(-1, -1, new.shape[-1]))

    layout = dict(
        q_quad=arrange(None, roles["q_quad"]),
        k_quad=arrange(cache.k_quad, roles["k_quad"]),
        v=arrange(cache.v, v),
    )
    if roles["q_lin"] is not None:
        layout.update(
            q_lin=arrange(None, roles["q_lin"]), k_lin=arrange(cache.k_lin, roles["k_lin"])
        )
    return layout


def _fill_cache(cache, layout, final_state, tokens):
    """The cache after a prefill. layout: the op's (B, L, W) inputs by name, row b holding
    its sequence's current chunk from the chunk's first token on, tokens[b] rows of it;
    final_state: the op's (B, S, E) state of the completed chunks. The rows after the last
    completed chunk (all of them for one chunk that never completes) become the buffers,
    written in place."""
    C = cache.chunk_size
    L = layout["v"].shape[1]
    done = (tokens // C) * C if C is not None else torch.zeros_like(tokens)
    rows = torch.arange(cache.capacity, device=tokens.device)
    source = (done[:, None] + rows).clamp(max=L - 1)
    keep = rows[None, :] < (tokens - done)[:, None]
    for name in ("k_quad", "k_lin", "v"):
        buffer = getattr(cache, name)
        if buffer is None:
            continue
        x = layout[name]
        gathered = x.gather(1, source[..., None].expand(-1, -1, x.shape[-1]))
        # (the mask expanded: a broadcast one takes a slow CPU path in torch 2.13)
        buffer.copy_(
            torch.where(keep[..., None].expand_as(gathered), gathered, torch.zeros_like(gathered))
        )
    if final_state is not None:
        cache.state.copy_(final_state.detach())
