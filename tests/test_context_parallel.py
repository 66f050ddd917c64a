"""Context parallelism (cp_group) over gloo on the CPU, against the single-process op.

One group of spawned processes per entry of GROUPS (process start-up dominates: the slow
groups run every other case of their world size, two small groups of one case each are in the
quick selection; a file:// rendezvous, no ports; a deadline, so a rank left waiting in a
collective fails the test instead of hanging CI). Every rank builds the same global inputs
from the case's seed and runs its own slice; the parent runs the single-process op on the whole
sequence and compares: the concatenated outputs and input gradients, and the sum over the
ranks of the parameter gradients (rel_bias, gamma, beta and the layers' weights), which are
per-rank partials. Backend "torch" in float64 at 1e-10, "triton" (interpreted) in float32.
Bitwise, where the design says so (flash_kernels/distributed/context_parallel.py): quadratic-only
calls, rank 0's output, the last rank's dk_lin and dv, the non-causal cross-rank state on every
rank, and run to run. Bad groupings raise the same error on every rank, and the group still
works afterwards.
"""

import os
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import assert_close

from flash_kernels import flash_attention, mixed_chunk_attention
from flash_kernels.distributed.collectives import CPCall
from flash_kernels.nn import FLASH, FLASHLM

GROUP_DEADLINE_S = 240  # the whole group of one world size, start-up included
SEQUENCE_NAMES = {"mixed": ("q_quad", "k_quad", "q_lin", "k_lin", "v"), "flash": ("z", "v", "u")}
PARAMETER_NAMES = {"mixed": ("rel_bias",), "flash": ("gamma", "beta", "rel_bias")}
TOLERANCE = {torch.float64: 1e-10, torch.float32: 2e-5}


# -- the cases ------------------------------------------------------------------------------------


def op_case(
    name,
    op,
    backend,
    lengths,
    *,
    causal=True,
    linear=True,
    bias=True,
    gate=True,
    batch=(2,),
    C=8,
    S=8,
    E=8,
    seed=0,
    dtype=None,
    **extra,
):
    if dtype is None:
        dtype = torch.float64 if backend == "torch" else torch.float32
    return dict(
        name=name,
        kind="op",
        op=op,
        backend=backend,
        dtype=dtype,
        lengths=lengths,
        causal=causal,
        linear=linear,
        bias=bias,
        gate=gate,
        batch=batch,
        C=C,
        S=S,
        E=E,
        seed=seed,
        **extra,
    )


def bad_case(name, lengths, words, overrides=None, exception="ValueError", **options):
    case = op_case(name, "mixed", "torch", lengths, batch=(1,), **options)
    case.update(kind="bad", words=words, overrides=overrides or {}, exception=exception)
    return case


def layer_case(name, backend, lengths, **options):
    dtype = torch.float64 if backend == "torch" else torch.float32
    return dict(
        name=name, kind="layer", backend=backend, dtype=dtype, lengths=lengths, seed=3, **options
    )


