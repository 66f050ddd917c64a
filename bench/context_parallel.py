"""Context-parallel benchmark: per-rank time and bytes sent vs world size.

    python -m bench.context_parallel [--world-sizes 1 2 4] [--tokens-per-rank N | --seq-len T]
                                     [--S 128] [--E 1536] [--C 256] [--non-causal] [--repeats 5]
                                     [--json PATH]

One command for both machines: without CUDA it spawns W CPU processes over gloo (the chunked
PyTorch path, fp32: the Triton kernels run on a CPU only under the interpreter, far too slow to
time); with CUDA, W processes over NCCL, one GPU each (W up to the GPU count; the Triton kernels,
bf16). For each world size W every rank runs forward+backward of mixed_chunk_attention on its
slice with cp_group (weak scaling: --tokens-per-rank tokens each, the default; or strong scaling:
--seq-len T split over the ranks), and also:
- the same slice without cp_group (no communication): the compute the collectives add to;
- the all-gather of one (S, E) float32 state alone: the collective's cost per call.
Bytes are counted where the op hands them to torch.distributed (every all-gather's input: the
per-call descriptor and the S x E totals of the forward and of the backward); with an all-gather
each rank receives (W - 1) x what it sends, and a ring algorithm also forwards that much.
Timing: per step, a barrier, then wall time to the end of the backward (CUDA synchronised);
median over --repeats steps after one warm-up; the table shows the slowest rank (a step ends
when every rank is done). Ranks beyond the CPU core count share cores: on a CPU the time per
rank then grows for that reason alone (the table says how many cores there were).
"""

import argparse
import json
import os
import statistics
import sys
import tempfile
import time

import torch
import torch.distributed as dist
import torch.multiprocessing as mp


def parse_args(argv):
    parser = argparse.ArgumentParser(
        prog="python -m bench.context_parallel", description=__doc__.split("\n\n")[0]
    )
    cuda = torch.cuda.is_available()
    parser.add_argument(
        "--world-sizes",
        type=int,
        nargs="+",
        default=[w for w in (1, 2, 4, 8) if w <= torch.cuda.device_count()] if cuda else [1, 2, 4],
    )
    scaling = parser.add_mutually_exclusive_group()
    scaling.add_argument(
        "--tokens-per-rank",
        type=int,
        default=None,
        help="weak scaling (default: 16384 on GPUs, 2048 on a CPU)",
    )
    scaling.add_argument(
        "--seq-len",
        type=int,
        default=None,
        help="strong scaling: one sequence of this many tokens split over the "
        "ranks (a multiple of C times each world size)",
    )
    parser.add_argument("--S", type=int, default=128)
    parser.add_argument("--E", type=int, default=1536)
    parser.add_argument("--C", type=int, default=256)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--non-causal", action="store_true")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument(
        "--threads-per-rank", type=int, default=1, help="CPU threads of each rank (CPU runs)"
    )
    parser.add_argument("--json", default=None, help="also write the results to this file")
    args = parser.parse_args(argv)
    if args.tokens_per_rank is None and args.seq_len is None:
        args.tokens_per_rank = 16384 if cuda else 2048
    return args


