"""The Triton backend against the float64 references: output and every gradient.

Without a GPU the kernels run under TRITON_INTERPRET=1 (set in conftest.py). Every buffer the
kernels are meant to write completely is NaN-filled first, so an unwritten element or a read of
memory nobody wrote shows up as NaN. Small tiles (`block`) are forced in some cases so that short
test sequences still have several query/key blocks per chunk, and `max_hoist_keys` forces the
long-chunk path (scores recomputed per value tile) that chunk_size=None takes on long sequences.
Packed documents (cu_seqlens) and state in/out (initial_state, output_final_state) run on every
tile path too, against the reference given the same documents and state.
"""

import pytest
import torch
from helpers import (
    FP16_MAX,
    GRAD_NAMES,
    LARGE_SCORE_OPTIONS,
    assert_close,
    assert_launched,
    large_score_problem,
    largest_weight,
    make_problem,
    nan_filled_buffers,
    run_with_grads,
    tile_override,
    triton_kernels,
)

from flash_kernels import mixed_chunk_attention
from flash_kernels.core.tolerances import rms_ratio
from tools.launch_recording import record_launches

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
S, E = 5, 6  # not powers of two on purpose


@pytest.fixture(autouse=True)
def _nan_scratch():
    with nan_filled_buffers():
        yield


def as_dtype(problem, dtype, device=DEVICE):
    """The same problem in `dtype` (fresh leaves) and, rounded the same way, in float64."""
    low, exact = {}, {}
    for name, x in problem.items():
        if x is None:
            low[name] = exact[name] = None
            continue
        y = x.detach().to(device=device, dtype=dtype if name != "rel_bias" else torch.float32)
        low[name] = y.clone().requires_grad_(x.requires_grad)
        exact[name] = y.double().cpu().requires_grad_(x.requires_grad)
    return low, exact


def check_against_reference(problem, dtype=torch.float32, grad_out=None, **options):
    low, exact = as_dtype(problem, dtype)
    launches = {}
    out, grads, grad_out = run_with_grads(low, grad_out, launches, backend="triton", **options)
    linear = problem["q_lin"] is not None
    assert_launched("triton", "forward", launches["forward"], triton_kernels("forward", linear))
    every_backward_kernel = triton_kernels("backward", linear)
    if all(x.requires_grad for x in problem.values() if x is not None):
        assert_launched("triton", "backward", launches["backward"], every_backward_kernel)
    else:  # fewer gradients, fewer kernels
        launched = {r.kernel_name for r in launches["backward"]}
        assert launched <= every_backward_kernel, launched
    ref, ref_grads, _ = run_with_grads(
        exact, grad_out.double().cpu(), backend="reference", **options
    )
    assert out.dtype == dtype
    ratio = rms_ratio("mixed_chunk_attention", dtype)  # flash_kernels/core/tolerances.py
    assert_close("out", out.cpu(), ref, ratio)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        assert grads[name].dtype == low[name].dtype
        assert_close(f"d{name}", grads[name].cpu(), ref_grads[name], ratio)


def _cases():
    for causal in (True, False):
        for T, chunk in ((1, 8), (7, 8), (16, 8), (37, 8), (13, None)):
            for linear in (True, False):
                for bias in (True, False):
                    if T == 1 and not linear and not causal:
                        continue  # one token, quadratic only: the same as causal
                    yield pytest.param(
                        causal,
                        T,
                        chunk,
                        linear,
                        bias,
                        id=f"{'causal' if causal else 'full'}-T{T}-C{chunk}"
                        f"{'-lin' if linear else ''}{'-bias' if bias else ''}",
                    )


@pytest.mark.parametrize("causal,T,chunk,linear,bias", list(_cases()))
def test_matches_reference(causal, T, chunk, linear, bias):
    problem = make_problem((2,), T, S, E, linear=linear, bias_chunk=(chunk or T) if bias else None)
    check_against_reference(problem, chunk_size=chunk, causal=causal, quad_scale=0.7, lin_scale=0.3)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("path", ["hoisted", "recomputed"])
