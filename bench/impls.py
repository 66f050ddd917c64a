"""What the benchmarks time: the package's ops and the baselines, built on the same inputs.

Every implementation is an `Impl`: it says whether it can run here (and why not), makes its
inputs for a `Problem` (fresh random tensors, never zeros) and runs a forward pass. The runner
turns that into the three timed modes (forward, backward, forward+backward).

- "triton": `mixed_chunk_attention(backend="triton")`, the package's kernels (CUDA; on a CPU only
  under TRITON_INTERPRET=1 and only when asked for: the interpreter is far too slow to time).
- "flash_attention": the fused op `flash_attention(z, gamma, beta, v)` if the package has it
  (Triton backend on CUDA or under TRITON_INTERPRET=1, the composed PyTorch path elsewhere;
  on a CPU only when named explicitly). It also forms the four
  scale-offset roles from z, so it does a little more work than "triton" for the same flops.
- "torch": the chunked PyTorch path (`backend="torch"`), eager.
- "torch.compile": the same path under `torch.compile` (default mode, `dynamic=False`).
- "reference": the dense O(T^2) reference (`backend="reference"`), only where it fits in memory.
- "sdpa": softmax attention of a Transformer layer of the same model width d = E/2 (the GAU's
  e = 2d): `scaled_dot_product_attention` with E/128 heads of 64 (12 heads of 64 = 768 wide at
  the paper's E = 1536), causal like the FLASH row.
- "fla": flash-linear-attention's chunked linear attention (`fla.ops.linear_attn.
  chunk_linear_attn`, package fla-core) on the same problem as one head: q, k of width S,
  v of width E, no normalisation. Its flops are counted with `flash_flops` at its chunk of 64.

Packed documents (the varlen row, bench/varlen.py): a Problem with `doc_lens` is either the
documents packed into one row of sum(doc_lens) tokens, passed with `cu_seqlens` (on the inputs'
device, made once) and `max_seqlen`, or the same documents zero-padded to a batch of
len(doc_lens) rows of max(doc_lens) tokens. Both get the same document contents, and both are
credited with the documents' useful flops (`packed_flops`). Only the implementations marked
`varlen` run them: "triton", "flash_attention" and "torch".
"""

import functools
import inspect
import math
import os
from dataclasses import asdict, dataclass, replace

import torch

from .flops import flash_flops, packed_flops, softmax_flops

FLA_CHUNK = 64  # fla's chunked linear attention works on chunks of 64 tokens
SDPA_HEAD_DIM = 64


PACKED, PADDED = "packed", "padded"


@dataclass(frozen=True)
class Problem:
    """One benchmark shape: `batch` sequences of T tokens, widths S and E, chunk C.

    With `doc_lens` (the varlen row) it is the documents of these lengths, `varlen` says how:
    PACKED: one row (batch 1) of T = sum(doc_lens) tokens with cu_seqlens; PADDED: a batch of
    len(doc_lens) rows of T = max(doc_lens) tokens, each document followed by zeros."""

    T: int
    batch: int
    S: int = 128
    E: int = 1536
    C: int = 256
    causal: bool = True
    rel_bias: bool = False
    varlen: str = None
    doc_lens: tuple = None

    def __post_init__(self):
        if self.doc_lens is not None:
            object.__setattr__(self, "doc_lens", tuple(int(n) for n in self.doc_lens))
        expected = {
            None: None,
            PACKED: (1, sum(self.doc_lens or ())),
            PADDED: (len(self.doc_lens or ()), max(self.doc_lens or (0,))),
        }
        if self.varlen not in expected or (self.varlen is None) != (self.doc_lens is None):
            raise ValueError(
                f"varlen must be None, {PACKED!r} or {PADDED!r}, with doc_lens "
                f"exactly when it is not None; got {self.varlen!r}, {self.doc_lens!r}"
            )
        if self.varlen is not None and (self.batch, self.T) != expected[self.varlen]:
            raise ValueError(
                f"a {self.varlen} problem of documents {self.doc_lens} has "
                f"(batch, T) = {expected[self.varlen]}, got {(self.batch, self.T)}"
            )

    def as_dict(self):
        return asdict(self)

    @property
    def seed(self):
        """Seed of the inputs: T, or the documents' total (the same documents packed or padded)."""
        return self.T if self.doc_lens is None else sum(self.doc_lens)


