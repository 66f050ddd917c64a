"""Kernel microbenchmarks: time, TFLOP/s, fraction of the measured matmul peak and peak memory of
FLASH mixed chunk attention against its baselines (forward, backward, forward+backward).

Full mode (the default with CUDA): the paper shape S=128, E=1536, C=256, causal, bf16, T from
512 to 128K at a fixed number of tokens per batch (batch = 65536 // T, at least 1), plus
non-causal rows. Quick mode (the default without CUDA, a smoke test that runs in well under a
minute on 2 CPU cores): fp32, S=128, E=256, T = 512..4096, batch 1; on a CPU the chunked
"torch" path stands in for the kernels (the Triton kernels run on a CPU only under
TRITON_INTERPRET=1, far too slow to time) and is measured against the dense reference and SDPA.
Both modes add the varlen row (bench/varlen.py): 8 documents of mixed lengths packed into one
row with cu_seqlens against the same documents zero-padded to a batch of 8, for the
implementations that take cu_seqlens (triton, flash_attention, torch), at --varlen-tokens
tokens in all (full: 16384; quick: 4096, to stay within the quick mode's time).

Timing: GPU: triton.testing.do_bench (L2 flushed between runs, synchronised) after its warm-up;
CPU: time.perf_counter over several runs after one warm-up. Every point records the median
(ms, the number every table and ratio uses), the fastest and slowest run (ms_min, ms_max),
with 10 runs or more (a GPU) also the 10th and 90th percentiles (ms_p10, ms_p90), and the
number of timed runs; bench/stability.py flags noisy points (spread above 20% of the median: the
10th-90th percentile range when there is one, else the min-max range) and non-monotonic ones (more
work measured faster), warns on screen when the machine is loaded (load average, or a matmul peak
far below this machine's usual one), and draws growth conclusions only from stable points. Every
point gets fresh random inputs. TFLOP/s come from bench/flops.py; the peak is a large torch.matmul
in the run's dtype timed in the same run. Peak memory: torch.cuda's allocator on a GPU, a child
process's RSS on a CPU (bench/memory.py); inputs and gradients included; not for the backward alone
(it needs its forward: that is the forward+backward figure). Results are appended to
OUTPUT_DIR/results.jsonl, by default bench_out/results.jsonl under the current directory
(git-ignored at the repository root): the committed bench/results/ is never touched by default. Then
`python -m bench.plots` and `python -m bench.readme` draw the figures and the README section from
them into the same folder, and `python -m bench.publish` is the explicit step that copies a run into
bench/results/ and updates the committed figures and the README (see bench/publish.py).

    python -m bench.run [--quick | --full] [--seq-lens T ...] [--impls NAME ...] [--modes ...]
                        [--varlen-tokens N] [--time-budget SECONDS] [--output-dir DIR]
"""

import argparse
import dataclasses
import gc
import os
import signal
import statistics
import sys
import time

import torch

from .flops import MODE_NAMES, MODES, matmul_flops
from .impls import IMPLS, Problem, dense_bytes_estimate, make_call, run_once, varlen_problems
from .memory import peak_memory_bytes
from .results_io import (
    DEFAULT_DIR,
    RESULTS_NAME,
    append_results,
    load_committed_results,
    run_metadata,
)
from .stability import (
    annotate,
    growth_conclusions,
    load_average,
    machine_warnings,
    peak_reference,
    unstable_summary,
)
from .tables import (
    OURS,
    SPREAD_NOTE,
    evaluate_targets,
    memory_table,
    mode_title,
    primary_impl,
    render_targets,
    render_text,
    time_table,
)
from .varlen import describe as describe_varlen
from .varlen import document_lengths, varlen_table

FULL_SEQ_LENS = [512, 1024, 2048, 4096, 8192, 16384, 32768, 65536, 131072]
QUICK_SEQ_LENS = [512, 1024, 2048, 4096]
FULL_VARLEN_TOKENS = 16384
# 16384 tokens on the torch path on a CPU would add ~20 s to the quick run (the padded batch is
# 2.4x the tokens); 4096 adds ~5 s and still has documents of several chunks.
QUICK_VARLEN_TOKENS = 4096
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
PERCENTILE_MIN_REPS = 10