# One spawned group per entry: (world size, its cases). The "quick" groups hold one small case
# each and are in the quick selection (-m "not slow": test_context_parallel_quick), so the
# loop the README recommends runs the prefix sums of the states (2 ranks) and the suffix sums
# (3 ranks, every slice non-empty: the middle rank's state must reach the first rank's
# gradients); the other groups are slow (test_context_parallel).
QUICK_GROUPS = {
    "W2-quick": (2, [op_case("mixed-torch-causal", "mixed", "torch", [16, 11])]),
    "W3-quick": (3, [op_case("mixed-torch-causal-3", "mixed", "torch", [8, 16, 5], seed=6)]),
}
GROUPS = {
    "W2": (
        2,
        [
            op_case("mixed-torch-noncausal", "mixed", "torch", [8, 13], causal=False, batch=(2, 1)),
            op_case(
                "mixed-triton-causal",
                "mixed",
                "triton",
                [16, 12],
                repeat=True,
                bitwise=("rank0_out", "last_dk_lin_dv"),
            ),
            op_case(
                "mixed-triton-noncausal", "mixed", "triton", [8, 5], causal=False, record_state=True
            ),
            op_case(
                "mixed-triton-quadratic", "mixed", "triton", [8, 7], linear=False, bitwise=("all",)
            ),
            op_case("flash-triton-causal", "flash", "triton", [16, 7]),
            op_case(
                "flash-triton-noncausal-2roles",
                "flash",
                "triton",
                [8, 6],
                causal=False,
                linear=False,
                bitwise=("all",),
            ),
            op_case("flash-torch-noncausal", "flash", "torch", [8, 9], causal=False),
            bad_case(
                "slice-not-a-chunk-multiple",
                [10, 8],
                ["rank 0 holds 10 tokens", "multiple of chunk_size=8"],
            ),
            bad_case(
                "leading-dims-differ",
                [8, 8],
                ["leading dims", "rank 0: (1,)", "rank 1: (3,)"],
                overrides={1: {"batch": (3,)}},
            ),
            bad_case(
                "causal-differs",
                [8, 8],
                ["causal", "rank 1: False"],
                overrides={1: {"causal": False}},
            ),
            bad_case(
                "grad-differs", [8, 8], ["need a gradient"], overrides={1: {"requires_grad": False}}
            ),
            bad_case(
                "bad-input-on-one-rank",
                [8, 8],
                ["v has dtype torch.float32", "raised by rank 1"],
                overrides={1: {"v_dtype": torch.float32}},
                exception="TypeError",
            ),
            bad_case(
                "state-arguments",
                [8, 8],
                ["output_final_state is not supported"],
                overrides={0: {"output_final_state": True}, 1: {"output_final_state": True}},
            ),
            op_case("mixed-torch-after-errors", "mixed", "torch", [8, 3], seed=5),
            layer_case("flash-layer-torch-rope", "torch", [8, 7], rope=True, causal=True),
            layer_case("flash-layer-triton", "triton", [8, 5], rope=False, causal=False),
            layer_case("lm-torch-rope", "torch", [8, 6], rope=True, causal=True, lm=True),
            dict(name="ddp-flash-layer", kind="ddp", seed=4),
        ],
    ),
    "W3": (
        3,
        [
            op_case("mixed-torch-empty-middle", "mixed", "torch", [8, 0, 13]),
            op_case("mixed-torch-noncausal-empty-first", "mixed", "torch", [0, 8, 5], causal=False),
            op_case("mixed-triton-empty-last", "mixed", "triton", [8, 16, 0]),
            op_case(
                "flash-triton-noncausal-empty-middle",
                "flash",
                "triton",
                [8, 0, 5],
                causal=False,
                gate=False,
                record_state=True,
            ),
            op_case("flash-torch-causal", "flash", "torch", [8, 8, 3], gate=False),
            bad_case("middle-slice-partial", [8, 4, 8], ["rank 1 holds 4 tokens"]),
            layer_case("flash-layer-torch-rope-empty", "torch", [8, 0, 5], rope=True, causal=True),
        ],
    ),
    **QUICK_GROUPS,
}


def _make_inputs(case):
    """The global float64 inputs of an op case and the gradient of its output."""
    gen = torch.Generator().manual_seed(case["seed"])
    T = sum(case["lengths"])
    batch, S, E, C = case["batch"], case["S"], case["E"], case["C"]

    def rand(*shape, scale=1.0, shift=0.0):
        return shift + scale * torch.randn(*shape, generator=gen, dtype=torch.float64)

    if case["op"] == "mixed":
        tensors = dict(
            q_quad=rand(*batch, T, S),
            k_quad=rand(*batch, T, S),
            q_lin=rand(*batch, T, S) if case["linear"] else None,
            k_lin=rand(*batch, T, S) if case["linear"] else None,
            v=rand(*batch, T, E),
        )
    else:
        roles = 4 if case["linear"] else 2
        tensors = dict(
            z=rand(*batch, T, S),
            gamma=rand(roles, S, scale=0.5, shift=1.0),
            beta=rand(roles, S, scale=0.3),
            v=rand(*batch, T, E),
            u=rand(*batch, T, E) if case["gate"] else None,
        )
    tensors["rel_bias"] = rand(2 * C - 1, scale=0.5) if case["bias"] else None
    return tensors, rand(*batch, T, E)


