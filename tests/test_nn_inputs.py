"""The layers' and the language model's argument checks: nonsense options, sampling options,
inputs of the wrong kind and token ids out of range get a clear error naming the argument."""

import numpy as np
import pytest
import torch
from helpers import check_raises

from flash_kernels.nn import FLASH, FLASHLM, GAU, sample_next

BAD_LAYERS = [
    # (make, exception, words)
    (lambda: FLASH(16, s=0), ValueError, ["s must be positive", "0"]),
    (lambda: FLASH(16, s=-2), ValueError, ["s must be positive"]),
    (lambda: FLASH(16, s=4.0), TypeError, ["s must be an int", "float"]),
    (lambda: FLASH(0, s=4), ValueError, ["d must be positive"]),
    (lambda: GAU(-16, s=4), ValueError, ["d must be positive"]),
    (lambda: FLASH(16, s=4, expansion=0), ValueError, ["expansion must be positive"]),
    (lambda: GAU(16, s=4, expansion=1.5), TypeError, ["expansion must be an int"]),
    (lambda: FLASH(16, s=4, chunk_size=0), ValueError, ["chunk_size must be positive"]),
    (lambda: FLASH(16, s=4, chunk_size=2.5), TypeError, ["chunk_size must be an int"]),
    (lambda: FLASH(16, s=4, chunk_size=True), TypeError, ["chunk_size must be an int", "bool"]),
    (lambda: GAU(16, s=4, max_len=0), ValueError, ["max_len must be positive"]),
    (lambda: FLASH(16, s=4, causal="yes"), TypeError, ["causal must be a bool", "str"]),
    (lambda: FLASH(16, s=4, linear=1), TypeError, ["linear must be a bool", "int"]),
    (lambda: GAU(16, s=4, rope=None), TypeError, ["rope must be a bool"]),
    (lambda: FLASH(16, s=4, quad_scale=float("nan")), ValueError, ["quad_scale", "finite"]),
    (lambda: FLASH(16, s=4, lin_scale="1/C"), TypeError, ["lin_scale"]),
    (lambda: FLASHLM(0, 16, 1, s=4), ValueError, ["vocab_size must be positive"]),
    (lambda: FLASHLM(10, 16, -1, s=4), ValueError, ["depth must be at least 0"]),
    (lambda: FLASHLM(10, 0, 0, s=4), ValueError, ["d must be positive"]),
    (lambda: FLASHLM(10.0, 16, 1, s=4), TypeError, ["vocab_size must be an int", "float"]),
]


@pytest.mark.parametrize(
    "make,exception,words", BAD_LAYERS, ids=[str(i) for i in range(len(BAD_LAYERS))]
)
def test_nonsense_layer_options_are_refused(make, exception, words):
    check_raises(make, exception, words)


def test_sensible_layer_options_still_build():
    assert FLASH(16, s=4, chunk_size=np.int64(4), causal=np.bool_(False)).chunk_size == 4
    assert FLASHLM(10, 16, 0, s=4).backend == "auto"  # no layers: embedding and head


def tiny_lm():
    torch.manual_seed(0)
    return FLASHLM(11, 16, 1, s=4, chunk_size=4, backend="torch")


BAD_SAMPLING = [
    (dict(temperature=-1.0), ValueError, ["temperature", ">= 0", "-1.0"]),
    (dict(temperature=float("nan")), ValueError, ["temperature"]),
    (dict(temperature=float("inf")), ValueError, ["temperature"]),
    (dict(temperature="warm"), TypeError, ["temperature", "str"]),
    (dict(top_k=0), ValueError, ["top_k must be positive", "0"]),
    (dict(top_k=-3), ValueError, ["top_k must be positive"]),
    (dict(top_k=2.5), TypeError, ["top_k must be an int", "float"]),
    (dict(top_k=True), TypeError, ["top_k must be an int", "bool"]),
]


