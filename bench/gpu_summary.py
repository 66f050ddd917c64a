"""The one-screen summary of a GPU run (bench/gpu_runbook.sh prints it last).

From the preflight report, the self-test's JSON report (`python -m flash_kernels.selftest
--json`), the tests' live report (FLASH_KERNELS_TEST_REPORT, tests/conftest.py) and the
benchmark's results.jsonl: the machine, the preflight verdict, the self-test's verdict and table
(one row per kernel path and dtype, plus the ptxas and driver it ran with), tests passed /
failed / skipped per file with the skip reasons and the first failures, every bf16 test's
outcome, the headline timings at the paper shape (the forward+backward table of the run's
bf16 causal points and the performance targets), and the long-context training comparison's
table (examples/compare_long_context.py writes it as compare_long_context.txt). Each part says
so when its input is missing, so the last screen holds the evidence of whatever ran.

    python -m bench.gpu_summary --preflight F --selftest F --tests F --results F
                                [--selftest-rc N] [--tests-rc N] [--elapsed S] [--compare F]
                                [--output F]
"""

import argparse
import collections
import json
import os
import sys

MAX_FAILURES_SHOWN = 8
MAX_SKIP_REASONS_SHOWN = 6
WIDTH = 100


def _clip(text, width=WIDTH):
    """One line of at most `width` characters (leading indentation kept)."""
    text = str(text)
    indent = text[: len(text) - len(text.lstrip())]
    text = indent + " ".join(text.split())
    return text if len(text) <= width else text[: width - 3] + "..."


def read_test_report(path):
    """[(file, test name, outcome, message)] from the JSON lines tests/conftest.py writes with
    FLASH_KERNELS_TEST_REPORT; outcome is "passed", "failed", "error" or "skipped"."""
    cases = []
    with open(path) as f:
        for line in f:
            if line.strip():
                entry = json.loads(line)
                path_part, _, name = entry["nodeid"].partition("::")
                cases.append(
                    (os.path.basename(path_part), name, entry["outcome"], entry["message"])
                )
    return cases


def tests_section(report_path, tests_rc):
    if not report_path or not os.path.exists(report_path):
        return [f"tests: no test report ({report_path}): not run (exit {tests_rc})"]
    cases = read_test_report(report_path)
    totals = collections.Counter(outcome for _, _, outcome, _ in cases)
    lines = [
        f"tests: {totals['passed']} passed, {totals['failed']} failed, "
        f"{totals['error']} errors, {totals['skipped']} skipped (exit {tests_rc})"
    ]
    per_file = collections.defaultdict(collections.Counter)
    for filename, _, outcome, _ in cases:
        per_file[filename][outcome] += 1
    lines.append(f"  {'file':34} {'passed':>7} {'failed':>7} {'errors':>7} {'skipped':>8}")
    for filename, counts in per_file.items():
        lines.append(
            f"  {filename:34} {counts['passed']:7} {counts['failed']:7} "
            f"{counts['error']:7} {counts['skipped']:8}"
        )
    failures = [c for c in cases if c[2] in ("failed", "error")]
    for filename, name, outcome, message in failures[:MAX_FAILURES_SHOWN]:
        lines.append(_clip(f"  {outcome.upper()} {filename}::{name}: {message}"))
    if len(failures) > MAX_FAILURES_SHOWN:
        lines.append(f"  ... and {len(failures) - MAX_FAILURES_SHOWN} more failures (tests.log)")
    reasons = collections.Counter(
        message for _, _, outcome, message in cases if outcome == "skipped"
    )
    if reasons:
        lines.append("skip reasons:")
        for reason, count in reasons.most_common(MAX_SKIP_REASONS_SHOWN):
            lines.append(_clip(f"  {count:4} x {reason}"))
    bf16 = [c for c in cases if "bfloat16" in c[1] or "bf16" in c[1] or "autocast" in c[1]]
    if bf16:
        lines.append(
            "bf16 (and autocast) tests: "
            + _clip(
                ", ".join(f"{filename}::{name} {outcome}" for filename, name, outcome, _ in bf16),
                10 * WIDTH,
            )
        )
    else:
        lines.append("bf16 tests: none ran")
    return lines