def _run_op(case, tensors, grad_out, lo, hi, group, device="cpu", **overrides):
    """(out, grads by name) of the op on tokens [lo, hi) (the whole sequence without group),
    returned on the CPU."""
    dtype = overrides.get("dtype", case["dtype"])
    requires_grad = overrides.get("requires_grad", True)
    inputs = {}
    for name, x in tensors.items():
        if x is None:
            inputs[name] = None
            continue
        if name in SEQUENCE_NAMES[case["op"]]:
            x = x[..., lo:hi, :]
            if name == "v" and "v_dtype" in overrides:
                x = x.to(overrides["v_dtype"])
        inputs[name] = x.to(device, dtype if name != "v" or "v_dtype" not in overrides else x.dtype)
        inputs[name].requires_grad_(requires_grad)
    if "batch" in overrides:
        for name in SEQUENCE_NAMES[case["op"]]:
            if inputs[name] is not None:
                inputs[name] = (
                    inputs[name]
                    .detach()[:1]
                    .expand(*overrides["batch"], -1, -1)
                    .clone()
                    .requires_grad_(requires_grad)
                )
    options = dict(
        chunk_size=case["C"],
        causal=overrides.get("causal", case["causal"]),
        rel_bias=inputs["rel_bias"],
        backend=case["backend"],
        cp_group=group,
    )
    if "output_final_state" in overrides:
        options["output_final_state"] = overrides["output_final_state"]
    if case["op"] == "mixed":
        out = mixed_chunk_attention(
            inputs["q_quad"],
            inputs["k_quad"],
            inputs["q_lin"],
            inputs["k_lin"],
            inputs["v"],
            **options,
        )
    else:
        out = flash_attention(
            inputs["z"], inputs["gamma"], inputs["beta"], inputs["v"], u=inputs["u"], **options
        )
    names = [n for n, x in inputs.items() if x is not None and x.requires_grad]
    grads = torch.autograd.grad(
        out,
        [inputs[n] for n in names],
        grad_out[..., lo:hi, :].to(device, out.dtype),
        allow_unused=True,
    )
    return out.detach().cpu(), {n: g.cpu() for n, g in zip(names, grads)}


def _make_layer(case):
    torch.manual_seed(case["seed"])
    options = dict(
        s=8,
        chunk_size=4,
        rope=case["rope"],
        causal=case["causal"],
        backend=case["backend"],
        rel_pos="t5" if case["backend"] == "triton" else "learned",
    )
    if case.get("lm"):
        model = FLASHLM(40, d=16, depth=2, **options)
    else:
        model = FLASH(16, **options)
    return model.to(case["dtype"])


def _layer_inputs(case):
    gen = torch.Generator().manual_seed(case["seed"] + 100)
    T = sum(case["lengths"])
    if case.get("lm"):
        return torch.randint(0, 40, (2, T), generator=gen), torch.randn(
            2, T, 40, generator=gen, dtype=torch.float64
        )
    return (
        torch.randn(2, T, 16, generator=gen, dtype=torch.float64),
        torch.randn(2, T, 16, generator=gen, dtype=torch.float64),
    )


def _run_layer(case, lo, hi, group, start):
    model = _make_layer(case)
    x, weights = _layer_inputs(case)
    x = x[:, lo:hi]
    if x.is_floating_point():
        x = x.to(case["dtype"]).requires_grad_()
    out = model(x, cp_group=group, start=start)
    (out * weights[:, lo:hi].to(out.dtype)).sum().backward()
    params = {
        n: (p.grad if p.grad is not None else torch.zeros_like(p))
        for n, p in model.named_parameters()
    }
    return dict(out=out.detach(), x_grad=x.grad, params=params)


