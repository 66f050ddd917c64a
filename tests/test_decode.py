"""Batched decoding (flash_kernels/decoding/): the decode ops against the full ops, the layers' and
FLASHLM's decoding on top of them, and the properties a CUDA graph needs.

- Every decoded output equals the full op's output at that token: float64 on the torch path
  (1e-12), the Triton kernel in float32 and float16 under the interpreter (and bfloat16 on a
  GPU) to the rms ratios of flash_kernels/core/tolerances.py ("decode"), sequences of one batch at
  different positions of their chunks, chunk boundaries crossed at different steps, rel_bias,
  the linear part on and off, one growing chunk (chunk_size=None), and flash_attention's fused
  roles (held against the roles as the op rounds them to the dtype) and gate. The cache
  after the steps equals the full op's final state and last partial chunk.
- generate on a batch of prompts of different lengths gives every row what generating it alone
  gives (greedy), per-sequence eos included.
- A step is static: torch.compile(fullgraph=True) traces a whole FLASHLM step with no graph
  break and no recompile across chunk boundaries (an .item() or a data-dependent branch would
  break it); the Triton path is one launch per layer; on a GPU the step is captured in a CUDA
  graph and replayed (marked gpu).
"""

import pytest
import torch
import torch._dynamo.testing
from helpers import assert_close

import flash_kernels.backends.triton.decode as decode_module
from flash_kernels import (
    DecodeCache,
    flash_attention_decode,
    mixed_chunk_attention,
    mixed_chunk_decode,
)
from flash_kernels.core.environment import INTERPRETED_KERNELS
from flash_kernels.core.roles import scale_offset_roles
from flash_kernels.core.tolerances import rms_ratio
from flash_kernels.nn import FLASHLM, ScaleOffset
from tools.launch_recording import record_launches

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
TRITON_OK = DEVICE == "cuda" or INTERPRETED_KERNELS
B, T, S, E = 4, 26, 20, 20
START = [0, 3, 5, 18]  # positions of the four sequences when decoding starts
STEPS = 4  # sequences cross a chunk end (C = 4, 20) at different steps
GAU_CAPACITY = 32


@pytest.fixture(autouse=True)
def small_tiles(monkeypatch):
    """Tiles of 16: E = 20 takes two programs per sequence (the second partial), a 20-token
    chunk two key tiles, S = 20 two row blocks of the state (read and fold)."""
    for name in ("DECODE_BLOCK_E", "DECODE_BLOCK_N", "DECODE_BLOCK_SL", "DECODE_BLOCK_SF"):
        monkeypatch.setattr(decode_module, name, 16)


NEEDS_TRITON = pytest.mark.skipif(not TRITON_OK, reason="needs CUDA or TRITON_INTERPRET=1")
BACKENDS = [
    pytest.param("torch", torch.float64, id="torch-f64"),
    pytest.param("triton", torch.float32, id="triton-f32", marks=NEEDS_TRITON),
    pytest.param("triton", torch.float16, id="triton-f16", marks=NEEDS_TRITON),
    pytest.param(
        "triton",
        torch.bfloat16,
        id="triton-bf16",
        marks=[
            pytest.mark.gpu,
            pytest.mark.skipif(
                DEVICE != "cuda", reason="bfloat16 needs a GPU: the Triton interpreter has no bf16"
            ),
        ],
    ),
]


def _rand(gen, *shape, scale=1.0, dtype=torch.float64):
    return (scale * torch.randn(*shape, generator=gen, dtype=torch.float64)).to(DEVICE, dtype)


def _bias_for(base, C):
    """The (2C - 1,) Toeplitz vector of one bias function b(o) (o = i - j), from base, which
    holds b over offsets -(M - 1) .. M - 1."""
    M = (base.numel() + 1) // 2
    return base[M - C : M + C - 1]


