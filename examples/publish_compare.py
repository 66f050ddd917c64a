"""Publish a long-context comparison run: the one explicit step that changes its committed results.

`python examples/compare_long_context.py` writes only to examples_out/ (git-ignored). This
command takes one run from a results file (default examples_out/compare_long_context.jsonl, its
latest run; or --run RUN) and
  1. puts its records into examples/results/compare_long_context.jsonl, replacing the committed
     run of the same preset (cpu, gpu, ...) unless --keep-old; publishing a run twice changes
     nothing;
  2. draws examples/results/compare_long_context_<preset>.png for every committed run;
  3. regenerates the README section between `<!-- compare:start -->` and
     `<!-- compare:end -->` from the committed file.
Review with `git diff`, then commit.

    python examples/publish_compare.py [--results PATH] [--run RUN] [--keep-old]
                                       [--dest DIR] [--readme PATH]
    python -m examples.publish_compare ...      (the same, from the repository root)
"""

import argparse
import importlib
import json
import os
import sys

EXAMPLES = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(EXAMPLES)
if EXAMPLES not in sys.path:
    sys.path.insert(0, EXAMPLES)

compare_report = importlib.import_module("compare_report")  # a sibling, once on the path

RESULTS_NAME = "compare_long_context.jsonl"


def merge(committed, run_records, keep_old):
    """The committed records with the run's added; unless keep_old, the committed runs of the
    same preset removed first. The committed list itself when the run is already there."""
    run = run_records[0]["run"]
    if any(r["run"] == run for r in committed):
        return committed
    preset = run_records[0]["preset"]
    kept = committed if keep_old else [r for r in committed if r["preset"] != preset]
    return kept + run_records


def figure_name(records_of_run, runs_of_preset):
    """compare_long_context_<preset>.png, or with several committed runs of that preset
    (--keep-old) compare_long_context_<preset>_<run>.png."""
    first = records_of_run[0]
    suffix = f"_{first['run']}" if runs_of_preset > 1 else ""
    return f"compare_long_context_{first['preset']}{suffix}.png"


def replace_section(text, section):
    """text with the part from the start marker to the end marker replaced by section."""
    start, end = text.find(compare_report.START), text.find(compare_report.END)
    if start < 0 or end < start:
        raise ValueError(
            f"the README has no {compare_report.START} ... {compare_report.END} section to replace"
        )
    return text[:start] + section + text[end + len(compare_report.END) :]


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--results",
        default=os.path.join("examples_out", RESULTS_NAME),
        help="where the run is read (default: %(default)s)",
    )
    parser.add_argument("--run", help="run id (default: the latest run of the file)")
    parser.add_argument(
        "--keep-old",
        action="store_true",
        help="keep the committed runs of the same preset (default: replace)",
    )
    parser.add_argument(
        "--dest",
        default=os.path.join(EXAMPLES, "results"),
        help="folder of the committed results and figures (default: examples/results)",
    )
    parser.add_argument(
        "--readme",
        default=os.path.join(REPO, "README.md"),
        help="the README to update (default: the repository's)",
    )
    args = parser.parse_args(argv)
    if not os.path.exists(args.results):
        print(
            f"no results at {args.results}: run examples/compare_long_context.py first",
            file=sys.stderr,
        )
        return 1
    run_records = compare_report.select_run(compare_report.load_records(args.results), args.run)
    committed_path = os.path.join(args.dest, RESULTS_NAME)
    committed = (
        compare_report.load_records(committed_path) if os.path.exists(committed_path) else []
    )
    merged = merge(committed, run_records, args.keep_old)
    os.makedirs(args.dest, exist_ok=True)
    if merged is committed:
        print(f"run {run_records[0]['run']} is already in {committed_path}")
    else:
        with open(committed_path, "w") as f:
            f.writelines(json.dumps(record, sort_keys=True) + "\n" for record in merged)
        print(
            f"run {run_records[0]['run']} ({run_records[0]['device']}, {len(run_records)} "
            f"records) written to {committed_path}"
        )
    runs = [compare_report.select_run(merged, run) for run in compare_report.run_ids(merged)]
    readme_dir = os.path.dirname(os.path.abspath(args.readme))
    figures = {}
    presets = [records[0]["preset"] for records in runs]
    for records in runs:
        path = os.path.join(args.dest, figure_name(records, presets.count(records[0]["preset"])))
        if compare_report.plot(records, path):
            print(f"figure {path}")
        figures[records[0]["run"]] = os.path.relpath(path, readme_dir).replace(os.sep, "/")
    results_rel = os.path.relpath(committed_path, readme_dir).replace(os.sep, "/")
    with open(args.readme, encoding="utf-8") as f:
        text = f.read()
    try:
        updated = replace_section(
            text, compare_report.readme_section(runs, figures.__getitem__, results_rel)
        )
    except ValueError as exc:
        print(f"{args.readme}: {exc}", file=sys.stderr)
        return 1
    if updated != text:
        with open(args.readme, "w", encoding="utf-8") as f:
            f.write(updated)
        print(f"{args.readme}: section regenerated; review with `git diff`, then commit")
    return 0


if __name__ == "__main__":
    sys.exit(main())
