"""Property-based fuzzing of both public ops against float64 ground truth.

Every example draws a shape (0-2 leading batch dims of size 1-3, at most 4 sequences in all;
T 1..70, S 1..20, E 1..20), a chunking, causal or not, with or without rel_bias, linear part or
quadratic only, scales (None = 1/C, or random), a dtype and (for the Triton backend) tile
sizes; one example in three packs up to 4 documents (cu_seqlens, zero-length ones included;
max_seqlen left out, exact or longer), and causal examples with a linear part may take an
initial_state and return the final state. It runs the op on one backend:
- "triton" (under TRITON_INTERPRET=1 without a GPU) and "torch", in float32 or float16 (never
  float64: the Triton backend would route it to the PyTorch path and no kernel would run).
  Ground truth: `backend="reference"` on float64 copies of the same rounded inputs (for
  flash_attention, composed around it with the roles rounded to the input dtype, as the op
  rounds them), given the scales and chunk size resolved by hand (`_chunk_len`: with packed
  documents and chunk_size=None, max_seqlen or the longest document), so a wrong default in
  the package shows. Packed documents and state are worked out around it from the contract's
  section 7 (`_documents_and_state`: each document run alone, the initial state's term and
  the final state added by hand), so the ground truth shares no packing or state code with
  the op. A Triton example must launch the
  Triton kernels (forward and backward, the state scans with a linear part); the PyTorch paths
  launch none.
- "reference", in float64, against the C++ loop oracle (csrc_ref), which shares no code with it
  (run per document, with the state added by hand, as above).
The output, the final state and the gradients of every input (the initial state's included)
are compared, with the same grad_out (and weights of the final state).

The draws lean toward the paths that are hardest to get right: several chunks (two thirds of
the examples: the exclusive causal state across chunks), half of those with several 16-row
query blocks per chunk (tiles forced with tile_override), causal and linear (three quarters
each); chunk_size=None in about one example in six.

Tolerance: rms(error) <= ratio * rms(expected) (tests/helpers.py assert_close), the op's and
dtype's value in flash_kernels/core/tolerances.py (where each value is explained): float32 2e-5;
float16 4e-3 for mixed_chunk_attention and 5e-3 for flash_attention; float64 (the reference
against the C++ oracle) 1e-10.

Magnitudes are kept O(1) so fp16 neither overflows (relu^2 > 65504) nor underflows into
subnormals (which would make a relative tolerance meaningless): queries and keys are scaled so
that the resolved quad_scale * <q, k> is ~N(0, 1), and explicit scales lie in [0.25, 2] in
absolute value.

Reproducible and bounded: hypothesis runs derandomized (the same examples on every run and
machine), without a database or shrinking (a failing example is printed as drawn; shrinking under
the interpreter would take minutes), and each example's Triton work is capped at MAX_WORK
(batch x chunks x query blocks, x key tiles on the long-chunk path) because the interpreter
runs programs one by one in Python.
FLASH_KERNELS_FUZZ_EXAMPLES sets the number of drawn examples per test (default 26: with every
example launching the kernels, and a third of them packing documents (idle chunk slots) or
carrying state, the fuzz costs what 30 did before packing and state were drawn, and 35 before
float64 examples were left out).
"""

import math
import os

import pytest
import torch

pytest.importorskip("hypothesis", reason="the fuzz tests need hypothesis (the 'test' extra)")
from helpers import (
    GRAD_NAMES,
    assert_close,
    assert_launched,
    call_op,
    composed_flash_attention,
    cpp_oracle,
    nan_filled_buffers,
    tile_override,
    triton_kernels,
)
from hypothesis import HealthCheck, Phase, example, given, note, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from csrc_ref import cpp_toolchain_available
from flash_kernels.core.tolerances import rms_ratio
from tools.launch_recording import record_launches

