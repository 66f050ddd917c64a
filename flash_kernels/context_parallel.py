"""Context parallelism: one sequence split across the ranks of a torch.distributed group
(`cp_group=` of mixed_chunk_attention and flash_attention; docs/contract.md section 8).

Rank r of the group holds the contiguous slice [start_r, start_r + T_r) of the sequence, with
the same leading dims on every rank; every slice but the last rank's is a whole number of
chunks (a rank may hold none). FLASH has no decay, so all a rank needs from the others is a sum
of S x E states. With Tot_r the unscaled sum of k_lin^T v over rank r's chunks (causal: its
complete chunks, which are all of them except on the last rank) and dTot_r = lin_scale * the
sum over rank r's tokens of q_lin^T dO:

    causal forward:    P_g = P_local_g + lin_scale * offset_r,   offset_r = sum_{r' < r} Tot_r'
    causal backward:   D_g = D_local_g + dfinal_r,               dfinal_r = sum_{r' > r} dTot_r'
    non-causal:        every chunk reads lin_scale * sum_{all r'} Tot_r', and D = sum_{all r'} dTot_r'

offset_r is rank r's initial state and dfinal_r the gradient of its final state: the kernels'
state hooks (common.state_offset_tile, HAS_DSTATE_OFFSET of the key backward) carry them.

Communication, per call and rank: one all-gather of the (B, S, E) totals in the forward and one
of the dTot in the backward, in the state dtype (float32; float64 for float64 inputs), so each
rank receives (W - 1) B S E values per direction (0.75 MiB per peer at S = 128, E = 1536, fp32).
An all-gather followed by a fixed-order sum on every rank, rather than an all-reduce or a ring:
one collective, and every rank forms its sums from the same bits in the same order (an
all-reduce sums in an order the library picks). The backward's all-gather is started
asynchronously after the reverse state scan and overlaps the query-side kernel (which needs
the forward states, not D); the key side waits for it. Quadratic-only calls exchange no state.

Before that, every call's forward all-gathers a small int64 descriptor of each rank's call
(lengths, leading dims, sizes, options, which inputs need a gradient) so that a bad grouping,
or a bad input on one rank, raises the same error on every rank instead of leaving the others
waiting in a collective. On an NCCL group the host reads the descriptors back, which waits for
the GPU once per call; a group created with backend "cpu:gloo,cuda:nccl" does this check on the
CPU instead.

Rules every rank must follow (else a collective hangs until the group's timeout): call the op
with the same sequence of calls, and run the backward of every call whose inputs need a
gradient (activation checkpointing reruns the forward, with its collectives, on every rank
alike). Parameter gradients (rel_bias, gamma, beta) are per-rank partials: summing them over the
ranks (the usual all-reduce of parameter gradients) gives the whole-sequence gradient; the op
never reduces them itself. Packed documents (cu_seqlens) and state in/out (initial_state,
output_final_state) are not supported with cp_group (a clear error). torch.compile graph-breaks
around a context-parallel call (it runs eagerly).
"""
import math
import struct
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .torch_chunked import ChunkedAttention
from .utils import resolve_scales
from .validation import (check_flash_inputs, check_options, check_rel_bias,
                         check_tensors_of_mixed_chunk, type_name)

try:
    from .triton_flash_attention import affine_stack, reduce_role_grads, roles_from_z
    from .triton_mixed_chunk import (BackwardLaunches, Problem, Roles, check_triton_inputs,
                                     feature_contiguous, forward_output, forward_state_scan)
except ImportError as error:         # no usable triton: the PyTorch path still works
    _TRITON_IMPORT_ERROR = error

    def check_triton_inputs(*args):
        raise RuntimeError(f"backend='triton' is unavailable: importing triton failed "
                           f"({_TRITON_IMPORT_ERROR}); use backend='torch'")

_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)
_BATCH_SLOTS = 6     # leading dims sent as they are; more are folded into the last slot
_DESCRIPTOR_FIELDS = ("error", "T", "S", "E", "chunk_size", "op", "causal", "linear", "rel_bias",
                      "gate", "grad", "dtype", "quad_scale", "lin_scale", "batch_dims") + \
    tuple(f"batch{i}" for i in range(_BATCH_SLOTS))
_OPS = ("mixed_chunk_attention", "flash_attention")


