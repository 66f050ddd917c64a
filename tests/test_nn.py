"""flash_kernels.nn: shapes, gradients, causality, padding, decoding == forward, backends, example.

Most tests run in float64, which takes the exact PyTorch path of the ops whatever the backend,
with the attention parameters re-drawn large (`strengthen`): at the paper's initialisation
(gamma ~ N(0, 0.02^2), zero biases) the relu^2 scores are ~1e-6 and a wrong chunk boundary or
bias offset would change the outputs by less than any sensible tolerance.
"""

import importlib.util
import inspect
import os
import subprocess
import sys

import pytest
import torch

from flash_kernels.nn import (
    FLASH,
    FLASHLM,
    GAU,
    AttentionCache,
    LearnedRelativePositionBias,
    RelativePositionBias,
    RotaryEmbedding,
    ScaleNorm,
    ScaleOffset,
    T5RelativePositionBias,
    sample_next,
    t5_bucket,
)

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLE = os.path.join(ROOT, "examples", "train_lm.py")
D, S, VOCAB, C = 16, 8, 11, 4


def strengthen(model, seed=0):
    """Redraw gamma, beta and the position biases so every attention term is O(1)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, ScaleOffset):
                mod.gamma.copy_(torch.randn(mod.gamma.shape, generator=gen))
                mod.beta.copy_(0.5 * torch.randn(mod.beta.shape, generator=gen))
            if isinstance(mod, RelativePositionBias):
                mod.weight.copy_(0.5 * torch.randn(mod.weight.shape, generator=gen))
    return model


def make_lm(
    layer="flash",
    *,
    rel_pos="learned",
    rope=False,
    linear=True,
    causal=True,
    norm="scalenorm",
    dtype=torch.float64,
    backend="torch",
    depth=2,
    seed=0,
):
    torch.manual_seed(seed)
    model = FLASHLM(
        VOCAB,
        D,
        depth,
        layer=layer,
        s=S,
        chunk_size=C,
        linear=linear,
        causal=causal,
        rel_pos=rel_pos,
        rope=rope,
        norm=norm,
        max_len=32,
        backend=backend,
    )
    return strengthen(model.to(dtype), seed)


def make_layer(layer, *, causal=True, rope=False, rel_pos="learned", dtype=torch.float64):
    torch.manual_seed(0)
    if layer == "flash":
        module = FLASH(
            D, s=S, chunk_size=C, causal=causal, rope=rope, rel_pos=rel_pos, backend="torch"
        )
    else:
        module = GAU(D, s=S, max_len=32, causal=causal, rope=rope, rel_pos=rel_pos, backend="torch")
    return strengthen(module.to(dtype))


def tokens(batch, T, seed=0):
    return torch.randint(0, VOCAB, (batch, T), generator=torch.Generator().manual_seed(seed))


# -- building blocks -------------------------------------------------------------------------


def test_scale_offset_init_and_formula():
    so = ScaleOffset(4, 4096)
    assert so.gamma.shape == so.beta.shape == (4, 4096)
    assert abs(so.gamma.std().item() - 0.02) < 1e-3 and so.beta.abs().max() == 0
    z = torch.randn(2, 3, 4096)
    roles = so(z)
    assert len(roles) == 4
    for r in range(4):
        torch.testing.assert_close(roles[r], z * so.gamma[r] + so.beta[r])


def test_scale_norm():
    norm = ScaleNorm(64)
    x = torch.randn(3, 5, 64)
    y = norm(x)
    torch.testing.assert_close(y.norm(dim=-1), torch.full((3, 5), 8.0))


@pytest.mark.parametrize("causal", [True, False])
def test_learned_bias_toeplitz_layout(causal):
    bias = LearnedRelativePositionBias(5, causal)
    assert bias.weight.shape == ((5,) if causal else (9,))
    with torch.no_grad():
        bias.weight.copy_(torch.arange(bias.weight.numel(), dtype=torch.float32))
    vec = bias.toeplitz(5)
    assert vec.shape == (9,)
    for o in range(-4, 5):  # entry o + C - 1 holds b(o), o = i - j
        expected = max(o, 0) if causal else o + 4
        assert vec[o + 4].item() == expected
    # offsets beyond the range share the last weight
    assert bias(torch.tensor([7])).item() == bias(torch.tensor([4])).item()


def test_t5_buckets():
    rel = torch.tensor([0, -1, 1, -7, -8, -127, -128, -1000, 5, 1000])  # j - i
    bi = t5_bucket(rel, bidirectional=True, num_buckets=32, max_distance=128).tolist()
    # 16 buckets per sign, exact below 8, log-spaced up to 128, then the last bucket
    assert bi == [0, 1, 17, 7, 8, 15, 15, 15, 21, 31]
    causal = t5_bucket(
        torch.tensor([0, -1, -15, -16, -20, -1000, 3]),
        bidirectional=False,
        num_buckets=32,
        max_distance=128,
    ).tolist()
    assert causal == [0, 1, 15, 16, 17, 31, 0]  # future keys (masked anyway) share bucket 0
    b = T5RelativePositionBias(causal=False)
    assert b.toeplitz(6).shape == (11,)


def test_rope_depends_on_offset_only():
    rope = RotaryEmbedding(9).double()  # odd width: last feature passes through
    q, k = torch.randn(2, 9, dtype=torch.float64)

    def dot(i, j):
        return (rope(q[None], torch.tensor([i])) * rope(k[None], torch.tensor([j]))).sum().item()

    assert dot(3, 1) == pytest.approx(dot(10, 8), rel=1e-12)
    assert dot(3, 1) != pytest.approx(dot(3, 2), rel=1e-3)
    x = torch.randn(5, 9, dtype=torch.float64)
    torch.testing.assert_close(rope(x, torch.arange(5)).norm(dim=-1), x.norm(dim=-1))


# -- layers and the LM -----------------------------------------------------------------------


@pytest.mark.parametrize("layer", ["flash", "gau"])
@pytest.mark.parametrize("T", [1, 5, 8, 13])
def test_layer_shapes(layer, T):
    module = make_layer(layer)
    x = torch.randn(2, T, D, dtype=torch.float64)
    assert module(x).shape == (2, T, D)
    lm = make_lm(layer)
    assert lm(tokens(3, T)).shape == (3, T, VOCAB)


@pytest.mark.parametrize(
    "layer,rel_pos,rope,norm",
    [
        ("flash", "learned", False, "scalenorm"),
        ("flash", "t5", True, "layernorm"),
        ("gau", "learned", True, "scalenorm"),
        ("gau", "t5", False, "layernorm"),
    ],
)
def test_gradients_reach_every_parameter(layer, rel_pos, rope, norm):
    lm = make_lm(layer, rel_pos=rel_pos, rope=rope, norm=norm, dtype=torch.float32)
    idx = tokens(2, 13)
    lm.loss(idx[:, :-1], idx[:, 1:]).backward()
    for name, p in lm.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), name
        assert p.grad.abs().sum() > 0, f"{name} has an all-zero gradient"


@pytest.mark.parametrize("layer", ["flash", "gau"])
def test_lm_is_causal(layer):
    lm = make_lm(layer, rope=True)
    idx = tokens(2, 13)
    with torch.no_grad():
        full = lm(idx)
        for t in (1, 4, 5, 8, 12):
            torch.testing.assert_close(lm(idx[:, :t]), full[:, :t], rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layer,rope", [("flash", False), ("flash", True), ("gau", False)])
def test_padding_mask(layer, rope):
    """Non-causal: padded tokens change nothing else; padded positions carry the residual."""
    module = make_layer(layer, causal=False, rope=rope, rel_pos="t5")
    T, valid = 13, 9
    x = torch.randn(2, T, D, dtype=torch.float64)
    mask = torch.zeros(2, T, dtype=torch.bool)
    mask[0, valid:] = True  # right padding
    mask[1, [2, 5, 6, 11]] = True  # holes anywhere
    noisy = torch.where(mask[..., None], 10 * torch.randn_like(x), x)
    with torch.no_grad():
        out, out_noisy = module(x, key_padding_mask=mask), module(noisy, key_padding_mask=mask)
        truncated = module(x[:1, :valid])
        unmasked = module(x)
    keep = ~mask
    torch.testing.assert_close(out[keep], out_noisy[keep], rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(out[mask], x[mask], rtol=0, atol=0)
    torch.testing.assert_close(out[0, :valid], truncated[0], rtol=1e-12, atol=1e-12)
    assert (out[keep] - unmasked[keep]).abs().max() > 1e-3  # the mask does something
    lm = make_lm(layer, causal=False, rope=rope)
    idx = tokens(2, T)
    noisy_idx = torch.where(mask, tokens(2, T, seed=1), idx)
    with torch.no_grad():
        torch.testing.assert_close(
            lm(idx, key_padding_mask=mask)[keep], lm(noisy_idx, key_padding_mask=mask)[keep]
        )


# -- incremental decoding --------------------------------------------------------------------


def decode_all(lm, idx, prefill):
    """Logits for every position: full forward of idx[:, :prefill], then one step per token."""
    T = idx.shape[1]
    with torch.no_grad():
        if prefill:
            logits, caches = lm.prefill(idx[:, :prefill])
            out = [logits]
        else:
            caches, out = lm.new_caches(), []
        out += [lm.step(idx[:, t], caches)[:, None] for t in range(prefill, T)]
    return torch.cat(out, dim=1), caches


DECODE_CASES = [
    (layer, rel_pos, rope)
    for layer in ("flash", "gau")
    for rel_pos in (None, "learned", "t5")
    for rope in (False, True)
]


@pytest.mark.slow  # 12 layers x 19 steps
@pytest.mark.parametrize("layer,rel_pos,rope", DECODE_CASES)
def test_decoding_matches_forward(layer, rel_pos, rope):
    """T = 19 with C = 4: four chunk boundaries crossed by stepping, and prefills ending before,
    on and after a boundary."""
    lm = make_lm(layer, rel_pos=rel_pos, rope=rope)
    idx = tokens(2, 19)
    with torch.no_grad():
        full = lm(idx)
    for prefill in (0, 1, 8, 10):
        logits, caches = decode_all(lm, idx, prefill)
        torch.testing.assert_close(
            logits, full, rtol=1e-10, atol=1e-10, msg=lambda m: f"prefill={prefill}: {m}"
        )
    if layer == "flash":  # the cache never holds more than one chunk
        assert all(
            c.capacity == C and (c.length == 19 % C).all() and (c.position == 19).all()
            for c in caches
        )
    else:  # GAU: one growing chunk
        assert all((c.length == 19).all() and c.state is None for c in caches)


def test_flash_quad_decoding_and_float32():
    lm = make_lm("flash", linear=False)
    idx = tokens(2, 19)
    with torch.no_grad():
        torch.testing.assert_close(decode_all(lm, idx, 6)[0], lm(idx), rtol=1e-10, atol=1e-10)
    lm32 = make_lm("flash", rope=True, dtype=torch.float32)
    with torch.no_grad():
        full = lm32(idx)
        logits, caches = decode_all(lm32, idx, 5)
    torch.testing.assert_close(logits, full, rtol=1e-5, atol=1e-5)
    assert all(c.state.dtype == torch.float32 and c.state.shape == (2, S, 2 * D) for c in caches)


def test_generate():
    lm = make_lm("flash", rope=True)
    prompt = tokens(2, 3)
    out = lm.generate(prompt, 14, temperature=0)
    assert out.shape == (2, 17) and torch.equal(out[:, :3], prompt)
    with torch.no_grad():  # greedy decoding == argmax of the full forward
        for t in range(3, 17):
            assert torch.equal(lm(out[:, :t])[:, -1].argmax(-1), out[:, t])
    gen = torch.Generator().manual_seed(0)
    sampled = lm.generate(prompt, 6, temperature=0.7, top_k=3, generator=gen)
    assert sampled.shape == (2, 9)
    logits = torch.tensor([[0.0, 5.0, 4.0, -1.0]])
    draws = {sample_next(logits, top_k=2, generator=gen).item() for _ in range(50)}
    assert draws <= {1, 2}


def test_errors():
    with pytest.raises(ValueError, match="chunk_size"):
        FLASH(D, s=S, chunk_size=None)
    with pytest.raises(ValueError, match="backend"):
        FLASH(D, s=S, backend="cuda")
    noncausal = make_layer("flash", causal=False)
    with pytest.raises(ValueError, match="causal"):
        noncausal.step(torch.zeros(1, D, dtype=torch.float64), AttentionCache())
    with pytest.raises(ValueError, match="key_padding_mask"):
        noncausal(
            torch.zeros(1, 5, D, dtype=torch.float64),
            key_padding_mask=torch.zeros(1, 4, dtype=torch.bool),
        )
    with pytest.raises(ValueError, match="causal"):
        make_lm(causal=False).generate(tokens(1, 2), 3)


# -- backends and the example ----------------------------------------------------------------


def _load_example():
    spec = importlib.util.spec_from_file_location("train_lm_example", EXAMPLE)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.mark.gpu  # uses CUDA when it is there without a module-level DEVICE
@pytest.mark.slow
def test_training_curve_torch_vs_triton():
    """The example's --check-backends, 3 steps: backend "triton" (the interpreter on a CPU, set by
    conftest) and "torch" give the same losses from one seed, fp32."""
    example = _load_example()
    args = example.parse_args(["--device", "cuda" if torch.cuda.is_available() else "cpu"])
    torch_losses, triton_losses = example.backend_agreement(args, 3)
    assert len(torch_losses) == 3
    assert torch_losses[-1] < torch_losses[0]
    for a, b in zip(torch_losses, triton_losses):
        assert abs(a - b) <= 1e-4 * abs(a), (torch_losses, triton_losses)


@pytest.mark.slow
def test_example_runs(tmp_path):
    """The example's main, 2 steps of the tiny FLASH model and of the Transformer++ baseline:
    the loss before training is printed, the baseline's parameter count is within 2% of
    FLASH's, and the only thing written is the plot under ./examples_out (git-ignored)."""
    import re

    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""))
    command = [
        sys.executable,
        EXAMPLE,
        "--tiny",
        "--steps",
        "2",
        "--device",
        "cpu",
        "--backend",
        "torch",
        "--compare",
    ]
    result = subprocess.run(
        command, capture_output=True, text=True, timeout=120, env=env, cwd=tmp_path
    )
    output = result.stdout + result.stderr
    assert result.returncode == 0, result.stderr[-2000:]
    assert "FLASH step     0 | val 5." in output and "Transformer++ step     0 | val" in output
    assert "FLASH step     2" in output and "Transformer++ step     2" in output
    assert "tok/s" in result.stdout and "the marker '|>>>'" in result.stdout
    flash_params = int(re.search(r"FLASHLM: .*?([\d,]+) parameters", output)[1].replace(",", ""))
    base_params = int(
        re.search(r"Transformer\+\+: .*?([\d,]+) parameters", output)[1].replace(",", "")
    )
    assert abs(base_params - flash_params) <= 0.02 * flash_params, (flash_params, base_params)
    help_text = subprocess.run(
        [sys.executable, EXAMPLE, "--help"],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
        cwd=tmp_path,
    ).stdout
    assert "(default: None)" not in help_text and "training steps (default: 300)" in help_text
    assert help_text.count("(default:") == 24, help_text  # all but --help and the 5 flags
    written = sorted(os.listdir(tmp_path))
    if importlib.util.find_spec("matplotlib") is None:
        assert written == [], written
    else:
        assert written == ["examples_out"] and os.listdir(tmp_path / "examples_out") == [
            "train_lm_compare.png"
        ]


