"""Same inputs, same bits: outputs and every gradient, on every backend that runs here.

docs/contract.md section 3: gradients must be deterministic (no float atomics). The
reductions most at
risk are the ones over tokens and batch entries: drel_bias (a sum of dS along diagonals over all
chunks, blocks and batch entries), dgamma/dbeta (sums over all tokens), and dk_lin/dv (through
the reverse state scan). So the problems have a bias, several batch entries, several chunks and,
on the Triton backend, several query/key blocks per chunk (small tiles forced), on both the
hoisted path and the long-chunk path that recomputes scores per value tile.

The three runs differ in everything that must not matter: the first with uninitialised
(torch.empty) scratch buffers, the second with NaN-filled ones, the third after other launches
with different shapes have run in between (tile caches, autotuning, allocator reuse).
"""

import pytest
import torch
from helpers import call_op, nan_filled_buffers, tile_override

from flash_kernels import mixed_chunk_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
B, T, S, E, C = 2, 70, 7, 10, 32  # 3 chunks, the last partial; S, E not powers of two
PATHS = {
    "hoisted": dict(block=16, state_block_t=16),
    "recomputed": dict(block=16, state_block_t=16, max_hoist_keys=16, block_e=16),
}


def _inputs(op, dtype, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0, shift=0.0, dtype=dtype):
        x = shift + scale * torch.randn(*shape, generator=gen, dtype=torch.float64)
        return x.to(device=DEVICE, dtype=dtype)

    side = torch.float64 if dtype == torch.float64 else torch.float32
    if op == "mixed_chunk_attention":
        return dict(
            q_quad=rand(B, T, S, scale=2.0),
            k_quad=rand(B, T, S, scale=2.0),
            q_lin=rand(B, T, S),
            k_lin=rand(B, T, S),
            v=rand(B, T, E),
            rel_bias=rand(2 * C - 1, scale=0.5, dtype=side),
        )
    return dict(
        z=rand(B, T, S, scale=2.0),
        gamma=rand(4, S, scale=0.3, shift=1.0, dtype=side),
        beta=rand(4, S, scale=0.3, dtype=side),
        v=rand(B, T, E),
        u=rand(B, T, E),
        rel_bias=rand(2 * C - 1, scale=0.5, dtype=side),
    )


def _run(op, inputs, backend, causal):
    leaves = {name: x.clone().requires_grad_() for name, x in inputs.items()}
    out = call_op(op, leaves, chunk_size=C, causal=causal, backend=backend)
    grad_out = torch.randn(
        out.shape, generator=torch.Generator().manual_seed(99), dtype=torch.float64
    ).to(out)
    names = list(leaves)
    grads = torch.autograd.grad(out, [leaves[n] for n in names], grad_out)
    return {"out": out.detach(), **{f"d{n}": g for n, g in zip(names, grads)}}


def _assert_bitwise_equal(first, second, what):
    assert first.keys() == second.keys()
    for name in first:
        a, b = first[name], second[name]
        assert a.dtype == b.dtype and a.shape == b.shape, f"{what}: {name}"
        assert torch.isfinite(a).all(), f"{what}: {name} is not finite"
        # Compare the bits (torch.equal would treat -0.0 == 0.0).
        bits = {2: torch.int16, 4: torch.int32, 8: torch.int64}[a.element_size()]
        differ = (a.view(bits) != b.view(bits)).sum().item()
        assert differ == 0, f"{what}: {name} differs in {differ} of {a.numel()} elements"


def _cases():
    for backend in ("triton", "torch", "reference"):
        for dtype in (torch.float32, torch.float16, torch.float64):
            if dtype == torch.float64 and backend == "triton":
                continue  # float64 takes the PyTorch path on the Triton backend
            paths = ("default",)
            if backend == "triton":  # fp16 shares the kernels' code with fp32: one path is enough
                paths = tuple(PATHS) if dtype == torch.float32 else ("hoisted",)
            for path in paths:
                yield pytest.param(
                    backend, dtype, path, id=f"{backend}-{str(dtype).split('.')[-1]}-{path}"
                )


@pytest.mark.slow  # every path 3 times
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("op", ["mixed_chunk_attention", "flash_attention"])
@pytest.mark.parametrize("backend,dtype,path", list(_cases()))
def test_same_inputs_give_the_same_bits(backend, dtype, path, op, causal):
    inputs = _inputs(op, dtype)
    with tile_override(**PATHS.get(path, {})):
        first = _run(op, inputs, backend, causal)
        with nan_filled_buffers():
            second = _run(op, inputs, backend, causal)
        # Something else in between: other shapes, another op, other tile choices.
        other = _inputs(op, dtype, seed=1)
        other = {n: (x[:1, :37] if x.dim() == 3 else x) for n, x in other.items()}
        _run(op, other, backend, not causal)
        third = _run(op, inputs, backend, causal)
    _assert_bitwise_equal(first, second, "run 1 (empty scratch) vs run 2 (NaN scratch)")
    _assert_bitwise_equal(first, third, "run 1 vs run 3 (after other launches)")


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_rel_bias_gradient_does_not_depend_on_which_other_grads_are_needed(backend):
    """drel_bias alone (the query backward only) and drel_bias with every other gradient (both
    backward kernels) must be the same bits: the reduction is one fixed order either way."""
    inputs = _inputs("mixed_chunk_attention", torch.float32)
    grad_out = torch.randn(B, T, E, generator=torch.Generator().manual_seed(5)).to(DEVICE)

    def drel_bias(requires):
        leaves = {
            n: x.clone().requires_grad_(n in requires or n == "rel_bias") for n, x in inputs.items()
        }
        with tile_override(**PATHS["hoisted"]), nan_filled_buffers():
            out = mixed_chunk_attention(
                leaves["q_quad"],
                leaves["k_quad"],
                leaves["q_lin"],
                leaves["k_lin"],
                leaves["v"],
                chunk_size=C,
                rel_bias=leaves["rel_bias"],
                backend=backend,
            )
            return torch.autograd.grad(out, leaves["rel_bias"], grad_out)[0]

    alone = drel_bias(())
    together = drel_bias(("q_quad", "k_quad", "q_lin", "k_lin", "v"))
    _assert_bitwise_equal({"drel_bias": alone}, {"drel_bias": together}, "rel_bias grad")