# -- collectives ---------------------------------------------------------------------------------

def _backend_name(group):
    return str(dist.get_backend(group)).lower()


def _collective_device(group, device):
    """Where a tensor on `device` goes through the group's collectives: its own device when
    the backend takes it, else the CPU (gloo only moves CPU tensors)."""
    if device.type == "cpu":
        return device
    backend = _backend_name(group)
    if any(name in backend for name in ("nccl", "xccl", "ucc")):
        return device
    return torch.device("cpu")


def _descriptor_device(group):
    """The descriptors travel on the CPU when the group has a CPU backend, else on the current
    CUDA device (NCCL moves only GPU tensors)."""
    backend = _backend_name(group)
    if any(name in backend for name in ("gloo", "mpi", "ucc")):
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


_all_gather_flat_op = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


class _Gathered:
    """An all-gather in flight; wait() returns the (W, *shape) gathered tensors."""

    def __init__(self, tensor, group, world_size, async_op):
        self._shape, self._device = tensor.shape, tensor.device
        # Both buffers flat: gloo rejects a stacked (W, *shape) output and a shaped input
        # ("invalid tensor size"), which NCCL would accept.
        send = tensor.detach().reshape(-1).to(_collective_device(group, tensor.device)).contiguous()
        self._buffer = send.new_empty(world_size * send.numel())
        self._work = _all_gather_flat_op(self._buffer, send, group=group, async_op=async_op)
        self._send = send          # alive until the collective is done

    def wait(self):
        if self._work is not None:
            self._work.wait()
            self._work = None
        return self._buffer.to(self._device).view(-1, *self._shape)


@dataclass(frozen=True)
class CPCall:
    """One context-parallel call as every rank agreed on it: the group, this rank's place, the
    slice lengths of all ranks and the resolved options."""
    group: object
    rank: int
    world_size: int
    lengths: tuple
    chunk_size: int
    causal: bool
    quad_scale: float
    lin_scale: float

    def all_gather(self, tensor, async_op=False):
        return _Gathered(tensor, self.group, self.world_size, async_op)

    def sum_earlier(self, gathered):
        """sum_{r' < rank} gathered[r'] in rank order, None on rank 0."""
        if self.rank == 0:
            return None
        total = gathered[0].clone()
        for r in range(1, self.rank):
            total += gathered[r]
        return total

    def sum_later(self, gathered):
        """sum_{r' > rank} gathered[r'], from the last rank down (the reverse scan's order),
        None on the last rank."""
        if self.rank == self.world_size - 1:
            return None
        total = gathered[self.world_size - 1].clone()
        for r in range(self.world_size - 2, self.rank, -1):
            total += gathered[r]
        return total

    def sum_all(self, gathered, skip=None):
        """sum_{r'} gathered[r'] in rank order (r' != skip): the same bits on every rank."""
        total = torch.zeros_like(gathered[0])
        for r in range(self.world_size):
            if r != skip:
                total += gathered[r]
        return total


# -- agreeing on the call ------------------------------------------------------------------------

def check_group(cp_group):
    if not (dist.is_available() and dist.is_initialized()):
        raise RuntimeError("cp_group needs torch.distributed initialised "
                           "(torch.distributed.init_process_group)")
    if not isinstance(cp_group, dist.ProcessGroup):
        raise TypeError(f"cp_group must be a torch.distributed ProcessGroup (e.g. "
                        f"torch.distributed.group.WORLD or one from new_group), got "
                        f"{type_name(cp_group)}")


def check_cp_options(chunk_size, cu_seqlens, max_seqlen, initial_state, output_final_state,
                     backend):
    """The options context parallelism does not take (a clear error rather than a guess)."""
    if chunk_size is None:
        raise ValueError("chunk_size=None (one chunk as long as the sequence) cannot be split "
                         "across the ranks of cp_group: context parallelism needs a chunk_size")
    for name, value in (("cu_seqlens", cu_seqlens), ("max_seqlen", max_seqlen),
                        ("initial_state", initial_state)):
        if value is not None:
            raise ValueError(f"{name} is not supported with cp_group (packed documents and state "
                             f"in/out are single-process features)")
    if output_final_state is not False:
        raise ValueError("output_final_state is not supported with cp_group")
    if backend == "reference":
        raise ValueError("backend='reference' (the dense ground truth) has no context parallel "
                         "path: use 'torch', 'triton' or 'auto' with cp_group")


