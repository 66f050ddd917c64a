"""The varlen row: documents of mixed lengths packed into one row with `cu_seqlens`, against
the same documents zero-padded to a batch (batch = the number of documents, T = the longest).

The document lengths are fixed fractions of the total (DOC_FRACTIONS: some shorter than a
chunk, some several chunks; a length that is a multiple of C is moved by a token, so that
every document ends in a partial chunk). Both layouts are credited with the same useful flops,
the documents' own (`packed_flops`: `flash_flops` per document): the padded batch's extra work
on padding shows as a lower useful TFLOP/s, its extra memory as a higher peak.

Records of this row carry `varlen` ("packed" or "padded") and `doc_lens`; every other record
has varlen None. The main tables, growth conclusions, targets and plots leave these records
out (they are not a point of a T series); `varlen_table` shows them, one row per layout.
"""

from .flops import MODE_NAMES, MODES
from .impls import PACKED, PADDED
from .stability import is_varlen, point_flags, point_key
from .tables import _cell, _ms_spread, _ok, primary_impl

# Share of the total of each of the 8 documents (the last takes what is left, ~0.085). With
# C = 256: the quick row's 4096 tokens are 1229, 25, 778, 49, 1065, 152, 451 and 347 (three
# documents shorter than a chunk, the longest 4.8 chunks); the full row's 16384 are 4915, 98,
# 3113, 197, 4260, 606, 1802 and 1393. Padding to the longest gives 2.4x the tokens.
DOC_FRACTIONS = (0.30, 0.006, 0.19, 0.012, 0.26, 0.037, 0.11)
NUM_DOCS = len(DOC_FRACTIONS) + 1

VARLEN_NOTE = (
    "The same {n} documents ({lengths} tokens) as one row of {total} tokens with `cu_seqlens` "
    "(chunks restart at each document, nothing crosses a boundary) and zero-padded to a batch "
    "of {n} x {longest}; both are credited with the documents' useful flops (`bench/flops.py` "
    "per document), so the padded batch's wasted work shows as lower useful TFLOP/s; `packed "
    "speedup` is padded ms / packed ms."
)
MIN_TOTAL = 256  # fewer tokens cannot give 8 documents of these proportions


def document_lengths(total, chunk_size):
    """NUM_DOCS deterministic lengths summing to `total` (at least MIN_TOTAL): DOC_FRACTIONS of
    it (at least one token each) and the last document the rest, none a multiple of
    chunk_size when it is above 2 (with C = 2, 8 odd lengths cannot make an odd total)."""
    if total < MIN_TOTAL:
        raise ValueError(
            f"--varlen-tokens {total} is too few for {NUM_DOCS} documents of mixed "
            f"lengths: use at least {MIN_TOTAL}"
        )
    C = chunk_size

    def off_chunks(n):
        return C <= 2 or n % C != 0

    lengths = [max(1, round(fraction * total)) for fraction in DOC_FRACTIONS]
    lengths = [n if off_chunks(n) else n + 1 for n in lengths]
    lengths.append(total - sum(lengths))
    if not off_chunks(lengths[-1]):
        # move one token between the last document and one that stays off a multiple of C
        for i, n in enumerate(lengths[:-1]):
            if n > 1 and off_chunks(n - 1):
                lengths[i], lengths[-1] = n - 1, lengths[-1] + 1
                break
            if off_chunks(n + 1):
                lengths[i], lengths[-1] = n + 1, lengths[-1] - 1
                break
    return lengths


def varlen_records(records):
    return [r for r in records if is_varlen(r)]


def _impls(records):
    present = {r["impl"] for r in records if is_varlen(r) and r.get("status") != "skipped"}
    primary = primary_impl(records)
    return sorted(present, key=lambda name: (name != primary, name))


def describe(records):
    """The one-line explanation of the row, from its records (None without any)."""
    rows = varlen_records(records)
    if not rows:
        return None
    lengths = rows[0]["doc_lens"]
    return VARLEN_NOTE.format(
        n=len(lengths),
        lengths=", ".join(map(str, lengths)),
        total=sum(lengths),
        longest=max(lengths),
    )


def _shape(r):
    if r["varlen"] == PACKED:
        return f"1 x {r['T']}, cu_seqlens"
    return f"{r['batch']} x {r['T']}, zero-padded"


def varlen_table(records, modes=MODES):
    """(headers, rows) of the varlen records, or None without any: per implementation and mode,
    the packed and the padded row: ms (median ±spread), useful TFLOP/s, % of the measured
    peak, peak MB (not for the backward alone), and on the packed row the speedup of packing
    (padded ms / packed ms) and the memory it saves (padded MB / packed MB); a flags column
    when a point is flagged noisy."""
    rows_of = varlen_records(records)
    impls = _impls(records)
    if not impls:
        return None
    index = {(r["impl"], r["mode"], r["varlen"]): r for r in rows_of}
    flags = point_flags(records)
    headers = [
        "impl",
        "mode",
        "layout",
        "batch x T",
        "ms",
        "useful TFLOP/s",
        "% of peak",
        "peak MB",
        "packed speedup",
        "padded / packed MB",
    ]
    rows, row_flags = [], []
    for name in impls:
        for mode in modes:
            packed, padded = index.get((name, mode, PACKED)), index.get((name, mode, PADDED))
            for layout, r in ((PACKED, packed), (PADDED, padded)):
                if r is None:
                    continue
                row = [
                    name,
                    MODE_NAMES[mode],
                    layout,
                    _shape(r),
                    _ms_spread(r) if _ok(r) else _cell(r, "ms", str),
                    _cell(r, "tflops", lambda x: f"{x:#.3g}"),
                    _cell(r, "frac_peak", lambda x: f"{100 * x:.1f}%"),
                    "-" if mode == "bwd" else _cell(r, "mem_mb", lambda x: f"{x:.0f}"),
                ]
                both = layout == PACKED and padded is not None and _ok(r) and _ok(padded)
                row.append(f"{padded['ms'] / r['ms']:.2f}x" if both else "")
                row.append(
                    f"{padded['mem_mb'] / r['mem_mb']:.2f}x"
                    if both and r.get("mem_mb") and padded.get("mem_mb")
                    else ""
                )
                rows.append(row)
                row_flags.append(", ".join(flags.get(point_key(r), [])))
    if any(row_flags):
        headers.append("flags")
        for row, text in zip(rows, row_flags):
            row.append(text)
    return headers, rows
