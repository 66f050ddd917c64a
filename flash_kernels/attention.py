"""The public ops `mixed_chunk_attention` and `flash_attention` (docs/contract.md sections 2, 4
and 7) and the op skeleton they share: autocast, context parallelism, check and plan the call
(core/plan.py), dispatch it to a backend, finish its result.

flash_attention is FLASH's attention from the shared z (roles, attention, gate):

    q_quad = z * gamma[0] + beta[0]      k_quad = z * gamma[1] + beta[1]
    q_lin  = z * gamma[2] + beta[2]      k_lin  = z * gamma[3] + beta[3]     (rows 2, 3 optional)
    out    = u * mixed_chunk_attention(q_quad, k_quad, q_lin, k_lin, v, ...)   (u optional)

Each role is formed in float32 and rounded to z's dtype, in the Triton kernels (which read z
instead of four role tensors, and multiply by u when they store) and in the composition below.
"""

import torch

from .backends import triton as triton_backend
from .backends.torch.chunked import mixed_chunk_attention_torch
from .backends.torch.reference import reference_attention
from .core.environment import autocast_dtype
from .core.plan import CallOptions, FlashInputs, MixedChunkInputs, plan_call
from .core.roles import scale_offset_roles
from .distributed import context_parallel_attention


def mixed_chunk_attention(
    q_quad,
    k_quad,
    q_lin,
    k_lin,
    v,
    *,
    chunk_size=256,
    causal=True,
    rel_bias=None,
    quad_scale=None,
    lin_scale=None,
    cu_seqlens=None,
    max_seqlen=None,
    initial_state=None,
    output_final_state=False,
    backend="auto",
    cp_group=None,
):
    """FLASH mixed chunk attention: relu^2 attention inside chunks, linear attention across them.

    For tokens i, j in the same chunk of C tokens (c(i) = i // C):
        a_ij   = relu(quad_scale * <q_quad_i, k_quad_j> + rel_bias[i - j + C - 1])^2,
                 zero when causal and j > i
        quad_i = sum_j a_ij v_j
        lin_i  = lin_scale * q_lin_i^T sum_{g < c(i)} H_g   (all g when not causal),
                 with H_g = sum_{j in chunk g} k_lin_j v_j^T kept in float32
        out_i  = quad_i + lin_i

    Args:
        q_quad, k_quad: (*batch, T, S) queries and keys of the quadratic (intra-chunk) part.
        q_lin, k_lin: (*batch, T, S) queries and keys of the linear (inter-chunk) part, or both
            None for quadratic attention only.
        v: (*batch, T, E) values. All five tensors share dtype and device.
        chunk_size: C, any positive int; None means one chunk as long as the sequence (with
            cu_seqlens: as long as max_seqlen, i.e. each document is one chunk).
        causal: causal mask inside chunks and an exclusive (earlier chunks only) linear state.
        rel_bias: optional (2C - 1,) Toeplitz bias, entry o + C - 1 for offset o = i - j.
            It may be float32 while the inputs are half; its gradient is returned.
        quad_scale, lin_scale: default 1 / C (constant, so causal outputs never depend on
            tokens that come later).
        cu_seqlens: optional (N + 1,) int32/int64 tensor, 0 then the cumulative lengths of N
            documents packed along T (last entry T), on the inputs' device or the CPU, shared by
            every leading dim. Chunks restart at each document's first token; no attention and
            no state crosses a document boundary. Zero-length documents are allowed.
        max_seqlen: with cu_seqlens, the longest document's length (as in flash-attn). It is
            C for chunk_size=None. Given with a CUDA cu_seqlens, nothing waits for the device
            and cu_seqlens is trusted (not read); otherwise its values are validated.
        initial_state: optional (*batch, N, S, E) with cu_seqlens, else (*batch, S, E): the
            unscaled sum of k_lin^T v over tokens before this call (any float dtype, used in
            float32), seen by every chunk of its document. Differentiable. Causal only.
        output_final_state: also return the final state: initial_state (or 0) plus the sum of
            k_lin^T v over each document's COMPLETE chunks (a partial last chunk stays with a
            decoder's buffers), float32 (float64 for float64 inputs), shape as initial_state.
            So a sequence cut at a multiple of C and run in two calls, the second starting from
            the first's final state, gives the output of one call. Causal only.
        backend: "auto" (Triton on CUDA, or on CPU when TRITON_INTERPRET=1, for S <= 256;
            else "torch"), "triton", "torch" (chunked PyTorch, O(T) memory) or "reference"
            (dense, O(T^2)).
            float64 inputs on the Triton backend run the "torch" path, so
            torch.autograd.gradcheck works on this op whatever the backend.
            "auto" also takes "torch" for bfloat16 under the Triton interpreter (which has no
            bfloat16 arithmetic) and inside torch.func transforms (grad, vmap, ...: the Triton
            custom ops have no functorch rules); an explicit "triton" raises in both cases.
            TRITON_INTERPRET must be set before flash_kernels is imported: the Triton
            backend ("auto" on CPU tensors included) raises if it was set later. Interpreted
            kernel launches are serialised (the interpreter is not thread-safe), so threads may
            call the op at once.
        cp_group: a torch.distributed ProcessGroup for context parallelism: rank r of the group
            holds the contiguous slice r of the sequence (same leading dims on every rank; every
            slice but the last rank's a multiple of chunk_size; a rank may hold 0 tokens).
            Causal, rank r's chunks see the states of every earlier rank's chunks; non-causal,
            every chunk sees the whole sequence's. The result and the gradients of the five
            tensors are those of the single-process op on the whole sequence, restricted to
            this rank's slice; rel_bias gets this rank's partial gradient (the sum over the
            ranks, e.g. the usual all-reduce of parameter gradients, is the whole-sequence
            one). One all-gather of (*batch, S, E) totals per direction and call (none for
            quadratic-only), plus a small descriptor all-gather per forward so that a bad
            grouping raises the same ValueError on every rank. Every rank must make the same
            calls and run their backward. Not with cu_seqlens, state in/out or backend
            "reference"; chunk_size must be given. See flash_kernels/distributed/.

    Returns:
        (*batch, T, E) tensor in v's dtype, or (out, final_state) with output_final_state.
        Inside torch.autocast, the five tensors are first cast to the autocast dtype (as a
        matmul's inputs are; float64 is left alone), so the output has that dtype; rel_bias
        and initial_state keep their own.
    """
    return _attend(
        MixedChunkInputs(q_quad, k_quad, q_lin, k_lin, v),
        CallOptions(
            chunk_size=chunk_size,
            causal=causal,
            rel_bias=rel_bias,
            quad_scale=quad_scale,
            lin_scale=lin_scale,
            cu_seqlens=cu_seqlens,
            max_seqlen=max_seqlen,
            initial_state=initial_state,
            output_final_state=output_final_state,
            backend=backend,
            cp_group=cp_group,
        ),
    )


