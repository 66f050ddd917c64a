"""flash_attention (roles from z, gate) against the composition of the float64 references.

The Triton backend forms the roles inside the kernels and multiplies by the gate when it stores;
the reference composes scale_offset_roles + the dense mixed chunk reference + the gate.
Buffers the kernels must fill are NaN-filled (see test_triton_mixed_chunk.py).
"""

import pytest
import torch
from helpers import assert_close, assert_launched, nan_filled_buffers, tile_override, triton_kernels

from flash_kernels import flash_attention
from flash_kernels.core.tolerances import rms_ratio
from tools.launch_recording import record_launches

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
NAMES = ("z", "gamma", "beta", "v", "u", "rel_bias")


@pytest.fixture(autouse=True)
def _nan_scratch():
    with nan_filled_buffers():
        yield


def make_flash_problem(batch, T, S, E, *, roles=4, gate=True, bias_chunk=None, seed=0):
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0, shift=0.0):
        return shift + scale * torch.randn(*shape, generator=gen, dtype=torch.float64)

    return dict(
        z=rand(*batch, T, S),
        gamma=rand(roles, S, scale=0.5, shift=1.0),
        beta=rand(roles, S, scale=0.3),
        v=rand(*batch, T, E),
        u=rand(*batch, T, E) if gate else None,
        rel_bias=rand(2 * bias_chunk - 1, scale=0.5) if bias_chunk else None,
    )


def run(problem, dtype, device, backend, grad_out=None, requires=NAMES, launches=None, **options):
    """Output, gradients (by name) and grad_out; the kernels launched go to `launches` (a dict:
    "forward" and "backward" record lists) if given."""
    launches = {} if launches is None else launches
    inputs = {}
    for name, x in problem.items():
        if x is None:
            inputs[name] = None
            continue
        keep_fp32 = name in ("gamma", "beta", "rel_bias") and dtype != torch.float64
        y = x.to(device=device, dtype=torch.float32 if keep_fp32 else dtype)
        inputs[name] = y.clone().requires_grad_(name in requires)
    with record_launches() as launches["forward"]:
        out = flash_attention(
            inputs["z"],
            inputs["gamma"],
            inputs["beta"],
            inputs["v"],
            u=inputs["u"],
            rel_bias=inputs["rel_bias"],
            backend=backend,
            **options,
        )
    if grad_out is None:
        grad_out = torch.randn(
            out.shape, generator=torch.Generator().manual_seed(7), dtype=torch.float64
        )
    wanted = [n for n in NAMES if inputs[n] is not None and inputs[n].requires_grad]
    with record_launches() as launches["backward"]:
        grads = torch.autograd.grad(
            out, [inputs[n] for n in wanted], grad_out.to(out), allow_unused=True
        )
    return out, dict(zip(wanted, grads)), grad_out


def check(problem, dtype=torch.float32, requires=NAMES, **options):
    # The reference sees the inputs rounded to `dtype` exactly as the kernels do.
    rounded = {
        n: (
            x
            if x is None
            else x.to(torch.float32 if n in ("gamma", "beta", "rel_bias") else dtype).double()
        )
        for n, x in problem.items()
    }
    launches = {}
    out, grads, grad_out = run(
        problem, dtype, DEVICE, "triton", requires=requires, launches=launches, **options
    )
    linear = problem["gamma"].shape[0] == 4
    assert_launched(
        "triton", "forward", launches["forward"], triton_kernels("forward", linear), from_z=True
    )
    every_backward_kernel = triton_kernels("backward", linear)
    if set(requires) >= set(NAMES):
        assert_launched(
            "triton", "backward", launches["backward"], every_backward_kernel, from_z=True
        )
    else:  # fewer gradients, fewer kernels (none when only the gate's is needed)
        launched = {r.kernel_name for r in launches["backward"]}
        assert launched <= every_backward_kernel, launched
    ref, ref_grads, _ = run(
        rounded, torch.float64, "cpu", "reference", grad_out, requires=requires, **options
    )
    assert out.dtype == dtype
    ratio = rms_ratio("flash_attention", dtype)  # flash_kernels/core/tolerances.py
    assert_close("out", out.cpu(), ref, ratio)
    assert grads.keys() == ref_grads.keys()
    for name in grads:
        assert_close(f"d{name}", grads[name].cpu(), ref_grads[name], ratio)


