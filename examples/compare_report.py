"""Reading the long-context comparison (examples/compare_long_context.py): values at equal
wall-clock, the time each model needs to reach another's best loss, tables, the figure and the
README section.

A record is one model at one T of one run (status "ok" or "skipped"); its `curve` is the list of
[step, training seconds, validation loss] points, the first at step 0 and 0 s. Between two points
a curve is read by linear interpolation in seconds; nothing is read beyond its last point.

- Equal wall-clock at a T: the end of the shortest curve (the least training seconds any model
  of that T logged), where every curve has a value.
- Time to reach a loss: the first crossing of the curve below it, interpolated; None when the
  curve never gets there.
- Best loss: a curve's lowest point, at the first time it is reached.
"""

import itertools
import json
import math
import os
import statistics

ORDER = ("FLASH", "Transformer++", "FLASH-Quad")
COLORS = {"FLASH": "C3", "Transformer++": "C0", "FLASH-Quad": "C2"}
#: Losses closer than this (nats/byte) count as level in the sentences on who wins.
LEVEL = 0.01
#: Step times within this fraction of each other count as level there.
SPEED_LEVEL = 0.05
FILES = ("compare_long_context.md", "compare_long_context.txt", "compare_long_context.png")


# -- curves ---------------------------------------------------------------------------------------


def points(curve):
    """[(seconds, loss)] of a curve of [step, seconds, loss]."""
    return [(float(seconds), float(loss)) for _, seconds, loss in curve]


def loss_at(curve, seconds):
    """The curve's loss at `seconds` (linear between points), None outside its span."""
    pts = points(curve)
    if not pts or seconds < pts[0][0] or seconds > pts[-1][0]:
        return None
    for (s0, l0), (s1, l1) in itertools.pairwise(pts):
        if s0 <= seconds <= s1:
            return l0 if s1 == s0 else l0 + (l1 - l0) * (seconds - s0) / (s1 - s0)
    return pts[-1][1]


def time_to_reach(curve, target):
    """The first training seconds at which the curve is at or below `target` (interpolated
    between the points around the crossing), None if it never is."""
    pts = points(curve)
    if not pts:
        return None
    if pts[0][1] <= target:
        return pts[0][0]
    for (s0, l0), (s1, l1) in itertools.pairwise(pts):
        if l1 <= target:
            return s0 + (s1 - s0) * (l0 - target) / (l0 - l1)
    return None


def best(curve):
    """(lowest loss, the first seconds it is reached)."""
    lowest = min(loss for _, _, loss in curve)
    return lowest, next(float(s) for _, s, loss in curve if loss == lowest)


# -- records -------------------------------------------------------------------------------------


