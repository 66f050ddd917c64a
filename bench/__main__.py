"""`python -m bench`: the main job. Without CUDA: the quick CPU benchmark (the chunked torch path
against the dense reference and SDPA: linear vs quadratic); with CUDA: the full suite.
Arguments are those of `python -m bench.run` (see `python -m bench --help`)."""
import sys

from .run import main

if __name__ == "__main__":
    sys.exit(main())
