"""Ahead-of-time compile report of the Triton kernels the ops really launch, for every GPU
architecture people run, and the codegen gate over them (no GPU needed).

Two sets of configs:

- ARCHITECTURE_CONFIGS, compiled for every target of `--targets` (default: all of
  `tools.aot_compile.ARCHITECTURES`: sm_80, sm_86, sm_89, sm_90, sm_100, sm_120, gfx942,
  gfx90a): the paper shape (S = 128, E = 1536, C = 256) and S = 256, in fp32, fp16 and bf16,
  with the options that change the kernels' resources, plus a few small odd-sized configs. The
  report checks that each launch compiles and fits the architecture's shared memory (LDS) and
  lists registers, spills and the tensor-core instruction count per kernel.
- GATE_MATRIX, compiled to TTGIR (all the gate reads) for the codegen gate's targets (sm_90)
  with this process's Triton and with every `--other-triton` Python's (the GPU machines'
  Triton 3.6): every kernel, dtype (fp32, fp16, bf16), causal or not, rel_bias or not, dense or
  packed documents (+ state in and out when causal), mixed_chunk_attention or flash_attention
  (roles from z, gate), the decoding step, chunk sizes 16, 64, 256 and None (small and large
  tiles), S = 128 and 256, the quadratic-only path and backwards with frozen inputs
  (tools/codegen_gate.py: no register transpose may feed a tensor-core product on Hopper).

For every config, the op runs forward + backward (or one decoding step) under TRITON_INTERPRET=1
in a child process that records each kernel launch (kernel, argument types, constexprs,
num_warps/num_stages). The launches are recorded once per target, with FLASH_KERNELS_TARGET set
to it, so that a runtime whose tiles depend on the architecture records that architecture's
tiles. Then every distinct launch is compiled for its target with `triton.compile`
(tools/aot_compile.py). Writes bench/results/compile_report.md; exits non-zero when a launch
cannot be recorded, does not compile, exceeds a hardware limit or fails the codegen gate.

The interpreter cannot run bf16 dots, so bf16 configs are recorded in fp16 and their fp16 types
rewritten to bf16 before compiling (`compile_dtype`); the recording runs with
FLASH_KERNELS_PLAN_DTYPE=bfloat16 so that the runtime picks bf16's tiles and warps (they differ from
fp16's: flash_kernels/backends/triton/gpu_target.py). T only needs to be large enough to reach the
code paths (several chunks); the compiled kernels do not depend on it (T is not specialised). E is
recorded as RECORDED_E = 256: the launches are those of the paper's E = 1536 (the value tiles are at
most 64 wide; tests/test_compile_kernels.py checks it), in about a third of the interpreter's time.

    python -m bench.compile_report [--targets cuda:80 ... hip:gfx90a] [--only WORD ...]
        [--jobs 2] [--other-triton PYTHON ...] [--no-gate | --gate-only] [--output PATH]
        [--save-data JSON | --from-data JSON]

--other-triton (default: $FLASH_KERNELS_OTHER_TRITON_PYTHON): a Python whose environment holds
another Triton version (e.g. the GPU machine's 3.6: `python3 -m venv V && V/bin/pip install
torch==2.13.0 triton==3.6.0 "numpy<2.4"`, as .ci/run builds it) compiles the gate matrix, and
the paper-shape bf16 configs for sm_90 (registers and spills per version), with that version
too. The launches are recorded once, with this process's Triton: the tile choice does not
depend on the Triton version, and the JIT of every version specialises arguments alike
(aot_compile.jit_compile_inputs checks it). --save-data keeps everything recorded and compiled
in a JSON file; --from-data renders the report from it again.
"""

import argparse
import itertools
import json
import os
import sys
import time

from flash_kernels.backends.triton.gpu_target import PLAN_DTYPE_VARIABLE
from tools import codegen_gate
from tools.aot_compile import (
    ARCHITECTURES,
    REPORT_PREAMBLE,
    architecture,
    constexpr_label,
    error_details,
    limits_table,
    measure_concurrently,
    record_concurrently,
    record_from_dict,
    record_in_interpreter,
    record_key,
    record_to_dict,
    retype_record,
    row_failed,
    summary_line,
    target_name,
    tensor_core_label,
)