def _progress(iterable, total, enabled):
    try:
        from tqdm import tqdm
    except ImportError:  # tqdm is not a dependency of the package
        tqdm = None
    if not enabled or tqdm is None:
        return iterable, print
    bar = tqdm(iterable, total=total, unit="point", dynamic_ncols=True, mininterval=0.5)
    return bar, tqdm.write


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m bench.run",
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Implementations: " + ", ".join(IMPLS) + " (see bench/impls.py).",
    )
    size = parser.add_mutually_exclusive_group()
    size.add_argument(
        "--quick",
        action="store_true",
        help="small CPU-friendly smoke benchmark (default without CUDA)",
    )
    size.add_argument(
        "--full",
        action="store_true",
        help="the paper-shape suite, T up to 128K (default with CUDA)",
    )
    parser.add_argument(
        "--seq-lens",
        type=int,
        nargs="+",
        metavar="T",
        help=f"causal sequence lengths (full: {FULL_SEQ_LENS}; quick: {QUICK_SEQ_LENS})",
    )
    parser.add_argument(
        "--noncausal-seq-lens",
        type=int,
        nargs="*",
        metavar="T",
        help="lengths of the non-causal rows (full: 4096; quick: 2048; none: empty)",
    )
    parser.add_argument(
        "--tokens",
        type=int,
        help="tokens per batch: batch = max(1, tokens // T); 0 means batch 1 "
        "(full: 65536; quick: 0)",
    )
    parser.add_argument(
        "--varlen-tokens",
        type=int,
        metavar="N",
        help="tokens of the varlen row's 8 packed documents (full: "
        f"{FULL_VARLEN_TOKENS}; quick: {QUICK_VARLEN_TOKENS}; 0: no "
        "varlen row)",
    )
    parser.add_argument("--S", type=int, default=128, help="query/key width s (default 128)")
    parser.add_argument("--E", type=int, help="value width e (full: 1536; quick: 256)")
    parser.add_argument("--chunk-size", type=int, default=256, help="C (default 256)")
    parser.add_argument("--rel-bias", action="store_true", help="add a (2C-1,) Toeplitz bias")
    parser.add_argument(
        "--dtype", choices=sorted(DTYPES), help="input dtype (default: bf16 on CUDA, fp32 on a CPU)"
    )
    parser.add_argument("--modes", nargs="+", choices=MODES, default=list(MODES))
    parser.add_argument(
        "--impls",
        nargs="+",
        choices=list(IMPLS),
        help="implementations to time (default: all that can run here; naming "
        "one forces it where it is skipped by default)",
    )
    parser.add_argument(
        "--compile-seq-lens",
        type=int,
        nargs="+",
        metavar="T",
        help="restrict torch.compile (a compile per shape) to these T",
    )
    parser.add_argument(
        "--repeats", type=int, help="CPU: timed runs per point, median taken (default 5)"
    )
    parser.add_argument(
        "--max-point-seconds",
        type=float,
        default=3.0,
        help="CPU: fewer repeats (at least 2) for points slower than this",
    )
    parser.add_argument("--warmup-ms", type=float, default=25.0, help="GPU: do_bench warm-up")
    parser.add_argument("--rep-ms", type=float, default=100.0, help="GPU: do_bench timed span")
    parser.add_argument(
        "--max-dense-gb",
        type=float,
        help="skip the dense reference above this estimate (default: 40%% of "
        "GPU memory; on a CPU 4 GB, 0.5 GB in quick mode to stay quick)",
    )
    parser.add_argument("--no-memory", action="store_true", help="do not measure peak memory")
    parser.add_argument(
        "--time-budget",
        type=float,
        help="seconds: points not started by then are recorded as skipped",
    )
    parser.add_argument(
        "--output-dir",
        default=DEFAULT_DIR,
        help=f"where {RESULTS_NAME} is appended (default: {DEFAULT_DIR}/ in the "
        "current directory, git-ignored; the committed bench/results/ "
        "is updated by `python -m bench.publish`)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument(
        "--allow-tf32",
        action="store_true",
        help="CUDA: let fp32 matmuls use TF32 (the torch and reference paths "
        "compute in fp32; default: torch's default, off)",
    )
    parser.add_argument(
        "--threads",
        type=int,
        help="CPU: torch threads (default: torch's); 1 is steadier on a busy machine",
    )
    parser.add_argument("--device", choices=["cuda", "cpu"], help="default: cuda when available")
    args = parser.parse_args(argv)

    args.device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if args.device.type == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: CUDA is not available")
    args.quick = args.quick or (not args.full and args.device.type != "cuda")
    q = args.quick
    args.seq_lens = args.seq_lens or (QUICK_SEQ_LENS if q else FULL_SEQ_LENS)
    if args.noncausal_seq_lens is None:
        args.noncausal_seq_lens = [2048] if q else [4096]
    args.tokens = args.tokens if args.tokens is not None else (0 if q else 65536)
    if args.varlen_tokens is None:
        args.varlen_tokens = QUICK_VARLEN_TOKENS if q else FULL_VARLEN_TOKENS
    if args.varlen_tokens < 0:
        parser.error("--varlen-tokens: must be positive, or 0 for no varlen row")
    try:
        args.doc_lens = (
            document_lengths(args.varlen_tokens, args.chunk_size) if args.varlen_tokens else None
        )
    except ValueError as exc:
        parser.error(str(exc))
    args.E = args.E or (256 if q else 1536)
    args.dtype = (
        DTYPES[args.dtype]
        if args.dtype
        else (torch.bfloat16 if args.device.type == "cuda" else torch.float32)
    )
    args.repeats = args.repeats or 5
    if args.max_dense_gb is None:
        if args.device.type == "cuda":
            args.max_dense_gb = (
                0.4 * torch.cuda.get_device_properties(args.device).total_memory / 2**30
            )
        else:
            args.max_dense_gb = 0.5 if q else 4.0
    for name, values in (
        ("--seq-lens", args.seq_lens),
        ("--noncausal-seq-lens", args.noncausal_seq_lens),
    ):
        if any(T <= 0 for T in values):
            parser.error(f"{name}: lengths must be positive")
    return args


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------
def time_ms(call, args):
    """{"ms": median, "ms_min", "ms_max", "ms_p10", "ms_p90", "reps"}: milliseconds of
    `call`'s timed runs after warm-up (do_bench's runs on CUDA, perf_counter on a CPU); the
    10th and 90th percentiles only with at least PERCENTILE_MIN_REPS runs, else None."""
    if args.device.type == "cuda":
        import triton.testing

        times = [
            float(t)
            for t in triton.testing.do_bench(
                call, warmup=args.warmup_ms, rep=args.rep_ms, return_mode="all"
            )
        ]
    else:
        start = time.perf_counter()
        call()  # warm-up
        first = time.perf_counter() - start
        repeats = max(2, min(args.repeats, int(args.max_point_seconds / max(first, 1e-9))))
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            call()
            times.append(1e3 * (time.perf_counter() - start))
    timing = {
        "ms": statistics.median(times),
        "ms_min": min(times),
        "ms_max": max(times),
        "ms_p10": None,
        "ms_p90": None,
        "reps": len(times),
    }
    if len(times) >= PERCENTILE_MIN_REPS:  # enough runs that one outlier is not the range
        deciles = statistics.quantiles(times, n=10, method="inclusive")
        timing.update(ms_p10=deciles[0], ms_p90=deciles[-1])
    return timing


