"""Smoke tests of the benchmarks (bench/): the quick CPU mode runs, records each point's spread
and writes only to bench_out/ under the current directory (never the committed bench/results/
or README.md); the flop count matches a hand computation; noisy and non-monotonic points are
flagged and kept out of conclusions; a loaded machine is reported; the plots, README section,
target verdicts and the publish step come out of small fake results files; the varlen row
(packed documents vs the same documents padded) has the same documents in both layouts, the
same useful flops, its own table and flags, and stays out of the T series. No GPU needed; the
quick run (two lengths and a 512-token varlen row) takes ~17 s on 2 quiet cores."""

import hashlib
import json
import os
import subprocess
import sys

import pytest
import torch

from bench import plots, publish, readme, stability, varlen
from bench.flops import flash_flops, packed_flops, softmax_flops
from bench.impls import IMPLS, make_call, varlen_problems
from bench.results_io import load_results, select_run
from bench.tables import evaluate_targets, time_table

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_flash_flops_hand_computed():
    # T=4, S=2, E=3, C=2, causal: per token C*(S+E) + 4*S*E = 2*5 + 24 = 34 -> 4 tokens: 136
    assert flash_flops(4, 2, 3, 2, causal=True) == 136
    # non-causal: 2*C*(S+E) + 4*S*E = 20 + 24 = 44 per token -> 176
    assert flash_flops(4, 2, 3, 2, causal=False) == 176
    # backward is 2x, forward+backward 3x; batch multiplies
    assert flash_flops(4, 2, 3, 2, causal=True, mode="bwd") == 272
    assert flash_flops(4, 2, 3, 2, causal=True, mode="fwd+bwd", batch=2) == 816
    # quadratic only (no linear part): 10 per token
    assert flash_flops(4, 2, 3, 2, linear=False) == 40
    # a sequence shorter than a chunk is one chunk of T tokens: T=3, C=256 -> C_eff=3:
    # 3*(2+3) + 24 = 39 per token -> 117; chunk_size=None is the same (one chunk)
    assert flash_flops(3, 2, 3, 256) == 117
    assert flash_flops(3, 2, 3, None) == 117
    # the paper shape: 512 * (256*(128+1536) + 4*128*1536) = 512 * 1_212_416
    assert flash_flops(512, 128, 1536, 256) == 620_756_992
    # softmax: 4*T^2*d per head, half causal: 12 heads of 64, T=1024 -> 12*4*2^20*64/2
    assert softmax_flops(1024, 12, 64, causal=True) == 12 * 4 * 1024 * 1024 * 64 / 2
    with pytest.raises(ValueError, match="mode"):
        flash_flops(4, 2, 3, 2, mode="forward")
    # packed documents: each its own sequence, chunks restarting at its first token:
    # 3 tokens (C=2) 3 * (2*5 + 24) = 102, plus 4 tokens 136; an empty document costs nothing
    assert packed_flops([3, 4], 2, 3, 2) == 238
    assert packed_flops([3, 0, 4], 2, 3, 2, mode="fwd+bwd") == 3 * 238
    # a 1-token document is a chunk of 1 (1*5 + 24 = 29), not part of a 2-token chunk as in
    # one 5-token sequence (5 * 34 = 170)
    assert packed_flops([1, 4], 2, 3, 2) == 29 + 136 < flash_flops(5, 2, 3, 2) == 170


def test_varlen_documents_are_mixed_deterministic_and_off_chunk_multiples():
    for total in (256, 512, 4096, 16384, 5000):
        lengths = varlen.document_lengths(total, 256)
        assert lengths == varlen.document_lengths(total, 256)
        assert len(lengths) == varlen.NUM_DOCS == 8 and sum(lengths) == total
        assert min(lengths) >= 1 and all(n % 256 for n in lengths), lengths
    # the quick and full rows: some documents shorter than a chunk, some several chunks
    assert varlen.document_lengths(4096, 256) == [1229, 25, 778, 49, 1065, 152, 451, 347]
    for total in (4096, 16384):
        lengths = varlen.document_lengths(total, 256)
        assert sum(n < 256 for n in lengths) >= 2 and sum(n > 3 * 256 for n in lengths) >= 3
    # a length that would land on a multiple of C is moved off it, the total kept
    for C in (3, 7, 16, 49, 152):
        for total in range(256, 420):
            lengths = varlen.document_lengths(total, C)
            assert sum(lengths) == total and all(n % C for n in lengths), (C, total, lengths)
    with pytest.raises(ValueError, match="varlen-tokens 255 is too few"):
        varlen.document_lengths(255, 256)


