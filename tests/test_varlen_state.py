"""Packed documents (cu_seqlens) and state in/out (initial_state, output_final_state) on every
backend, for both public ops, against an oracle written here from the contract's section 7:

    out[bos:eos]   = op(document n alone) + lin_scale * q_lin[bos:eos] @ initial_state[n]
    final_state[n] = initial_state[n] + sum over the document's complete chunks of k_lin^T v

`op(document n alone)` is the plain dense reference (no packing, no state) in float64, so the
packing, the state offset and the final state are checked against code that shares none of
theirs. Every gradient is compared, with a loss that weights the final state too. Buffers the
kernels should write are NaN-filled, so an idle chunk slot that writes nothing, or a read past a
document's end, shows up.
"""

import pytest
import torch
from helpers import assert_close, nan_filled_buffers, tile_override

from flash_kernels import flash_attention, mixed_chunk_attention
from flash_kernels.core.tolerances import rms_ratio

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
S, E = 5, 6
ROLE_NAMES = ("q_quad", "k_quad", "q_lin", "k_lin")


@pytest.fixture(autouse=True)
def _nan_scratch():
    with nan_filled_buffers():
        yield


def _random(shape, gen, scale=1.0):
    return scale * torch.randn(*shape, generator=gen, dtype=torch.float64)


def make_inputs(op, batch, lengths, *, linear, bias_chunk, state, seed):
    """float64 leaves of one problem: role tensors (or z, gamma, beta, u), v, rel_bias, the
    per-document initial state, and cu_seqlens."""
    gen = torch.Generator().manual_seed(seed)
    T, N = sum(lengths), len(lengths)
    inputs = dict(v=_random((*batch, T, E), gen))
    if op == "mixed_chunk_attention":
        for name in ROLE_NAMES:
            inputs[name] = _random((*batch, T, S), gen) if linear or "quad" in name else None
    else:
        roles = 4 if linear else 2
        inputs.update(
            z=_random((*batch, T, S), gen),
            gamma=1 + 0.5 * _random((roles, S), gen),
            beta=0.5 * _random((roles, S), gen),
            u=_random((*batch, T, E), gen),
        )
    inputs["rel_bias"] = _random((2 * bias_chunk - 1,), gen, 0.5) if bias_chunk else None
    inputs["initial_state"] = _random((*batch, N, S, E), gen, 0.3) if state else None
    cu = torch.tensor([0] + lengths).cumsum(0)
    return inputs, cu


def roles_of(op, inputs):
    """(q_quad, k_quad, q_lin, k_lin) and the gate of a problem (float64 arithmetic)."""
    if op == "mixed_chunk_attention":
        return [inputs[n] for n in ROLE_NAMES], None
    z, gamma, beta = inputs["z"], inputs["gamma"], inputs["beta"]
    roles = [z * gamma[r] + beta[r] for r in range(gamma.shape[0])]
    return roles + [None] * (4 - len(roles)), inputs["u"]


def oracle(op, inputs, cu, *, chunk_size, causal, quad_scale, lin_scale, with_final):
    """The contract's per-document formulas, each document run alone through the dense
    reference (float64, no packing, no state arguments)."""
    (q_quad, k_quad, q_lin, k_lin), gate = roles_of(op, inputs)
    v, init = inputs["v"], inputs["initial_state"]
    outs, finals = [], []
    bounds = cu.tolist()
    for n, (bos, eos) in enumerate(zip(bounds[:-1], bounds[1:])):

        def doc(x):
            return None if x is None else x[..., bos:eos, :]

        out = mixed_chunk_attention(
            doc(q_quad),
            doc(k_quad),
            doc(q_lin),
            doc(k_lin),
            doc(v),
            chunk_size=chunk_size,
            causal=causal,
            rel_bias=inputs["rel_bias"],
            quad_scale=quad_scale,
            lin_scale=lin_scale,
            backend="reference",
        )
        if init is not None:
            out = out + lin_scale * doc(q_lin) @ init[..., n, :, :]
        outs.append(out)
        if with_final:
            complete = (eos - bos) // chunk_size * chunk_size
            final = doc(k_lin)[..., :complete, :].transpose(-1, -2) @ doc(v)[..., :complete, :]
            finals.append(final + init[..., n, :, :] if init is not None else final)
    out = torch.cat(outs, dim=-2)
    if gate is not None:
        out = gate * out
    return out, (torch.stack(finals, dim=-3) if with_final else None)


