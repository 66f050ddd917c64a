"""Agreeing on a context-parallel call before any collective that could hang: every rank
all-gathers a small int64 descriptor of its call (lengths, leading dims, sizes, options, which
inputs need a gradient), so that a bad grouping, or a bad input on one rank, raises the same
error on every rank instead of leaving the others waiting (context_parallel.py)."""

import math
import struct

import torch
import torch.distributed as dist

from ..core.validation import type_name
from .collectives import CPCall, _descriptor_device, all_gather_flat

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_BATCH_SLOTS = 6  # leading dims sent as they are; more are folded into the last slot
_DESCRIPTOR_FIELDS = (
    "error",
    "T",
    "S",
    "E",
    "chunk_size",
    "op",
    "causal",
    "linear",
    "rel_bias",
    "gate",
    "grad",
    "dtype",
    "quad_scale",
    "lin_scale",
    "batch_dims",
) + tuple(f"batch{i}" for i in range(_BATCH_SLOTS))
_OPS = ("mixed_chunk_attention", "flash_attention")


def check_group(cp_group):
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError(
            "cp_group needs torch.distributed initialised (torch.distributed.init_process_group)"
        )
    if not isinstance(cp_group, dist.ProcessGroup):
        raise TypeError(
            f"cp_group must be a torch.distributed ProcessGroup (e.g. "
            f"torch.distributed.group.WORLD or one from new_group), got "
            f"{type_name(cp_group)}"
        )


def _float_bits(x):
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _bits_float(n):
    return struct.unpack("<d", struct.pack("<q", int(n)))[0]


def describe(
    *,
    op,
    batch,
    T,
    S,
    E,
    chunk_size,
    causal,
    linear,
    rel_bias,
    gate,
    grad_inputs,
    dtype,
    quad_scale,
    lin_scale,
):
    """This rank's call as the descriptor's fields (all ints)."""
    batch = tuple(batch)
    if len(batch) > _BATCH_SLOTS:
        batch = batch[: _BATCH_SLOTS - 1] + (math.prod(batch[_BATCH_SLOTS - 1 :]),)
    fields = dict(
        error=0,
        T=T,
        S=S,
        E=E,
        chunk_size=chunk_size,
        op=_OPS.index(op),
        causal=int(causal),
        linear=int(linear),
        rel_bias=int(rel_bias),
        gate=int(gate),
        grad=sum(1 << i for i, need in enumerate(grad_inputs) if need),
        dtype=_DTYPES.index(dtype),
        quad_scale=_float_bits(quad_scale),
        lin_scale=_float_bits(lin_scale),
        batch_dims=len(tuple(batch)),
    )
    for i in range(_BATCH_SLOTS):
        fields[f"batch{i}"] = batch[i] if i < len(batch) else -1
    return fields


def _readable(name, fields, grad_names):
    """A descriptor field as a user would read it."""
    if name == "batch":  # dims past the slots are folded into the last one (describe)
        return tuple(fields[f"batch{i}"] for i in range(min(fields["batch_dims"], _BATCH_SLOTS)))
    value = fields[name]
    if name in ("quad_scale", "lin_scale"):
        return _bits_float(value)
    if name == "dtype":
        return _DTYPES[value]
    if name == "op":
        return _OPS[value]
    if name == "grad":
        return tuple(n for i, n in enumerate(grad_names) if value >> i & 1) or "none"
    if name in ("causal", "linear", "rel_bias", "gate"):
        return bool(value)
    return value


_GRAD_NAMES = {
    0: ("q_quad", "k_quad", "q_lin", "k_lin", "v", "rel_bias"),
    1: ("z", "gamma", "beta", "v", "u", "rel_bias"),
}
_MISMATCH_HINTS = {
    "grad": "every rank must run the backward of every context-parallel call, so the same "
    "inputs must need a gradient on every rank (and grad mode must agree)",
    "batch": "every rank holds a slice of the same sequences: the leading dims must agree",
}


def _grouping_error(descriptors, chunk_size):
    """The message of the first rule the gathered descriptors break, or None."""
    world_size = len(descriptors)
    first = descriptors[0]
    grad_names = _GRAD_NAMES[first["op"]]
    names = [n for n in _DESCRIPTOR_FIELDS if n not in ("error", "T") and not n.startswith("batch")]
    names.insert(names.index("S"), "batch")
    for name in names:
        values = [_readable(name, d, grad_names) for d in descriptors]
        if any(value != values[0] for value in values):
            shown = ", ".join(f"rank {r}: {value}" for r, value in enumerate(values))
            label = "leading dims (*batch)" if name == "batch" else name
            hint = _MISMATCH_HINTS.get(name, "every rank must make the same call")
            return f"cp_group: the ranks disagree on {label} ({shown}): {hint}"
    lengths = [d["T"] for d in descriptors]
    for r, length in enumerate(lengths[:-1]):
        if length % chunk_size:
            return (
                f"cp_group: rank {r} holds {length} tokens, not a multiple of "
                f"chunk_size={chunk_size}: every rank's slice but the last rank's "
                f"(rank {world_size - 1}) must be a whole number of chunks "
                f"(slice lengths by rank: {lengths})"
            )
    return None


def agree_on_call(group, local_checks):
    """Run `local_checks()` (returning (descriptor fields, value)) and agree with the other
    ranks: returns (CPCall, value), or raises on EVERY rank the same error (a local check's,
    prefixed with the rank that raised it, or a broken grouping rule as a ValueError)."""
    check_group(group)
    rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    error = None
    try:
        fields, value = local_checks()
    except (TypeError, ValueError, RuntimeError) as caught:
        error = caught
        fields = dict.fromkeys(_DESCRIPTOR_FIELDS, 0)
        fields["error"] = 1
    descriptor = torch.tensor(
        [fields[n] for n in _DESCRIPTOR_FIELDS], dtype=torch.int64, device=_descriptor_device(group)
    )
    gathered = torch.empty(
        world_size * descriptor.numel(), dtype=torch.int64, device=descriptor.device
    )
    all_gather_flat(gathered, descriptor, group)
    rows = gathered.view(world_size, -1).tolist()
    descriptors = [dict(zip(_DESCRIPTOR_FIELDS, row)) for row in rows]
    if any(d["error"] for d in descriptors):
        # Only taken when some rank failed: a rank-identical condition, so every rank joins.
        reports = [None] * world_size
        report = None if error is None else (type(error).__name__, str(error))
        dist.all_gather_object(reports, report, group=group)
        failed = next(r for r, rep in enumerate(reports) if rep is not None)
        kind, message = reports[failed]
        exception = {"TypeError": TypeError, "RuntimeError": RuntimeError}.get(kind, ValueError)
        raise exception(f"{message} (cp_group: raised by rank {failed}'s inputs, on every rank)")
    message = _grouping_error(descriptors, fields["chunk_size"])
    if message is not None:
        raise ValueError(message)
    call = CPCall(
        group=group,
        rank=rank,
        world_size=world_size,
        lengths=tuple(d["T"] for d in descriptors),
        chunk_size=fields["chunk_size"],
        causal=bool(fields["causal"]),
        quad_scale=_bits_float(fields["quad_scale"]),
        lin_scale=_bits_float(fields["lin_scale"]),
    )
    return call, value


def grad_needed(*tensors):
    """Which of the tensors (None allowed) need a gradient in this call."""
    grad = torch.is_grad_enabled()
    return [grad and x is not None and x.requires_grad for x in tensors]