def _float_bits(x):
    return struct.unpack("<q", struct.pack("<d", float(x)))[0]


def _bits_float(n):
    return struct.unpack("<d", struct.pack("<q", int(n)))[0]


def describe(*, op, batch, T, S, E, chunk_size, causal, linear, rel_bias, gate, grad_inputs,
             dtype, quad_scale, lin_scale):
    """This rank's call as the descriptor's fields (all ints)."""
    batch = tuple(batch)
    if len(batch) > _BATCH_SLOTS:
        batch = batch[:_BATCH_SLOTS - 1] + (math.prod(batch[_BATCH_SLOTS - 1:]),)
    fields = dict(error=0, T=T, S=S, E=E, chunk_size=chunk_size, op=_OPS.index(op),
                  causal=int(causal), linear=int(linear), rel_bias=int(rel_bias), gate=int(gate),
                  grad=sum(1 << i for i, need in enumerate(grad_inputs) if need),
                  dtype=_DTYPES.index(dtype), quad_scale=_float_bits(quad_scale),
                  lin_scale=_float_bits(lin_scale), batch_dims=len(tuple(batch)))
    for i in range(_BATCH_SLOTS):
        fields[f"batch{i}"] = batch[i] if i < len(batch) else -1
    return fields


def _readable(name, fields, grad_names):
    """A descriptor field as a user would read it."""
    if name == "batch":       # dims past the slots are folded into the last one (describe)
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


_GRAD_NAMES = {0: ("q_quad", "k_quad", "q_lin", "k_lin", "v", "rel_bias"),
               1: ("z", "gamma", "beta", "v", "u", "rel_bias")}
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
            return (f"cp_group: rank {r} holds {length} tokens, not a multiple of "
                    f"chunk_size={chunk_size}: every rank's slice but the last rank's "
                    f"(rank {world_size - 1}) must be a whole number of chunks "
                    f"(slice lengths by rank: {lengths})")
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
    descriptor = torch.tensor([fields[n] for n in _DESCRIPTOR_FIELDS], dtype=torch.int64,
                              device=_descriptor_device(group))
    gathered = torch.empty(world_size * descriptor.numel(), dtype=torch.int64,
                           device=descriptor.device)
    _all_gather_flat_op(gathered, descriptor, group=group)
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
    call = CPCall(group=group, rank=rank, world_size=world_size,
                  lengths=tuple(d["T"] for d in descriptors), chunk_size=fields["chunk_size"],
                  causal=bool(fields["causal"]), quad_scale=_bits_float(fields["quad_scale"]),
                  lin_scale=_bits_float(fields["lin_scale"]))
    return call, value


def _grad_needed(*tensors):
    grad = torch.is_grad_enabled()
    return [grad and x is not None and x.requires_grad for x in tensors]


# -- the Triton path -----------------------------------------------------------------------------

def _triton_forward(call, roles, v, rel_bias, gate=None, store_attn=False):
    """(out, attn, states, offset) of this rank's slice; see the module docstring."""
    B, T, S = roles.q_quad.shape
    E = v.shape[-1]
    causal, lin_scale = call.causal, call.lin_scale
    p = Problem(roles.q_quad, v, call.chunk_size) if T else None
    states = offset = None
    if roles.has_linear:
        if T:
            states, total = forward_state_scan(roles, v, p, causal=causal, lin_scale=lin_scale,
                                               store_total=True)
        else:           # no token, no state: the collective is joined all the same
            total = torch.zeros((B, 1, S, E), dtype=torch.float32, device=v.device)
        gathered = call.all_gather(total).wait()
        if causal:
            offset = call.sum_earlier(gathered)
        else:
            # Every rank reads the same bits: the global sum, not its own total plus the rest.
            offset = call.sum_all(gathered)
            states = torch.zeros_like(states) if states is not None else None
    if not T:
        out = v.new_empty((B, 0, E))
        return out, (out.clone() if store_attn else None), states, offset
    out, attn = forward_output(roles, v, rel_bias, p, causal=causal,
                               quad_scale=call.quad_scale, lin_scale=lin_scale, states=states,
                               state_offset=offset, gate=gate, store_attn=store_attn)
    return out, attn, states, offset


