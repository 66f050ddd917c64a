"""Decoding benchmark: per-token latency, tokens/s and cache memory per sequence of a FLASH layer
(flash_kernels.nn.FLASH.step: the decode op on a constant-size cache) against softmax attention
with a KV cache (SDPA over the cached keys and values), at growing context lengths.

Both decode one token per sequence for a batch, at a given context length (tokens already in
the cache), with the same model width d:
- "flash": a FLASH layer (s = 128, e = 2d, chunk C = 256; 64 in the CPU run): norm, the u/v/z
  projection, the decode op (the float32 S x E state of the completed chunks plus the current
  chunk's keys and values), the gate and the output projection. Its cache does not grow with the
  context.
- "kv_cache": a pre-norm multi-head attention block with heads of 64: the qkv projection, the
  new key and value written into a preallocated (batch, heads, context + 1, 64) cache, SDPA of
  the new query over all cached keys, the output projection. Its cache grows linearly.
Neither has the rest of a transformer (a FLASH layer replaces attention + FFN; the JSON records
each layer's parameter count).

Timing. GPU: each model's step is captured once in a CUDA graph and replayed (no Python or launch
overhead in the numbers); "flash" replays C steps (a whole chunk, whatever the context), so
its mean includes one fold of the chunk into the state; "kv_cache" replays at a fixed context.
CPU (one thread by default): eager steps (the torch path of the decode op), each timed; the
median is reported (a shared CPU slows single steps at random), the mean kept beside it.
Caches hold random values (the cost does not depend on them); the context enters as the
cache's position (flash) or the number of cached keys (kv_cache). Points whose KV cache would
not fit in memory are skipped.

    python -m bench.decode                 # CPU: d = 256, batches 1, 8, 64, contexts 256 .. 16K
    python -m bench.decode --full          # GPU: batches 1, 8, 64; contexts 1K .. 64K and 256K

Results are appended to bench/results/decode.jsonl (one JSON object per point, run metadata
included) and the latest run of the device is plotted to bench/results/decode_<cpu|gpu>.png.
"""

import argparse
import gc
import os
import statistics
import sys
import time

import torch
import torch.nn.functional as F
from torch import nn

from flash_kernels.nn import FLASH

from .results_io import DEFAULT_DIR, append_results, run_metadata

RESULTS_NAME = "decode.jsonl"
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
FULL = dict(
    d=1024,
    chunk_size=256,
    batches=[1, 8, 64],
    contexts=[1024, 2048, 4096, 8192, 16384, 32768, 65536, 262144],
    dtype="bf16",
)
QUICK = dict(
    d=256, chunk_size=64, batches=[1, 8, 64], contexts=[256, 1024, 4096, 16384], dtype="fp32"
)
HEAD_DIM = 64


class KVCacheAttention(nn.Module):
    """Pre-norm multi-head softmax attention decoding against a preallocated KV cache:
    x + W_o SDPA(q, K[:, :, :ctx + 1], V[:, :, :ctx + 1]) for the new token at position ctx."""

    def __init__(self, d):
        super().__init__()
        self.heads = d // HEAD_DIM
        self.norm = nn.LayerNorm(d)
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)

    def new_cache(self, batch, context, dtype, device):
        shape = (batch, self.heads, context + 1, HEAD_DIM)
        return (
            torch.randn(shape, dtype=dtype, device=device),
            torch.randn(shape, dtype=dtype, device=device),
        )

    def step(self, x, cache, context):
        B, d = x.shape
        q, k, v = self.qkv(self.norm(x)).view(B, 3, self.heads, HEAD_DIM).unbind(1)
        keys, values = cache
        keys[:, :, context] = k
        values[:, :, context] = v
        att = F.scaled_dot_product_attention(q[:, :, None], keys, values)  # (B, H, 1, 64)
        return x + self.out(att.reshape(B, d))


def flash_layer(d, chunk_size, device, dtype, backend="auto"):
    return (
        FLASH(d, s=128, expansion=2, chunk_size=chunk_size, backend=backend)
        .to(device, dtype)
        .eval()
    )


def flash_cache(layer, batch, context, device, dtype):
    """A layer cache of `batch` sequences at position `context` holding random values."""
    cache = layer.new_cache()
    cache.allocate(
        batch,
        layer.s,
        layer.e,
        layer.chunk_size,
        chunk_size=layer.chunk_size,
        linear=True,
        dtype=dtype,
        device=device,
    )
    with torch.no_grad():
        for buffer in (cache.k_quad, cache.k_lin, cache.v):
            buffer.copy_(0.1 * torch.randn_like(buffer))
        cache.state.copy_(0.01 * torch.randn_like(cache.state))
        cache.position.fill_(context)
    return cache


def cache_bytes(tensors, batch):
    return sum(t.numel() * t.element_size() for t in tensors if t is not None) // batch


