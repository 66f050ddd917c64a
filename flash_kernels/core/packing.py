"""Packed documents (`cu_seqlens`): the index tables every backend shares; and the Toeplitz
matrix of the relative bias.

Documents n = 0 .. N-1 are tokens [cu_seqlens[n], cu_seqlens[n + 1]) of the packed sequence.
Chunks restart at each document's first token, so document n has cdiv(len_n, C) chunks. The
kernels run one program per chunk slot; the tables map slots to (document, chunk of it):

    chunk_offsets[n] = sum_{m < n} cdiv(len_m, C)           (N + 1,) first slot of document n
    chunk_table[j]   = (n, j - chunk_offsets[n]) for the document n owning slot j, or (-1, -1)

The number of slots is a host integer computed from shapes alone, so nothing waits for the
device: sum_n cdiv(len_n, C) <= cdiv(T, C) + N - 1 (write len_n = a_n C + b_n with 0 <= b_n < C:
the documents with b_n > 0 add at most one chunk each beyond cdiv(T, C), and if any has b_n > 0,
cdiv(T, C) already counts one of those). At most N - 1 slots stay idle.
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F


class ChunkTables(NamedTuple):
    cu_seqlens: torch.Tensor  # (N + 1,) int64, on the inputs' device (sanitised, see below)
    chunk_offsets: torch.Tensor  # (N + 1,) int32
    chunk_table: torch.Tensor  # (num_slots, 2) int32
    num_docs: int
    num_slots: int


def num_chunk_slots(T, chunk_size, num_docs):
    """Chunk slots for N documents packed into T tokens (a bound from shapes alone)."""
    return max(1, -(-T // chunk_size) + num_docs - 1)


def chunk_tables(cu_seqlens, T, chunk_size, device):
    """The index tables of `cu_seqlens` (any integer tensor, on any device) for chunks of
    `chunk_size` tokens, as tensors on `device` (cu_seqlens int64, the others int32).

    The public ops validate cu_seqlens where its values can be read without waiting for the
    device. Where they are not read (a CUDA cu_seqlens with max_seqlen given), the values are
    clamped into a valid table here (first entry 0, last T, non-decreasing), so a bad table can
    give wrong numbers but never an out-of-bounds access, a hang or unwritten output.
    """
    num_docs = cu_seqlens.numel() - 1
    cu = cu_seqlens.to(device=device, dtype=torch.int64, non_blocking=True).clamp(0, T)
    cu = torch.cummax(cu, dim=0).values
    if num_docs:
        cu = torch.cat([cu.new_zeros(1), cu[1:-1], cu.new_full((1,), T)])
    lengths = cu[1:] - cu[:-1]
    chunks_per_doc = (lengths + chunk_size - 1) // chunk_size
    chunk_offsets = F.pad(torch.cumsum(chunks_per_doc, dim=0), (1, 0))
    num_slots = num_chunk_slots(T, chunk_size, num_docs)
    slot = torch.arange(num_slots, device=device)
    doc = torch.searchsorted(chunk_offsets[1:], slot, right=True)
    owned = doc < num_docs
    doc = doc.clamp(max=max(num_docs - 1, 0))
    chunk_of_doc = slot - chunk_offsets[doc] if num_docs else slot
    table = torch.where(
        owned[:, None], torch.stack([doc, chunk_of_doc], dim=1), torch.full_like(slot, -1)[:, None]
    )
    return ChunkTables(
        cu, chunk_offsets.to(torch.int32), table.to(torch.int32), num_docs, num_slots
    )


def toeplitz_bias(rel_bias, chunk_size, length):
    """(length, length) matrix whose (i, j) entry is rel_bias[i - j + chunk_size - 1]."""
    pos = torch.arange(length, device=rel_bias.device)
    return rel_bias[pos[:, None] - pos[None, :] + chunk_size - 1]
