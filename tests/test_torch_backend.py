"""The chunked PyTorch backend against the dense reference, gradcheck, and causal consistency."""

import pytest
import torch
from helpers import (
    DEFAULT_SCALE_CASES,
    FP16_MAX,
    LARGE_SCORE_OPTIONS,
    assert_close,
    large_score_problem,
    largest_weight,
    make_problem,
    run_with_grads,
    scale_case_id,
)

from flash_kernels import mixed_chunk_attention

S, E = 5, 6  # not powers of two on purpose


def _cases():
    for causal in (True, False):
        for T, chunk in ((1, 8), (7, 8), (16, 8), (37, 8), (13, None)):
            for linear in (True, False):
                for bias in (True, False):
                    if T == 1 and not linear and not causal:
                        continue  # one token, quadratic only: the same as causal
                    yield causal, T, chunk, linear, bias


@pytest.mark.parametrize("causal,T,chunk,linear,bias", list(_cases()))
def test_torch_matches_reference_forward_and_grads(causal, T, chunk, linear, bias):
    problem = make_problem((2,), T, S, E, linear=linear, bias_chunk=(chunk or T) if bias else None)
    options = dict(chunk_size=chunk, causal=causal, quad_scale=0.7, lin_scale=0.3)
    out, grads, grad_out = run_with_grads(problem, backend="torch", **options)
    ref, ref_grads, _ = run_with_grads(problem, grad_out, backend="reference", **options)
    assert_close("out", out, ref, 1e-12)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        assert_close(f"d{name}", grads[name], ref_grads[name], 1e-12)


@pytest.mark.parametrize("batch", [(), (3,), (2, 3)])
def test_leading_batch_dims(batch):
    problem = make_problem(batch, 11, S, E, bias_chunk=4)
    out, grads, grad_out = run_with_grads(problem, chunk_size=4, backend="torch")
    ref, ref_grads, _ = run_with_grads(problem, grad_out, chunk_size=4, backend="reference")
    assert out.shape == (*batch, 11, E)
    assert_close("out", out, ref, 1e-12)
    for name in grads:
        assert grads[name].shape == problem[name].shape
        assert_close(f"d{name}", grads[name], ref_grads[name], 1e-12)


@pytest.mark.parametrize("causal", [True, False])
@pytest.mark.parametrize("linear", [True, False])
def test_gradcheck_torch_backend(causal, linear):
    problem = make_problem((2,), 9, 3, 4, linear=linear, bias_chunk=4)
    names = [
        n for n in ("q_quad", "k_quad", "q_lin", "k_lin", "v", "rel_bias") if problem[n] is not None
    ]

    def fn(*tensors):
        p = dict(problem, **dict(zip(names, tensors)))
        return mixed_chunk_attention(
            p["q_quad"],
            p["k_quad"],
            p["q_lin"],
            p["k_lin"],
            p["v"],
            rel_bias=p["rel_bias"],
            chunk_size=4,
            causal=causal,
            backend="torch",
        )

    assert torch.autograd.gradcheck(fn, [problem[n] for n in names])


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_float16_large_scores(causal):
    """fp16 inputs whose relu^2 weights (~1e5) exceed fp16's range while the output (~1e3) and
    the gradients do not (tests/helpers.py large_score_problem): forward and backward against
    the float64 reference on the same rounded inputs."""
    problem, grad_out = large_score_problem()
    grad_out = grad_out.half()  # as the fp16 backward sees it, for both sides
    low = {
        n: None
        if x is None
        else x.detach().to(torch.float32 if n == "rel_bias" else torch.float16).requires_grad_()
        for n, x in problem.items()
    }
    exact = {n: None if x is None else x.detach().double().requires_grad_() for n, x in low.items()}
    weight = largest_weight(
        low,
        causal=causal,
        chunk_size=LARGE_SCORE_OPTIONS["chunk_size"],
        quad_scale=LARGE_SCORE_OPTIONS["quad_scale"],
    )
    assert weight > 2 * FP16_MAX, f"premise: the largest relu^2 weight {weight:.3g} overflows fp16"
    out, grads, _ = run_with_grads(
        low, grad_out, backend="torch", causal=causal, **LARGE_SCORE_OPTIONS
    )
    ref, ref_grads, _ = run_with_grads(
        exact, grad_out, backend="reference", causal=causal, **LARGE_SCORE_OPTIONS
    )
    assert out.dtype == torch.float16
    assert_close("out", out, ref, 4e-3)  # fp16 rounding of the output and the gradients
    for name in grads:
        assert grads[name].dtype == low[name].dtype
        assert_close(f"d{name}", grads[name], ref_grads[name], 4e-3)


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("case", DEFAULT_SCALE_CASES, ids=scale_case_id)
def test_default_scales_are_one_over_chunk(case, backend):
    """Non-causal, so that the linear part matters even within a single chunk."""
    T, chunk_size, quad_scale, lin_scale, resolved_quad, resolved_lin = case
    problem = make_problem((1,), T, S, E, requires_grad=False)
    args = [problem[n] for n in ("q_quad", "k_quad", "q_lin", "k_lin", "v")]
    default = mixed_chunk_attention(
        *args,
        chunk_size=chunk_size,
        causal=False,
        quad_scale=quad_scale,
        lin_scale=lin_scale,
        backend=backend,
    )
    explicit = mixed_chunk_attention(
        *args,
        chunk_size=chunk_size,
        causal=False,
        quad_scale=resolved_quad,
        lin_scale=resolved_lin,
        backend=backend,
    )
    torch.testing.assert_close(default, explicit, rtol=0, atol=0)


