"""Estimate the compile work of the GPU test selection (`pytest -m gpu`) without a GPU.

1. Record which kernel launches every test makes, under the interpreter, with the GPU's software
   (tests/conftest.py writes them when FLASH_KERNELS_RECORD_LAUNCHES is set):

       FLASH_KERNELS_RECORD_LAUNCHES=launches.json python -m pytest -m gpu tests

2. Count the distinct specializations the GPU tests launch (each one a JIT compile on the GPU)
   and the distinct launcher signatures (Triton < 3.7 builds a C launcher per signature with
   the C compiler), time `triton.compile` for sm_90 on a sample of them and one launcher build,
   and spread the tests over WORKERS pytest-xdist workers (each test to the least busy worker,
   in the run's order; a worker compiles every specialization it has not compiled itself):

       env -u TRITON_INTERPRET python -m bench.gpu_selection launches.json [--workers 8]

The estimate is the busiest worker's compile time (an upper bound: workers that find a kernel
another one already wrote to the shared cache do not compile it), next to the ideal total /
WORKERS. Times are CPU seconds (this process and its ptxas / gcc children), i.e. the wall time
on an idle core: a compile uses one core, and 8 workers on 16 cores do not share one. It
assumes a GPU host core as fast as a core here.
"""

import argparse
import glob
import json
import os
import random
import statistics
import sys
import sysconfig
import tempfile
from collections import defaultdict

from tools.aot_compile import compile_record, jit_compile_inputs, record_from_dict, record_key


def load_recorded(paths) -> dict:
    """{test node id: {"gpu": bool, "slow": bool, "launches": [record dicts]}} from the files
    conftest wrote (PATH, or PATH.gwN per xdist worker)."""
    tests = {}
    for pattern in paths:
        for path in sorted(glob.glob(pattern) + glob.glob(pattern + ".gw*")):
            with open(path) as f:
                tests.update(json.load(f))
    if not tests:
        raise SystemExit(f"no recorded launches in {paths}")
    return tests


def launcher_signature(record) -> tuple:
    """What Triton < 3.7's C launcher depends on: the JIT signature's types in order."""
    src, _ = jit_compile_inputs(record)
    return tuple(src.signature.values())


def cpu_seconds() -> float:
    """CPU time of this process and its finished children (ptxas, gcc): what a compile takes
    on an idle core, whatever else this machine runs meanwhile."""
    t = os.times()
    return t.user + t.system + t.children_user + t.children_system


def time_compile(record, capability) -> float:
    """CPU seconds of one cold `triton.compile` of `record` (a fresh cache directory)."""
    with tempfile.TemporaryDirectory() as cache:
        os.environ["TRITON_CACHE_DIR"] = cache
        start = cpu_seconds()
        compile_record(record, capability)
        return cpu_seconds() - start


def time_launcher_build(record) -> float:
    """CPU seconds of one build of the C launcher Triton 3.6 makes for `record`'s signature,
    with the same compiler command (without linking libcuda, which a CPU machine lacks)."""
    from triton.backends.nvidia import driver
    from triton.runtime.build import _build

    src, _ = jit_compile_inputs(record)
    arg_index = {name: (i,) for i, name in enumerate(src.fn.arg_names)}
    constants = {arg_index.get(k, k): v for k, v in src.constants.items()}
    code = driver.make_launcher(constants, dict(src.signature), None)
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "launcher.c")
        with open(path, "w") as f:
            f.write(code)
        start = cpu_seconds()
        _build("launcher", path, tmp, [], driver.include_dirs, [], [])
        return cpu_seconds() - start


def schedule(tests, cost_of_key, cost_of_signature, key_signature, workers) -> list:
    """Busy seconds per worker: tests in order, each to the least busy worker, which pays for
    the specializations and launchers it has not built before."""
    busy = [0.0] * workers
    seen_keys = [set() for _ in range(workers)]
    seen_signatures = [set() for _ in range(workers)]
    for keys in tests:
        w = min(range(workers), key=busy.__getitem__)
        for key in keys:
            if key in seen_keys[w]:
                continue
            seen_keys[w].add(key)
            busy[w] += cost_of_key[key]
            signature = key_signature[key]
            if signature not in seen_signatures[w]:
                seen_signatures[w].add(signature)
                busy[w] += cost_of_signature
    return busy


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("records", nargs="+", help="files written by FLASH_KERNELS_RECORD_LAUNCHES")
    parser.add_argument("--workers", type=int, default=8)
    parser.add_argument("--sample", type=int, default=8, help="compiles timed per kernel")
    parser.add_argument("--capability", type=int, default=90)
    parser.add_argument("--selection", choices=["gpu", "all"], default="gpu")
    args = parser.parse_args(argv)
    import triton

    tests = load_recorded(args.records)
    chosen = {node: t for node, t in tests.items() if args.selection == "all" or t["gpu"]}
    records = {}
    per_test = []
    for test in chosen.values():
        keys = []
        for d in test["launches"]:
            record = record_from_dict(d)
            key = record_key(record)
            records.setdefault(key, record)
            keys.append(key)
        per_test.append(list(dict.fromkeys(keys)))
    by_kernel = defaultdict(list)
    for key, record in records.items():
        by_kernel[record.kernel_name].append(key)
    key_signature = {key: launcher_signature(r) for key, r in records.items()}
    rng = random.Random(0)
    seconds_per_kernel = {}
    for kernel, keys in sorted(by_kernel.items()):
        sample = rng.sample(keys, min(args.sample, len(keys)))
        times = [time_compile(records[k], args.capability) for k in sample]
        seconds_per_kernel[kernel] = statistics.mean(times)
        print(
            f"{kernel}: {len(keys)} specializations, cold compile {statistics.mean(times):.2f} s "
            f"mean of {len(times)} (min {min(times):.2f}, max {max(times):.2f})",
            file=sys.stderr,
        )
    launcher_s = statistics.median(time_launcher_build(records[k]) for k in list(records)[:3])
    cost_of_key = {k: seconds_per_kernel[r.kernel_name] for k, r in records.items()}
    total_compile = sum(cost_of_key.values())
    signatures = set(key_signature.values())
    total = total_compile + len(signatures) * launcher_s
    busy = schedule(per_test, cost_of_key, launcher_s, key_signature, args.workers)
    print(
        json.dumps(
            dict(
                triton=triton.__version__,
                selection=args.selection,
                tests_launching=sum(bool(k) for k in per_test),
                specializations=len(records),
                launcher_signatures=len(signatures),
                launcher_build_s=round(launcher_s, 2),
                compile_s_one_core=round(total_compile, 1),
                total_s_one_core=round(total, 1),
                workers=args.workers,
                ideal_s=round(total / args.workers, 1),
                busiest_worker_s=round(max(busy), 1),
                compile_s_per_kernel={k: round(v, 2) for k, v in seconds_per_kernel.items()},
                specializations_per_kernel={k: len(v) for k, v in sorted(by_kernel.items())},
                cc=os.environ.get("CC") or "gcc",
                python_include=sysconfig.get_paths()["include"],
            ),
            indent=1,
        )
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