pytestmark = pytest.mark.slow  # hundreds of random problems

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ("triton", "torch", "reference")
DTYPES = (torch.float32, torch.float16)  # of "triton" and "torch"; "reference" runs float64
# The interpreter executes every program of a grid in Python: cap the programs (_work).
MAX_WORK = 6 if DEVICE == "cpu" else 10**6
MAX_EXAMPLES = int(os.environ.get("FLASH_KERNELS_FUZZ_EXAMPLES", "26"))
# Tile overrides (see test_triton_mixed_chunk.py): several query/key blocks per chunk (block 16),
# several state tiles along T, the long-chunk path (scores recomputed per value tile), narrow
# value tiles.
TILES = (
    {},
    {"block": 16, "state_block_t": 16},
    {"block": 16, "max_hoist_keys": 16},
    {"block_e": 16, "state_block_t": 16},
)

# The explicit examples' packing and state options: one sequence, no state.
ONE_SEQUENCE = dict(documents=None, max_seqlen=None, initial_state=False, final_state=False)

FUZZ_SETTINGS = settings(
    max_examples=MAX_EXAMPLES,
    deadline=None,
    derandomize=True,
    database=None,
    phases=(Phase.explicit, Phase.generate),
    print_blob=False,
    suppress_health_check=(HealthCheck.too_slow, HealthCheck.data_too_large),
)


def _work(B, T, chunk_size, tiles, num_docs=1):
    """The interpreter's work for one example: the per-chunk programs the Triton backend
    launches (as backends/triton/kernel_config.py; packed documents get cdiv(T, C) + N - 1
    chunk slots, flash_kernels/core/packing.py), each counted once per key tile it walks on the
    long-chunk path (chunks longer than max_hoist_keys)."""
    C = chunk_size or T
    chunk_len = min(C, T)
    pow2 = max(16, 1 << (chunk_len - 1).bit_length())
    blocks = math.ceil(chunk_len / tiles.get("block", min(64, pow2)))
    key_tiles = 1 if pow2 <= tiles.get("max_hoist_keys", 256) else blocks
    return B * (math.ceil(T / C) + num_docs - 1) * blocks * key_tiles


@st.composite
def shapes_and_options(draw):
    """Shape, chunking, tile overrides, dtype and scales shared by both fuzzers."""
    # Several chunks 4 times in 6 (half of them with several 16-row query blocks per chunk),
    # one chunk at least as long as the sequence once, chunk_size=None once.
    chunking = draw(st.sampled_from(("several", "several blocks") * 2 + ("one", "none")))
    # At most 4 sequences (a bigger batch multiplies the interpreter's work and adds no path),
    # one with several blocks per chunk (the batch index has its own grid axis: the other
    # draws cover it).
    most = 1 if chunking == "several blocks" else 4
    batch = tuple(
        draw(
            st.lists(st.integers(1, 3), min_size=0, max_size=2).filter(
                lambda dims: math.prod(dims) <= most
            )
        )
    )
    B = math.prod(batch)
    S = draw(st.integers(1, 20))
    E = draw(st.integers(1, 20))
    block_tiles = [t for t in TILES if t.get("block") == 16]
    if chunking == "several blocks":
        # Chunks of 17..40 tokens: two or three query blocks each (one sequence: some size
        # always fits MAX_WORK).
        T = draw(st.integers(18, 70))
        sizes = [
            c for c in range(17, min(40, T - 1) + 1) if _work(B, T, c, block_tiles[0]) <= MAX_WORK
        ]
        chunk_size = draw(st.sampled_from(sizes))
        tiles = draw(
            st.sampled_from([t for t in block_tiles if _work(B, T, chunk_size, t) <= MAX_WORK])
        )
    else:
        T = draw(st.integers(2 if chunking == "several" else 1, 70))
        # Chunk sizes that split the sequence within MAX_WORK (none for a big batch).
        sizes = [c for c in range(1, min(40, T - 1) + 1) if _work(B, T, c, {}) <= MAX_WORK]
        if chunking == "several" and sizes:
            chunk_size = draw(st.integers(sizes[0], sizes[-1]))
        else:
            chunk_size = None if chunking == "none" else draw(st.integers(T, T + 16))
        tiles = draw(
            st.sampled_from([t for t in TILES if not t or _work(B, T, chunk_size, t) <= MAX_WORK])
        )

    def scale():
        magnitude = draw(st.none() | st.floats(0.25, 2.0))
        return None if magnitude is None else magnitude * draw(st.sampled_from((1.0, -1.0)))

    # Packed documents one example in three: 2 to 4 (zero-length ones included), max_seqlen
    # left out, exact or longer than the longest; the last cuts are dropped while the chunk
    # slots would pass MAX_WORK (down to one document).
    documents, max_seqlen = None, None
    if draw(st.sampled_from((True, False, False))):
        cuts = sorted(draw(st.lists(st.integers(0, T), min_size=1, max_size=3)))
        max_seqlen_choice = draw(st.sampled_from((None, "longest", "longer")))
        while True:
            documents = [0, *cuts, T]
            longest = max(b - a for a, b in zip(documents, documents[1:]))
            max_seqlen = {None: None, "longest": longest, "longer": longest + 5}[max_seqlen_choice]
            C = chunk_size or max_seqlen or longest
            if not cuts or _work(B, T, C, tiles, num_docs=len(cuts) + 1) <= MAX_WORK:
                break
            cuts.pop()
    # State in and out (used where the example is causal with a linear part).
    initial_state, final_state = draw(
        st.sampled_from(((False, False), (True, False), (False, True), (True, True)))
    )
    return dict(
        batch=batch,
        T=T,
        S=S,
        E=E,
        chunk_size=chunk_size,
        tiles=tiles,
        causal=draw(st.sampled_from((True, True, True, False))),
        bias=draw(st.booleans()),
        dtype=draw(st.sampled_from(DTYPES)),
        quad_scale=scale(),
        lin_scale=scale(),
        seed=draw(st.integers(0, 2**31 - 1)),
        documents=documents,
        max_seqlen=max_seqlen,
        initial_state=initial_state,
        final_state=final_state,
    )


