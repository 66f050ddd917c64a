"""Ahead-of-time compile report of the Triton kernels the op really launches (no GPU needed).

For every config below, runs `mixed_chunk_attention(..., backend="triton")` forward + backward
under TRITON_INTERPRET=1 in a child process, recording each kernel launch (kernel, argument types,
constexprs, num_warps/num_stages); then compiles every distinct launch for sm_80 and sm_90 with
`triton.compile` and reads registers, spills, shared memory and wgmma use from the cubin
(`tools.aot_compile`). Writes bench/results/compile_report.md; exits non-zero when a launch
cannot be recorded, does not compile, or exceeds a hardware limit.

The interpreter cannot run bf16 dots, so bf16 configs are recorded in fp16 and their fp16 types
rewritten to bf16 before compiling (`compile_dtype`): this assumes the op picks the same
constexprs / warps for fp16 and bf16. T only needs to be large enough to reach the code paths
(several chunks); the compiled kernels do not depend on it (T is not specialised).

    python -m bench.compile_report [--capabilities 80 90] [--only paper] [--output PATH]
                                   [--other-triton PYTHON ...] [--other-only paper]

--other-triton: a Python whose environment holds another Triton version (e.g. the GPU machine's
3.6: `python3 -m venv V && V/bin/pip install torch==2.13.0 triton==3.6.0 "numpy<2.4"`) compiles
the launches of the configs named by --other-only for --other-capabilities (default sm_90) too;
the report then lists registers and spills per version side by side. The launches are recorded
once, with this process's Triton: the tile choice (kernel_config) does not depend on the Triton
version, and the JIT of every version specialises arguments alike (aot_compile.jit_compile_inputs
checks it).
"""
import argparse
import os
import sys
import time

from tools.aot_compile import (REPORT_PREAMBLE, error_details, markdown_table,
                                       measure_launches, record_from_dict, record_in_interpreter,
                                       record_key, retype_record, row_failed, summary_line)

# ---------------------------------------------------------------------------------------------
# Configs: edit freely. Keys: name; op ("flash_attention" for the fused op with a gate, else
# mixed_chunk_attention; q_quad then serves as z); batch (leading dims); T, S, E; chunk_size (None = one chunk);
# causal; rel_bias (bool); linear (False = q_lin/k_lin None, quadratic only); op may also be
# "mixed_chunk_decode" / "flash_attention_decode" (one decode step, T ignored; capacity for
# chunk_size=None); dtype (what runs
# under the interpreter: "float32" or "float16"); rel_bias_dtype; compile_dtype (optional: the
# Triton type the fp16 launches are compiled as, e.g. "bf16" for what runs on the GPU);
# grads (which inputs require grad for the backward; default all); packed (document lengths
# summing to T: cu_seqlens); state (an initial state in, the final state out, both in the loss).
# ---------------------------------------------------------------------------------------------
SMALL = dict(batch=(2,), T=45, S=20, E=36, chunk_size=16, rel_bias=True, linear=True,
             rel_bias_dtype="float32")
PAPER = dict(batch=(1,), T=512, S=128, E=1536, chunk_size=256, linear=True, dtype="float16",
             rel_bias_dtype="float32", compile_dtype="bf16")
# The decode ops (one token per sequence; T = 1): run by _DECODE_SNIPPET, sequence 0 folds.
DECODE = dict(PAPER, batch=(2,), T=1, causal=True, rel_bias=True)

