"""Figures from the benchmark results (PNG): time vs T on log-log axes, the speedup of the kernels
over each baseline, and peak memory vs T; one panel per mode, causal rows.

Reads OUTPUT_DIR/results.jsonl (the latest GPU run if there is one, else the latest run; or
--run RUN) and writes time_vs_T.png, speedup.png and memory_vs_T.png into --plot-dir
(default: the results folder). matplotlib is optional: without it this prints how to get it
and exits 0 (the results stay usable by `python -m bench.readme`).

    python -m bench.plots [--results PATH] [--plot-dir DIR] [--run RUN | --latest]
"""
import argparse
import os
import sys

from .flops import MODE_NAMES
from .results_io import DEFAULT_DIR, RESULTS_NAME, load_results, select_run
from .tables import IMPL_ORDER, modes_present, primary_impl

PLOT_NAMES = ("time_vs_T.png", "speedup.png", "memory_vs_T.png")
_STYLE = {"triton": dict(color="C3", marker="o", lw=2.2), "flash_attention": dict(color="C1", marker="*"),
          "torch": dict(color="C0", marker="s"), "torch.compile": dict(color="C9", marker="D"),
          "reference": dict(color="C7", marker="x"), "sdpa": dict(color="C2", marker="^"),
          "fla": dict(color="C4", marker="v")}


def _series(records, impl, mode, field):
    points = sorted((r["T"], r[field]) for r in records
                    if r["impl"] == impl and r["mode"] == mode and r["causal"]
                    and r.get("status") == "ok" and r.get(field) is not None)
    return [T for T, _ in points], [value for _, value in points]


def _impls(records):
    present = {r["impl"] for r in records if r.get("status") == "ok"}
    return [name for name in IMPL_ORDER if name in present] + sorted(present - set(IMPL_ORDER))


def _title(records):
    r = records[0]
    batch = "fixed tokens per batch" if len({x["batch"] for x in records}) > 1 else "batch 1"
    return (f"{r['device']}, {r['dtype']}: S={r['S']} E={r['E']} C={r['C']}, causal, {batch}\n"
            f"torch {r['torch']}, triton {r['triton']}, commit {r['commit']}, run {r['run']}")


def draw(records, plot_dir):
    """Write the figures; returns their paths. Raises ImportError without matplotlib."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    os.makedirs(plot_dir, exist_ok=True)
    modes = modes_present(records)
    impls = _impls(records)
    primary = primary_impl(records)
    paths = []

    def t_label(T, _pos=None):
        return f"{int(T) // 1024}K" if T >= 1024 else f"{int(T)}"

    def panels(ylabel, modes=modes):
        fig, axes = plt.subplots(1, len(modes), figsize=(5.2 * len(modes), 4.4), squeeze=False)
        for ax, mode in zip(axes[0], modes):
            ax.set_title(MODE_NAMES[mode])
            ax.set_xscale("log", base=2)
            ax.set_xlabel("sequence length T")
            ax.xaxis.set_major_formatter(matplotlib.ticker.FuncFormatter(t_label))
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
        fig.suptitle(_title(records), fontsize=9)
        return fig, axes[0]

    def save(fig, axes, name):
        for ax in axes:
            if ax.get_legend_handles_labels()[0]:
                ax.legend(fontsize=8)
        fig.tight_layout()
        path = os.path.join(plot_dir, name)
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)

    fig, axes = panels("milliseconds (median)")
    for ax, mode in zip(axes, modes):
        ax.set_yscale("log")
        for name in impls:
            T, ms = _series(records, name, mode, "ms")
            if T:
                ax.plot(T, ms, label=name, **_STYLE.get(name, {}))
    save(fig, axes, PLOT_NAMES[0])

    fig, axes = panels(f"speedup of {primary} (x > 1: {primary} faster)")
    for ax, mode in zip(axes, modes):
        ax.set_yscale("log")
        ax.axhline(1.0, color="k", lw=0.8)
        T_ours, ms_ours = _series(records, primary, mode, "ms")
        ours = dict(zip(T_ours, ms_ours))
        for name in impls:
            if name == primary:
                continue
            T, ms = _series(records, name, mode, "ms")
            pairs = [(t, m / ours[t]) for t, m in zip(T, ms) if t in ours]
            if pairs:
                ax.plot([t for t, _ in pairs], [s for _, s in pairs], label=f"vs {name}",
                        **_STYLE.get(name, {}))
    save(fig, axes, PLOT_NAMES[1])

    # the backward alone has no memory figure: it needs its forward (see forward+backward)
    memory_modes = [mode for mode in modes if mode != "bwd"] or modes
    fig, axes = panels("peak memory, MB (inputs and gradients included)", memory_modes)
    for ax, mode in zip(axes, memory_modes):
        ax.set_yscale("log")
        for name in impls:
            T, mb = _series(records, name, mode, "mem_mb")
            pairs = [(t, m) for t, m in zip(T, mb) if m > 0]
            if pairs:
                ax.plot([t for t, _ in pairs], [m for _, m in pairs], label=name,
                        **_STYLE.get(name, {}))
    save(fig, axes, PLOT_NAMES[2])
    return paths


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m bench.plots", description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", default=os.path.join(DEFAULT_DIR, RESULTS_NAME),
                        help="results file (default bench/results/results.jsonl)")
    parser.add_argument("--plot-dir", help="where the PNGs go (default: the results file's folder)")
    parser.add_argument("--run", help="the run id to plot (default: latest GPU run, else latest)")
    parser.add_argument("--latest", action="store_true", help="the latest run, whatever device")
    args = parser.parse_args(argv)
    if not os.path.exists(args.results):
        print(f"no results at {args.results}: run `python -m bench.run` first", file=sys.stderr)
        return 1
    records = select_run(load_results(args.results), args.run, args.latest)
    plot_dir = args.plot_dir or os.path.dirname(os.path.abspath(args.results))
    try:
        paths = draw(records, plot_dir)
    except ImportError:
        print("matplotlib is not installed, so no plots were drawn (it is not a dependency of "
              "flash-kernels): `pip install matplotlib`, then run `python -m bench.plots` again. "
              f"The results are in {args.results}.")
        return 0
    print(f"run {records[0]['run']} on {records[0]['device']}:")
    for path in paths:
        print(f"  wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
