"""torch.library registration, torch.compile without graph breaks, and autocast.

The Triton forward and backward are custom ops (flash_kernels::mixed_chunk_fwd/_bwd and
flash_kernels::flash_fwd/_bwd) with fake implementations and autograd formulas; the PyTorch
paths are plain tensor code. So torch.compile(fullgraph=True) must trace every backend.
"""

import pytest
import torch
import torch._dynamo.testing

from flash_kernels import flash_attention, mixed_chunk_attention
from flash_kernels.core.packing import chunk_tables

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
B, T, S, E, C = 2, 19, 5, 6, 8


def _inputs(dtype=torch.float32, seed=0):
    gen = torch.Generator().manual_seed(seed)
    qk = [torch.randn(B, T, S, generator=gen).to(DEVICE, dtype).requires_grad_() for _ in range(4)]
    v = torch.randn(B, T, E, generator=gen).to(DEVICE, dtype).requires_grad_()
    rel_bias = (0.5 * torch.randn(2 * C - 1, generator=gen)).to(DEVICE).requires_grad_()
    return qk + [v, rel_bias]


def _packing(packed, with_grad=True):
    """The custom ops' table and state-offset arguments: dense (all None), or three documents
    with an initial state."""
    if not packed:
        return (None, None, None, None), False
    tables = chunk_tables(torch.tensor([0, 7, 7, T]), T, C, DEVICE)
    offset = torch.randn(B, tables.num_docs, S, E, device=DEVICE).requires_grad_(with_grad)
    return (tables.cu_seqlens, tables.chunk_offsets, tables.chunk_table, offset), True


OPCHECKS = ("test_schema", "test_autograd_registration", "test_faketensor")


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed-state"])
def test_opcheck_mixed_chunk_op(packed):
    q_quad, k_quad, q_lin, k_lin, v, rel_bias = _inputs()
    packing, store_total = _packing(packed)
    scales = (None, None) if packed else (0.7, 0.3)  # None: the default 1 / C, inside the op
    args = (q_quad, k_quad, q_lin, k_lin, v, rel_bias, *packing, C, True, *scales, store_total)
    torch.library.opcheck(
        torch.ops.flash_kernels.mixed_chunk_fwd.default, args, test_utils=OPCHECKS
    )


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed-state"])
def test_opcheck_flash_op(packed):
    gen = torch.Generator(device=DEVICE).manual_seed(1)
    z = torch.randn(B, T, S, generator=gen, device=DEVICE).requires_grad_()
    affine = torch.randn(2, 4, S, generator=gen, device=DEVICE).requires_grad_()
    v, u = (torch.randn(B, T, E, generator=gen, device=DEVICE).requires_grad_() for _ in range(2))
    packing, store_total = _packing(packed)
    args = (z, affine, 4, v, u, None, *packing, C, True, 0.7, 0.3, True, store_total)
    torch.library.opcheck(torch.ops.flash_kernels.flash_fwd.default, args, test_utils=OPCHECKS)


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("op", ["mixed_chunk_attention", "flash_attention"])
def test_dynamic_compile_of_one_chunk_attention_compiles_once(backend, op):
    """chunk_size=None makes C = T and the default scale 1 / T: under torch.compile(dynamic=True)
    that must stay symbolic (no guard on 1 / T), one graph for every length."""
    counter = torch._dynamo.testing.CompileCounter()

    def fn(x, v):
        if op == "mixed_chunk_attention":
            return mixed_chunk_attention(x, x, None, None, v, chunk_size=None, backend=backend)
        gamma = torch.ones(2, S, device=x.device)
        return flash_attention(
            x, gamma, torch.zeros_like(gamma), v, chunk_size=None, backend=backend
        )

    torch._dynamo.reset()
    compiled = torch.compile(fn, dynamic=True, fullgraph=True, backend=counter)
    for length in (9, 13, 20):
        x = torch.randn(B, length, S, device=DEVICE)
        v = torch.randn(B, length, E, device=DEVICE)
        torch.testing.assert_close(compiled(x, v), fn(x, v), rtol=1e-5, atol=1e-5)
    assert counter.frame_count == 1, f"{counter.frame_count} compiles for 3 lengths"


def _run(fn, inputs):
    out = fn(*inputs)
    grads = torch.autograd.grad(out, inputs, torch.ones_like(out))
    return out, grads


@pytest.mark.parametrize("backend", ["triton", "torch"])
@pytest.mark.parametrize("op", ["mixed_chunk_attention", "flash_attention"])
def test_compile_fullgraph_matches_eager(backend, op):
    """aot_eager compiles forward and backward graphs through the fake implementations
    (a graph break would raise with fullgraph=True) without Inductor's C++ build time."""
    if op == "mixed_chunk_attention":

        def fn(q_quad, k_quad, q_lin, k_lin, v, rel_bias):
            return mixed_chunk_attention(
                q_quad, k_quad, q_lin, k_lin, v, rel_bias=rel_bias, chunk_size=C, backend=backend
            )

        inputs = _inputs()
    else:

        def fn(z, gamma, beta, v, u, rel_bias):
            return flash_attention(
                z, gamma, beta, v, u=u, rel_bias=rel_bias, chunk_size=C, backend=backend
            )

        z, gamma, beta, _, v, rel_bias = _inputs(seed=2)
        gamma = gamma[0, :4].detach().requires_grad_()
        beta = beta[0, :4].detach().requires_grad_()
        inputs = [z, gamma, beta, v, v.detach().clone().requires_grad_(), rel_bias]
    torch._dynamo.reset()
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    out, grads = _run(compiled, inputs)
    ref, ref_grads = _run(fn, inputs)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5)
    for got, want in zip(grads, ref_grads):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_autocast_casts_inputs_and_output(backend):
    """Mixed float32 / bfloat16 inputs under autocast run in the autocast dtype; rel_bias
    stays float32 and gets a float32 gradient. (fp16 on the CPU: the interpreter has no bf16.)"""
    dtype = torch.bfloat16 if DEVICE == "cuda" else torch.float16
    q_quad, k_quad, q_lin, k_lin, v, rel_bias = _inputs()
    v_half = v.detach().to(dtype).requires_grad_()
    with torch.autocast(DEVICE, dtype=dtype):
        out = mixed_chunk_attention(
            q_quad, k_quad, q_lin, k_lin, v_half, rel_bias=rel_bias, chunk_size=C, backend=backend
        )
    assert out.dtype == dtype
    out.float().sum().backward()
    assert q_quad.grad.dtype == torch.float32 and v_half.grad.dtype == dtype
    assert rel_bias.grad.dtype == torch.float32
    expected = mixed_chunk_attention(
        *(x.detach().to(dtype) for x in (q_quad, k_quad, q_lin, k_lin, v)),
        rel_bias=rel_bias.detach(),
        chunk_size=C,
        backend=backend,
    )
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
