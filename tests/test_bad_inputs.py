"""Bad and extreme inputs to both public ops, on every backend.

Extends tests/test_validation.py (which covers mixed_chunk_attention on "torch" and "reference")
without repeating its rows: every row here runs on "torch", "reference" and "triton" (the Triton
backend runs under TRITON_INTERPRET=1 without a GPU, set by conftest.py), for
mixed_chunk_attention and flash_attention, and checks the exception type and that the message
names the offending argument. Also here:
- test_validation.py's own table on the Triton backend (the checks must not depend on it);
- huge chunk sizes: they must work or raise a clear error, and never hang or crash;
- NaN/Inf inputs: every output row that depends on a non-finite input must be non-finite, and
  every output row and gradient row that cannot see it must stay finite (a masked position is
  removed, not multiplied by 0); nothing hangs or crashes, the backward included;
- S > 256: backend="triton" refuses it (ValueError naming S), "auto" takes the PyTorch path;
- valid extremes: empty batch dims, T = 0, non-contiguous rel_bias.
"""

import ast
import builtins
import os
import signal
import subprocess
import sys

import numpy as np
import pytest
import torch
from helpers import call_op, check_raises, op_inputs
from validation_cases import BAD_INPUTS as VALIDATION_BAD_INPUTS
from validation_cases import call as validation_call

from flash_kernels import flash_attention, mixed_chunk_attention

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ("torch", "reference", "triton")
T, S, E, C = 10, 5, 6, 4  # S != 4 so that a transposed (S, 4) gamma is not (4, S)
OPS = ("mixed_chunk_attention", "flash_attention")


def mixed_inputs():
    return dict(
        q_quad=torch.randn(2, T, S),
        k_quad=torch.randn(2, T, S),
        q_lin=torch.randn(2, T, S),
        k_lin=torch.randn(2, T, S),
        v=torch.randn(2, T, E),
    )


def flash_inputs():
    return dict(
        z=torch.randn(2, T, S),
        gamma=torch.randn(4, S),
        beta=torch.randn(4, S),
        v=torch.randn(2, T, E),
        u=torch.randn(2, T, E),
    )


def call(op, changes, backend):
    """Call `op` on good inputs (chunk_size=C) with `changes` applied (tensors or options)."""
    args = mixed_inputs() if op == "mixed_chunk_attention" else flash_inputs()
    options = dict(chunk_size=C, backend=backend)
    for key, value in changes.items():
        (args if key in args else options)[key] = value
    if op == "mixed_chunk_attention":
        return mixed_chunk_attention(
            args["q_quad"], args["k_quad"], args["q_lin"], args["k_lin"], args["v"], **options
        )
    return flash_attention(
        args["z"], args["gamma"], args["beta"], args["v"], u=args["u"], **options
    )


# ---------------------------------------------------------------------------------------------
# Tables: (changes, exception, words the message must contain)

MIXED_BAD = [
    # wrong rank
    (dict(q_quad=torch.tensor(1.0)), ValueError, ["q_quad", "dims"]),
    (dict(k_quad=torch.randn(T)), ValueError, ["k_quad", "dims"]),
    (dict(q_lin=torch.randn(S)), ValueError, ["q_lin", "dims"]),
    (dict(k_lin=torch.randn(T, S)), ValueError, ["k_lin", "shape"]),
    (dict(v=torch.randn(T, E)), ValueError, ["v", "shape"]),
    (dict(v=torch.randn(2, T, E, 1)), ValueError, ["v", "shape"]),
    # mismatched batch dims (broadcastable is not enough)
    (dict(k_quad=torch.randn(1, T, S)), ValueError, ["k_quad", "shape"]),
    (dict(q_lin=torch.randn(2, 2, T, S)), ValueError, ["q_lin", "shape"]),
    (dict(v=torch.randn(3, T, E)), ValueError, ["v", "shape"]),
    (dict(v=torch.randn(1, T, E)), ValueError, ["v", "shape"]),
    (dict(q_quad=torch.randn(2, 1, T, S)), ValueError, ["k_quad", "q_quad", "shape"]),
    # mixed dtypes
    (dict(q_lin=torch.randn(2, T, S).half()), TypeError, ["q_lin", "dtype"]),
    (dict(k_lin=torch.randn(2, T, S).double()), TypeError, ["k_lin", "dtype"]),
    (dict(v=torch.randn(2, T, E).bfloat16()), TypeError, ["v", "dtype"]),
    (dict(q_quad=torch.randn(2, T, S).double()), TypeError, ["q_quad", "dtype"]),
    # mixed devices
    (dict(q_quad=torch.randn(2, T, S, device="meta")), ValueError, ["q_quad", "device"]),
    (dict(k_quad=torch.randn(2, T, S, device="meta")), ValueError, ["k_quad", "device"]),
    (dict(q_lin=torch.randn(2, T, S, device="meta")), ValueError, ["q_lin", "device"]),
    (dict(k_lin=torch.randn(2, T, S, device="meta")), ValueError, ["k_lin", "device"]),
    # integer, bool and complex tensors
    (
        dict(k_quad=torch.randint(0, 3, (2, T, S), dtype=torch.int32)),
        TypeError,
        ["k_quad", "float"],
    ),
    (dict(q_lin=torch.ones(2, T, S, dtype=torch.bool)), TypeError, ["q_lin", "float"]),
    (dict(k_lin=torch.randint(0, 3, (2, T, S))), TypeError, ["k_lin", "float"]),
    (dict(v=torch.randint(0, 3, (2, T, E))), TypeError, ["v", "float"]),
    (dict(v=torch.ones(2, T, E, dtype=torch.bool)), TypeError, ["v", "float"]),
    (
        dict(q_quad=torch.randint(0, 3, (2, T, S), dtype=torch.uint8)),
        TypeError,
        ["q_quad", "float"],
    ),
    (dict(v=torch.randn(2, T, E, dtype=torch.complex64)), TypeError, ["v", "float"]),
    # not tensors
    (dict(v=None), TypeError, ["v", "Tensor"]),
    (dict(k_quad=np.zeros((2, T, S), dtype=np.float32)), TypeError, ["k_quad", "Tensor"]),
    (dict(q_lin=[[0.0] * S] * T), TypeError, ["q_lin", "Tensor"]),
]