CONFIGS = [
    dict(SMALL, name="small fp32 causal", dtype="float32", causal=True),
    dict(SMALL, name="small fp32 non-causal, no bias", dtype="float32", causal=False,
         rel_bias=False),
    dict(SMALL, name="small fp16 causal", dtype="float16", causal=True),
    dict(SMALL, name="small fp16 quadratic only", dtype="float16", causal=True, linear=False),
    dict(SMALL, name="small fp32 one chunk (chunk_size=None)", dtype="float32", causal=True,
         chunk_size=None, batch=()),
    dict(SMALL, name="small fp16 one long chunk (chunk_size=None, T > 256: scores recomputed)",
         dtype="float16", causal=True, chunk_size=None, batch=(), T=300),
    dict(PAPER, name="paper bf16 causal", causal=True, rel_bias=False),
    dict(PAPER, name="paper bf16 causal + rel_bias", causal=True, rel_bias=True),
    dict(PAPER, name="paper bf16 non-causal", causal=False, rel_bias=False),
    dict(PAPER, name="paper bf16 non-causal + rel_bias", causal=False, rel_bias=True),
    dict(PAPER, name="paper bf16 flash_attention (roles from z, gate), causal + rel_bias",
         op="flash_attention", causal=True, rel_bias=True),
    dict(PAPER, name="paper bf16 full attention (chunk_size=None), causal + rel_bias",
         chunk_size=None, T=320, causal=True, rel_bias=True, linear=False),
    dict(PAPER, name="paper bf16 packed documents + state, causal + rel_bias", T=800,
         packed=[200, 256, 0, 300, 44], state=True, causal=True, rel_bias=True),
    dict(PAPER, name="paper bf16 packed documents, non-causal + rel_bias", T=800,
         packed=[200, 256, 0, 300, 44], causal=False, rel_bias=True),
    dict(PAPER, name="paper bf16 flash_attention packed documents + state, causal + rel_bias",
         op="flash_attention", T=800, packed=[200, 256, 0, 300, 44], state=True, causal=True,
         rel_bias=True),
    dict(DECODE, name="paper bf16 decode: flash_attention_decode (roles from z, gate) + rel_bias",
         op="flash_attention_decode"),
    dict(DECODE, name="paper bf16 decode: mixed_chunk_decode (RoPE roles) + rel_bias",
         op="mixed_chunk_decode"),
    dict(DECODE, name="bf16 decode: one growing chunk (chunk_size=None, capacity 512)",
         op="mixed_chunk_decode", chunk_size=None, capacity=512, linear=False),
]

DEFAULT_OUTPUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results",
                              "compile_report.md")

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
    rel_bias = rand("rel_bias", 2 * (C or T) - 1, dt=getattr(torch, cfg["rel_bias_dtype"]))
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
rel_bias = rand(2 * capacity - 1, dt=getattr(torch, cfg["rel_bias_dtype"])) if cfg["rel_bias"] else None
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


def config_label(cfg) -> str:
    """One line describing a config's shape and options."""
    dtype = cfg.get("compile_dtype") or {"float32": "fp32", "float16": "fp16"}[cfg["dtype"]]
    parts = [f"batch={tuple(cfg['batch'])}", f"T={cfg['T']}", f"S={cfg['S']}", f"E={cfg['E']}",
             f"chunk_size={cfg['chunk_size']}", f"causal={cfg['causal']}",
             f"rel_bias={'yes (' + cfg['rel_bias_dtype'] + ')' if cfg['rel_bias'] else 'no'}",
             f"linear={cfg['linear']}", f"compiled as {dtype}"]
    if cfg.get("compile_dtype"):
        parts.append(f"recorded in {cfg['dtype']}")
    if cfg.get("packed"):
        parts.append(f"packed documents {cfg['packed']}")
    if cfg.get("state"):
        parts.append("initial and final state")
    return ", ".join(parts)


def record_config(cfg) -> list:
    """The distinct kernel launches of one config's forward + backward, retyped for compiling."""
    snippet = _DECODE_SNIPPET if cfg.get("op", "").endswith("_decode") else _SNIPPET
    records = record_in_interpreter(snippet.format(cfg=cfg))
    if cfg.get("compile_dtype"):
        records = [retype_record(r, "fp16", cfg["compile_dtype"]) for r in records]
    unique = {}
    for r in records:
        unique.setdefault(record_key(r), r)
    return list(unique.values())


def _regs_spill(row) -> str:
    if row is None:
        return "-"
    if row["error"]:
        return "**compile error**"
    return f"{row['usage']['registers']} / {row['usage']['stack_bytes']}"