def _composed_cases():
    for T, chunk in ((1, 8), (37, 8), (13, None)):
        for gate in (True, False):
            for roles in (4, 2):
                for causal in (True, False):
                    if T == 1 and roles == 2 and not causal:
                        continue  # one token, quadratic only: the same as causal
                    yield pytest.param(
                        causal,
                        roles,
                        gate,
                        T,
                        chunk,
                        id=f"T{T}-C{chunk}-{'gate' if gate else 'nogate'}-"
                        f"roles{roles}-{'causal' if causal else 'full'}",
                    )


@pytest.mark.parametrize("causal,roles,gate,T,chunk", list(_composed_cases()))
def test_matches_composed_reference(causal, roles, gate, T, chunk):
    problem = make_flash_problem((2,), T, 5, 6, roles=roles, gate=gate, bias_chunk=chunk or T)
    check(problem, chunk_size=chunk, causal=causal, quad_scale=0.7, lin_scale=0.3)


@pytest.mark.parametrize("path", ["hoisted", "recomputed"])
def test_several_blocks_per_chunk(path):
    overrides = dict(
        block=16, state_block_t=16, **({"max_hoist_keys": 16} if path == "recomputed" else {})
    )
    problem = make_flash_problem((2,), 90, 7, 10, bias_chunk=40, seed=1)
    with tile_override(**overrides):
        check(problem, chunk_size=40, causal=True)


def test_float16_with_float32_parameters():
    problem = make_flash_problem((2,), 37, 16, 24, bias_chunk=16, seed=2)
    check(problem, dtype=torch.float16, chunk_size=16)


@pytest.mark.gpu
@pytest.mark.skipif(
    DEVICE != "cuda",
    reason="bfloat16 needs a GPU: the Triton interpreter "
    "multiplies raw bf16 bit patterns (triton issue #11584)",
)
def test_bfloat16():
    problem = make_flash_problem((2,), 300, 64, 96, bias_chunk=128, seed=3)
    check(problem, dtype=torch.bfloat16, chunk_size=128)


@pytest.mark.parametrize("requires", [("z",), ("gamma", "beta"), ("u",), ("v", "rel_bias")])
def test_only_some_inputs_require_grad(requires):
    problem = make_flash_problem((1,), 20, 5, 6, bias_chunk=8, seed=4)
    check(problem, requires=requires, chunk_size=8)


@pytest.mark.parametrize("batch", [(), (2, 3)])
def test_leading_batch_dims(batch):
    problem = make_flash_problem(batch, 11, 5, 6, bias_chunk=4, seed=5)
    check(problem, chunk_size=4)


def test_gradcheck_composed_path():
    """float64 takes the composed PyTorch path on every backend, so gradcheck applies."""
    problem = make_flash_problem((1,), 7, 3, 4, bias_chunk=4, seed=6)
    tensors = [problem[n].clone().requires_grad_() for n in NAMES]

    def fn(z, gamma, beta, v, u, rel_bias):
        return flash_attention(z, gamma, beta, v, u=u, rel_bias=rel_bias, chunk_size=4)

    assert torch.autograd.gradcheck(fn, tensors)


BAD = [
    (dict(gamma=torch.randn(3, 5)), ValueError, ["gamma", "(4, S)"]),
    (dict(beta=torch.randn(4, 6)), ValueError, ["beta", "S"]),
    (dict(beta=torch.randn(2, 5)), ValueError, ["gamma and beta"]),
    (dict(gamma=torch.randint(0, 2, (4, 5))), TypeError, ["gamma", "floating"]),
    (dict(v=torch.randn(2, 9, 6)), ValueError, ["v", "shape"]),
    (dict(u=torch.randn(2, 10, 7)), ValueError, ["u", "shape"]),
    (dict(u=torch.randn(2, 10, 6).double()), TypeError, ["u", "dtype"]),
    (dict(z=torch.randn(10)), ValueError, ["z", "dims"]),
    (dict(chunk_size=0), ValueError, ["chunk_size"]),
    (dict(rel_bias=torch.randn(5)), ValueError, ["rel_bias", "(7,)"]),
    (dict(backend="gpu"), ValueError, ["backend"]),
]


@pytest.mark.parametrize("changes,exception,words", BAD, ids=[",".join(c) for c, _, _ in BAD])
def test_bad_input_raises_a_clear_error(changes, exception, words):
    args = dict(
        z=torch.randn(2, 10, 5),
        gamma=torch.randn(4, 5),
        beta=torch.randn(4, 5),
        v=torch.randn(2, 10, 6),
        u=None,
        chunk_size=4,
        backend="torch",
    )
    args.update(changes)
    with pytest.raises(exception) as info:
        flash_attention(args.pop("z"), args.pop("gamma"), args.pop("beta"), args.pop("v"), **args)
    for word in words:
        assert word in str(info.value), f"{str(info.value)!r} does not mention {word!r}"
