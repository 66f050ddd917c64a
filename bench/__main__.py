"""`python -m bench`: the main job. Without CUDA: the quick CPU benchmark (the chunked torch path
against the dense reference and SDPA: linear vs quadratic); with CUDA: the full suite.
Results go to bench_out/results.jsonl under the current directory (git-ignored); then
`python -m bench.plots` and `python -m bench.readme` draw figures and the README section there,
and `python -m bench.publish` is the explicit step that updates the committed bench/results/
and README.md. Arguments are those of `python -m bench.run` (see `python -m bench --help`)."""

import sys

from .run import main

if __name__ == "__main__":
    sys.exit(main())
