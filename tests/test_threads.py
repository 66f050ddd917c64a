"""Threads calling the Triton backend at once get the bits of sequential calls: the
interpreter is not thread-safe, so interpreted launches are serialised
(backends/triton/launch.py); on a GPU, two threads on two CUDA streams."""

import contextlib
import threading

import pytest
import torch
from helpers import call_op, op_inputs

from flash_kernels.core.environment import INTERPRETED_KERNELS

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
OPS = ("mixed_chunk_attention", "flash_attention")
C = 4

needs_interpreter = pytest.mark.skipif(
    not INTERPRETED_KERNELS, reason="the kernels are not interpreted in this process"
)


def forward_and_grads(op, inputs, backend, stream=None):
    """Output and gradients of every input, detached (so results of threads can be compared)."""
    leaves = {k: x.detach().clone().requires_grad_() for k, x in inputs.items()}
    with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
        out = call_op(op, leaves, chunk_size=C, backend=backend)
        grads = torch.autograd.grad(out, list(leaves.values()), torch.ones_like(out))
    return [out.detach(), *grads]


def run_in_threads(work, num_threads):
    """Run work(i) in `num_threads` threads released together; their results (or exceptions)."""
    start = threading.Barrier(num_threads)
    results = [None] * num_threads

    def body(i):
        start.wait()
        try:
            results[i] = work(i)
        except Exception as error:  # re-raised by the caller, with the thread's index
            results[i] = error

    threads = [threading.Thread(target=body, args=(i,)) for i in range(num_threads)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    return results


def assert_same_bits(thread, result, expected):
    if isinstance(result, Exception):
        raise AssertionError(f"thread {thread} raised {result!r}") from result
    for j, (got, want) in enumerate(zip(result, expected)):
        assert torch.equal(got, want), f"thread {thread}, tensor {j}: not the sequential bits"


@needs_interpreter
@pytest.mark.parametrize("op", OPS)
def test_threads_get_the_bits_of_sequential_calls_under_the_interpreter(op):
    """Two threads at once, each a forward and backward on its own inputs. Without the launch
    lock they read each other's program ids: this round failed in 40 of 40 tries per op
    (mostly "z >= grid_dim" or "_semantic argument" errors inside the interpreter)."""
    problems = [op_inputs(op, seed=i, batch=1 + i) for i in range(2)]
    expected = [forward_and_grads(op, p, "triton") for p in problems]
    results = run_in_threads(lambda i: forward_and_grads(op, problems[i], "triton"), 2)
    for i in range(2):
        assert_same_bits(i, results[i], expected[i])


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("op", OPS)
def test_threads_on_two_cuda_streams_get_the_bits_of_sequential_calls(op):
    """Compiled kernels: two threads, each launching on its own stream, at once."""
    problems = [op_inputs(op, seed=i, batch=4 + i, T_=300) for i in range(2)]
    expected = [forward_and_grads(op, p, "triton") for p in problems]
    streams = [torch.cuda.Stream() for _ in range(2)]
    torch.cuda.synchronize()
    for _ in range(5):

        def work(i):
            result = forward_and_grads(op, problems[i], "triton", stream=streams[i])
            streams[i].synchronize()
            return result

        results = run_in_threads(work, 2)
        for i in range(2):
            assert_same_bits(i, results[i], expected[i])