def compile_with_other_tritons(records_by_config, rows_by_key, pythons, only, capabilities):
    """Compile the chosen configs' launches with each of `pythons` (other Triton versions) and
    return (their rows, the report section comparing registers / spill bytes per version)."""
    configs = [name for name in records_by_config if any(word in name for word in only)]
    if not pythons or not configs:
        return [], []
    import triton
    versions = [f"Triton {triton.__version__}"]
    by_version = []                      # per other Python: {(record key, capability): row}
    other_rows = []
    for python in pythons:
        records = [r for name in configs for r in records_by_config[name]]
        rows = measure_launches(records, capabilities, python=python)
        other_rows += rows
        by_version.append({(record_key(record_from_dict(row["record"])), row["capability"]): row
                           for row in rows})
        versions.append(f"Triton {rows[0]['triton']}" if rows else python)
        print(f"[{python}] {len(rows)} compiles, {sum(map(row_failed, rows))} failed", file=sys.stderr)
    lines = ["## Registers / spill bytes per Triton version", "",
             f"The launches of the {', '.join(configs)} configs, compiled by each version "
             f"({', '.join(versions[1:])} from another environment: `--other-triton`). "
             + " ".join(f"{v}: {summary_line(list(rows.values()))}" for v, rows
                        in zip(versions[1:], by_version)), "",
             "| config | kernel | target | " + " | ".join(f"{v}: regs / spill B" for v in versions) + " |",
             "|---|---|---|" + "---|" * len(versions)]
    for name in configs:
        for record in records_by_config[name]:
            key = record_key(record)
            for cap in capabilities:
                cells = [_regs_spill(rows_by_key.get((key, cap)))]
                cells += [_regs_spill(rows.get((key, cap))) for rows in by_version]
                lines.append(f"| {name} | `{record.kernel_name}` | sm_{cap} | " + " | ".join(cells) + " |")
    return other_rows, lines + [""]


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--capabilities", nargs="+", type=int, default=[80, 90])
    parser.add_argument("--only", nargs="+", default=None,
                        help="run only the configs whose name contains one of these words")
    parser.add_argument("--output", default=DEFAULT_OUTPUT)
    parser.add_argument("--other-triton", nargs="+", default=[], metavar="PYTHON",
                        help="also compile with these Pythons' Triton versions")
    parser.add_argument("--other-only", nargs="+", default=["paper"],
                        help="the configs (words of their names) compiled by --other-triton")
    parser.add_argument("--other-capabilities", nargs="+", type=int, default=[90])
    args = parser.parse_args(argv)

    configs = [c for c in CONFIGS
               if not args.only or any(word in c["name"] for word in args.only)]
    rows_by_key = {}                     # (record key, capability) -> row: compile each once
    sections, all_rows, failures = [], [], 0
    records_by_config = {}
    for cfg in configs:
        start = time.perf_counter()
        lines = [f"## {cfg['name']}", "", config_label(cfg), ""]
        try:
            records = record_config(cfg)
        except Exception as e:  # noqa: BLE001 - reported, the other configs still run
            failures += 1
            print(f"[{cfg['name']}] recording FAILED", file=sys.stderr)
            message = str(e).split("--- output ---")[-1].strip()[-3000:]
            sections += lines + ["**Recording failed** (the op raised under the interpreter):",
                                 "", "```", message, "```", ""]
            continue
        todo = [r for r in records
                if any((record_key(r), cap) not in rows_by_key for cap in args.capabilities)]
        for row in measure_launches(todo, args.capabilities):
            rows_by_key[(record_key(record_from_dict(row["record"])), row["capability"])] = row
        rows = [rows_by_key[(record_key(r), cap)] for r in records for cap in args.capabilities]
        records_by_config[cfg["name"]] = records
        all_rows += rows
        sections += lines + markdown_table(rows) + [""]
        print(f"[{cfg['name']}] {len(records)} launches, {sum(map(row_failed, rows))} failed, "
              f"{time.perf_counter() - start:.1f} s", file=sys.stderr)

    import triton
    unique_rows = list({id(r): r for r in all_rows}.values())
    other_rows, other_section = compile_with_other_tritons(
        records_by_config, rows_by_key, args.other_triton, args.other_only, args.other_capabilities)
    report = ["# Ahead-of-time compile report: mixed_chunk_attention (backend=\"triton\")", "",
              f"Triton {triton.__version__}; forward + backward of each config. " + REPORT_PREAMBLE,
              "", summary_line(unique_rows, extra_failures=failures), ""]
    report += other_section + sections + error_details(unique_rows) + error_details(other_rows)
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    with open(args.output, "w") as f:
        f.write("\n".join(report).rstrip("\n") + "\n")
    print(f"wrote {args.output}", file=sys.stderr)
    return 1 if failures or any(map(row_failed, unique_rows + other_rows)) else 0


if __name__ == "__main__":
    sys.exit(main())