FLASH_BAD = [
    # wrong rank
    (dict(z=torch.tensor(1.0)), ValueError, ["z", "dims"]),
    (dict(v=torch.randn(E)), ValueError, ["v", "dims"]),
    (dict(v=torch.randn(T, E)), ValueError, ["v", "shape"]),
    (dict(u=torch.randn(E)), ValueError, ["u", "dims"]),
    (dict(u=torch.randn(T, E)), ValueError, ["u", "shape"]),
    (dict(u=torch.randn(2, T, E, 1)), ValueError, ["u", "shape"]),
    # mismatched batch dims
    (dict(v=torch.randn(3, T, E)), ValueError, ["v", "shape"]),
    (dict(v=torch.randn(2, 2, T, E)), ValueError, ["v", "shape"]),
    (dict(u=torch.randn(1, T, E)), ValueError, ["u", "shape"]),
    (dict(z=torch.randn(1, T, S)), ValueError, ["v", "z", "shape"]),
    # gamma / beta of the wrong shape
    (dict(gamma=torch.randn(S)), ValueError, ["gamma", "(4, S)"]),
    (dict(gamma=torch.randn(4, S, 1)), ValueError, ["gamma", "(4, S)"]),
    (dict(gamma=torch.randn(1, S)), ValueError, ["gamma", "(4, S)"]),
    (dict(gamma=torch.randn(0, S)), ValueError, ["gamma", "(4, S)"]),
    (dict(gamma=torch.randn(S, 4)), ValueError, ["gamma", "(4, S)"]),
    (dict(beta=torch.randn(4, S - 1)), ValueError, ["beta", "S"]),
    (dict(beta=torch.randn(3, S)), ValueError, ["beta", "(4, S)"]),
    (dict(gamma=torch.randn(2, S)), ValueError, ["gamma and beta"]),
    (dict(gamma=torch.randn(2, S), beta=torch.randn(2, S + 1)), ValueError, ["beta", "S"]),
    # gamma / beta / u / z / v not tensors
    (dict(gamma=[[1.0] * S] * 4), TypeError, ["gamma", "Tensor"]),
    (dict(beta=None), TypeError, ["beta", "Tensor"]),
    (dict(gamma=np.ones((4, S), dtype=np.float32)), TypeError, ["gamma", "Tensor"]),
    (dict(u=[[0.0] * E] * T), TypeError, ["u", "Tensor"]),
    (dict(z=np.zeros((2, T, S), dtype=np.float32)), TypeError, ["z", "Tensor"]),
    (dict(v=None), TypeError, ["v", "Tensor"]),
    # integer, bool and complex tensors
    (dict(z=torch.randint(0, 3, (2, T, S))), TypeError, ["z", "float"]),
    (dict(z=torch.ones(2, T, S, dtype=torch.bool)), TypeError, ["z", "float"]),
    (dict(v=torch.randint(0, 3, (2, T, E))), TypeError, ["v", "float"]),
    (dict(u=torch.ones(2, T, E, dtype=torch.bool)), TypeError, ["u", "float"]),
    (dict(u=torch.randint(0, 3, (2, T, E), dtype=torch.int16)), TypeError, ["u", "float"]),
    (dict(gamma=torch.ones(4, S, dtype=torch.bool)), TypeError, ["gamma", "floating"]),
    (dict(beta=torch.randint(0, 3, (4, S))), TypeError, ["beta", "floating"]),
    (dict(beta=torch.randn(4, S, dtype=torch.complex64)), TypeError, ["beta", "floating"]),
    # mixed dtypes (z, v, u share one; gamma, beta may differ, e.g. float32 beside half)
    (dict(v=torch.randn(2, T, E).half()), TypeError, ["v", "dtype"]),
    (dict(u=torch.randn(2, T, E).half()), TypeError, ["u", "dtype"]),
    (dict(z=torch.randn(2, T, S).double()), TypeError, ["v", "z", "dtype"]),
    # mixed devices
    (dict(z=torch.randn(2, T, S, device="meta")), ValueError, ["z", "device"]),
    (dict(gamma=torch.randn(4, S, device="meta")), ValueError, ["gamma", "device"]),
    (dict(beta=torch.randn(4, S, device="meta")), ValueError, ["beta", "device"]),
    (dict(v=torch.randn(2, T, E, device="meta")), ValueError, ["v", "device"]),
    (dict(u=torch.randn(2, T, E, device="meta")), ValueError, ["u", "device"]),
]

