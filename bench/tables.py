"""Tables and performance targets from result records (shared by the runner and the README).

A time cell reads "median ±h%": h is half the spread range relative to the median (the
fastest to the slowest timed run, or the 10th to 90th percentile with 10 runs or more; see
bench/stability.py). Old records without that range show the median alone. A
"flags" column names the implementations whose point in that row is noisy or non-monotonic
(bench/stability.py); it appears only when some row is flagged. The varlen row's records
(packed or padded documents) are left out of these tables and of the targets: bench/varlen.py
has their table.
"""

from .flops import MODE_NAMES, MODES
from .stability import NOISY_SPREAD, is_varlen, point_flags, row_flags, spread

SPREAD_NOTE = (
    f"Times: median ms ±half the range of the timed runs relative to the median "
    f"(fastest to slowest; 10th to 90th percentile with 10 runs or more); a point "
    f"whose range exceeds {NOISY_SPREAD:.0%} of its median is flagged noisy, and a "
    f"point that does more work than the one before it yet measures faster is "
    f"flagged non-monotonic (both of the pair)."
)

IMPL_ORDER = ("triton", "flash_attention", "torch", "torch.compile", "reference", "sdpa", "fla")
OURS = ("triton", "flash_attention")


def _ok(r):
    return r.get("status") == "ok" and r.get("ms") is not None


def primary_impl(records):
    """The implementation the tables are about: the Triton kernels if they ran, else the
    fused op, else the chunked torch path (a CPU run)."""
    for name in ("triton", "flash_attention", "torch"):
        if any(r["impl"] == name and _ok(r) for r in records):
            return name
    return None


def _impls(records, mode):
    present = {
        r["impl"]
        for r in records
        if r["mode"] == mode and r.get("status") != "skipped" and not is_varlen(r)
    }
    return [name for name in IMPL_ORDER if name in present] + sorted(present - set(IMPL_ORDER))


def _rows(records, mode):
    keys = {
        (not r["causal"], r["T"], r["batch"])
        for r in records
        if r["mode"] == mode and not is_varlen(r)
    }
    return sorted(keys)


def _index(records, mode):
    return {
        (r["impl"], not r["causal"], r["T"], r["batch"]): r
        for r in records
        if r["mode"] == mode and not is_varlen(r)
    }


def _cell(r, field, fmt):
    if r is None:
        return "-"
    if not _ok(r):
        note = (r.get("note") or "").lower()
        if r.get("status") == "skipped":
            return "mem" if "memory" in note else ("time" if "budget" in note else "-")
        return "OOM" if "out of memory" in note else "err"
    value = r.get(field)
    return "-" if value is None else fmt(value)


def _ms(value):
    return f"{value:#.3g}" if value < 100 else f"{value:.0f}"


def _ms_spread(r):
    """ "1.42 ±3%" (median and half the min-max range), or the median alone without a range."""
    text = _ms(r["ms"])
    relative = spread(r)
    return text if relative is None else f"{text} ±{50 * relative:.0f}%"


def _label_T(T, noncausal):
    return f"{T} non-causal" if noncausal else str(T)


def time_table(records, mode):
    """(headers, rows): ms of every implementation (median and spread), TFLOP/s and fraction
    of the measured matmul peak of the primary one, its speedup over each other implementation
    (>1: faster, from the medians), and the row's flags when any row has some."""
    impls = _impls(records, mode)
    if not impls:
        return None
    primary = primary_impl(records)
    index = _index(records, mode)
    others = [name for name in impls if name != primary]
    headers = ["T", "batch"] + [f"{name} ms" for name in impls]
    if primary in impls:
        headers += [f"{primary} TFLOP/s", "% of peak"] + [f"x {name}" for name in others]
    rows = []
    for noncausal, T, batch in _rows(records, mode):
        row = [_label_T(T, noncausal), str(batch)]
        row += [_time_cell(index.get((name, noncausal, T, batch))) for name in impls]
        if primary in impls:
            ours = index.get((primary, noncausal, T, batch))
            row.append(_cell(ours, "tflops", lambda x: f"{x:#.3g}"))
            row.append(_cell(ours, "frac_peak", lambda x: f"{100 * x:.1f}%"))
            for name in others:
                other = index.get((name, noncausal, T, batch))
                if ours is not None and other is not None and _ok(ours) and _ok(other):
                    row.append(f"{other['ms'] / ours['ms']:.2f}x")
                else:
                    row.append("-")
        rows.append(row)
    flags = row_flags(records, mode, point_flags(records))
    if flags:
        headers.append("flags")
        for row, key in zip(rows, _rows(records, mode)):
            row.append(flags.get(key, ""))
    return headers, rows


