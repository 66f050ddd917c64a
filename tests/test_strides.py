"""Non-contiguous inputs: views with unit feature stride go to the kernels without a copy (they
take batch and token strides); other layouts are copied. Results must not depend on layout.

Also the int64 offsets: views whose batch stride exceeds 2^31 elements, or is an int32 whose
product with the batch index is not, carved from a large *virtual* allocation of which only the
touched pages become resident (no 8 GB on the CPU).
"""

import os
import subprocess
import sys

import interpreter_shim  # noqa: F401  (the subprocess below imports this module, not conftest)
import pytest
import torch

from flash_kernels import flash_attention, mixed_chunk_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
B, T, S, E, C = 2, 21, 5, 6, 8


def _grads(out, inputs, seed=3):
    grad_out = torch.randn(out.shape, generator=torch.Generator().manual_seed(seed)).to(out)
    return torch.autograd.grad(out, inputs, grad_out)


def _mixed(q_quad, k_quad, q_lin, k_lin, v, rel_bias):
    return mixed_chunk_attention(
        q_quad, k_quad, q_lin, k_lin, v, rel_bias=rel_bias, chunk_size=C, backend="triton"
    )


def _fused_projection():
    """q_quad, k_quad, q_lin, k_lin and v as column slices of one (B, T, 4S + E + 3) tensor."""
    torch.manual_seed(0)
    proj = torch.randn(B, T, 4 * S + E + 3, device=DEVICE)
    return [proj[..., i * S : (i + 1) * S] for i in range(4)] + [proj[..., 4 * S : 4 * S + E]]