def _run_ddp(case, group):
    """Data parallel (DDP on gloo): rank r takes batch rows r::W; DDP averages gradients."""
    torch.manual_seed(case["seed"])
    layer = FLASH(16, s=8, chunk_size=4, rope=True, backend="torch").double()
    model = torch.nn.parallel.DistributedDataParallel(layer, process_group=group)
    gen = torch.Generator().manual_seed(case["seed"])
    x = torch.randn(4, 11, 16, generator=gen, dtype=torch.float64)
    rank, world_size = dist.get_rank(group), dist.get_world_size(group)
    model(x[rank::world_size]).square().mean().backward()
    return {n: p.grad.clone() for n, p in layer.named_parameters()}


# -- one rank --------------------------------------------------------------------------------------


def _rank_case(case, group, rank, device):
    world_size = dist.get_world_size(group)
    lengths = case.get("lengths", [])
    lo = sum(lengths[:rank])
    hi = lo + (lengths[rank] if lengths else 0)
    if case["kind"] == "ddp":
        return _run_ddp(case, group)
    if case["kind"] == "layer":
        return _run_layer(case, lo, hi, group, start=lo)
    tensors, grad_out = _make_inputs(case)
    if case["kind"] == "bad":
        try:
            _run_op(
                case, tensors, grad_out, lo, hi, group, device, **case["overrides"].get(rank, {})
            )
        except (TypeError, ValueError, RuntimeError) as error:
            return dict(exception=type(error).__name__, message=str(error))
        return dict(exception=None, message=None)
    recorded = []
    if case.get("record_state"):  # the non-causal state every chunk reads, as summed here
        original = CPCall.sum_all

        def recording(self, gathered, skip=None):
            total = original(self, gathered, skip)
            recorded.append(total.clone())
            return total

        CPCall.sum_all = recording
    try:
        runs = [
            _run_op(case, tensors, grad_out, lo, hi, group, device)
            for _ in range(2 if case.get("repeat") else 1)
        ]
    finally:
        if case.get("record_state"):
            CPCall.sum_all = original
    assert world_size == len(lengths)
    return dict(runs=runs, state=recorded)


def _rank_main(rank, world_size, init_file, cases, out_dir, dist_backend, device):
    torch.set_num_threads(1)
    if dist_backend == "nccl":
        device = f"cuda:{rank}"
        torch.cuda.set_device(rank)
    dist.init_process_group(
        dist_backend, init_method=f"file://{init_file}", rank=rank, world_size=world_size
    )
    group = dist.group.WORLD
    results = {}
    for case in cases:
        results[case["name"]] = _rank_case(case, group, rank, device)
    torch.save(results, os.path.join(out_dir, f"rank{rank}.pt"))
    dist.barrier()
    dist.destroy_process_group()


def run_group(world_size, cases, tmp_dir, dist_backend="gloo", device="cpu"):
    """Every rank's results, or a failure naming the rank; never a hang."""
    init_file = os.path.join(tmp_dir, "rendezvous")
    context = mp.start_processes(
        _rank_main,
        args=(world_size, init_file, cases, tmp_dir, dist_backend, device),
        nprocs=world_size,
        join=False,
        start_method="spawn",
    )
    deadline = time.monotonic() + GROUP_DEADLINE_S
    try:
        while not context.join(timeout=max(1.0, deadline - time.monotonic())):
            if time.monotonic() > deadline:
                pytest.fail(
                    f"the world-size-{world_size} group did not finish within "
                    f"{GROUP_DEADLINE_S} s (a rank left waiting in a collective?)"
                )
    finally:
        for process in context.processes:
            if process.is_alive():
                process.kill()
    return [
        torch.load(os.path.join(tmp_dir, f"rank{r}.pt"), weights_only=False)
        for r in range(world_size)
    ]


@pytest.fixture(scope="module")
def group_results(tmp_path_factory):
    """group name -> every rank's results (each group runs once per test session)."""
    results = {}

    def get(group):
        if group not in results:
            world_size, cases = GROUPS[group]
            try:
                results[group] = run_group(
                    world_size, cases, str(tmp_path_factory.mktemp(f"cp-{group}"))
                )
            except BaseException as error:  # reported once per case, not rerun
                results[group] = error
        if isinstance(results[group], BaseException):
            raise results[group]
        return results[group]

    return get


# -- the checks ------------------------------------------------------------------------------------


