"""When a benchmark number is noise: the spread of each point, rows that contradict the work
they do, a loaded machine, and conclusions drawn only from what is left.

- Spread of a point: the range of its timed runs over their median ms: the 10th to 90th
  percentile (ms_p10, ms_p90) when the point had enough runs to have them (a GPU's hundreds,
  where the single slowest run is often an outlier), else the fastest to the slowest run
  (ms_min, ms_max: a CPU's few runs). A point whose spread exceeds NOISY_SPREAD is "noisy".
- Non-monotonic: along one series (implementation, mode, causal or not, by increasing T), a point
  that does at least the work of the previous one (flops) but is faster by more than
  MONOTONIC_SLACK. Both points of such a pair are flagged: one of the two is wrong. The varlen
  row's points (bench/varlen.py: packed or padded documents) are each a series of their own:
  the padded batch does the packed row's useful flops with more work, so being slower is no
  contradiction; they can only be noisy.
- Loaded machine: other processes' load average above LOADED_FRACTION of the cores, or the
  matmul peak measured in the run below PEAK_FRACTION of a reference for the machine (the
  best earlier run of the same device and dtype in the committed results, and for known GPUs
  half the datasheet's dense peak).
- Growth conclusions ("8x the tokens cost 3.0x the time") come only from series without a
  non-monotonic pair, from their first and last points that are not noisy.
"""

import os

from .flops import MODE_NAMES

NOISY_SPREAD = 0.20
MONOTONIC_SLACK = 0.10
LOADED_FRACTION = 0.30
PEAK_FRACTION = 0.60
DATASHEET_FRACTION = 0.50

# Dense (no sparsity) datasheet peaks in TFLOP/s by device-name fragment, most specific first:
# (bf16/fp16 tensor cores, fp32 with TF32, fp32 without). A large matmul reaches 60-80% of these.
DATASHEET_TFLOPS = (
    ("H100 PCIe", (756.0, 378.0, 51.2)),
    ("H100 NVL", (835.0, 418.0, 60.0)),
    ("H200 NVL", (835.0, 418.0, 60.0)),
    ("H100", (989.4, 494.7, 66.9)),
    ("H200", (989.4, 494.7, 66.9)),
    ("A100", (312.0, 156.0, 19.5)),
    ("L40S", (362.0, 183.0, 91.6)),
    ("L4", (121.0, 60.0, 30.3)),
    ("A10", (125.0, 62.5, 31.2)),
)


def point_key(r):
    return (r["impl"], r["mode"], bool(r["causal"]), r["T"], r["batch"], r.get("varlen"))


def is_varlen(r):
    """A point of the varlen row (packed or padded documents), not of a T series."""
    return r.get("varlen") is not None


def _ok(r):
    return r.get("status") == "ok" and r.get("ms") is not None


def spread_range(r):
    """(low, high) ms of the point's spread: (p10, p90) if recorded, else (min, max); None
    without the fields (results older than them)."""
    if not _ok(r):
        return None
    for low, high in (("ms_p10", "ms_p90"), ("ms_min", "ms_max")):
        if r.get(low) is not None and r.get(high) is not None:
            return r[low], r[high]
    return None


def spread(r):
    """(high - low) / median of the point's spread range (see spread_range), or None."""
    bounds = spread_range(r)
    return None if bounds is None else (bounds[1] - bounds[0]) / r["ms"]


def point_flags(records):
    """{point_key: sorted list of "noisy" / "non-monotonic"} for the flagged points only."""
    flags = {}
    series = {}
    for r in records:
        if _ok(r):
            series.setdefault(
                (r["impl"], r["mode"], bool(r["causal"]), r.get("varlen")), []
            ).append(r)
            s = spread(r)
            if s is not None and s > NOISY_SPREAD:
                flags.setdefault(point_key(r), set()).add("noisy")
    for points in series.values():
        points.sort(key=lambda r: (r["T"], r["batch"]))
        for before, after in zip(points, points[1:]):
            if (after.get("flops") or 0) >= (before.get("flops") or 0) and after["ms"] < (
                1 - MONOTONIC_SLACK
            ) * before["ms"]:
                flags.setdefault(point_key(before), set()).add("non-monotonic")
                flags.setdefault(point_key(after), set()).add("non-monotonic")
    return {key: sorted(value) for key, value in flags.items()}


def annotate(records):
    """Store each point's flags in its record (field "flags", a list, empty when stable)."""
    flags = point_flags(records)
    for r in records:
        r["flags"] = flags.get(point_key(r), [])
    return records


def row_flags(records, mode, flags=None):
    """{(noncausal, T, batch): "noisy: sdpa; non-monotonic: torch"} for the rows of a table
    (the T series; the varlen row's flags are in its own table)."""
    flags = point_flags(records) if flags is None else flags
    rows = {}
    for (impl, point_mode, causal, T, batch, varlen), kinds in flags.items():
        if point_mode == mode and varlen is None:
            row = rows.setdefault((not causal, T, batch), {})
            for kind in kinds:
                row.setdefault(kind, []).append(impl)
    return {
        key: "; ".join(
            f"{kind}: {', '.join(sorted(impls))}" for kind, impls in sorted(value.items())
        )
        for key, value in rows.items()
    }