def _chunk_len(case):
    """C resolved by hand (docs/contract.md sections 2 and 7): the chunk size, else for
    chunk_size=None the sequence length, or with packed documents max_seqlen or the longest
    document."""
    if case["chunk_size"] is not None:
        return case["chunk_size"]
    if case["documents"] is None:
        return case["T"]
    bounds = case["documents"]
    return case["max_seqlen"] or max(b - a for a, b in zip(bounds, bounds[1:]))


def _with_state_where_allowed(case, linear):
    """The case with initial_state / final_state kept only where the op takes them (causal,
    with a linear part)."""
    allowed = case["causal"] and linear
    return dict(
        case,
        initial_state=case["initial_state"] and allowed,
        final_state=case["final_state"] and allowed,
    )


def _initial_state(case, rand):
    """float64 values of the drawn initial state ((*batch, N, S, E) packed, else
    (*batch, S, E)), or None."""
    if not case["initial_state"]:
        return None
    docs = () if case["documents"] is None else (len(case["documents"]) - 1,)
    return rand(*case["batch"], *docs, case["S"], case["E"], scale=0.5)


def _qk_factor(case):
    """Entry scale of queries and keys that makes resolved quad_scale * <q, k> ~ N(0, 1)."""
    quad_scale = case["quad_scale"]
    quad_scale = abs(quad_scale) if quad_scale is not None else 1.0 / _chunk_len(case)
    return (1.0 / (quad_scale * math.sqrt(case["S"]))) ** 0.5


def _options(case):
    """The options as drawn (None scales, chunk_size and max_seqlen left to the op)."""
    packed = case["documents"] is not None
    return dict(
        chunk_size=case["chunk_size"],
        causal=case["causal"],
        quad_scale=case["quad_scale"],
        lin_scale=case["lin_scale"],
        cu_seqlens=torch.tensor(case["documents"]) if packed else None,
        max_seqlen=case["max_seqlen"],
        output_final_state=case["final_state"],
    )


def _resolved(case):
    """The options with chunk_size and the scales resolved by hand (docs/contract.md section 2:
    default scales 1 / C)."""
    C = _chunk_len(case)
    return dict(
        chunk_size=C,
        causal=case["causal"],
        quad_scale=1.0 / C if case["quad_scale"] is None else case["quad_scale"],
        lin_scale=1.0 / C if case["lin_scale"] is None else case["lin_scale"],
    )