# Keyword options shared by both ops. `in_validation`: the row (or one just like it) is already
# in test_validation.py for mixed_chunk_attention on "torch"/"reference" (not repeated there).
OPTION_BAD = [
    # (changes, exception, words, in_validation)
    (dict(chunk_size=0), ValueError, ["chunk_size", "positive"], True),
    (dict(chunk_size=-1), ValueError, ["chunk_size", "positive"], True),
    (dict(chunk_size=2.5), TypeError, ["chunk_size"], True),
    (dict(chunk_size=4.0), TypeError, ["chunk_size"], False),
    (dict(chunk_size=float("inf")), TypeError, ["chunk_size"], False),
    (dict(chunk_size=True), TypeError, ["chunk_size"], True),
    (dict(chunk_size=False), TypeError, ["chunk_size"], False),
    (dict(chunk_size="4"), TypeError, ["chunk_size"], False),
    (dict(chunk_size=torch.tensor(4)), TypeError, ["chunk_size"], False),
    (dict(causal="yes"), TypeError, ["causal"], True),
    (dict(causal=1), TypeError, ["causal"], False),
    (dict(causal=None), TypeError, ["causal"], False),
    (dict(quad_scale="big"), TypeError, ["quad_scale"], True),
    (dict(quad_scale=True), TypeError, ["quad_scale"], False),
    (dict(quad_scale=torch.tensor(0.5)), TypeError, ["quad_scale"], False),
    (dict(quad_scale=0.5j), TypeError, ["quad_scale"], False),
    (dict(quad_scale=[0.5]), TypeError, ["quad_scale"], False),
    (dict(quad_scale=float("inf")), ValueError, ["quad_scale", "finite"], False),
    (dict(quad_scale=float("nan")), ValueError, ["quad_scale", "finite"], False),
    (dict(lin_scale="x"), TypeError, ["lin_scale"], False),
    (dict(lin_scale=False), TypeError, ["lin_scale"], False),
    (dict(lin_scale=torch.tensor(1.0)), TypeError, ["lin_scale"], False),
    (dict(lin_scale=float("-inf")), ValueError, ["lin_scale", "finite"], False),
    (dict(lin_scale=float("nan")), ValueError, ["lin_scale"], True),
    (dict(backend="cuda"), ValueError, ["backend"], True),
    (dict(backend=None), ValueError, ["backend"], False),
    (dict(backend="Triton"), ValueError, ["backend"], False),
    # rel_bias: wrong length, rank, dtype, type, device
    (dict(rel_bias=torch.randn(2 * C)), ValueError, ["rel_bias", f"({2 * C - 1},)"], True),
    # C is chunk_size even when the sequence is shorter than one chunk: not 2T - 1
    (
        dict(chunk_size=16, rel_bias=torch.randn(2 * T - 1)),
        ValueError,
        ["rel_bias", "(31,)"],
        False,
    ),
    (
        dict(chunk_size=None, rel_bias=torch.randn(2 * C - 1)),
        ValueError,
        ["rel_bias", "chunk_size=None", f"({2 * T - 1},)"],
        True,
    ),
    (dict(rel_bias=torch.tensor(0.5)), ValueError, ["rel_bias", "shape"], False),
    (dict(rel_bias=torch.randn(0)), ValueError, ["rel_bias", "shape"], False),
    (dict(rel_bias=torch.randn(1, 2 * C - 1)), ValueError, ["rel_bias", "shape"], False),
    (dict(rel_bias=torch.randn(2 * C - 1, 1)), ValueError, ["rel_bias", "shape"], True),
    (dict(rel_bias=torch.arange(2 * C - 1)), TypeError, ["rel_bias", "floating"], True),
    (
        dict(rel_bias=torch.ones(2 * C - 1, dtype=torch.bool)),
        TypeError,
        ["rel_bias", "floating"],
        False,
    ),
    (
        dict(rel_bias=torch.randn(2 * C - 1, dtype=torch.complex64)),
        TypeError,
        ["rel_bias", "floating"],
        False,
    ),
    (dict(rel_bias=[0.0] * (2 * C - 1)), TypeError, ["rel_bias", "Tensor"], True),
    (
        dict(rel_bias=np.zeros(2 * C - 1, dtype=np.float32)),
        TypeError,
        ["rel_bias", "Tensor"],
        False,
    ),
    (
        dict(rel_bias=torch.randn(2 * C - 1, device="meta")),
        ValueError,
        ["rel_bias", "device"],
        True,
    ),
]