def _triton_backward(call, grad_out, roles, v, rel_bias, states, offset, needs,
                     role_grad_dtype=None):
    """Gradients (dq_quad, dk_quad, dq_lin, dk_lin, dv, drel_bias) of this rank's slice, None
    where `needs` (q_quad, k_quad, q_lin, k_lin, v, rel_bias) is False. The all-gather of the
    reverse totals runs while the query-side kernel does."""
    B, T, S = roles.q_quad.shape
    E = v.shape[-1]
    causal = call.causal
    # Whether the ranks exchange dTot: the same on every rank (they agreed on the grad mask).
    exchange = roles.has_linear and (needs[3] or needs[4])
    if not T:
        if exchange:
            call.all_gather(torch.zeros((B, 1, S, E), dtype=torch.float32,
                                        device=v.device)).wait()
        dtype = role_grad_dtype or v.dtype
        empty_s = v.new_empty((B, 0, S), dtype=dtype)
        grads = [empty_s.clone() if need else None for need in needs[:4]]
        grads.append(v.new_empty((B, 0, E)) if needs[4] else None)
        grads.append(torch.zeros(2 * call.chunk_size - 1, dtype=torch.float32, device=v.device)
                     if needs[5] and rel_bias is not None else None)
        return grads
    launches = BackwardLaunches(grad_out, roles, v, rel_bias, call.chunk_size, causal,
                                call.quad_scale, call.lin_scale, list(needs) + [False],
                                role_grad_dtype=role_grad_dtype)
    pending = dstates = None
    if exchange:
        dstates, dtotal = launches.reverse_scan(store_total=causal)
        pending = call.all_gather(dtotal if causal else dstates, async_op=True)
    launches.query_side(states, offset)
    dfinal = None
    if pending is not None:
        gathered = pending.wait()
        if causal:
            dfinal = call.sum_later(gathered)
        else:
            dfinal = call.sum_all(gathered)
            dstates = torch.zeros_like(dstates)
    launches.key_side(dstates, dfinal)
    return list(launches.gradients()[:6])


class _MixedChunkCP(torch.autograd.Function):
    """mixed_chunk_attention's Triton path under context parallelism (flattened (B, T, W))."""

    @staticmethod
    def forward(ctx, call, q_quad, k_quad, q_lin, k_lin, v, rel_bias):
        roles = Roles(q_quad, k_quad, q_lin, k_lin)
        out, _, states, offset = _triton_forward(call, roles, v, rel_bias)
        ctx.save_for_backward(q_quad, k_quad, q_lin, k_lin, v, rel_bias, states, offset)
        ctx.call = call
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q_quad, k_quad, q_lin, k_lin, v, rel_bias, states, offset = ctx.saved_tensors
        needs = tuple(bool(n) for n in ctx.needs_input_grad[1:7])
        grads = _triton_backward(ctx.call, grad_out.contiguous(),
                                 Roles(q_quad, k_quad, q_lin, k_lin), v, rel_bias, states,
                                 offset, needs)
        return (None, *grads)


class _FlashCP(torch.autograd.Function):
    """flash_attention's fused Triton path (roles formed from z in the kernels, gate u) under
    context parallelism (flattened (B, T, W); affine is the (2, 4, S) [gamma; beta] stack)."""

    @staticmethod
    def forward(ctx, call, num_roles, store_attn, z, affine, v, u, rel_bias):
        roles = roles_from_z(z, affine, num_roles)
        out, attn, states, offset = _triton_forward(call, roles, v, rel_bias, gate=u,
                                                    store_attn=store_attn)
        ctx.save_for_backward(z, affine, v, u, rel_bias, states, offset, attn)
        ctx.call, ctx.num_roles = call, num_roles
        return out

    @staticmethod
    def backward(ctx, grad_out):
        z, affine, v, u, rel_bias, states, offset, attn = ctx.saved_tensors
        num_roles = ctx.num_roles
        _, _, _, need_z, need_affine, need_v, need_u, need_bias = ctx.needs_input_grad
        grad_out = grad_out.contiguous()
        du = (grad_out.float() * attn.float()).to(u.dtype) if u is not None and need_u else None
        grad_attn = grad_out if u is None else (grad_out.float() * u.float()).to(v.dtype)
        need_roles = need_z or need_affine
        linear = need_roles and num_roles == 4
        grads = _triton_backward(ctx.call, grad_attn.contiguous(),
                                 roles_from_z(z, affine, num_roles), v, rel_bias, states, offset,
                                 (need_roles, need_roles, linear, linear, need_v, need_bias),
                                 role_grad_dtype=torch.float32)
        dz, dgamma, dbeta = reduce_role_grads(grads[:num_roles], z, affine, need_z,
                                              need_affine, need_affine)
        daffine = None
        if need_affine:
            daffine = torch.zeros_like(affine)
            daffine[0, :num_roles] = dgamma
            daffine[1, :num_roles] = dbeta
        return None, None, None, dz, daffine, grads[4], du, grads[5]