def flash_attention(
    z,
    gamma,
    beta,
    v,
    *,
    u=None,
    chunk_size=256,
    causal=True,
    rel_bias=None,
    quad_scale=None,
    lin_scale=None,
    cu_seqlens=None,
    max_seqlen=None,
    initial_state=None,
    output_final_state=False,
    backend="auto",
    cp_group=None,
):
    """FLASH attention from the shared z: per-role scale-offsets, mixed chunk attention, gate.

    Args:
        z: (*batch, T, S) shared base of the queries and keys.
        gamma, beta: (4, S) scale and offset rows (quad_q, quad_k, lin_q, lin_k), or (2, S) for
            quadratic attention only. May be float32 while z is half; their gradients are
            returned in their own dtype (reduced over tokens deterministically).
        v: (*batch, T, E) values; u: optional (*batch, T, E) gate, the output is u * attention.
        chunk_size, causal, rel_bias, quad_scale, lin_scale, cu_seqlens, max_seqlen,
            initial_state, output_final_state, backend: as mixed_chunk_attention ("triton"
            fuses the roles and the gate into the kernels; float64 takes the composed PyTorch
            path). The final state is the ungated attention's (u gates outputs, not the state).
        cp_group: context parallelism, as mixed_chunk_attention: outputs and the gradients of
            z, v and u are the whole-sequence op's on this rank's slice; gamma, beta and
            rel_bias get this rank's partial gradients (their sum over the ranks is the
            whole-sequence gradient).

    Returns:
        (*batch, T, E) in v's dtype, or (out, final_state) with output_final_state. Gradients
        flow to z, gamma, beta, v, u, rel_bias and initial_state. Inside torch.autocast, z, v
        and u are cast to the autocast dtype first (so is the output); gamma, beta, rel_bias
        and initial_state keep theirs.
    """
    return _attend(
        FlashInputs(z, gamma, beta, v, u),
        CallOptions(
            chunk_size=chunk_size,
            causal=causal,
            rel_bias=rel_bias,
            quad_scale=quad_scale,
            lin_scale=lin_scale,
            cu_seqlens=cu_seqlens,
            max_seqlen=max_seqlen,
            initial_state=initial_state,
            output_final_state=output_final_state,
            backend=backend,
            cp_group=cp_group,
        ),
    )