def call(op, inputs, **options):
    if op == "mixed_chunk_attention":
        return mixed_chunk_attention(
            *(inputs[n] for n in ROLE_NAMES),
            inputs["v"],
            rel_bias=inputs["rel_bias"],
            initial_state=inputs["initial_state"],
            **options,
        )
    return flash_attention(
        inputs["z"],
        inputs["gamma"],
        inputs["beta"],
        inputs["v"],
        u=inputs["u"],
        rel_bias=inputs["rel_bias"],
        initial_state=inputs["initial_state"],
        **options,
    )


def converted(inputs, dtype, device):
    """Fresh leaves in `dtype` on `device` (parameters and the state stay float32 for half
    inputs, as a model keeps them), and the same values, rounded alike, as float64 leaves."""
    low, exact = {}, {}
    keep32 = ("rel_bias", "gamma", "beta", "initial_state")
    for name, x in inputs.items():
        if x is None:
            low[name] = exact[name] = None
            continue
        wanted = torch.float32 if name in keep32 and dtype != torch.float64 else dtype
        y = x.to(device=device, dtype=wanted)
        low[name] = y.clone().requires_grad_()
        exact[name] = y.double().cpu().requires_grad_()
    return low, exact


def gradients(out, final, leaves, seed=11):
    """The gradient of sum(out * w_out) + sum(final * w_final) for every leaf."""
    gen = torch.Generator().manual_seed(seed)
    loss = (out.double().cpu() * _random(out.shape, gen)).sum()
    if final is not None:
        loss = loss + (final.double().cpu() * _random(final.shape, gen)).sum()
    names = [n for n, x in leaves.items() if x is not None]
    grads = torch.autograd.grad(loss, [leaves[n] for n in names], allow_unused=True)
    return dict(zip(names, grads))


def check_packed(
    op,
    backend,
    dtype,
    *,
    batch=(),
    lengths,
    chunk_size,
    causal=True,
    linear=True,
    bias=True,
    state=True,
    with_final=True,
    quad_scale=0.7,
    lin_scale=0.3,
    seed=0,
    max_seqlen=None,
    cu_device="cpu",
):
    C_resolved = chunk_size if chunk_size is not None else (max_seqlen or max(lengths))
    expected_scales = dict(
        quad_scale=1 / C_resolved if quad_scale is None else quad_scale,
        lin_scale=1 / C_resolved if lin_scale is None else lin_scale,
    )
    inputs, cu = make_inputs(
        op,
        batch,
        lengths,
        linear=linear,
        bias_chunk=C_resolved if bias else 0,
        state=state,
        seed=seed,
    )
    device = DEVICE if backend == "triton" else "cpu"
    low, exact = converted(inputs, dtype, device)
    result = call(
        op,
        low,
        chunk_size=chunk_size,
        causal=causal,
        quad_scale=quad_scale,
        lin_scale=lin_scale,
        cu_seqlens=cu.to(cu_device),
        max_seqlen=max_seqlen,
        output_final_state=with_final,
        backend=backend,
    )
    out, final = result if with_final else (result, None)
    assert out.dtype == low["v"].dtype
    expected, expected_final = oracle(
        op,
        exact,
        cu,
        chunk_size=C_resolved,
        causal=causal,
        with_final=with_final,
        **expected_scales,
    )
    ratio = rms_ratio(op, dtype)  # flash_kernels/core/tolerances.py
    assert_close("out", out.cpu(), expected, ratio)
    if with_final:
        assert final.dtype == torch.promote_types(dtype, torch.float32)
        assert_close("final_state", final.cpu(), expected_final, ratio)
    grads = gradients(out, final, low)
    expected_grads = gradients(expected, expected_final, exact)
    for name, grad in grads.items():
        assert grad is not None, f"no gradient for {name}"
        assert grad.dtype == low[name].dtype, name
        assert_close(f"d{name}", grad.cpu(), expected_grads[name], ratio)


# Zero-length and length-1 documents, shorter than, equal to and one longer than a chunk,
# several chunks, an empty document last.
LENGTHS = [3, 0, 1, 4, 5, 9, 2, 0]
BACKENDS = [
    ("reference", torch.float64),
    ("torch", torch.float64),
    ("triton", torch.float32),
    ("triton", torch.float16),
]


@pytest.mark.parametrize("backend,dtype", BACKENDS, ids=lambda x: str(x).replace("torch.", ""))
@pytest.mark.parametrize("op", ["mixed_chunk_attention", "flash_attention"])
def test_packed_documents_with_state(op, backend, dtype):
    if op == "flash_attention" and dtype == torch.float16:
        pytest.skip("flash_attention rounds its roles to fp16 before the oracle sees them")
    check_packed(op, backend, dtype, lengths=LENGTHS, chunk_size=4)