def growth_conclusions(records, impls=("triton", "flash_attention", "torch", "reference", "sdpa")):
    """Lines on how the forward time grows with T (batch-1 causal series), from stable points
    only; a series with a non-monotonic pair gives a line saying so instead of a ratio."""
    flags = point_flags(records)
    lines = []
    for name in impls:
        points = sorted(
            (
                r
                for r in records
                if r["impl"] == name
                and r["mode"] == "fwd"
                and r["causal"]
                and _ok(r)
                and not is_varlen(r)
            ),
            key=lambda r: r["T"],
        )
        if len(points) < 2 or len({r["batch"] for r in points}) > 1:
            continue
        contradicted = [r["T"] for r in points if "non-monotonic" in flags.get(point_key(r), ())]
        if contradicted:
            lines.append(
                f"{name}: no conclusion on growth: the forward times at T = "
                f"{', '.join(map(str, contradicted))} contradict each other (a longer "
                f"sequence measured faster): noise, rerun on a quiet machine"
            )
            continue
        stable = [r for r in points if "noisy" not in flags.get(point_key(r), ())]
        noisy = [r["T"] for r in points if r not in stable]
        left_out = f" (left out, noisy: T = {', '.join(map(str, noisy))})" if noisy else ""
        if len(stable) < 2:
            lines.append(f"{name}: no conclusion on growth: fewer than two stable points{left_out}")
            continue
        first, last = stable[0], stable[-1]
        ratio = last["T"] / first["T"]
        lines.append(
            f"{name}: {ratio:g}x the tokens cost {last['ms'] / first['ms']:.1f}x the "
            f"forward time (linear: {ratio:g}x, quadratic: {ratio**2:g}x; T = "
            f"{first['T']} to {last['T']}){left_out}"
        )
    return lines


def unstable_summary(records):
    """One line per mode naming its flagged points, or [] when every point is stable."""
    lines = []
    flags = point_flags(records)
    for mode in MODE_NAMES:
        rows = row_flags(records, mode, flags)
        for (noncausal, T, batch), text in sorted(rows.items()):
            label = f"T={T}{' non-causal' if noncausal else ''}"
            lines.append(f"{MODE_NAMES[mode]} {label}: {text}")
        varlen_points = sorted(
            (key, kinds) for key, kinds in flags.items() if key[1] == mode and key[5] is not None
        )
        for (impl, _, _, T, batch, varlen), kinds in varlen_points:
            lines.append(
                f"{MODE_NAMES[mode]} varlen {varlen} ({batch} x {T}): {', '.join(kinds)}: {impl}"
            )
    return lines


# ---------------------------------------------------------------------------------------------
# the machine
# ---------------------------------------------------------------------------------------------
def load_average():
    """The 1-minute load average, or None where the platform has none."""
    try:
        return os.getloadavg()[0]
    except (AttributeError, OSError):
        return None


def datasheet_tflops(device, dtype, tf32=False):
    """The datasheet's dense peak of a known GPU for matmuls in `dtype`, else None."""
    for fragment, (half, tf32_peak, fp32) in DATASHEET_TFLOPS:
        if fragment in device:
            if dtype in ("bfloat16", "float16"):
                return half
            if dtype == "float32":
                return tf32_peak if tf32 else fp32
            return None
    return None


def peak_reference(device, dtype, tf32, earlier_records):
    """(TFLOP/s, what) the run's measured peak should reach on this machine, or (None, "")."""
    candidates = []
    best = max(
        (
            r["peak_tflops"]
            for r in earlier_records
            if r.get("device") == device
            and r.get("dtype") == dtype
            and bool(r.get("tf32")) == bool(tf32)
            and r.get("peak_tflops")
        ),
        default=None,
    )
    if best:
        candidates.append(
            (
                PEAK_FRACTION * best,
                f"{PEAK_FRACTION:.0%} of the best earlier run on this machine "
                f"({best:.3g} TFLOP/s, bench/results)",
            )
        )
    sheet = datasheet_tflops(device, dtype, tf32)
    if sheet:
        candidates.append(
            (
                DATASHEET_FRACTION * sheet,
                f"{DATASHEET_FRACTION:.0%} of the datasheet's {sheet:g} TFLOP/s",
            )
        )
    if not candidates:
        return None, ""
    return max(candidates)


def machine_warnings(load_start, load_end, own_threads, cores, peak, reference, reference_what):
    """Lines saying why this run's timings may be unreliable ([] when nothing says so).

    The load average at the end counts this run's own threads: they are subtracted."""
    lines = []
    cores = cores or 1
    measured = []
    if load_start is not None:
        measured.append((load_start, f"{load_start:.1f} at the start"))
    if load_end is not None:
        measured.append(
            (
                load_end - own_threads,
                f"{load_end:.1f} at the end, {own_threads} of it this run's threads",
            )
        )
    if measured and max(value for value, _ in measured) > LOADED_FRACTION * cores:
        lines.append(
            f"the machine is loaded: other processes' load average reached "
            f"{max(value for value, _ in measured):.1f} on {cores} cores "
            f"({'; '.join(text for _, text in measured)})"
        )
    if reference and peak < reference:
        lines.append(
            f"the measured matmul peak, {peak:.3g} TFLOP/s, is below {reference:.3g} "
            f"TFLOP/s ({reference_what})"
        )
    return lines