@pytest.mark.parametrize("layout", ["split", "transposed batch", "non-unit feature stride"])
def test_layouts_give_the_same_result(layout):
    views = _fused_projection()
    if layout == "transposed batch":  # (T, B, W) memory, viewed as (B, T, W)
        views = [x.transpose(0, 1).contiguous().transpose(0, 1) for x in views]
    elif layout == "non-unit feature stride":  # last dim strided: copied before launch
        views = [torch.cat([x, x], dim=-1)[..., ::2] for x in views]
    assert not any(x.is_contiguous() for x in views)
    rel_bias = torch.randn(2 * C - 1, device=DEVICE)
    leaves = [x.detach().requires_grad_() for x in views]
    copies = [x.detach().contiguous().requires_grad_() for x in views]
    out = _mixed(*leaves, rel_bias)
    ref = _mixed(*copies, rel_bias)
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    for got, want in zip(_grads(out, leaves), _grads(ref, copies)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_flash_attention_split_projection():
    torch.manual_seed(1)
    proj = torch.randn(B, T, S + 2 * E, device=DEVICE)
    z, v, u = proj[..., :S], proj[..., S : S + E], proj[..., S + E :]
    gamma, beta = torch.randn(4, S, device=DEVICE), torch.randn(4, S, device=DEVICE)
    leaves = [x.detach().requires_grad_() for x in (z, v, u)]
    copies = [x.detach().contiguous().requires_grad_() for x in (z, v, u)]
    out = flash_attention(
        leaves[0], gamma, beta, leaves[1], u=leaves[2], chunk_size=C, backend="triton"
    )
    ref = flash_attention(
        copies[0], gamma, beta, copies[1], u=copies[2], chunk_size=C, backend="triton"
    )
    torch.testing.assert_close(out, ref, rtol=0, atol=0)
    for got, want in zip(_grads(out, leaves), _grads(ref, copies)):
        torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_batch_stride_beyond_int32():
    """Every input shares one storage of 2^31 + 4096 floats (on the CPU 8 GB virtual of which
    a few pages become resident; on a GPU 8 GB real): batch 1 starts 2^31 elements after
    batch 0, so its addresses need int64."""
    stride_b = 2**31
    storage = torch.empty(stride_b + 4096, device=DEVICE)
    torch.manual_seed(2)
    widths = [S, S, S, S, E]
    offsets = [0, 8 * S, 16 * S, 24 * S, 32 * S]
    views = []
    for width, offset in zip(widths, offsets):
        view = storage.as_strided((B, T, width), (stride_b, 64, 1), storage_offset=offset)
        view.copy_(torch.randn(B, T, width, device=DEVICE))
        views.append(view)
    big = _mixed(*views, None)
    small = _mixed(*[x.contiguous() for x in views], None)
    torch.testing.assert_close(big, small, rtol=0, atol=0)


def _views_with_batch_stride(stride_b, batch, seed):
    """q_quad, k_quad, q_lin, k_lin (S features), v and u (E) as (batch, T, width) views of one
    storage, batch entry b starting b * stride_b elements in, with random entries."""
    storage = torch.empty((batch - 1) * stride_b + 64 * T, device=DEVICE)
    gen = torch.Generator().manual_seed(seed)
    views = []
    for i, width in enumerate([S, S, S, S, E, E]):
        view = storage.as_strided((batch, T, width), (stride_b, 64, 1), storage_offset=8 * i)
        view.copy_(torch.randn(batch, T, width, generator=gen))
        views.append(view)
    return views


def _forward_and_backward(op, views, gamma, beta, grad_out):
    """Output and input gradients of `op` on the six views (flash_attention: z, v, u)."""
    leaves = [x.detach().requires_grad_() for x in views]  # detach keeps the strides
    print(op, "forward, batch stride", leaves[0].stride(0), flush=True)
    if op == "mixed_chunk_attention":
        inputs = leaves[:5]
        out = _mixed(*inputs, None)
    else:
        inputs = [leaves[0], leaves[4], leaves[5]]
        out = flash_attention(
            leaves[0], gamma, beta, leaves[4], u=leaves[5], chunk_size=C, backend="triton"
        )
    print(op, "backward", flush=True)
    return out, torch.autograd.grad(out, inputs, grad_out)


def int32_batch_stride_case():
    """Forward and backward of both ops on views whose batch stride 2^30 + 64 fits an int32
    (the kernels receive it as i32) while batch 2 starts past 2^31 elements: batch index times
    stride must be computed in int64. Compared bit for bit with contiguous copies. Module-level
    so that a subprocess runs it: a 32-bit offset reads far outside the tensor and crashes."""
    stride_b = 2**30 + 64
    assert stride_b < 2**31 <= 2 * stride_b
    strided = _views_with_batch_stride(stride_b, 3, seed=4)
    contiguous = [x.contiguous() for x in strided]
    grad_out = torch.randn(3, T, E, generator=torch.Generator().manual_seed(5)).to(DEVICE)
    gamma, beta = torch.randn(4, S, device=DEVICE), torch.randn(4, S, device=DEVICE)
    for op in ("mixed_chunk_attention", "flash_attention"):
        big, big_grads = _forward_and_backward(op, strided, gamma, beta, grad_out)
        small, small_grads = _forward_and_backward(op, contiguous, gamma, beta, grad_out)
        torch.testing.assert_close(big, small, rtol=0, atol=0)
        for got, want in zip(big_grads, small_grads):
            torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.slow  # a subprocess
def test_int32_batch_stride_whose_offsets_overflow():
    tests = os.path.dirname(os.path.abspath(__file__))
    code = (
        f"import sys; sys.path[:0] = [{tests!r}, {os.path.dirname(tests)!r}]\n"
        f"import test_strides; test_strides.int32_batch_stride_case()\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, (
        f"exit status {done.returncode}\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}"
    )


@pytest.mark.big_memory  # ~15 GB of GPU memory: last in the GPU run
@pytest.mark.gpu
@pytest.mark.skipif(
    DEVICE != "cuda", reason="needs ~15 GB of GPU memory: a real tensor of more than 2^31 elements"
)
def test_tensors_over_2_31_elements():
    """T * E > 2^31 (contiguous v and out), quadratic only so the last chunk's output depends
    on that chunk alone and can be checked with the torch path on a slice."""
    E_big, S_small, chunk = 64, 16, 256
    T_big = 2**31 // E_big + 3 * chunk + 5
    torch.manual_seed(3)
    q_quad, k_quad = (
        torch.randn(1, T_big, S_small, device=DEVICE, dtype=torch.bfloat16) for _ in range(2)
    )
    v = torch.randn(1, T_big, E_big, device=DEVICE, dtype=torch.bfloat16)
    assert v.numel() > 2**31
    with torch.no_grad():
        out = mixed_chunk_attention(
            q_quad, k_quad, None, None, v, chunk_size=chunk, backend="triton"
        )
        last = (T_big // chunk) * chunk
        expected = mixed_chunk_attention(
            q_quad[:, last:],
            k_quad[:, last:],
            None,
            None,
            v[:, last:],
            chunk_size=chunk,
            backend="torch",
        )
    torch.testing.assert_close(out[:, last:], expected, rtol=2e-2, atol=2e-2)