@pytest.mark.parametrize("backend", ["torch", "reference"])
@pytest.mark.parametrize("linear", [True, False])
def test_causal_outputs_do_not_change_when_tokens_are_appended(backend, linear):
    long = make_problem((2,), 29, S, E, linear=linear, bias_chunk=8, requires_grad=False)
    full = mixed_chunk_attention(
        long["q_quad"],
        long["k_quad"],
        long["q_lin"],
        long["k_lin"],
        long["v"],
        rel_bias=long["rel_bias"],
        chunk_size=8,
        backend=backend,
    )
    for T in (1, 7, 8, 9, 20):
        prefix = {
            n: (x[..., :T, :] if x is not None and n != "rel_bias" else x) for n, x in long.items()
        }
        part = mixed_chunk_attention(
            prefix["q_quad"],
            prefix["k_quad"],
            prefix["q_lin"],
            prefix["k_lin"],
            prefix["v"],
            rel_bias=prefix["rel_bias"],
            chunk_size=8,
            backend=backend,
        )
        torch.testing.assert_close(part, full[..., :T, :], rtol=1e-13, atol=1e-13)


@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_empty_sequence(backend):
    problem = make_problem((2, 3), 0, S, E, bias_chunk=4)
    out = mixed_chunk_attention(
        problem["q_quad"],
        problem["k_quad"],
        problem["q_lin"],
        problem["k_lin"],
        problem["v"],
        rel_bias=problem["rel_bias"],
        chunk_size=4,
        backend=backend,
    )
    assert out.shape == (2, 3, 0, E) and out.dtype == torch.float64
    out.sum().backward()
    assert problem["v"].grad is not None and problem["v"].grad.shape == problem["v"].shape


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_low_precision_dtypes(dtype, backend):
    """Half inputs compute in float32 and return v's dtype; compared with a float64 run."""
    problem = make_problem((2,), 37, S, E, bias_chunk=8, requires_grad=False)
    args = [problem[n] for n in ("q_quad", "k_quad", "q_lin", "k_lin", "v")]
    expected = mixed_chunk_attention(
        *args, rel_bias=problem["rel_bias"], chunk_size=8, backend="reference"
    )
    low = [x.to(dtype) for x in args]
    out = mixed_chunk_attention(
        *low, rel_bias=problem["rel_bias"].float(), chunk_size=8, backend=backend
    )
    assert out.dtype == dtype
    # The error budget is the rounding of the inputs and of the output to `dtype`.
    ratio = {torch.float32: 1e-6, torch.float16: 4e-3, torch.bfloat16: 3e-2}[dtype]
    assert_close("out", out, expected, ratio)


def test_chunk_longer_than_sequence_uses_the_full_bias_offsets():
    """T < C: one partial chunk, bias entries indexed by i - j + C - 1 with C the chunk size."""
    problem = make_problem((1,), 5, S, E, bias_chunk=16)
    out, grads, grad_out = run_with_grads(problem, chunk_size=16, backend="torch")
    ref, ref_grads, _ = run_with_grads(problem, grad_out, chunk_size=16, backend="reference")
    assert_close("out", out, ref, 1e-12)
    assert_close("drel_bias", grads["rel_bias"], ref_grads["rel_bias"], 1e-12)