def _check_op(case, ranks, device="cpu"):
    tensors, grad_out = _make_inputs(case)
    T = sum(case["lengths"])
    out, grads = _run_op(case, tensors, grad_out, 0, T, None, device)
    tol = case["tolerance"] if "tolerance" in case else TOLERANCE[case["dtype"]]
    name = case["name"]
    first_runs = [r["runs"][0] for r in ranks]
    assert_close(f"{name}: out", torch.cat([o for o, _ in first_runs], dim=-2), out, tol)
    for grad_name, expected in grads.items():
        if grad_name in SEQUENCE_NAMES[case["op"]]:
            actual = torch.cat([g[grad_name] for _, g in first_runs], dim=-2)
        else:
            actual = sum(g[grad_name] for _, g in first_runs)
        assert_close(f"{name}: d{grad_name}", actual, expected, tol)
    bitwise = case.get("bitwise", ())
    bounds = [0] + torch.tensor(case["lengths"]).cumsum(0).tolist()
    if "all" in bitwise:  # nothing crosses a rank: every slice's bits are the op's
        assert torch.equal(torch.cat([o for o, _ in first_runs], dim=-2), out)
        for grad_name in SEQUENCE_NAMES[case["op"]]:
            if grad_name in grads:
                assert torch.equal(
                    torch.cat([g[grad_name] for _, g in first_runs], dim=-2), grads[grad_name]
                ), grad_name
    if "rank0_out" in bitwise:  # rank 0's offset is exactly zero
        assert torch.equal(first_runs[0][0], out[..., : bounds[1], :])
    if "last_dk_lin_dv" in bitwise:  # nothing comes from after the last rank
        lo = bounds[-2]
        for grad_name in ("k_lin", "v"):
            assert torch.equal(first_runs[-1][1][grad_name], grads[grad_name][..., lo:, :]), (
                grad_name
            )
    for rank_result in ranks:  # run to run
        for (out_a, grads_a), (out_b, grads_b) in zip(rank_result["runs"], rank_result["runs"][1:]):
            assert torch.equal(out_a, out_b)
            assert all(torch.equal(grads_a[n], grads_b[n]) for n in grads_a)
    if case.get("record_state"):  # forward and backward: the same bits on every rank
        states = [r["state"] for r in ranks]
        assert len(states[0]) == 2
        for other in states[1:]:
            assert all(torch.equal(a, b) for a, b in zip(states[0], other))


def _check_bad(case, ranks):
    first = ranks[0]
    assert first["exception"] == case["exception"], first
    for word in case["words"]:
        assert word in first["message"], (word, first["message"])
    for other in ranks[1:]:
        assert other == first, (other, first)


def _check_layer(case, ranks):
    T = sum(case["lengths"])
    whole = _run_layer(case, 0, T, None, start=None)
    tol = TOLERANCE[case["dtype"]]
    assert_close(
        f"{case['name']}: out", torch.cat([r["out"] for r in ranks], dim=1), whole["out"], tol
    )
    if whole["x_grad"] is not None:
        assert_close(
            f"{case['name']}: dx",
            torch.cat([r["x_grad"] for r in ranks], dim=1),
            whole["x_grad"],
            tol,
        )
    for name, expected in whole["params"].items():
        assert_close(
            f"{case['name']}: d{name}", sum(r["params"][name] for r in ranks), expected, tol
        )


def _check_ddp(case, ranks):
    torch.manual_seed(case["seed"])
    layer = FLASH(16, s=8, chunk_size=4, rope=True, backend="torch").double()
    gen = torch.Generator().manual_seed(case["seed"])
    x = torch.randn(4, 11, 16, generator=gen, dtype=torch.float64)
    world_size = len(ranks)
    # The mean over each rank's rows, averaged over the ranks = the mean over all rows.
    layer(x).square().mean().backward()
    for name, p in layer.named_parameters():
        for r, grads in enumerate(ranks):
            assert_close(f"ddp rank {r} of {world_size}: d{name}", grads[name], p.grad, 1e-10)


CHECKS = {"op": _check_op, "bad": _check_bad, "layer": _check_layer, "ddp": _check_ddp}


