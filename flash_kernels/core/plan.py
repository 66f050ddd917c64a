"""The plan of one call of an attention op, decided once for every backend: the inputs checked,
the packed documents and the state carried in and out of them, the backend that runs, the
flattened (B, T, W) views the backends take, and the op's result from a backend's.

Both public ops (flash_kernels/attention.py) and their context-parallel forms
(flash_kernels/distributed/) go through `plan_call`; they differ in their inputs
(`MixedChunkInputs`, `FlashInputs`) and in what they dispatch to.
"""

import math
from dataclasses import dataclass
from typing import NamedTuple, Optional

import torch

from .environment import (
    INTERPRETED_KERNELS,
    autocast_cast,
    functorch_transform_active,
    triton_interpret_enabled,
)
from .packing import chunk_tables
from .validation import (
    TRITON_MAX_S,
    check_context_parallel_options,
    check_flash_inputs,
    check_options,
    check_packing,
    check_rel_bias,
    check_state_arguments,
    check_tensors_of_mixed_chunk,
)


def resolve_scales(quad_scale, lin_scale, chunk_size):
    """The scales as numbers, None meaning the default 1 / chunk_size. The Triton path passes
    None through to here, inside its custom ops, so that torch.compile never sees 1 / T as a
    constant (chunk_size=None makes C = T: a guard on it would recompile for every length)."""
    return (
        quad_scale if quad_scale is not None else 1.0 / chunk_size,
        lin_scale if lin_scale is not None else 1.0 / chunk_size,
    )


def pick_backend(backend, device, dtype, s):
    """The backend that runs: "auto" resolved, and float64 on "triton" sent to "torch".

    "auto" takes "torch" where the kernels cannot give the right answer: S > 256, float64,
    CPU tensors without the interpreter, bfloat16 under the interpreter (it cannot compute in
    bfloat16: docs/contract.md section 6) and inside torch.func transforms. An explicit
    "triton" in the last two cases raises instead (validation.check_triton_inputs).
    """
    if backend == "auto":
        on_triton_device = device.type == "cuda" or (
            device.type == "cpu" and triton_interpret_enabled()
        )
        interpreter_bf16 = INTERPRETED_KERNELS and dtype == torch.bfloat16
        usable = (
            on_triton_device
            and dtype != torch.float64
            and s <= TRITON_MAX_S
            and not interpreter_bf16
            and not functorch_transform_active()
        )
        return "triton" if usable else "torch"
    if backend == "triton" and dtype == torch.float64:
        return "torch"  # the kernels compute in fp32; float64 (gradcheck) takes the exact path
    return backend


@dataclass(frozen=True)
class CallOptions:
    """The keyword options both ops take, as the caller gave them."""

    chunk_size: Optional[int] = 256
    causal: bool = True
    rel_bias: Optional[torch.Tensor] = None
    quad_scale: Optional[float] = None
    lin_scale: Optional[float] = None
    cu_seqlens: Optional[torch.Tensor] = None
    max_seqlen: Optional[int] = None
    initial_state: Optional[torch.Tensor] = None
    output_final_state: bool = False
    backend: str = "auto"
    cp_group: object = None


class MixedChunkInputs(NamedTuple):
    """The tensors of mixed_chunk_attention."""

    q_quad: torch.Tensor
    k_quad: torch.Tensor
    q_lin: Optional[torch.Tensor]
    k_lin: Optional[torch.Tensor]
    v: torch.Tensor

    op_name = "mixed_chunk_attention"
    first_name = "q_quad"  # the (*batch, T, S) input that names the device in messages

    @property
    def first(self):
        return self.q_quad

    @property
    def has_linear(self):
        return self.q_lin is not None

    @property
    def gate(self):
        return None

    def validate(self):
        check_tensors_of_mixed_chunk(*self)

    def autocast_to(self, dtype):
        return MixedChunkInputs(*(autocast_cast(x, dtype) for x in self))


class FlashInputs(NamedTuple):
    """The tensors of flash_attention: z (the roles' shared base), the (R, S) gamma and beta
    of the R = 4 (or 2) roles, the values v and the optional gate u."""

    z: torch.Tensor
    gamma: torch.Tensor
    beta: torch.Tensor
    v: torch.Tensor
    u: Optional[torch.Tensor]

    op_name = "flash_attention"
    first_name = "z"

    @property
    def first(self):
        return self.z

    @property
    def has_linear(self):
        return self.gamma.shape[0] == 4

    @property
    def gate(self):
        return self.u

    def validate(self):
        check_flash_inputs(*self)

    def autocast_to(self, dtype):
        """z, v and u cast; gamma and beta keep their dtype (parameters)."""
        z, gamma, beta, v, u = self
        return FlashInputs(
            autocast_cast(z, dtype), gamma, beta, autocast_cast(v, dtype), autocast_cast(u, dtype)
        )


