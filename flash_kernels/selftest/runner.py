"""Self-test of the Triton kernels on this machine: `python -m flash_kernels.selftest`.

Runs every kernel path of the package -- forward, both backward kernels, the state scans,
hoisted and long-chunk (non-hoisted) tiles, causal and not, with and without rel_bias, packed
documents with an initial and a final state, the fused op with its gate, and the decoding
step -- on small random inputs of every dtype the device supports, and compares the output
and EVERY gradient with the float64 reference (`backend="reference"`, computed on the CPU from
the same rounded inputs). Each row of its table is one path in one dtype: the quantity with
the worst rms error ratio, that ratio against its tolerance (flash_kernels/core/tolerances.py,
the table the test suite uses), the verdict, and the seconds of the first run (compile included
on a GPU) and of a second, timed run. An environment block follows (device, compute
capability, driver, CUDA runtime, torch, Triton, the ptxas Triton compiles with, Python),
which is what a bug report needs.

Why it exists: a miscompiled kernel gives wrong numbers, not an error. Triton 3.2-3.6 on
Hopper, for instance, miscompiles register tensors transposed into tl.dot, which shows up only
as wrong gradients. The shapes here give each kernel several programs and tiles (chunks of 128
in 64-row tiles, chunks of 260 and 264 on the long-chunk path, T not a multiple of the chunk,
S = 40 and E = 72 not powers of two, a leading batch dim), and the kernels launched are checked
against the path's name (a path that silently fell back to PyTorch fails). Path names:
"mixed" mixed_chunk_attention, "flash" flash_attention (roles from z), "decode" one decoding
step; "hoist" chunks of at most 256 tokens (relu^2 weights formed once per query block),
"long" longer chunks (scores recomputed per value tile); "full" non-causal; "+bias" rel_bias;
"+gate" the gate u; "packed+state" cu_seqlens with documents of lengths 0 to 260, an initial
state and the final state (causal, rel_bias).

Devices: CUDA (bfloat16 where torch.cuda.is_bf16_supported(), float16, float32), or the
CPU under TRITON_INTERPRET=1 set before flash_kernels is imported (float32, float16: the
interpreter has no bfloat16), which is how the test suite runs it.

    python -m flash_kernels.selftest [--device cuda|cpu] [--dtypes fp32 fp16 bf16]
                                     [--seed N] [--paths SUBSTRING ...] [--json PATH]

Exit status: 0 every row passed; 1 a row failed (or raised); 2 the Triton backend cannot run
here (no CUDA device and no TRITON_INTERPRET=1, no usable triton) or a bad argument; 130
interrupted (the rows so far are printed and written). From Python: `flash_kernels.self_test()`
returns a `SelfTestReport` (`.passed`, `.rows`, `str(report)`).
"""

import argparse
import contextlib
import json
import math
import os
import platform
import shutil
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from typing import NamedTuple

import torch

from .. import _version
from ..attention import flash_attention, mixed_chunk_attention
from ..backends.triton import launch as triton_launch
from ..core.environment import INTERPRETED_KERNELS, triton_interpret_enabled
from ..core.roles import scale_offset_roles
from ..core.tolerances import rms_ratio
from ..decoding import DecodeCache, flash_attention_decode, mixed_chunk_decode

S_FEATURES = 40  # not a power of two: the 64-wide feature tile is partly masked
E_FEATURES = 72  # not a power of two, over two 64-wide value tiles (three of 32)
BATCH = 2  # a leading batch dim, folded into the launch grid

DTYPE_NAMES = {
    "fp32": torch.float32,
    "float32": torch.float32,
    "fp16": torch.float16,
    "float16": torch.float16,
    "half": torch.float16,
    "bf16": torch.bfloat16,
    "bfloat16": torch.bfloat16,
}
SHORT_NAMES = {torch.float32: "fp32", torch.float16: "fp16", torch.bfloat16: "bf16"}

EXIT_PASSED, EXIT_FAILED, EXIT_UNAVAILABLE, EXIT_INTERRUPTED = 0, 1, 2, 130


class SelfTestUnavailable(RuntimeError):
    """The Triton backend cannot run on this machine (or on the device asked for)."""


# ---------------------------------------------------------------------------------------------
# The paths
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class OpPath:
    """One configuration of mixed_chunk_attention ("mixed") or flash_attention ("flash"),
    forward and backward. `lengths`: packed documents (cu_seqlens) with an initial state and
    the final state (whose gradient flows back too); `hoisted`: the tile path the kernels must
    take (chunks of at most 256 tokens form their relu^2 weights once per query block)."""

    name: str
    op: str
    chunk_size: int | None
    hoisted: bool
    T: int = 200
    causal: bool = True
    bias: bool = True
    linear: bool = True
    gate: bool = False
    lengths: tuple[int, ...] | None = None
    batch: int = BATCH

    @property
    def check(self):
        return "mixed_chunk_attention" if self.op == "mixed" else "flash_attention"

    @property
    def packed(self):
        return self.lengths is not None

    @property
    def tokens(self):
        return sum(self.lengths) if self.packed else self.T

    @property
    def resolved_chunk(self):
        """C: chunk_size, or the sequence (the longest document when packed) for None."""
        if self.chunk_size is not None:
            return self.chunk_size
        return max(self.lengths) if self.packed else self.T