@pytest.mark.parametrize(
    "options,exception,words",
    BAD_SAMPLING,
    ids=[",".join(f"{k}={v!r}" for k, v in o.items()) for o, _, _ in BAD_SAMPLING],
)
def test_bad_sampling_options_are_refused(options, exception, words):
    lm = tiny_lm()
    prompt = torch.zeros(1, 2, dtype=torch.long)
    check_raises(lambda: lm.generate(prompt, 3, **options), exception, words)
    check_raises(lambda: lm.generate(prompt, 0, **options), exception, words)
    check_raises(lambda: sample_next(torch.zeros(1, 11), **options), exception, words)


@pytest.mark.parametrize(
    "max_new_tokens,exception,words",
    [
        (-1, ValueError, ["max_new_tokens must be at least 0", "-1"]),
        (1.5, TypeError, ["max_new_tokens must be an int", "float"]),
        (None, TypeError, ["max_new_tokens must be an int", "NoneType"]),
    ],
)
def test_bad_max_new_tokens_is_refused(max_new_tokens, exception, words):
    lm = tiny_lm()
    check_raises(
        lambda: lm.generate(torch.zeros(1, 2, dtype=torch.long), max_new_tokens), exception, words
    )


def test_sensible_sampling_options_work():
    lm = tiny_lm()
    prompt = torch.zeros(2, 3, dtype=torch.long)
    assert torch.equal(lm.generate(prompt, 0), prompt)
    out = lm.generate(prompt, np.int64(2), temperature=0.5, top_k=np.int64(1))
    assert out.shape == (2, 5)
    with torch.no_grad():  # top_k=1 is greedy whatever the temperature
        assert torch.equal(out, lm.generate(prompt, 2, temperature=0))


@pytest.mark.parametrize(
    "make", [lambda: FLASH(16, s=4, chunk_size=4), lambda: GAU(16, s=4)], ids=["FLASH", "GAU"]
)
def test_layer_inputs_of_the_wrong_kind_are_named(make):
    layer = make()
    x = torch.randn(2, 5, 16)
    check_raises(lambda: layer(x.numpy()), TypeError, ["x must be a torch.Tensor", "numpy.ndarray"])
    check_raises(lambda: layer(x.double()), TypeError, ["x has dtype torch.float64", "float32"])
    check_raises(lambda: layer(x.half()), TypeError, ["x has dtype torch.float16"])
    check_raises(lambda: layer(x.to("meta")), ValueError, ["x is on meta"])
    check_raises(lambda: layer(x[..., :8]), ValueError, ["x must have shape (batch, T, 16)"])
    cache = layer.new_cache()
    check_raises(lambda: layer.step(x[:, 0].double(), cache), TypeError, ["x has dtype"])
    check_raises(
        lambda: layer.step(x[:, 0].numpy(), cache), TypeError, ["x must be a torch.Tensor"]
    )
    with torch.autocast("cpu", dtype=torch.bfloat16):  # autocast casts the matmul inputs
        assert layer(x.bfloat16()).shape == x.shape


def test_token_ids_out_of_range_are_named():
    lm = tiny_lm()
    idx = torch.randint(0, 11, (2, 5))
    for bad in (11, 1000, -1):
        wrong = idx.clone()
        wrong[1, 3] = bad
        check_raises(lambda: lm(wrong), ValueError, ["idx", str(bad), "[0, 11)"])
        check_raises(lambda: lm.generate(wrong, 2), ValueError, ["idx", str(bad)])
        check_raises(lambda: lm.loss(wrong, idx), ValueError, ["idx", str(bad)])
    _, caches = lm.prefill(idx)
    check_raises(lambda: lm.step(torch.tensor([3, 11]), caches), ValueError, ["token", "11"])
    check_raises(lambda: lm(idx.float()), TypeError, ["idx", "int64", "torch.float32"])
    check_raises(
        lambda: lm(idx.numpy()), TypeError, ["idx must be a torch.Tensor", "numpy.ndarray"]
    )