def selftest_section(report_path, selftest_rc="?"):
    """The self-test's verdict line, its table and failures, and the environment lines the
    preflight does not record (compute capability, driver, ptxas), from its JSON report. The
    report is rewritten after every row, so a run stopped at its time cap still shows the rows
    it finished (verdict INCOMPLETE or INTERRUPTED)."""
    if not report_path or not os.path.exists(report_path):
        return [f"self-test: no report ({report_path}): not run (exit {selftest_rc})"]
    try:
        with open(report_path) as f:
            report = json.load(f)
    except (OSError, ValueError) as exc:
        return [f"self-test: unreadable report {report_path}: {exc} (exit {selftest_rc})"]
    if "not_run" in report:
        return [_clip(f"self-test: not run (exit {selftest_rc}): {report['not_run']}")]
    text = report.get("text", "").splitlines()
    body = text[: text.index("environment:")] if "environment:" in text else text
    lines = [f"self-test (exit {selftest_rc}; python -m flash_kernels.selftest, selftest.log):"]
    lines += [line if len(line) <= WIDTH else line[: WIDTH - 3] + "..." for line in body]
    environment = report.get("environment", {})
    lines += [
        _clip(f"  {name}: {environment[name]}")
        for name in ("capability", "driver", "ptxas")
        if name in environment
    ]
    return lines


def timings_section(results_path):
    if not results_path or not os.path.exists(results_path):
        return [f"timings: no results ({results_path})"]
    from bench.results_io import load_results, select_run
    from bench.tables import evaluate_targets, primary_impl, render_targets, render_text, time_table

    records = select_run(load_results(results_path), latest=True)
    if not records:
        return ["timings: the results file holds no records"]
    first = records[0]
    mode = next(
        (m for m in ("fwd+bwd", "fwd", "bwd") if any(r["mode"] == m for r in records)), None
    )
    lines = [
        f"timings ({mode}, ms; {first.get('dtype')}, S={first.get('S')} E={first.get('E')} "
        f"C={first.get('C')}; {first.get('device')}):"
    ]
    table = time_table(records, mode) if mode else None
    lines += render_text(table).splitlines() if table else ["  no timed points"]
    primary = primary_impl(records)
    if primary:
        lines += render_targets(evaluate_targets(records, primary), primary).splitlines()
    return lines


def compare_section(path):
    """The long-context comparison's narrow table (its compare_long_context.txt), or a line
    saying that there is none."""
    if not path or not os.path.exists(path):
        return [f"long-context comparison: no table ({path})"]
    with open(path) as f:
        lines = [line.rstrip("\n")[:WIDTH] for line in f if line.strip()]  # columns kept
    return lines or [f"long-context comparison: the table is empty ({path})"]


def summary(
    preflight_path,
    tests_path,
    results_path,
    tests_rc="?",
    elapsed=None,
    selftest_path=None,
    selftest_rc="?",
    compare_path=None,
):
    lines = ["=" * 30 + " GPU run summary " + "=" * 30]
    if preflight_path and os.path.exists(preflight_path):
        with open(preflight_path) as f:
            report = f.read().splitlines()
        lines += [
            _clip(line)
            for line in report
            if line.startswith(
                (
                    "version python",
                    "version torch",
                    "version gpu",
                    "version triton",
                    "version numpy",
                    "FAIL",
                    "PREFLIGHT",
                )
            )
        ]
    else:
        lines.append(f"preflight: no report ({preflight_path})")
    lines += selftest_section(selftest_path, selftest_rc)
    lines += tests_section(tests_path, tests_rc)
    try:
        lines += timings_section(results_path)
    except Exception as exc:  # noqa: BLE001 - the summary must still print
        lines.append(f"timings: could not be read: {type(exc).__name__}: {exc}")
    lines += compare_section(compare_path)
    if elapsed is not None:
        lines.append(f"elapsed: {elapsed} s")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--preflight")
    parser.add_argument("--selftest", help="the JSON report of python -m flash_kernels.selftest")
    parser.add_argument("--selftest-rc", default="?")
    parser.add_argument("--tests", help="the FLASH_KERNELS_TEST_REPORT file of the test run")
    parser.add_argument("--results")
    parser.add_argument("--tests-rc", default="?")
    parser.add_argument("--elapsed")
    parser.add_argument("--compare", help="compare_long_context.txt of the comparison")
    parser.add_argument("--output")
    args = parser.parse_args(argv)
    text = summary(
        args.preflight,
        args.tests,
        args.results,
        args.tests_rc,
        args.elapsed,
        args.selftest,
        args.selftest_rc,
        args.compare,
    )
    if args.output:
        with open(args.output, "w") as f:
            f.write(text)
    print(text, end="")
    return 0


if __name__ == "__main__":
    sys.exit(main())