def _sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_steps(step, steps, device, graph):
    """(mean, median) seconds per call of step() over `steps` calls after a warm-up, replaying
    a CUDA graph of it when `graph`. On a GPU the calls are timed together (median = mean)."""
    if graph:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream):
            step()  # compiles the kernels outside the capture
        torch.cuda.current_stream().wait_stream(stream)
        cuda_graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(cuda_graph):
            step()
        call = cuda_graph.replay
    else:
        call = step
    for _ in range(3):
        call()
    _sync(device)
    if device.type == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(steps):
            call()
        end.record()
        torch.cuda.synchronize()
        mean = start.elapsed_time(end) / 1000 / steps
        return mean, mean
    times = []
    for _ in range(steps):
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
    return statistics.fmean(times), statistics.median(times)


def measure(impl, batch, context, args, device, dtype):
    """One point: a dict of the measurement (or a skip with the reason)."""
    d = args.d
    point = dict(
        impl=impl,
        batch=batch,
        context=context,
        d=d,
        layers=args.layers,
        heads=d // HEAD_DIM,
        S=128,
        E=2 * d,
        C=args.chunk_size,
    )
    torch.manual_seed(0)
    graph = device.type == "cuda" and not args.no_graph
    if impl == "flash":
        layers = [
            flash_layer(d, args.chunk_size, device, dtype, args.backend) for _ in range(args.layers)
        ]
        caches = [flash_cache(layer, batch, context, device, dtype) for layer in layers]
        per_seq = sum(cache_bytes((c.k_quad, c.k_lin, c.v, c.state), batch) for c in caches)
        steps = args.chunk_size  # one chunk cycle: includes one fold
    else:
        per_seq = args.layers * 2 * (context + 1) * d * dtype.itemsize
        if device.type == "cuda":
            free = torch.cuda.mem_get_info(device)[0]
            if per_seq * batch > 0.85 * free:
                return dict(
                    point,
                    status="skipped",
                    cache_bytes_per_seq=per_seq,
                    note=f"KV cache {per_seq * batch / 2**30:.1f} GiB > 85% of free memory",
                )
        elif per_seq * batch > args.cpu_memory_gib * 2**30:
            return dict(
                point,
                status="skipped",
                cache_bytes_per_seq=per_seq,
                note=f"KV cache {per_seq * batch / 2**30:.1f} GiB > --cpu-memory-gib",
            )
        layers = [KVCacheAttention(d).to(device, dtype).eval() for _ in range(args.layers)]
        caches = [layer.new_cache(batch, context, dtype, device) for layer in layers]
        steps = 32 if device.type == "cpu" else 100
    x = torch.randn(batch, d, device=device, dtype=dtype)

    def step():
        h = x
        for layer, cache in zip(layers, caches):
            h = layer.step(h, cache) if impl == "flash" else layer.step(h, cache, context)
        return h

    params = sum(p.numel() for p in layers[0].parameters())
    try:
        with torch.no_grad():
            mean, median = time_steps(step, steps, device, graph)
    except torch.cuda.OutOfMemoryError:
        return dict(point, status="skipped", note="out of memory", cache_bytes_per_seq=per_seq)
    # A CPU shared with other work makes single steps slow at random: there the median step
    # is the figure (the mean, which weighs flash's fold in properly, is kept as ms_mean).
    seconds = mean if device.type == "cuda" else median
    return dict(
        point,
        status="ok",
        ms_per_token=1000 * seconds,
        tokens_per_s=batch / seconds,
        ms_mean=1000 * mean,
        ms_median=1000 * median,
        cache_bytes_per_seq=per_seq,
        params_per_layer=params,
        cuda_graph=graph,
        steps=steps,
    )


