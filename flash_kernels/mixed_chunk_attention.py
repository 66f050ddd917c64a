"""The public op `mixed_chunk_attention` (docs/contract.md sections 2 and 7): checks, defaults,
packed
documents and state, backend choice."""
import math

import torch

from .context_parallel import mixed_chunk_attention_cp
from .packing import chunk_tables
from .reference import reference_with_state
from .torch_chunked import mixed_chunk_attention_torch
from .utils import (INTERPRETED_KERNELS, TRITON_MAX_S, autocast_cast, autocast_dtype,
                    functorch_transform_active, resolve_scales, triton_interpret_enabled)
from .validation import (check_options, check_packing, check_rel_bias, check_state_arguments,
                         check_tensors_of_mixed_chunk)

try:    # imported here so the custom ops are registered before anything is traced or compiled
    from .triton_mixed_chunk import mixed_chunk_attention_triton
except ImportError as error:         # no usable triton: the PyTorch backends still work
    _TRITON_IMPORT_ERROR = error

    def mixed_chunk_attention_triton(*args, **kwargs):
        raise RuntimeError(f"backend='triton' is unavailable: importing triton failed "
                           f"({_TRITON_IMPORT_ERROR}); use backend='torch'")


def pick_backend(backend, device, dtype, s):
    """The backend that runs: "auto" resolved, and float64 on "triton" sent to "torch".

    "auto" takes "torch" where the kernels cannot give the right answer: S > 256, float64,
    CPU tensors without the interpreter, bfloat16 under the interpreter (it cannot compute in
    bfloat16: docs/contract.md section 6) and inside torch.func transforms. An explicit
    "triton" in the
    last two cases raises instead (check_triton_inputs).
    """
    if backend == "auto":
        on_triton_device = device.type == "cuda" or (device.type == "cpu" and triton_interpret_enabled())
        interpreter_bf16 = INTERPRETED_KERNELS and dtype == torch.bfloat16
        usable = (on_triton_device and dtype != torch.float64 and s <= TRITON_MAX_S
                  and not interpreter_bf16 and not functorch_transform_active())
        return "triton" if usable else "torch"
    if backend == "triton" and dtype == torch.float64:
        return "torch"          # the kernels compute in fp32; float64 (gradcheck) takes the exact path
    return backend


class Documents:
    """The packed documents of one call and the state carried in and out of them (the
    contract's section 7), resolved once for every backend.

    Without cu_seqlens the sequence is one document. `chunk_size` is the resolved C: the given
    one, or for chunk_size=None the sequence length T, or with cu_seqlens max_seqlen (given, or
    the longest document: documents longer than a given max_seqlen are cut in chunks of it).
    """

    def __init__(self, *, batch, T, S, E, chunk_size, cu_seqlens, max_seqlen, initial_state,
                 output_final_state, has_linear, causal, device, dtype):
        lengths = check_packing(cu_seqlens, max_seqlen, T, device)
        self.packed = cu_seqlens is not None
        self.num_docs = cu_seqlens.numel() - 1 if self.packed else 1
        check_state_arguments(initial_state, output_final_state, batch=batch,
                              num_docs=self.num_docs, S=S, E=E, packed=self.packed,
                              has_linear=has_linear, causal=causal, device=device)
        if chunk_size is None and self.packed:
            if max_seqlen is None and lengths is None:
                raise ValueError("chunk_size=None with cu_seqlens makes each document one chunk "
                                 "as long as the longest: under torch.compile pass max_seqlen "
                                 "(the values of cu_seqlens cannot be read while tracing)")
            chunk_size = max_seqlen if max_seqlen is not None else max(max(lengths, default=1), 1)
        self.chunk_size = chunk_size if chunk_size is not None else T
        self.batch, self.T, self.S, self.E = tuple(batch), T, S, E
        self.cu_seqlens = cu_seqlens
        self.initial_state = initial_state
        self.output_final_state = bool(output_final_state)
        self.device = device
        self.state_dtype = torch.promote_types(dtype, torch.float32)

    def tables(self):
        """packing.ChunkTables on the inputs' device, or None for one document."""
        if not self.packed:
            return None
        return chunk_tables(self.cu_seqlens, self.T, self.chunk_size, self.device)

    def state_offset(self, B):
        """initial_state as the backends' (B, N, S, E) state offset, or None."""
        if self.initial_state is None:
            return None
        return self.initial_state.reshape(B, self.num_docs, self.S, self.E)

    def finish(self, out, total):
        """The op's result from a backend's flat (B, T, E) output and (B, N, S, E) totals:
        out, or (out, final_state = initial_state + total)."""
        out = out.reshape(*self.batch, self.T, self.E)
        if not self.output_final_state:
            return out
        state_shape = self.batch + ((self.num_docs,) if self.packed else ()) + (self.S, self.E)
        if total is None:                      # no token: nothing was summed
            final = torch.zeros(state_shape, dtype=self.state_dtype, device=self.device)
        else:
            final = total.to(self.state_dtype).reshape(state_shape)
        if self.initial_state is not None:
            final = final + self.initial_state.to(self.state_dtype)
        return out, final


