"""Property-based fuzzing of both public ops against the dense float64 reference.

Every example draws a shape (0-2 leading batch dims of size 1-3, T 1..70, S 1..20, E 1..20), a
chunk size (1..40 or None), causal or not, with or without rel_bias, linear part or quadratic
only, scales (None = 1/C, or random), a dtype and (for the Triton backend) tile sizes, and runs
the op on every backend that runs here ("triton" under TRITON_INTERPRET=1 without a GPU,
"torch", "reference"). The output and the gradients of every input are compared with
`backend="reference"` on float64 copies of the same rounded inputs, with the same grad_out.

Tolerance: rms(error) <= ratio * rms(expected) (tests/helpers.py assert_close), by dtype:
- float32: 2e-5. The kernels accumulate in fp32 (ieee on the interpreter, and on a GPU while
  torch.backends.cuda.matmul.allow_tf32 is False, its default); over sums of <= 70 terms the
  rounding is a few fp32 ulps (6e-8 each), well inside 2e-5.
- float16: 5e-3. Inputs are rounded before both sides see them, every product accumulates in
  fp32 (tf32 on a GPU for the relu^2 weights: a 10-bit mantissa, as fp16), and the output and
  each gradient are rounded once to fp16 (2^-11 = 4.9e-4 relative): ~10x headroom.
- float64: 1e-10 (the Triton backend routes float64 to the exact PyTorch path).

Magnitudes are kept O(1) so fp16 neither overflows (relu^2 > 65504) nor underflows into
subnormals (which would make a relative tolerance meaningless): queries and keys are scaled so
that the resolved quad_scale * <q, k> is ~N(0, 1), and explicit scales lie in [0.25, 2] in
absolute value.

Reproducible and bounded: hypothesis runs derandomized (the same examples on every run and
machine), without a database or shrinking (a failing example is printed as drawn; shrinking under
the interpreter would take minutes), and each example's Triton work is capped at MAX_PROGRAMS
(batch x chunks x query blocks) because the interpreter runs programs one by one in Python.
"""
import math
import os

import pytest
import torch

pytest.importorskip("hypothesis", reason="the fuzz tests need hypothesis (the 'test' extra)")
from hypothesis import HealthCheck, Phase, example, given, note, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from flash_kernels import flash_attention, mixed_chunk_attention
from flash_kernels.triton_mixed_chunk import tile_override
from flash_kernels.utils import nan_filled_buffers
from helpers import assert_close

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ("triton", "torch", "reference")
RATIO = {torch.float32: 2e-5, torch.float16: 5e-3, torch.float64: 1e-10}
DTYPES = (torch.float32, torch.float16, torch.float64)
# The interpreter executes every program of a grid in Python: cap batch x chunks x query blocks.
MAX_PROGRAMS = 24 if DEVICE == "cpu" else 10**6
MAX_EXAMPLES = int(os.environ.get("FLASH_FUZZ_EXAMPLES", "35"))
# Tile overrides (see test_triton_mixed_chunk.py): several query/key blocks per chunk, several
# state tiles along T, the long-chunk path (scores recomputed per value tile), narrow value tiles.
TILES = ({}, {"block": 16, "state_block_t": 16}, {"block": 16, "max_hoist_keys": 16},
         {"block_e": 16, "state_block_t": 16})

FUZZ_SETTINGS = settings(max_examples=MAX_EXAMPLES, deadline=None, derandomize=True, database=None,
                         phases=(Phase.explicit, Phase.generate), print_blob=False,
                         suppress_health_check=(HealthCheck.too_slow, HealthCheck.data_too_large))


def _programs(B, T, chunk_size, tiles):
    """Per-chunk programs the Triton backend launches (as triton_mixed_chunk.kernel_config)."""
    chunk_len = min(chunk_size or T, T)
    pow2 = max(16, 1 << (chunk_len - 1).bit_length())
    block = tiles.get("block", min(64, pow2))
    return B * math.ceil(T / (chunk_size or T)) * math.ceil(chunk_len / block)