@dataclass(frozen=True)
class DecodePath:
    """B = len(starts) sequences at different positions of their chunks decode `steps` tokens
    each through mixed_chunk_decode ("mixed") or flash_attention_decode ("flash"); one
    sequence completes a chunk on the way (the fold into the state)."""

    name: str
    op: str
    chunk_size: int = 64
    starts: tuple[int, ...] = (0, 37, 61)
    steps: int = 6
    bias: bool = True
    gate: bool = False
    check = "decode"


PATHS = (
    OpPath("mixed C=128 hoist causal +bias", "mixed", 128, True),
    OpPath("mixed C=128 hoist full +bias", "mixed", 128, True, causal=False),
    OpPath("mixed C=128 hoist causal", "mixed", 128, True, bias=False),
    OpPath("mixed C=264 long causal +bias", "mixed", 264, False, T=300, batch=1),
    OpPath("mixed C=264 long full +bias", "mixed", 264, False, T=300, causal=False, batch=1),
    OpPath(
        "mixed C=None long causal quad-only", "mixed", None, False, T=260, linear=False, batch=1
    ),
    OpPath("mixed C=128 hoist packed+state", "mixed", 128, True, lengths=(150, 0, 37, 90)),
    OpPath("mixed C=None long packed+state", "mixed", None, False, lengths=(260, 45), batch=1),
    OpPath("flash C=128 hoist causal +gate", "flash", 128, True, gate=True),
    OpPath(
        "flash C=128 hoist packed+state+gate",
        "flash",
        128,
        True,
        gate=True,
        lengths=(150, 0, 37, 90),
    ),
    OpPath(
        "flash C=None long full +gate",
        "flash",
        None,
        False,
        T=260,
        causal=False,
        bias=False,
        gate=True,
        batch=1,
    ),
    DecodePath("decode mixed C=64 +bias", "mixed"),
    DecodePath("decode flash C=64 +gate", "flash", gate=True),
)
PATH_NAMES = tuple(path.name for path in PATHS)
LEGEND = (
    "legend: hoist = chunks of <= 256 tokens, long = longer ones, full = non-causal, +bias =",
    "rel_bias, packed+state = cu_seqlens with an initial and a final state; worst = the output",
    "or gradient with the largest rms(kernel - float64 reference) / rms(reference)",
)


# ---------------------------------------------------------------------------------------------
# Inputs, the kernels' run and the reference
# ---------------------------------------------------------------------------------------------


def _randn(gen, *shape, scale=1.0, shift=0.0):
    return shift + scale * torch.randn(*shape, generator=gen, dtype=torch.float64)


def _query_key_scale(C):
    """Queries and keys of this std make quad_scale * <q, k> ~ N(0, 1) with the default
    quad_scale = 1 / C: relu^2 weights O(1), about half of them zero (both relu branches)."""
    return math.sqrt(C / math.sqrt(S_FEATURES))


# Parameters stay float32 for half inputs, as a model keeps them (and as the tests do).
_FLOAT32_PARAMETERS = ("rel_bias", "gamma", "beta", "initial_state")


def _leaves(values, dtype, device):
    """(kernel leaves, reference leaves): the values in `dtype` on `device` (parameters in
    float32), and the same rounded values as float64 CPU leaves, every one requiring grad."""
    low, exact = {}, {}
    for name, x in values.items():
        if x is None:
            low[name] = exact[name] = None
            continue
        wanted = torch.float32 if name in _FLOAT32_PARAMETERS else dtype
        rounded = x.to(wanted)
        low[name] = rounded.to(device).requires_grad_()
        exact[name] = rounded.double().requires_grad_()
    return low, exact