def _slice_length(args, rank, world_size):
    if args.seq_len is None:
        return args.tokens_per_rank
    per_rank = -(-args.seq_len // world_size)
    per_rank = -(-per_rank // args.C) * args.C  # every slice but the last: whole chunks
    start = min(rank * per_rank, args.seq_len)
    return min(per_rank, args.seq_len - start)


def _synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(step, group, device, repeats):
    """Median wall time (s) of step() over `repeats` runs after one warm-up, each started
    together on every rank (a barrier) and ended on this rank's device."""
    step()
    times = []
    for _ in range(repeats):
        _synchronize(device)
        dist.barrier(group)
        start = time.perf_counter()
        step()
        _synchronize(device)
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _rank_main(rank, world_size, init_file, args, out_dir):
    from flash_kernels import mixed_chunk_attention
    from flash_kernels.distributed import collectives

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(rank)
    else:
        torch.set_num_threads(args.threads_per_rank)
    dist.init_process_group(
        "nccl" if cuda else "gloo",
        init_method=f"file://{init_file}",
        rank=rank,
        world_size=world_size,
    )
    group = dist.group.WORLD
    device = torch.device("cuda", rank) if cuda else torch.device("cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    backend = "triton" if cuda else "torch"
    T = _slice_length(args, rank, world_size)
    gen = torch.Generator().manual_seed(rank)

    def rand(width, scale):
        x = scale * torch.randn(args.batch, T, width, generator=gen)
        return x.to(device, dtype).requires_grad_()

    q_quad, k_quad, q_lin, k_lin = (rand(args.S, args.S**-0.25) for _ in range(4))
    v = rand(args.E, 1.0)
    grad_out = torch.randn(args.batch, T, args.E, generator=gen).to(device, dtype)
    options = dict(chunk_size=args.C, causal=not args.non_causal, backend=backend)

    def step(cp_group):
        out = mixed_chunk_attention(q_quad, k_quad, q_lin, k_lin, v, cp_group=cp_group, **options)
        out.backward(grad_out)

    sent = []
    gather = collectives._all_gather_flat_op

    def counting(output, tensor, group=None, async_op=False):
        sent.append(tensor.numel() * tensor.element_size())
        return gather(output, tensor, group=group, async_op=async_op)

    collectives._all_gather_flat_op = counting
    step(group)
    bytes_per_step = sum(sent)
    collectives._all_gather_flat_op = gather
    with_cp = _timed(lambda: step(group), group, device, args.repeats)
    without_cp = _timed(lambda: step(None), group, device, args.repeats)
    state = torch.randn(args.batch * args.S * args.E, device=device)
    gathered = state.new_empty(world_size * state.numel())
    collective = _timed(lambda: gather(gathered, state, group=group), group, device, args.repeats)
    result = dict(
        rank=rank,
        T=T,
        with_cp_s=with_cp,
        without_cp_s=without_cp,
        all_gather_s=collective,
        sent_bytes_per_step=bytes_per_step,
        received_bytes_per_step=(world_size - 1) * bytes_per_step,
    )
    with open(os.path.join(out_dir, f"rank{rank}.json"), "w") as f:
        json.dump(result, f)
    dist.barrier(group)
    dist.destroy_process_group()


def run_world_size(world_size, args):
    with tempfile.TemporaryDirectory() as out_dir:
        init_file = os.path.join(out_dir, "rendezvous")
        mp.start_processes(
            _rank_main,
            args=(world_size, init_file, args, out_dir),
            nprocs=world_size,
            join=True,
            start_method="spawn",
        )
        ranks = []
        for r in range(world_size):
            with open(os.path.join(out_dir, f"rank{r}.json")) as f:
                ranks.append(json.load(f))
    return ranks


def summarize(world_size, ranks):
    slowest = max(ranks, key=lambda r: r["with_cp_s"])
    return dict(
        world_size=world_size,
        tokens=sum(r["T"] for r in ranks),
        tokens_per_rank=max(r["T"] for r in ranks),
        step_ms=1e3 * slowest["with_cp_s"],
        no_cp_ms=1e3 * max(r["without_cp_s"] for r in ranks),
        all_gather_ms=1e3 * max(r["all_gather_s"] for r in ranks),
        sent_kib=max(r["sent_bytes_per_step"] for r in ranks) / 1024,
        received_kib=max(r["received_bytes_per_step"] for r in ranks) / 1024,
    )


def render(rows, args):
    cuda = torch.cuda.is_available()
    where = (
        f"{torch.cuda.get_device_name(0)}, NCCL, triton, bf16"
        if cuda
        else f"CPU ({os.cpu_count()} cores, {args.threads_per_rank} thread(s) per rank), gloo, "
        f"torch path, fp32"
    )
    lines = [
        f"Context parallel, {where}; S={args.S}, E={args.E}, C={args.C}, batch "
        f"{args.batch}, {'non-causal' if args.non_causal else 'causal'}, forward+backward "
        f"per step, slowest rank, median of {args.repeats}.",
        "",
        "| ranks | tokens | tokens/rank | step (ms) | same slice, no CP (ms) | "
        "all-gather of one S x E state (ms) | sent per rank per step (KiB) | "
        "received per rank per step (KiB) |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['world_size']} | {row['tokens']} | {row['tokens_per_rank']} | "
            f"{row['step_ms']:.1f} | {row['no_cp_ms']:.1f} | {row['all_gather_ms']:.2f} "
            f"| {row['sent_kib']:.1f} | {row['received_kib']:.1f} |"
        )
    return "\n".join(lines)


def main(argv=None):
    args = parse_args(sys.argv[1:] if argv is None else argv)
    rows = []
    for world_size in args.world_sizes:
        rows.append(summarize(world_size, run_world_size(world_size, args)))
        print(f"world size {world_size}: {rows[-1]}", file=sys.stderr)
    print(render(rows, args))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(dict(args=vars(args), rows=rows), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
