"""Shared test helpers: random problems and an rms-ratio assert_close that says where it failed."""
import torch

from flash_kernels import flash_attention, mixed_chunk_attention

GRAD_NAMES = ("q_quad", "k_quad", "q_lin", "k_lin", "v", "rel_bias")


def assert_close(name, actual, expected, ratio):
    """Fail when rms(actual - expected) > ratio * rms(expected), naming the worst element.

    A relative error of the whole tensor is robust for attention outputs, whose entries can be
    near zero (an elementwise rtol would fail on those for no reason).
    """
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    actual, expected = actual.double(), expected.double()
    assert torch.isfinite(actual).all(), f"{name}: non-finite values at {torch.nonzero(~torch.isfinite(actual))[:5].tolist()}"
    diff = actual - expected
    rms_diff = diff.square().mean().sqrt().item() if diff.numel() else 0.0
    rms_ref = expected.square().mean().sqrt().item() if diff.numel() else 0.0
    if rms_diff > ratio * rms_ref + 1e-30:
        worst = diff.abs().argmax()
        index = tuple(int(i) for i in torch.unravel_index(worst, diff.shape))
        raise AssertionError(
            f"{name}: rms error {rms_diff:.3e} > {ratio:.1e} * rms(expected) {rms_ref:.3e}; "
            f"worst at {index}: actual {actual[index].item():.6g}, expected {expected[index].item():.6g}")


def make_problem(batch, T, S, E, *, linear=True, bias_chunk=None, dtype=torch.float64,
                 device="cpu", seed=0, requires_grad=True):
    """Random inputs as a dict of keyword arguments for mixed_chunk_attention.

    Queries and keys are scaled so that the relu^2 scores are O(1) with the default scales and
    about half of them are positive (both branches of relu are exercised).
    """
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        x = (scale * torch.randn(*shape, generator=gen, dtype=torch.float64)).to(device=device, dtype=dtype)
        return x.requires_grad_(requires_grad)

    problem = dict(q_quad=rand(*batch, T, S), k_quad=rand(*batch, T, S),
                   q_lin=rand(*batch, T, S) if linear else None,
                   k_lin=rand(*batch, T, S) if linear else None,
                   v=rand(*batch, T, E))
    problem["rel_bias"] = rand(2 * bias_chunk - 1, scale=0.5) if bias_chunk else None
    return problem


def inputs_of(problem):
    return [problem[n] for n in GRAD_NAMES if problem[n] is not None and problem[n].requires_grad]


def run_with_grads(problem, grad_out=None, **options):
    """Output and the gradients of every input that requires grad, as a dict by name."""
    out = mixed_chunk_attention(problem["q_quad"], problem["k_quad"], problem["q_lin"],
                                problem["k_lin"], problem["v"], rel_bias=problem["rel_bias"],
                                **options)
    if grad_out is None:
        grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(123),
                               dtype=torch.float64).to(out)
    names = [n for n in GRAD_NAMES if problem[n] is not None and problem[n].requires_grad]
    grads = torch.autograd.grad(out, [problem[n] for n in names], grad_out, allow_unused=True)
    return out, dict(zip(names, grads)), grad_out


def call_op(op, tensors, **options):
    """Run "mixed_chunk_attention" or "flash_attention" on a dict of named tensors (the
    names of the op's arguments; rel_bias included)."""
    if op == "mixed_chunk_attention":
        return mixed_chunk_attention(tensors["q_quad"], tensors["k_quad"], tensors["q_lin"],
                                     tensors["k_lin"], tensors["v"], rel_bias=tensors["rel_bias"],
                                     **options)
    return flash_attention(tensors["z"], tensors["gamma"], tensors["beta"], tensors["v"],
                           u=tensors["u"], rel_bias=tensors["rel_bias"], **options)