def test_varlen_problems_hold_the_same_documents():
    """The padded batch is the packed row's documents, each followed by zeros: the torch path
    gives each document the same output in both layouts (float64, so exactly the same
    arithmetic up to rounding), and the padded row's output gradient is zero on the padding."""
    lengths = [5, 40, 3, 17]
    packed, padded = varlen_problems(lengths, S=8, E=12, C=16)
    assert (packed.batch, packed.T, padded.batch, padded.T) == (1, 65, 4, 40)
    assert (
        IMPLS["torch"].flops(packed, "bwd")
        == IMPLS["torch"].flops(padded, "bwd")
        == packed_flops(lengths, 8, 12, 16, mode="bwd")
    )
    cpu = torch.device("cpu")
    out_packed = make_call(IMPLS["torch"], packed, "fwd", cpu, torch.float64, packed.seed)()
    out_padded = make_call(IMPLS["torch"], padded, "fwd", cpu, torch.float64, padded.seed)()
    start = 0
    for row, length in enumerate(lengths):
        torch.testing.assert_close(out_padded[row, :length], out_packed[0, start : start + length])
        start += length
    grads = make_call(IMPLS["torch"], padded, "fwd+bwd", cpu, torch.float64, padded.seed)()
    assert grads[-1][0, 5:].abs().max() == 0 and grads[-1][0, :5].abs().max() > 0
    with pytest.raises(ValueError, match="does not run packed documents"):
        make_call(IMPLS["sdpa"], packed, "fwd", cpu, torch.float32)
    with pytest.raises(ValueError, match=r"\(batch, T\) = \(1, 65\)"):
        type(packed)(T=64, batch=1, varlen="packed", doc_lens=lengths)


def _committed_state():
    """Hashes of what the README's bench commands must not change: bench/results/ and README."""
    paths = [os.path.join(REPO, "README.md")]
    results = os.path.join(REPO, "bench", "results")
    paths += sorted(
        os.path.join(folder, name) for folder, _, names in os.walk(results) for name in names
    )
    state = {}
    for path in paths:
        with open(path, "rb") as f:
            state[path] = hashlib.sha256(f.read()).hexdigest()
    return state


