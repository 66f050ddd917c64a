"""Argument checks for the public ops: every bad input gets an error naming the argument."""

import math
import numbers

import numpy as np
import torch

from .environment import INTERPRETED_KERNELS, functorch_transform_active, triton_interpret_enabled

BACKENDS = ("auto", "triton", "torch", "reference")
TRITON_MAX_S = 256  # the Triton kernels hold a row of q/k (S features) in one tile
_FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def type_name(value):
    """The type of `value` as a user would write it: "int", "numpy.float64", "torch.Tensor"."""
    kind = type(value)
    module = kind.__module__.split(".")[0]
    return kind.__qualname__ if module == "builtins" else f"{module}.{kind.__qualname__}"


def is_bool(value):
    """Python and numpy bools (numpy.bool_ is no subclass of bool); not ints, not tensors."""
    return isinstance(value, (bool, np.bool_))


def check_bool(name, value):
    if not is_bool(value):
        raise TypeError(f"{name} must be a bool, got {type_name(value)}")


def check_int(name, value, *, minimum):
    """An integer (Python or numpy, not a bool) at least `minimum`."""
    if is_bool(value) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type_name(value)}")
    if value < minimum:
        what = "positive" if minimum == 1 else f"at least {minimum}"
        raise ValueError(f"{name} must be {what}, got {value}")


def check_tensor(name, x, *, min_dim):
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dim() < min_dim:
        raise ValueError(
            f"{name} must have at least {min_dim} dims (*batch, T, features), "
            f"got shape {tuple(x.shape)}"
        )
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be float16, bfloat16, float32 or float64, got {x.dtype}")


def check_scale(name, value):
    if value is None:
        return
    if is_bool(value) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a real number or None, got {type_name(value)}")
    if not math.isfinite(value):
        raise ValueError(f"{name} must be finite, got {value}")


def check_chunk_size(chunk_size):
    if chunk_size is None:
        return
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, numbers.Integral):
        raise TypeError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    if chunk_size <= 0:
        raise ValueError(f"chunk_size must be a positive int or None, got {chunk_size}")
    if chunk_size >= 2**62:  # positions are int64; a longer chunk than that means one chunk
        raise ValueError(
            f"chunk_size must be below 2**62 (use chunk_size=None for one chunk as "
            f"long as the sequence), got {chunk_size}"
        )


def check_feature_sizes(qk_name, qk, v_name, v):
    """S and E are positive (docs/contract.md section 2); T = 0 and empty batch dims are fine.
    With S = 0 every score would be the bias alone, whatever the tokens: surely a caller's bug."""
    if qk.shape[-1] == 0:
        raise ValueError(
            f"{qk_name} has S = 0 features (its last dim): queries and keys need "
            f"S >= 1, got shape {tuple(qk.shape)}"
        )
    if v.shape[-1] == 0:
        raise ValueError(
            f"{v_name} has E = 0 features (its last dim): values need E >= 1, "
            f"got shape {tuple(v.shape)}"
        )


def check_same_dtype_and_device(named, group):
    """Every (name, tensor) after the first has the first's dtype and device."""
    first_name, first = named[0]
    for name, x in named[1:]:
        if x.dtype != first.dtype:
            raise TypeError(
                f"{name} has dtype {x.dtype} but {first_name} has {first.dtype}: "
                f"{group} must share one dtype"
            )
        if x.device != first.device:
            raise ValueError(
                f"{name} is on {x.device} but {first_name} is on {first.device}: "
                f"all inputs must be on one device"
            )


def check_tensors_of_mixed_chunk(q_quad, k_quad, q_lin, k_lin, v):
    """Validate the tensors of mixed_chunk_attention (docs/contract.md section 2)."""
    check_tensor("q_quad", q_quad, min_dim=2)
    check_tensor("k_quad", k_quad, min_dim=2)
    check_tensor("v", v, min_dim=2)
    if (q_lin is None) != (k_lin is None):
        given, missing = ("q_lin", "k_lin") if k_lin is None else ("k_lin", "q_lin")
        raise ValueError(
            f"{given} was given without {missing}: pass both (linear part) or "
            f"neither (quadratic only)"
        )
    named = [("q_quad", q_quad), ("k_quad", k_quad), ("v", v)]
    if q_lin is not None:
        check_tensor("q_lin", q_lin, min_dim=2)
        check_tensor("k_lin", k_lin, min_dim=2)
        named += [("q_lin", q_lin), ("k_lin", k_lin)]

    expected_qk = tuple(q_quad.shape)
    for name, x in named[1:]:
        if name == "v":
            if tuple(x.shape[:-1]) != expected_qk[:-1]:
                raise ValueError(
                    f"v must have shape (*batch, T, E) = {expected_qk[:-1] + ('E',)} "
                    f"matching q_quad's batch dims and T, got {tuple(x.shape)}"
                )
        elif tuple(x.shape) != expected_qk:
            raise ValueError(
                f"{name} must have the same shape as q_quad {expected_qk} "
                f"(*batch, T, S), got {tuple(x.shape)}"
            )
    check_feature_sizes("q_quad", q_quad, "v", v)
    check_same_dtype_and_device(named, "q_quad, k_quad, q_lin, k_lin, v")


