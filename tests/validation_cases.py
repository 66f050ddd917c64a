"""The table of bad inputs to mixed_chunk_attention, each with the exception and the words its
message must contain, and the call it changes: shared by tests/test_validation.py (on "torch"
and "reference") and tests/test_bad_inputs.py (on "triton")."""

import torch

from flash_kernels import mixed_chunk_attention

T, S, E = 10, 4, 6


def good():
    return dict(
        q_quad=torch.randn(2, T, S),
        k_quad=torch.randn(2, T, S),
        q_lin=torch.randn(2, T, S),
        k_lin=torch.randn(2, T, S),
        v=torch.randn(2, T, E),
    )


def call(**changes):
    args = good()
    options = {k: changes.pop(k) for k in list(changes) if k not in args}
    args.update(changes)
    return mixed_chunk_attention(
        args["q_quad"], args["k_quad"], args["q_lin"], args["k_lin"], args["v"], **options
    )


BAD_INPUTS = [
    # (changes, exception, words the message must contain)
    (dict(q_quad=torch.randn(T)), ValueError, ["q_quad", "dims"]),
    (dict(v=torch.randn(E)), ValueError, ["v", "dims"]),
    (dict(q_quad=[[1.0]]), TypeError, ["q_quad", "Tensor"]),
    (dict(k_quad=torch.randn(2, T, S + 1)), ValueError, ["k_quad", "shape"]),
    (dict(k_quad=torch.randn(3, T, S)), ValueError, ["k_quad", "shape"]),
    (dict(q_lin=torch.randn(2, T + 1, S)), ValueError, ["q_lin", "shape"]),
    (dict(k_lin=torch.randn(2, T, S, 1)), ValueError, ["k_lin", "shape"]),
    (dict(v=torch.randn(2, T + 1, E)), ValueError, ["v", "shape"]),
    (dict(v=torch.randn(1, 2, T, E)), ValueError, ["v", "shape"]),
    (dict(q_lin=None), ValueError, ["k_lin", "q_lin"]),
    (dict(k_lin=None), ValueError, ["q_lin", "k_lin"]),
    (dict(v=torch.randn(2, T, E, dtype=torch.float64)), TypeError, ["v", "dtype"]),
    (dict(k_quad=torch.randn(2, T, S).half()), TypeError, ["k_quad", "dtype"]),
    (dict(q_quad=torch.randint(0, 3, (2, T, S))), TypeError, ["q_quad", "float"]),
    (dict(v=torch.randn(2, T, E, device="meta")), ValueError, ["v", "device"]),
    (dict(chunk_size=0), ValueError, ["chunk_size", "positive"]),
    (dict(chunk_size=-4), ValueError, ["chunk_size", "positive"]),
    (dict(chunk_size=2.5), TypeError, ["chunk_size"]),
    (dict(chunk_size=True), TypeError, ["chunk_size"]),
    (dict(causal="yes"), TypeError, ["causal"]),
    (dict(quad_scale="big"), TypeError, ["quad_scale"]),
    (dict(lin_scale=float("nan")), ValueError, ["lin_scale"]),
    (dict(backend="cuda"), ValueError, ["backend"]),
    (dict(chunk_size=4, rel_bias=torch.randn(8)), ValueError, ["rel_bias", "(7,)"]),
    (dict(chunk_size=4, rel_bias=torch.randn(7, 1)), ValueError, ["rel_bias", "shape"]),
    (dict(chunk_size=None, rel_bias=torch.randn(7)), ValueError, ["rel_bias", "chunk_size=None"]),
    (dict(chunk_size=4, rel_bias=torch.arange(7)), TypeError, ["rel_bias", "floating"]),
    (dict(chunk_size=4, rel_bias=[0.0] * 7), TypeError, ["rel_bias", "Tensor"]),
    (
        dict(chunk_size=4, rel_bias=torch.randn(7, device="meta")),
        ValueError,
        ["rel_bias", "device"],
    ),
]
