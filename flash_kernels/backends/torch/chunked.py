"""Chunked PyTorch implementation of mixed chunk attention: O(T) memory, differentiated by autograd.

This is the default CPU path and the baseline the Triton kernels are measured against. Per chunk
of C tokens it forms the C x C relu^2 scores (so memory is O(T * C), linear in T); the linear
part keeps one S x E state per chunk, in float32 at least, combined by an exclusive cumulative sum.

Packed documents (core/packing.py, ChunkTables) use the kernels' chunk slots: tokens are
gathered into a (B, slots, C, W) layout (idle slots and rows past a chunk's end read a zero
row), and the states are summed by a segmented scan over the slots, so nothing crosses a
document boundary and nothing waits for the device (every shape comes from T, C and N). Memory is
then O((T / C + N) C^2): many documents much shorter than a chunk waste most of their slots.

Masked positions are removed by selection (torch.where), never by multiplying by zero, so a
non-finite value in a token that a query may not attend cannot reach that query's output or
gradient. An output entry that attends a non-finite value is NaN. Those guards select nothing
when q_quad, k_quad and v are finite, and on the CPU (where asking costs no device
synchronisation) they are skipped then: they doubled the forward time at T = 4096.
"""

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F

from ...core.environment import functorch_transform_active
from ...core.packing import toeplitz_bias


class ChunkLayout(NamedTuple):
    """Where every (chunk slot, row) of the (B, G, C, W) layout reads its token."""

    source: torch.Tensor  # (G, C) token index, or T (a zero row) outside the chunk
    valid: torch.Tensor  # (G, C) the row holds a token of the slot's chunk
    doc: torch.Tensor  # (G,) document of the slot (0 without packing; idle slots: 0)
    last_complete: torch.Tensor  # (N,) slot of the document's last complete chunk, or -1
    last: torch.Tensor  # (N,) slot of the document's last chunk, or -1 (empty)
    position: torch.Tensor  # (T,) flat index g * C + row of every token (None: the first T)