def _time_cell(r):
    if r is None or not _ok(r):
        return _cell(r, "ms", _ms)
    return _ms_spread(r)


def memory_table(records, mode):
    """(headers, rows): peak memory in MB of every implementation (inputs included)."""
    impls = _impls(records, mode)
    if not impls:
        return None
    index = _index(records, mode)
    headers = ["T", "batch"] + [f"{name} MB" for name in impls]
    rows = []
    for noncausal, T, batch in _rows(records, mode):
        rows.append(
            [_label_T(T, noncausal), str(batch)]
            + [
                _cell(index.get((name, noncausal, T, batch)), "mem_mb", lambda x: f"{x:.0f}")
                for name in impls
            ]
        )
    return headers, rows


def render_text(table):
    headers, rows = table
    widths = [
        max(len(headers[i]), *(len(row[i]) for row in rows)) if rows else len(headers[i])
        for i in range(len(headers))
    ]
    line = " | ".join(h.rjust(w) for h, w in zip(headers, widths))
    out = [line, "-" * len(line)]
    out += [" | ".join(c.rjust(w) for c, w in zip(row, widths)) for row in rows]
    return "\n".join(out)


def render_markdown(table):
    headers, rows = table
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---:" for _ in headers) + "|"]
    out += ["| " + " | ".join(row) + " |" for row in rows]
    return "\n".join(out)


def modes_present(records):
    return [mode for mode in MODES if any(r["mode"] == mode for r in records)]


def mode_title(mode):
    return {
        "fwd": "forward (inference, no autograd)",
        "bwd": "backward (gradients of all inputs)",
        "fwd+bwd": "forward + backward",
    }.get(mode, MODE_NAMES.get(mode, mode))


# ---------------------------------------------------------------------------------------------
# Targets (issue 5), to be measured on a GPU: evaluated on the causal rows of a CUDA run.
# ---------------------------------------------------------------------------------------------
TARGETS = (
    # (description, mode, baseline or None for the peak fraction, min T, threshold)
    ("fwd+bwd >= 5x the eager torch path at T >= 4K", "fwd+bwd", "torch", 4096, 5.0),
    ("fwd+bwd >= 2x torch.compile at T >= 4K", "fwd+bwd", "torch.compile", 4096, 2.0),
    ("fwd+bwd faster than SDPA from T = 2K", "fwd+bwd", "sdpa", 2048, 1.0),
    ("forward faster than SDPA from T = 2K", "fwd", "sdpa", 2048, 1.0),
    ("forward >= 40% of the measured bf16 matmul peak at T >= 4K", "fwd", None, 4096, 0.40),
)


def _short_T(T):
    return f"{T // 1024}K" if T % 1024 == 0 else str(T)


def evaluate_targets(records, ours="triton"):
    """[(description, verdict, detail)]: verdict "PASS", "FAIL" or "n/a" (nothing to compare).

    Speed targets compare `ours` with the baseline at every causal T >= the minimum where both
    ran (PASS needs all of them: a speedup strictly above 1 for "faster", at least the factor
    otherwise); the peak target needs every such forward at >= the fraction."""
    results = []
    for description, mode, baseline, min_T, threshold in TARGETS:
        index = _index(records, mode)
        points = []
        for noncausal, T, batch in _rows(records, mode):
            if noncausal or T < min_T:
                continue
            mine = index.get((ours, noncausal, T, batch))
            if mine is None or not _ok(mine):
                continue
            if baseline is None:
                if mine.get("frac_peak") is not None:
                    points.append((T, mine["frac_peak"]))
                continue
            other = index.get((baseline, noncausal, T, batch))
            if other is not None and _ok(other):
                points.append((T, other["ms"] / mine["ms"]))
        if not points:
            results.append(
                (description, "n/a", f"no {ours} and {baseline or 'peak'} pair measured")
            )
            continue
        if baseline is None:
            passed = all(value >= threshold for _, value in points)
            detail = ", ".join(f"{_short_T(T)}: {100 * value:.1f}%" for T, value in points)
        else:
            passed = all(
                (value > threshold) if threshold == 1.0 else (value >= threshold)
                for _, value in points
            )
            detail = ", ".join(f"{_short_T(T)}: {value:.2f}x" for T, value in points)
        results.append((description, "PASS" if passed else "FAIL", detail))
    return results


def render_targets(results, ours="triton"):
    lines = [f"Targets ({ours}; measured, not assumed):"]
    for description, verdict, detail in results:
        lines.append(f"  [{verdict:4}] {description}: {detail}")
    return "\n".join(lines)
