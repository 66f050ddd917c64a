"""The layers with packed documents, prefill through the op's final state, and padding.

- A packed batch (cu_seqlens) gives each document's output of a run on that document alone
  (RoPE positions restart per document), for FLASH and GAU layers and FLASHLM; and the
  positions the layers pass to RoPE are checked directly (outputs cannot see them: RoPE
  depends on distances only), as is the refusal of `start=` with cu_seqlens.
- Prefill is one pass of the op (output_final_state), and a prompt prefilled in pieces gives
  the logits and the caches of one prefill; decoding continues from either identically.
- Padded tokens are removed by selection: whatever they hold (inf included), real tokens'
  outputs equal those of a run where the padded inputs are zero.
"""

import pytest
import torch

from flash_kernels.nn import FLASH, FLASHLM, GAU
from flash_kernels.nn.position import RotaryEmbedding

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _layer(kind, rope, backend="torch", dtype=torch.float64, causal=True):
    torch.manual_seed(0)
    if kind == "flash":
        layer = FLASH(16, s=8, chunk_size=4, rope=rope, causal=causal, backend=backend)
    else:
        layer = GAU(16, s=8, max_len=32, rope=rope, causal=causal, backend=backend)
    return layer.to(DEVICE if backend == "triton" else "cpu", dtype)


@pytest.mark.slow
@pytest.mark.parametrize("rope", [False, True], ids=["no-rope", "rope"])
@pytest.mark.parametrize("kind", ["flash", "gau"])
@pytest.mark.parametrize(
    "backend,dtype", [("torch", torch.float64), ("triton", torch.float32)], ids=["torch", "triton"]
)
def test_packed_layer_equals_each_document_alone(kind, rope, backend, dtype):
    layer = _layer(kind, rope, backend, dtype)
    lengths = [5, 0, 9, 1, 6]
    cu = torch.tensor([0] + lengths).cumsum(0)
    x = torch.randn(
        2, sum(lengths), 16, dtype=dtype, device=layer.to_out.weight.device, requires_grad=True
    )
    packed = layer(x, cu_seqlens=cu)
    bounds = cu.tolist()
    alone = torch.cat([layer(x[:, a:b]) for a, b in zip(bounds[:-1], bounds[1:])], dim=1)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(packed, alone, rtol=tol, atol=tol)
    weights = torch.randn_like(packed)
    (grad_packed,) = torch.autograd.grad((packed * weights).sum(), x)
    (grad_alone,) = torch.autograd.grad((alone * weights).sum(), x)
    torch.testing.assert_close(grad_packed, grad_alone, rtol=tol, atol=tol)


def record_rope_positions(model):
    """A list that receives the positions every RoPE module of `model` is called with (a
    forward pre-hook: what the layer actually passes, not what a helper would compute)."""
    seen = []
    for module in model.modules():
        if isinstance(module, RotaryEmbedding):
            module.register_forward_pre_hook(
                lambda module, args: seen.append(args[1].detach().cpu().tolist())
            )
    return seen


def positions_restarting_at(lengths):
    """Every token's position inside its document, written out document by document."""
    return [position for length in lengths for position in range(length)]


ROLES_PER_LAYER = {"flash": 4, "gau": 2}  # every role is rotated


@pytest.mark.parametrize("kind", ["flash", "gau"])
def test_rope_positions_restart_at_each_document(kind):
    """RoPE depends on distances only, so output comparisons cannot see absolute positions:
    check the positions the layer passes to its RoPE module for a packed batch."""
    layer = _layer(kind, rope=True)
    seen = record_rope_positions(layer)
    lengths = [5, 0, 9, 1, 6]
    cu = torch.tensor([0] + lengths).cumsum(0)
    layer(torch.randn(2, sum(lengths), 16, dtype=torch.float64), cu_seqlens=cu)
    assert seen == [positions_restarting_at(lengths)] * ROLES_PER_LAYER[kind]


def test_rope_positions_of_a_packed_lm_restart_in_every_layer():
    torch.manual_seed(1)
    lm = FLASHLM(50, d=16, depth=2, s=8, chunk_size=4, rope=True, backend="torch").double()
    seen = record_rope_positions(lm)
    lengths = [7, 3, 10]
    lm(torch.randint(0, 50, (1, sum(lengths))), cu_seqlens=torch.tensor([0] + lengths).cumsum(0))
    assert seen == [positions_restarting_at(lengths)] * (2 * ROLES_PER_LAYER["flash"])


@pytest.mark.parametrize("start", [None, 0, 6])
def test_rope_positions_without_packing_count_from_start(start):
    layer = _layer("flash", rope=True)
    seen = record_rope_positions(layer)
    layer(torch.randn(2, 9, 16, dtype=torch.float64), start=start)
    first = start or 0
    assert seen == [list(range(first, first + 9))] * ROLES_PER_LAYER["flash"]