def load_records(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def run_ids(records):
    """The runs of `records`, oldest first (by time, then id)."""
    first = {}
    for r in records:
        first.setdefault(r["run"], (r.get("time", ""), r["run"]))
    return sorted(first, key=first.get)


def select_run(records, run=None):
    """The records of run `run`, default the latest."""
    if not records:
        raise ValueError("no records")
    run = run or run_ids(records)[-1]
    chosen = [r for r in records if r["run"] == run]
    if not chosen:
        raise ValueError(f"no run {run!r}; runs: {', '.join(run_ids(records))}")
    return chosen


def analyse(records):
    """Per T, ascending: dict(T, batch, runs {model: record}, skipped {model: note},
    equal_seconds, at_equal {model: loss}, best {model: (loss, seconds)},
    reach {(model, other): seconds model needs to reach other's best loss, or None}, load
    (min, max) over the T's segments)."""
    by_T = {}
    for r in records:
        by_T.setdefault(r["T"], []).append(r)
    rows = []
    for T in sorted(by_T):
        runs = {r["model"]: r for r in by_T[T] if r["status"] == "ok" and r["curve"]}
        skipped = {r["model"]: r.get("note", "") for r in by_T[T] if r["status"] != "ok"}
        equal = min((r["curve"][-1][1] for r in runs.values()), default=None)
        bests = {name: best(r["curve"]) for name, r in runs.items()}
        reach = {
            (a, b): time_to_reach(runs[a]["curve"], bests[b][0])
            for a in runs
            for b in runs
            if a != b
        }
        loads = [
            v
            for r in runs.values()
            for v in (r.get("load_min"), r.get("load_max"))
            if v is not None
        ]
        rows.append(
            {
                "T": T,
                "batch": by_T[T][0]["batch"],
                "runs": runs,
                "skipped": skipped,
                "equal_seconds": equal,
                "at_equal": {n: loss_at(r["curve"], equal) for n, r in runs.items()},
                "best": bests,
                "reach": reach,
                "load": (min(loads), max(loads)) if loads else None,
            }
        )
    return rows


def models_of(rows):
    present = {name for row in rows for name in (*row["runs"], *row["skipped"])}
    return [name for name in ORDER if name in present]


# -- formatting ----------------------------------------------------------------------------------


def fmt_ms(ms):
    if ms is None:
        return "-"
    return f"{ms:,.0f}" if ms >= 100 else f"{ms:.1f}" if ms >= 10 else f"{ms:.2f}"


def fmt_s(seconds):
    if seconds is None:
        return "-"
    return (
        f"{seconds:,.0f} s"
        if seconds >= 10
        else f"{seconds:.1f} s"
        if seconds >= 1
        else f"{seconds:.3f} s"
    )


def ratio(row, name):
    """name's ms per step over FLASH's (above 1: FLASH's step is faster), or None."""
    runs = row["runs"]
    if name not in runs or "FLASH" not in runs or not runs["FLASH"]["ms_per_step"]:
        return None
    return runs[name]["ms_per_step"] / runs["FLASH"]["ms_per_step"]


def steps_cell(record):
    total = record["settings"]["steps"]
    note = "" if record["steps_run"] >= total else f" ({record['stopped']})"
    return f"{record['steps_run']}{note}"


def reach_cell(row, model, other):
    """ "{seconds} ({x} sooner/later than other's own)" or "not in {model's seconds}"."""
    if model not in row["runs"] or other not in row["runs"]:
        return "-"
    seconds = row["reach"][(model, other)]
    if seconds is None:
        return f"not in {fmt_s(row['runs'][model]['curve'][-1][1])}"
    own = row["best"][other][1]
    if seconds <= 0 or own <= 0:
        return fmt_s(seconds)
    factor = own / seconds
    return f"{fmt_s(seconds)} ({factor:.2f}x {'sooner' if factor >= 1 else 'later'})"


def speed_table(rows, names):
    others = [n for n in names if n != "FLASH"]
    head = (
        ["T", "batch"]
        + [f"{n} ms/step" for n in names]
        + [f"{n} ÷ FLASH" for n in others]
        + [f"steps {n}" for n in names]
        + ["load"]
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for row in rows:
        cells = [f"{row['T']:,}", str(row["batch"])]
        for n in names:
            r = row["runs"].get(n)
            cells.append(
                f"{fmt_ms(r['ms_per_step'])} ({fmt_ms(r['ms_min'])}-{fmt_ms(r['ms_max'])})"
                if r
                else "not run"
            )
        for n in others:
            value = ratio(row, n)
            cells.append("-" if value is None else f"{value:.2f}x")
        cells += [steps_cell(row["runs"][n]) if n in row["runs"] else "-" for n in names]
        cells.append("-" if row["load"] is None else f"{row['load'][0]:.1f}-{row['load'][1]:.1f}")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def at_equal_steps(row, other):
    """(step, FLASH's loss, other's loss) at the last step (> 0) both evaluated, or None."""
    flash, them = row["runs"].get("FLASH"), row["runs"].get(other)
    if not flash or not them:
        return None
    mine = {step: loss for step, _, loss in flash["curve"]}
    common = [
        (step, mine[step], loss) for step, _, loss in them["curve"] if step in mine and step > 0
    ]
    return common[-1] if common else None


def quality_table(rows, names):
    others = [n for n in names if n != "FLASH"]
    head = (
        ["T", "equal wall-clock"]
        + [f"{n} loss" for n in names]
        + [f"FLASH - {n}" for n in others]
        + [f"FLASH / {n} at equal steps" for n in others]
    )
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for row in rows:
        at = row["at_equal"]
        cells = [f"{row['T']:,}", fmt_s(row["equal_seconds"])]
        cells += [f"{at[n]:.3f}" if at.get(n) is not None else "-" for n in names]
        for n in others:
            if at.get("FLASH") is None or at.get(n) is None:
                cells.append("-")
            else:
                cells.append(f"{at['FLASH'] - at[n]:+.3f}")
        for n in others:
            same = at_equal_steps(row, n)
            cells.append("-" if same is None else f"{same[1]:.3f} / {same[2]:.3f} (step {same[0]})")
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def reach_table(rows, names):
    others = [n for n in names if n != "FLASH"]
    head = ["T"]
    for n in others:
        head += [f"{n} best", "FLASH reaches it at", "FLASH best", f"{n} reaches it at"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---:|" * len(head)]
    for row in rows:
        cells = [f"{row['T']:,}"]
        for n in others:
            for model, other in ((n, None), ("FLASH", n), ("FLASH", None), (n, "FLASH")):
                if other is None:  # a best-loss cell
                    b = row["best"].get(model)
                    cells.append("-" if b is None else f"{b[0]:.3f} at {fmt_s(b[1])}")
                else:
                    cells.append(reach_cell(row, model, other))
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def verdicts(rows):
    """(loses, wins): one sentence per T and competitor where FLASH is slower per step or
    worse at equal wall-clock (loses), or else (wins: not slower, not worse). Step times
    within SPEED_LEVEL and losses within LEVEL of each other count as level."""
    loses, wins = [], []
    for row in rows:
        at = row["at_equal"]
        for n in ("Transformer++", "FLASH-Quad"):
            speed = ratio(row, n)
            if speed is None or at.get("FLASH") is None or at.get(n) is None:
                continue
            gap = at["FLASH"] - at[n]
            speed_text = (
                f"level per step ({speed:.2f}x, within {SPEED_LEVEL:.0%})"
                if abs(speed - 1) < SPEED_LEVEL
                else f"slower per step (its step takes {1 / speed:.2f}x as long)"
                if speed < 1
                else f"faster per step ({speed:.2f}x)"
            )
            when = f"at {fmt_s(row['equal_seconds'])}"
            quality = (
                f"worse at equal wall-clock ({gap:.3f} nats/byte {when})"
                if gap > LEVEL
                else f"better at equal wall-clock ({-gap:.3f} nats/byte {when})"
                if gap < -LEVEL
                else f"level at equal wall-clock (within {LEVEL} {when})"
            )
            sentence = f"T = {row['T']:,} against {n}: FLASH is {speed_text} and {quality}."
            (loses if speed <= 1 - SPEED_LEVEL or gap > LEVEL else wins).append(sentence)
    return loses, wins


def crossover(rows):
    """The first T from which FLASH's step is faster than Transformer++'s at every longer T,
    and the T before it (None, None when it never is; (None, T) when it is from the first)."""
    measured = [
        (row["T"], ratio(row, "Transformer++"))
        for row in rows
        if ratio(row, "Transformer++") is not None
    ]
    for i, (T, _) in enumerate(measured):
        if all(value > 1 for _, value in measured[i:]):
            return (measured[i - 1][0] if i else None), T
    return None, None


def init_noise(rows):
    """Sentences on the T where FLASH has a single chunk (C >= T): its linear part is then
    empty and it computes the same function as FLASH-Quad (tests/test_compare_long_context.py),
    so the two curves differ only by their initial draws. The gap between their losses at the
    last step both evaluated measures how far those draws alone move the loss."""
    sentences = []
    for row in rows:
        flash, quad = row["runs"].get("FLASH"), row["runs"].get("FLASH-Quad")
        if not flash or not quad or flash.get("shape", {}).get("chunk_size", 0) < row["T"]:
            continue
        common = {step: loss for step, _, loss in flash["curve"]}
        shared = [
            (step, common[step], loss)
            for step, _, loss in quad["curve"]
            if step in common and step > 0
        ]
        if not shared:
            continue
        step, flash_loss, quad_loss = shared[-1]
        sentences.append(
            f"At T = {row['T']:,} FLASH has one chunk and no linear part: it is the same "
            f"function as FLASH-Quad, and only the random initial weights differ (FLASH draws "
            f"four roles, FLASH-Quad two). At step {step} their validation losses differ by "
            f"{abs(flash_loss - quad_loss):.3f} nats/byte: differences between models of about "
            "that size in this short training can come from the initial draws alone."
        )
    return sentences


def markdown(records):
    """The tables and the sentences of one run, markdown."""
    rows = analyse(records)
    names = models_of(rows)
    loses, wins = verdicts(rows)
    before, after = crossover(rows)
    parts = [
        (
            "**Speed**: ms per training step, median over the timed segments (minimum-maximum: "
            "the spread); `÷ FLASH`: the model's ms per step over FLASH's (above 1: FLASH's step "
            "is faster); steps run (and why a model stopped before N); the 1-minute load average "
            "over the segments."
        ),
        "",
        speed_table(rows, names),
        "",
        (
            "**Quality at equal wall-clock**: the validation loss (nats/byte) each model reaches "
            "in the training seconds of the shortest curve at that T; `FLASH - X` below 0: FLASH "
            "is better."
        ),
        "",
        quality_table(rows, names),
        "",
        (
            "**Time to the other's best**: each model's best validation loss and when it reached "
            "it, and the training seconds the other needs to reach it (`sooner`: faster than the "
            "model that set it)."
        ),
        "",
        reach_table(rows, names),
        "",
    ]
    if after is not None:
        parts.append(
            f"Per step, FLASH is faster than Transformer++ from T = {after:,} on"
            + (f" (slower at T = {before:,})." if before else " (at every T here).")
        )
    else:
        parts.append("Per step, FLASH is not faster than Transformer++ at the longest T here.")
    parts += ["", "**Where FLASH loses**" + (":" if loses else ": nowhere in this run.")]
    parts += [f"- {s}" for s in loses]
    parts += ["", "**Where FLASH wins**" + (":" if wins else ": nowhere in this run.")]
    parts += [f"- {s}" for s in wins]
    noise = init_noise(rows)
    if noise:
        parts += ["", "**Noise of the initial draws**: " + " ".join(noise)]
    skipped = [
        f"- {name} at T = {row['T']:,}: {note.removeprefix('not run: ')}"
        for row in rows
        for name, note in row["skipped"].items()
    ]
    if skipped:
        parts += ["", "Not run:", *skipped]
    return "\n".join(parts) + "\n"


def text_summary(records):
    """A narrow plain-text table (at most 100 characters a line) for a terminal or the GPU
    run's summary: per T, ms per step and its ratio to FLASH, and the losses at equal
    wall-clock."""
    rows = analyse(records)
    names = models_of(rows)
    short = {"FLASH": "FLASH", "Transformer++": "T++", "FLASH-Quad": "Quad"}
    lines = [
        (
            "long-context comparison (ms/step, x = over FLASH's; validation loss at equal "
            "wall-clock):"
        )
    ]
    for row in rows:
        speed = []
        for n in names:
            r = row["runs"].get(n)
            value = ratio(row, n) if n != "FLASH" else None
            speed.append(
                f"{short[n]} "
                + ("-" if r is None else fmt_ms(r["ms_per_step"]))
                + (f" ({value:.2f}x)" if value is not None else "")
            )
        losses = " ".join(
            f"{short[n]} {row['at_equal'][n]:.3f}"
            for n in names
            if row["at_equal"].get(n) is not None
        )
        lines.append(f"  T={row['T']:<6} b={row['batch']:<4} " + "  ".join(speed))
        lines.append(f"  {'':<13} at {fmt_s(row['equal_seconds'])}: {losses}")
    return "\n".join(line[:100] for line in lines)


def describe(records):
    """One paragraph: configuration, device, versions, parameters, load and total time."""
    first = next(r for r in records if r["status"] == "ok")
    s = first["settings"]
    params = {}
    shapes = {}
    for r in records:
        if r["status"] == "ok":
            params.setdefault(r["model"], r["params"])
            shapes.setdefault(r["model"], r["shape"])
    walls = {r["T"]: r["wall_s"] for r in records if r["status"] == "ok"}
    loads = [
        v
        for r in records
        if r["status"] == "ok"
        for v in (r["load_min"], r["load_max"])
        if v is not None
    ]
    base = shapes.get("Transformer++")
    text = (
        f"Run `{first['run']}` ({first['time']}), preset `{first['preset']}`: "
        f"**{first['device']}**, {first['dtype']}"
        + (" (autocast)" if first["dtype"] == "bfloat16" else "")
        + f", {first['threads']} thread(s) of torch {first['torch']}, triton "
        f"{first.get('triton')}, commit `{first['commit']}`. d = {s['d']}, "
        f"{s['depth']} FLASH / GAU layers, S = {s['s']}, E = {2 * s['d']}, "
        f"C = min({s['chunk_size']}, T)"
        + (
            f"; Transformer++ depth {base['depth']}, {base['heads']} head(s) of "
            f"{s['d'] // base['heads']}, SwiGLU width {base['ffn_hidden']}"
            if base
            else ""
        )
        + "; parameters: "
        + ", ".join(f"{n} {params[n]:,}" for n in ORDER if n in params)
        + f". {s['tokens_per_step']:,} tokens per step (batch = {s['tokens_per_step']:,} // T),"
        f" N = {s['steps']} steps, validation every {s['eval_every']} steps on "
        f"{s['eval_tokens']:,} fixed validation bytes; AdamW, peak lr {s['lr']:g} "
        f"({s['warmup']} warm-up steps, cosine to 10%), seed {s['seed']}; time cap "
        f"{s['time_cap'] or 'none'}"
        + ("x the fastest model's N-step time" if s["time_cap"] else "")
        + (f", time budget {s['time_budget']:g} s" if s["time_budget"] else "")
        + f". The run took {sum(walls.values()) / 60:.1f} min"
    )
    if loads:
        text += (
            f"; the 1-minute load average over its segments ranged {min(loads):.1f}-"
            f"{max(loads):.1f} (median {statistics.median(loads):.1f}) on "
            f"{first['cpu_count']} cores"
        )
    return text + "."


def plot(records, path):
    """Validation loss against training seconds, a panel per T, every model; a dotted line at
    the equal wall-clock where the table reads the losses. Returns False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = analyse(records)
    ncols = min(3, len(rows))
    nrows = math.ceil(len(rows) / ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.8 * nrows), squeeze=False)
    for ax, row in zip(axes.flat, rows, strict=False):
        for name in ORDER:
            r = row["runs"].get(name)
            if r is None:
                continue
            seconds = [p[1] for p in r["curve"]]
            ax.plot(
                seconds,
                [p[2] for p in r["curve"]],
                marker="o",
                markersize=3,
                color=COLORS[name],
                label=f"{name} ({fmt_ms(r['ms_per_step'])} ms/step)",
            )
        if row["equal_seconds"]:
            ax.axvline(row["equal_seconds"], color="0.5", linestyle=":", linewidth=1)
        finals = [p[2] for r in row["runs"].values() for p in r["curve"][1:]]
        if finals:
            ax.set_ylim(min(finals) - 0.1, min(max(finals) + 0.3, 5.7))
        ax.set_title(f"T = {row['T']:,} (batch {row['batch']})", fontsize=10)
        ax.set_xlabel("training seconds")
        ax.set_ylabel("validation loss (nats/byte)")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize=7)
    for ax in list(axes.flat)[len(rows) :]:
        ax.axis("off")
    first = records[0]
    fig.suptitle(
        f"FLASH vs Transformer++ vs FLASH-Quad, equal tokens per step "
        f"({first['settings']['tokens_per_step']:,}), run {first['run']}\n"
        f"{first['device']}, {first['dtype']}, {first['threads']} thread(s), commit "
        f"{first['commit']}",
        fontsize=9,
    )
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def write_run_report(records, output_dir):
    """compare_long_context.md, .txt and .png of one run's records under output_dir."""
    md, txt, png = (os.path.join(output_dir, name) for name in FILES)
    with open(md, "w") as f:
        f.write(describe(records) + "\n\n" + markdown(records))
    with open(txt, "w") as f:
        f.write(text_summary(records) + "\n")
    plot(records, png)


START, END = "<!-- compare:start -->", "<!-- compare:end -->"


def readme_section(runs, figure_for, results_path):
    """The README's section between START and END: the method, then per committed run (GPU
    runs first) its description, tables, sentences and figure (figure_for(run) -> path
    relative to the README)."""
    order = sorted(runs, key=lambda recs: (recs[0]["device_type"] != "cuda", recs[0]["time"]))
    parts = [
        START,
        "## Long context: FLASH against Transformer++ and FLASH-Quad, quality against wall-clock",
        "",
        (
            f"Generated by `python examples/publish_compare.py` from `{results_path}`. The paper "
            "(Hua et al. 2022) reports Transformer++ quality at a fraction of the training time "
            "once the context is long (4.9x on Wiki-40B, 12.1x on PG-19; at 8K, 250 ms per step "
            "for FLASH against 1292 ms for Transformer+ on TPUs). Here "
            "`examples/compare_long_context.py` trains FLASH, a Transformer++ with as many "
            "parameters (softmax attention through SDPA) and FLASH-Quad (the same stack of GAU "
            'layers with full quadratic attention, `FLASHLM(layer="gau")`) on the byte corpus of '
            "`examples/train_lm.py`, at each T with the same tokens per step, the same seed and "
            "the same batches. The models of a T take turns in one process (a segment each, the "
            "order reversed every round), so the load of a shared machine reaches all alike; "
            "wall-clock is training seconds (steps only, evaluation excluded), and losses at equal "
            "wall-clock are read off the validation curves (linear between points). A model stops "
            "early only at the time cap (a multiple of the fastest model's time for N steps). "
            "Read the numbers as what they are: one seed, short training (a preset's N steps) of "
            "small models, the beginning of the curves the paper reports for long runs of large "
            "models; the noise of the initial draws is estimated under each run's tables, and a "
            "CPU weighs the operations differently from a GPU or a TPU."
        ),
        "",
    ]
    for records in order:
        first = records[0]
        name = os.path.basename(figure_for(first["run"]))
        parts += [
            f"### {first['device']} ({first['preset']} preset)",
            "",
            describe(records),
            "",
            markdown(records).rstrip(),
            "",
            (
                f"![validation loss against seconds]({figure_for(first['run'])}) "
                f"({name}: validation loss against training seconds, a panel per T; "
                "the dotted line is the equal wall-clock of the table)"
            ),
            "",
        ]
    parts += [
        (
            "Reproduce: `python examples/compare_long_context.py` (the CPU sweep; `--preset gpu` "
            "on a GPU: bf16, d = 512, 8 layers, T up to 8192, 110 s, also run last by "
            "`bench/gpu_runbook.sh`; `--steps`, `--seq-lens`, `--threads` and the rest override "
            "the preset) writes `examples_out/` (git-ignored); "
            "`python examples/publish_compare.py` copies its latest run into `examples/results/` "
            "and regenerates this section."
        ),
        END,
    ]
    return "\n".join(parts)