# ---------------------------------------------------------------------------------------------
# Configs. Keys: name; op ("mixed_chunk_attention" by default; "flash_attention" for the fused
# op with a gate, q_quad then serving as z; "mixed_chunk_decode" / "flash_attention_decode" for
# one decoding step, T ignored, capacity for chunk_size=None); batch (leading dims); T, S, E;
# chunk_size (None = one chunk); causal; rel_bias (bool); linear (False = q_lin/k_lin None,
# quadratic only); dtype (what runs under the interpreter: "float32" or "float16");
# rel_bias_dtype; compile_dtype (optional: the Triton type the fp16 launches are compiled as,
# "bf16"); grads (which inputs require grad for the backward; default all); packed (document
# lengths summing to T: cu_seqlens); state (an initial state in, the final state out, both in
# the loss).
# ---------------------------------------------------------------------------------------------
SMALL = dict(
    batch=(2,),
    T=45,
    S=20,
    E=36,
    chunk_size=16,
    rel_bias=True,
    linear=True,
    rel_bias_dtype="float32",
)
PAPER = dict(
    batch=(1,),
    T=512,
    S=128,
    E=1536,
    chunk_size=256,
    linear=True,
    dtype="float16",
    rel_bias_dtype="float32",
    compile_dtype="bf16",
)
# The decode ops (one token per sequence; T = 1): run by _DECODE_SNIPPET, sequence 0 folds.
DECODE = dict(PAPER, batch=(2,), T=1, causal=True, rel_bias=True)

#: Small odd-sized problems (S = 20, E = 36: masked feature columns), every dtype path.
SMALL_CONFIGS = [
    dict(SMALL, name="small fp32 causal", dtype="float32", causal=True),
    dict(
        SMALL, name="small fp32 non-causal, no bias", dtype="float32", causal=False, rel_bias=False
    ),
    dict(SMALL, name="small fp16 causal", dtype="float16", causal=True),
    dict(SMALL, name="small fp16 quadratic only", dtype="float16", causal=True, linear=False),
    dict(
        SMALL,
        name="small fp32 one chunk (chunk_size=None)",
        dtype="float32",
        causal=True,
        chunk_size=None,
        batch=(),
    ),
    dict(
        SMALL,
        name="small fp16 one long chunk (chunk_size=None, T > 256: scores recomputed)",
        dtype="float16",
        causal=True,
        chunk_size=None,
        batch=(),
        T=300,
    ),
]

#: The options that change what the kernels hold (the suffix of a config's name) and the fields
#: they set, at the shapes of `shape_configs`.
OPTION_SETS = [
    ("causal + rel_bias", dict(causal=True, rel_bias=True)),
    ("non-causal", dict(causal=False, rel_bias=False)),
    (
        "flash_attention (roles from z, gate), causal + rel_bias",
        dict(op="flash_attention", causal=True, rel_bias=True),
    ),
    (
        "flash_attention packed documents + state, causal + rel_bias",
        dict(
            op="flash_attention",
            T=456,
            packed=[120, 0, 300, 36],
            state=True,
            causal=True,
            rel_bias=True,
        ),
    ),
    (
        "full attention (chunk_size=None, T=320), causal + rel_bias",
        dict(chunk_size=None, T=320, causal=True, rel_bias=True, linear=False),
    ),
    ("chunk_size=64, causal + rel_bias", dict(chunk_size=64, T=160, causal=True, rel_bias=True)),
    ("chunk_size=16, causal + rel_bias", dict(chunk_size=16, T=45, causal=True, rel_bias=True)),
    (
        "decode: flash_attention_decode (roles from z, gate) + rel_bias",
        dict(DECODE, op="flash_attention_decode"),
    ),
    ("decode: mixed_chunk_decode (RoPE roles) + rel_bias", dict(DECODE, op="mixed_chunk_decode")),
]

#: How each compiled dtype runs under the interpreter.
DTYPES = {
    "fp32": dict(dtype="float32", compile_dtype=None),
    "fp16": dict(dtype="float16", compile_dtype=None),
    "bf16": dict(dtype="float16", compile_dtype="bf16"),
}

#: E of the recordings. The kernels' value tiles are min(64, E) wide (32 where narrowed) and
#: nothing else in a launch depends on E's value (E is a run-time int, a multiple of 16 in both
#: cases), so E = 256 records the launches of the paper's E = 1536 in about a third of the
#: interpreter's time; tests/test_compile_kernels.py checks that the two record the same launches.
RECORDED_E = 256

#: The two shapes of the architecture report: the paper's (S = 128, E = 1536, C = 256) and
#: S = 256 (the kernels' largest S), each with the option sets it is compiled with (S = 256: the
#: largest tiles of each kernel; its other options are in the gate matrix).
SHAPES = {
    "paper": (dict(S=128, chunk_size=256, T=320), [name for name, _ in OPTION_SETS]),
    "S=256": (
        dict(S=256, chunk_size=256, T=320),
        [
            "causal + rel_bias",
            "flash_attention packed documents + state, causal + rel_bias",
            "full attention (chunk_size=None, T=320), causal + rel_bias",
            "decode: flash_attention_decode (roles from z, gate) + rel_bias",
            "decode: mixed_chunk_decode (RoPE roles) + rel_bias",
        ],
    ),
}


def shape_configs(shapes=SHAPES, dtypes=DTYPES, option_sets=OPTION_SETS) -> list:
    """Every shape x dtype x its option sets, named "<shape> <dtype> <options>", recorded at
    E = RECORDED_E."""
    configs = []
    option_fields = dict(option_sets)
    for (shape, (shape_fields, options)), (dtype, dtype_fields) in itertools.product(
        shapes.items(), dtypes.items()
    ):
        for option in options:
            cfg = dict(PAPER, **shape_fields)
            cfg.update(option_fields[option])
            cfg.update(S=shape_fields["S"], E=RECORDED_E, **dtype_fields)
            configs.append(dict(cfg, name=f"{shape} {dtype} {option}"))
    return configs


