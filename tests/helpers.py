"""Shared test helpers: random problems, an rms-ratio assert_close that says where it failed,
the kernels a Triton call must launch, the C++ loop oracle (csrc_ref) as an autograd op, and
the context managers that force tile sizes (`tile_override`) or NaN-fill the kernels' buffers
(`nan_filled_buffers`) through the runtime's private override points."""

import contextlib

import pytest
import torch

# After torch, the shim before the memcheck, as conftest.py imports them.
# isort: off
import interpreter_shim  # noqa: F401  (spawned ranks and subprocesses import helpers, not conftest)
import interpreter_memcheck  # noqa: F401  (the same, for out-of-bounds checks)

# isort: on
from csrc_ref import mixed_chunk_attention_cpp, mixed_chunk_attention_cpp_backward
from flash_kernels import flash_attention, mixed_chunk_attention
from flash_kernels.backends.triton import kernel_config as triton_kernel_config
from flash_kernels.backends.triton import launch as triton_launch
from tools.launch_recording import record_launches

GRAD_NAMES = ("q_quad", "k_quad", "q_lin", "k_lin", "v", "rel_bias")


@contextlib.contextmanager
def tile_override(**fields):
    """Force tile sizes inside the block: `block` (every kernel's row block), `max_hoist_keys`,
    `block_e` (every value tile), `state_block_t`. Small tiles give short test sequences several
    blocks per chunk, and `max_hoist_keys` forces the long-chunk path. Blocks nest."""
    overrides = triton_kernel_config._tile_overrides
    saved = dict(overrides)
    overrides.update(fields)
    try:
        yield
    finally:
        overrides.clear()
        overrides.update(saved)


@contextlib.contextmanager
def nan_filled_buffers():
    """Inside the block the kernels' output and scratch buffers start as NaN, so a kernel that
    reads memory nobody wrote (or leaves part of an output unwritten) produces NaN that a test
    catches. Blocks nest."""
    saved = triton_launch._buffer_fill
    triton_launch._buffer_fill = float("nan")
    try:
        yield
    finally:
        triton_launch._buffer_fill = saved


def assert_close(name, actual, expected, ratio):
    """Fail when rms(actual - expected) > ratio * rms(expected), naming the worst element.

    A relative error of the whole tensor is robust for attention outputs, whose entries can be
    near zero (an elementwise rtol would fail on those for no reason).
    """
    assert actual.shape == expected.shape, (
        f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    )
    actual, expected = actual.double(), expected.double()
    assert torch.isfinite(actual).all(), (
        f"{name}: non-finite values at {torch.nonzero(~torch.isfinite(actual))[:5].tolist()}"
    )
    diff = actual - expected
    rms_diff = diff.square().mean().sqrt().item() if diff.numel() else 0.0
    rms_ref = expected.square().mean().sqrt().item() if diff.numel() else 0.0
    if rms_diff > ratio * rms_ref + 1e-30:
        worst = diff.abs().argmax()
        index = tuple(int(i) for i in torch.unravel_index(worst, diff.shape))
        raise AssertionError(
            f"{name}: rms error {rms_diff:.3e} > {ratio:.1e} * rms(expected) {rms_ref:.3e}; "
            f"worst at {index}: actual {actual[index].item():.6g}, "
            f"expected {expected[index].item():.6g}"
        )


def make_problem(
    batch,
    T,
    S,
    E,
    *,
    linear=True,
    bias_chunk=None,
    dtype=torch.float64,
    device="cpu",
    seed=0,
    requires_grad=True,
):
    """Random inputs as a dict of keyword arguments for mixed_chunk_attention.

    Queries and keys are scaled so that the relu^2 scores are O(1) with the default scales and
    about half of them are positive (both branches of relu are exercised).
    """
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, scale=1.0):
        x = (scale * torch.randn(*shape, generator=gen, dtype=torch.float64)).to(
            device=device, dtype=dtype
        )
        return x.requires_grad_(requires_grad)

    problem = dict(
        q_quad=rand(*batch, T, S),
        k_quad=rand(*batch, T, S),
        q_lin=rand(*batch, T, S) if linear else None,
        k_lin=rand(*batch, T, S) if linear else None,
        v=rand(*batch, T, E),
    )
    problem["rel_bias"] = rand(2 * bias_chunk - 1, scale=0.5) if bias_chunk else None
    return problem


