"""Independent C++ oracle of mixed chunk attention (forward and hand-written backward).

`mixed_chunk_attention_ref.cpp` computes docs/contract.md sections 2 and 3 with plain float64
loops: per
chunk i, j with c(i) == c(j),

    s_ij = quad_scale * <q_quad_i, k_quad_j> + rel_bias[i - j + C - 1]     (bias only if given)
    a_ij = relu(s_ij)^2  (0 when causal and j > i),      quad_i = sum_j a_ij v_j
    lin_i = lin_scale * q_lin_i^T P_{c(i)},  P_g = sum_{h < g} K_h^T V_h (causal) or sum over all h
    out_i = quad_i + lin_i

and the gradients of section 3 in the same chunked state form a kernel uses. It shares no code with
the PyTorch paths, so agreement is evidence that both are right.

The extension is compiled on first use (about half a minute) into `build/cpp_ref` at the repository
root; later processes reuse the build. Results are float64 whatever the input dtype.
"""

import functools
import math
import os
import shutil
import sys

import torch

__all__ = [
    "cpp_toolchain_available",
    "load",
    "mixed_chunk_attention_cpp",
    "mixed_chunk_attention_cpp_backward",
]

_HERE = os.path.dirname(os.path.abspath(__file__))
_SOURCE = os.path.join(_HERE, "mixed_chunk_attention_ref.cpp")
_BUILD_DIR = os.path.join(os.path.dirname(_HERE), "build", "cpp_ref")


def _put_python_bin_on_path():
    """torch.utils.cpp_extension runs `ninja` from PATH; in a venv it sits next to the
    interpreter."""
    bin_dir = os.path.dirname(sys.executable)
    path = os.environ.get("PATH", "")
    if bin_dir not in path.split(os.pathsep):
        os.environ["PATH"] = bin_dir + (os.pathsep + path if path else "")


def cpp_toolchain_available():
    """(True, "") if a C++ compiler and ninja can be found, else (False, reason)."""
    _put_python_bin_on_path()
    compiler = os.environ.get("CXX", "c++")
    if shutil.which(compiler) is None:
        return False, f"C++ compiler {compiler!r} not found (set CXX or install g++)"
    if shutil.which("ninja") is None:
        return False, "ninja not found on PATH (pip install ninja)"
    return True, ""


@functools.lru_cache(maxsize=None)
def load():
    """Compile (first call only; cached on disk across processes) and import the extension."""
    from torch.utils.cpp_extension import load as load_extension

    _put_python_bin_on_path()
    os.makedirs(_BUILD_DIR, exist_ok=True)
    return load_extension(
        name="flash_kernels_cpp_ref",
        sources=[_SOURCE],
        extra_cflags=["-O2"],
        build_directory=_BUILD_DIR,
        verbose=False,
    )


def _resolve_shapes(q_quad, v):
    """Leading batch dims, their product B, and T, from v (*batch, T, E) and q_quad
    (*batch, T, S)."""
    if v.dim() < 2 or q_quad.dim() < 2:
        raise ValueError("q_quad and v need at least 2 dims: (*batch, T, S) and (*batch, T, E)")
    batch = tuple(v.shape[:-2])
    # Explicit product instead of reshape(-1, ...): -1 is ambiguous when T == 0.
    return batch, math.prod(batch), v.shape[-2]


def _flat(x, B, T):
    """(*batch, T, D) -> contiguous float64 CPU (B, T, D); None stays None."""
    if x is None:
        return None
    return x.detach().to(device="cpu", dtype=torch.float64).reshape(B, T, x.shape[-1]).contiguous()


def _flat_bias(rel_bias):
    if rel_bias is None:
        return None
    return rel_bias.detach().to(device="cpu", dtype=torch.float64).contiguous()


def _check_arguments(q_lin, k_lin, rel_bias, chunk_size):
    """The argument checks, in Python. The C++ code checks them too, but on the GPU machines'
    image (torch 2.11) a C++ exception raised inside the extension killed the pytest worker
    instead of reaching Python as a RuntimeError, so the extension never sees bad arguments."""
    if (q_lin is None) != (k_lin is None):
        raise ValueError("q_lin and k_lin must be both tensors or both None")
    if int(chunk_size) < 1:
        raise RuntimeError(f"chunk_size must be >= 1, got {chunk_size}")
    if rel_bias is not None and tuple(rel_bias.shape) != (2 * int(chunk_size) - 1,):
        raise RuntimeError(
            f"rel_bias must have shape (2 * chunk_size - 1,) = "
            f"({2 * int(chunk_size) - 1},), got {tuple(rel_bias.shape)}"
        )


def mixed_chunk_attention_cpp(
    q_quad, k_quad, q_lin, k_lin, v, *, chunk_size, causal, rel_bias, quad_scale, lin_scale
):
    """Forward of mixed chunk attention by the C++ loop oracle; returns float64 (*batch, T, E).

    `chunk_size` (int >= 1), `quad_scale` and `lin_scale` (floats) must already be resolved.
    """
    _check_arguments(q_lin, k_lin, rel_bias, chunk_size)
    batch, B, T = _resolve_shapes(q_quad, v)
    out = load().forward(
        _flat(q_quad, B, T),
        _flat(k_quad, B, T),
        _flat(q_lin, B, T),
        _flat(k_lin, B, T),
        _flat(v, B, T),
        _flat_bias(rel_bias),
        int(chunk_size),
        bool(causal),
        float(quad_scale),
        float(lin_scale),
    )
    return out.reshape(*batch, T, v.shape[-1])


def mixed_chunk_attention_cpp_backward(
    grad_out,
    q_quad,
    k_quad,
    q_lin,
    k_lin,
    v,
    *,
    chunk_size,
    causal,
    rel_bias,
    quad_scale,
    lin_scale,
):
    """Hand-written backward (docs/contract.md section 3) by the C++ loop oracle.

    Returns {"q_quad", "k_quad", "q_lin", "k_lin", "v", "rel_bias"} -> float64 gradients shaped like
    the inputs (None for absent optional inputs). rel_bias's gradient sums over all chunks and batch
    entries; with T == 0 it is all zeros.
    """
    _check_arguments(q_lin, k_lin, rel_bias, chunk_size)
    batch, B, T = _resolve_shapes(q_quad, v)
    grads = load().backward(
        _flat(grad_out, B, T),
        _flat(q_quad, B, T),
        _flat(k_quad, B, T),
        _flat(q_lin, B, T),
        _flat(k_lin, B, T),
        _flat(v, B, T),
        _flat_bias(rel_bias),
        int(chunk_size),
        bool(causal),
        float(quad_scale),
        float(lin_scale),
    )
    names = ("q_quad", "k_quad", "q_lin", "k_lin", "v")
    inputs = (q_quad, k_quad, q_lin, k_lin, v)
    result = {
        name: None if x is None else g.reshape(*batch, T, x.shape[-1])
        for name, x, g in zip(names, inputs, grads[:5])
    }
    result["rel_bias"] = None if rel_bias is None else grads[5]
    return result