def _documents_and_state(attention, case, initial_state, finals):
    """The contract's section 7 around `attention(q_quad, k_quad, q_lin, k_lin, v, rel_bias)`,
    a ground truth of one sequence without packing or state: each document run alone, plus
    lin_scale * q_lin @ initial_state[n]; with final_state, the final states (initial_state plus
    k_lin^T v over each document's complete chunks) are appended to `finals`."""
    C, lin_scale = _chunk_len(case), _resolved(case)["lin_scale"]
    packed = case["documents"] is not None
    bounds = case["documents"] if packed else [0, case["T"]]

    def documents(q_quad, k_quad, q_lin, k_lin, v, rel_bias):
        outs, states = [], []
        for n, (bos, eos) in enumerate(zip(bounds, bounds[1:])):

            def doc(x, bos=bos, eos=eos):
                return None if x is None else x[..., bos:eos, :]

            out = (
                attention(doc(q_quad), doc(k_quad), doc(q_lin), doc(k_lin), doc(v), rel_bias)
                if eos > bos
                else doc(v)
            )
            start = None
            if initial_state is not None:
                start = initial_state[..., n, :, :] if packed else initial_state
                out = out + lin_scale * doc(q_lin) @ start
            outs.append(out)
            if case["final_state"]:
                complete = (eos - bos) // C * C
                state = doc(k_lin)[..., :complete, :].transpose(-1, -2) @ doc(v)[..., :complete, :]
                states.append(state if start is None else state + start)
        if case["final_state"]:
            finals.append(torch.stack(states, dim=-3) if packed else states[0])
        return torch.cat(outs, dim=-2)

    return documents


def _leaves(values, dtypes, device):
    """Fresh leaves requiring grad: values (float64, or None) rounded to dtypes[name]."""
    return {
        name: None if x is None else x.to(device=device, dtype=dtypes[name]).requires_grad_()
        for name, x in values.items()
    }


def _rounded_float64(values, dtypes):
    """The float64 inputs of the ground truth: each value rounded as the tested run sees it."""
    return {
        name: None if x is None else x.to(dtypes[name]).double().requires_grad_()
        for name, x in values.items()
    }


def _compare(op, values, dtypes, backend, case, linear):
    """Run `op` on `backend` with the drawn options, on the inputs rounded to `dtypes` (float64
    for "reference"), and the ground truth (the reference, or for the reference itself the C++
    oracle) on float64 copies with the options resolved by hand; compare the output and the
    gradient of every tensor input; check which kernels ran."""
    if backend == "reference":
        if not cpp_toolchain_available()[0]:
            pytest.skip(f"the C++ oracle cannot be built: {cpp_toolchain_available()[1]}")
        dtypes = dict.fromkeys(dtypes, torch.float64)
    dtype = dtypes["v"]
    low = _leaves(values, dtypes, DEVICE)
    tiles = case["tiles"] if backend == "triton" else {}
    with nan_filled_buffers(), tile_override(**tiles), record_launches() as forward:
        result = call_op(
            op, low, backend=backend, initial_state=low["initial_state"], **_options(case)
        )
    out, final = result if case["final_state"] else (result, None)
    gen = torch.Generator().manual_seed(1234)
    grad_out = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out)
    outputs, grad_outputs = [out], [grad_out]
    if final is not None:
        outputs.append(final)
        grad_outputs.append(torch.randn(final.shape, generator=gen, dtype=torch.float64).to(final))
    names = [n for n, x in low.items() if x is not None]
    with nan_filled_buffers(), tile_override(**tiles), record_launches() as backward:
        grads = torch.autograd.grad(
            outputs, [low[n] for n in names], grad_outputs, allow_unused=True
        )
    what = f"{op}[{backend}]"
    for phase, records in (("forward", forward), ("backward", backward)):
        expected = triton_kernels(phase, linear) if backend == "triton" else set()
        assert_launched(what, phase, records, expected, from_z=op == "flash_attention")

    exact = _rounded_float64(values, dtypes)

    def one_sequence(q_quad, k_quad, q_lin, k_lin, v, rel_bias):
        roles = dict(q_quad=q_quad, k_quad=k_quad, q_lin=q_lin, k_lin=k_lin, v=v, rel_bias=rel_bias)
        if backend == "reference":
            return cpp_oracle("mixed_chunk_attention", roles, **_resolved(case))
        return call_op("mixed_chunk_attention", roles, backend="reference", **_resolved(case))

    finals = []
    attention = _documents_and_state(one_sequence, case, exact["initial_state"], finals)
    if op == "mixed_chunk_attention":
        truth = attention(*(exact[n] for n in GRAD_NAMES))
    else:  # flash_attention rounds the roles to z's dtype: so does its ground truth
        truth = composed_flash_attention(exact, attention, round_to=dtype)
    truth_outputs = [truth] + finals
    truth_grads = torch.autograd.grad(
        truth_outputs,
        [exact[n] for n in names],
        [g.double().cpu() for g in grad_outputs],
        allow_unused=True,
    )

    assert out.dtype == dtype and out.shape == truth.shape
    ratio = rms_ratio(op, dtype)
    assert_close(f"{what} out", out.cpu(), truth, ratio)
    if final is not None:
        assert final.dtype == torch.promote_types(dtype, torch.float32)
        assert_close(f"{what} final_state", final.cpu(), finals[0], ratio)
    for name, grad, truth_grad in zip(names, grads, truth_grads):
        assert grad is not None, f"{what} d{name} is None"
        assert grad.dtype == low[name].dtype and grad.shape == low[name].shape
        assert_close(f"{what} d{name}", grad.cpu(), truth_grad, ratio)