def _group_cases(groups):
    """pytest params (group, index in it), one per case of `groups`."""
    return [
        pytest.param(group, index, id=f"{group}-{case['name']}")
        for group in groups
        for index, case in enumerate(GROUPS[group][1])
    ]


def _check_case(group_results, group, index):
    results = group_results(group)
    case = GROUPS[group][1][index]
    CHECKS[case["kind"]](case, [r[case["name"]] for r in results])


@pytest.mark.slow  # spawns process groups (gloo), ~1 min
@pytest.mark.parametrize("group,index", _group_cases(g for g in GROUPS if g not in QUICK_GROUPS))
def test_context_parallel(group_results, group, index):
    _check_case(group_results, group, index)


@pytest.mark.parametrize("group,index", _group_cases(QUICK_GROUPS))
def test_context_parallel_quick(group_results, group, index):
    """The quick selection's context-parallel cases (QUICK_GROUPS)."""
    _check_case(group_results, group, index)


# -- GPUs ------------------------------------------------------------------------------------------


def gpu_cases():
    cases = [
        op_case("mixed-triton-causal-fp32", "mixed", "triton", [512, 300], C=256, S=64, E=96),
        op_case(
            "flash-triton-noncausal-fp32",
            "flash",
            "triton",
            [256, 256],
            C=256,
            S=64,
            E=96,
            causal=False,
        ),
    ]
    for dtype, tolerance in ((torch.bfloat16, 2e-2), (torch.float16, 2e-3)):
        name = str(dtype).split(".")[-1]
        cases.append(
            op_case(
                f"mixed-triton-causal-{name}",
                "mixed",
                "triton",
                [512, 512, 100],
                C=256,
                S=128,
                E=256,
                dtype=dtype,
                tolerance=tolerance,
            )
        )
        cases.append(
            op_case(
                f"flash-triton-causal-{name}",
                "flash",
                "triton",
                [256, 0, 40],
                C=256,
                S=128,
                E=256,
                dtype=dtype,
                tolerance=tolerance,
            )
        )
    return cases


def _check_gpu_group(world_size, dist_backend, device, tmp_path):
    cases = [c for c in gpu_cases() if len(c["lengths"]) == world_size]
    results = run_group(world_size, cases, str(tmp_path), dist_backend, device)
    for case in cases:
        _check_op(case, [r[case["name"]] for r in results], device="cuda")


@pytest.mark.slow
@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("world_size", [2, 3])
def test_cuda_tensors_over_gloo(world_size, tmp_path):
    """Every rank on the one GPU; gloo moves the states through the host."""
    _check_gpu_group(world_size, "gloo", "cuda:0", tmp_path)


@pytest.mark.slow
@pytest.mark.gpu
@pytest.mark.parametrize("world_size", [2, 3])
def test_nccl(world_size, tmp_path):
    if torch.cuda.device_count() < world_size:
        pytest.skip(f"needs {world_size} GPUs (NCCL: one per rank)")
    _check_gpu_group(world_size, "nccl", None, tmp_path)


# -- errors raised before any collective (no group needed) -----------------------------------------


def test_layer_errors_before_any_collective():
    x = torch.randn(1, 8, 16)
    from flash_kernels.nn import GAU

    with pytest.raises(ValueError, match="GAU attends the whole sequence as one chunk"):
        GAU(16, s=8, max_len=16, backend="torch")(x, cp_group=object())
    with pytest.raises(ValueError, match="with cp_group and RoPE, pass start"):
        FLASH(16, s=8, chunk_size=4, rope=True, backend="torch")(x, cp_group=object())
    with pytest.raises(ValueError, match="start must be at least 0"):
        FLASH(16, s=8, chunk_size=4, backend="torch")(x, start=-1)


def test_cp_group_needs_torch_distributed():
    x = torch.randn(1, 8, 4)
    if dist.is_initialized():
        pytest.skip("this process already has a process group")
    with pytest.raises(RuntimeError, match="init_process_group"):
        mixed_chunk_attention(x, x, x, x, x, chunk_size=4, cp_group=object())