class OpProblem:
    """Random inputs of one OpPath in one dtype, the float64 reference's output and
    gradients (computed once), and `run()`: the Triton op forward and backward."""

    def __init__(self, path, dtype, device, gen):
        self.path, self.dtype, self.device = path, dtype, device
        B, T, C = path.batch, path.tokens, path.resolved_chunk
        S, E = S_FEATURES, E_FEATURES
        sigma = _query_key_scale(C)
        values = {}
        if path.op == "mixed":
            values["q_quad"] = _randn(gen, B, T, S, scale=sigma)
            values["k_quad"] = _randn(gen, B, T, S, scale=sigma)
            values["q_lin"] = _randn(gen, B, T, S) if path.linear else None
            values["k_lin"] = _randn(gen, B, T, S) if path.linear else None
        else:  # roles z * gamma + beta of about the same sizes as the mixed op's
            roles = 4 if path.linear else 2
            size = torch.tensor([1.0, 1.0, 1 / sigma, 1 / sigma][:roles], dtype=torch.float64)
            values["z"] = _randn(gen, B, T, S, scale=sigma)
            values["gamma"] = _randn(gen, roles, S, scale=0.3, shift=1.0) * size[:, None]
            values["beta"] = _randn(gen, roles, S, scale=0.3 * sigma) * size[:, None]
        values["v"] = _randn(gen, B, T, E)
        if path.op == "flash":
            values["u"] = _randn(gen, B, T, E) if path.gate else None
        values["rel_bias"] = _randn(gen, 2 * C - 1, scale=0.5) if path.bias else None
        self.cu_seqlens = None
        if path.packed:
            self.cu_seqlens = torch.tensor((0,) + path.lengths).cumsum(0)
            # the unscaled sum of k_lin^T v over earlier tokens: about sqrt(C) at C tokens
            values["initial_state"] = _randn(gen, B, len(path.lengths), S, E, scale=math.sqrt(C))
        self.grad_out = _randn(gen, B, T, E)
        self.grad_final = _randn(gen, B, len(path.lengths), S, E) if path.packed else None
        self.low, exact = _leaves(values, dtype, device)
        self.expected = self._forward_backward(exact, "reference", torch.device("cpu"))

    def run(self):
        """The Triton op's output (and final state) and every gradient, by name."""
        return self._forward_backward(self.low, "triton", self.device)

    def _forward_backward(self, leaves, backend, device):
        path = self.path
        options = {
            "chunk_size": path.chunk_size,
            "causal": path.causal,
            "rel_bias": leaves["rel_bias"],
            "backend": backend,
        }
        if path.packed:
            options.update(
                cu_seqlens=self.cu_seqlens.to(device),
                initial_state=leaves["initial_state"],
                output_final_state=True,
            )
        if path.op == "mixed":
            result = mixed_chunk_attention(
                leaves["q_quad"],
                leaves["k_quad"],
                leaves["q_lin"],
                leaves["k_lin"],
                leaves["v"],
                **options,
            )
        else:
            result = flash_attention(
                leaves["z"], leaves["gamma"], leaves["beta"], leaves["v"], u=leaves["u"], **options
            )
        out, final = result if path.packed else (result, None)
        outputs, upstream = [out], [self.grad_out.to(device=device, dtype=out.dtype)]
        quantities = {"out": out}
        if final is not None:
            outputs.append(final)
            upstream.append(self.grad_final.to(device=device, dtype=final.dtype))
            quantities["final_state"] = final
        names = [name for name, x in leaves.items() if x is not None]
        grads = torch.autograd.grad(outputs, [leaves[name] for name in names], upstream)
        quantities.update((f"d{name}", grad) for name, grad in zip(names, grads, strict=True))
        return quantities

    def expected_launches(self):
        """(kernel names, constexprs every launch that has them must show)."""
        path = self.path
        names = {
            "mixed_chunk_fwd_kernel",
            "mixed_chunk_bwd_query_kernel",
            "mixed_chunk_bwd_key_kernel",
        }
        if path.linear:
            names.add("chunk_state_scan_kernel")
        constexprs = {
            "FROM_Z": path.op == "flash",
            "HOIST_SCORES": path.hoisted,
            "CAUSAL": path.causal,
            "IS_VARLEN": path.packed,
            "HAS_BIAS": path.bias,
            "HAS_GATE": path.gate,
        }
        return names, constexprs


class DecodeProblem:
    """Random tokens of one DecodePath in one dtype; `run()` fills a DecodeCache as a prefill
    would leave it at each sequence's start position, decodes `steps` tokens per sequence with
    the Triton kernel and returns the outputs and the cache's state; the reference is the full
    op (float64, dense) at those tokens and the float64 state of the completed chunks."""

    def __init__(self, path, dtype, device, gen):
        self.path, self.dtype, self.device = path, dtype, device
        B, C, S, E = len(path.starts), path.chunk_size, S_FEATURES, E_FEATURES
        T = max(path.starts) + path.steps
        sigma = _query_key_scale(C)
        values = {}
        if path.op == "mixed":
            values.update(
                q_quad=_randn(gen, B, T, S, scale=sigma),
                k_quad=_randn(gen, B, T, S, scale=sigma),
                q_lin=_randn(gen, B, T, S),
                k_lin=_randn(gen, B, T, S),
            )
        else:
            size = torch.tensor([1.0, 1.0, 1 / sigma, 1 / sigma], dtype=torch.float64)
            values.update(
                z=_randn(gen, B, T, S, scale=sigma),
                gamma=_randn(gen, 4, S, scale=0.3, shift=1.0) * size[:, None],
                beta=_randn(gen, 4, S, scale=0.3 * sigma) * size[:, None],
            )
        values["v"] = _randn(gen, B, T, E)
        if path.gate:
            values["u"] = _randn(gen, B, T, E)
        values["rel_bias"] = _randn(gen, 2 * C - 1, scale=0.5) if path.bias else None
        low, _ = _leaves(values, dtype, device)
        self.low = {name: None if x is None else x.detach() for name, x in low.items()}
        self.expected = self._reference()

    def _roles(self, tensors):
        """The four role tensors of the sequences: given (mixed), or formed from z as the ops
        form them, in float32 rounded to z's dtype (flash)."""
        if self.path.op == "mixed":
            return [tensors[name] for name in ("q_quad", "k_quad", "q_lin", "k_lin")]
        return scale_offset_roles(tensors["z"], tensors["gamma"], tensors["beta"])

    def _reference(self):
        """The full op in float64 (dense reference) on the roles the decoding step sees, at
        each decoded token, and the float64 state of each sequence's completed chunks. The
        roles are rounded to the dtype as the ops round them, so a half-precision row is not
        charged for that rounding (the decode tolerance is the plain op's)."""
        path, C = self.path, self.path.chunk_size

        def exact(x):
            return None if x is None else x.to("cpu", torch.float64)

        roles = [exact(role) for role in self._roles(self.low)]
        v = exact(self.low["v"])
        full = mixed_chunk_attention(
            *roles, v, chunk_size=C, rel_bias=exact(self.low["rel_bias"]), backend="reference"
        )
        if path.gate:
            full = exact(self.low["u"]) * full
        rows = torch.arange(len(path.starts))
        starts = torch.tensor(path.starts)
        out = torch.stack([full[rows, starts + i] for i in range(path.steps)], dim=1)
        states = []
        for b, start in enumerate(path.starts):
            complete = (start + path.steps) // C * C
            states.append(roles[3][b, :complete].T @ v[b, :complete])
        return {"out": out, "state": torch.stack(states)}

    def run(self):
        path, low, C = self.path, self.low, self.path.chunk_size
        B = len(path.starts)
        cache = DecodeCache.empty(
            B, S_FEATURES, E_FEATURES, chunk_size=C, dtype=self.dtype, device=self.device
        )
        roles = self._roles(low)
        for b, start in enumerate(path.starts):  # what a prefill leaves in the cache
            first = start // C * C
            cache.k_quad[b, : start - first] = roles[1][b, first:start]
            cache.k_lin[b, : start - first] = roles[3][b, first:start]
            cache.v[b, : start - first] = low["v"][b, first:start]
            done = roles[3][b, :first].double().T @ low["v"][b, :first].double()
            cache.state[b] = done.to(cache.state.dtype)
            cache.position[b] = start
        rows = torch.arange(B, device=self.device)
        starts = torch.tensor(path.starts, device=self.device)
        outs = []
        for i in range(path.steps):
            token = starts + i
            if path.op == "mixed":
                outs.append(
                    mixed_chunk_decode(
                        *(role[rows, token] for role in roles),
                        low["v"][rows, token],
                        cache,
                        rel_bias=low["rel_bias"],
                        backend="triton",
                    )
                )
            else:
                gate = low["u"][rows, token] if path.gate else None
                outs.append(
                    flash_attention_decode(
                        low["z"][rows, token],
                        low["gamma"],
                        low["beta"],
                        low["v"][rows, token],
                        cache,
                        u=gate,
                        rel_bias=low["rel_bias"],
                        backend="triton",
                    )
                )
        return {"out": torch.stack(outs, dim=1), "state": cache.state}

    def expected_launches(self):
        path = self.path
        return {"mixed_chunk_decode_kernel"}, {
            "FROM_Z": path.op == "flash",
            "HAS_GATE": path.gate,
            "HAS_BIAS": path.bias,
            "HAS_LINEAR": True,
            "FOLDS": True,
        }