@pytest.mark.parametrize("backend", BACKENDS)
@FUZZ_SETTINGS
@given(case=shapes_and_options(), linear=st.sampled_from((True, True, True, False)))
@example(
    case=dict(
        batch=(),
        T=1,
        S=1,
        E=1,
        chunk_size=1,
        tiles={},
        causal=True,
        bias=True,
        dtype=torch.float32,
        quad_scale=None,
        lin_scale=None,
        seed=0,
        **ONE_SEQUENCE,
    ),
    linear=True,
)
@example(
    case=dict(
        batch=(2,),
        T=70,
        S=20,
        E=20,
        chunk_size=None,
        tiles={"block": 16, "max_hoist_keys": 16},
        causal=False,
        bias=True,
        dtype=torch.float16,
        quad_scale=-0.5,
        lin_scale=2.0,
        seed=1,
        **ONE_SEQUENCE,
    ),
    linear=True,
)
# state in and out of one sequence whose last chunk is partial
@example(
    case=dict(
        batch=(3, 1),
        T=37,
        S=7,
        E=13,
        chunk_size=8,
        tiles={"block": 16, "state_block_t": 16},
        causal=True,
        bias=True,
        dtype=torch.float16,
        quad_scale=None,
        lin_scale=None,
        seed=2,
        **dict(ONE_SEQUENCE, initial_state=True, final_state=True),
    ),
    linear=True,
)
# packed documents, one chunk each (C = the longest, 12), default scales, state in and out
@example(
    case=dict(
        batch=(),
        T=30,
        S=6,
        E=9,
        chunk_size=None,
        tiles={},
        causal=True,
        bias=True,
        dtype=torch.float32,
        quad_scale=None,
        lin_scale=None,
        seed=3,
        documents=[0, 7, 7, 19, 30],
        max_seqlen=None,
        initial_state=True,
        final_state=True,
    ),
    linear=True,
)
def test_mixed_chunk_attention_fuzz(backend, case, linear):
    case = _with_state_where_allowed(case, linear)
    note(f"case={case} linear={linear}")
    gen = torch.Generator().manual_seed(case["seed"])
    batch, T, S, E = case["batch"], case["T"], case["S"], case["E"]
    C = _chunk_len(case)

    def rand(*shape, scale=1.0):
        return scale * torch.randn(*shape, generator=gen, dtype=torch.float64)

    qk = _qk_factor(case)
    lin_factor = S**-0.25  # <q_lin, k_lin> ~ N(0, 1)
    values = dict(
        q_quad=rand(*batch, T, S, scale=qk),
        k_quad=rand(*batch, T, S, scale=qk),
        q_lin=rand(*batch, T, S, scale=lin_factor) if linear else None,
        k_lin=rand(*batch, T, S, scale=lin_factor) if linear else None,
        v=rand(*batch, T, E),
        rel_bias=rand(2 * C - 1, scale=0.5) if case["bias"] else None,
        initial_state=_initial_state(case, rand),
    )
    # rel_bias and the state float32 beside half inputs, as a model keeps them
    dtypes = {
        name: torch.float32 if name in ("rel_bias", "initial_state") else case["dtype"]
        for name in values
    }
    _compare("mixed_chunk_attention", values, dtypes, backend, case, linear)