@pytest.mark.parametrize(
    "backend,dtype", [("torch", torch.float64), ("triton", torch.float32)], ids=["torch", "triton"]
)
@pytest.mark.parametrize(
    "case",
    [
        "non-causal",
        "quadratic-only",
        "chunk_size=None",
        "chunk_size=None+max_seqlen",
        "no-state",
        "leading-dims",
    ],
)
def test_packed_variants(case, backend, dtype):
    options = dict(lengths=LENGTHS, chunk_size=4, seed=1)
    if case == "non-causal":
        options.update(causal=False, state=False, with_final=False)
    elif case == "quadratic-only":
        options.update(linear=False, state=False, with_final=False)
    elif case == "chunk_size=None":  # each document one chunk as long as the longest
        options.update(chunk_size=None)
    elif case == "chunk_size=None+max_seqlen":  # C = max_seqlen; no document is cut
        options.update(chunk_size=None, max_seqlen=12)
    elif case == "no-state":
        options.update(state=False, with_final=False)
    else:
        options.update(batch=(2, 3), lengths=[2, 5, 0, 4])
    check_packed("mixed_chunk_attention", backend, dtype, **options)


@pytest.mark.parametrize(
    "backend,dtype",
    [("reference", torch.float64), ("torch", torch.float64), ("triton", torch.float32)],
    ids=["reference", "torch", "triton"],
)
@pytest.mark.parametrize(
    "chunking", ["chunk_size=4", "chunk_size=None", "chunk_size=None+max_seqlen"]
)
@pytest.mark.parametrize("op", ["mixed_chunk_attention", "flash_attention"])
def test_packed_default_scales(op, chunking, backend, dtype):
    """quad_scale = lin_scale = None: 1 / C with C the chunk size, or for chunk_size=None the
    longest document or max_seqlen (docs/contract.md section 7), never the packed length T;
    the oracle is given those scales worked out by hand."""
    options = dict(chunk_size=4)
    if chunking != "chunk_size=4":
        options = dict(chunk_size=None, max_seqlen=12 if "max_seqlen" in chunking else None)
    check_packed(
        op, backend, dtype, lengths=LENGTHS, quad_scale=None, lin_scale=None, seed=6, **options
    )


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_packed_several_blocks_per_chunk(causal):
    """Chunks of 40 tokens in 16-row blocks: idle slots, partial blocks, documents that end
    inside a block, on the hoisted and the recomputing (long chunk) kernel paths."""
    for overrides in (dict(block=16, state_block_t=16), dict(block=16, max_hoist_keys=16)):
        with tile_override(**overrides):
            check_packed(
                "mixed_chunk_attention",
                "triton",
                torch.float32,
                lengths=[41, 0, 17, 40, 3],
                chunk_size=40,
                causal=causal,
                state=causal,
                with_final=causal,
                seed=2,
            )


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
def test_one_document_equals_no_packing(backend):
    inputs, cu = make_inputs(
        "mixed_chunk_attention", (2,), [11], linear=True, bias_chunk=4, state=False, seed=3
    )
    low, _ = converted(inputs, torch.float32, DEVICE if backend == "triton" else "cpu")
    args = [low[n] for n in ROLE_NAMES] + [low["v"]]
    options = dict(chunk_size=4, rel_bias=low["rel_bias"], backend=backend, output_final_state=True)
    packed = mixed_chunk_attention(*args, cu_seqlens=cu, **options)
    plain = mixed_chunk_attention(*args, **options)
    torch.testing.assert_close(packed[0], plain[0], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(packed[1][:, 0], plain[1], rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
@pytest.mark.parametrize("op", ["mixed_chunk_attention", "flash_attention"])
def test_two_calls_through_the_state_equal_one(op, backend):
    """Prefill in pieces: a sequence cut at multiples of C and run piece by piece, each
    starting from the previous final state, gives the output and final state of one call."""
    T, C, cuts = 23, 4, (8, 16)
    inputs, _ = make_inputs(op, (2,), [T], linear=True, bias_chunk=C, state=False, seed=4)
    inputs.pop("initial_state")
    low, _ = converted(inputs, torch.float32, DEVICE if backend == "triton" else "cpu")
    options = dict(chunk_size=C, backend=backend, output_final_state=True)
    sequence = {n: x for n, x in low.items() if x is not None and x.dim() == 3}
    params = {n: x for n, x in low.items() if n not in sequence}
    whole, whole_final = call(op, {**params, **sequence, "initial_state": None}, **options)
    state, pieces = None, []
    for start, end in zip((0,) + cuts, cuts + (T,)):
        piece = {n: x[:, start:end] for n, x in sequence.items()}
        out, state = call(op, {**params, **piece, "initial_state": state}, **options)
        pieces.append(out)
    torch.testing.assert_close(torch.cat(pieces, dim=1), whole, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(state, whole_final, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_empty_sequence_returns_the_initial_state(backend):
    q = torch.zeros(2, 0, S)
    v = torch.zeros(2, 0, E)
    init = torch.randn(2, 3, S, E, requires_grad=True)
    out, final = mixed_chunk_attention(
        q,
        q,
        q,
        q,
        v,
        cu_seqlens=torch.zeros(4, dtype=torch.int32),
        initial_state=init,
        output_final_state=True,
        backend=backend,
    )
    assert out.shape == (2, 0, E) and final.dtype == torch.float32
    torch.testing.assert_close(final, init)
    final.sum().backward()
    torch.testing.assert_close(init.grad, torch.ones_like(init))


def _good_call(**changes):
    T = 9
    args = dict(
        q_quad=torch.randn(2, T, S),
        k_quad=torch.randn(2, T, S),
        q_lin=torch.randn(2, T, S),
        k_lin=torch.randn(2, T, S),
        v=torch.randn(2, T, E),
    )
    options = dict(chunk_size=4, cu_seqlens=torch.tensor([0, 4, 9]), backend="torch")
    for key, value in changes.items():
        (args if key in args else options)[key] = value
    return mixed_chunk_attention(*args.values(), **options)


@pytest.mark.parametrize(
    "changes,error,words",
    [
        (dict(cu_seqlens=torch.tensor([1, 4, 9])), ValueError, "start at 0 and end at T"),
        (dict(cu_seqlens=torch.tensor([0, 4, 8])), ValueError, "start at 0 and end at T"),
        (dict(cu_seqlens=torch.tensor([0, 6, 4, 9])), ValueError, "non-decreasing"),
        (dict(cu_seqlens=torch.tensor([0.0, 4.0, 9.0])), TypeError, "int32 or int64"),
        (dict(cu_seqlens=torch.tensor([[0, 4, 9]])), ValueError, "1-D"),
        (dict(cu_seqlens=[0, 4, 9]), TypeError, "torch.Tensor"),
        (dict(cu_seqlens=torch.tensor([0, 4, 9], device="meta")), ValueError, "on the CPU"),
        (dict(cu_seqlens=None, max_seqlen=4), ValueError, "needs cu_seqlens"),
        (dict(max_seqlen=3), ValueError, "less than the longest"),
        (dict(max_seqlen=0), ValueError, "positive int"),
        (dict(initial_state=torch.zeros(2, S, E)), ValueError, r"\(\*batch, N, S, E\)"),
        (dict(initial_state=torch.zeros(2, 2, S, E, dtype=torch.int32)), TypeError, "floating"),
        (
            dict(initial_state=torch.zeros(2, 2, S, E), q_lin=None, k_lin=None),
            ValueError,
            "linear part",
        ),
        (dict(output_final_state=True, causal=False), ValueError, "causal=True"),
        (dict(output_final_state=1), TypeError, "output_final_state must be a bool"),
        (dict(rel_bias=torch.zeros(7), chunk_size=None), ValueError, "C = max_seqlen = 5"),
    ],
)
def test_bad_packing_and_state_arguments(changes, error, words):
    with pytest.raises(error, match=words):
        _good_call(**changes)


def test_initial_state_shape_without_packing():
    with pytest.raises(ValueError, match=r"\(\*batch, S, E\)"):
        _good_call(cu_seqlens=None, initial_state=torch.zeros(2, 2, S, E))
    out, final = _good_call(
        cu_seqlens=None, initial_state=torch.zeros(2, S, E), output_final_state=True
    )
    assert final.shape == (2, S, E)


@pytest.mark.slow
@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_torch_compile_fullgraph_with_packing(backend):
    inputs, cu = make_inputs(
        "mixed_chunk_attention", (2,), [3, 0, 6, 5], linear=True, bias_chunk=4, state=True, seed=5
    )
    low, _ = converted(inputs, torch.float32, DEVICE if backend == "triton" else "cpu")

    def run(low, cu):
        return call(
            "mixed_chunk_attention",
            low,
            chunk_size=4,
            cu_seqlens=cu,
            output_final_state=True,
            backend=backend,
        )

    eager = run(low, cu)
    compiled = torch.compile(run, fullgraph=True, backend="aot_eager")(low, cu)
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)
