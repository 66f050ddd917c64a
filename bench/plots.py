"""Figures from the benchmark results (PNG): time vs T on log-log axes, the speedup of the kernels
over each baseline, and peak memory vs T; one panel per mode, causal rows.

Error bars span each point's spread range (the fastest to the slowest timed run, or the 10th
to 90th percentile with 10 runs or more: bench/stability.py; the line joins the medians); a ring
marks a point flagged noisy or non-monotonic (bench/stability.py), and the title says when the run's
machine was loaded. Dashed grey guides show how a linear cost (proportional to batch * T) and a
quadratic one (batch * T^2) would grow from the primary implementation's first point. Axis ticks
read 512, 1K, 2K, ... and 0.5, 1, 2, 5, 10, ... The varlen row (packed vs padded documents,
bench/varlen.py) is no point of these T series and is left out: its table is in the report and the
README section.

Reads OUTPUT_DIR/results.jsonl (default bench_out/results.jsonl in the current directory; the
latest GPU run if there is one, else the latest run; or --run RUN) and writes time_vs_T.png,
speedup.png and memory_vs_T.png into --plot-dir (default: the results file's folder). The
committed figures in bench/results/ are redrawn by `python -m bench.publish` (or explicitly:
--results bench/results/results.jsonl). matplotlib is optional (`pip install -e ".[bench]"`):
without it this prints how to get it and exits 0.

    python -m bench.plots [--results PATH] [--plot-dir DIR] [--run RUN | --latest]
"""

import argparse
import os
import sys
import textwrap

from .flops import MODE_NAMES
from .results_io import DEFAULT_DIR, RESULTS_NAME, load_results, select_run
from .stability import is_varlen, point_flags, point_key, spread_range
from .tables import IMPL_ORDER, modes_present, primary_impl

PLOT_NAMES = ("time_vs_T.png", "speedup.png", "memory_vs_T.png")
_STYLE = {
    "triton": dict(color="C3", marker="o", lw=2.2),
    "flash_attention": dict(color="C1", marker="*"),
    "torch": dict(color="C0", marker="s"),
    "torch.compile": dict(color="C9", marker="D"),
    "reference": dict(color="C7", marker="x"),
    "sdpa": dict(color="C2", marker="^"),
    "fla": dict(color="C4", marker="v"),
}

MEMORY_NOTE = (
    "Why sdpa can sit below the chunked path: scaled_dot_product_attention is a fused kernel "
    "that never stores the T x T scores, so its memory also grows linearly in T, and its "
    "tensors are narrower: q, k, v and the output are E/2 wide (heads of 64), against "
    "FLASH's four S-wide roles plus v and an output E wide. The eager chunked torch path also "
    "materialises each chunk's C x C scores and relu^2 (kept for the backward) and an S x E "
    "float32 state per chunk with its prefix sum. Only the dense reference stores T x T "
    "matrices (quadratic). Inputs and gradients are counted."
)


def _points(records, impl, mode, field):
    """The causal, measured points of one series, sorted by T."""
    return sorted(
        (
            r
            for r in records
            if r["impl"] == impl
            and r["mode"] == mode
            and r["causal"]
            and r.get("status") == "ok"
            and r.get(field) is not None
            and not is_varlen(r)
        ),
        key=lambda r: r["T"],
    )


def _ratio_range(other, mine):
    """(lowest, highest) speedup other/mine the spread ranges allow: the baseline's low over
    our high, and its high over our low (the medians' ratio without the fields)."""
    theirs, ours = spread_range(other), spread_range(mine)
    if theirs is None or ours is None:
        ratio = other["ms"] / mine["ms"]
        return ratio, ratio
    return theirs[0] / ours[1], theirs[1] / ours[0]


def _impls(records):
    present = {r["impl"] for r in records if r.get("status") == "ok" and not is_varlen(r)}
    return [name for name in IMPL_ORDER if name in present] + sorted(present - set(IMPL_ORDER))


def _title(records):
    r = records[0]
    batches = {x["batch"] for x in records if not is_varlen(x)}
    batch = "fixed tokens per batch" if len(batches) > 1 else "batch 1"
    title = (
        f"{r['device']}, {r['dtype']}: S={r['S']} E={r['E']} C={r['C']}, causal, {batch}\n"
        f"torch {r['torch']}, triton {r['triton']}, commit {r['commit']}, run {r['run']}"
    )
    if r.get("machine_warnings"):
        title += "\nLOADED MACHINE, timings unreliable: " + "; ".join(r["machine_warnings"])
    return "\n".join(textwrap.fill(line, 150) for line in title.split("\n"))