@pytest.mark.parametrize("start", [0, 3])
def test_start_with_packed_documents_is_an_error(start):
    """Packed documents' positions restart at each document: a start would be ignored."""
    lengths = [4, 5]
    cu = torch.tensor([0] + lengths).cumsum(0)
    layer = _layer("flash", rope=True)
    with pytest.raises(ValueError, match="start does not go with cu_seqlens"):
        layer(torch.randn(1, 9, 16, dtype=torch.float64), cu_seqlens=cu, start=start)
    lm = FLASHLM(50, d=16, depth=1, s=8, chunk_size=4, backend="torch").double()
    with pytest.raises(ValueError, match="start does not go with cu_seqlens"):
        lm(torch.randint(0, 50, (1, 9)), cu_seqlens=cu, start=start)


def test_packed_lm_loss_equals_the_documents_losses():
    torch.manual_seed(1)
    lm = FLASHLM(50, d=16, depth=2, s=8, chunk_size=4, rope=True, backend="torch").double()
    lengths = [7, 3, 10]
    cu = torch.tensor([0] + lengths).cumsum(0)
    idx = torch.randint(0, 50, (1, sum(lengths)))
    logits = lm(idx, cu_seqlens=cu)
    bounds = cu.tolist()
    alone = torch.cat([lm(idx[:, a:b]) for a, b in zip(bounds[:-1], bounds[1:])], dim=1)
    torch.testing.assert_close(logits, alone, rtol=1e-10, atol=1e-10)


@pytest.mark.slow
@pytest.mark.parametrize("kind,rope", [("flash", False), ("flash", True), ("gau", True)])
@pytest.mark.parametrize(
    "backend,dtype", [("torch", torch.float64), ("triton", torch.float32)], ids=["torch", "triton"]
)
def test_prefill_in_pieces_equals_prefill_in_one(kind, rope, backend, dtype):
    torch.manual_seed(2)
    common = dict(d=16, depth=2, s=8, rope=rope, backend=backend)
    lm = (
        FLASHLM(40, chunk_size=4, **common)
        if kind == "flash"
        else FLASHLM(40, layer="gau", max_len=32, **common)
    )
    lm = lm.to(DEVICE if backend == "triton" else "cpu", dtype)
    idx = torch.randint(0, 40, (2, 15), device=lm.embed.weight.device)
    whole, whole_caches = lm.prefill(idx)
    caches, pieces = None, []
    for a, b in ((0, 3), (3, 8), (8, 9), (9, 15)):  # cuts inside and at chunk ends
        logits, caches = lm.prefill(idx[:, a:b], caches)
        pieces.append(logits)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(torch.cat(pieces, dim=1), whole, rtol=tol, atol=tol)
    full = lm(torch.cat([idx, idx[:, :3]], dim=1))
    with torch.no_grad():
        for token in idx[:, :3].unbind(1):  # decoding continues from either
            step_whole = lm.step(token, whole_caches)
            step_pieces = lm.step(token, caches)
            torch.testing.assert_close(step_pieces, step_whole, rtol=tol, atol=tol)
    torch.testing.assert_close(step_whole, full[:, -1], rtol=tol, atol=tol)


@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("kind", ["flash", "gau"])
def test_padded_tokens_holding_inf_do_not_reach_real_tokens(kind, backend):
    dtype = torch.float32
    layer = _layer(kind, False, backend, dtype, causal=False)
    device = layer.to_out.weight.device
    x = torch.randn(2, 11, 16, dtype=dtype, device=device)
    mask = torch.zeros(2, 11, dtype=torch.bool, device=device)
    mask[0, 7:] = True
    mask[1, :2] = True
    clean = x.masked_fill(mask[..., None], 0.0)
    poisoned = x.masked_fill(mask[..., None], float("inf"))
    expected = layer(clean, key_padding_mask=mask)
    got = layer(poisoned, key_padding_mask=mask)
    real = ~mask
    assert torch.isfinite(got[real]).all()
    torch.testing.assert_close(got[real], expected[real], rtol=1e-6, atol=1e-6)


@pytest.mark.slow
def test_example_trains_on_packed_documents():
    """examples/train_lm.py --pack: one source file per document; the loss goes down."""
    import os
    import re
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [
            sys.executable,
            os.path.join(root, "examples", "train_lm.py"),
            "--tiny",
            "--pack",
            "--steps",
            "20",
            "--eval-every",
            "20",
            "--sample",
            "0",
            "--threads",
            "1",
            "--backend",
            "torch",
        ],
        capture_output=True,
        text=True,
        timeout=300,
        env=env,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert "packed as documents" in result.stdout
    losses = [float(x) for x in re.findall(r"val (\d+\.\d+)", result.stdout)]
    assert len(losses) == 2 and losses[1] < losses[0] - 0.3, result.stdout