#: What the architecture report compiles for every target.
ARCHITECTURE_CONFIGS = SMALL_CONFIGS + shape_configs()


#: Inputs that require grad in the gate matrix's frozen-input configs (the others: all).
GRADIENT_SUBSETS = [("v",), ("q_quad", "k_quad"), ("q_lin", "k_lin")]


def gate_matrix(S_values=(128, 256), chunk_sizes=(16, 64, 256, None), E=RECORDED_E) -> list:
    """The codegen gate's configs: every op x dtype x causal x rel_bias x packing x chunk size
    x S of the forward + backward, the decoding steps, the quadratic-only path, and backwards
    with some inputs frozen (GRADIENT_SUBSETS; see the module docstring). Packed documents carry
    a state in and out when causal (a state needs causal=True)."""
    configs = []
    for S, chunk, (dtype, dtype_fields) in itertools.product(S_values, chunk_sizes, DTYPES.items()):
        T = {16: 45, 64: 160}.get(chunk, 320)
        base = dict(PAPER, S=S, E=E, T=T, chunk_size=chunk, batch=(1,), **dtype_fields)
        shape = f"S={S} C={chunk} {dtype}"
        for op, causal, rel_bias, packed in itertools.product(
            ("mixed_chunk_attention", "flash_attention"),
            (True, False),
            (True, False),
            (False, True),
        ):
            cfg = dict(base, op=op, causal=causal, rel_bias=rel_bias)
            options = [op, "causal" if causal else "non-causal"] + ["rel_bias"] * rel_bias
            if packed:
                cfg.update(packed=[T // 3, 0, T - T // 3 - T // 4, T // 4], state=causal)
                options.append("packed + state" if causal else "packed")
            configs.append(dict(cfg, name=f"{shape} {', '.join(options)}"))
        for causal in (True, False):  # the quadratic-only path (no q_lin, k_lin)
            configs.append(
                dict(
                    base,
                    causal=causal,
                    rel_bias=True,
                    linear=False,
                    name=f"{shape} quadratic only, "
                    f"{'causal' if causal else 'non-causal'}, rel_bias",
                )
            )
        for grads in GRADIENT_SUBSETS:  # some inputs frozen: the NEED_* flags off
            configs.append(
                dict(
                    base,
                    causal=True,
                    rel_bias=True,
                    grads=list(grads),
                    name=f"{shape} mixed_chunk_attention, causal, rel_bias, "
                    f"grads {'+'.join(grads)}",
                )
            )
        for op, rel_bias in itertools.product(
            ("mixed_chunk_decode", "flash_attention_decode"), (True, False)
        ):
            configs.append(
                dict(
                    base,
                    op=op,
                    batch=(2,),
                    T=1,
                    causal=True,
                    rel_bias=rel_bias,
                    linear=chunk is not None,
                    capacity=320,
                    name=f"{shape} decode {op}{', rel_bias' * rel_bias}",
                )
            )
    return configs


#: The codegen gate's full configuration matrix (sm_90).
GATE_MATRIX = gate_matrix()

DEFAULT_OUTPUT = os.path.join(
    os.path.dirname(os.path.abspath(__file__)), "results", "compile_report.md"
)

# Runs in the TRITON_INTERPRET=1 child; `cfg` is substituted.
_SNIPPET = """
import torch
from flash_kernels import flash_attention, mixed_chunk_attention

cfg = {cfg!r}
gen = torch.Generator().manual_seed(0)
dtype = getattr(torch, cfg["dtype"])
grads = cfg.get("grads")

def rand(name, *shape, dt=dtype):
    x = (0.5 * torch.randn(*shape, generator=gen)).to(dt)
    return x.requires_grad_(grads is None or name in grads)

batch, T, S, E, C = tuple(cfg["batch"]), cfg["T"], cfg["S"], cfg["E"], cfg["chunk_size"]
q_quad, k_quad = rand("q_quad", *batch, T, S), rand("k_quad", *batch, T, S)
q_lin = rand("q_lin", *batch, T, S) if cfg["linear"] else None
k_lin = rand("k_lin", *batch, T, S) if cfg["linear"] else None
v = rand("v", *batch, T, E)
rel_bias = None
if cfg["rel_bias"]:
    span = C or (max(cfg["packed"]) if cfg.get("packed") else T)
    rel_bias = rand("rel_bias", 2 * span - 1, dt=getattr(torch, cfg["rel_bias_dtype"]))
packing = dict(output_final_state=bool(cfg.get("state")))
if cfg.get("packed"):
    packing["cu_seqlens"] = torch.tensor([0] + cfg["packed"]).cumsum(0)
if cfg.get("state"):
    docs = (len(cfg["packed"]),) if cfg.get("packed") else ()
    packing["initial_state"] = rand("initial_state", *batch, *docs, S, E, dt=torch.float32)
if cfg.get("op") == "flash_attention":
    roles = 4 if cfg["linear"] else 2
    gamma = rand("gamma", roles, S, dt=torch.float32)
    beta = rand("beta", roles, S, dt=torch.float32)
    u = rand("u", *batch, T, E)
    out = flash_attention(q_quad, gamma, beta, v, u=u, chunk_size=C, causal=cfg["causal"],
                          rel_bias=rel_bias, backend="triton", **packing)
else:
    out = mixed_chunk_attention(q_quad, k_quad, q_lin, k_lin, v, chunk_size=C,
                                causal=cfg["causal"], rel_bias=rel_bias, backend="triton",
                                **packing)
loss = 0.0
if cfg.get("state"):
    out, final = out
    loss = (final * torch.randn(final.shape, generator=gen)).sum()
assert out.shape == (*batch, T, E) and out.dtype == dtype
if out.requires_grad:
    loss = loss + (out.float() * torch.randn(out.shape, generator=gen)).sum()
    loss.backward()
"""


# The decode configs' child: one decode step of B sequences at different rows of their chunks.
_DECODE_SNIPPET = """
import torch
from flash_kernels import DecodeCache, flash_attention_decode, mixed_chunk_decode

cfg = {cfg!r}
gen = torch.Generator().manual_seed(0)
dtype = getattr(torch, cfg["dtype"])
(B,), S, E, C = tuple(cfg["batch"]), cfg["S"], cfg["E"], cfg["chunk_size"]
capacity = C if C is not None else cfg["capacity"]

def rand(*shape, dt=dtype):
    return (0.5 * torch.randn(*shape, generator=gen)).to(dt)

cache = DecodeCache.empty(B, S, E, chunk_size=C, capacity=capacity, linear=cfg["linear"],
                          dtype=dtype)
cache.position.copy_(torch.tensor([capacity - 1 - b for b in range(B)]))
rel_bias = (rand(2 * capacity - 1, dt=getattr(torch, cfg["rel_bias_dtype"]))
            if cfg["rel_bias"] else None)
quad_scale = None if C is not None else 1.0 / capacity
if cfg["op"] == "flash_attention_decode":
    roles = 4 if cfg["linear"] else 2
    out = flash_attention_decode(rand(B, S), rand(roles, S, dt=torch.float32),
                                 rand(roles, S, dt=torch.float32), rand(B, E), cache,
                                 u=rand(B, E), rel_bias=rel_bias, quad_scale=quad_scale,
                                 backend="triton")
else:
    linear = [rand(B, S), rand(B, S)] if cfg["linear"] else [None, None]
    out = mixed_chunk_decode(rand(B, S), rand(B, S), *linear, rand(B, E), cache,
                             rel_bias=rel_bias, quad_scale=quad_scale, backend="triton")
assert out.shape == (B, E) and out.dtype == dtype
"""

#: Config fields that do not change what runs under the interpreter.
_NOT_RECORDED = ("name", "compile_dtype")

#: The torch dtype the runtime plans its tiles for, per compile dtype recorded in fp16.
_PLAN_DTYPES = {"bf16": "bfloat16"}

_PLAN_DTYPE_PREFIX = """import os
os.environ[{variable!r}] = {dtype!r}
"""


def config_snippet(cfg) -> str:
    """The Python code that runs a config's op once under the interpreter (bf16 configs run
    their fp16 twin, planned as bf16: FLASH_KERNELS_PLAN_DTYPE set, which the recording child
    restores after each snippet; the snippet leaves out the name and compile_dtype)."""
    snippet = _DECODE_SNIPPET if cfg.get("op", "").endswith("_decode") else _SNIPPET
    snippet = snippet.format(cfg={k: v for k, v in cfg.items() if k not in _NOT_RECORDED})
    if cfg.get("compile_dtype"):
        snippet = (
            _PLAN_DTYPE_PREFIX.format(
                variable=PLAN_DTYPE_VARIABLE, dtype=_PLAN_DTYPES[cfg["compile_dtype"]]
            )
            + snippet
        )
    return snippet


def config_label(cfg) -> str:
    """One line describing a config's shape and options."""
    dtype = cfg.get("compile_dtype") or {"float32": "fp32", "float16": "fp16"}[cfg["dtype"]]
    parts = [
        f"op={cfg.get('op', 'mixed_chunk_attention')}",
        f"batch={tuple(cfg['batch'])}",
        f"T={cfg['T']}",
        f"S={cfg['S']}",
        f"E={cfg['E']}",
        f"chunk_size={cfg['chunk_size']}",
        f"causal={cfg['causal']}",
        f"rel_bias={'yes (' + cfg['rel_bias_dtype'] + ')' if cfg['rel_bias'] else 'no'}",
        f"linear={cfg['linear']}",
        f"compiled as {dtype}",
    ]
    if cfg.get("compile_dtype"):
        parts.append(f"recorded in {cfg['dtype']}")
    if cfg.get("packed"):
        parts.append(f"packed documents {cfg['packed']}")
    if cfg.get("state"):
        parts.append("initial and final state")
    return ", ".join(parts)


def _finish_records(cfg, records) -> list:
    """A config's distinct launches, retyped to its compile dtype."""
    if cfg.get("compile_dtype"):
        records = [retype_record(r, "fp16", cfg["compile_dtype"]) for r in records]
    unique = {}
    for r in records:
        unique.setdefault(record_key(r), r)
    return list(unique.values())


def record_config(cfg, target=None) -> list:
    """The distinct kernel launches of one config's forward + backward (or decoding step),
    recorded with FLASH_KERNELS_TARGET=`target` when given, retyped for compiling."""
    return _finish_records(cfg, record_in_interpreter(config_snippet(cfg), target=target))


def recording_items(configs, targets, jobs: int = 2) -> list:
    """The child processes that record `configs` for `targets` (`aot_compile.record_concurrently`
    items): one per target, each target's snippets split in `jobs` shares when there are fewer
    targets than jobs. Each distinct snippet runs once per target (a bf16 config reuses its fp16
    twin's run); an item's snippet keys are indices into the list of distinct snippets."""
    snippets = list(dict.fromkeys(config_snippet(cfg) for cfg in configs))
    shares = max(1, -(-jobs // max(1, len(targets))))
    return [
        dict(
            target=target,
            snippets={str(i): snippets[i] for i in range(share, len(snippets), shares)},
        )
        for target in targets
        for share in range(shares)
        if share < len(snippets)
    ]


def collect_recordings(configs, items, results) -> tuple:
    """({(name, target): [LaunchRecord]}, {(name, target): error text}) from the recording
    items of `recording_items(configs, ...)` and their results."""
    snippets = list(dict.fromkeys(config_snippet(cfg) for cfg in configs))
    index = {text: str(i) for i, text in enumerate(snippets)}
    records, errors = {}, {}
    for item, (recorded, failed) in zip(items, results):
        for cfg in configs:
            key, target = index[config_snippet(cfg)], item["target"]
            if key in failed:
                errors[(cfg["name"], target)] = failed[key]
            elif key in recorded:
                records[(cfg["name"], target)] = _finish_records(cfg, recorded[key])
    return records, errors


def record_configs(configs, targets, jobs: int = 2) -> tuple:
    """Record every config for every target: ({(name, target): [LaunchRecord]},
    {(name, target): error text}), in child processes with FLASH_KERNELS_TARGET set to the
    target, at most `jobs` at a time."""
    items = recording_items(configs, targets, jobs)
    return collect_recordings(configs, items, record_concurrently(items, jobs))


def compile_configs(records, pythons=(None,), jobs: int = 2, ttgir_only: bool = False) -> dict:
    """Compile every distinct recorded launch for its target with each Python of `pythons`
    (None: this one), to the binary or (`ttgir_only`, for the codegen gate) to TTGIR. Returns
    {(python, record key, target): row}; each row also lists the configs that launch it
    (row["configs"])."""
    by_target = {}  # target -> {record key: record}
    configs_of = {}  # (record key, target) -> [config names]
    for (name, target), recs in records.items():
        for record in recs:
            key = record_key(record)
            by_target.setdefault(target, {}).setdefault(key, record)
            configs_of.setdefault((key, target), []).append(name)
    tasks = [
        dict(records=list(recs.values()), targets=[target], python=python, ttgir_only=ttgir_only)
        for python in pythons
        for target, recs in by_target.items()
    ]
    rows = {}
    for task, task_rows in zip(tasks, measure_concurrently(tasks, jobs)):
        for row in task_rows:
            key = record_key(record_from_dict(row["record"]))
            row["configs"] = configs_of[(key, row["target"])]
            rows[(task["python"], key, row["target"])] = row
    return rows


# ---------------------------------------------------------------------------------------------
# The report
# ---------------------------------------------------------------------------------------------


def _cell(row) -> str:
    """ "regs / spill B / shared KB / tensor-core instructions" of one compile, problems bold."""
    if row is None:
        return "-"
    if row["error"]:
        return "**compile error**"
    u = row["usage"]
    shared = f"{u['shared_bytes'] / 1024:.0f}"
    if row["over_shared_limit"]:
        shared = f"**{shared} (over)**"
    spill = f"**{u['spill_bytes']}**" if u["spill_bytes"] else "0"
    cell = f"{u['registers']} / {spill} / {shared} / {tensor_core_label(u)}"
    if row.get("codegen_findings"):
        cell += " / **gate**"
    return cell


def architecture_summary(rows, targets) -> list:
    """Markdown lines: per target, launches compiled, compile errors, launches over the shared
    memory limit, launches that spill (largest spill), largest registers and shared memory."""
    lines = [
        (
            "| target | launches | compile errors | over shared memory | spilling (max B) | "
            "max regs | max shared KB (limit) |"
        ),
        "|---|---|---|---|---|---|---|",
    ]
    for target in targets:
        arch = architecture(target)
        mine = [r for r in rows if r["target"] == arch.target]
        ok = [r for r in mine if not r["error"]]
        spilling = [r["usage"]["spill_bytes"] for r in ok if r["usage"]["spill_bytes"]]
        lines.append(
            f"| {arch.label} | {len(mine)} | {sum(bool(r['error']) for r in mine)} | "
            f"{sum(r['over_shared_limit'] for r in mine)} | "
            f"{len(spilling)} ({max(spilling, default=0)}) | "
            f"{max((r['usage']['registers'] for r in ok), default=0)} | "
            f"{max((r['usage']['shared_bytes'] for r in ok), default=0) / 1024:.0f} "
            f"({arch.shared_memory_bytes / 1024:.0f}) |"
        )
    return lines


def _shape_dtype(config_name: str) -> str:
    """ "paper bf16", "S=256 fp32", "small fp16": the first two words of a config's name."""
    return " ".join(config_name.split()[:2])


def shape_dtype_summary(rows, targets) -> list:
    """Markdown lines: per shape and dtype (rows) and target (columns), how many distinct
    launches exceed the shared memory limit, spill, or do not compile."""
    groups = {}
    for row in rows:
        for name in row.get("configs", []):
            groups.setdefault(_shape_dtype(name), {}).setdefault(row["target"], {})[id(row)] = row
    labels = [architecture(t).label for t in targets]
    lines = [
        "Distinct launches per shape and dtype that exceed the shared memory limit (over), "
        "spill, or fail to compile (error); ok when none.",
        "",
        "| shape, dtype | " + " | ".join(labels) + " |",
        "|---|" + "---|" * len(labels),
    ]
    for group in sorted(groups, key=lambda g: (g.split()[0] != "paper", g)):
        cells = []
        for target in targets:
            mine = list(groups[group].get(target, {}).values())
            if not mine:
                cells.append("-")
                continue
            errors = sum(bool(r["error"]) for r in mine)
            over = sum(bool(r["over_shared_limit"]) for r in mine)
            spill = sum(bool(r["usage"] and r["usage"]["spill_bytes"]) for r in mine)
            parts = [
                f"{n} {what}"
                for n, what in ((over, "over"), (spill, "spill"), (errors, "error"))
                if n
            ]
            cells.append(f"**{', '.join(parts)}** of {len(mine)}" if parts else f"ok ({len(mine)})")
        lines.append(f"| {group} | " + " | ".join(cells) + " |")
    return lines + [""]


def problem_lists(rows) -> list:
    """Markdown lines listing every launch over a shared memory limit and every launch that
    spills, per architecture, with the configs that make it."""
    lines = []
    for title, wanted, value in [
        (
            "Launches over the shared memory limit",
            lambda r: r["over_shared_limit"],
            lambda r: (
                f"{r['usage']['shared_bytes']:,} B > "
                f"{architecture(r['target']).shared_memory_bytes:,} B"
            ),
        ),
        (
            "Launches that spill",
            lambda r: r["usage"]["spill_bytes"],
            lambda r: f"{r['usage']['spill_bytes']} B",
        ),
    ]:
        found = [r for r in rows if not r["error"] and wanted(r)]
        lines += [f"## {title} ({len(found)})", ""]
        if not found:
            lines += ["None.", ""]
            continue
        lines += ["| target | kernel | value | constexprs | configs |", "|---|---|---|---|---|"]
        for r in sorted(
            found,
            key=lambda r: (
                list(ARCHITECTURES).index(r["target"]) if r["target"] in ARCHITECTURES else 99,
                r["record"]["kernel_name"],
            ),
        ):
            lines.append(
                f"| {r['arch']} | `{r['record']['kernel_name']}` | {value(r)} | "
                f"{constexpr_label(r['record']['constexprs'])} | "
                f"{'; '.join(r.get('configs', []))} |"
            )
        lines.append("")
    return lines


def config_sections(configs, records, errors, rows, targets) -> list:
    """Per config: its description and one row per distinct launch, one column per target."""
    labels = [architecture(t).label for t in targets]
    lines = [
        "## Per config",
        "",
        (
            "Each cell: registers / spill bytes / shared memory KB / tensor-core instructions "
            "(static count in the binary); **bold** marks a problem, **gate** a codegen gate "
            "finding."
        ),
        "",
    ]
    for cfg in configs:
        name = cfg["name"]
        lines += [f"### {name}", "", config_label(cfg), ""]
        failed = [t for t in targets if (name, t) in errors]
        for t in failed:
            message = errors[(name, t)].strip()[-2000:]
            lines += [
                f"**Recording failed** for {architecture(t).label}:",
                "",
                "```",
                message,
                "```",
                "",
            ]
        # The launches, in recording order, merged over targets (tiles may differ per target).
        kernels = {}
        for t in targets:
            for record in records.get((name, t), []):
                label = (
                    record.kernel_name,
                    constexpr_label(record_to_dict(record)["constexprs"]),
                    record.num_warps,
                )
                kernels.setdefault(label, {})[t] = record_key(record)
        if not kernels:
            continue
        lines += [
            "| kernel | warps | " + " | ".join(labels) + " |",
            "|---|---|" + "---|" * len(labels),
        ]
        for (kernel, _, warps), keys in kernels.items():
            cells = [_cell(rows.get((None, keys[t], t))) if t in keys else "-" for t in targets]
            lines.append(f"| `{kernel}` | {warps} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines


def gate_section(gate_rows_by_version, matrix_size) -> list:
    """The codegen gate's result per Triton version over the gate matrix."""
    lines = [
        "## Codegen gate (sm_90): register transposes into tensor-core products",
        "",
        codegen_gate.RULE_SUMMARY,
        "",
        f"Gate matrix: {matrix_size} configs (bench/compile_report.py GATE_MATRIX).",
        "",
    ]
    for version, rows in gate_rows_by_version.items():
        lines += [f"### Triton {version}", "", codegen_gate.summary_line(rows), ""]
        lines += codegen_gate.findings_table(rows)
    return lines


def other_triton_section(arch_rows, other_rows) -> list:
    """Registers / spill bytes of the paper-shape launches on sm_90 per Triton version."""
    if not other_rows:
        return []
    import triton

    versions = sorted({r["triton"] for r in other_rows.values()})
    lines = [
        "## Registers / spill bytes on sm_90 per Triton version",
        "",
        (
            f"The launches of the paper-shape bf16 configs, compiled by Triton "
            f"{triton.__version__} (this environment) and {', '.join(versions)} "
            f"(`--other-triton`)."
        ),
        "",
        "| kernel | constexprs | "
        + " | ".join([f"Triton {triton.__version__}"] + [f"Triton {v}" for v in versions])
        + " |",
        "|---|---|" + "---|" * (1 + len(versions)),
    ]

    def regs_spill(row):
        if row is None:
            return "-"
        if row["error"]:
            return "**compile error**"
        return f"{row['usage']['registers']} / {row['usage']['spill_bytes']}"

    for (python, key, target), row in other_rows.items():
        mine = arch_rows.get((None, key, target))
        lines.append(
            f"| `{row['record']['kernel_name']}` | "
            f"{constexpr_label(row['record']['constexprs'])} | {regs_spill(mine)} | "
            + " | ".join(regs_spill(row) if v == row["triton"] else "-" for v in versions)
            + " |"
        )
    return lines + [""]


def _other_pythons(given) -> list:
    if given:
        return list(given)
    env = os.environ.get("FLASH_KERNELS_OTHER_TRITON_PYTHON")
    return [env] if env else []


def collect(arch_configs, gate_configs, targets, pythons, jobs: int = 2) -> dict:
    """Record and compile everything the report shows. Returns a JSON-ready dict: the recorded
    launches and recording errors per (config name, target) (keys "name|target"), the rows of
    the architecture configs, of the gate matrix (one set per Triton version) and of the
    paper-shape configs on sm_90 with the other Tritons, and the elapsed seconds."""
    import triton

    start = time.perf_counter()
    records, errors = record_configs(arch_configs, targets, jobs)
    gate_records, gate_errors = record_configs(gate_configs, codegen_gate.GATE_TARGETS, jobs)
    print(
        f"recorded {len(records) + len(gate_records)} (config, target) pairs, "
        f"{len(errors) + len(gate_errors)} failed, {time.perf_counter() - start:.0f} s",
        file=sys.stderr,
    )
    arch_rows = compile_configs(records, jobs=jobs)
    print(
        f"compiled {len(arch_rows)} architecture launches, {time.perf_counter() - start:.0f} s",
        file=sys.stderr,
    )
    gate_rows = compile_configs(gate_records, [None, *pythons], jobs, ttgir_only=True)
    paper = {
        k: v
        for k, v in records.items()
        if k[1] in codegen_gate.GATE_TARGETS and k[0].startswith("paper bf16")
    }
    other_rows = compile_configs(paper, pythons, jobs) if pythons else {}
    print(
        f"compiled {len(gate_rows) + len(other_rows)} gate / other-Triton launches, "
        f"{time.perf_counter() - start:.0f} s",
        file=sys.stderr,
    )
    return dict(
        triton=triton.__version__,
        targets=list(targets),
        arch_configs=[c["name"] for c in arch_configs],
        gate_configs=[c["name"] for c in gate_configs],
        records={f"{n}|{t}": [record_to_dict(r) for r in recs] for (n, t), recs in records.items()},
        errors={f"{n}|{t}": text for (n, t), text in errors.items()},
        gate_errors={f"{n}|{t}": text for (n, t), text in gate_errors.items()},
        arch_rows=list(arch_rows.values()),
        gate_rows=list(gate_rows.values()),
        other_rows=list(other_rows.values()),
        seconds=round(time.perf_counter() - start),
    )


def _split_key(key):
    name, _, target = key.rpartition("|")
    return name, target


def render(data) -> str:
    """The markdown report of `collect`'s result."""
    targets = data["targets"]
    by_name = {c["name"]: c for c in ARCHITECTURE_CONFIGS}
    arch_configs = [by_name[n] for n in data["arch_configs"] if n in by_name]
    records = {_split_key(k): [record_from_dict(d) for d in v] for k, v in data["records"].items()}
    errors = {_split_key(k): v for k, v in data["errors"].items()}
    arch_rows = {
        (None, record_key(record_from_dict(r["record"])), r["target"]): r for r in data["arch_rows"]
    }
    unique_arch = data["arch_rows"]
    by_version = {}
    for row in data["gate_rows"]:
        by_version.setdefault(row["triton"], []).append(row)
    all_rows = unique_arch + data["gate_rows"] + data["other_rows"]
    versions = [data["triton"]] + sorted({r["triton"] for r in all_rows} - {data["triton"]})
    report = [
        "# Ahead-of-time compile report: every kernel launch, every architecture",
        "",
        f"Triton {', '.join(versions)}; forward + backward (or one decoding step) of each "
        "config, recorded per target with FLASH_KERNELS_TARGET set. " + REPORT_PREAMBLE,
        "",
        f"Generated by `python -m bench.compile_report` ({data['seconds']} s on 2 cores).",
        "",
        "Architecture report: " + summary_line(unique_arch, extra_failures=len(errors)),
        "",
    ]
    report += ["## Architectures and their limits", ""] + limits_table() + [""]
    if unique_arch:
        report += ["## Per architecture", ""] + architecture_summary(unique_arch, targets) + [""]
        report += ["## Per shape and dtype", ""] + shape_dtype_summary(unique_arch, targets)
    if data["gate_configs"]:
        report += gate_section(by_version, len(data["gate_configs"]))
        if data["gate_errors"]:
            report += [
                f"Gate matrix: {len(data['gate_errors'])} config(s) could not be "
                "recorded: " + "; ".join(sorted(_split_key(k)[0] for k in data["gate_errors"])),
                "",
            ]
    report += problem_lists(unique_arch)
    other = {
        (None, record_key(record_from_dict(r["record"])), r["target"]): r
        for r in data["other_rows"]
    }
    report += other_triton_section(arch_rows, other)
    report += config_sections(arch_configs, records, errors, arch_rows, targets)
    report += error_details(all_rows)
    return "\n".join(report).rstrip("\n") + "\n"


def failed(data) -> bool:
    """Whether the report found a problem: a recording error, a compile error, a launch over a
    hardware limit, or a codegen gate finding."""
    rows = data["arch_rows"] + data["gate_rows"] + data["other_rows"]
    return bool(
        data["errors"]
        or data["gate_errors"]
        or any(map(row_failed, rows))
        or any(r.get("codegen_findings") for r in rows)
    )


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--targets",
        nargs="+",
        default=list(ARCHITECTURES),
        help="architecture report targets (cuda:<capability>, hip:<gfx arch>)",
    )
    parser.add_argument(
        "--only",
        nargs="+",
        default=None,
        help="run only the configs whose name contains one of these words",
    )
    parser.add_argument("--output", default=DEFAULT_OUTPUT)
    parser.add_argument("--jobs", type=int, default=2, help="child processes at a time")
    parser.add_argument(
        "--other-triton",
        nargs="+",
        default=[],
        metavar="PYTHON",
        help="also compile the gate matrix (and the paper configs on sm_90) "
        "with these Pythons' Triton versions (default: "
        "$FLASH_KERNELS_OTHER_TRITON_PYTHON)",
    )
    parser.add_argument("--no-gate", action="store_true", help="skip the gate matrix")
    parser.add_argument("--gate-only", action="store_true", help="only the gate matrix")
    parser.add_argument(
        "--save-data", metavar="JSON", help="also write the recorded launches and rows here"
    )
    parser.add_argument(
        "--from-data",
        metavar="JSON",
        help="render the report from a --save-data file (no recording or compiling)",
    )
    args = parser.parse_args(argv)
    if args.from_data:
        with open(args.from_data) as f:
            data = json.load(f)
    else:

        def chosen(configs):
            return [
                c for c in configs if not args.only or any(word in c["name"] for word in args.only)
            ]

        data = collect(
            [] if args.gate_only else chosen(ARCHITECTURE_CONFIGS),
            [] if args.no_gate else chosen(GATE_MATRIX),
            [target_name(t) for t in args.targets],
            _other_pythons(args.other_triton),
            args.jobs,
        )
        if args.save_data:
            with open(args.save_data, "w") as f:
                json.dump(data, f, default=str)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        f.write(render(data))
    print(f"wrote {args.output}", file=sys.stderr)
    return 1 if failed(data) else 0


if __name__ == "__main__":
    sys.exit(main())