class Documents:
    """The packed documents of one call and the state carried in and out of them (the
    contract's section 7), resolved once for every backend.

    Without cu_seqlens the sequence is one document. `chunk_size` is the resolved C: the given
    one, or for chunk_size=None the sequence length T, or with cu_seqlens max_seqlen (given, or
    the longest document: documents longer than a given max_seqlen are cut in chunks of it).
    """

    def __init__(
        self,
        *,
        batch,
        T,
        S,
        E,
        chunk_size,
        cu_seqlens,
        max_seqlen,
        initial_state,
        output_final_state,
        has_linear,
        causal,
        device,
        dtype,
    ):
        lengths = check_packing(cu_seqlens, max_seqlen, T, device)
        self.packed = cu_seqlens is not None
        self.num_docs = cu_seqlens.numel() - 1 if self.packed else 1
        check_state_arguments(
            initial_state,
            output_final_state,
            batch=batch,
            num_docs=self.num_docs,
            S=S,
            E=E,
            packed=self.packed,
            has_linear=has_linear,
            causal=causal,
            device=device,
        )
        if chunk_size is None and self.packed:
            if max_seqlen is None and lengths is None:
                raise ValueError(
                    "chunk_size=None with cu_seqlens makes each document one chunk "
                    "as long as the longest: under torch.compile pass max_seqlen "
                    "(the values of cu_seqlens cannot be read while tracing)"
                )
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
        """The op's result from a backend's (B, T, E) output and (B, N, S, E) totals (any
        shapes with those numbers of elements): out, or (out, final_state = initial_state +
        total)."""
        out = out.reshape(*self.batch, self.T, self.E)
        if not self.output_final_state:
            return out
        state_shape = self.batch + ((self.num_docs,) if self.packed else ()) + (self.S, self.E)
        if total is None:  # no token: nothing was summed
            final = torch.zeros(state_shape, dtype=self.state_dtype, device=self.device)
        else:
            final = total.to(self.state_dtype).reshape(state_shape)
        if self.initial_state is not None:
            final = final + self.initial_state.to(self.state_dtype)
        return out, final


class CallPlan:
    """One checked call: its documents (`docs`: the resolved chunk size, packing, state),
    options and the backend that runs it."""

    def __init__(self, docs, options, backend, has_linear):
        self.docs, self.options, self.backend, self.has_linear = docs, options, backend, has_linear
        self.batch, self.T, self.S, self.E = docs.batch, docs.T, docs.S, docs.E
        self.B = math.prod(docs.batch)
        self.chunk_size = docs.chunk_size
        self.causal = options.causal

    def flat(self, x):
        """x (*batch, T, W) as the backends' (B, T, W) view (None stays None)."""
        return None if x is None else x.reshape(self.B, self.T, x.shape[-1])

    def scales(self):
        """(quad_scale, lin_scale) as numbers (default 1 / C)."""
        return resolve_scales(self.options.quad_scale, self.options.lin_scale, self.chunk_size)

    def state_arguments(self):
        """The packing and state arguments of the chunked backends (torch and Triton)."""
        return dict(
            tables=self.docs.tables(),
            state_offset=self.docs.state_offset(self.B),
            store_total=self.docs.output_final_state,
        )

    def finish(self, out, total):
        """The op's result: see Documents.finish."""
        return self.docs.finish(out, total)


def plan_call(inputs, options):
    """Check a call of either op (its tensors, then its options) and plan it. Context
    parallelism (options.cp_group) refuses first the options it does not take."""
    inputs.validate()
    check_options(
        options.chunk_size, options.causal, options.quad_scale, options.lin_scale, options.backend
    )
    if options.cp_group is not None:
        check_context_parallel_options(
            options.chunk_size,
            options.cu_seqlens,
            options.max_seqlen,
            options.initial_state,
            options.output_final_state,
            options.backend,
        )
    first, v = inputs.first, inputs.v
    *batch, T, S = first.shape
    docs = Documents(
        batch=batch,
        T=T,
        S=S,
        E=v.shape[-1],
        chunk_size=options.chunk_size,
        cu_seqlens=options.cu_seqlens,
        max_seqlen=options.max_seqlen,
        initial_state=options.initial_state,
        output_final_state=options.output_final_state,
        has_linear=inputs.has_linear,
        causal=options.causal,
        device=v.device,
        dtype=v.dtype,
    )
    check_rel_bias(
        options.rel_bias,
        C=docs.chunk_size,
        chunk_size=options.chunk_size,
        packed=docs.packed,
        device=first.device,
        device_owner=inputs.first_name,
    )
    backend = pick_backend(options.backend, v.device, v.dtype, S)
    return CallPlan(docs, options, backend, inputs.has_linear)