def chunk_layout(T, chunk_size, C, tables, device):
    """The layout of T tokens in chunks of chunk_size (C = min(chunk_size, T) rows per slot)."""
    rows = torch.arange(C, device=device)
    if tables is None:
        num_slots = -(-T // C)
        token = torch.arange(num_slots * C, device=device).reshape(num_slots, C)
        num_complete = T // chunk_size
        return ChunkLayout(
            token.clamp(max=T),
            token < T,
            torch.zeros(num_slots, dtype=torch.long, device=device),
            torch.tensor([num_complete - 1], device=device),
            torch.tensor([num_slots - 1], device=device),
            None,
        )
    cu = tables.cu_seqlens.long()
    offsets = tables.chunk_offsets.long()
    doc = tables.chunk_table[:, 0].long()
    owned = doc >= 0
    doc = doc.clamp(min=0)
    start = cu[doc] + tables.chunk_table[:, 1].long().clamp(min=0) * chunk_size
    end = torch.minimum(start + chunk_size, cu[doc + 1])
    token = start[:, None] + rows
    lengths = cu[1:] - cu[:-1]
    num_complete = lengths // chunk_size
    last_complete = torch.where(num_complete > 0, offsets[:-1] + num_complete - 1, -1)
    last = torch.where(lengths > 0, offsets[1:] - 1, -1)
    # token t of document n (cu[n] <= t < cu[n + 1]) sits in slot offsets[n] + local // chunk_size
    t = torch.arange(T, device=device)
    token_doc = torch.searchsorted(cu[1:], t, right=True).clamp(max=max(tables.num_docs - 1, 0))
    local = t - cu[token_doc]
    position = (offsets[token_doc] + local // chunk_size) * C + local % chunk_size
    valid = owned[:, None] & (token < end[:, None])
    return ChunkLayout(torch.where(valid, token, T), valid, doc, last_complete, last, position)


def nan_where(mask):
    """NaN where mask is True, 0 elsewhere: added to a result, it marks the entries that attend
    a non-finite value without cutting the gradient of the others' terms (torch.where would)."""
    return torch.zeros_like(mask, dtype=torch.float32).masked_fill(mask, float("nan"))


def _nonfinite_rows(x):
    """(..., rows) True where a row of x (..., rows, W) holds a non-finite value."""
    return ~torch.isfinite(x).all(dim=-1)


def needs_nonfinite_guards(*tensors):
    """False when the guards against non-finite inputs provably select nothing: on the CPU
    with every tensor finite. Elsewhere the answer would cost a device synchronisation (and
    break CUDA graph capture), and under torch.compile a data-dependent branch, so the guards
    always run there, as under torch.func transforms (no .item() inside vmap)."""
    if (
        torch.compiler.is_compiling()
        or functorch_transform_active()
        or any(t.device.type != "cpu" for t in tensors)
    ):
        return True
    # A non-finite entry makes the sum non-finite; a finite sum proves them all finite (one
    # pass; a sum that overflows only costs the guarded path). isfinite().all() takes five.
    return not all(
        math.isfinite(t.detach().sum(dtype=torch.promote_types(t.dtype, torch.float32)))
        for t in tensors
    )


def _shift_within_documents(running, doc, step):
    """running[:, g - step] where slot g - step belongs to g's document, else 0 (slots >= step)."""
    same_doc = (doc[step:] == doc[:-step]).view(1, -1, 1, 1)
    return torch.where(
        same_doc, running[:, :-step], torch.zeros((), dtype=running.dtype, device=running.device)
    )


def _segmented_scan(states, doc):
    """Inclusive sums of states (B, G, ...) over the slots of each slot's document up to it.

    A Hillis-Steele scan: log2(G) steps of additions over the slots (a document's slots are
    contiguous). It only ever adds states of one document: never a difference of running sums
    across documents, which would cancel catastrophically."""
    total, step = states, 1
    while step < states.shape[1]:
        total = torch.cat(
            [total[:, :step], total[:, step:] + _shift_within_documents(total, doc, step)], dim=1
        )
        step *= 2
    return total


def _exclusive_within_documents(inclusive, doc):
    """The exclusive scan from the inclusive one: slot g gets slot g - 1's sum if the same
    document owns both, else 0."""
    if inclusive.shape[1] == 1:
        return torch.zeros_like(inclusive)
    return torch.cat(
        [torch.zeros_like(inclusive[:, :1]), _shift_within_documents(inclusive, doc, 1)], dim=1
    )


class ChunkedAttention:
    """mixed_chunk_attention_torch in two steps: building it sums the linear states (so
    `total`, the per-document totals, exists before any output), and `output(state_offset)`
    forms the output. Context parallelism sends `total` to the other ranks in between and
    passes what comes back as the state offset (no second pass over the keys)."""

    def __init__(
        self,
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
        tables=None,
    ):
        B, T, S = q_quad.shape
        E = v.shape[-1]
        C = min(chunk_size, T)  # rows per slot: a chunk never holds more than T tokens
        self.shape = (B, T, E)
        self.out_dtype = v.dtype
        self.compute_dtype = compute_dtype = torch.promote_types(v.dtype, torch.float32)
        self.zero = torch.zeros((), dtype=compute_dtype, device=v.device)
        self.layout = layout = chunk_layout(T, chunk_size, C, tables, v.device)
        self.num_slots, self.C = layout.source.shape[0], C
        self.chunk_size, self.causal, self.rel_bias = chunk_size, causal, rel_bias
        self.quad_scale, self.lin_scale = quad_scale, lin_scale
        self.q_quad, self.k_quad, self.v = q_quad, k_quad, v
        self.guarded = needs_nonfinite_guards(q_quad, k_quad, v)
        self.vc = self.chunked(v)
        self.total = self.ql = self.prefix = None
        if q_lin is not None:
            self.ql, kl = self.chunked(q_lin), self.chunked(k_lin)
            states = kl.transpose(-1, -2) @ self.vc  # (B, G, S, E): H_g
            if tables is None:
                inclusive = torch.cumsum(states, dim=1)
            else:
                inclusive = _segmented_scan(states, layout.doc)
            last = layout.last_complete if causal else layout.last
            self.total = torch.where(
                (last >= 0).view(1, -1, 1, 1), inclusive[:, last.clamp(min=0)], self.zero
            )
            if causal:  # exclusive prefix within the document: P_g = sum of its H_h, h < g
                if tables is None:
                    self.prefix = torch.cat(
                        [torch.zeros_like(inclusive[:, :1]), inclusive[:, :-1]], dim=1
                    )
                else:
                    self.prefix = _exclusive_within_documents(inclusive, layout.doc)
            else:
                self.prefix = self.total[:, layout.doc]

    def chunked(self, x):
        """x (B, T, W) as (B, slots, C, W) in the compute dtype, rows outside chunks zero."""
        B, num_slots, C, layout = x.shape[0], self.num_slots, self.C, self.layout
        if layout.position is None:  # dense: consecutive rows, the last chunk zero-padded
            x = x.to(self.compute_dtype)
            pad = num_slots * C - x.shape[1]
            return (F.pad(x, (0, 0, 0, pad)) if pad else x).reshape(B, num_slots, C, x.shape[-1])
        # one gather from x with a zero row appended (index T): rows outside chunks read it
        rows = F.pad(x.to(self.compute_dtype), (0, 0, 0, 1))[:, layout.source.reshape(-1)]
        return rows.reshape(B, num_slots, C, x.shape[-1])

    def output(self, state_offset=None):
        """The (B, T, E) output, every chunk of document n also reading the unscaled
        state_offset[:, n] (B, N, S, E) when given."""
        B, T, E = self.shape
        C, layout, device = self.C, self.layout, self.v.device
        valid_row = layout.valid
        qq, kq, vc = self.chunked(self.q_quad), self.chunked(self.k_quad), self.vc

        valid = valid_row[:, :, None] & valid_row[:, None, :]  # (G, C, C)
        if self.causal:
            valid = valid & torch.ones(C, C, dtype=torch.bool, device=device).tril()
        out = self.quadratic_output(qq, kq, vc, valid)

        if self.ql is not None:
            prefix = self.prefix
            if state_offset is not None:
                prefix = prefix + state_offset.to(self.compute_dtype)[:, layout.doc]
            out = out + self.lin_scale * (self.ql @ prefix)

        out = out.reshape(B, self.num_slots * C, E)
        out = out[:, :T] if layout.position is None else out[:, layout.position]
        return out.to(self.out_dtype)

    def quadratic_output(self, qq, kq, vc, valid):
        """The intra-chunk output (B, G, C, E): relu^2 scores of the pairs in valid, times v."""
        C, zero, device, guarded = self.C, self.zero, self.v.device, self.guarded
        if guarded:
            # Scores from finite rows; a pair with a non-finite query or key row is NaN, and
            # only pairs a query may attend survive the selection, so no gradient reaches the
            # others.
            bad_q, bad_k = _nonfinite_rows(qq), _nonfinite_rows(kq)
            qq = torch.where(bad_q[..., None], zero, qq)
            kq = torch.where(bad_k[..., None], zero, kq)
        scores = self.quad_scale * (qq @ kq.transpose(-1, -2))  # (B, G, C, C)
        if guarded:
            scores = scores + nan_where(bad_q[..., :, None] | bad_k[..., None, :])
        if self.rel_bias is not None:
            scores = scores + toeplitz_bias(
                self.rel_bias.to(self.compute_dtype), self.chunk_size, C
            )
        attn = torch.relu(torch.where(valid, scores, zero)).square()  # 0 where masked
        if not guarded:
            return attn @ vc

        # Values: a non-finite v[j, e] reaches exactly the queries that attend j, as NaN.
        bad_v = ~torch.isfinite(vc)  # (B, G, C, E)
        out = attn @ torch.where(bad_v, zero, vc)
        if (
            self.causal
        ):  # query i attends rows j <= i of its chunk: the first bad row poisons the rest
            row = torch.arange(C, device=device).view(1, 1, C, 1)
            first_bad = torch.where(bad_v, row, C).amin(dim=2, keepdim=True)
            poisoned = row >= first_bad
        else:
            poisoned = bad_v.any(dim=2, keepdim=True)
        return out + nan_where(poisoned)


def mixed_chunk_attention_torch(
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
    tables=None,
    state_offset=None,
    store_total=False,
):
    """Inputs (B, T, S) and (B, T, E) with one flattened batch dim; resolved chunk_size and scales.

    tables: packed documents (core.packing.ChunkTables); state_offset: optional (B, N, S, E)
    unscaled state every chunk of document n starts from (N = 1 without packing). Returns
    (out, total): total is None unless store_total, else the (B, N, S, E) per-document sums of
    k_lin^T v over complete chunks (causal) or over all chunks (non-causal), in the compute
    dtype, as the kernels' state scan (kernels/chunk_state.py).
    """
    run = ChunkedAttention(
        q_quad,
        k_quad,
        q_lin,
        k_lin,
        v,
        chunk_size=chunk_size,
        causal=causal,
        rel_bias=rel_bias,
        quad_scale=quad_scale,
        lin_scale=lin_scale,
        tables=tables,
    )
    return run.output(state_offset), (run.total if store_total else None)