def plot(records, path):
    """Per-token latency and cache memory per sequence against the context length."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed (pip install matplotlib): no plot", file=sys.stderr)
        return
    ok = [r for r in records if r["status"] == "ok"]
    batches = sorted({r["batch"] for r in ok})
    fig, (ax_time, ax_mem) = plt.subplots(1, 2, figsize=(12, 4.6))
    style = {"flash": dict(ls="-", marker="o"), "kv_cache": dict(ls="--", marker="^")}
    label = {"flash": "FLASH (decode op)", "kv_cache": "softmax + KV cache (SDPA)"}
    for i, batch in enumerate(batches):
        for impl in ("flash", "kv_cache"):
            pts = sorted(
                (r["context"], r["ms_per_token"])
                for r in ok
                if r["impl"] == impl and r["batch"] == batch
            )
            if pts:
                ax_time.plot(
                    *zip(*pts), color=f"C{i}", label=f"{label[impl]}, batch {batch}", **style[impl]
                )
    for impl in ("flash", "kv_cache"):
        pts = sorted(
            {
                (r["context"], r["cache_bytes_per_seq"] / 2**20)
                for r in records
                if r["impl"] == impl and r.get("cache_bytes_per_seq")
            }
        )
        if pts:
            ax_mem.plot(
                *zip(*pts),
                color="C3" if impl == "flash" else "C7",
                label=label[impl],
                **style[impl],
            )
    r = records[0]
    for ax in (ax_time, ax_mem):
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context length (tokens in the cache)")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    ax_time.set_ylabel("ms per decoding step (one token per sequence)")
    ax_mem.set_ylabel("cache per sequence (MiB)")
    graph = " (CUDA graphs)" if r.get("cuda_graph") else ""
    ax_time.set_title(
        f"{r['layers']} layer(s), d={r['d']}, C={r['C']}, {r['dtype']}{graph}", fontsize=9
    )
    ax_mem.set_title(
        f"cache per sequence, {r['layers']} layer(s) (FLASH: state + one chunk)", fontsize=9
    )
    fig.suptitle(f"Decoding: FLASH against a KV cache, {r['device']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    print(f"wrote {path}", file=sys.stderr)


def table(records):
    """Markdown table: per batch and context, ms/token and tokens/s of both, and the caches."""
    ok = {(r["impl"], r["batch"], r["context"]): r for r in records}
    lines = [
        "| batch | context | FLASH ms/token | KV cache ms/token | FLASH tokens/s | "
        "KV cache tokens/s | FLASH cache/seq | KV cache/seq |",
        "|---|---|---|---|---|---|---|---|",
    ]

    def cell(r, field, fmt):
        return fmt.format(r[field]) if r and r["status"] == "ok" else (r or {}).get("status", "-")

    def mib(r):
        return (
            f"{r['cache_bytes_per_seq'] / 2**20:.2f} MiB"
            if r and r.get("cache_bytes_per_seq")
            else "-"
        )

    for batch in sorted({k[1] for k in ok}):
        for context in sorted({k[2] for k in ok if k[1] == batch}):
            f, kv = ok.get(("flash", batch, context)), ok.get(("kv_cache", batch, context))
            lines.append(
                f"| {batch} | {context} | {cell(f, 'ms_per_token', '{:.3f}')} | "
                f"{cell(kv, 'ms_per_token', '{:.3f}')} | "
                f"{cell(f, 'tokens_per_s', '{:.0f}')} | "
                f"{cell(kv, 'tokens_per_s', '{:.0f}')} | {mib(f)} | {mib(kv)} |"
            )
    return "\n".join(lines)


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m bench.decode", description=__doc__.split("\n\n")[0]
    )
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="the small grid (default on a CPU)")
    mode.add_argument("--full", action="store_true", help="the full grid (default on a GPU)")
    parser.add_argument("--batches", type=int, nargs="+")
    parser.add_argument("--contexts", type=int, nargs="+")
    parser.add_argument("--d", type=int, help="model width (heads of 64)")
    parser.add_argument("--chunk-size", type=int, help="FLASH's chunk size C")
    parser.add_argument("--layers", type=int, default=1)
    parser.add_argument("--dtype", choices=sorted(DTYPES))
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-graph", action="store_true", help="GPU: time eager steps")
    parser.add_argument(
        "--backend",
        default="auto",
        choices=["auto", "triton", "torch"],
        help="the FLASH layer's attention backend",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU: torch threads (1: the least noise on a shared machine)",
    )
    parser.add_argument(
        "--cpu-memory-gib", type=float, default=2.0, help="CPU: skip KV caches larger than this"
    )
    parser.add_argument("--output-dir", default=DEFAULT_DIR)
    args = parser.parse_args(argv)
    device = torch.device(args.device)
    defaults = FULL if args.full or (device.type == "cuda" and not args.quick) else QUICK
    args.quick = defaults is QUICK
    for name in ("d", "chunk_size", "batches", "contexts", "dtype"):
        if getattr(args, name) is None:
            setattr(args, name, defaults[name])
    if args.d % HEAD_DIM:
        parser.error(f"--d must be a multiple of the head size {HEAD_DIM}")
    return args, device


def main(argv=None):
    args, device = parse_args(argv)
    dtype = DTYPES[args.dtype]
    if device.type == "cpu":
        torch.set_num_threads(args.threads)
    meta = run_metadata(device, dtype, args.quick)
    records, start = [], time.perf_counter()
    for batch in args.batches:
        for context in args.contexts:
            for impl in ("flash", "kv_cache"):
                point = measure(impl, batch, context, args, device, dtype)
                records.append(dict(meta, **point))
                gc.collect()  # the point's caches and graph, before the next
                if device.type == "cuda":
                    torch.cuda.empty_cache()
                shown = (
                    f"{point['ms_per_token']:.3f} ms/token"
                    if point["status"] == "ok"
                    else f"{point['status']} ({point.get('note')})"
                )
                print(
                    f"[{time.perf_counter() - start:6.1f} s] {impl:8s} batch {batch:3d} "
                    f"context {context:7d}: {shown}",
                    file=sys.stderr,
                )
    path = os.path.join(args.output_dir, RESULTS_NAME)
    append_results(path, records)
    print(f"appended {len(records)} points to {path}", file=sys.stderr)
    print(table(records))
    plot(
        records,
        os.path.join(args.output_dir, f"decode_{'gpu' if device.type == 'cuda' else 'cpu'}.png"),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