FP16_MAX = 65504.0
# Options of large_score_problem: scores in the hundreds, so relu^2 weights ~1e5.
LARGE_SCORE_OPTIONS = dict(chunk_size=16, quad_scale=40.0, lin_scale=4.0)


def large_score_problem(seed=11):
    """(problem, grad_out) whose relu^2 weights exceed fp16's largest value while the output
    and every gradient stay far inside fp16's range (with LARGE_SCORE_OPTIONS).

    quad_scale = 40 on N(0, 1) queries and keys of S = 16 features gives scores s ~ N(0, 160^2),
    so the largest weights relu(s)^2 reach 1e5-3e5 > 65504; values of size 0.01 keep the output
    ~1e3 (at most ~9e3), a grad_out of size 0.01 keeps dv = A^T dO ~1e3 and dq, dk ~1e2, and
    lin_scale = 4 keeps the linear part's gradients (~1e-2) clear of fp16's subnormals. A kernel
    that rounds the weights (or anything of their size) to fp16 gets inf.
    """
    problem = make_problem((2,), 37, 16, 24, bias_chunk=16, seed=seed)
    problem["v"] = (0.01 * problem["v"].detach()).requires_grad_()
    gen = torch.Generator().manual_seed(seed + 1)
    grad_out = 0.01 * torch.randn(2, 37, 24, generator=gen, dtype=torch.float64)
    return problem, grad_out


