"""The C++ loop oracle (csrc_ref) against autograd of the dense PyTorch reference, in float64.

Two implementations that share no code: `dense_reference` builds one masked T x T matrix and lets
autograd differentiate it; the C++ oracle loops over chunks and implements the
docs/contract.md section 3
backward formulas by hand (prefix states P_g, reverse suffix sums D_g). Agreement to ~1e-10 checks
both the forward semantics and the exact gradient formulas the kernels implement.
"""

import pytest
import torch
from helpers import DEFAULT_SCALE_CASES, assert_close, call_op, cpp_oracle, scale_case_id

from csrc_ref import (
    cpp_toolchain_available,
    load,
    mixed_chunk_attention_cpp,
    mixed_chunk_attention_cpp_backward,
)
from flash_kernels.backends.torch.reference import dense_reference
from flash_kernels.core.tolerances import rms_ratio

_AVAILABLE, _REASON = cpp_toolchain_available()
# slow: builds the C++ oracle (ninja, ~1 min)
pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not _AVAILABLE, reason=f"C++ oracle cannot be built: {_REASON}"),
]

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Odd sizes on purpose: nothing may assume powers of two.
S, E = 5, 6
CHUNK = 8
QUAD_SCALE, LIN_SCALE = 0.7, 0.3
TOL = dict(atol=1e-10, rtol=1e-10)
NAMES = ("q_quad", "k_quad", "q_lin", "k_lin", "v", "rel_bias")


@pytest.fixture(scope="module", autouse=True)
def _compiled_extension():
    # Compile once up front so a build error shows up as one clear failure.
    load()


def make_inputs(batch, T, chunk_size, *, linear, bias, seed=0, dtype=torch.float64):
    """Random float64 inputs; randn scores and bias leave relu active on part, inactive on part."""
    gen = torch.Generator().manual_seed(seed)

    def randn(*shape):
        return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)

    return dict(
        q_quad=randn(*batch, T, S),
        k_quad=randn(*batch, T, S),
        q_lin=randn(*batch, T, S) if linear else None,
        k_lin=randn(*batch, T, S) if linear else None,
        v=randn(*batch, T, E),
        rel_bias=randn(2 * chunk_size - 1) if bias else None,
    )


def dense_forward_and_grads(inputs, grad_out, *, chunk_size, causal):
    """Dense reference output and autograd gradients w.r.t. every given input."""
    leaves = {
        k: None if x is None else x.detach().clone().requires_grad_(True) for k, x in inputs.items()
    }
    out = dense_reference(
        leaves["q_quad"],
        leaves["k_quad"],
        leaves["q_lin"],
        leaves["k_lin"],
        leaves["v"],
        chunk_size=chunk_size,
        causal=causal,
        rel_bias=leaves["rel_bias"],
        quad_scale=QUAD_SCALE,
        lin_scale=LIN_SCALE,
    )
    out.backward(grad_out)
    return out.detach(), {k: None if x is None else x.grad for k, x in leaves.items()}


def cpp_forward_and_grads(inputs, grad_out, *, chunk_size, causal):
    kwargs = dict(
        chunk_size=chunk_size,
        causal=causal,
        rel_bias=inputs["rel_bias"],
        quad_scale=QUAD_SCALE,
        lin_scale=LIN_SCALE,
    )
    args = (inputs["q_quad"], inputs["k_quad"], inputs["q_lin"], inputs["k_lin"], inputs["v"])
    out = mixed_chunk_attention_cpp(*args, **kwargs)
    grads = mixed_chunk_attention_cpp_backward(grad_out, *args, **kwargs)
    return out, grads


def check_against_dense(batch, T, chunk_size, *, causal, linear, bias, seed=0):
    inputs = make_inputs(batch, T, chunk_size, linear=linear, bias=bias, seed=seed)
    # A random incoming gradient: all-ones would hide transposition and row/column mix-ups.
    grad_out = torch.randn(
        *batch, T, E, generator=torch.Generator().manual_seed(seed + 1), dtype=torch.float64
    )
    ref_out, ref_grads = dense_forward_and_grads(
        inputs, grad_out, chunk_size=chunk_size, causal=causal
    )
    out, grads = cpp_forward_and_grads(inputs, grad_out, chunk_size=chunk_size, causal=causal)

    assert out.dtype == torch.float64 and out.shape == (*batch, T, E)
    torch.testing.assert_close(out, ref_out, **TOL)
    assert set(grads) == set(NAMES)
    for name in NAMES:
        if inputs[name] is None:
            assert grads[name] is None, name
            continue
        assert grads[name].shape == inputs[name].shape, name
        torch.testing.assert_close(
            grads[name], ref_grads[name], **TOL, msg=lambda m: f"{name}: {m}"
        )