class Problem:
    """B sequences of T tokens, each token's roles and value (and gate), and the full op's
    output and final states for reference."""

    def __init__(self, *, op, linear, bias, chunk_size, dtype, seed=0):
        gen = torch.Generator().manual_seed(seed)
        self.op, self.linear, self.chunk_size, self.dtype = op, linear, chunk_size, dtype
        self.capacity = chunk_size if chunk_size is not None else GAU_CAPACITY
        # quad_scale explicit for one growing chunk (its default 1/T cannot decode)
        self.quad_scale = None if chunk_size is not None else 0.3
        base = _rand(gen, 2 * GAU_CAPACITY - 1, scale=0.5, dtype=torch.float32) if bias else None
        self.bias_full = None if base is None else _bias_for(base, chunk_size or T)
        self.bias_decode = None if base is None else _bias_for(base, self.capacity)
        if op == "flash":
            roles = 4 if linear else 2
            self.z = _rand(gen, B, T, S, dtype=dtype)
            self.gamma = _rand(gen, roles, S, dtype=dtype)
            self.beta = _rand(gen, roles, S, scale=0.5, dtype=dtype)
            self.u = _rand(gen, B, T, E, dtype=dtype)
            self.roles = scale_offset_roles(self.z, self.gamma, self.beta)
        else:
            self.roles = [_rand(gen, B, T, S, dtype=dtype) for _ in range(4 if linear else 2)]
        self.v = _rand(gen, B, T, E, dtype=dtype)

    def full(self, length=T):
        """The full op on each sequence's first `length` tokens: (out, final_state or None)."""
        options = dict(
            chunk_size=self.chunk_size,
            rel_bias=self.bias_full if length == T else None,
            quad_scale=self.quad_scale,
            backend="torch",
            output_final_state=self.linear,
        )
        # flash: the roles as the op forms them, in float32 rounded to z's dtype (self.roles,
        # scale_offset_roles), so that a half-precision case is not charged for that rounding
        roles = [r[:, :length].double() for r in self.roles]
        q_lin, k_lin = (roles[2], roles[3]) if self.linear else (None, None)
        result = mixed_chunk_attention(
            roles[0], roles[1], q_lin, k_lin, self.v[:, :length].double(), **options
        )
        out, final = result if self.linear else (result, None)
        if self.op == "flash":
            out = self.u[:, :length].double() * out
        return out, final

    def cache_at(self, start):
        """A DecodeCache holding each sequence's first start[b] tokens."""
        cache = DecodeCache.empty(
            B,
            S,
            E,
            chunk_size=self.chunk_size,
            capacity=self.capacity,
            linear=self.linear,
            dtype=self.dtype,
            device=DEVICE,
        )
        C = self.chunk_size
        for b, p in enumerate(start):
            first = (p // C) * C if C is not None else 0  # the current chunk's first token
            cache.k_quad[b, : p - first] = self.roles[1][b, first:p]
            cache.v[b, : p - first] = self.v[b, first:p]
            if self.linear:
                cache.k_lin[b, : p - first] = self.roles[3][b, first:p]
                kl, vv = self.roles[3][b, :first].double(), self.v[b, :first].double()
                cache.state[b] = (kl.t() @ vv).to(cache.state.dtype)
            cache.position[b] = p
        return cache

    def check_held_role(self, held, role, b, first, end):
        """The cache holds role `role` of sequence b's tokens [first, end): the very tensors
        given (mixed), or z * gamma + beta formed by the step (flash). A kernel may contract
        the latter into one fused multiply-add (the GPU compilers do) and torch rounds the
        product first, so it is held to the rounding bound of either, 2u(|z gamma| + |beta|)
        around the exact float64 value (u = the dtype's unit roundoff), not to the bits."""
        if self.op != "flash":
            assert torch.equal(held, self.roles[role][b, first:end])
            return
        z, gamma, beta = (
            self.z[b, first:end].double(),
            self.gamma[role].double(),
            self.beta[role].double(),
        )
        exact = z * gamma + beta
        unit = torch.finfo(self.dtype).eps / 2
        bound = 2 * unit * ((z * gamma).abs() + beta.abs())
        error = (held.double() - exact).abs()
        assert (error <= bound).all(), (
            f"role {role} of sequence {b}: error {(error - bound).max().item():.3g} over the bound"
        )

    def step(self, cache, t, backend):
        """Decode token t[b] of every sequence b."""
        rows = torch.arange(B, device=DEVICE)
        options = dict(rel_bias=self.bias_decode, quad_scale=self.quad_scale, backend=backend)
        if self.op == "flash":
            return flash_attention_decode(
                self.z[rows, t],
                self.gamma,
                self.beta,
                self.v[rows, t],
                cache,
                u=self.u[rows, t],
                **options,
            )
        roles = [r[rows, t] for r in self.roles]
        q_lin, k_lin = (roles[2], roles[3]) if self.linear else (None, None)
        return mixed_chunk_decode(
            roles[0], roles[1], q_lin, k_lin, self.v[rows, t], cache, **options
        )


def _check(actual, expected, dtype, what):
    if dtype == torch.float64:
        torch.testing.assert_close(
            actual, expected, rtol=1e-12, atol=1e-12, msg=lambda m: f"{what}: {m}"
        )
    else:
        assert_close(what, actual, expected, rms_ratio("decode", dtype))


CASES = [
    dict(op="mixed", linear=True, bias=True, chunk_size=4),
    dict(op="mixed", linear=True, bias=False, chunk_size=4),
    dict(op="mixed", linear=True, bias=True, chunk_size=20),
    dict(op="mixed", linear=False, bias=True, chunk_size=4),
    dict(op="mixed", linear=False, bias=True, chunk_size=None),
    dict(op="flash", linear=True, bias=True, chunk_size=4),
    dict(op="flash", linear=True, bias=False, chunk_size=20),
    dict(op="flash", linear=False, bias=False, chunk_size=None),
]


@pytest.mark.parametrize("backend,dtype", BACKENDS)
@pytest.mark.parametrize("case", CASES, ids=lambda c: "-".join(f"{k}={v}" for k, v in c.items()))
def test_decode_equals_the_full_op(case, backend, dtype):
    problem = Problem(**case, dtype=dtype)
    expected, _ = problem.full()
    cache = problem.cache_at(START)
    start = torch.tensor(START, device=DEVICE)
    for i in range(STEPS):
        out = problem.step(cache, start + i, backend)
        assert out.dtype == dtype and out.shape == (B, E)
        _check(out.double(), expected[torch.arange(B), start + i], dtype, f"step {i}")
    assert torch.equal(cache.position.cpu(), start.cpu() + STEPS)
    assert torch.equal(cache.tickets.cpu(), torch.zeros(B, dtype=torch.int32))
    # The cache now holds what the full op leaves after each sequence's tokens.
    C = problem.chunk_size
    for b, p in enumerate(start.tolist()):
        end = p + STEPS
        first = (end // C) * C if C is not None else 0
        held = end - first
        problem.check_held_role(cache.k_quad[b, :held], 1, b, first, end)
        if problem.linear:
            problem.check_held_role(cache.k_lin[b, :held], 3, b, first, end)
        assert torch.equal(cache.v[b, :held], problem.v[b, first:end])
        buffers = [cache.k_quad, cache.v] + ([cache.k_lin] if problem.linear else [])
        assert all((x[b, held:] == 0).all() for x in buffers), "rows past the length not zero"
        if problem.linear:
            _, final = problem.full(end)
            _check(cache.state[b].double(), final[b], dtype, f"state of sequence {b}")


@pytest.mark.parametrize("backend,dtype", BACKENDS)
def test_full_one_chunk_cache_gives_nan_and_stays_unchanged(backend, dtype):
    problem = Problem(op="mixed", linear=False, bias=True, chunk_size=None, dtype=dtype)
    start = [32, 2, 32, 31]  # capacity 32: sequences 0 and 2 are full
    cache = problem.cache_at([min(p, T) for p in start])
    cache.position.copy_(torch.tensor(start))
    before = [t.clone() for t in (cache.k_quad, cache.v)]
    t = torch.tensor([T - 1, 2, T - 1, T - 1], device=DEVICE)
    out = problem.step(cache, t, backend)
    assert torch.isnan(out[[0, 2]]).all() and torch.isfinite(out[[1, 3]]).all()
    assert cache.position.tolist() == [32, 3, 32, 32]
    for now, old in zip((cache.k_quad, cache.v), before):
        assert torch.equal(now[[0, 2]], old[[0, 2]])


def test_bad_inputs_are_named():
    cache = DecodeCache.empty(2, S, E, chunk_size=4)
    q = torch.randn(2, S)
    v = torch.randn(2, E)
    with pytest.raises(ValueError, match=r"v must have shape \(B, E\)"):
        mixed_chunk_decode(q, q, q, q, v[None], cache)
    with pytest.raises(ValueError, match=r"k_quad must have shape \(2, 20\)"):
        mixed_chunk_decode(q, q[:, :3], q, q, v, cache)
    with pytest.raises(TypeError, match="q_lin has dtype torch.float64"):
        mixed_chunk_decode(q, q, q.double(), q, v, cache)
    with pytest.raises(ValueError, match="q_lin was given without k_lin"):
        mixed_chunk_decode(q, q, q, None, v, cache)
    with pytest.raises(ValueError, match="quadratic-only decoding"):
        mixed_chunk_decode(q, q, None, None, v, cache)
    with pytest.raises(ValueError, match=r"cache.k_quad must have shape \(3, 4, 20\)"):
        mixed_chunk_decode(*(torch.randn(3, S) for _ in range(4)), torch.randn(3, E), cache)
    with pytest.raises(TypeError, match="cache.k_quad has dtype torch.float32"):
        mixed_chunk_decode(q.double(), q.double(), q.double(), q.double(), v.double(), cache)
    with pytest.raises(ValueError, match=r"rel_bias must have shape \(2 \* C - 1,\) = \(7,\)"):
        mixed_chunk_decode(q, q, q, q, v, cache, rel_bias=torch.zeros(5))
    with pytest.raises(TypeError, match="cache must be a flash_kernels.DecodeCache"):
        mixed_chunk_decode(q, q, q, q, v, {"state": None})
    with pytest.raises(ValueError, match="backend"):
        mixed_chunk_decode(q, q, q, q, v, cache, backend="cuda")
    bad_position = DecodeCache.empty(2, S, E, chunk_size=4)
    bad_position.position = bad_position.position.int()
    with pytest.raises(ValueError, match="cache.position must be an int64 tensor"):
        mixed_chunk_decode(q, q, q, q, v, bad_position)
    with pytest.raises(ValueError, match="explicit quad_scale"):
        mixed_chunk_decode(
            q,
            q,
            None,
            None,
            v,
            DecodeCache.empty(2, S, E, chunk_size=None, capacity=8, linear=False),
        )
    with pytest.raises(ValueError, match="needs capacity"):
        DecodeCache.empty(2, S, E, chunk_size=None)
    with pytest.raises(ValueError, match="capacity must equal chunk_size"):
        DecodeCache.empty(2, S, E, chunk_size=4, capacity=8)
    with pytest.raises(ValueError, match=r"gamma must have shape \(4, S\)"):
        flash_attention_decode(q, torch.ones(3, S), torch.ones(3, S), v, cache)
    with pytest.raises(ValueError, match=r"u must have shape \(2, 20\)"):
        flash_attention_decode(q, torch.ones(4, S), torch.ones(4, S), v, cache, u=v[:, :3])


# -- the model: prefill with lengths, generate, static steps -----------------------------------

VOCAB = 23


def make_lm(layer="flash", rope=True, dtype=torch.float64, backend="torch", seed=0):
    torch.manual_seed(seed)
    options = dict(chunk_size=4) if layer == "flash" else dict(layer="gau", max_len=32)
    lm = FLASHLM(VOCAB, d=16, depth=2, s=8, rope=rope, backend=backend, **options)
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():  # attention terms O(1), so a wrong offset shows
        for module in lm.modules():
            if isinstance(module, ScaleOffset):
                module.gamma.copy_(torch.randn(module.gamma.shape, generator=gen))
                module.beta.copy_(0.5 * torch.randn(module.beta.shape, generator=gen))
        for layer in lm.layers:
            if layer.rel_pos is not None:
                w = layer.rel_pos.weight
                w.copy_(0.5 * torch.randn(w.shape, generator=gen))
    return lm.to(DEVICE, dtype)


def _prompts(lengths, T_pad, seed=1):
    gen = torch.Generator().manual_seed(seed)
    idx = torch.randint(0, VOCAB, (len(lengths), T_pad), generator=gen)
    return idx.to(DEVICE), torch.tensor(lengths, device=DEVICE)


@pytest.mark.parametrize("layer,rope", [("flash", True), ("flash", False), ("gau", True)])
def test_prefill_with_lengths_then_steps_equal_each_row_alone(layer, rope):
    lm = make_lm(layer, rope)
    idx, lengths = _prompts([7, 2, 4, 9], 9)
    nxt = torch.randint(0, VOCAB, (4, 5), generator=torch.Generator().manual_seed(3)).to(DEVICE)
    with torch.no_grad():
        logits, caches = lm.prefill(idx, lengths=lengths)
        steps = torch.stack([lm.step(nxt[:, i], caches) for i in range(nxt.shape[1])], dim=1)
        for b, n in enumerate(lengths.tolist()):
            alone = lm(torch.cat([idx[b : b + 1, :n], nxt[b : b + 1]], dim=1))[0]
            torch.testing.assert_close(logits[b, :n], alone[:n], rtol=1e-10, atol=1e-10)
            torch.testing.assert_close(steps[b], alone[n:], rtol=1e-10, atol=1e-10)
    assert all(c.position.tolist() == [12, 7, 9, 14] for c in caches)


@pytest.mark.parametrize(
    "layer,backend,dtype",
    [
        ("flash", "torch", torch.float64),
        ("gau", "torch", torch.float64),
        pytest.param(
            "flash",
            "triton",
            torch.float32,
            marks=pytest.mark.skipif(not TRITON_OK, reason="needs CUDA or the interpreter"),
        ),
    ],
)
def test_generate_batch_of_lengths_equals_each_prompt_alone(layer, backend, dtype):
    lm = make_lm(layer, backend=backend, dtype=dtype)
    idx, lengths = _prompts([5, 1, 8, 3], 8, seed=2)
    out = lm.generate(idx, 7, temperature=0, lengths=lengths)
    assert out.shape == (4, 15)
    for b, n in enumerate(lengths.tolist()):
        alone = lm.generate(idx[b : b + 1, :n], 7, temperature=0)[0]
        assert torch.equal(out[b, : n + 7], alone), f"row {b}"
        assert (out[b, n + 7 :] == 0).all()  # padding after the row


def test_generate_stops_each_sequence_at_eos():
    lm = make_lm("flash")
    idx, lengths = _prompts([4, 2, 6], 6, seed=6)
    free = lm.generate(idx, 9, temperature=0, lengths=lengths)
    eos = int(free[0, 4 + 2])  # row 0's third new token: rows stop at 3, 4, 4
    ends = []
    for b, n in enumerate(lengths.tolist()):
        new = free[b, n : n + 9].tolist()
        ends.append(new.index(eos) + 1 if eos in new else 9)
    assert len(set(ends)) > 1 and max(ends) < 9  # the case tests what it should
    pad = VOCAB - 1
    out = lm.generate(idx, 9, temperature=0, lengths=lengths, eos_token_id=eos, pad_token_id=pad)
    assert out.shape == (3, 6 + max(ends))  # stopped once every row had
    for b, (n, end) in enumerate(zip(lengths.tolist(), ends)):
        assert out[b, : n + end].tolist() == free[b, : n + end].tolist()
        assert (out[b, n + end :] == pad).all()


def test_generate_checks_its_arguments():
    lm = make_lm("flash")
    idx, _ = _prompts([3, 3], 3)
    with pytest.raises(ValueError, match=r"lengths must lie in \[1, 3\]"):
        lm.generate(idx, 2, lengths=torch.tensor([0, 3]))
    with pytest.raises(ValueError, match=r"lengths must have shape \(2,\)"):
        lm.generate(idx, 2, lengths=torch.tensor([3]))
    with pytest.raises(TypeError, match="lengths must be int64 or int32"):
        lm.generate(idx, 2, lengths=torch.tensor([3.0, 3.0]))
    with pytest.raises(ValueError, match="eos_token_id must be a token id below"):
        lm.generate(idx, 2, eos_token_id=VOCAB)
    with pytest.raises(TypeError, match="pad_token_id must be an int"):
        lm.generate(idx, 2, pad_token_id=1.5)
    with pytest.raises(ValueError, match="caches must be a list of 2"):
        lm.prefill(idx, caches=[])


@pytest.mark.parametrize("rope", [False, True], ids=["fused-roles", "rope"])
def test_compiled_step_has_no_graph_break_or_recompile(rope):
    """fullgraph=True fails on an .item(), a bool() of a tensor or any data-dependent branch;
    the counter shows one compile for steps on both sides of chunk ends."""
    lm = make_lm("flash", rope=rope)
    idx, lengths = _prompts([5, 2], 5)
    with torch.no_grad():
        _, eager_caches = lm.prefill(idx, lengths=lengths)
        _, compiled_caches = lm.prefill(idx, lengths=lengths)
        counter = torch._dynamo.testing.CompileCounter()
        compiled = torch.compile(lm.step, backend=counter, fullgraph=True)
        for token in torch.randint(0, VOCAB, (6, 2), generator=torch.Generator().manual_seed(5)):
            expected = lm.step(token.to(DEVICE), eager_caches)
            torch.testing.assert_close(
                compiled(token.to(DEVICE), compiled_caches), expected, rtol=1e-12, atol=1e-12
            )
    assert counter.frame_count == 1
    for eager, comp in zip(eager_caches, compiled_caches):
        assert torch.equal(eager.position, comp.position)
        torch.testing.assert_close(comp.state, eager.state, rtol=1e-12, atol=1e-12)


@pytest.mark.skipif(not TRITON_OK, reason="needs CUDA or TRITON_INTERPRET=1")
def test_triton_step_is_one_launch_per_layer():
    lm = make_lm("flash", rope=False, dtype=torch.float32, backend="triton")
    idx, lengths = _prompts([3, 6], 6)
    with torch.no_grad():
        _, caches = lm.prefill(idx, lengths=lengths)
        with record_launches() as launches:
            lm.step(torch.tensor([1, 2], device=DEVICE), caches)
    assert [r.kernel_name for r in launches] == ["mixed_chunk_decode_kernel"] * len(lm.layers)
    assert all(len(r.grid) == 1 for r in launches)  # the batch folded into axis 0


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_step_captured_in_a_cuda_graph(dtype):
    """A whole FLASHLM step captured once and replayed equals eager steps, across chunk ends."""
    lm = make_lm("flash", rope=True, dtype=dtype, backend="triton")
    idx, lengths = _prompts([5, 2, 8], 8)
    tokens = torch.randint(0, VOCAB, (9, 3), generator=torch.Generator().manual_seed(6)).cuda()
    with torch.no_grad():
        _, eager_caches = lm.prefill(idx, lengths=lengths)
        _, graph_caches = lm.prefill(idx, lengths=lengths)
        expected = [lm.step(t, eager_caches) for t in tokens]
        static_token = tokens[0].clone()
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):  # warm-up (compiles the kernel) outside
            lm.step(static_token, [_clone(c) for c in graph_caches])
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            static_logits = lm.step(static_token, graph_caches)
        for t, want in zip(tokens, expected):
            static_token.copy_(t)
            graph.replay()
            torch.testing.assert_close(static_logits.float(), want.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a GPU")
def test_step_compiled_with_reduce_overhead():
    lm = make_lm("flash", rope=True, dtype=torch.float32, backend="triton")
    idx, lengths = _prompts([5, 2, 8], 8)
    tokens = torch.randint(0, VOCAB, (9, 3), generator=torch.Generator().manual_seed(7)).cuda()
    with torch.no_grad():
        _, eager_caches = lm.prefill(idx, lengths=lengths)
        _, compiled_caches = lm.prefill(idx, lengths=lengths)
        step = torch.compile(lm.step, mode="reduce-overhead", fullgraph=True)
        for t in tokens:
            want = lm.step(t, eager_caches)
            torch.testing.assert_close(step(t, compiled_caches).clone(), want, rtol=1e-4, atol=1e-4)


def _clone(cache):
    """A copy of a layer cache (warm-up steps must not advance the captured one)."""
    copy = type(cache)()
    copy.__dict__.update(
        {k: v.clone() if isinstance(v, torch.Tensor) else v for k, v in cache.__dict__.items()}
    )
    return copy


@pytest.mark.skipif(not TRITON_OK, reason="needs CUDA or TRITON_INTERPRET=1")
@pytest.mark.parametrize("from_z", [False, True], ids=["roles", "from-z"])
def test_opcheck_decode_op(from_z):
    """The custom op's schema (which inputs it mutates) and fake implementation are right."""
    problem = Problem(
        op="flash" if from_z else "mixed", linear=True, bias=True, chunk_size=4, dtype=torch.float32
    )
    cache = problem.cache_at([3, 1, 0, 2])  # sequence 0 completes its chunk
    rows = torch.arange(B, device=DEVICE)
    if from_z:
        gamma, beta = problem.gamma.float(), problem.beta.float()
        affine = torch.stack([gamma, beta])
        inputs = (
            problem.z[rows, 0],
            None,
            None,
            None,
            problem.v[rows, 0],
            problem.u[rows, 0],
            affine,
        )
    else:
        inputs = (*(r[rows, 0] for r in problem.roles), problem.v[rows, 0], None, None)
    args = (
        *inputs,
        problem.bias_decode,
        cache.k_quad,
        cache.k_lin,
        cache.v,
        cache.state,
        cache.position,
        cache.tickets,
        4,
        True,
        0.25,
        0.25,
    )
    torch.library.opcheck(
        decode_module.mixed_chunk_decode_op, args, test_utils=("test_schema", "test_faketensor")
    )


def test_decode_benchmark_runs(tmp_path):
    """bench/decode.py end to end on a tiny grid: both models measured, FLASH's cache constant
    in the context and the KV cache growing with it."""
    import json

    from bench.decode import main

    threads = torch.get_num_threads()
    try:
        assert (
            main(
                [
                    "--device",
                    "cpu",
                    "--batches",
                    "2",
                    "--contexts",
                    "16",
                    "48",
                    "--d",
                    "64",
                    "--chunk-size",
                    "16",
                    "--backend",
                    "torch",
                    "--output-dir",
                    str(tmp_path),
                ]
            )
            == 0
        )
    finally:
        torch.set_num_threads(threads)
    records = [json.loads(line) for line in (tmp_path / "decode.jsonl").read_text().splitlines()]
    assert sorted((r["impl"], r["context"]) for r in records) == [
        ("flash", 16),
        ("flash", 48),
        ("kv_cache", 16),
        ("kv_cache", 48),
    ]
    assert all(r["status"] == "ok" and r["ms_per_token"] > 0 for r in records)
    memory = {(r["impl"], r["context"]): r["cache_bytes_per_seq"] for r in records}
    assert memory["flash", 16] == memory["flash", 48]
    assert memory["kv_cache", 48] == 2 * 49 * 64 * 4 > memory["kv_cache", 16]


def test_select_batch_reorders_repeats_and_drops_sequences():
    """DecodeCache.select_batch (beam search's reorder): after selecting sequences of caches
    prefilled at different lengths, every step equals the step of caches prefilled with the
    selected prompts; a same-size selection keeps the tensors' addresses (CUDA graphs)."""
    lm = make_lm("flash")
    idx, lengths = _prompts([5, 2, 7], 7)
    nxt = torch.randint(0, VOCAB, (4, 6), generator=torch.Generator().manual_seed(4)).to(DEVICE)
    with torch.no_grad():
        _, caches = lm.prefill(idx, lengths=lengths)
        for selection in ([2, 0, 1], [1, 1, 0, 2], [2]):
            chosen = torch.tensor(selection, device=DEVICE)
            addresses = [c.k_quad.data_ptr() for c in caches]
            for cache in caches:
                cache.select_batch(chosen)
            same_size = len(selection) == idx.shape[0]
            assert ([c.k_quad.data_ptr() for c in caches] == addresses) == same_size
            idx, lengths = idx[chosen], lengths[chosen]
            _, expected = lm.prefill(idx, lengths=lengths)
            step = nxt[: len(selection), 0]
            torch.testing.assert_close(
                lm.step(step, caches), lm.step(step, expected), rtol=1e-12, atol=1e-12
            )
            idx = torch.cat([idx, step[:, None]], dim=1)
            idx[torch.arange(len(selection)), lengths] = step  # each row's next token
            lengths = lengths + 1
            nxt = nxt[:, 1:]
        with pytest.raises(ValueError, match=r"indices must lie in \[0, 1\)"):
            caches[0].select_batch([1])