@pytest.mark.slow
def test_quick_mode_runs_on_cpu_and_leaves_the_checkout_alone(tmp_path):
    """`python -m bench` (the README's main job) on a CPU, then `python -m bench.plots` and
    `python -m bench.readme`, all with their defaults from another directory: quick mode, each
    point's spread recorded, everything in ./bench_out, nothing committed touched."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    before = _committed_state()

    def run(*module_args, timeout=240):
        proc = subprocess.run(
            [sys.executable, "-m", *module_args],
            cwd=tmp_path,
            env=env,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        output = proc.stdout + proc.stderr
        assert proc.returncode == 0, output[-4000:]
        return output

    output = run(
        "bench",
        "--device",
        "cpu",
        "--threads",
        "1",
        "--no-progress",
        "--max-dense-gb",
        "0.2",
        "--seq-lens",
        "512",
        "4096",
        "--noncausal-seq-lens",
        "--varlen-tokens",
        "512",
    )
    assert "quick mode" in output and "forward + backward" in output, output[-4000:]
    assert "packed documents (varlen)" in output and "8 x 154, zero-padded" in output
    assert "bench_out" in output and "±" in output, output[-4000:]
    records = load_results(tmp_path / "bench_out" / "results.jsonl")
    ok = {(r["impl"], r["mode"], r["T"]) for r in records if r["status"] == "ok"}
    for impl in ("torch", "reference", "sdpa"):
        for mode in ("fwd", "bwd", "fwd+bwd"):
            assert (impl, mode, 512) in ok, (impl, mode)
    first = records[0]
    assert first["device_type"] == "cpu" and first["quick"] and first["commit"]
    assert first["torch"] and first["peak_tflops"] > 0 and first["threads"] == 1
    assert isinstance(first["machine_warnings"], list)
    for r in records:
        assert isinstance(r["flags"], list)
        if r["status"] == "ok":
            assert r["ms"] > 0 and r["tflops"] > 0 and r["frac_peak"] > 0
            assert 0 < r["ms_min"] <= r["ms"] <= r["ms_max"] and r["reps"] >= 2, r
            assert (r["mem_mb"] is not None) == (r["mode"] != "bwd"), r  # bwd: see fwd+bwd
    # the dense reference is skipped where its memory estimate exceeds --max-dense-gb
    assert any(
        r["impl"] == "reference"
        and r["status"] == "skipped"
        and "memory" in r["note"]
        and r["T"] == 4096
        for r in records
    )
    # the Triton kernels are never timed on a CPU without the interpreter being asked for
    assert all(r["status"] == "skipped" for r in records if r["impl"] == "triton")
    # the varlen row: the torch path, both layouts, every mode, the documents recorded, the
    # same useful flops for both layouts; no baseline without cu_seqlens runs it
    lengths = varlen.document_lengths(512, 256)
    rows = {
        (r["mode"], r["varlen"]): r
        for r in records
        if r["impl"] == "torch" and r["varlen"] is not None
    }
    assert sorted(rows) == sorted(
        (m, v) for m in ("fwd", "bwd", "fwd+bwd") for v in ("packed", "padded")
    )
    for (mode, layout), r in rows.items():
        assert r["status"] == "ok" and r["doc_lens"] == lengths and r["causal"], r
        assert (r["batch"], r["T"]) == ((1, 512) if layout == "packed" else (8, max(lengths)))
        assert r["flops"] == packed_flops(lengths, 128, 256, mode=mode)
    assert {r["impl"] for r in records if r["varlen"] is not None} == {
        "triton",
        "flash_attention",
        "torch",
    }
    assert all(r["varlen"] is None for r in records if r["impl"] in ("reference", "sdpa"))

    if _has_matplotlib():
        run("bench.plots", timeout=120)
        for name in plots.PLOT_NAMES:
            assert (tmp_path / "bench_out" / name).exists()
    run("bench.readme", timeout=120)
    section = (tmp_path / "bench_out" / readme.SECTION_NAME).read_text()
    assert first["run"] in section and "±" in section and "Stability:" in section
    assert "**Packed documents (varlen)**" in section and "| torch | forward | padded |" in section
    assert f"({', '.join(map(str, lengths))} tokens)" in section
    assert sorted(os.listdir(tmp_path)) == ["bench_out"]
    assert _committed_state() == before


def _has_matplotlib():
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        return False
    return True


def _fake_run(path, device_type="cuda", run="20260101T000000-1"):
    """A small results file: triton, torch, torch.compile and sdpa at T = 2K, 4K, 8K."""
    meta = dict(
        run=run,
        time="2026-01-01T00:00:00+00:00",
        device="NVIDIA FakeGPU 80GB",
        device_type=device_type,
        dtype="bfloat16",
        torch="2.11.0",
        triton="3.6.0",
        cuda="12.8",
        python="3.11",
        commit="abc123",
        quick=False,
        tf32=False,
        peak_tflops=500.0,
        peak_what="torch.matmul 8192x8192x8192 bfloat16",
    )
    # ms per (impl, mode): triton is 6x the eager path, 2.5x compile, 1.5x faster than SDPA
    # at 4K and 8K, and at 2K SDPA wins the forward (0.9x).
    speed = {"triton": 1.0, "torch": 6.0, "torch.compile": 2.5, "sdpa": 1.5}
    records = []
    for T in (2048, 4096, 8192):
        for impl, factor in speed.items():
            for mode, base in (("fwd", 1.0), ("bwd", 2.0), ("fwd+bwd", 3.0)):
                ms = base * T / 1024 * factor
                if impl == "sdpa" and T == 2048 and mode == "fwd":
                    ms = 0.9 * base * T / 1024
                flops = flash_flops(T, 128, 1536, 256, mode=mode, batch=65536 // T)
                tflops = flops / (ms * 1e-3) / 1e12
                records.append(
                    dict(
                        meta,
                        impl=impl,
                        mode=mode,
                        T=T,
                        batch=65536 // T,
                        S=128,
                        E=1536,
                        C=256,
                        causal=True,
                        rel_bias=False,
                        status="ok",
                        note="",
                        ms=ms,
                        ms_min=0.98 * ms,
                        ms_max=1.04 * ms,
                        reps=50,
                        flops=flops,
                        tflops=tflops,
                        frac_peak=tflops / 500.0,
                        mem_mb=100.0 * T / 1024,
                        machine_warnings=[],
                    )
                )
    records.append(
        dict(
            records[0],
            impl="fla",
            status="skipped",
            ms=None,
            tflops=None,
            frac_peak=None,
            mem_mb=None,
            note="skipped: fla-core not installed (pip install fla-core)",
        )
    )
    with open(path, "a") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return records


def _fake_varlen(path, run_records, noisy_packed_mode=None):
    """Append a varlen row to a fake run: triton, the 16K documents packed (ms 1, 2, 3 per
    mode) and padded (2.4x the time, 2x the memory), the packed point of `noisy_packed_mode`
    with a 50% spread."""
    lengths = varlen.document_lengths(16384, 256)
    records = []
    for layout, batch, T, factor in (("packed", 1, 16384, 1.0), ("padded", 8, max(lengths), 2.4)):
        for mode, base in (("fwd", 1.0), ("bwd", 2.0), ("fwd+bwd", 3.0)):
            ms = base * factor
            spread = 0.5 if (layout == "packed" and mode == noisy_packed_mode) else 0.04
            flops = packed_flops(lengths, 128, 1536, 256, mode=mode)
            tflops = flops / (ms * 1e-3) / 1e12
            records.append(
                dict(
                    run_records[0],
                    impl="triton",
                    mode=mode,
                    T=T,
                    batch=batch,
                    varlen=layout,
                    doc_lens=lengths,
                    status="ok",
                    note="",
                    ms=ms,
                    ms_min=(1 - spread / 2) * ms,
                    ms_max=(1 + spread / 2) * ms,
                    reps=50,
                    flops=flops,
                    tflops=tflops,
                    frac_peak=tflops / 500.0,
                    mem_mb=None if mode == "bwd" else 100.0 * factor / 1.2,
                )
            )
    with open(path, "a") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return records


def test_varlen_row_has_its_own_table_and_stays_out_of_the_series(tmp_path):
    series = _fake_run(tmp_path / "results.jsonl")
    rows = _fake_varlen(tmp_path / "results.jsonl", series, noisy_packed_mode="bwd")
    records = series + rows
    # the T tables, targets and growth lines are those of the run without the varlen row
    for mode in ("fwd", "bwd", "fwd+bwd"):
        assert time_table(records, mode) == time_table(series, mode)
    assert evaluate_targets(records) == evaluate_targets(series)
    assert stability.growth_conclusions(records) == stability.growth_conclusions(series)
    # the padded batch is slower for the same useful flops: no contradiction; noise is flagged
    flags = stability.point_flags(records)
    assert flags == {("triton", "bwd", True, 16384, 1, "packed"): ["noisy"]}
    assert stability.row_flags(records, "bwd") == {}
    assert stability.unstable_summary(records) == [
        "backward varlen packed (1 x 16384): noisy: triton"
    ]
    headers, table = varlen.varlen_table(records)
    assert headers[:4] == ["impl", "mode", "layout", "batch x T"] and headers[-1] == "flags"
    packed_fwd, padded_fwd = table[0], table[1]
    assert packed_fwd[:4] == ["triton", "forward", "packed", "1 x 16384, cu_seqlens"]
    assert padded_fwd[2:4] == ["padded", "8 x 4915, zero-padded"]
    column = {name: i for i, name in enumerate(headers)}
    assert packed_fwd[column["packed speedup"]] == "2.40x"
    assert packed_fwd[column["padded / packed MB"]] == "2.40x"
    # the same useful flops, so the padded row's useful TFLOP/s is 2.4x lower
    assert float(packed_fwd[column["useful TFLOP/s"]]) == pytest.approx(
        2.4 * float(padded_fwd[column["useful TFLOP/s"]]), rel=1e-2
    )
    assert table[2][column["flags"]] == "noisy" and table[2][column["peak MB"]] == "-"
    section = readme.section(records, str(tmp_path / "results.jsonl"), str(tmp_path / "R.md"))
    assert "**Packed documents (varlen)**" in section
    assert "The same 8 documents (4915, 98, 3113, 197, 4260, 606, 1802, 1393 tokens)" in section
    assert "| triton | forward | packed | 1 x 16384, cu_seqlens | 1.00 ±2% |" in section
    assert "65536 tokens per batch" in section  # the series' batches only
    assert varlen.varlen_table(series) is None and "varlen" not in readme.section(
        series, str(tmp_path / "results.jsonl"), str(tmp_path / "R.md")
    )


def test_targets_and_tables_from_fake_results(tmp_path):
    records = _fake_run(tmp_path / "results.jsonl")
    verdicts = {
        description: (verdict, detail)
        for description, verdict, detail in evaluate_targets(records, "triton")
    }
    assert verdicts["fwd+bwd >= 5x the eager torch path at T >= 4K"][0] == "PASS"
    assert verdicts["fwd+bwd >= 2x torch.compile at T >= 4K"][0] == "PASS"
    assert verdicts["fwd+bwd faster than SDPA from T = 2K"][0] == "PASS"
    verdict, detail = verdicts["forward faster than SDPA from T = 2K"]
    assert verdict == "FAIL" and "2K: 0.90x" in detail
    peak = verdicts["forward >= 40% of the measured bf16 matmul peak at T >= 4K"]
    assert peak[0] in ("PASS", "FAIL") and "4K:" in peak[1]
    headers, rows = time_table(records, "fwd+bwd")
    assert headers[:3] == ["T", "batch", "triton ms"] and "x torch" in headers
    assert rows[0][0] == "2048" and rows[0][headers.index("x torch")] == "6.00x"
    # the median with half the min-max range: (1.04 - 0.98) / 2 = 3%; no flags, no column
    assert rows[0][2] == "6.00 ±3%" and "flags" not in headers


def _series(impl, mode, points, batch=1, causal=True):
    """Records of one series: points = [(T, median, min, max)], flops proportional to T."""
    return [
        dict(
            run="r",
            impl=impl,
            mode=mode,
            T=T,
            batch=batch,
            causal=causal,
            status="ok",
            note="",
            ms=ms,
            ms_min=lo,
            ms_max=hi,
            flops=1e6 * T * batch,
        )
        for T, ms, lo, hi in points
    ]


def test_noise_is_flagged_and_kept_out_of_conclusions():
    steady = _series(
        "torch",
        "fwd",
        [
            (512, 1.0, 0.99, 1.02),
            (1024, 2.0, 1.98, 2.05),
            (2048, 4.1, 4.0, 4.2),
            (4096, 8.3, 8.2, 8.4),
        ],
    )
    # T=1024 measured slower than T=2048: a contradiction, whatever the spreads
    contradicted = _series(
        "sdpa",
        "fwd",
        [
            (512, 1.0, 0.99, 1.01),
            (1024, 5.0, 4.9, 5.1),
            (2048, 4.0, 3.9, 4.1),
            (4096, 16.0, 15.9, 16.1),
        ],
    )
    # the last point's runs range over 50% of its median: noisy, left out of the ratio
    noisy_end = _series(
        "reference",
        "fwd",
        [
            (512, 1.0, 0.99, 1.01),
            (1024, 4.0, 3.9, 4.1),
            (2048, 16.0, 15.8, 16.2),
            (4096, 50.0, 40.0, 65.0),
        ],
    )
    records = steady + contradicted + noisy_end
    flags = stability.point_flags(records)
    assert flags == {
        ("sdpa", "fwd", True, 1024, 1, None): ["non-monotonic"],
        ("sdpa", "fwd", True, 2048, 1, None): ["non-monotonic"],
        ("reference", "fwd", True, 4096, 1, None): ["noisy"],
    }
    lines = stability.growth_conclusions(records)
    assert any(line.startswith("torch: 8x the tokens cost 8.3x the forward time") for line in lines)
    (sdpa,) = (line for line in lines if line.startswith("sdpa"))
    assert "no conclusion" in sdpa and "1024, 2048" in sdpa and "x the tokens" not in sdpa
    (ref,) = (line for line in lines if line.startswith("reference"))
    assert "4x the tokens cost 16.0x" in ref and "left out, noisy: T = 4096" in ref
    headers, rows = time_table(records, "fwd")
    assert headers[-1] == "flags"
    by_T = {row[0]: row for row in rows}
    assert by_T["1024"][-1] == "non-monotonic: sdpa" and by_T["4096"][-1] == "noisy: reference"
    assert by_T["512"][-1] == ""
    assert stability.annotate(records)[5]["flags"] == ["non-monotonic"]
    # a point without the spread fields (an older results file) is never called noisy
    assert stability.spread(dict(steady[0], ms_min=None)) is None


def test_spread_uses_percentiles_when_there_are_enough_runs():
    import argparse

    import torch

    from bench.run import time_ms

    args = argparse.Namespace(device=torch.device("cpu"), repeats=12, max_point_seconds=3.0)
    timing = time_ms(lambda: sum(range(1000)), args)
    assert timing["reps"] == 12
    assert (
        timing["ms_min"] <= timing["ms_p10"] <= timing["ms"] <= timing["ms_p90"] <= timing["ms_max"]
    )
    assert (
        time_ms(
            lambda: None,
            argparse.Namespace(device=torch.device("cpu"), repeats=5, max_point_seconds=3.0),
        )["ms_p10"]
        is None
    )
    # one slow outlier among many runs widens min-max, not the 10th-90th percentile range
    r = dict(_series("triton", "fwd", [(512, 1.0, 0.95, 3.0)])[0], ms_p10=0.97, ms_p90=1.05)
    assert stability.spread(r) == pytest.approx(0.08)
    assert stability.point_flags([r]) == {}
    assert stability.point_flags([dict(r, ms_p10=None, ms_p90=None)]) != {}


def test_loaded_machine_is_reported():
    warnings = stability.machine_warnings(1.9, 3.0, 2, 2, 0.05, 0.116, "reference text")
    assert len(warnings) == 2
    assert "loaded" in warnings[0] and "1.9" in warnings[0]
    assert "0.05 TFLOP/s" in warnings[1] and "reference text" in warnings[1]
    # a quiet machine: its own threads at the end do not count as load
    assert stability.machine_warnings(0.1, 2.2, 2, 2, 0.2, 0.116, "x") == []
    earlier = [
        dict(device="CPU X (2 cores, 2 threads)", dtype="float32", tf32=False, peak_tflops=0.194)
    ]
    reference, what = stability.peak_reference(
        "CPU X (2 cores, 2 threads)", "float32", False, earlier
    )
    assert reference == pytest.approx(0.6 * 0.194) and "best earlier run" in what
    assert stability.peak_reference("CPU Y", "float32", False, earlier) == (None, "")
    reference, what = stability.peak_reference("NVIDIA H100 80GB HBM3", "bfloat16", False, [])
    assert reference == pytest.approx(0.5 * 989.4) and "datasheet" in what
    assert stability.datasheet_tflops("NVIDIA H100 PCIe", "bfloat16") == 756.0
    assert stability.datasheet_tflops("NVIDIA A100-SXM4-80GB", "float32", tf32=True) == 156.0


def test_log_tick_labels_read_plainly():
    labels = [plots.plain_number(x) for x in (512, 1024, 2048, 65536, 131072, 1048576)]
    assert labels == ["512", "1K", "2K", "64K", "128K", "1M"]
    assert [plots.plain_number(x) for x in (0.2, 1, 5, 20, 200, 2000)] == [
        "0.2",
        "1",
        "5",
        "20",
        "200",
        "2K",
    ]


def test_readme_defaults_to_bench_out(tmp_path, monkeypatch):
    """Without --readme the section goes beside the results file, never into a README."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "bench_out").mkdir()
    _fake_run(tmp_path / "bench_out" / "results.jsonl")
    assert readme.main([]) == 0
    section = (tmp_path / "bench_out" / readme.SECTION_NAME).read_text()
    assert section.startswith("## Benchmark") and "NVIDIA FakeGPU 80GB" in section
    assert "6.00 ±3%" in section and "none of the" in section
    assert sorted(os.listdir(tmp_path / "bench_out")) == [readme.SECTION_NAME, "results.jsonl"]