def _attend(inputs, options):
    """The op skeleton of both ops: inside torch.autocast, cast the inputs and run with it
    off (every product inside already has the precision chosen for it: fp32 accumulation and
    states, and the PyTorch paths' float32 matmuls must not be re-cast); hand a
    context-parallel call to flash_kernels/distributed; else check and plan the call, dispatch
    it to the planned backend and finish its result."""
    cast = autocast_dtype(inputs.v)
    if cast is not None:
        with torch.autocast(inputs.v.device.type, enabled=False):
            return _attend(inputs.autocast_to(cast), options)
    if options.cp_group is not None:
        return context_parallel_attention(inputs, options)
    plan = plan_call(inputs, options)
    if isinstance(inputs, FlashInputs):
        return _flash_attention(inputs, plan)
    return _mixed_chunk_attention(inputs, plan)


def _mixed_chunk_attention(inputs, plan):
    """mixed_chunk_attention's result on the planned backend."""
    q_quad, k_quad, q_lin, k_lin, v = inputs
    options = plan.options
    if plan.T == 0:
        return plan.finish(v[..., :0, :].clone(), None)
    if plan.backend == "reference":  # the dense ground truth takes the leading dims as given
        quad_scale, lin_scale = plan.scales()
        out, total = reference_attention(
            q_quad,
            k_quad,
            q_lin,
            k_lin,
            v,
            chunk_size=plan.chunk_size,
            causal=plan.causal,
            rel_bias=options.rel_bias,
            quad_scale=quad_scale,
            lin_scale=lin_scale,
            cu_seqlens=options.cu_seqlens,
            initial_state=options.initial_state,
            store_total=options.output_final_state,
        )
        return plan.finish(out, total)
    flat = [plan.flat(x) for x in inputs]
    if plan.backend == "torch":
        quad_scale, lin_scale = plan.scales()
        out, total = mixed_chunk_attention_torch(
            *flat,
            chunk_size=plan.chunk_size,
            causal=plan.causal,
            rel_bias=options.rel_bias,
            quad_scale=quad_scale,
            lin_scale=lin_scale,
            **plan.state_arguments(),
        )
    else:  # the scales go as given: the Triton path resolves them inside its custom op
        triton_backend.require()
        out, total = triton_backend.mixed_chunk.mixed_chunk_attention_triton(
            *flat,
            chunk_size=plan.chunk_size,
            causal=plan.causal,
            rel_bias=options.rel_bias,
            quad_scale=options.quad_scale,
            lin_scale=options.lin_scale,
            **plan.state_arguments(),
        )
    return plan.finish(out, total)


def _flash_attention(inputs, plan):
    """flash_attention's result: the fused Triton op, or elsewhere (and for no token) the
    composition roles -> mixed chunk attention on the planned backend -> gate."""
    z, gamma, beta, v, u = inputs
    options = plan.options
    if plan.backend != "triton" or plan.T == 0:
        roles = scale_offset_roles(z, gamma, beta)
        q_lin, k_lin = (roles[2], roles[3]) if len(roles) == 4 else (None, None)
        result = _mixed_chunk_attention(MixedChunkInputs(roles[0], roles[1], q_lin, k_lin, v), plan)
        if u is None:
            return result
        if options.output_final_state:
            return u * result[0], result[1]
        return u * result
    triton_backend.require()
    out, total = triton_backend.fused.flash_attention_triton(
        plan.flat(z),
        gamma,
        beta,
        plan.flat(v),
        plan.flat(u),
        chunk_size=plan.chunk_size,
        causal=plan.causal,
        rel_bias=options.rel_bias,
        quad_scale=options.quad_scale,
        lin_scale=options.lin_scale,
        **plan.state_arguments(),
    )
    return plan.finish(out, total)