def _row_id(changes):
    def short(value):
        if isinstance(value, torch.Tensor):
            return f"{str(value.dtype).split('.')[-1]}{list(value.shape)}{value.device.type}"
        if isinstance(value, np.ndarray):
            return f"ndarray{list(value.shape)}"
        return type(value).__name__ if isinstance(value, list) else repr(value)

    return ",".join(f"{k}={short(v)}" for k, v in changes.items())


def _bad_rows():
    for op, table in (("mixed_chunk_attention", MIXED_BAD), ("flash_attention", FLASH_BAD)):
        for changes, exception, words in table:
            yield op, changes, exception, words, BACKENDS
    for changes, exception, words, in_validation in OPTION_BAD:
        yield "flash_attention", changes, exception, words, BACKENDS
        # mixed_chunk_attention rows test_validation.py has run there on "torch"/"reference"
        yield (
            "mixed_chunk_attention",
            changes,
            exception,
            words,
            ("triton",) if in_validation else BACKENDS,
        )


BAD_PARAMS = [
    pytest.param(
        op,
        changes,
        exception,
        words,
        backend,
        id=f"{op.split('_')[0]}-{backend}-{_row_id(changes)}",
    )
    for op, changes, exception, words, backends in _bad_rows()
    for backend in backends
]


@pytest.mark.parametrize("op,changes,exception,words,backend", BAD_PARAMS)
def test_bad_input_raises_a_clear_error(op, changes, exception, words, backend):
    check_raises(lambda: call(op, changes, backend), exception, words)


@pytest.mark.parametrize(
    "changes,exception,words",
    VALIDATION_BAD_INPUTS,
    ids=[_row_id(c) for c, _, _ in VALIDATION_BAD_INPUTS],
)
def test_validation_table_on_the_triton_backend(changes, exception, words):
    """validation_cases.py's rows, which test_validation.py runs on "torch" and "reference", on
    "triton"."""
    changes = {"backend": "triton", **changes}  # a row may set its own (bad) backend
    check_raises(lambda: validation_call(**changes), exception, words)


# ---------------------------------------------------------------------------------------------
# Huge chunk sizes: one chunk longer than the sequence. With explicit scales the result must be
# the chunk_size=None result (one chunk as long as the sequence), or a clear error.

HUGE_DEADLINE_S = 5.0  # a normal call here takes ~0.1-0.3 s


def huge_chunk_case(op, backend, chunk_size):
    """Output of `op` with a huge chunk_size, checked against chunk_size=None; raises on a
    mismatch. Module-level so that a subprocess can run it (see _returns_within)."""
    torch.manual_seed(0)
    changes = dict(quad_scale=0.3, lin_scale=0.2, causal=False)
    args = mixed_inputs() if op == "mixed_chunk_attention" else flash_inputs()
    changes.update({k: v.to(DEVICE) for k, v in args.items()})
    try:
        out = call(op, dict(changes, chunk_size=chunk_size), backend)
    except (ValueError, TypeError, OverflowError) as error:
        assert "chunk_size" in str(error), f"unclear error for chunk_size={chunk_size}: {error!r}"
        return "clear error"
    expected = call(op, dict(changes, chunk_size=None), "torch")
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)
    return "works"


class _Deadline(Exception):
    pass