def make_problem(path, dtype, device, seed):
    """The problem of `path` in `dtype` on `device`; its inputs depend only on seed and path
    (the dtypes of one run see the same numbers, rounded differently)."""
    index = PATHS.index(path) if path in PATHS else len(PATHS)
    gen = torch.Generator().manual_seed(seed * 1009 + index)
    kind = DecodeProblem if isinstance(path, DecodePath) else OpProblem
    return kind(path, dtype, device, gen)


def rms_error_ratio(actual, expected):
    """rms(actual - expected) / rms(expected) in float64 (inf for a non-finite value, a
    shape mismatch, or any error where the expected values are all zero)."""
    actual = actual.detach().to("cpu", torch.float64)
    expected = expected.detach().to("cpu", torch.float64)
    if actual.shape != expected.shape or not torch.isfinite(actual).all():
        return math.inf
    if actual.numel() == 0:
        return 0.0
    diff = (actual - expected).square().mean().sqrt().item()
    ref = expected.square().mean().sqrt().item()
    if ref == 0.0:
        return 0.0 if diff == 0.0 else math.inf
    return diff / ref


def launch_problems(records, expected_names, expected_constexprs):
    """What is wrong with the recorded launches of one run: kernels missing or extra, or a
    constexpr that says another path ran (empty when the path ran as named)."""
    problems = []
    launched = {record.kernel_name for record in records}
    if launched != expected_names:
        missing, extra = sorted(expected_names - launched), sorted(launched - expected_names)
        problems.append(
            "kernels: "
            + "; ".join(
                part
                for part in (
                    f"not launched {missing}" if missing else "",
                    f"unexpected {extra}" if extra else "",
                )
                if part
            )
        )
    for record in records:
        for key, want in expected_constexprs.items():
            if key in record.constexprs and bool(record.constexprs[key]) != want:
                problems.append(
                    f"kernels: {record.kernel_name} ran with {key}="
                    f"{record.constexprs[key]}, expected {want}"
                )
    return sorted(set(problems))


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------


@dataclass
class SelfTestRow:
    """One path in one dtype. `quantity` is the output or gradient with the worst error
    ratio, `error` that ratio (rms(kernel - reference) / rms(reference), worst over the runs)
    and `tolerance` its limit; `errors` holds every quantity's ratio. `verdict` is "PASS",
    "FAIL" (a ratio over the tolerance, a non-finite value, or the wrong kernels launched:
    `problems` says which) or "ERROR" (the run raised: `problems` holds the exception).
    `first_run_s` includes the kernels' compile on a GPU; `timed_s` is a second run (None
    under the interpreter, which compiles nothing)."""

    path: str
    dtype: str
    quantity: str
    error: float
    tolerance: float
    verdict: str
    first_run_s: float | None = None
    timed_s: float | None = None
    errors: dict[str, float] = field(default_factory=dict)
    problems: list[str] = field(default_factory=list)

    @property
    def passed(self):
        return self.verdict == "PASS"