def mixed_chunk_attention(q_quad, k_quad, q_lin, k_lin, v, *, chunk_size=256, causal=True,
                          rel_bias=None, quad_scale=None, lin_scale=None, cu_seqlens=None,
                          max_seqlen=None, initial_state=None, output_final_state=False,
                          backend="auto", cp_group=None):
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
            else "torch"),
            "triton", "torch" (chunked PyTorch, O(T) memory) or "reference" (dense, O(T^2)).
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
            "reference"; chunk_size must be given. See flash_kernels/context_parallel.py.

    Returns:
        (*batch, T, E) tensor in v's dtype, or (out, final_state) with output_final_state.
        Inside torch.autocast, the five tensors are first cast to the autocast dtype (as a
        matmul's inputs are; float64 is left alone), so the output has that dtype; rel_bias
        and initial_state keep their own.
    """
    options = dict(chunk_size=chunk_size, causal=causal, rel_bias=rel_bias, quad_scale=quad_scale,
                   lin_scale=lin_scale, cu_seqlens=cu_seqlens, max_seqlen=max_seqlen,
                   initial_state=initial_state, output_final_state=output_final_state,
                   backend=backend, cp_group=cp_group)
    cast = autocast_dtype(v)
    if cast is not None:
        q_quad, k_quad, q_lin, k_lin, v = (autocast_cast(x, cast) for x in (q_quad, k_quad, q_lin, k_lin, v))
        # Inside, every product is already in the precision chosen for it (fp32 accumulation,
        # fp32 states): autocast must not re-cast the PyTorch paths' float32 matmuls.
        with torch.autocast(v.device.type, enabled=False):
            return mixed_chunk_attention(q_quad, k_quad, q_lin, k_lin, v, **options)
    if cp_group is not None:
        return mixed_chunk_attention_cp(q_quad, k_quad, q_lin, k_lin, v, **options)
    check_tensors_of_mixed_chunk(q_quad, k_quad, q_lin, k_lin, v)
    check_options(chunk_size, causal, quad_scale, lin_scale, backend)
    *batch, T, S = q_quad.shape
    E = v.shape[-1]
    docs = Documents(batch=batch, T=T, S=S, E=E, chunk_size=chunk_size, cu_seqlens=cu_seqlens,
                     max_seqlen=max_seqlen, initial_state=initial_state,
                     output_final_state=output_final_state, has_linear=q_lin is not None,
                     causal=causal, device=v.device, dtype=v.dtype)
    check_rel_bias(rel_bias, C=docs.chunk_size, chunk_size=chunk_size, packed=docs.packed,
                   device=q_quad.device, device_owner="q_quad")
    if T == 0:
        return docs.finish(v[..., :0, :].clone(), None)

    backend = pick_backend(backend, v.device, v.dtype, S)
    C = docs.chunk_size
    if backend == "reference":
        quad, lin = resolve_scales(quad_scale, lin_scale, C)
        result = reference_with_state(q_quad, k_quad, q_lin, k_lin, v, chunk_size=C,
                                      causal=causal, rel_bias=rel_bias, quad_scale=quad,
                                      lin_scale=lin, cu_seqlens=cu_seqlens,
                                      initial_state=initial_state,
                                      output_final_state=output_final_state)
        return result

    B = math.prod(batch)

    def flat(x):
        return None if x is None else x.reshape(B, T, x.shape[-1])

    args = (flat(q_quad), flat(k_quad), flat(q_lin), flat(k_lin), flat(v))
    state = dict(tables=docs.tables(), state_offset=docs.state_offset(B),
                 store_total=output_final_state)
    if backend == "torch":
        quad, lin = resolve_scales(quad_scale, lin_scale, C)
        out, total = mixed_chunk_attention_torch(*args, chunk_size=C, causal=causal,
                                                 rel_bias=rel_bias, quad_scale=quad,
                                                 lin_scale=lin, **state)
    else:
        out, total = mixed_chunk_attention_triton(*args, chunk_size=C, causal=causal,
                                                  rel_bias=rel_bias, quad_scale=quad_scale,
                                                  lin_scale=lin_scale, **state)
    return docs.finish(out, total)
