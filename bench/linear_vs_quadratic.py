"""Time and peak memory of the chunked "torch" path against the dense "reference" over T.

The chunked path should grow linearly in T (8x the tokens, about 8x the cost) and the dense
reference quadratically. Now a preset of the benchmark runner: forward only, batch 1, the two
backends; any `python -m bench.run` option may follow (e.g. --seq-lens 1024 2048 4096 8192).

    python -m bench.linear_vs_quadratic [options of bench.run]
"""

import sys

from .run import main as run_main

PRESET = [
    "--impls",
    "torch",
    "reference",
    "--modes",
    "fwd",
    "--tokens",
    "0",
    "--varlen-tokens",
    "0",
    "--noncausal-seq-lens",
]


def main(argv=None):
    argv = list(sys.argv[1:] if argv is None else argv)
    if "--full" not in argv:
        argv = ["--quick"] + argv
    return run_main(PRESET + argv)


if __name__ == "__main__":
    sys.exit(main())