def largest_weight(problem, *, chunk_size, causal, quad_scale):
    """max relu(s_ij)^2 over the pairs the op weights (same chunk, j <= i when causal), in
    float64 from the inputs as given."""
    q, k = problem["q_quad"].detach().double(), problem["k_quad"].detach().double()
    T = q.shape[-2]
    pos = torch.arange(T)
    offset = pos[:, None] - pos[None, :]
    allowed = (pos[:, None] // chunk_size) == (pos[None, :] // chunk_size)
    if causal:
        allowed &= offset >= 0
    scores = quad_scale * q @ k.transpose(-1, -2)
    if problem["rel_bias"] is not None:
        bias = problem["rel_bias"].detach().double()
        scores = scores + bias[(offset + chunk_size - 1).clamp(0, 2 * chunk_size - 2)]
    return (torch.relu(scores) ** 2)[..., allowed].max().item()


def inputs_of(problem):
    return [problem[n] for n in GRAD_NAMES if problem[n] is not None and problem[n].requires_grad]


def run_with_grads(problem, grad_out=None, launches=None, **options):
    """Output and the gradients of every input that requires grad, as a dict by name. The
    kernels launched go to `launches` (a dict: "forward" and "backward" record lists) if given."""
    launches = {} if launches is None else launches
    with record_launches() as launches["forward"]:
        out = mixed_chunk_attention(
            problem["q_quad"],
            problem["k_quad"],
            problem["q_lin"],
            problem["k_lin"],
            problem["v"],
            rel_bias=problem["rel_bias"],
            **options,
        )
    if grad_out is None:
        grad_out = torch.randn(
            out.shape, generator=torch.Generator().manual_seed(123), dtype=torch.float64
        ).to(out)
    names = [n for n in GRAD_NAMES if problem[n] is not None and problem[n].requires_grad]
    with record_launches() as launches["backward"]:
        grads = torch.autograd.grad(out, [problem[n] for n in names], grad_out, allow_unused=True)
    return out, dict(zip(names, grads)), grad_out


def op_inputs(op, dtype=torch.float32, seed=0, batch=2, T_=11, S=5, E=6, C=4, device=None):
    """Named inputs of `op` ("mixed_chunk_attention" or "flash_attention"; call it with
    `call_op`): O(1) scores, a (2C - 1,) relative bias, gamma near 1; on the GPU when there is
    one."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    gen = torch.Generator().manual_seed(seed)

    def rand(*shape, shift=0.0, dtype=dtype):
        return (shift + torch.randn(*shape, generator=gen)).to(device, dtype)

    rel_bias = rand(2 * C - 1, dtype=torch.float32)
    if op == "mixed_chunk_attention":
        return dict(
            q_quad=rand(batch, T_, S),
            k_quad=rand(batch, T_, S),
            q_lin=rand(batch, T_, S),
            k_lin=rand(batch, T_, S),
            v=rand(batch, T_, E),
            rel_bias=rel_bias,
        )
    return dict(
        z=rand(batch, T_, S),
        gamma=rand(4, S, shift=1.0, dtype=torch.float32),
        beta=rand(4, S, dtype=torch.float32),
        v=rand(batch, T_, E),
        u=rand(batch, T_, E),
        rel_bias=rel_bias,
    )


def check_raises(fn, exception, words):
    """fn() raises `exception` whose message contains every one of `words`."""
    with pytest.raises(exception) as info:
        fn()
    for word in words:
        assert word in str(info.value), f"message {str(info.value)!r} does not mention {word!r}"


def call_op(op, tensors, **options):
    """Run "mixed_chunk_attention" or "flash_attention" on a dict of named tensors (the
    names of the op's arguments; rel_bias included)."""
    if op == "mixed_chunk_attention":
        return mixed_chunk_attention(
            tensors["q_quad"],
            tensors["k_quad"],
            tensors["q_lin"],
            tensors["k_lin"],
            tensors["v"],
            rel_bias=tensors["rel_bias"],
            **options,
        )
    return flash_attention(
        tensors["z"],
        tensors["gamma"],
        tensors["beta"],
        tensors["v"],
        u=tensors["u"],
        rel_bias=tensors["rel_bias"],
        **options,
    )


# (T, chunk_size, quad_scale, lin_scale) and the scales resolved by hand: 1 / C with C the chunk
# size, even when longer than the sequence, or T for chunk_size=None; an explicit scale never
# sets the other one.
DEFAULT_SCALE_CASES = [
    (10, 4, None, None, 1 / 4, 1 / 4),
    (5, 16, None, None, 1 / 16, 1 / 16),  # T < C
    (10, None, None, None, 1 / 10, 1 / 10),
    (10, 4, 0.7, None, 0.7, 1 / 4),
    (10, 4, None, 0.3, 1 / 4, 0.3),
    (5, 16, 0.7, None, 0.7, 1 / 16),
    (10, None, None, 0.3, 1 / 10, 0.3),
]


def scale_case_id(case):
    T, chunk_size, quad_scale, lin_scale = case[:4]
    return f"T{T}-C{chunk_size}-quad{quad_scale}-lin{lin_scale}"


def default_scale(T, chunk_size):
    """The default quad_scale and lin_scale, 1 / C, with C = chunk_size (even when longer than
    the sequence) or T for chunk_size=None (docs/contract.md section 2). Worked out here, not by the
    package, so that a test comparing against it can see a wrong default."""
    return 1.0 / (T if chunk_size is None else chunk_size)


def triton_kernels(phase, linear):
    """Names of the kernels one Triton "forward", or one "backward" in which every input
    requires grad, launches: the per-chunk kernels, and with a linear part the state scan."""
    per_chunk = {
        "forward": {"mixed_chunk_fwd_kernel"},
        "backward": {"mixed_chunk_bwd_query_kernel", "mixed_chunk_bwd_key_kernel"},
    }[phase]
    return per_chunk | ({"chunk_state_scan_kernel"} if linear else set())


def assert_launched(what, phase, records, expected, *, from_z=False):
    """The kernels recorded in one `phase` ("forward" or "backward";
    tools.launch_recording.record_launches) are exactly `expected` (a set of names; empty for the
    PyTorch paths); flash_attention's (from_z) form the roles from z, and the state scan runs
    forward in a forward and in reverse in a backward."""
    launched = {r.kernel_name for r in records}
    assert launched == set(expected), (
        f"{what} {phase}: launched {sorted(launched)}, expected {sorted(expected)}"
    )
    for r in records:
        assert r.constexprs.get("FROM_Z") == from_z, f"{what}: {r.kernel_name} FROM_Z != {from_z}"
        if r.kernel_name == "chunk_state_scan_kernel":
            assert r.constexprs["REVERSE"] == (phase == "backward"), (
                f"{what} {phase}: scan direction"
            )


class _CppOracle(torch.autograd.Function):
    """The C++ loop oracle with its hand-written backward (docs/contract.md section 3), for
    autograd.
    `options` are resolved: an int chunk_size and float scales."""

    @staticmethod
    def forward(ctx, options, q_quad, k_quad, q_lin, k_lin, v, rel_bias):
        ctx.options = options
        ctx.save_for_backward(q_quad, k_quad, q_lin, k_lin, v, rel_bias)
        return mixed_chunk_attention_cpp(
            q_quad, k_quad, q_lin, k_lin, v, rel_bias=rel_bias, **options
        )

    @staticmethod
    def backward(ctx, grad_out):
        q_quad, k_quad, q_lin, k_lin, v, rel_bias = ctx.saved_tensors
        grads = mixed_chunk_attention_cpp_backward(
            grad_out, q_quad, k_quad, q_lin, k_lin, v, rel_bias=rel_bias, **ctx.options
        )
        return (None, *(grads[name] for name in GRAD_NAMES))


def flash_roles(z, gamma, beta, round_to=None):
    """The roles z * gamma[r] + beta[r] (r < len(gamma)), rounded to `round_to` when given, as
    flash_attention rounds them to z's dtype for half inputs; the gradient passes the rounding
    unchanged, as the op's backward does."""
    roles = [z * gamma[r] + beta[r] for r in range(gamma.shape[0])]
    if round_to is None:
        return roles
    return [role + (role.to(round_to).to(role.dtype) - role).detach() for role in roles]


def composed_flash_attention(tensors, attention, round_to=None):
    """flash_attention composed from its definition: the roles (flash_roles), then
    `attention(q_quad, k_quad, q_lin, k_lin, v, rel_bias)`, then the gate u."""
    roles = flash_roles(tensors["z"], tensors["gamma"], tensors["beta"], round_to)
    q_lin, k_lin = (roles[2], roles[3]) if len(roles) == 4 else (None, None)
    out = attention(roles[0], roles[1], q_lin, k_lin, tensors["v"], tensors["rel_bias"])
    return out if tensors["u"] is None else tensors["u"] * out


def cpp_oracle(op, tensors, *, chunk_size, causal, quad_scale, lin_scale):
    """`op` ("mixed_chunk_attention" or "flash_attention", tensors named as in call_op) by the
    C++ oracle, float64, differentiable; every option must be given resolved. flash_attention
    is composed around it (composed_flash_attention)."""
    options = dict(chunk_size=chunk_size, causal=causal, quad_scale=quad_scale, lin_scale=lin_scale)

    def attention(q_quad, k_quad, q_lin, k_lin, v, rel_bias):
        return _CppOracle.apply(options, q_quad, k_quad, q_lin, k_lin, v, rel_bias)

    if op == "mixed_chunk_attention":
        return attention(*(tensors[name] for name in GRAD_NAMES))
    return composed_flash_attention(tensors, attention)