def test_publish_is_the_step_that_updates_committed_results(tmp_path, monkeypatch):
    committed = tmp_path / "committed"
    committed.mkdir()
    monkeypatch.setattr(publish, "COMMITTED_DIR", str(committed))
    drawn = []  # drawing is test_plots_from_fake_results' job (seconds each)
    monkeypatch.setattr(
        plots, "draw", lambda records, plot_dir: drawn.append((records[0]["run"], plot_dir)) or []
    )
    old_cpu = _fake_run(committed / "results.jsonl", device_type="cpu", run="20250101T000000-1")
    gpu = _fake_run(committed / "results.jsonl", run="20250601T000000-1")
    new_cpu_file = tmp_path / "bench_out" / "results.jsonl"
    new_cpu_file.parent.mkdir()
    new_cpu = _fake_run(new_cpu_file, device_type="cpu", run="20270101T000000-1")
    target = tmp_path / "README.md"
    target.write_text("# T\n" + readme.START + "\nold\n" + readme.END + "\n")
    argv = ["--results", str(new_cpu_file), "--latest", "--readme", str(target)]
    assert publish.main(argv) == 0
    runs = [r["run"] for r in load_results(committed / "results.jsonl")]
    # the older CPU run is replaced, the GPU run kept (and shown: a GPU run is preferred)
    assert runs == [gpu[0]["run"]] * len(gpu) + [new_cpu[0]["run"]] * len(new_cpu)
    assert old_cpu[0]["run"] not in runs and gpu[0]["run"] in target.read_text()
    assert drawn == [(gpu[0]["run"], str(committed))]
    assert publish.main(argv) == 0  # twice: nothing more
    assert len(load_results(committed / "results.jsonl")) == len(runs)
    # a run measured on a loaded machine needs --allow-loaded
    loaded = [
        dict(r, run="20280101T000000-1", machine_warnings=["the machine is loaded"])
        for r in new_cpu
    ]
    with open(new_cpu_file, "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in loaded)
    assert publish.main(argv) == 1
    assert len(load_results(committed / "results.jsonl")) == len(runs)
    assert publish.main(argv + ["--allow-loaded"]) == 0
    assert "20280101T000000-1" in {r["run"] for r in load_results(committed / "results.jsonl")}


def test_readme_section_from_fake_results(tmp_path):
    results = tmp_path / "results.jsonl"
    _fake_run(results, device_type="cpu", run="20250101T000000-1")  # an older CPU run
    _fake_run(results)  # the GPU run
    _fake_run(results, device_type="cpu", run="20270101T000000-1")  # a later CPU smoke run
    target = tmp_path / "README.md"
    before, after = "# Title\n\nIntro.\n\n", "\n\n## Layout\n\nrest\n"
    target.write_text(before + readme.START + "\nold\n" + readme.END + after)
    assert readme.main(["--results", str(results), "--readme", str(target)]) == 0
    text = target.read_text()
    assert text.startswith(before + readme.START) and text.endswith(readme.END + after)
    region = text[text.index(readme.START) : text.index(readme.END)]
    assert "old" not in region and "NVIDIA FakeGPU 80GB" in region  # the GPU run is preferred
    assert "20260101T000000-1" in region
    assert "| T | batch | triton ms |" in region and "**PASS**" in region and "**FAIL**" in region
    assert "- `fla`: fla-core not installed" in region
    # --latest takes the CPU smoke run instead; running twice changes nothing more
    assert readme.main(["--results", str(results), "--readme", str(target), "--latest"]) == 0
    assert "20270101T000000-1" in target.read_text()
    assert len(select_run(load_results(results), latest=True)) == len(
        select_run(load_results(results))
    )


def test_plots_from_fake_results(tmp_path):
    pytest.importorskip("matplotlib")
    results = tmp_path / "results.jsonl"
    _fake_varlen(results, _fake_run(results))  # the varlen row is left out
    assert plots.main(["--results", str(results), "--plot-dir", str(tmp_path / "png")]) == 0
    for name in plots.PLOT_NAMES:
        path = tmp_path / "png" / name
        assert path.exists() and path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plots_without_matplotlib(tmp_path, monkeypatch, capsys):
    results = tmp_path / "results.jsonl"
    _fake_run(results)
    for name in list(sys.modules):
        if name == "matplotlib" or name.startswith("matplotlib."):
            monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib fails
    assert plots.main(["--results", str(results), "--plot-dir", str(tmp_path / "png")]) == 0
    assert "matplotlib is not installed" in capsys.readouterr().out
    assert not (tmp_path / "png" / plots.PLOT_NAMES[0]).exists()