@dataclass
class SelfTestReport:
    """What `self_test` found: `environment` (name -> text), one `SelfTestRow` per path and
    dtype, the `seed` that reproduces the inputs (`--seed`), and `interrupted` when the run
    stopped early. `str(report)` is the table and the environment block to paste into a bug
    report; `to_dict()` is the JSON form."""

    environment: dict[str, str]
    rows: list[SelfTestRow] = field(default_factory=list)
    seed: int = 0
    device: str = ""
    dtypes: list[str] = field(default_factory=list)
    paths: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    interrupted: bool = False

    @property
    def passed(self):
        """Every row passed and every planned row ran."""
        expected_rows = len(self.paths) * len(self.dtypes)
        return (
            not self.interrupted
            and len(self.rows) == expected_rows
            and all(row.passed for row in self.rows)
        )

    @property
    def failures(self):
        return [row for row in self.rows if not row.passed]

    def verdict(self):
        """PASSED, FAILED (a row failed), INTERRUPTED, or INCOMPLETE (rows still to run: a
        report written while the run goes on, or by a run that was killed)."""
        if self.failures:
            return "FAILED"
        if self.interrupted:
            return "INTERRUPTED"
        return "PASSED" if self.passed else "INCOMPLETE"

    def headline(self):
        planned = len(self.paths) * len(self.dtypes)
        verdict = self.verdict()
        return (
            f"flash-kernels self-test: {verdict}: {sum(r.passed for r in self.rows)} of "
            f"{planned} rows passed, {len(self.failures)} failed"
            + (f", {planned - len(self.rows)} not run" if len(self.rows) < planned else "")
            + f" (seed {self.seed}, {self.wall_s:.1f} s)"
        )

    def table_lines(self):
        """The table, one line per row (at most 100 characters)."""
        header = (
            f"{'path':36} {'dtype':5} {'worst':14} {'error':>7} {'tol':>7} "
            f"{'verdict':7} {'first s':>7} {'timed s':>7}"
        )
        lines = [header, "-" * len(header)]
        for row in self.rows:
            timed = f"{row.timed_s:7.3f}" if row.timed_s is not None else f"{'-':>7}"
            first = f"{row.first_run_s:7.2f}" if row.first_run_s is not None else f"{'-':>7}"
            lines.append(
                f"{row.path:36} {row.dtype:5} {row.quantity:14} "
                f"{_number(row.error):>7} {row.tolerance:7.1e} {row.verdict:7} "
                f"{first} {timed}"
            )
        return lines

    def failure_lines(self):
        lines = []
        for row in self.failures:
            over = [
                f"{name} {_number(value)}"
                for name, value in row.errors.items()
                if not value <= row.tolerance
            ]
            detail = "; ".join(
                row.problems + ([f"over {row.tolerance:.0e}: " + ", ".join(over)] if over else [])
            )
            lines.append(f"  {row.verdict} {row.path} [{row.dtype}]: {detail}")
        return lines

    def environment_lines(self):
        width = max((len(name) for name in self.environment), default=0)
        return [f"  {name:{width}}  {value}" for name, value in self.environment.items()]

    def __str__(self):
        lines = [self.headline()] + self.table_lines() + list(LEGEND)
        if self.failures:
            lines += ["failures:"] + self.failure_lines()
        lines += ["environment:"] + self.environment_lines()
        return "\n".join(lines) + "\n"

    def to_dict(self):
        return {
            "passed": self.passed,
            "verdict": self.verdict(),
            "interrupted": self.interrupted,
            "seed": self.seed,
            "device": self.device,
            "dtypes": self.dtypes,
            "paths": self.paths,
            "wall_s": round(self.wall_s, 3),
            "headline": self.headline(),
            "environment": self.environment,
            "rows": [_json_safe(asdict(row)) for row in self.rows],
            "text": str(self),
        }


def _number(value):
    return "inf" if value == math.inf else ("nan" if math.isnan(value) else f"{value:.1e}")


def _json_safe(value):
    """inf and nan as strings (JSON has neither)."""
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _json_safe(item) for key, item in value.items()}
    if isinstance(value, list):
        return [_json_safe(item) for item in value]
    return value


# ---------------------------------------------------------------------------------------------
# The environment block
# ---------------------------------------------------------------------------------------------


def _command_output(command, timeout=10):
    """The stripped stdout of a command, or None if it cannot run or fails."""
    try:
        proc = subprocess.run(command, capture_output=True, text=True, timeout=timeout, check=False)
    except (OSError, subprocess.SubprocessError):
        return None
    return proc.stdout.strip() if proc.returncode == 0 else None


def _ptxas_tool(arch):
    """(path, source) of the ptxas Triton's NVIDIA backend runs for `arch` (e.g. 90)."""
    # Triton >= 3.4 picks a tool per architecture (get_ptxas); 3.2 and 3.3 had _path_to_binary.
    with contextlib.suppress(Exception):
        from triton.backends.nvidia.compiler import get_ptxas

        return get_ptxas(arch).path, "triton get_ptxas"
    with contextlib.suppress(Exception):
        from triton.backends.nvidia.compiler import _path_to_binary

        return _path_to_binary("ptxas")[0], "triton _path_to_binary"
    with contextlib.suppress(Exception):
        import triton.knobs

        return triton.knobs.nvidia.ptxas.path, "triton.knobs.nvidia.ptxas"
    return shutil.which("ptxas"), "PATH (not Triton's)"