def _returns_within(seconds, op, backend, chunk_size, in_subprocess=DEVICE == "cuda"):
    """huge_chunk_case's outcome, or AssertionError when it runs past `seconds`.

    On the CPU (the Triton interpreter is Python) an interval timer interrupts the call; a GPU
    kernel cannot be interrupted, so there the case runs in a subprocess that is killed. An
    exception in the subprocess is raised here again with its type and message."""
    if in_subprocess:
        tests = os.path.dirname(os.path.abspath(__file__))
        code = (
            f"import sys; sys.path[:0] = [{tests!r}, {os.path.dirname(tests)!r}]\n"
            f"import test_bad_inputs as t\n"
            f"try:\n    print('RESULT', t.huge_chunk_case({op!r}, {backend!r}, {chunk_size!r}))\n"
            f"except Exception as e:\n    print('RAISED', type(e).__name__, repr(str(e)))\n"
        )
        try:
            done = subprocess.run(
                [sys.executable, "-c", code], capture_output=True, text=True, timeout=seconds + 30
            )  # + interpreter and CUDA start-up
        except subprocess.TimeoutExpired:
            raise AssertionError(
                f"{op}(chunk_size={chunk_size}, backend={backend!r}) did not "
                f"return within {seconds} + 30 s (hangs)"
            ) from None
        assert done.returncode == 0, f"the subprocess crashed: {done.stderr[-3000:]}"
        kind, _, rest = done.stdout.strip().splitlines()[-1].partition(" ")
        if kind == "RAISED":
            name, _, message = rest.partition(" ")
            exception = getattr(builtins, name, None)
            if not (isinstance(exception, type) and issubclass(exception, Exception)):
                exception = RuntimeError
            raise exception(f"(in a subprocess) {name}: {ast.literal_eval(message)}")
        return rest

    expired = []

    def on_alarm(signum, frame):
        expired.append(True)
        raise _Deadline()

    previous = signal.signal(signal.SIGALRM, on_alarm)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        return huge_chunk_case(op, backend, chunk_size)
    except Exception:
        # The Triton interpreter re-raises exceptions from inside a kernel as InterpreterError.
        if expired:
            raise AssertionError(
                f"{op}(chunk_size={chunk_size}, backend={backend!r}) did not "
                f"return within {seconds} s (hangs)"
            ) from None
        raise
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)


def _huge_params():
    for op in OPS:
        for backend in BACKENDS:
            for chunk_size in (10**12, 2**64):
                yield pytest.param(
                    op, backend, chunk_size, id=f"{op.split('_')[0]}-{backend}-{chunk_size}"
                )


@pytest.mark.parametrize("op,backend,chunk_size", list(_huge_params()))
def test_huge_chunk_size_works_or_raises_a_clear_error(op, backend, chunk_size):
    assert _returns_within(HUGE_DEADLINE_S, op, backend, chunk_size) in ("works", "clear error")


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize("backend", BACKENDS)
def test_huge_chunk_size_quadratic_only(op, backend):
    """Without the linear part (no state scan) a huge chunk_size works on every backend."""
    torch.manual_seed(0)
    if op == "mixed_chunk_attention":
        changes = dict(q_lin=None, k_lin=None)
    else:
        changes = dict(gamma=torch.randn(2, S), beta=torch.randn(2, S))
    changes.update(quad_scale=0.3, causal=True)
    args = mixed_inputs() if op == "mixed_chunk_attention" else flash_inputs()
    # On the device the Triton backend runs on (a GPU when there is one).
    changes = {
        key: value.to(DEVICE) if isinstance(value, torch.Tensor) else value
        for key, value in {**args, **changes}.items()
    }
    out = call(op, dict(changes, chunk_size=10**12), backend)
    expected = call(op, dict(changes, chunk_size=None), "torch")
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# NaN / Inf inputs reach exactly the outputs (and gradients) that depend on them.

TN, CN = 12, 4  # three chunks of 4 tokens
TOKEN = 5  # in chunk 1: an earlier chunk (0) and a later one (2) exist
NAN, INF = float("nan"), float("inf")
EVERY_ROW = frozenset(range(TN))
TOKEN_INPUTS = ("q_quad", "k_quad", "q_lin", "k_lin", "v", "z", "u")  # (1, TN, width) tensors