def _dense_cases():
    for T in (1, 7, 16, 37):  # 1 token, < C, k*C, partial
        for linear in (True, False):
            for bias in (True, False):
                for causal in (True, False):
                    if T == 1 and not linear and not causal:
                        continue  # one token, quadratic only: the same as causal
                    yield pytest.param(
                        causal,
                        bias,
                        linear,
                        T,
                        id=f"{'causal' if causal else 'noncausal'}-"
                        f"{'bias' if bias else 'nobias'}-"
                        f"{'lin' if linear else 'nolin'}-T{T}",
                    )


@pytest.mark.parametrize("causal,bias,linear,T", list(_dense_cases()))
def test_matches_dense_reference(causal, bias, linear, T):
    check_against_dense((3,), T, CHUNK, causal=causal, linear=linear, bias=bias)


@pytest.mark.parametrize("batch", [(), (3,), (2, 3)], ids=["nobatch", "b3", "b2x3"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_leading_batch_dims(causal, batch):
    check_against_dense(batch, 19, CHUNK, causal=causal, linear=True, bias=True, seed=3)


@pytest.mark.parametrize("T", [1, 5, 16], ids=lambda t: f"T{t}")
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_single_chunk(causal, T):
    # chunk_size == T: full quadratic attention; the causal linear part is exactly zero then
    # (no earlier chunk), the non-causal one attends within the single chunk.
    check_against_dense((2,), T, T, causal=causal, linear=True, bias=True, seed=5)


@pytest.mark.parametrize("causal", [True, False], ids=["causal", "noncausal"])
def test_empty_sequence(causal):
    inputs = make_inputs((2,), 0, CHUNK, linear=True, bias=True)
    grad_out = torch.zeros(2, 0, E, dtype=torch.float64)
    out, grads = cpp_forward_and_grads(inputs, grad_out, chunk_size=CHUNK, causal=causal)
    assert out.shape == (2, 0, E)
    for name in ("q_quad", "k_quad", "q_lin", "k_lin", "v"):
        assert grads[name].shape == inputs[name].shape, name
    torch.testing.assert_close(grads["rel_bias"], torch.zeros(2 * CHUNK - 1, dtype=torch.float64))


def test_inputs_exercise_both_sides_of_relu():
    # Guards the premise of the gradient tests: with these random inputs some in-chunk scores are
    # positive and some negative, so both branches of relu'(s) are compared.
    inputs = make_inputs((3,), 37, CHUNK, linear=False, bias=True)
    T = 37
    pos = torch.arange(T)
    offset = pos[:, None] - pos[None, :]
    same_chunk = (pos[:, None] // CHUNK) == (pos[None, :] // CHUNK)
    scores = QUAD_SCALE * inputs["q_quad"] @ inputs["k_quad"].transpose(-1, -2)
    scores = scores + inputs["rel_bias"][(offset + CHUNK - 1).clamp(0, 2 * CHUNK - 2)]
    in_chunk = scores[:, same_chunk]
    assert (in_chunk > 0).float().mean() > 0.2
    assert (in_chunk < 0).float().mean() > 0.2


def test_backward_is_deterministic():
    inputs = make_inputs((2,), 37, CHUNK, linear=True, bias=True, seed=7)
    grad_out = torch.randn(2, 37, E, dtype=torch.float64)
    _, first = cpp_forward_and_grads(inputs, grad_out, chunk_size=CHUNK, causal=True)
    _, second = cpp_forward_and_grads(inputs, grad_out, chunk_size=CHUNK, causal=True)
    for name in NAMES:
        assert torch.equal(first[name], second[name]), name


def test_float32_inputs_are_computed_in_float64():
    inputs32 = make_inputs((2,), 13, CHUNK, linear=True, bias=True, seed=9, dtype=torch.float32)
    inputs64 = {k: x.double() for k, x in inputs32.items()}
    kwargs = dict(chunk_size=CHUNK, causal=True, quad_scale=QUAD_SCALE, lin_scale=LIN_SCALE)
    out32 = mixed_chunk_attention_cpp(
        *(inputs32[k] for k in NAMES[:5]), rel_bias=inputs32["rel_bias"], **kwargs
    )
    out64 = mixed_chunk_attention_cpp(
        *(inputs64[k] for k in NAMES[:5]), rel_bias=inputs64["rel_bias"], **kwargs
    )
    assert out32.dtype == torch.float64
    assert torch.equal(out32, out64)


def test_rejects_inconsistent_inputs():
    inputs = make_inputs((2,), 10, CHUNK, linear=True, bias=True)
    kwargs = dict(causal=True, quad_scale=QUAD_SCALE, lin_scale=LIN_SCALE)
    with pytest.raises(RuntimeError, match="rel_bias"):  # (2C - 1,) for a different C
        mixed_chunk_attention_cpp(
            *(inputs[k] for k in NAMES[:5]),
            chunk_size=CHUNK + 1,
            rel_bias=inputs["rel_bias"],
            **kwargs,
        )
    with pytest.raises(ValueError, match="q_lin and k_lin"):
        mixed_chunk_attention_cpp(
            inputs["q_quad"],
            inputs["k_quad"],
            inputs["q_lin"],
            None,
            inputs["v"],
            chunk_size=CHUNK,
            rel_bias=None,
            **kwargs,
        )
    with pytest.raises(RuntimeError, match="chunk_size"):
        mixed_chunk_attention_cpp(
            *(inputs[k] for k in NAMES[:5]), chunk_size=0, rel_bias=None, **kwargs
        )


@pytest.mark.parametrize("backend", ["reference", "torch", "triton"])
@pytest.mark.parametrize("op", ["mixed_chunk_attention", "flash_attention"])
@pytest.mark.parametrize("case", DEFAULT_SCALE_CASES, ids=scale_case_id)
def test_default_scales_match_the_oracle(case, op, backend):
    """The public op with scales left None (or one of them) against the oracle given the scales
    resolved by hand: 1 / C, C = chunk_size even beyond T, or T for chunk_size=None. Non-causal,
    so that the linear part matters even within a single chunk. Output and gradients."""
    T, chunk_size, quad_scale, lin_scale, resolved_quad, resolved_lin = case
    gen = torch.Generator().manual_seed(T)

    def randn(*shape, shift=0.0):
        return shift + torch.randn(*shape, generator=gen, dtype=torch.float64)

    if op == "mixed_chunk_attention":
        values = dict(
            q_quad=randn(2, T, S),
            k_quad=randn(2, T, S),
            q_lin=randn(2, T, S),
            k_lin=randn(2, T, S),
            v=randn(2, T, E),
            rel_bias=None,
        )
    else:
        values = dict(
            z=randn(2, T, S),
            gamma=randn(4, S, shift=1.0),
            beta=randn(4, S),
            v=randn(2, T, E),
            u=randn(2, T, E),
            rel_bias=None,
        )
    # float32 on the kernels (float64 would take the PyTorch path), rounded alike for the oracle
    dtype = torch.float32 if backend == "triton" else torch.float64
    device = DEVICE if backend == "triton" else "cpu"
    tested = {
        n: None if x is None else x.to(device, dtype).requires_grad_() for n, x in values.items()
    }
    exact = {
        n: None if x is None else x.to(dtype).double().requires_grad_() for n, x in values.items()
    }
    out = call_op(
        op,
        tested,
        chunk_size=chunk_size,
        causal=False,
        quad_scale=quad_scale,
        lin_scale=lin_scale,
        backend=backend,
    )
    truth = cpp_oracle(
        op,
        exact,
        chunk_size=chunk_size or T,
        causal=False,
        quad_scale=resolved_quad,
        lin_scale=resolved_lin,
    )
    grad_out = randn(*truth.shape)
    names = [n for n, x in tested.items() if x is not None]
    grads = torch.autograd.grad(out, [tested[n] for n in names], grad_out.to(out))
    truth_grads = torch.autograd.grad(truth, [exact[n] for n in names], grad_out)
    ratio = rms_ratio(op, dtype)  # flash_kernels/core/tolerances.py
    assert_close("out", out.cpu(), truth, ratio)
    for name, grad, truth_grad in zip(names, grads, truth_grads):
        assert_close(f"d{name}", grad.cpu(), truth_grad, ratio)