@pytest.mark.parametrize(
    "linear,bias", [(True, True), (False, True), (True, False)], ids=["lin-bias", "bias", "lin"]
)
def test_several_blocks_per_chunk(causal, path, linear, bias):
    """Chunks of 40 tokens in 16-row blocks (3 per chunk, the last partial), T = 90."""
    overrides = dict(block=16, state_block_t=16)
    if path == "recomputed":
        overrides["max_hoist_keys"] = 16
    problem = make_problem((2,), 90, S, E, linear=linear, bias_chunk=40 if bias else None, seed=1)
    with tile_override(**overrides):
        check_against_reference(
            problem, chunk_size=40, causal=causal, quad_scale=0.7, lin_scale=0.3
        )


@pytest.mark.parametrize("target", ["cuda:90", "cuda:86", "hip:gfx942", "hip:gfx90a"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_tiles_of_each_target(monkeypatch, target, causal):
    """The tiles kernel_config picks for each target and dtype, untouched by overrides: chunks of
    64 tokens, where float32 runs the query backward in 32-row blocks beside 64-row forward and
    key blocks on an H100 (so the key kernel reads a dS stored by narrower programs), and
    everything in 32-row blocks with less shared memory. Under the interpreter the target is
    FLASH_KERNELS_TARGET's (gpu_target.py)."""
    monkeypatch.setenv("FLASH_KERNELS_TARGET", target)
    problem = make_problem((2,), 150, S, E, bias_chunk=64, seed=7)
    check_against_reference(problem, chunk_size=64, causal=causal, quad_scale=0.7, lin_scale=0.3)


@pytest.mark.parametrize("target", ["cuda:90", "cuda:86"])
def test_wide_features_at_long_chunks_per_target(monkeypatch, target):
    """S over 128 at C = 256 recomputes the weights per key tile (hoisted, the chunk's keys x
    features would not fit on chip), and with a small shared memory every kernel runs 32-row
    blocks: S = 136 (a 256-wide feature tile), T = 300 (a partial second chunk)."""
    monkeypatch.setenv("FLASH_KERNELS_TARGET", target)
    problem = make_problem((1,), 300, 136, 40, bias_chunk=256, seed=8)
    with record_launches() as records:
        check_against_reference(problem, chunk_size=256, causal=True, quad_scale=0.7, lin_scale=0.3)
    forward = [r for r in records if r.kernel_name == "mixed_chunk_fwd_kernel"]
    assert forward and not any(r.constexprs["HOIST_SCORES"] for r in forward)
    blocks = {r.constexprs["BLOCK_M"] for r in forward}
    assert blocks == ({32} if target == "cuda:86" else {64})


@pytest.mark.parametrize("target", ["cuda:90", "hip:gfx942", "hip:gfx90a"])
def test_float32_dots_of_half_inputs_per_target(monkeypatch, target):
    """fp16 inputs' float32 products (relu^2 weights, state) run in tf32, except where the
    target has none (gfx90a, CDNA 2): at ieee precision there."""
    monkeypatch.setenv("FLASH_KERNELS_TARGET", target)
    problem = make_problem((2,), 37, 16, 24, bias_chunk=16, seed=5)
    with record_launches() as records:
        check_against_reference(problem, torch.float16, chunk_size=16, causal=True)
    precisions = {r.constexprs["DOT_PRECISION"] for r in records}
    assert precisions == {"ieee" if target == "hip:gfx90a" else "tf32"}


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_full_attention_long_sequence(causal):
    """chunk_size=None over a sequence longer than one key tile (the recomputing path)."""
    problem = make_problem((1,), 70, 17, 33, linear=False, bias_chunk=70, seed=2)
    with tile_override(block=16, max_hoist_keys=32, block_e=16):
        check_against_reference(problem, chunk_size=None, causal=causal)


def test_wide_features_and_several_value_tiles():
    """S and E not powers of two and E over several value tiles."""
    problem = make_problem((2,), 45, 24, 72, bias_chunk=16, seed=3)
    with tile_override(block_e=16):
        check_against_reference(problem, chunk_size=16, causal=True)


@pytest.mark.parametrize("batch", [(), (2, 3)])
def test_leading_batch_dims(batch):
    problem = make_problem(batch, 11, S, E, bias_chunk=4, seed=4)
    check_against_reference(problem, chunk_size=4, causal=True)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_float16(causal):
    problem = make_problem((2,), 37, 16, 24, bias_chunk=16, seed=5)
    check_against_reference(problem, dtype=torch.float16, chunk_size=16, causal=causal)


def check_state_against_reference(
    problem, *, lengths=None, initial_state=True, dtype=torch.float32, **options
):
    """Packed documents (`lengths`; None: one unpacked sequence) with an initial state and the
    final state out: the output, the final state and the gradient of every input (the initial
    state's included) against backend="reference" in float64, with a loss that weights the
    final state too."""
    T = problem["v"].shape[-2]
    cu_seqlens = None if lengths is None else torch.tensor([0] + lengths).cumsum(0)
    assert cu_seqlens is None or cu_seqlens[-1] == T
    leading = tuple(problem["v"].shape[:-2])
    S, E = problem["q_lin"].shape[-1], problem["v"].shape[-1]
    gen = torch.Generator().manual_seed(21)
    docs = () if lengths is None else (len(lengths),)
    state = 0.3 * torch.randn(*leading, *docs, S, E, generator=gen, dtype=torch.float64)
    low, exact = as_dtype(problem, dtype)
    if initial_state:  # float32 beside half inputs, as a model keeps it
        low["initial_state"] = state.to(DEVICE, torch.float32).requires_grad_()
        exact["initial_state"] = state.float().double().requires_grad_()
    else:
        low["initial_state"] = exact["initial_state"] = None

    def run(tensors, backend):
        with record_launches() as forward:
            out, final = mixed_chunk_attention(
                tensors["q_quad"],
                tensors["k_quad"],
                tensors["q_lin"],
                tensors["k_lin"],
                tensors["v"],
                rel_bias=tensors["rel_bias"],
                cu_seqlens=cu_seqlens,
                initial_state=tensors["initial_state"],
                output_final_state=True,
                backend=backend,
                **options,
            )
        weights = torch.Generator().manual_seed(22)
        loss = (
            out.double().cpu() * torch.randn(out.shape, generator=weights, dtype=torch.float64)
        ).sum()
        loss = (
            loss
            + (
                final.double().cpu()
                * torch.randn(final.shape, generator=weights, dtype=torch.float64)
            ).sum()
        )
        names = [n for n, x in tensors.items() if x is not None and x.requires_grad]
        with record_launches() as backward:
            grads = torch.autograd.grad(loss, [tensors[n] for n in names])
        return out, final, dict(zip(names, grads)), forward, backward

    out, final, grads, forward, backward = run(low, "triton")
    assert_launched("triton", "forward", forward, triton_kernels("forward", True))
    assert_launched("triton", "backward", backward, triton_kernels("backward", True))
    ref, ref_final, ref_grads, _, _ = run(exact, "reference")
    ratio = rms_ratio("mixed_chunk_attention", dtype)  # flash_kernels/core/tolerances.py
    assert out.dtype == dtype and final.dtype == torch.float32
    assert_close("out", out.cpu(), ref, ratio)
    assert_close("final_state", final.cpu(), ref_final, ratio)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        assert_close(f"d{name}", grads[name].cpu(), ref_grads[name], ratio)


# Documents shorter than a chunk, ending inside one and at its end, zero-length ones, for
# chunks of every tile path: one 16-row block per chunk (C = 4), three 16-row blocks per chunk
# with the relu^2 weights hoisted (C = 40, chunks <= max_hoist_keys), the same recomputed
# per value tile (max_hoist_keys below the chunk: the path of chunks over 256 tokens), and
# one chunk per document (chunk_size=None: C is the longest document) on either path.
PACKED_STATE_CASES = {
    "C4": (dict(chunk_size=4), [6, 0, 11, 1, 8], {}),
    "C40-hoisted": (dict(chunk_size=40), [41, 0, 17, 40, 3], dict(block=16, state_block_t=16)),
    "C40-recomputed": (dict(chunk_size=40), [41, 0, 17, 40, 3], dict(block=16, max_hoist_keys=16)),
    "one-chunk-per-document-hoisted": (dict(chunk_size=None), [13, 0, 33, 20], dict(block=16)),
    "one-chunk-per-document-recomputed": (
        dict(chunk_size=None),
        [13, 0, 33, 20],
        dict(block=16, max_hoist_keys=16),
    ),
}


@pytest.mark.parametrize("case", list(PACKED_STATE_CASES))
def test_packed_documents_with_state(case):
    options, lengths, tiles = PACKED_STATE_CASES[case]
    C = options["chunk_size"] or max(lengths)
    problem = make_problem((2,), sum(lengths), S, E, bias_chunk=C, seed=12)
    with tile_override(**tiles):
        check_state_against_reference(
            problem, lengths=lengths, quad_scale=0.7, lin_scale=0.3, **options
        )


@pytest.mark.parametrize("path", ["hoisted", "recomputed"])
def test_packed_documents_not_causal(path):
    """Non-causal packed documents (no state: each chunk sees its document's whole sum):
    chunks of 40 tokens in 16-row blocks."""
    overrides = dict(block=16, state_block_t=16)
    if path == "recomputed":
        overrides["max_hoist_keys"] = 16
    lengths = [41, 0, 17, 40, 3]
    problem = make_problem((1,), sum(lengths), S, E, bias_chunk=40, seed=13)
    with tile_override(**overrides):
        check_against_reference(
            problem,
            chunk_size=40,
            causal=False,
            quad_scale=0.7,
            lin_scale=0.3,
            cu_seqlens=torch.tensor([0] + lengths).cumsum(0),
        )


@pytest.mark.parametrize(
    "T,chunk_size,tiles,initial_state",
    [
        (37, 8, {}, True),  # a partial last chunk
        (37, 8, {}, False),  # the same, the final state only
        (32, 8, {}, True),  # complete chunks only
        (90, 40, dict(block=16, state_block_t=16), True),  # three blocks per chunk, hoisted
        (90, 40, dict(block=16, max_hoist_keys=16), True),  # the same, recomputed
    ],
    ids=["T37-C8", "T37-C8-final-only", "T32-C8", "T90-C40-hoisted", "T90-C40-recomputed"],
)
def test_state_in_and_out_of_one_sequence(T, chunk_size, tiles, initial_state):
    problem = make_problem((2,), T, S, E, bias_chunk=chunk_size, seed=14)
    with tile_override(**tiles):
        check_state_against_reference(
            problem,
            initial_state=initial_state,
            chunk_size=chunk_size,
            quad_scale=0.7,
            lin_scale=0.3,
        )


NEEDS_GPU_FOR_BF16 = pytest.mark.skipif(
    DEVICE != "cuda",
    reason="bfloat16 needs a GPU: the Triton interpreter multiplies raw bf16 "
    "bit patterns (triton issue #11584)",
)


@pytest.mark.gpu
@NEEDS_GPU_FOR_BF16
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_bfloat16(causal):
    problem = make_problem((2,), 300, 64, 96, bias_chunk=128, seed=6)
    check_against_reference(problem, dtype=torch.bfloat16, chunk_size=128, causal=causal)


def _check_large_scores(dtype, causal):
    problem, grad_out = large_score_problem()
    low, _ = as_dtype(problem, dtype)
    weight = largest_weight(
        low,
        causal=causal,
        chunk_size=LARGE_SCORE_OPTIONS["chunk_size"],
        quad_scale=LARGE_SCORE_OPTIONS["quad_scale"],
    )
    assert weight > 2 * FP16_MAX, f"premise: the largest relu^2 weight {weight:.3g} overflows fp16"
    check_against_reference(
        problem,
        dtype=dtype,
        grad_out=grad_out.to(DEVICE, dtype),
        causal=causal,
        **LARGE_SCORE_OPTIONS,
    )


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_float16_large_scores(causal):
    """fp16 inputs whose relu^2 weights (~1e5) exceed fp16's range while the output (~1e3) and
    the gradients do not: weights and states must stay fp32, forward and backward."""
    _check_large_scores(torch.float16, causal)


@pytest.mark.gpu
@NEEDS_GPU_FOR_BF16
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_bfloat16_large_scores(causal):
    """The same in bf16, whose range holds the weights: an operand rounded to fp16 gets inf."""
    _check_large_scores(torch.bfloat16, causal)


@pytest.mark.parametrize(
    "wanted",
    [
        ("v",),
        ("q_lin",),
        ("k_lin",),
        ("rel_bias",),
        ("k_quad",),
        ("q_quad", "v"),
        ("k_quad", "k_lin"),
    ],
)
def test_only_some_inputs_require_grad(wanted):
    problem = make_problem((2,), 37, S, E, bias_chunk=8, seed=7)
    for name in GRAD_NAMES:
        problem[name].requires_grad_(name in wanted)
    check_against_reference(problem, chunk_size=8, causal=True)


def test_deterministic():
    problem = make_problem((2,), 50, S, E, bias_chunk=16, seed=8)
    low, _ = as_dtype(problem, torch.float32)
    first_out, first, grad_out = run_with_grads(low, chunk_size=16, backend="triton")
    second_out, second, _ = run_with_grads(low, grad_out, chunk_size=16, backend="triton")
    assert torch.equal(first_out, second_out)
    for name in first:
        assert torch.equal(first[name], second[name]), name


@pytest.mark.parametrize("linear", [True, False])
def test_causal_outputs_do_not_change_when_tokens_are_appended(linear):
    problem = make_problem((2,), 29, S, E, linear=linear, bias_chunk=8, requires_grad=False, seed=9)
    low, _ = as_dtype(problem, torch.float32)
    args = [low[n] for n in ("q_quad", "k_quad", "q_lin", "k_lin", "v")]
    full = mixed_chunk_attention(*args, rel_bias=low["rel_bias"], chunk_size=8, backend="triton")
    for T in (1, 7, 8, 9, 20):
        part = mixed_chunk_attention(
            *(x[..., :T, :] if x is not None else None for x in args),
            rel_bias=low["rel_bias"],
            chunk_size=8,
            backend="triton",
        )
        torch.testing.assert_close(part, full[..., :T, :], rtol=1e-6, atol=1e-6)


def test_auto_picks_triton_here():
    """On CUDA, or on the CPU under the interpreter, "auto" runs the kernels (same bits)."""
    problem = make_problem((1,), 20, S, E, requires_grad=False, seed=10)
    low, _ = as_dtype(problem, torch.float32)
    args = [low[n] for n in ("q_quad", "k_quad", "q_lin", "k_lin", "v")]
    auto = mixed_chunk_attention(*args, chunk_size=8)
    forced = mixed_chunk_attention(*args, chunk_size=8, backend="triton")
    assert torch.equal(auto, forced)


def test_wide_queries_are_refused_by_triton_and_routed_by_auto():
    x = torch.randn(1, 4, 257, device=DEVICE)
    v = torch.randn(1, 4, 3, device=DEVICE)
    with pytest.raises(ValueError, match="S .* at most 256"):
        mixed_chunk_attention(x, x, None, None, v, chunk_size=2, backend="triton")
    out = mixed_chunk_attention(x, x, None, None, v, chunk_size=2)
    torch.testing.assert_close(
        out, mixed_chunk_attention(x, x, None, None, v, chunk_size=2, backend="torch")
    )
