"""Non-finite values stay with the tokens that attend them (issue: masked positions removed by
selection, not by multiplying by 0).

A NaN or inf is planted in one input at token t. Every output row and every gradient row that
cannot depend on that input at t (by the attention's structure, below) must be finite and equal
to a run where the value is 0 instead; the output rows that do attend it must be non-finite.
Structure, for chunks c(i) = i // C:
    query i attends key j (quadratic part)  iff  c(i) == c(j) and (j <= i if causal)
    query i attends key j (linear part)     iff  c(j) < c(i) (causal) or always (non-causal)
A query-side input at t (q_quad, q_lin) reaches out[t], its own query gradients and the key/value
gradients of the tokens t attends; a key-side input (k_quad, k_lin, v) reaches the outputs and
query gradients of the tokens that attend t, and its own key/value gradients.
"""

import pytest
import torch
from helpers import nan_filled_buffers, tile_override

from flash_kernels import flash_attention, mixed_chunk_attention

pytestmark = pytest.mark.slow  # 48 planted NaN/inf cases, each run twice

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
T, C, S, E, TOKEN = 20, 8, 5, 6, 11
QUERY_SIDE = {"q_quad": "quad", "q_lin": "lin"}
KEY_SIDE = {"k_quad": "quad", "k_lin": "lin", "v": "both"}