# -- the PyTorch path ----------------------------------------------------------------------------

class _ExchangeTotals(torch.autograd.Function):
    """offset_r from this rank's total (B, S, E): sum_{r' < r} Tot_r' (causal, zeros on rank 0)
    or sum_{r' != r} Tot_r' (non-causal); its transpose in the backward:
    dTot_r = sum_{r' > r} doffset_r' (causal) or sum_{r' != r} doffset_r'."""

    @staticmethod
    def forward(ctx, call, total):
        ctx.call = call
        gathered = call.all_gather(total).wait()
        if call.causal:
            offset = call.sum_earlier(gathered)
            return offset if offset is not None else torch.zeros_like(total)
        return call.sum_all(gathered, skip=call.rank)

    @staticmethod
    def backward(ctx, grad_offset):
        call = ctx.call
        gathered = call.all_gather(grad_offset.contiguous()).wait()
        if call.causal:
            dtotal = call.sum_later(gathered)
            return None, (dtotal if dtotal is not None else torch.zeros_like(grad_offset))
        return None, call.sum_all(gathered, skip=call.rank)


def _torch_forward(call, q_quad, k_quad, q_lin, k_lin, v, rel_bias):
    """This rank's slice on the chunked PyTorch path, differentiated by autograd: the slice's
    total (torch_chunked.ChunkedAttention sums it before forming any output) goes through
    _ExchangeTotals and comes back as the state offset of the output."""
    B, T, S = q_quad.shape
    if not T:
        # Empty, but connected to every input as the Triton path's is (each gets an empty or
        # zero gradient), and to the exchange, whose backward collective this rank must join.
        out = v[:, :0]
        for x in (q_quad, k_quad, q_lin, k_lin):
            if x is not None:
                out = out + x.sum(-1, keepdim=True)
        if rel_bias is not None:
            out = out + rel_bias.sum().to(out.dtype)
        if q_lin is not None:
            compute = torch.promote_types(v.dtype, torch.float32)
            total = k_lin.to(compute).transpose(1, 2) @ v.to(compute)          # zeros
            offset = _ExchangeTotals.apply(call, total)
            out = out + (call.lin_scale * (q_lin.to(compute) @ offset)).to(v.dtype)
        return out
    run = ChunkedAttention(q_quad, k_quad, q_lin, k_lin, v, chunk_size=call.chunk_size,
                           causal=call.causal, rel_bias=rel_bias, quad_scale=call.quad_scale,
                           lin_scale=call.lin_scale)
    if q_lin is None:
        return run.output()
    offset = _ExchangeTotals.apply(call, run.total[:, 0])
    return run.output(offset[:, None])


# -- the public ops' entries ---------------------------------------------------------------------

def _pick_backend(backend, v, S):
    # Imported here: mixed_chunk_attention imports this module (the public ops dispatch to it).
    from .mixed_chunk_attention import pick_backend
    return pick_backend(backend, v.device, v.dtype, S)


def _check_and_describe(op, first_name, first, v, *, linear, gate, grad_inputs, chunk_size,
                        causal, rel_bias, quad_scale, lin_scale, cu_seqlens, max_seqlen,
                        initial_state, output_final_state, backend):
    """The checks both ops share after their own input checks (first: the (*batch, T, S)
    input, q_quad or z), and the call's description with the resolved backend."""
    check_options(chunk_size, causal, quad_scale, lin_scale, backend)
    check_cp_options(chunk_size, cu_seqlens, max_seqlen, initial_state, output_final_state,
                     backend)
    check_rel_bias(rel_bias, C=chunk_size, chunk_size=chunk_size, packed=False,
                   device=first.device, device_owner=first_name)
    *batch, T, S = first.shape
    resolved = _pick_backend(backend, v, S)
    if resolved == "triton":
        check_triton_inputs(first, v)
    quad, lin = resolve_scales(quad_scale, lin_scale, chunk_size)
    fields = describe(op=op, batch=batch, T=T, S=S, E=v.shape[-1], chunk_size=chunk_size,
                      causal=causal, linear=linear, rel_bias=rel_bias is not None, gate=gate,
                      grad_inputs=grad_inputs, dtype=v.dtype, quad_scale=quad, lin_scale=lin)
    return fields, resolved


