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
    non-causal:        every chunk reads lin_scale * sum_{all r'} Tot_r',
                       and D = sum_{all r'} dTot_r'

offset_r is rank r's initial state and dfinal_r the gradient of its final state: the kernels'
state hooks (common.state_offset_tile, HAS_DSTATE_OFFSET of the key backward) carry them
(collectives.CPCall.offset_and_states forms both).

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
waiting in a collective (agreement.py). On an NCCL group the host reads the descriptors back, which
waits for the GPU once per call; a group created with backend "cpu:gloo,cuda:nccl" does this check
on the CPU instead.

Rules every rank must follow (else a collective hangs until the group's timeout): call the op
with the same sequence of calls, and run the backward of every call whose inputs need a
gradient (activation checkpointing reruns the forward, with its collectives, on every rank
alike). Parameter gradients (rel_bias, gamma, beta) are per-rank partials: summing them over the
ranks (the usual all-reduce of parameter gradients) gives the whole-sequence gradient; the op
never reduces them itself. Packed documents (cu_seqlens) and state in/out (initial_state,
output_final_state) are not supported with cp_group (a clear error). torch.compile graph-breaks
around a context-parallel call (it runs eagerly).
"""

import torch

from ..backends import triton as triton_backend
from ..backends.torch.chunked import ChunkedAttention
from ..core.plan import FlashInputs, plan_call
from ..core.roles import affine_stack, scale_offset_roles
from ..core.validation import check_triton_inputs
from .agreement import agree_on_call, describe, grad_needed

# -- the Triton path -----------------------------------------------------------------------------


def _triton_forward(call, roles, v, rel_bias, gate=None, store_attn=False):
    """(out, attn, states, offset) of this rank's slice; see the module docstring."""
    B, T, S = roles.q_quad.shape
    E = v.shape[-1]
    causal, lin_scale = call.causal, call.lin_scale
    p = triton_backend.problem.Problem(roles.q_quad, v, call.chunk_size) if T else None
    states = offset = None
    if roles.has_linear:
        if T:
            states, total = triton_backend.forward.forward_state_scan(
                roles, v, p, causal=causal, lin_scale=lin_scale, store_total=True
            )
        else:  # no token, no state: the collective is joined all the same
            total = torch.zeros((B, 1, S, E), dtype=torch.float32, device=v.device)
        offset, states = call.offset_and_states(call.all_gather(total).wait(), states)
    if not T:
        out = v.new_empty((B, 0, E))
        return out, (out.clone() if store_attn else None), states, offset
    out, attn = triton_backend.forward.forward_output(
        roles,
        v,
        rel_bias,
        p,
        causal=causal,
        quad_scale=call.quad_scale,
        lin_scale=lin_scale,
        states=states,
        state_offset=offset,
        gate=gate,
        store_attn=store_attn,
    )
    return out, attn, states, offset


def _triton_backward(
    call, grad_out, roles, v, rel_bias, states, offset, needs, role_grad_dtype=None
):
    """The Gradients of this rank's slice (backward.Gradients; None where `needs`, a
    backward.BackwardNeeds, is False; no state offset's). The all-gather of the reverse totals
    runs while the query-side kernel does."""
    B, T, S = roles.q_quad.shape
    E = v.shape[-1]
    causal = call.causal
    # Whether the ranks exchange dTot: the same on every rank (they agreed on the grad mask).
    exchange = roles.has_linear and (needs.k_lin or needs.v)
    if not T:
        if exchange:
            call.all_gather(torch.zeros((B, 1, S, E), dtype=torch.float32, device=v.device)).wait()
        empty_s = v.new_empty((B, 0, S), dtype=role_grad_dtype or v.dtype)
        role_grads = {
            name: empty_s.clone() if getattr(needs, name) else None
            for name in ("q_quad", "k_quad", "q_lin", "k_lin")
        }
        drel_bias = None
        if needs.rel_bias and rel_bias is not None:
            drel_bias = torch.zeros(2 * call.chunk_size - 1, dtype=torch.float32, device=v.device)
        return triton_backend.backward.Gradients(
            **role_grads, v=v.new_empty((B, 0, E)) if needs.v else None, rel_bias=drel_bias
        )
    launches = triton_backend.backward.BackwardLaunches(
        grad_out,
        roles,
        v,
        rel_bias,
        call.chunk_size,
        causal,
        call.quad_scale,
        call.lin_scale,
        needs,
        role_grad_dtype=role_grad_dtype,
    )
    pending = dstates = None
    if exchange:
        dstates, dtotal = launches.reverse_scan(store_total=causal)
        pending = call.all_gather(dtotal if causal else dstates, async_op=True)
    launches.query_side(states, offset)
    dfinal = None
    if pending is not None:
        dfinal, dstates = call.offset_and_states(pending.wait(), dstates, reverse=True)
    launches.key_side(dstates, dfinal)
    return launches.gradients()


#: _MixedChunkCP.forward's inputs by name: its backward maps them to BackwardNeeds.
_MIXED_CHUNK_CP_INPUTS = ("call", "q_quad", "k_quad", "q_lin", "k_lin", "v", "rel_bias")


class _MixedChunkCP(torch.autograd.Function):
    """mixed_chunk_attention's Triton path under context parallelism (flattened (B, T, W))."""

    @staticmethod
    def forward(ctx, call, q_quad, k_quad, q_lin, k_lin, v, rel_bias):
        roles = triton_backend.problem.Roles(q_quad, k_quad, q_lin, k_lin)
        out, _, states, offset = _triton_forward(call, roles, v, rel_bias)
        ctx.save_for_backward(q_quad, k_quad, q_lin, k_lin, v, rel_bias, states, offset)
        ctx.call = call
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q_quad, k_quad, q_lin, k_lin, v, rel_bias, states, offset = ctx.saved_tensors
        need = dict(zip(_MIXED_CHUNK_CP_INPUTS, ctx.needs_input_grad))
        needs = triton_backend.backward.BackwardNeeds(
            **{name: bool(need[name]) for name in _MIXED_CHUNK_CP_INPUTS[1:]}
        )
        grads = _triton_backward(
            ctx.call,
            grad_out.contiguous(),
            triton_backend.problem.Roles(q_quad, k_quad, q_lin, k_lin),
            v,
            rel_bias,
            states,
            offset,
            needs,
        )
        return (None, grads.q_quad, grads.k_quad, grads.q_lin, grads.k_lin, grads.v, grads.rel_bias)


class _FlashCP(torch.autograd.Function):
    """flash_attention's fused Triton path (roles formed from z in the kernels, gate u) under
    context parallelism (flattened (B, T, W); affine is the (2, 4, S) [gamma; beta] stack)."""

    @staticmethod
    def forward(ctx, call, num_roles, store_attn, z, affine, v, u, rel_bias):
        roles = triton_backend.problem.Roles.from_z(z, affine, num_roles)
        out, attn, states, offset = _triton_forward(
            call, roles, v, rel_bias, gate=u, store_attn=store_attn
        )
        ctx.save_for_backward(z, affine, v, u, rel_bias, states, offset, attn)
        ctx.call, ctx.num_roles = call, num_roles
        return out

    @staticmethod
    def backward(ctx, grad_out):
        z, affine, v, u, rel_bias, states, offset, attn = ctx.saved_tensors
        num_roles = ctx.num_roles
        fused = triton_backend.fused
        _, _, _, need_z, need_affine, need_v, need_u, need_bias = ctx.needs_input_grad
        grad_attn, du = fused.gate_gradients(grad_out, u, attn, v, need_u)
        needs = fused.attention_needs(need_z or need_affine, num_roles, need_v, need_bias)
        grads = _triton_backward(
            ctx.call,
            grad_attn,
            triton_backend.problem.Roles.from_z(z, affine, num_roles),
            v,
            rel_bias,
            states,
            offset,
            needs,
            role_grad_dtype=torch.float32,
        )
        dz, dgamma, dbeta = fused.reduce_role_grads(
            fused.role_gradients(grads, num_roles), z, affine, need_z, need_affine, need_affine
        )
        daffine = fused.affine_gradient(affine, dgamma, dbeta, num_roles) if need_affine else None
        return None, None, None, dz, daffine, grads.v, du, grads.rel_bias


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
    total (ChunkedAttention, backends/torch/chunked.py, sums it before forming any output)
    goes through _ExchangeTotals and comes back as the state offset of the output."""
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
            total = k_lin.to(compute).transpose(1, 2) @ v.to(compute)  # zeros
            offset = _ExchangeTotals.apply(call, total)
            out = out + (call.lin_scale * (q_lin.to(compute) @ offset)).to(v.dtype)
        return out
    run = ChunkedAttention(
        q_quad,
        k_quad,
        q_lin,
        k_lin,
        v,
        chunk_size=call.chunk_size,
        causal=call.causal,
        rel_bias=rel_bias,
        quad_scale=call.quad_scale,
        lin_scale=call.lin_scale,
    )
    if q_lin is None:
        return run.output()
    offset = _ExchangeTotals.apply(call, run.total[:, 0])
    return run.output(offset[:, None])


# -- the entry of both ops ------------------------------------------------------------------------


@torch.compiler.disable
def context_parallel_attention(inputs, options):
    """mixed_chunk_attention or flash_attention (inputs: core.plan.MixedChunkInputs or
    FlashInputs) with options.cp_group: this rank's slice of the output (see the module
    docstring). The call is checked and planned as a single-process call (core.plan.plan_call),
    and the ranks agree on it before anything else."""

    def local_checks():
        plan = plan_call(inputs, options)
        if plan.backend == "triton":
            triton_backend.require()
            check_triton_inputs(inputs.first, inputs.v)
        quad_scale, lin_scale = plan.scales()
        fields = describe(
            op=inputs.op_name,
            batch=plan.batch,
            T=plan.T,
            S=plan.S,
            E=plan.E,
            chunk_size=plan.chunk_size,
            causal=options.causal,
            linear=inputs.has_linear,
            rel_bias=options.rel_bias is not None,
            gate=inputs.gate is not None,
            grad_inputs=grad_needed(*inputs, options.rel_bias),
            dtype=inputs.v.dtype,
            quad_scale=quad_scale,
            lin_scale=lin_scale,
        )
        return fields, plan

    call, plan = agree_on_call(options.cp_group, local_checks)
    if isinstance(inputs, FlashInputs):
        return _flash_attention(call, plan, inputs)
    return _mixed_chunk_attention(call, plan, inputs)


def _float32_bias(rel_bias):
    # float32 and contiguous: the long-chunk kernels read it through a raw pointer.
    return rel_bias.float().contiguous() if rel_bias is not None else None


def _mixed_chunk_attention(call, plan, inputs):
    tensors = [plan.flat(x) for x in inputs]
    rel_bias = plan.options.rel_bias
    if plan.backend == "torch":
        out = _torch_forward(call, *tensors, rel_bias)
    else:
        contiguous = triton_backend.launch.feature_contiguous
        out = _MixedChunkCP.apply(call, *(contiguous(x) for x in tensors), _float32_bias(rel_bias))
    return out.reshape(*plan.batch, plan.T, plan.E)


def _flash_attention(call, plan, inputs):
    """The fused Triton path, or on the PyTorch path the composition roles -> mixed chunk
    attention -> gate."""
    z, gamma, beta, v, u = inputs
    rel_bias = plan.options.rel_bias
    if plan.backend == "torch":
        roles = [plan.flat(role) for role in scale_offset_roles(z, gamma, beta)]
        q_lin, k_lin = (roles[2], roles[3]) if len(roles) == 4 else (None, None)
        out = _torch_forward(call, roles[0], roles[1], q_lin, k_lin, plan.flat(v), rel_bias)
        out = out.reshape(*plan.batch, plan.T, plan.E)
        return out if u is None else u * out
    contiguous = triton_backend.launch.feature_contiguous
    gate = None if u is None else contiguous(plan.flat(u))
    store_attn = u is not None and u.requires_grad and torch.is_grad_enabled()
    out = _FlashCP.apply(
        call,
        gamma.shape[0],
        store_attn,
        contiguous(plan.flat(z)),
        affine_stack(gamma, beta),
        contiguous(plan.flat(v)),
        gate,
        _float32_bias(rel_bias),
    )
    return out.reshape(*plan.batch, plan.T, plan.E)
