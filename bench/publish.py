"""Publish a benchmark run: the one explicit step that changes the committed results.

`python -m bench`, `python -m bench.plots` and `python -m bench.readme` write only to
bench_out/ (git-ignored). This command takes one run from a results file (default
bench_out/results.jsonl; the latest GPU run if there is one, else the latest run; or --run RUN
/ --latest) and
  1. puts its records into bench/results/results.jsonl, replacing the committed runs of the
     same kind (same device type, quick or full) unless --keep-old; publishing a run twice
     changes nothing;
  2. redraws bench/results/*.png (python -m bench.plots on the committed file);
  3. regenerates the benchmark section of README.md (python -m bench.readme --readme).
The figures and the README show the committed file's preferred run: its GPU run if it has one.
A run whose machine was loaded (see bench/stability.py) is refused unless --allow-loaded; the
README then says that its timings are unreliable. Review with `git diff`, then commit.

    python -m bench.publish [--results PATH] [--run RUN | --latest] [--keep-old]
                            [--allow-loaded] [--readme PATH]
"""

import argparse
import json
import os
import sys

from . import plots, readme
from .results_io import COMMITTED_DIR, DEFAULT_DIR, REPO, RESULTS_NAME, load_results, select_run


def _kind(r):
    return (r.get("device_type"), bool(r.get("quick")))


def merge(committed, run_records, keep_old):
    """The committed records with `run_records` added (and, unless keep_old, the committed runs
    of the same kind removed); unchanged when the run is already there."""
    run = run_records[0]["run"]
    if any(r.get("run") == run for r in committed):
        return committed
    kind = _kind(run_records[0])
    kept = committed if keep_old else [r for r in committed if _kind(r) != kind]
    return kept + run_records


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m bench.publish", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--results",
        default=os.path.join(DEFAULT_DIR, RESULTS_NAME),
        help="where the run is read (default: %(default)s under the current directory)",
    )
    parser.add_argument("--run", help="run id (default: latest GPU run, else latest)")
    parser.add_argument("--latest", action="store_true", help="the latest run, whatever device")
    parser.add_argument(
        "--keep-old",
        action="store_true",
        help="keep the committed runs of the same kind (default: replace them)",
    )
    parser.add_argument(
        "--allow-loaded",
        action="store_true",
        help="publish a run whose machine was loaded (the README will say so)",
    )
    parser.add_argument(
        "--readme",
        default=os.path.join(REPO, "README.md"),
        help="the README to update (default: the repository's README.md)",
    )
    args = parser.parse_args(argv)
    if not os.path.exists(args.results):
        print(f"no results at {args.results}: run `python -m bench` first", file=sys.stderr)
        return 1
    run_records = select_run(load_results(args.results), args.run, args.latest)
    first = run_records[0]
    if first.get("machine_warnings") and not args.allow_loaded:
        print(
            f"run {first['run']} was measured on a loaded machine ("
            + "; ".join(first["machine_warnings"])
            + "): not published. Rerun on a quiet "
            "machine, or pass --allow-loaded to publish it with that warning.",
            file=sys.stderr,
        )
        return 1
    committed_path = os.path.join(COMMITTED_DIR, RESULTS_NAME)
    committed = load_results(committed_path) if os.path.exists(committed_path) else []
    merged = merge(committed, run_records, args.keep_old)
    if merged is committed:
        print(f"run {first['run']} is already in {committed_path}")
    else:
        with open(committed_path, "w") as f:
            for record in merged:
                f.write(json.dumps(record, sort_keys=True) + "\n")
        print(
            f"run {first['run']} ({first['device']}, {len(run_records)} records) written to "
            f"{committed_path} ({len(committed) + len(run_records) - len(merged)} older "
            f"records of the same kind replaced)"
        )
    status = plots.main(["--results", committed_path, "--plot-dir", COMMITTED_DIR])
    status = status or readme.main(["--results", committed_path, "--readme", args.readme])
    if status == 0:
        print("review with `git diff`, then commit bench/results/ and the README")
    return status


if __name__ == "__main__":
    sys.exit(main())