@torch.compiler.disable
def mixed_chunk_attention_cp(q_quad, k_quad, q_lin, k_lin, v, *, cp_group, chunk_size, causal,
                             rel_bias, quad_scale, lin_scale, cu_seqlens, max_seqlen,
                             initial_state, output_final_state, backend):
    """mixed_chunk_attention(..., cp_group=...): see the module docstring."""

    def local_checks():
        check_tensors_of_mixed_chunk(q_quad, k_quad, q_lin, k_lin, v)
        return _check_and_describe(
            "mixed_chunk_attention", "q_quad", q_quad, v, linear=q_lin is not None, gate=False,
            grad_inputs=_grad_needed(q_quad, k_quad, q_lin, k_lin, v, rel_bias),
            chunk_size=chunk_size, causal=causal, rel_bias=rel_bias, quad_scale=quad_scale,
            lin_scale=lin_scale, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
            initial_state=initial_state, output_final_state=output_final_state, backend=backend)

    call, resolved = agree_on_call(cp_group, local_checks)
    *batch, T, S = q_quad.shape
    E = v.shape[-1]
    B = math.prod(batch)

    def flat(x):
        return None if x is None else x.reshape(B, T, x.shape[-1])

    tensors = [flat(x) for x in (q_quad, k_quad, q_lin, k_lin, v)]
    if resolved == "torch":
        out = _torch_forward(call, *tensors, rel_bias)
    else:
        bias32 = rel_bias.float().contiguous() if rel_bias is not None else None
        out = _MixedChunkCP.apply(call, *(feature_contiguous(x) for x in tensors), bias32)
    return out.reshape(*batch, T, E)


@torch.compiler.disable
def flash_attention_cp(z, gamma, beta, v, *, u, cp_group, chunk_size, causal, rel_bias,
                       quad_scale, lin_scale, cu_seqlens, max_seqlen, initial_state,
                       output_final_state, backend):
    """flash_attention(..., cp_group=...): the fused Triton path, or on the PyTorch path the
    composition roles -> mixed chunk attention -> gate (see the module docstring)."""

    def local_checks():
        check_flash_inputs(z, gamma, beta, v, u)
        return _check_and_describe(
            "flash_attention", "z", z, v, linear=gamma.shape[0] == 4, gate=u is not None,
            grad_inputs=_grad_needed(z, gamma, beta, v, u, rel_bias),
            chunk_size=chunk_size, causal=causal, rel_bias=rel_bias, quad_scale=quad_scale,
            lin_scale=lin_scale, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
            initial_state=initial_state, output_final_state=output_final_state, backend=backend)

    call, resolved = agree_on_call(cp_group, local_checks)
    *batch, T, S = z.shape
    E = v.shape[-1]
    B = math.prod(batch)
    if resolved == "torch":
        from .flash_attention import scale_offset_roles     # (it imports this module)
        roles = [r.reshape(B, T, S) for r in scale_offset_roles(z, gamma, beta)]
        q_lin, k_lin = (roles[2], roles[3]) if len(roles) == 4 else (None, None)
        out = _torch_forward(call, roles[0], roles[1], q_lin, k_lin, v.reshape(B, T, E),
                             rel_bias).reshape(*batch, T, E)
        return out if u is None else u * out
    gate = None if u is None else feature_contiguous(u.reshape(B, T, E))
    store_attn = u is not None and u.requires_grad and torch.is_grad_enabled()
    bias32 = rel_bias.float().contiguous() if rel_bias is not None else None
    out = _FlashCP.apply(call, gamma.shape[0], store_attn, feature_contiguous(z.reshape(B, T, S)),
                         affine_stack(gamma, beta), feature_contiguous(v.reshape(B, T, E)), gate,
                         bias32)
    return out.reshape(*batch, T, E)
