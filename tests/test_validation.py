"""Every bad input to mixed_chunk_attention gets a ValueError/TypeError that names the argument
(the table: tests/validation_cases.py)."""

import pytest
import torch
from validation_cases import BAD_INPUTS, call, good

from flash_kernels import mixed_chunk_attention


@pytest.mark.parametrize(
    "changes,exception,words",
    BAD_INPUTS,
    ids=[",".join(c) + "-" + str(i) for i, (c, _, _) in enumerate(BAD_INPUTS)],
)
@pytest.mark.parametrize("backend", ["torch", "reference"])
def test_bad_input_raises_a_clear_error(changes, exception, words, backend):
    changes = dict(changes)
    changes.setdefault("backend", backend)
    with pytest.raises(exception) as info:
        call(**changes)
    for word in words:
        assert word in str(info.value), f"message {str(info.value)!r} does not mention {word!r}"


def test_rel_bias_may_be_float32_with_half_inputs():
    args = {k: v.half() for k, v in good().items()}
    out = mixed_chunk_attention(
        *args.values(), chunk_size=4, rel_bias=torch.randn(7), backend="torch"
    )
    assert out.dtype == torch.float16


def test_triton_backend_says_float64_routes_to_torch():
    args = {k: v.double() for k, v in good().items()}
    out = mixed_chunk_attention(*args.values(), chunk_size=4, backend="triton")
    ref = mixed_chunk_attention(*args.values(), chunk_size=4, backend="torch")
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