@pytest.mark.parametrize("backend", BACKENDS)
@FUZZ_SETTINGS
@given(case=shapes_and_options(), roles=st.sampled_from((4, 4, 4, 2)), gate=st.booleans())
@example(
    case=dict(
        batch=(),
        T=1,
        S=1,
        E=1,
        chunk_size=1,
        tiles={},
        causal=True,
        bias=True,
        dtype=torch.float32,
        quad_scale=None,
        lin_scale=None,
        seed=0,
        **ONE_SEQUENCE,
    ),
    roles=4,
    gate=True,
)
@example(
    case=dict(
        batch=(2,),
        T=45,
        S=20,
        E=20,
        chunk_size=16,
        tiles={"block": 16, "state_block_t": 16},
        causal=False,
        bias=True,
        dtype=torch.float16,
        quad_scale=None,
        lin_scale=-1.0,
        seed=1,
        **ONE_SEQUENCE,
    ),
    roles=4,
    gate=True,
)
# packed documents, one chunk each as long as max_seqlen (16), default scales, state in and out
@example(
    case=dict(
        batch=(),
        T=21,
        S=5,
        E=7,
        chunk_size=None,
        tiles={},
        causal=True,
        bias=True,
        dtype=torch.float16,
        quad_scale=None,
        lin_scale=None,
        seed=2,
        documents=[0, 9, 9, 21],
        max_seqlen=16,
        initial_state=True,
        final_state=True,
    ),
    roles=4,
    gate=True,
)
def test_flash_attention_fuzz(backend, case, roles, gate):
    case = _with_state_where_allowed(case, roles == 4)
    note(f"case={case} roles={roles} gate={gate}")
    gen = torch.Generator().manual_seed(case["seed"])
    batch, T, S, E = case["batch"], case["T"], case["S"], case["E"]
    C = _chunk_len(case)

    def rand(*shape, scale=1.0, shift=0.0):
        return shift + scale * torch.randn(*shape, generator=gen, dtype=torch.float64)

    # Roles are z * gamma + beta with gamma ~ 1: z at the query/key scale keeps the resolved
    # quad_scale * <role_q, role_k> ~ N(0, 1). An explicit lin_scale is taken relative to 1/C
    # here (the linear roles share z's scale, so an absolute one would make lin ~ C x larger).
    qk = _qk_factor(case)
    if case["lin_scale"] is not None:
        quad_scale = case["quad_scale"] if case["quad_scale"] is not None else 1.0 / C
        case = dict(case, lin_scale=case["lin_scale"] * abs(quad_scale))
    values = dict(
        z=rand(*batch, T, S, scale=qk),
        gamma=rand(roles, S, scale=0.3, shift=1.0),
        beta=rand(roles, S, scale=0.3 * qk),
        v=rand(*batch, T, E),
        u=rand(*batch, T, E) if gate else None,
        rel_bias=rand(2 * C - 1, scale=0.5) if case["bias"] else None,
        initial_state=_initial_state(case, rand),
    )
    # float32 parameters and state beside half inputs, as in training
    dtypes = {
        name: torch.float32
        if name in ("gamma", "beta", "rel_bias", "initial_state")
        else case["dtype"]
        for name in values
    }
    _compare("flash_attention", values, dtypes, backend, case, roles == 4)
