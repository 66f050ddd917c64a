"""Time and peak memory of the chunked "torch" path against the dense "reference" over T.

The chunked path should grow linearly in T (8x the tokens, about 8x the cost) and the dense
reference quadratically. Runs on whatever device is present (CPU: float32, CUDA: bfloat16).
"""
import argparse
import time

import torch

from flash_kernels import mixed_chunk_attention

from .memory import peak_memory_bytes


def make_inputs(T, S, E, dtype, device, seed=0):
    gen = torch.Generator(device="cpu").manual_seed(seed)
    def rand(*shape):
        return torch.randn(*shape, generator=gen).to(device=device, dtype=dtype)
    return [rand(1, T, S) for _ in range(4)] + [rand(1, T, E)]


def run_forward(T, S, E, chunk_size, backend, dtype, device):
    inputs = make_inputs(T, S, E, dtype, device)
    with torch.no_grad():
        return mixed_chunk_attention(*inputs, chunk_size=chunk_size, backend=backend)


def time_call(fn, device, repeats):
    times = []
    for _ in range(repeats):
        if device.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return sorted(times)[len(times) // 2]


def dense_bytes_estimate(T, elem_bytes):
    """The dense reference holds about six T x T matrices (offsets in int64, scores, masks)."""
    return T * T * (8 + 5 * elem_bytes)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seq-lens", type=int, nargs="+", default=[1024, 2048, 4096, 8192, 16384])
    parser.add_argument("--s", type=int, default=128, help="query/key width S")
    parser.add_argument("--e", type=int, default=256, help="value width E")
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--max-dense-gb", type=float, default=10.0,
                        help="skip the dense reference when it would need more than this")
    args = parser.parse_args(argv)

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    print(f"Forward time (median of {args.repeats}) and peak memory, inputs included.")
    print(f"device={device} ({torch.cuda.get_device_name() if device.type == 'cuda' else 'cpu'}), "
          f"dtype={dtype}, S={args.s}, E={args.e}, chunk_size={args.chunk_size}, causal, forward")
    header = f"{'T':>7} | {'torch ms':>9} {'torch MB':>9} | {'reference ms':>12} {'reference MB':>12} | speedup"
    print(header)
    print("-" * len(header))
    points = [(T, backend) for T in args.seq_lens for backend in ("torch", "reference")
              if backend == "torch" or dense_bytes_estimate(T, 4) <= args.max_dense_gb * 2**30]
    # Memory first (each call's inputs are made inside it, so they are counted too).
    peaks = peak_memory_bytes([(run_forward, (T, args.s, args.e, args.chunk_size, backend, dtype,
                                              device)) for T, backend in points], device)
    peak_mb = {point: peak / 2**20 for point, peak in zip(points, peaks)}
    first = None
    for T in args.seq_lens:
        inputs = make_inputs(T, args.s, args.e, dtype, device)
        row = {}
        for backend in ("torch", "reference"):
            if (T, backend) not in peak_mb:
                row[backend] = None
                continue
            def call():
                with torch.no_grad():
                    mixed_chunk_attention(*inputs, chunk_size=args.chunk_size, backend=backend)
            call()   # warm-up
            row[backend] = (1e3 * time_call(call, device, args.repeats), peak_mb[(T, backend)])
        t_ms, t_mb = row["torch"]
        if row["reference"] is None:
            ref = f"{'skipped':>12} {'(memory)':>12} |"
            speed = ""
        else:
            r_ms, r_mb = row["reference"]
            ref = f"{r_ms:12.1f} {r_mb:12.0f} |"
            speed = f"{r_ms / t_ms:6.1f}x"
        first = first or (T, t_ms)
        print(f"{T:7d} | {t_ms:9.1f} {t_mb:9.0f} | {ref} {speed}")
    T0, ms0 = first
    print(f"torch path: {args.seq_lens[-1] // T0}x the tokens cost {t_ms / ms0:.1f}x the time "
          f"(linear would be {args.seq_lens[-1] // T0}x)")


if __name__ == "__main__":
    main()