def attends(i, j, part, causal, linear):
    same = i // C == j // C
    quad = same and (j <= i or not causal)
    lin = linear and ((j // C < i // C) if causal else True)
    return {"quad": quad, "lin": lin, "both": quad or lin}[part]


def dependent_rows(where, causal, linear):
    """{tensor name: rows that may depend on the planted value} (all others must not)."""
    everything = set(range(T))
    if where == "rel_bias":  # an entry no pair uses: nothing depends on it
        return {"rel_bias": set()}
    rows = {}
    if where in QUERY_SIDE or where == "z":
        part = QUERY_SIDE.get(where, "both")
        attended = {j for j in range(T) if attends(TOKEN, j, part, causal, linear)}
        rows.update(
            out={TOKEN}, q_quad={TOKEN}, q_lin={TOKEN}, k_quad=attended, k_lin=attended, v=attended
        )
    if where in KEY_SIDE or where == "z":
        part = KEY_SIDE.get(where, "both")
        attending = {i for i in range(T) if attends(i, TOKEN, part, causal, linear)}
        for name, extra in (
            ("out", attending),
            ("q_quad", attending),
            ("q_lin", attending),
            ("k_quad", {TOKEN}),
            ("k_lin", {TOKEN}),
            ("v", {TOKEN}),
        ):
            rows[name] = rows.get(name, set()) | extra
    rows["rel_bias"] = everything  # the bias gradient sums every pair's score gradient
    # flash_attention's z gives all four roles: its gradient rows gather theirs
    rows["z"] = set().union(
        *(rows.get(name, set()) for name in ("q_quad", "k_quad", "q_lin", "k_lin"))
    )
    return rows


def run(op, inputs, causal, backend):
    leaves = {n: x.clone().requires_grad_() if x is not None else None for n, x in inputs.items()}
    options = dict(chunk_size=C, causal=causal, backend=backend)
    if op == "mixed_chunk_attention":
        out = mixed_chunk_attention(
            leaves["q_quad"],
            leaves["k_quad"],
            leaves["q_lin"],
            leaves["k_lin"],
            leaves["v"],
            rel_bias=leaves["rel_bias"],
            **options,
        )
    else:
        out = flash_attention(
            leaves["z"],
            leaves["gamma"],
            leaves["beta"],
            leaves["v"],
            rel_bias=leaves["rel_bias"],
            **options,
        )
    weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(out)
    names = [n for n, x in leaves.items() if x is not None]
    grads = torch.autograd.grad((out * weights).sum(), [leaves[n] for n in names])
    return {"out": out.detach(), **dict(zip(names, grads))}


def _inputs(op, linear):
    gen = torch.Generator().manual_seed(0)

    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(DEVICE)

    if op == "mixed_chunk_attention":
        inputs = dict(
            q_quad=rand(1, T, S),
            k_quad=rand(1, T, S),
            q_lin=rand(1, T, S) if linear else None,
            k_lin=rand(1, T, S) if linear else None,
            v=rand(1, T, E),
        )
    else:
        roles = 4 if linear else 2
        inputs = dict(
            z=rand(1, T, S),
            gamma=1 + 0.3 * rand(roles, S),
            beta=0.3 * rand(roles, S),
            v=rand(1, T, E),
        )
    inputs["rel_bias"] = 0.5 * rand(2 * C - 1)
    return inputs


def _cases():
    for op, names in (
        ("mixed_chunk_attention", ("q_quad", "k_quad", "q_lin", "k_lin", "v", "rel_bias")),
        ("flash_attention", ("z", "v")),
    ):
        for where in names:
            for causal in (True, False):
                if where == "rel_bias" and not causal:
                    continue  # non-causal pairs use every offset
                for backend in ("reference", "torch", "triton"):
                    yield pytest.param(
                        op,
                        where,
                        causal,
                        backend,
                        id=f"{op.split('_')[0]}-{where}-{'causal' if causal else 'full'}-{backend}",
                    )


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, inside the Triton interpreter
@pytest.mark.parametrize("op,where,causal,backend", list(_cases()))
def test_nonfinite_value_reaches_only_the_tokens_that_attend_it(op, where, causal, backend):
    linear = True
    inputs = _inputs(op, linear)
    clean, bad = dict(inputs), dict(inputs)
    if where == "rel_bias":
        clean["rel_bias"] = inputs["rel_bias"].clone()
        clean["rel_bias"][0] = 0.0  # offset -(C - 1): a key after its query
        bad["rel_bias"] = clean["rel_bias"].clone()
        bad["rel_bias"][0] = float("nan")
    else:
        clean[where] = inputs[where].clone()
        clean[where][0, TOKEN, 1] = 0.0
        bad[where] = clean[where].clone()
        bad[where][0, TOKEN, 1] = float("nan") if where != "v" else float("inf")
    with nan_filled_buffers():
        expected = run(op, clean, causal, backend)
        got = run(op, bad, causal, backend)
    dependent = dependent_rows(where, causal, linear)
    for name, value in got.items():
        if name in ("gamma", "beta"):  # sums over every token
            continue
        rows = dependent.get(name, set())
        if name == "rel_bias":
            if rows:
                continue
            keep, reference = "all", expected[name]
        else:
            keep = [i for i in range(T) if i not in rows]
            value, reference = value[0, keep], expected[name][0, keep]
        assert torch.isfinite(value).all(), (
            f"{name}: rows {keep} cannot see the non-finite {where}[{TOKEN}] but are not all finite"
        )
        torch.testing.assert_close(value, reference, rtol=1e-5, atol=1e-5, msg=f"{name} changed")
    if where != "rel_bias":
        attending = dependent["out"]
        assert not torch.isfinite(got["out"][0, sorted(attending)]).all(dim=-1).any(), (
            f"an output row attending the non-finite {where}[{TOKEN}] stayed finite"
        )


@pytest.mark.filterwarnings("ignore::RuntimeWarning")
@pytest.mark.parametrize("where", ["q_quad", "k_quad", "v"])
def test_several_blocks_per_chunk(where):
    """Chunks of 40 tokens in 16-row blocks: the bad token sits inside a later block's diagonal."""
    global T, C, TOKEN
    saved = T, C, TOKEN
    T, C, TOKEN = 50, 40, 21
    try:
        with tile_override(block=16):
            test_nonfinite_value_reaches_only_the_tokens_that_attend_it(
                "mixed_chunk_attention", where, True, "triton"
            )
    finally:
        T, C, TOKEN = saved


@pytest.mark.parametrize("packed", [False, True], ids=["dense", "packed"])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
def test_torch_path_skips_its_guards_only_when_they_select_nothing(monkeypatch, causal, packed):
    """The torch path drops its non-finite guards when the inputs are finite (on the CPU): with
    finite inputs the guarded computation must give the same output and gradients."""
    import flash_kernels.backends.torch.chunked as torch_chunked

    inputs = _inputs("mixed_chunk_attention", linear=True)
    if packed:  # documents of 7, 9 and 4 tokens: chunks restart inside the row
        cu_seqlens = torch.tensor([0, 7, 16, T], dtype=torch.int32, device=DEVICE)

    def gradients(guarded):
        monkeypatch.setattr(torch_chunked, "needs_nonfinite_guards", lambda *tensors: guarded)
        leaves = {n: x.clone().requires_grad_() for n, x in inputs.items()}
        extra = dict(cu_seqlens=cu_seqlens, max_seqlen=9) if packed else {}
        out = mixed_chunk_attention(
            *(leaves[n] for n in ("q_quad", "k_quad", "q_lin", "k_lin", "v")),
            rel_bias=leaves["rel_bias"],
            chunk_size=C,
            causal=causal,
            backend="torch",
            **extra,
        )
        weights = torch.randn(out.shape, generator=torch.Generator().manual_seed(5)).to(out)
        return [out.detach(), *torch.autograd.grad((out * weights).sum(), list(leaves.values()))]

    for name, fast, guarded in zip(["out", *inputs], gradients(False), gradients(True)):
        torch.testing.assert_close(fast, guarded, rtol=1e-6, atol=1e-6, msg=f"{name} differs")