@pytest.mark.parametrize("rope", [False, True], ids=["fused", "rope"])
def test_layer_on_triton_with_unequal_scales(rope):
    """A FLASH layer with quad_scale != lin_scale on the Triton backend (float32; the interpreter
    without a GPU) against the same layer on "torch": output and every parameter's gradient.
    Without RoPE the layer calls flash_attention (roles formed in the kernels), with RoPE
    mixed_chunk_attention. The scales swapped change the output far beyond the tolerance."""
    device = "cuda" if torch.cuda.is_available() else "cpu"
    x = torch.randn(2, 13, D, generator=torch.Generator().manual_seed(1)).to(device)

    def run(backend, quad_scale, lin_scale):
        torch.manual_seed(0)
        layer = FLASH(
            D,
            s=S,
            chunk_size=C,
            rope=rope,
            rel_pos="t5",
            quad_scale=quad_scale,
            lin_scale=lin_scale,
            backend=backend,
        )
        layer = strengthen(layer).to(device)
        out = layer(x)
        grads = torch.autograd.grad(out.square().sum(), list(layer.parameters()))
        return out, dict(zip([name for name, _ in layer.named_parameters()], grads))

    out, grads = run("triton", 0.4, 0.05)
    expected, expected_grads = run("torch", 0.4, 0.05)
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    for name, grad in grads.items():
        torch.testing.assert_close(
            grad, expected_grads[name], rtol=1e-4, atol=1e-4, msg=lambda m: f"{name}: {m}"
        )
    swapped, _ = run("torch", 0.05, 0.4)
    assert (swapped - expected).abs().max() > 100 * 1e-5 * (1 + expected.abs().max())


@pytest.mark.parametrize("layer", ["flash", "gau"])
def test_init_kwargs_rebuild_the_model(layer):
    """FLASHLM.init_kwargs (what wrappers such as flash_kernels.hf store as a configuration):
    every constructor argument by name; FLASHLM(**init_kwargs) with the weights loaded gives
    the same logits."""
    lm = make_lm(layer, rope=True, rel_pos="t5")
    assert list(lm.init_kwargs) == list(inspect.signature(FLASHLM).parameters)
    assert lm.init_kwargs["layer"] == layer and lm.init_kwargs["rel_pos"] == "t5"
    rebuilt = FLASHLM(**lm.init_kwargs).to(torch.float64)
    rebuilt.load_state_dict(lm.state_dict())
    idx = torch.randint(0, VOCAB, (2, 9), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert torch.equal(rebuilt(idx), lm(idx))