def measure_peak(args):
    """(TFLOP/s, what): a large square matmul in the run's dtype (bf16 on a GPU by default).

    GPU: do_bench's median, like the points. CPU: the best of several runs (a peak is an upper
    bound, and a busy machine only ever slows a run down). The runner measures it before and
    after the points and keeps the higher."""
    n = 8192 if args.device.type == "cuda" else 1024
    gen = torch.Generator(device=args.device).manual_seed(1)
    a = torch.randn(n, n, device=args.device, dtype=args.dtype, generator=gen)
    b = torch.randn(n, n, device=args.device, dtype=args.dtype, generator=gen)
    if args.device.type == "cuda":
        ms = time_ms(lambda: torch.matmul(a, b), args)["ms"]
    else:
        torch.matmul(a, b)
        times = []
        for _ in range(5):
            start = time.perf_counter()
            torch.matmul(a, b)
            times.append(time.perf_counter() - start)
        ms = 1e3 * min(times)
    what = f"torch.matmul {n}x{n}x{n} {str(args.dtype).replace('torch.', '')}"
    return matmul_flops(n, n, n) / (ms * 1e-3) / 1e12, what


# ---------------------------------------------------------------------------------------------
# the plan
# ---------------------------------------------------------------------------------------------
def build_plan(args):
    """[(impl, problem, mode)] in priority order (when a time budget runs out, the tail goes):
    by implementation, its T series, then its varlen row (packed, padded) if it has one."""
    names = args.impls or list(IMPLS)
    problems = []
    for causal, lengths in ((True, args.seq_lens), (False, args.noncausal_seq_lens)):
        for T in lengths:
            batch = max(1, args.tokens // T) if args.tokens else 1
            problems.append(
                Problem(
                    T=T,
                    batch=batch,
                    S=args.S,
                    E=args.E,
                    C=args.chunk_size,
                    causal=causal,
                    rel_bias=args.rel_bias,
                )
            )
    varlen = (
        list(
            varlen_problems(args.doc_lens, args.S, args.E, args.chunk_size, rel_bias=args.rel_bias)
        )
        if args.doc_lens
        else []
    )
    plan = []
    for name in names:
        for p in problems + (varlen if IMPLS[name].varlen else []):
            if (
                name == "torch.compile"
                and args.compile_seq_lens
                and p.T not in args.compile_seq_lens
            ):
                continue
            plan.extend((name, p, mode) for mode in args.modes)
    return plan


def _error_note(exc):
    text = f"{type(exc).__name__}: {exc}".replace("\n", " ")
    if isinstance(exc, torch.cuda.OutOfMemoryError) or "out of memory" in text.lower():
        return "out of memory"
    return text[:300]


def _stop_on_interrupt(write):
    """After a first SIGINT (the runbook's timeout), ignore further ones so that the results
    are still written and reported."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    write("interrupted: the remaining points are recorded as skipped")


def _skip_reason(name, p, mode, args, skipped_impls, errors, started):
    if name in skipped_impls:
        return skipped_impls[name]
    if args.time_budget is not None and time.perf_counter() - started > args.time_budget:
        return f"skipped: time budget of {args.time_budget:.0f} s spent"
    if len(errors.get(name, ())) >= 2:
        return f"skipped after 2 errors (first: {errors[name][0]})"
    if name == "reference":
        need = dense_bytes_estimate(p, mode) / 2**30
        if need > args.max_dense_gb:
            return (
                f"skipped: dense reference needs ~{need:.1f} GB of memory "
                f"(> --max-dense-gb {args.max_dense_gb:.1f})"
            )
    return None


def _measure_point(record, impl, p, mode, args, errors, write, dtype_str):
    call = None
    point_start = time.perf_counter()
    try:
        call = make_call(impl, p, mode, args.device, args.dtype, seed=p.seed)
        timing = time_ms(call, args)
        record.update(timing, tflops=record["flops"] / (timing["ms"] * 1e-3) / 1e12)
    except Exception as exc:  # a failing baseline must not stop the benchmark
        note = _error_note(exc)
        record.update(status="error", note=note)
        if note != "out of memory":
            errors.setdefault(impl.name, []).append(note)
        write(
            f"{impl.name} {MODE_NAMES[mode]} T={p.T} batch={p.batch}"
            f"{f' varlen {p.varlen}' if p.varlen else ''}: {note}"
        )
    del call
    record["wall_s"] = round(time.perf_counter() - point_start, 3)
    gc.collect()
    if args.device.type == "cuda":
        torch.cuda.empty_cache()
        if record["status"] == "ok" and not args.no_memory and mode != "bwd":
            record["mem_mb"] = _gpu_memory_mb(impl.name, p, mode, args.device, dtype_str)


def run_plan(args, meta):
    plan = build_plan(args)
    explicit = set(args.impls or ())
    skipped_impls = {}
    for name in dict.fromkeys(name for name, _, _ in plan):
        reason = IMPLS[name].availability(args.device, args.dtype, name in explicit)
        if reason:
            skipped_impls[name] = reason
    records, errors = [], {}
    started = time.perf_counter()
    dtype_str = str(args.dtype).replace("torch.", "")
    bar, write = _progress(plan, len(plan), not args.no_progress)
    for reason_name, reason in skipped_impls.items():
        write(f"{reason_name}: {reason}")
    interrupted = False
    for name, p, mode in bar:
        impl = IMPLS[name]
        record = dict(
            meta,
            impl=name,
            mode=mode,
            **p.as_dict(),
            status="ok",
            note="",
            ms=None,
            ms_min=None,
            ms_max=None,
            ms_p10=None,
            ms_p90=None,
            reps=0,
            flops=impl.flops(p, mode),
            tflops=None,
            frac_peak=None,
            mem_mb=None,
        )
        records.append(record)
        reason = (
            "skipped: interrupted"
            if interrupted
            else _skip_reason(name, p, mode, args, skipped_impls, errors, started)
        )
        if reason:
            record.update(status="skipped", note=reason)
            continue
        if hasattr(bar, "set_description"):
            bar.set_description(
                f"{name} {MODE_NAMES[mode]} T={p.T}{f' {p.varlen}' if p.varlen else ''}"
            )
        try:
            _measure_point(record, impl, p, mode, args, errors, write, dtype_str)
        except KeyboardInterrupt:
            interrupted = True
            _stop_on_interrupt(write)
            if record["ms"] is None:
                record.update(status="skipped", note="skipped: interrupted")
    if hasattr(bar, "close"):
        bar.close()
    timed = time.perf_counter() - started
    if args.device.type == "cpu" and not args.no_memory and not interrupted:
        try:
            _cpu_memory(records, args, dtype_str, write)
        except KeyboardInterrupt:
            interrupted = True
            _stop_on_interrupt(write)
    write(
        f"timed the points in {timed:.1f} s; "
        f"memory in {time.perf_counter() - started - timed:.1f} s"
    )
    return records, skipped_impls, interrupted


def _gpu_memory_mb(name, p, mode, device, dtype_str):
    try:
        (peak,) = peak_memory_bytes(
            [(run_once, (name, p.as_dict(), mode, str(device), dtype_str))], device
        )
        return peak / 2**20
    except Exception:
        return None
    finally:
        gc.collect()
        torch.cuda.empty_cache()


def _cpu_memory(records, args, dtype_str, write):
    """Peak RSS of each measured point, all in one child process (bench/memory.py)."""
    todo = [
        r
        for r in records
        if r["status"] == "ok" and r["impl"] != "torch.compile" and r["mode"] != "bwd"
    ]
    if not todo:
        return
    problem_fields = [field.name for field in dataclasses.fields(Problem)]
    calls = [
        (
            run_once,
            (
                r["impl"],
                {k: r[k] for k in problem_fields},
                r["mode"],
                "cpu",
                dtype_str,
                torch.get_num_threads(),
            ),
        )
        for r in todo
    ]
    # The first call of each kind in a process allocates once-only buffers (autograd engine,
    # thread pools): each (impl, mode) gets a throwaway call first, whose peak is dropped.
    ordered, seen = [], set()
    for r, call in sorted(zip(todo, calls), key=lambda rc: (rc[0]["impl"], rc[0]["mode"])):
        if (r["impl"], r["mode"]) not in seen:
            seen.add((r["impl"], r["mode"]))
            ordered.append((None, call))
        ordered.append((r, call))
    try:
        peaks = peak_memory_bytes([call for _, call in ordered], args.device)
    except Exception as exc:
        write(f"peak memory not measured: {_error_note(exc)}")
        return
    for (r, _), peak in zip(ordered, peaks):
        if r is None:
            continue
        r["mem_mb"] = peak / 2**20


# ---------------------------------------------------------------------------------------------
# report
# ---------------------------------------------------------------------------------------------
def report(records, args, meta, skipped_impls, path):
    print()
    print(
        f"device: {meta['device']}  |  dtype {meta['dtype']}  |  torch {meta['torch']}, "
        f"triton {meta['triton']}  |  commit {meta['commit']}"
    )
    shape = (
        f"S={args.S}, E={args.E}, C={args.chunk_size}"
        + (", rel_bias" if args.rel_bias else "")
        + (
            f", {args.tokens} tokens per batch (batch = {args.tokens} // T)"
            if args.tokens
            else ", batch 1"
        )
    )
    print(f"{'quick' if args.quick else 'full'} mode: {shape}; causal unless marked")
    print(f"measured peak: {meta['peak_tflops']:.3g} TFLOP/s ({meta['peak_what']})")
    primary = primary_impl(records)
    if primary == "torch":
        print("no Triton timing here: the chunked torch path is the row under test")
    for name, reason in skipped_impls.items():
        print(f"  {name}: {reason}")
    print(SPREAD_NOTE)
    for mode in args.modes:
        table = time_table(records, mode)
        if table is None:
            continue
        print(
            f"\n== {mode_title(mode)}: milliseconds (median ±half the min-max range), "
            f"'{primary}' TFLOP/s, % of peak, speedup of '{primary}' (x > 1: faster) =="
        )
        print(render_text(table))
        if not args.no_memory and mode != "bwd":
            print(f"-- {MODE_NAMES[mode]}: peak memory, MB (inputs and gradients included) --")
            print(render_text(memory_table(records, mode)))
    varlen = varlen_table(records, args.modes)
    if varlen is not None:
        print(
            "\n== packed documents (varlen): ms (median ±half the min-max range), useful "
            "TFLOP/s, peak MB; packed speedup = padded ms / packed ms =="
        )
        print(describe_varlen(records))
        print(render_text(varlen))
    notes = sorted({(r["impl"], r["note"]) for r in records if r["status"] == "error"})
    if notes:
        print("\nerrors:")
        for name, note in notes:
            print(f"  {name}: {note}")
    unstable = unstable_summary(records)
    print(
        "\nunstable points (not used for conclusions):"
        if unstable
        else "\nevery timed point is stable (spread <= 20%, more work never measured faster)"
    )
    for line in unstable:
        print(f"  {line}")
    if args.quick:
        print(
            "growth of the forward time, from stable points only"
            + (
                " (the machine was loaded: indicative at best):"
                if meta["machine_warnings"]
                else ":"
            )
        )
        for line in growth_conclusions(records):
            print(f"  {line}")
    if args.device.type == "cuda":
        print()
        for ours in OURS:
            if any(r["impl"] == ours and r["status"] == "ok" for r in records):
                print(render_targets(evaluate_targets(records, ours), ours))
    else:
        print("\nPerformance targets are evaluated on CUDA runs only (bench/gpu_runbook.sh).")
    _print_warnings(meta["machine_warnings"], args)
    print(f"\n{len(records)} results appended to {path}")
    print(
        f"next: python -m bench.plots; python -m bench.readme (both read and write "
        f"{os.path.dirname(path) or '.'}); python -m bench.publish copies the run into the "
        f"committed bench/results/ and the README"
    )


def _print_warnings(warnings, args):
    if not warnings:
        return
    print("\n" + "!" * 80)
    print("WARNING: these timings are unreliable:")
    for line in warnings:
        print(f"  - {line}")
    advice = "rerun on a quiet machine"
    if args.device.type == "cpu" and torch.get_num_threads() > 1:
        advice += " or with --threads 1"
    print(f"  Noise is not a result: {advice} before drawing conclusions.")
    print("!" * 80)


def main(argv=None):
    args = parse_args(argv)
    t0 = time.perf_counter()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.allow_tf32:
        torch.backends.cuda.matmul.allow_tf32 = True
    load_start = load_average()
    meta = dict(
        run_metadata(args.device, args.dtype, args.quick),
        tf32=bool(torch.backends.cuda.matmul.allow_tf32),
        threads=torch.get_num_threads(),
        cpu_count=os.cpu_count(),
        load_start=load_start,
    )
    print(
        f"{'quick' if args.quick else 'full'} benchmark on {meta['device']}, {meta['dtype']}; "
        f"measuring the matmul peak...",
        flush=True,
    )
    peak_tflops, peak_what = measure_peak(args)
    reference, reference_what = peak_reference(
        meta["device"], meta["dtype"], meta["tf32"], load_committed_results()
    )
    early = machine_warnings(
        load_start, None, 0, os.cpu_count(), peak_tflops, reference, reference_what
    )
    if early:
        print("note: " + "; ".join(early) + ": expect noisy timings", flush=True)
    records, skipped_impls, interrupted = run_plan(args, meta)
    if not interrupted:
        try:
            peak_tflops = max(peak_tflops, measure_peak(args)[0])
        except KeyboardInterrupt:
            _stop_on_interrupt(print)
    load_end = load_average()
    own_threads = torch.get_num_threads() if args.device.type == "cpu" else 1
    meta.update(
        load_end=load_end,
        peak_tflops=peak_tflops,
        peak_what=peak_what,
        peak_reference_tflops=reference,
        peak_reference_what=reference_what or None,
        machine_warnings=machine_warnings(
            load_start,
            load_end,
            own_threads,
            os.cpu_count(),
            peak_tflops,
            reference,
            reference_what,
        ),
    )
    for r in records:
        r.update(
            (key, meta[key])
            for key in (
                "load_end",
                "peak_tflops",
                "peak_what",
                "peak_reference_tflops",
                "peak_reference_what",
                "machine_warnings",
            )
        )
        if r["tflops"] is not None:
            r["frac_peak"] = r["tflops"] / peak_tflops
    annotate(records)
    path = os.path.join(args.output_dir, RESULTS_NAME)
    append_results(path, records)
    report(records, args, meta, skipped_impls, path)
    print(f"elapsed: {time.perf_counter() - t0:.1f} s")
    return 0 if any(r["status"] == "ok" for r in records) else 1


if __name__ == "__main__":
    sys.exit(main())