@st.composite
def shapes_and_options(draw):
    """Shape, chunking, tile overrides, dtype and scales shared by both fuzzers."""
    batch = tuple(draw(st.lists(st.integers(1, 3), min_size=0, max_size=2)))
    B = math.prod(batch)
    T = draw(st.integers(1, 70))
    S = draw(st.integers(1, 20))
    E = draw(st.integers(1, 20))
    # Smallest chunk size that keeps the Triton work under MAX_PROGRAMS (one block per chunk).
    min_chunk = min(40, math.ceil(T / max(1, MAX_PROGRAMS // B)))
    # None (one chunk as long as the sequence) about one time in five.
    chunk_size = None if draw(st.integers(0, 4)) == 0 else draw(st.integers(min_chunk, 40))
    if B * math.ceil(T / (chunk_size or T)) > MAX_PROGRAMS:
        chunk_size = None
    tiles = draw(st.sampled_from([t for t in TILES
                                  if not t or _programs(B, T, chunk_size, t) <= MAX_PROGRAMS]))

    def scale():
        magnitude = draw(st.none() | st.floats(0.25, 2.0))
        return None if magnitude is None else magnitude * draw(st.sampled_from((1.0, -1.0)))

    return dict(batch=batch, T=T, S=S, E=E, chunk_size=chunk_size, tiles=tiles,
                causal=draw(st.booleans()), bias=draw(st.booleans()),
                dtype=draw(st.sampled_from(DTYPES)), quad_scale=scale(), lin_scale=scale(),
                seed=draw(st.integers(0, 2**31 - 1)))


def _qk_factor(case):
    """Entry scale of queries and keys that makes resolved quad_scale * <q, k> ~ N(0, 1)."""
    C = case["chunk_size"] or case["T"]
    quad_scale = abs(case["quad_scale"]) if case["quad_scale"] is not None else 1.0 / C
    return (1.0 / (quad_scale * math.sqrt(case["S"]))) ** 0.5


def _options(case):
    return dict(chunk_size=case["chunk_size"], causal=case["causal"],
                quad_scale=case["quad_scale"], lin_scale=case["lin_scale"])


def _leaves(values, dtypes, device):
    """Fresh leaves requiring grad: values (float64, or None) rounded to dtypes[name]."""
    return {name: None if x is None else
            x.to(device=device, dtype=dtypes[name]).requires_grad_()
            for name, x in values.items()}


def _rounded_float64(values, dtypes):
    """The float64 inputs of the ground truth: each value rounded as the tested run sees it."""
    return {name: None if x is None else x.to(dtypes[name]).double().requires_grad_()
            for name, x in values.items()}


def _compare(name_prefix, run, values, dtypes, dtype, backend, tiles):
    """Run `run(inputs, backend)` on the rounded inputs and on their float64 copies (reference);
    compare the output and the gradient of every tensor input."""
    low = _leaves(values, dtypes, DEVICE)
    with nan_filled_buffers(), tile_override(**(tiles if backend == "triton" else {})):
        out = run(low, backend)
    gen = torch.Generator().manual_seed(1234)
    grad_out = torch.randn(out.shape, generator=gen, dtype=torch.float64).to(out)
    names = [n for n, x in low.items() if x is not None]
    with nan_filled_buffers(), tile_override(**(tiles if backend == "triton" else {})):
        grads = torch.autograd.grad(out, [low[n] for n in names], grad_out, allow_unused=True)

    exact = _rounded_float64(values, dtypes)
    ref = run(exact, "reference")
    ref_grads = torch.autograd.grad(ref, [exact[n] for n in names], grad_out.double().cpu(),
                                    allow_unused=True)

    assert out.dtype == dtype and out.shape == ref.shape
    ratio = RATIO[dtype]
    assert_close(f"{name_prefix}[{backend}] out", out.cpu(), ref, ratio)
    for name, grad, ref_grad in zip(names, grads, ref_grads):
        assert grad is not None, f"{name_prefix}[{backend}] d{name} is None"
        assert grad.dtype == low[name].dtype and grad.shape == low[name].shape
        assert_close(f"{name_prefix}[{backend}] d{name}", grad.cpu(), ref_grad, ratio)


def _side_dtype(dtype):
    """dtype of rel_bias (and gamma/beta): float32 parameters beside half inputs, as in training."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@pytest.mark.parametrize("backend", BACKENDS)
@FUZZ_SETTINGS
@given(case=shapes_and_options(), linear=st.booleans())
@example(case=dict(batch=(), T=1, S=1, E=1, chunk_size=1, tiles={}, causal=True, bias=True,
                   dtype=torch.float32, quad_scale=None, lin_scale=None, seed=0), linear=True)
@example(case=dict(batch=(2,), T=70, S=20, E=20, chunk_size=None, tiles={"block": 16,
                   "max_hoist_keys": 16}, causal=False, bias=True, dtype=torch.float16,
                   quad_scale=-0.5, lin_scale=2.0, seed=1), linear=True)
@example(case=dict(batch=(3, 1), T=37, S=7, E=13, chunk_size=8, tiles={"block": 16,
                   "state_block_t": 16}, causal=True, bias=True, dtype=torch.float16,
                   quad_scale=None, lin_scale=None, seed=2), linear=True)
def test_mixed_chunk_attention_fuzz(backend, case, linear):
    note(f"case={case} linear={linear}")
    gen = torch.Generator().manual_seed(case["seed"])
    batch, T, S, E = case["batch"], case["T"], case["S"], case["E"]
    C = case["chunk_size"] or T

    def rand(*shape, scale=1.0):
        return scale * torch.randn(*shape, generator=gen, dtype=torch.float64)

    qk = _qk_factor(case)
    lin_factor = S ** -0.25           # <q_lin, k_lin> ~ N(0, 1)
    values = dict(q_quad=rand(*batch, T, S, scale=qk), k_quad=rand(*batch, T, S, scale=qk),
                  q_lin=rand(*batch, T, S, scale=lin_factor) if linear else None,
                  k_lin=rand(*batch, T, S, scale=lin_factor) if linear else None,
                  v=rand(*batch, T, E),
                  rel_bias=rand(2 * C - 1, scale=0.5) if case["bias"] else None)
    dtype = case["dtype"]
    dtypes = {name: _side_dtype(dtype) if name == "rel_bias" else dtype for name in values}

    def run(x, backend):
        return mixed_chunk_attention(x["q_quad"], x["k_quad"], x["q_lin"], x["k_lin"], x["v"],
                                     rel_bias=x["rel_bias"], backend=backend, **_options(case))

    _compare("mixed_chunk_attention", run, values, dtypes, dtype, backend, case["tiles"])


@pytest.mark.parametrize("backend", BACKENDS)
@FUZZ_SETTINGS
@given(case=shapes_and_options(), roles=st.sampled_from((4, 2)), gate=st.booleans())
@example(case=dict(batch=(), T=1, S=1, E=1, chunk_size=1, tiles={}, causal=True, bias=True,
                   dtype=torch.float32, quad_scale=None, lin_scale=None, seed=0), roles=4, gate=True)
@example(case=dict(batch=(2,), T=45, S=20, E=20, chunk_size=16, tiles={"block": 16,
                   "state_block_t": 16}, causal=False, bias=True, dtype=torch.float16,
                   quad_scale=None, lin_scale=-1.0, seed=1), roles=4, gate=True)
def test_flash_attention_fuzz(backend, case, roles, gate):
    note(f"case={case} roles={roles} gate={gate}")
    gen = torch.Generator().manual_seed(case["seed"])
    batch, T, S, E = case["batch"], case["T"], case["S"], case["E"]
    C = case["chunk_size"] or T

    def rand(*shape, scale=1.0, shift=0.0):
        return shift + scale * torch.randn(*shape, generator=gen, dtype=torch.float64)

    # Roles are z * gamma + beta with gamma ~ 1: z at the query/key scale keeps the resolved
    # quad_scale * <role_q, role_k> ~ N(0, 1). An explicit lin_scale is taken relative to 1/C
    # here (the linear roles share z's scale, so an absolute one would make lin ~ C x larger).
    qk = _qk_factor(case)
    if case["lin_scale"] is not None:
        quad_scale = case["quad_scale"] if case["quad_scale"] is not None else 1.0 / C
        case = dict(case, lin_scale=case["lin_scale"] * abs(quad_scale))
    values = dict(z=rand(*batch, T, S, scale=qk), gamma=rand(roles, S, scale=0.3, shift=1.0),
                  beta=rand(roles, S, scale=0.3 * qk), v=rand(*batch, T, E),
                  u=rand(*batch, T, E) if gate else None,
                  rel_bias=rand(2 * C - 1, scale=0.5) if case["bias"] else None)
    dtype = case["dtype"]
    dtypes = {name: _side_dtype(dtype) if name in ("gamma", "beta", "rel_bias") else dtype
              for name in values}

    def run(x, backend):
        return flash_attention(x["z"], x["gamma"], x["beta"], x["v"], u=x["u"],
                               rel_bias=x["rel_bias"], backend=backend, **_options(case))

    _compare("flash_attention", run, values, dtypes, dtype, backend, case["tiles"])