def check_options(chunk_size, causal, quad_scale, lin_scale, backend):
    """The keyword options shared by mixed_chunk_attention and flash_attention."""
    check_chunk_size(chunk_size)
    check_bool("causal", causal)
    check_scale("quad_scale", quad_scale)
    check_scale("lin_scale", lin_scale)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def check_floating_tensor(name, x, device, device_owner):
    """x is a floating torch.Tensor on `device` (the inputs', named by device_owner)."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor or None, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must be a floating tensor, got {x.dtype}")
    if x.device != device:
        raise ValueError(
            f"{name} is on {x.device} but {device_owner} on {device}: "
            f"{name} must be on the inputs' device"
        )


def check_rel_bias(rel_bias, *, C, chunk_size, packed, device, device_owner):
    """rel_bias is None or a (2C - 1,) floating tensor on the inputs' device; C is the resolved
    chunk size (chunk_size=None: T, or max_seqlen with cu_seqlens)."""
    if rel_bias is None:
        return
    check_floating_tensor("rel_bias", rel_bias, device, device_owner)
    if C > 0 and tuple(rel_bias.shape) != (2 * C - 1,):
        what = (
            f"chunk_size={chunk_size}"
            if chunk_size is not None
            else f"chunk_size=None (C = {'max_seqlen' if packed else 'T'} = {C})"
        )
        raise ValueError(
            f"rel_bias must have shape (2 * C - 1,) = ({2 * C - 1},) for {what}, "
            f"got {tuple(rel_bias.shape)}"
        )


def check_flash_inputs(z, gamma, beta, v, u):
    """Validate the tensors of flash_attention (docs/contract.md section 4)."""
    check_tensor("z", z, min_dim=2)
    check_tensor("v", v, min_dim=2)
    check_feature_sizes("z", z, "v", v)
    S = z.shape[-1]
    for name, x in (("gamma", gamma), ("beta", beta)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dtype not in _FLOAT_DTYPES:
            raise TypeError(f"{name} must be a floating tensor, got {x.dtype}")
        if x.dim() != 2 or x.shape[0] not in (2, 4) or x.shape[1] != S:
            raise ValueError(
                f"{name} must have shape (4, S) (rows quad_q, quad_k, lin_q, lin_k) "
                f"or (2, S) (quadratic only) with S = z.shape[-1] = {S}, "
                f"got {tuple(x.shape)}"
            )
        if x.device != z.device:
            raise ValueError(
                f"{name} is on {x.device} but z is on {z.device}: all inputs must be on one device"
            )
    if gamma.shape != beta.shape:
        raise ValueError(
            f"gamma and beta must have the same shape, got {tuple(gamma.shape)} and "
            f"{tuple(beta.shape)}"
        )
    if tuple(v.shape[:-1]) != tuple(z.shape[:-1]):
        raise ValueError(
            f"v must have shape (*batch, T, E) = {tuple(z.shape[:-1]) + ('E',)} "
            f"matching z's batch dims and T, got {tuple(v.shape)}"
        )
    if u is not None:
        check_tensor("u", u, min_dim=2)
        if u.shape != v.shape:
            raise ValueError(f"u must have v's shape {tuple(v.shape)}, got {tuple(u.shape)}")
    check_same_dtype_and_device(
        [("z", z), ("v", v)] + ([("u", u)] if u is not None else []), "z, v and u"
    )


def check_packing(cu_seqlens, max_seqlen, T, device):
    """Validate cu_seqlens / max_seqlen (the contract's section 7) and return the packed
    documents' lengths as a host list, or None where the values were not read: where reading
    them would wait for the device (a CUDA cu_seqlens with max_seqlen given) or cannot happen
    (under torch.compile tracing).
    """
    if cu_seqlens is None:
        if max_seqlen is not None:
            raise ValueError("max_seqlen is the longest packed document: it needs cu_seqlens")
        return None
    if not isinstance(cu_seqlens, torch.Tensor):
        raise TypeError(
            f"cu_seqlens must be a torch.Tensor of int32 or int64, got {type(cu_seqlens).__name__}"
        )
    if cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError(
            f"cu_seqlens must be int32 or int64 (0, then the cumulative document "
            f"lengths), got {cu_seqlens.dtype}"
        )
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 1:
        raise ValueError(
            f"cu_seqlens must be 1-D of shape (N + 1,) for N documents, got shape "
            f"{tuple(cu_seqlens.shape)}"
        )
    if cu_seqlens.device != device and cu_seqlens.device.type != "cpu":
        raise ValueError(
            f"cu_seqlens is on {cu_seqlens.device} but the inputs are on {device}: "
            f"pass it on their device or on the CPU"
        )
    if max_seqlen is not None and (
        isinstance(max_seqlen, bool)
        or not isinstance(max_seqlen, numbers.Integral)
        or max_seqlen < 1
    ):
        raise ValueError(
            f"max_seqlen must be a positive int (the longest document's length), got {max_seqlen!r}"
        )
    if torch.compiler.is_compiling() or (
        cu_seqlens.device.type != "cpu" and max_seqlen is not None
    ):
        return None
    bounds = cu_seqlens.tolist()
    if bounds[0] != 0 or bounds[-1] != T:
        raise ValueError(
            f"cu_seqlens must start at 0 and end at T = {T} (the packed length), "
            f"got {bounds[0]} ... {bounds[-1]}"
        )
    lengths = [end - start for start, end in zip(bounds[:-1], bounds[1:])]
    if any(length < 0 for length in lengths):
        first = next(i for i, length in enumerate(lengths) if length < 0)
        raise ValueError(
            f"cu_seqlens must be non-decreasing, got {bounds[first]} then "
            f"{bounds[first + 1]} at positions {first} and {first + 1}"
        )
    if max_seqlen is not None and lengths and max(lengths) > max_seqlen:
        raise ValueError(
            f"max_seqlen={max_seqlen} is less than the longest document ({max(lengths)} tokens)"
        )
    return lengths


def check_state_arguments(
    initial_state, output_final_state, *, batch, num_docs, S, E, packed, has_linear, causal, device
):
    """Validate initial_state / output_final_state (the contract's section 7)."""
    check_bool("output_final_state", output_final_state)
    if initial_state is None and not output_final_state:
        return
    what = "initial_state" if initial_state is not None else "output_final_state=True"
    if not has_linear:
        raise ValueError(
            f"{what} needs the linear part: q_lin and k_lin (the state is their "
            f"k_lin^T v; quadratic-only attention has none)"
        )
    if not causal:
        raise ValueError(
            f"{what} needs causal=True (a non-causal chunk sees the whole sequence, "
            f"so there is no state to carry in or out)"
        )
    if initial_state is None:
        return
    check_floating_tensor("initial_state", initial_state, device, "the inputs")
    expected = tuple(batch) + ((num_docs,) if packed else ()) + (S, E)
    if tuple(initial_state.shape) != expected:
        layout = "(*batch, N, S, E) with cu_seqlens" if packed else "(*batch, S, E)"
        raise ValueError(
            f"initial_state must have shape {layout} = {expected}, got {tuple(initial_state.shape)}"
        )


def check_context_parallel_options(
    chunk_size, cu_seqlens, max_seqlen, initial_state, output_final_state, backend
):
    """The options context parallelism (cp_group) does not take: a clear error, not a guess."""
    if chunk_size is None:
        raise ValueError(
            "chunk_size=None (one chunk as long as the sequence) cannot be split "
            "across the ranks of cp_group: context parallelism needs a chunk_size"
        )
    for name, value in (
        ("cu_seqlens", cu_seqlens),
        ("max_seqlen", max_seqlen),
        ("initial_state", initial_state),
    ):
        if value is not None:
            raise ValueError(
                f"{name} is not supported with cp_group (packed documents and state "
                f"in/out are single-process features)"
            )
    if output_final_state is not False:
        raise ValueError("output_final_state is not supported with cp_group")
    if backend == "reference":
        raise ValueError(
            "backend='reference' (the dense ground truth) has no context parallel "
            "path: use 'torch', 'triton' or 'auto' with cp_group"
        )


def check_triton_inputs(q, v):
    """What the Triton backend cannot take, with the way out (an explicit backend='triton';
    "auto" never picks it for these: core/plan.py, pick_backend)."""
    if q.shape[-1] > TRITON_MAX_S:
        raise ValueError(
            f"backend='triton' holds q/k in one tile: S (their last dim) must be at "
            f"most {TRITON_MAX_S}, got {q.shape[-1]}; use backend='torch'"
        )
    if triton_interpret_enabled() and not INTERPRETED_KERNELS:
        raise RuntimeError(
            "TRITON_INTERPRET=1 was set after flash_kernels was imported: Triton "
            "reads it when it defines the kernels, at import, so they are not "
            "interpreted. TRITON_INTERPRET must be set before flash_kernels (and "
            "triton) is imported; or use backend='torch'"
        )
    if v.device.type != "cuda" and not triton_interpret_enabled():
        raise ValueError(
            f"backend='triton' needs CUDA tensors (got {v.device}) or "
            f"TRITON_INTERPRET=1 set before flash_kernels is imported; use "
            f"backend='torch' on the CPU"
        )
    if INTERPRETED_KERNELS and v.dtype == torch.bfloat16:
        raise TypeError(
            "backend='triton' cannot take torch.bfloat16 inputs under the Triton "
            "interpreter (TRITON_INTERPRET=1): it has no bfloat16 arithmetic and would "
            "return wrong values. Use backend='torch' (backend='auto' does), or "
            "float16/float32 inputs, or a GPU without TRITON_INTERPRET"
        )
    if functorch_transform_active():
        raise RuntimeError(
            "backend='triton' does not work inside torch.func transforms (grad, "
            "vmap, jacrev, jvp, ...): its custom ops have no functorch rules. Use "
            "backend='torch' (backend='auto' does inside torch.func), or "
            "torch.autograd.grad / .backward()"
        )