def _same_chunk(j, causal):
    rows = range((j // CN) * CN, (j // CN + 1) * CN)
    return {i for i in rows if i < TN and (i >= j or not causal)}


def _later_chunks(j, causal):
    return {i for i in range(TN) if i // CN > j // CN or not causal}


def _reach(name, j, causal, linear):
    """Output rows that may depend on input `name` at token j (a superset in the corner cases
    where a term is exactly zero, e.g. q_lin of the first chunk times its empty causal state).
    Inputs without a token axis (rel_bias, gamma, beta) reach every row."""
    if name not in TOKEN_INPUTS:
        return set(EVERY_ROW)
    quad_key = _same_chunk(j, causal)
    lin_key = _later_chunks(j, causal) if linear else set()
    return {
        "q_quad": {j},
        "k_quad": quad_key,
        "q_lin": {j},
        "k_lin": lin_key,
        "v": quad_key | lin_key,
        "u": {j},
        "z": {j} | quad_key | lin_key,
    }[name]


def _dependent_rows(name, causal, linear):
    """Rows of the output that must be non-finite when input `name` is NaN at token TOKEN (or
    on one entry of rel_bias / gamma / beta), in exact arithmetic."""
    j = TOKEN
    quad_key = _same_chunk(j, causal)
    lin_key = _later_chunks(j, causal) if linear else set()
    lin_query = {j} if linear and (j // CN > 0 or not causal) else set()
    rows_with_earlier_chunk = {i for i in range(TN) if i // CN > 0 or not causal}
    return {
        "q_quad": {j},
        "k_quad": quad_key,
        "q_lin": lin_query,
        "k_lin": lin_key,
        "v": quad_key | lin_key,
        "u": {j},
        "z": {j} | quad_key | lin_key | lin_query,
        "rel_bias": set(EVERY_ROW),  # offset 0: every row attends itself
        # (role, feature) entries of gamma / beta: the whole role is non-finite
        "gamma0": set(EVERY_ROW),
        "gamma1": set(EVERY_ROW),
        "beta1": set(EVERY_ROW),
        "gamma2": rows_with_earlier_chunk if linear else set(),
        "beta3": rows_with_earlier_chunk if linear else set(),
    }[name]


def _nan_cases():
    # (op, where, value, linear/roles, causal)
    mixed = [
        ("q_quad", NAN),
        ("k_quad", NAN),
        ("q_lin", NAN),
        ("q_lin", INF),
        ("k_lin", NAN),
        ("k_lin", INF),
        ("v", NAN),
        ("v", INF),
        ("rel_bias", NAN),
        ("rel_bias", INF),
    ]
    for where, value in mixed:
        for causal in (True, False):
            for linear in (True, False):
                if not linear and where in ("q_lin", "k_lin"):
                    continue
                yield "mixed_chunk_attention", where, value, linear, causal
    flash = [
        ("z", NAN),
        ("z", INF),
        ("u", NAN),
        ("u", INF),
        ("v", NAN),
        ("gamma0", NAN),
        ("gamma1", NAN),
        ("gamma2", NAN),
        ("beta1", NAN),
        ("beta3", INF),
        ("rel_bias", NAN),
    ]
    for where, value in flash:
        for linear in (True, False):
            if not linear and where in ("gamma2", "beta3"):
                continue
            yield "flash_attention", where, value, linear, True


def _known_leak(where, causal):
    """Why the case fails today, or None. A non-finite gate u_t makes the attention's upstream
    gradient dO_t non-finite, and dV = A^T dO multiplies it by the zero weights of the keys
    after t in its causal chunk: their dv becomes NaN although t does not attend them. Removing
    it needs the upstream gradient selected per pair in the value-gradient product (every
    backend); left for later, see the README's Status."""
    if where == "u" and causal:
        return "a non-finite upstream gradient reaches dv of unattended keys (dV = A^T dO)"
    return None


def _nan_params():
    for op, where, value, linear, causal in _nan_cases():
        for backend in BACKENDS:
            leak = _known_leak(where, causal)
            yield pytest.param(
                op,
                where,
                value,
                linear,
                causal,
                backend,
                id=f"{op.split('_')[0]}-{backend}-{where}={value}-"
                f"{'lin' if linear else 'quad'}-{'causal' if causal else 'full'}",
                marks=[pytest.mark.xfail(strict=True, raises=AssertionError, reason=leak)]
                if leak
                else [],
            )


@pytest.mark.filterwarnings("ignore::RuntimeWarning")  # numpy, inside the Triton interpreter
@pytest.mark.parametrize("op,where,value,linear,causal,backend", list(_nan_params()))
def test_nan_and_inf_propagate_and_nothing_hangs(op, where, value, linear, causal, backend):
    """A non-finite input makes every output row that depends on it non-finite, and leaves
    finite every output row and every gradient row that cannot see it: the gradient of input
    y at token r stays finite when no output row depends on both y_r and the bad value (each
    term of dL/dy_r = sum_i (d out_i / d y_r)^T dO_i is then a function of finite inputs)."""
    gen = torch.Generator().manual_seed(3)

    def rand(*shape, shift=0.0):
        return (shift + torch.randn(*shape, generator=gen)).to(DEVICE)

    if op == "mixed_chunk_attention":
        inputs = dict(
            q_quad=rand(1, TN, S),
            k_quad=rand(1, TN, S),
            q_lin=rand(1, TN, S) if linear else None,
            k_lin=rand(1, TN, S) if linear else None,
            v=rand(1, TN, E),
            rel_bias=rand(2 * CN - 1),
        )
    else:
        roles = 4 if linear else 2
        inputs = dict(
            z=rand(1, TN, S),
            gamma=rand(roles, S, shift=1.0),
            beta=rand(roles, S),
            v=rand(1, TN, E),
            u=rand(1, TN, E),
            rel_bias=rand(2 * CN - 1),
        )
    if where == "rel_bias":
        inputs["rel_bias"][CN - 1] = value  # offset 0
    elif where[:-1] in ("gamma", "beta"):
        inputs[where[:-1]][int(where[-1]), 1] = value
    else:
        inputs[where][0, TOKEN, 1] = value
    leaves = {n: x.requires_grad_() if x is not None else None for n, x in inputs.items()}
    out = call_op(op, leaves, chunk_size=CN, causal=causal, backend=backend)
    out.sum().backward()  # nothing hangs or crashes in the backward either
    assert all(x.grad is not None for x in leaves.values() if x is not None)

    non_finite = set((~torch.isfinite(out[0])).any(dim=-1).nonzero().flatten().tolist())
    expected = _dependent_rows(where, causal, linear)
    if value == INF and where in ("z",):
        expected = {TOKEN} if linear and (TOKEN // CN > 0 or not causal) else set()
    missing = sorted(expected - non_finite)
    assert not missing, (
        f"rows {missing} depend on the non-finite {where} but are finite "
        f"(non-finite rows: {sorted(non_finite)})"
    )

    bad_reach = _reach(where, TOKEN, causal, linear)
    leaked = sorted(non_finite - bad_reach)
    assert not leaked, (
        f"output rows {leaked} cannot see the non-finite {where} at token "
        f"{TOKEN} but are non-finite"
    )
    for name in TOKEN_INPUTS:
        if leaves.get(name) is None:
            continue
        bad_grad_rows = set(
            (~torch.isfinite(leaves[name].grad[0])).any(dim=-1).nonzero().flatten().tolist()
        )
        leaked = sorted(r for r in bad_grad_rows if not _reach(name, r, causal, linear) & bad_reach)
        assert not leaked, (
            f"d{name} rows {leaked} are non-finite, but no output row depends "
            f"on both {name} there and the non-finite {where}"
        )


# ---------------------------------------------------------------------------------------------
# Backend limits: S > 256 and CPU tensors without the interpreter.


def _wide_call(op, backend, S_wide=257, requires_grad=False):
    gen = torch.Generator().manual_seed(4)

    def rand(*shape, shift=0.0):
        return (shift + torch.randn(*shape, generator=gen)).to(DEVICE).requires_grad_(requires_grad)

    Tw = 6
    if op == "mixed_chunk_attention":
        leaves = [rand(2, Tw, S_wide) * 0.1 for _ in range(4)] + [rand(2, Tw, E)]
        out = mixed_chunk_attention(*leaves, chunk_size=4, rel_bias=rand(7), backend=backend)
    else:
        leaves = [
            rand(2, Tw, S_wide) * 0.1,
            rand(4, S_wide, shift=1.0),
            rand(4, S_wide),
            rand(2, Tw, E),
            rand(2, Tw, E),
        ]
        out = flash_attention(
            *leaves[:4], u=leaves[4], chunk_size=4, rel_bias=rand(7), backend=backend
        )
    return out


@pytest.mark.parametrize("op", OPS)
def test_wide_features_refused_by_triton_and_routed_by_auto(op):
    with pytest.raises(ValueError) as info:
        _wide_call(op, "triton")
    message = str(info.value)
    assert "S" in message and "256" in message and "257" in message, message
    auto = _wide_call(op, "auto")
    torch.testing.assert_close(auto, _wide_call(op, "torch"), rtol=0, atol=0)
    # 256 itself is accepted by the kernels
    assert _wide_call(op, "triton", S_wide=256).shape == (2, 6, E)


@pytest.mark.skipif(DEVICE == "cuda", reason="CPU tensors only")
@pytest.mark.parametrize("op", OPS)
def test_triton_on_cpu_without_the_interpreter_says_so(op, monkeypatch):
    """TRITON_INTERPRET is read when the op runs: without it, CPU tensors cannot take the
    kernels ("triton" raises, naming the device and the way out) and "auto" uses "torch"."""
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    check_raises(lambda: call(op, {}, "triton"), ValueError, ["triton", "cpu", "TRITON_INTERPRET"])
    torch.manual_seed(0)
    args = mixed_inputs() if op == "mixed_chunk_attention" else flash_inputs()
    torch.testing.assert_close(call(op, args, "auto"), call(op, args, "torch"), rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------
# Valid extremes.


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize(
    "batch,T_",
    [((0,), 7), ((2, 0), 7), ((2,), 0), ((), 0)],
    ids=["batch0", "batch2x0", "T0", "nobatch-T0"],
)
def test_empty_inputs_give_empty_outputs_and_gradients(batch, T_, op, backend):
    def rand(*shape):
        return torch.randn(*shape).to(DEVICE).requires_grad_()

    bias = rand(2 * C - 1)
    if op == "mixed_chunk_attention":
        leaves = [rand(*batch, T_, S) for _ in range(4)] + [rand(*batch, T_, E), bias]
        out = mixed_chunk_attention(*leaves[:5], chunk_size=C, rel_bias=bias, backend=backend)
    else:
        leaves = [
            rand(*batch, T_, S),
            rand(4, S),
            rand(4, S),
            rand(*batch, T_, E),
            rand(*batch, T_, E),
            bias,
        ]
        out = flash_attention(
            *leaves[:4], u=leaves[4], chunk_size=C, rel_bias=bias, backend=backend
        )
    assert out.shape == (*batch, T_, E) and out.numel() == 0
    grads = torch.autograd.grad(out, leaves, torch.ones_like(out), allow_unused=True)
    for leaf, grad in zip(leaves, grads):
        assert grad is None or (grad.shape == leaf.shape and (grad == 0).all())


@pytest.mark.parametrize("op", OPS)
@pytest.mark.parametrize(
    "T_,chunk_size",
    [
        (20, 8),
        # chunks longer than 256 keys: the kernels gather the bias from the (2C - 1,) vector
        (300, None),
    ],
    ids=["short-chunks", "chunk-longer-than-256"],
)
def test_non_contiguous_rel_bias(op, T_, chunk_size):
    gen = torch.Generator().manual_seed(6)

    def rand(*shape, shift=0.0):
        return (shift + torch.randn(*shape, generator=gen)).to(DEVICE)

    C_ = chunk_size or T_
    strided = rand(2 * (2 * C_ - 1))[::2]
    assert not strided.is_contiguous()
    if op == "mixed_chunk_attention":
        args = [rand(1, T_, 3) for _ in range(4)] + [rand(1, T_, 4)]

        def run(bias, backend):
            return mixed_chunk_attention(
                *args, chunk_size=chunk_size, rel_bias=bias, quad_scale=0.5, backend=backend
            )
    else:
        z, gamma, beta, v = rand(1, T_, 3), rand(4, 3, shift=1.0), rand(4, 3), rand(1, T_, 4)

        def run(bias, backend):
            return flash_attention(
                z,
                gamma,
                beta,
                v,
                chunk_size=chunk_size,
                rel_bias=bias,
                quad_scale=0.5,
                backend=backend,
            )

    expected = run(strided.contiguous(), "torch")
    for backend in BACKENDS:
        torch.testing.assert_close(
            run(strided, backend),
            expected,
            rtol=1e-5,
            atol=1e-4,
            msg=lambda m: f"backend={backend}: {m}",
        )


# ---------------------------------------------------------------------------------------------
# Sizes and flags: zero features, numpy bools, causal of another type


def with_zero_features(op, which):
    """Inputs of `op` with S = 0 (queries and keys) or E = 0 (values and gate)."""
    inputs = op_inputs(op)
    for name, x in inputs.items():
        feature = "E" if name in ("v", "u") else "S"
        if feature == which and name != "rel_bias":
            inputs[name] = x[..., :0]
    return inputs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("which", ["S", "E"])
@pytest.mark.parametrize("op", OPS)
def test_zero_features_are_refused(op, which, backend):
    """S and E are positive sizes (docs/contract.md section 2; T = 0 is the one empty size
    allowed). With
    S = 0 the ops returned the bias-only attention (zeros without a bias) without a word."""
    named = {"S": "q_quad" if op == "mixed_chunk_attention" else "z", "E": "v"}[which]
    check_raises(
        lambda: call_op(op, with_zero_features(op, which), chunk_size=C, backend=backend),
        ValueError,
        [named, f"{which} = 0"],
    )


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("op", OPS)
def test_numpy_bools_are_bools(op, backend):
    inputs = op_inputs(op)
    for causal in (True, False):
        out = call_op(op, inputs, chunk_size=C, causal=np.bool_(causal), backend=backend)
        expected = call_op(op, inputs, chunk_size=C, causal=causal, backend=backend)
        torch.testing.assert_close(out, expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    "causal,type_words",
    [
        (1, "got int"),
        (np.int64(1), "got numpy.int64"),
        (torch.tensor(True), "got torch.Tensor"),
        (None, "got NoneType"),
        ("True", "got str"),
    ],
)
@pytest.mark.parametrize("op", OPS)
def test_causal_of_another_type_is_refused_naming_the_type(op, causal, type_words):
    check_raises(
        lambda: call_op(op, op_inputs(op), chunk_size=C, causal=causal, backend="torch"),
        TypeError,
        ["causal must be a bool", type_words],
    )