def plain_number(value, _pos=None):
    """Tick label of a log axis: 512, 1K, 2K, 64K, 1M for lengths; 0.2, 5, 20 for the rest."""
    if value <= 0:
        return ""
    if value >= 1024 and float(value).is_integer() and int(value) % 1024 == 0:
        kilo = int(value) // 1024
        return f"{kilo // 1024}M" if kilo % 1024 == 0 else f"{kilo}K"
    if value >= 1000:
        return f"{value / 1000:g}K" if value < 1e6 else f"{value / 1e6:g}M"
    return f"{value:g}"


def draw(records, plot_dir):
    """Write the figures; returns their paths. Raises ImportError without matplotlib."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker as ticker

    os.makedirs(plot_dir, exist_ok=True)
    modes = modes_present(records)
    impls = _impls(records)
    primary = primary_impl(records)
    flags = point_flags(records)
    paths = []

    def log_axis(axis, base, subs):
        axis.set_major_locator(ticker.LogLocator(base=base, subs=subs))
        axis.set_major_formatter(ticker.FuncFormatter(plain_number))
        axis.set_minor_formatter(ticker.NullFormatter())

    def panels(ylabel, modes=modes, note=None):
        fig, axes = plt.subplots(1, len(modes), figsize=(5.2 * len(modes), 4.6), squeeze=False)
        for ax, mode in zip(axes[0], modes):
            ax.set_title(MODE_NAMES[mode])
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            log_axis(ax.xaxis, 2, (1.0,))
            ax.set_xlabel("sequence length T")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
        fig.suptitle(_title(records), fontsize=8)
        if note:
            fig.text(
                0.01,
                0.01,
                textwrap.fill(note, 95 * len(modes)),
                fontsize=7.5,
                va="bottom",
                ha="left",
            )
        return fig, axes[0], note

    def save(fig, axes, name, note):
        for ax in axes:
            log_axis(ax.yaxis, 10, (1.0, 2.0, 5.0))
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=7)
        bottom = 0.04 + 0.035 * len(textwrap.wrap(note, 95 * len(axes))) if note else 0
        fig.tight_layout(rect=(0, bottom, 1, 1))
        path = os.path.join(plot_dir, name)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)

    def mark_flagged(ax, points, ys):
        flagged = [(r["T"], y) for r, y in zip(points, ys) if point_key(r) in flags]
        if flagged:
            ax.scatter(
                *zip(*flagged),
                s=160,
                facecolors="none",
                edgecolors="k",
                linewidths=1.2,
                zorder=5,
                label="flagged: noisy or non-monotonic",
            )

    def guides(ax, points, field):
        """Linear (batch * T) and quadratic (batch * T^2) growth from the first point."""
        if len(points) < 2:
            return
        first = points[0]
        T = [r["T"] for r in points]
        for power, style, label in (
            (1, "--", "linear guide: batch*T"),
            (2, ":", "quadratic guide: batch*T^2"),
        ):
            ys = [
                first[field]
                * (r["batch"] * r["T"] ** power)
                / (first["batch"] * first["T"] ** power)
                for r in points
            ]
            ax.plot(T, ys, style, color="0.45", lw=1.1, label=label, zorder=1)

    def dedupe_flag_labels(ax):
        handles, labels = ax.get_legend_handles_labels()
        seen = set()
        for handle, label in zip(handles, labels):
            if label in seen:
                handle.set_label("_" + label)
            seen.add(label)

    fig, axes, note = panels("milliseconds (median; bars: spread of the runs)")
    for ax, mode in zip(axes, modes):
        guides(ax, _points(records, primary, mode, "ms"), "ms")
        for name in impls:
            points = _points(records, name, mode, "ms")
            if not points:
                continue
            ms = [r["ms"] for r in points]
            bounds = [spread_range(r) or (r["ms"], r["ms"]) for r in points]
            low = [m - lo for m, (lo, _) in zip(ms, bounds)]
            high = [hi - m for m, (_, hi) in zip(ms, bounds)]
            ax.errorbar(
                [r["T"] for r in points],
                ms,
                yerr=[low, high],
                capsize=3,
                label=name,
                **_STYLE.get(name, {}),
            )
            mark_flagged(ax, points, ms)
        dedupe_flag_labels(ax)
    save(fig, axes, PLOT_NAMES[0], note)

    fig, axes, note = panels(f"speedup of {primary} (x > 1: {primary} faster)")
    for ax, mode in zip(axes, modes):
        ax.axhline(1.0, color="k", lw=0.8)
        ours = {r["T"]: r for r in _points(records, primary, mode, "ms")}
        for name in impls:
            if name == primary:
                continue
            pairs = [
                (r, ours[r["T"]]) for r in _points(records, name, mode, "ms") if r["T"] in ours
            ]
            if not pairs:
                continue
            T = [other["T"] for other, _ in pairs]
            speedup = [other["ms"] / mine["ms"] for other, mine in pairs]
            ranges = [_ratio_range(other, mine) for other, mine in pairs]
            low = [s - lo for s, (lo, _) in zip(speedup, ranges)]
            high = [hi - s for s, (_, hi) in zip(speedup, ranges)]
            ax.errorbar(
                T, speedup, yerr=[low, high], capsize=3, label=f"vs {name}", **_STYLE.get(name, {})
            )
            flagged = [
                (t, s)
                for t, s, (other, mine) in zip(T, speedup, pairs)
                if point_key(other) in flags or point_key(mine) in flags
            ]
            if flagged:
                ax.scatter(
                    *zip(*flagged),
                    s=160,
                    facecolors="none",
                    edgecolors="k",
                    linewidths=1.2,
                    zorder=5,
                    label="flagged: noisy or non-monotonic",
                )
        dedupe_flag_labels(ax)
    save(fig, axes, PLOT_NAMES[1], None)

    # the backward alone has no memory figure: it needs its forward (see forward+backward)
    memory_modes = [mode for mode in modes if mode != "bwd"] or modes
    note = MEMORY_NOTE if any(r["impl"] == "sdpa" and r.get("mem_mb") for r in records) else None
    fig, axes, note = panels("peak memory, MB (inputs, gradients included)", memory_modes, note)
    for ax, mode in zip(axes, memory_modes):
        guides(
            ax, [r for r in _points(records, primary, mode, "mem_mb") if r["mem_mb"] > 0], "mem_mb"
        )
        for name in impls:
            points = [r for r in _points(records, name, mode, "mem_mb") if r["mem_mb"] > 0]
            if points:
                ax.plot(
                    [r["T"] for r in points],
                    [r["mem_mb"] for r in points],
                    label=name,
                    **_STYLE.get(name, {}),
                )
    save(fig, axes, PLOT_NAMES[2], note)
    return paths


def main(argv=None):
    parser = argparse.ArgumentParser(
        prog="python -m bench.plots", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument(
        "--results",
        default=os.path.join(DEFAULT_DIR, RESULTS_NAME),
        help="results file (default: %(default)s under the current directory; "
        "the committed one is bench/results/results.jsonl)",
    )
    parser.add_argument("--plot-dir", help="where the PNGs go (default: the results file's folder)")
    parser.add_argument("--run", help="the run id to plot (default: latest GPU run, else latest)")
    parser.add_argument("--latest", action="store_true", help="the latest run, whatever device")
    args = parser.parse_args(argv)
    if not os.path.exists(args.results):
        print(
            f"no results at {args.results}: run `python -m bench` first (it writes "
            f"{os.path.join(DEFAULT_DIR, RESULTS_NAME)})",
            file=sys.stderr,
        )
        return 1
    records = select_run(load_results(args.results), args.run, args.latest)
    plot_dir = args.plot_dir or os.path.dirname(os.path.abspath(args.results))
    try:
        paths = draw(records, plot_dir)
    except ImportError:
        print(
            "matplotlib is not installed, so no plots were drawn (it is not a dependency of "
            'flash-kernels): `pip install -e ".[bench]"` (or `pip install matplotlib`), then '
            f"run `python -m bench.plots` again. The results are in {args.results}."
        )
        return 0
    print(f"run {records[0]['run']} on {records[0]['device']}:")
    for path in paths:
        print(f"  wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