def _ptxas(capability):
    """'version (path, sm_XX)' of the ptxas Triton compiles with for this compute capability
    (Triton may pick ptxas-blackwell by architecture, or a ptxas set with TRITON_PTXAS_PATH)."""
    arch = capability[0] * 10 + capability[1] if capability else 90
    path, source = _ptxas_tool(arch)
    if not path:
        return "not found (Triton's NVIDIA backend is missing)"
    text = _command_output([path, "--version"])
    release = [line for line in (text or "").splitlines() if "release" in line]
    version = release[0].strip() if release else "version unknown (--version failed)"
    return f"{version} ({path}, sm_{arch}, via {source})"


def _driver():
    """The NVIDIA driver version (nvidia-smi), else the CUDA driver API version (libcuda)."""
    text = _command_output(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"])
    if text:
        return f"{text.splitlines()[0].strip()} (nvidia-smi)"
    with contextlib.suppress(Exception):  # not Linux, or no libcuda: said below
        import ctypes

        version = ctypes.c_int()
        if ctypes.CDLL("libcuda.so.1").cuDriverGetVersion(ctypes.byref(version)) == 0:
            major, minor = version.value // 1000, version.value % 1000 // 10
            return f"CUDA driver API {major}.{minor} (libcuda; nvidia-smi not found)"
    return "unknown (no nvidia-smi, no libcuda.so.1)"


def _commit():
    """The git commit of the package's checkout (with '+modified' when flash_kernels/ has
    uncommitted changes), or why not."""
    root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    if not os.path.exists(os.path.join(root, ".git")) or shutil.which("git") is None:
        return "not a git checkout"
    commit = _command_output(["git", "-C", root, "rev-parse", "--short=12", "HEAD"])
    if commit is None:
        return "unknown (git failed)"
    changes = _command_output(
        ["git", "-C", root, "status", "--porcelain", "--untracked-files=no", "--", "flash_kernels"]
    )
    return commit + ("+modified" if changes else "")


def environment_info(device):
    """name -> text of everything a bug report about the kernels needs."""
    info = {}
    capability = None
    if device.type == "cuda":
        index = device.index if device.index is not None else torch.cuda.current_device()
        capability = torch.cuda.get_device_capability(index)
        props = torch.cuda.get_device_properties(index)
        info["device"] = (
            f"{torch.cuda.get_device_name(index)} ({props.multi_processor_count}"
            f" SMs, {props.total_memory / 2**30:.0f} GiB), cuda:{index}"
        )
        info["capability"] = f"sm_{capability[0]}{capability[1]}"
        info["driver"] = _driver()
    else:
        info["device"] = (
            f"CPU ({platform.processor() or platform.machine()}), {os.cpu_count()} cores"
        )
        info["capability"] = "none (Triton interpreter)"
    info["CUDA runtime"] = (
        f"{torch.version.cuda} (torch's build)"
        if torch.version.cuda
        else "none (CPU build of torch)"
    )
    info["torch"] = torch.__version__
    try:
        import triton

        info["triton"] = triton.__version__
    except Exception as exc:  # noqa: BLE001
        info["triton"] = f"import failed: {exc}"
    info["ptxas"] = (
        _ptxas(capability)
        if device.type == "cuda"
        else f"not used by the interpreter (would be: {_ptxas(None)})"
    )
    try:
        import numpy

        info["numpy"] = numpy.__version__
    except Exception:  # noqa: BLE001
        info["numpy"] = "missing"
    info["python"] = f"{sys.version.split()[0]} ({platform.platform()})"
    info["flash_kernels"] = f"{_version.__version__} ({_commit()})"
    info["backend"] = (
        "compiled Triton kernels; fp32 products IEEE (allow_tf32 off here)"
        if not INTERPRETED_KERNELS
        else "Triton interpreter (TRITON_INTERPRET=1), float32 dots exact"
    )
    return info


# ---------------------------------------------------------------------------------------------
# Running it
# ---------------------------------------------------------------------------------------------


def resolve_device(device):
    """The torch.device the kernels can run on here, or SelfTestUnavailable saying why not."""
    try:
        import triton  # noqa: F401
    except Exception as exc:  # noqa: BLE001
        raise SelfTestUnavailable(
            f"the Triton backend cannot run here: importing triton failed ({exc})"
        ) from None
    if device is None:
        if INTERPRETED_KERNELS:
            return torch.device("cpu")
        if torch.cuda.is_available():
            return torch.device("cuda", torch.cuda.current_device())
        if triton_interpret_enabled():
            raise SelfTestUnavailable(
                "the Triton backend cannot run here: TRITON_INTERPRET=1 was set after "
                "flash_kernels was imported; set it before (e.g. TRITON_INTERPRET=1 python -m "
                "flash_kernels.selftest)"
            )
        raise SelfTestUnavailable(
            "the Triton backend cannot run here: no CUDA device (torch.cuda.is_available() "
            "is False) and TRITON_INTERPRET=1 was not set before flash_kernels was imported "
            "(the CPU interpreter is slow; for tests: TRITON_INTERPRET=1 python -m "
            "flash_kernels.selftest). The PyTorch backends (backend='torch') still work."
        )
    device = torch.device(device)
    if device.type == "cuda":
        if INTERPRETED_KERNELS:
            raise SelfTestUnavailable(
                "TRITON_INTERPRET=1 is set: the kernels run in the CPU "
                "interpreter; unset it to test the GPU"
            )
        if not torch.cuda.is_available():
            raise SelfTestUnavailable(
                f"the Triton backend cannot run on {device}: no CUDA "
                f"device (torch.cuda.is_available() is False)"
            )
        return (
            device
            if device.index is not None
            else torch.device("cuda", torch.cuda.current_device())
        )
    if device.type == "cpu":
        if not INTERPRETED_KERNELS:
            raise SelfTestUnavailable(
                "the Triton backend cannot run on the CPU unless TRITON_INTERPRET=1 is set "
                "before flash_kernels is imported (TRITON_INTERPRET=1 python -m "
                "flash_kernels.selftest --device cpu)"
            )
        return device
    raise SelfTestUnavailable(
        f"the Triton backend runs on CUDA devices (or the CPU under "
        f"TRITON_INTERPRET=1), not on {device}"
    )


def resolve_dtypes(dtypes, device):
    """The dtypes to test, in this order: the given ones (torch dtypes or names such as
    "fp32", "bf16"), or every dtype the device supports."""
    interpreted = device.type == "cpu"
    if dtypes is None:
        if interpreted:
            return [torch.float32, torch.float16]
        # bfloat16 first where there is one: the dtype only a GPU can check (and the paper's),
        # so a run stopped early has tested it
        bf16 = [torch.bfloat16] if torch.cuda.is_bf16_supported() else []
        return bf16 + [torch.float16, torch.float32]
    resolved = []
    for dtype in dtypes:
        if isinstance(dtype, str):
            if dtype.lower() not in DTYPE_NAMES:
                raise ValueError(f"unknown dtype {dtype!r}: use one of {sorted(set(DTYPE_NAMES))}")
            dtype = DTYPE_NAMES[dtype.lower()]
        if dtype not in SHORT_NAMES:
            raise ValueError(
                f"the kernels take float32, float16 and bfloat16, not {dtype} "
                f"(float64 runs the exact PyTorch path)"
            )
        if dtype == torch.bfloat16 and interpreted:
            raise ValueError(
                "bfloat16 cannot run under the Triton interpreter (it has no "
                "bfloat16 arithmetic): test it on a GPU"
            )
        if dtype not in resolved:
            resolved.append(dtype)
    return resolved


def resolve_paths(paths):
    """The PATHS whose name contains any of the given substrings (all of them for None)."""
    if paths is None:
        return list(PATHS)
    chosen = [path for path in PATHS if any(part in path.name for part in paths)]
    if not chosen:
        raise ValueError(f"no path matches {list(paths)}; the paths are {list(PATH_NAMES)}")
    return chosen


class _FixedPrecision:
    """IEEE fp32 products while the self-test runs (the fp32 tolerance assumes them); the
    caller's setting comes back afterwards."""

    def __enter__(self):
        self.saved = torch.backends.cuda.matmul.allow_tf32
        torch.backends.cuda.matmul.allow_tf32 = False

    def __exit__(self, *exc):
        torch.backends.cuda.matmul.allow_tf32 = self.saved


def _synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


class LaunchSeen(NamedTuple):
    """A kernel launch as the self-test checks it: the kernel's name and its constexprs."""

    kernel_name: str
    constexprs: dict


@contextlib.contextmanager
def _watch_launches():
    """The LaunchSeen of every kernel launch inside the block (the launch hook: nests with
    any other watcher, such as a recording caller's)."""
    seen = []

    def watch(kernel, grid, args, constexprs, num_warps, num_stages):
        function = kernel
        while hasattr(function, "fn"):  # triton.jit objects wrap the Python function
            function = function.fn
        seen.append(LaunchSeen(function.__name__, dict(constexprs)))

    with triton_launch.launch_callback(watch):
        yield seen


@contextlib.contextmanager
def _nan_filled_buffers():
    """Kernel output and scratch buffers filled with NaN inside the block (launch.py's
    override point), so that an output a kernel leaves unwritten shows as NaN."""
    saved = triton_launch._buffer_fill
    triton_launch._buffer_fill = float("nan")
    try:
        yield
    finally:
        triton_launch._buffer_fill = saved


def run_row(path, dtype, device, seed, runs):
    """Check one path in one dtype: the problem, `runs` runs of the kernels (the first one
    compiles them on a GPU), each compared with the reference. Returns a SelfTestRow."""
    tolerance = rms_ratio(path.check, dtype)
    row = SelfTestRow(
        path=path.name,
        dtype=SHORT_NAMES[dtype],
        quantity="-",
        error=math.nan,
        tolerance=tolerance,
        verdict="ERROR",
    )
    try:
        problem = make_problem(path, dtype, device, seed)
        names, constexprs = problem.expected_launches()
        errors, problems = {}, []
        for run_index in range(runs):
            with _nan_filled_buffers(), _watch_launches() as records:
                _synchronize(device)
                start = time.perf_counter()
                actual = problem.run()
                _synchronize(device)
                seconds = time.perf_counter() - start
            if run_index == 0:
                row.first_run_s = seconds
            else:
                row.timed_s = seconds
            problems += launch_problems(records, names, constexprs)
            if actual.keys() != problem.expected.keys():
                problems.append(
                    f"quantities {sorted(actual)} != expected {sorted(problem.expected)}"
                )
            for name, expected in problem.expected.items():
                if name in actual:
                    ratio = rms_error_ratio(actual[name], expected)
                    errors[name] = max(errors.get(name, 0.0), ratio)
    except Exception as exc:  # noqa: BLE001 - a crash is a finding: reported in the row
        row.problems = [f"{type(exc).__name__}: {' '.join(str(exc).split())[:300]}"]
        return row
    row.errors = errors
    row.problems = sorted(set(problems))
    if errors:
        row.quantity = max(errors, key=lambda name: errors[name])
        row.error = errors[row.quantity]
    over = any(not value <= tolerance for value in errors.values())
    row.verdict = "FAIL" if over or row.problems else "PASS"
    return row


def self_test(device=None, dtypes=None, seed=None, verbose=False, paths=None, on_row=None):
    """Run every kernel path on `device` in `dtypes` against the float64 reference.

    Args:
        device: "cuda", "cuda:1", "cpu" (TRITON_INTERPRET=1 only) or None: CUDA when present
            (else the interpreter when it is on).
        dtypes: torch dtypes or names ("fp32", "fp16", "bf16"); None: every dtype the device
            supports (bfloat16 on a GPU that has it; never under the interpreter).
        seed: of the random inputs (None: a fresh one, printed in the report).
        verbose: print one line per row to stderr as it finishes.
        paths: substrings selecting some of PATH_NAMES (None: every path).
        on_row: called with the report after each row (the command line writes its JSON).

    Returns:
        A SelfTestReport; `.passed` is the verdict. Raises SelfTestUnavailable where the
        Triton backend cannot run, ValueError for an unknown dtype or path.
    """
    started = time.perf_counter()
    device = resolve_device(device)
    dtypes = resolve_dtypes(dtypes, device)
    chosen = resolve_paths(paths)
    if seed is None:
        seed = int.from_bytes(os.urandom(4), "little") % 1_000_000
    report = SelfTestReport(
        environment=environment_info(device),
        seed=seed,
        device=str(device),
        dtypes=[SHORT_NAMES[d] for d in dtypes],
        paths=[path.name for path in chosen],
    )
    report.environment["timing"] = (
        "first s = first run, compile included; timed s = a second run"
        if device.type == "cuda"
        else "first s = the one run (the interpreter compiles nothing)"
    )
    runs = 2 if device.type == "cuda" else 1
    planned = len(chosen) * len(dtypes)
    try:
        with _FixedPrecision():
            for dtype in dtypes:
                for path in chosen:
                    row = run_row(path, dtype, device, seed, runs)
                    report.rows.append(row)
                    report.wall_s = time.perf_counter() - started
                    if verbose:
                        print(
                            f"[{len(report.rows)}/{planned}] {row.path} {row.dtype}: "
                            f"{row.verdict} ({row.quantity} {_number(row.error)}, "
                            f"{row.first_run_s or 0:.2f} s)",
                            file=sys.stderr,
                            flush=True,
                        )
                    if on_row is not None:
                        on_row(report)
    except KeyboardInterrupt:
        report.interrupted = True
    report.wall_s = time.perf_counter() - started
    first = sum(row.first_run_s or 0 for row in report.rows)
    timed = sum(row.timed_s or 0 for row in report.rows)
    report.environment["timing"] += (
        f"; totals: first {first:.1f} s"
        + (f", timed {timed:.2f} s" if runs > 1 else "")
        + f", wall {report.wall_s:.1f} s"
    )
    return report


def _write_json(report, path):
    tmp = f"{path}.tmp"
    with open(tmp, "w") as f:
        json.dump(report.to_dict(), f, indent=1)
    os.replace(tmp, path)


def main(argv=None):
    """The command line; returns the exit status (see the module docstring)."""
    parser = argparse.ArgumentParser(
        prog="python -m flash_kernels.selftest",
        description="Check every Triton kernel path of flash_kernels on this device against "
        "the float64 reference; paste the output into a bug report.",
    )
    parser.add_argument(
        "--device",
        help="cuda, cuda:N or cpu (cpu needs TRITON_INTERPRET=1 "
        "before the import); default: CUDA when present",
    )
    parser.add_argument(
        "--dtypes", nargs="+", help="fp32 fp16 bf16 (default: every dtype the device supports)"
    )
    parser.add_argument(
        "--seed", type=int, help="of the random inputs (default: a fresh one, printed)"
    )
    parser.add_argument(
        "--paths",
        nargs="+",
        metavar="SUBSTRING",
        help=f"only the paths whose name contains one of these: {PATH_NAMES}",
    )
    parser.add_argument(
        "--json",
        metavar="PATH",
        help="also write the report as JSON (after "
        "every row, so a run that is stopped still leaves its rows)",
    )
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    args = parser.parse_args(argv)

    def write(report):
        if args.json:
            _write_json(report, args.json)

    try:
        report = self_test(
            args.device,
            args.dtypes,
            args.seed,
            verbose=not args.quiet,
            paths=args.paths,
            on_row=write,
        )
    except (SelfTestUnavailable, ValueError) as exc:
        print(f"flash-kernels self-test: not run: {exc}", file=sys.stderr)
        if args.json:
            with open(args.json, "w") as f:
                json.dump({"passed": False, "not_run": str(exc)}, f)
        return EXIT_UNAVAILABLE
    write(report)
    print(report, end="")
    if report.interrupted:
        return EXIT_INTERRUPTED
    return EXIT_PASSED if report.passed else EXIT_FAILED