def varlen_problems(doc_lens, S, E, C, causal=True, rel_bias=False):
    """(packed, padded): the same documents as one packed row and as a zero-padded batch."""
    shape = dict(S=S, E=E, C=C, causal=causal, rel_bias=rel_bias, doc_lens=tuple(doc_lens))
    return (
        Problem(T=sum(doc_lens), batch=1, varlen=PACKED, **shape),
        Problem(T=max(doc_lens), batch=len(doc_lens), varlen=PADDED, **shape),
    )


def sdpa_heads(E):
    """Heads of 64 for softmax attention of width E/2 (at least one head)."""
    return max(1, E // (2 * SDPA_HEAD_DIM))


def _randn(shape, device, dtype, scale=1.0):
    return (scale * torch.randn(*shape, device=device, dtype=torch.float32)).to(dtype)


def _documents(make_inputs):
    """make_inputs for a padded problem: the packed problem's inputs (the same documents, from
    the same seed), each (1, total, width) tensor laid out as (documents, longest, width) with
    zeros after each document; the other inputs (rel_bias, gamma, beta) as they are."""

    @functools.wraps(make_inputs)
    def make(p, device, dtype):
        if p.varlen != PADDED:
            return make_inputs(p, device, dtype)
        packed = make_inputs(replace(p, varlen=PACKED, T=sum(p.doc_lens), batch=1), device, dtype)
        padded = []
        while packed:  # each packed tensor freed once laid out
            x = packed.pop(0)
            padded.append(_pad_documents(x, p.doc_lens) if x.dim() == 3 else x)
        return padded

    return make


def _pad_documents(x, doc_lens):
    padded = x.new_zeros(len(doc_lens), max(doc_lens), x.shape[-1])
    start = 0
    for row, length in enumerate(doc_lens):
        padded[row, :length] = x[0, start : start + length]
        start += length
    return padded


def padding_mask(p, device):
    """(batch, T, 1) mask of a padded problem's real tokens (1) and padding (0), else None."""
    if p.varlen != PADDED:
        return None
    lengths = torch.tensor(p.doc_lens, device=device)
    return (torch.arange(p.T, device=device)[None, :] < lengths[:, None])[..., None]


@functools.lru_cache(maxsize=None)
def _cu_seqlens(doc_lens, device):
    starts = [0]
    for length in doc_lens:
        starts.append(starts[-1] + length)
    return torch.tensor(starts, dtype=torch.int32, device=device)


def _packing(p, device):
    """The op's keyword arguments for a packed problem: cu_seqlens on the inputs' device (made
    once, as a training loop would) and max_seqlen (so that nothing waits for a GPU)."""
    if p.varlen != PACKED:
        return {}
    return dict(cu_seqlens=_cu_seqlens(p.doc_lens, device), max_seqlen=max(p.doc_lens))


def _flash_inputs(p, device, dtype):
    # Queries and keys scaled so that quad_scale * <q, k> = <q, k> / C is O(1): about half the
    # relu^2 scores are non-zero, as in a trained model, and nothing overflows in half precision.
    qk = math.sqrt(p.C) / p.S**0.25
    tensors = [_randn((p.batch, p.T, p.S), device, dtype, qk) for _ in range(4)]
    tensors.append(_randn((p.batch, p.T, p.E), device, dtype))
    if p.rel_bias:
        tensors.append(_randn((2 * p.C - 1,), device, torch.float32, 0.1))
    return tensors


def _mca_forward(backend, p, inputs):
    from flash_kernels import mixed_chunk_attention

    rel_bias = inputs[5] if p.rel_bias else None
    return mixed_chunk_attention(
        *inputs[:5],
        chunk_size=p.C,
        causal=p.causal,
        rel_bias=rel_bias,
        backend=backend,
        **_packing(p, inputs[0].device),
    )


def _torch_path(q_quad, k_quad, q_lin, k_lin, v, rel_bias, chunk_size, causal):
    from flash_kernels import mixed_chunk_attention

    return mixed_chunk_attention(
        q_quad,
        k_quad,
        q_lin,
        k_lin,
        v,
        chunk_size=chunk_size,
        causal=causal,
        rel_bias=rel_bias,
        backend="torch",
    )


@functools.lru_cache(maxsize=None)
def _compiled_torch_path():
    import torch._dynamo

    # one compiled graph per shape (dynamic=False): allow as many as the benchmark has shapes
    for name in (
        "recompile_limit",
        "cache_size_limit",
        "accumulated_recompile_limit",
        "accumulated_cache_size_limit",
    ):
        if hasattr(torch._dynamo.config, name):
            setattr(torch._dynamo.config, name, max(getattr(torch._dynamo.config, name), 256))
    return torch.compile(_torch_path, dynamic=False)


def _compile_forward(p, inputs):
    rel_bias = inputs[5] if p.rel_bias else None
    return _compiled_torch_path()(*inputs[:5], rel_bias, p.C, p.causal)


def _fused_inputs(p, device, dtype):
    qk = math.sqrt(p.C) / p.S**0.25
    z = _randn((p.batch, p.T, p.S), device, dtype, qk)
    gamma = 1.0 + 0.1 * torch.randn(4, p.S, device=device, dtype=torch.float32)
    beta = 0.1 * torch.randn(4, p.S, device=device, dtype=torch.float32)
    v = _randn((p.batch, p.T, p.E), device, dtype)
    tensors = [z, gamma, beta, v]
    if p.rel_bias:
        tensors.append(_randn((2 * p.C - 1,), device, torch.float32, 0.1))
    return tensors


def _fused_forward(backend, p, inputs):
    import flash_kernels

    rel_bias = inputs[4] if p.rel_bias else None
    return flash_kernels.flash_attention(
        *inputs[:4],
        chunk_size=p.C,
        causal=p.causal,
        rel_bias=rel_bias,
        backend=backend,
        **_packing(p, inputs[0].device),
    )


def _sdpa_inputs(p, device, dtype):
    H = sdpa_heads(p.E)
    return [_randn((p.batch, H, p.T, SDPA_HEAD_DIM), device, dtype) for _ in range(3)]


def _sdpa_forward(p, inputs):
    return torch.nn.functional.scaled_dot_product_attention(*inputs, is_causal=p.causal)


def _fla_inputs(p, device, dtype):
    qk = 1.0 / p.S**0.25
    q, k = (_randn((p.batch, p.T, 1, p.S), device, dtype, qk) for _ in range(2))
    return [q, k, _randn((p.batch, p.T, 1, p.E), device, dtype)]


def _fla_forward(p, inputs):
    from fla.ops.linear_attn import chunk_linear_attn

    kwargs = dict(scale=1.0, normalize=False)
    if "head_first" in inspect.signature(chunk_linear_attn).parameters:
        kwargs["head_first"] = False  # (B, T, H, K) layout, as made above
    out = chunk_linear_attn(*inputs, **kwargs)
    return out[0] if isinstance(out, tuple) else out


def fla_available():
    try:
        import fla.ops.linear_attn  # noqa: F401
    except ImportError:
        return "skipped: fla-core not installed (pip install fla-core)"
    except Exception as exc:  # a broken install must not stop the benchmark
        return f"skipped: fla-core failed to import ({type(exc).__name__}: {exc})"
    return None


def flash_attention_available():
    try:
        import flash_kernels
    except Exception as exc:
        return f"skipped: flash_kernels failed to import ({type(exc).__name__}: {exc})"
    if not hasattr(flash_kernels, "flash_attention"):
        return "skipped: flash_kernels.flash_attention does not exist yet"
    return None


def dense_bytes_estimate(p, mode):
    """Bytes the dense reference needs: about a dozen T x T float32 matrices per sequence
    (offsets in int64, masks, scores, relu^2, linear scores), twice that with autograd."""
    per_sequence = p.T * p.T * (8 + 3 + 6 * 4)
    return per_sequence * p.batch * (1 if mode == "fwd" else 2)


@dataclass
class Impl:
    name: str
    make_inputs: object  # (problem, device, dtype) -> list of tensors (autograd leaves)
    forward: object  # (problem, inputs) -> output tensor
    flops: object  # (problem, mode) -> float
    ours: bool = False  # one of the package's kernels (the targets are about these)
    baseline: bool = False
    varlen: bool = False  # runs the packed-documents row (cu_seqlens)

    def availability(self, device, dtype, explicit):
        """None when it can run here, else the reason it is skipped ("skipped: ...")."""
        return _AVAILABILITY[self.name](device, dtype, explicit)


def _flash_count(p, mode):
    if p.doc_lens is not None:  # packed or padded: the documents' useful work
        return packed_flops(p.doc_lens, p.S, p.E, p.C, causal=p.causal, mode=mode)
    return flash_flops(p.T, p.S, p.E, p.C, causal=p.causal, mode=mode, batch=p.batch)


def _fla_count(p, mode):
    return flash_flops(p.T, p.S, p.E, FLA_CHUNK, causal=p.causal, mode=mode, batch=p.batch)


def _sdpa_count(p, mode):
    return softmax_flops(
        p.T, sdpa_heads(p.E), SDPA_HEAD_DIM, causal=p.causal, mode=mode, batch=p.batch
    )


def _triton_ok(device, dtype, explicit):
    if device.type == "cuda":
        return None
    if os.environ.get("TRITON_INTERPRET", "0") not in ("", "0") and explicit:
        return None
    return (
        "skipped: Triton kernels need CUDA (on a CPU they run only under TRITON_INTERPRET=1, "
        "far too slow to time; name the impl explicitly with it set to force)"
    )


def _fused_ok(device, dtype, explicit):
    reason = flash_attention_available()
    if reason or device.type == "cuda" or explicit:
        return reason
    return "skipped: on a CPU flash_attention is the composed torch path (name it to force)"


def _compile_ok(device, dtype, explicit):
    if device.type == "cpu" and not explicit:
        return (
            "skipped: torch.compile on a CPU costs ~15 s of compiling per shape "
            "(name the impl to force)"
        )
    return None


def _fla_ok(device, dtype, explicit):
    reason = fla_available()
    if reason is None and device.type != "cuda":
        return "skipped: fla's kernels need CUDA"
    return reason


_AVAILABILITY = {
    "triton": _triton_ok,
    "flash_attention": _fused_ok,
    "torch": lambda device, dtype, explicit: None,
    "torch.compile": _compile_ok,
    "reference": lambda device, dtype, explicit: None,
    "sdpa": lambda device, dtype, explicit: None,
    "fla": _fla_ok,
}


def _fused_backend(p, inputs):
    on_triton = inputs[0].device.type == "cuda" or (
        os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    )
    backend = "triton" if on_triton else "torch"
    return _fused_forward(backend, p, inputs)


# In priority order: when the time budget runs out, the implementations last here go first.
IMPLS = {
    "triton": Impl(
        "triton",
        _documents(_flash_inputs),
        functools.partial(_mca_forward, "triton"),
        _flash_count,
        ours=True,
        varlen=True,
    ),
    "flash_attention": Impl(
        "flash_attention",
        _documents(_fused_inputs),
        _fused_backend,
        _flash_count,
        ours=True,
        varlen=True,
    ),
    "torch": Impl(
        "torch",
        _documents(_flash_inputs),
        functools.partial(_mca_forward, "torch"),
        _flash_count,
        baseline=True,
        varlen=True,
    ),
    "sdpa": Impl("sdpa", _sdpa_inputs, _sdpa_forward, _sdpa_count, baseline=True),
    "torch.compile": Impl(
        "torch.compile", _flash_inputs, _compile_forward, _flash_count, baseline=True
    ),
    "fla": Impl("fla", _fla_inputs, _fla_forward, _fla_count, baseline=True),
    "reference": Impl(
        "reference",
        _flash_inputs,
        functools.partial(_mca_forward, "reference"),
        _flash_count,
        baseline=True,
    ),
}


def make_call(impl, p, mode, device, dtype, seed=0):
    """Fresh inputs and a no-argument callable running `mode` ("fwd", "bwd" or "fwd+bwd").

    fwd: forward under torch.no_grad (inference). bwd: the gradients of every input, from one
    forward kept alive (retain_graph). fwd+bwd: forward with autograd, then those gradients.
    Gradients are returned by torch.autograd.grad, never accumulated into .grad. A padded
    problem's output gradient is zero on the padding (its loss ignores those positions).
    """
    if p.varlen is not None and not impl.varlen:
        raise ValueError(f"{impl.name} does not run packed documents (varlen={p.varlen!r})")
    torch.manual_seed(seed)
    inputs = impl.make_inputs(p, device, dtype)
    if mode == "fwd":

        def call():
            with torch.no_grad():
                return impl.forward(p, inputs)

        return call
    for x in inputs:
        x.requires_grad_(True)
    out = impl.forward(p, inputs)
    grad_out = torch.randn_like(out)
    mask = padding_mask(p, device)
    if mask is not None:
        grad_out = grad_out * mask
    if mode == "bwd":

        def call():
            return torch.autograd.grad(out, inputs, grad_out, retain_graph=True)

        return call
    out = None  # fwd+bwd builds its own graph every call
    if mode == "fwd+bwd":

        def call():
            return torch.autograd.grad(impl.forward(p, inputs), inputs, grad_out)

        return call
    raise ValueError(f"unknown mode {mode!r}")


def run_once(impl_name, problem_dict, mode, device_str, dtype_str, threads=None):
    """Make fresh inputs and run `mode` once (module level: the CPU memory probe pickles it)."""
    if threads:
        torch.set_num_threads(threads)
    device = torch.device(device_str)
    dtype = getattr(torch, dtype_str)
    problem = Problem(**problem_dict)
    make_call(IMPLS[impl_name], problem, mode, device, dtype, seed=problem.seed)()
