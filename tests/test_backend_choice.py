"""How the ops choose a backend, and refuse one that cannot give the right answer.

- bfloat16 under the Triton interpreter (which has no bfloat16 arithmetic): "auto" takes the
  PyTorch path, an explicit "triton" raises; through autocast and bf16 models too.
- torch.func transforms (grad, vmap): "auto" takes "torch", an explicit "triton" says so.
- TRITON_INTERPRET set after `import flash_kernels`: the package's own message, not Triton's
  "0 active drivers".
"""

import os
import subprocess
import sys

import pytest
import torch
from helpers import call_op, check_raises, op_inputs

from flash_kernels.core.environment import INTERPRETED_KERNELS
from flash_kernels.nn import FLASHLM

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OPS = ("mixed_chunk_attention", "flash_attention")
C = 4

needs_interpreter = pytest.mark.skipif(
    not INTERPRETED_KERNELS, reason="the kernels are not interpreted in this process"
)


# ---------------------------------------------------------------------------------------------
# bfloat16 under the interpreter


@needs_interpreter
@pytest.mark.parametrize("op", OPS)
def test_auto_runs_bfloat16_on_torch_under_the_interpreter(op):
    inputs = op_inputs(op, torch.bfloat16)
    out = call_op(op, inputs, chunk_size=C, backend="auto")
    torch.testing.assert_close(
        out, call_op(op, inputs, chunk_size=C, backend="torch"), rtol=0, atol=0
    )


@needs_interpreter
@pytest.mark.parametrize("op", OPS)
def test_triton_refuses_bfloat16_under_the_interpreter(op):
    with pytest.raises(TypeError) as info:
        call_op(op, op_inputs(op, torch.bfloat16), chunk_size=C, backend="triton")
    message = str(info.value)
    assert "bfloat16" in message and "TRITON_INTERPRET" in message, message
    assert "backend='torch'" in message, message


@needs_interpreter
@pytest.mark.parametrize("op", OPS)
def test_autocast_bfloat16_under_the_interpreter(op):
    """float32 inputs, cast to bfloat16 by autocast: "auto" agrees with "torch" bit for bit,
    "triton" refuses."""
    inputs = op_inputs(op, torch.float32)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out = call_op(op, inputs, chunk_size=C, backend="auto")
        expected = call_op(op, inputs, chunk_size=C, backend="torch")
        with pytest.raises(TypeError, match="bfloat16"):
            call_op(op, inputs, chunk_size=C, backend="triton")
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out, expected, rtol=0, atol=0)


@needs_interpreter
@pytest.mark.parametrize("rope", [False, True], ids=["fused-op", "rope"])
def test_bfloat16_model_under_the_interpreter(rope):
    """FLASHLM(...).bfloat16() with backend "auto" gives the "torch" backend's logits."""
    torch.manual_seed(0)
    model = FLASHLM(13, 16, 1, s=8, chunk_size=4, rope=rope).bfloat16().to(DEVICE)
    with torch.no_grad():  # attention weights large enough that a wrong path shows
        for layer in model.layers:
            layer.scale_offset.gamma.normal_()
    idx = torch.randint(0, 13, (2, 9), device=DEVICE)
    with torch.no_grad():
        logits = model(idx)
        model.backend = "torch"
        expected = model(idx)
    torch.testing.assert_close(logits, expected, rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# torch.func transforms


@pytest.mark.parametrize("op", OPS)
def test_torch_func_transforms_take_the_torch_path_or_say_so(op):
    """torch.func.grad / vmap: "auto" takes "torch" (the gradients of torch.autograd there, the
    outputs of a loop), an explicit "triton" says to use backend="torch" instead of failing on
    setup_context."""
    inputs = op_inputs(op)
    first = "q_quad" if op == "mixed_chunk_attention" else "z"

    def loss(backend):
        return lambda x: (
            call_op(op, {**inputs, first: x}, chunk_size=C, backend=backend).square().sum()
        )

    x = inputs[first].clone().requires_grad_()
    loss("torch")(x).backward()
    torch.testing.assert_close(torch.func.grad(loss("auto"))(inputs[first]), x.grad, rtol=0, atol=0)
    stacked = torch.stack([inputs[first], 2 * inputs[first]])
    torch.testing.assert_close(
        torch.func.vmap(loss("auto"))(stacked),
        torch.stack([loss("torch")(x) for x in stacked]),
        rtol=1e-6,
        atol=0,
    )
    if INTERPRETED_KERNELS or DEVICE == "cuda":
        check_raises(
            lambda: torch.func.grad(loss("triton"))(inputs[first]),
            RuntimeError,
            ["torch.func", "backend='torch'"],
        )
        check_raises(
            lambda: torch.func.vmap(loss("triton"))(stacked),
            RuntimeError,
            ["torch.func", "backend='torch'"],
        )


# ---------------------------------------------------------------------------------------------
# TRITON_INTERPRET set after the import

LATE_INTERPRETER = """
import os, torch
import flash_kernels
os.environ["TRITON_INTERPRET"] = "1"
x = torch.randn(1, 8, 4)
for backend in ("triton", "auto"):
    try:
        flash_kernels.mixed_chunk_attention(x, x, x, x, x, chunk_size=4, backend=backend)
        print(backend, "ran")
    except Exception as error:
        print(backend, type(error).__name__, str(error).replace("\\n", " "))
"""


@pytest.mark.slow  # a subprocess
@pytest.mark.skipif(DEVICE == "cuda", reason="CPU tensors without a GPU")
def test_interpreter_set_after_import_says_so():
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", LATE_INTERPRETER],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    lines = result.stdout.strip().splitlines()
    assert len(lines) == 2, result.stdout
    for line in lines:
        assert "RuntimeError" in line and "active drivers" not in line, line
        assert "TRITON_INTERPRET must be set before flash_kernels" in line, line
