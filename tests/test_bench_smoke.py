"""Smoke tests of the benchmarks (bench/): the quick CPU mode runs, records each point's spread
and writes only to bench_out/ under the current directory (never the committed bench/results/
or README.md); the flop count matches a hand computation; noisy and non-monotonic points are
flagged and kept out of conclusions; a loaded machine is reported; the plots, README section,
target verdicts and the publish step come out of small fake results files. No GPU needed; the
quick run (two lengths) takes ~15 s on 2 quiet cores."""
import hashlib
import json
import os
import subprocess
import sys

import pytest

from bench import plots, publish, readme, stability
from bench.flops import flash_flops, softmax_flops
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


def _committed_state():
    """Hashes of what the README's bench commands must not change: bench/results/ and README."""
    paths = [os.path.join(REPO, "README.md")]
    results = os.path.join(REPO, "bench", "results")
    paths += sorted(os.path.join(results, name) for name in os.listdir(results))
    state = {}
    for path in paths:
        with open(path, "rb") as f:
            state[path] = hashlib.sha256(f.read()).hexdigest()
    return state


def test_quick_mode_runs_on_cpu_and_leaves_the_checkout_alone(tmp_path):
    """`python -m bench` (the README's main job) on a CPU, then `python -m bench.plots` and
    `python -m bench.readme`, all with their defaults from another directory: quick mode, each
    point's spread recorded, everything in ./bench_out, nothing committed touched."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["PYTHONPATH"] = REPO + os.pathsep + env.get("PYTHONPATH", "")
    before = _committed_state()

    def run(*module_args, timeout=240):
        proc = subprocess.run([sys.executable, "-m", *module_args], cwd=tmp_path, env=env,
                              capture_output=True, text=True, timeout=timeout)
        output = proc.stdout + proc.stderr
        assert proc.returncode == 0, output[-4000:]
        return output

    output = run("bench", "--device", "cpu", "--threads", "1", "--no-progress",
                 "--max-dense-gb", "0.2", "--seq-lens", "512", "4096", "--noncausal-seq-lens")
    assert "quick mode" in output and "forward + backward" in output, output[-4000:]
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
            assert (r["mem_mb"] is not None) == (r["mode"] != "bwd"), r   # bwd: see fwd+bwd
    # the dense reference is skipped where its memory estimate exceeds --max-dense-gb
    assert any(r["impl"] == "reference" and r["status"] == "skipped" and "memory" in r["note"]
               and r["T"] == 4096 for r in records)
    # the Triton kernels are never timed on a CPU without the interpreter being asked for
    assert all(r["status"] == "skipped" for r in records if r["impl"] == "triton")

    if _has_matplotlib():
        run("bench.plots", timeout=120)
        for name in plots.PLOT_NAMES:
            assert (tmp_path / "bench_out" / name).exists()
    run("bench.readme", timeout=120)
    section = (tmp_path / "bench_out" / readme.SECTION_NAME).read_text()
    assert first["run"] in section and "±" in section and "Stability:" in section
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
    meta = dict(run=run, time="2026-01-01T00:00:00+00:00", device="NVIDIA FakeGPU 80GB",
                device_type=device_type, dtype="bfloat16", torch="2.11.0", triton="3.6.0",
                cuda="12.8", python="3.11", commit="abc123", quick=False, tf32=False,
                peak_tflops=500.0, peak_what="torch.matmul 8192x8192x8192 bfloat16")
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
                records.append(dict(meta, impl=impl, mode=mode, T=T, batch=65536 // T, S=128,
                                    E=1536, C=256, causal=True, rel_bias=False, status="ok",
                                    note="", ms=ms, ms_min=0.98 * ms, ms_max=1.04 * ms, reps=50,
                                    flops=flops, tflops=tflops, frac_peak=tflops / 500.0,
                                    mem_mb=100.0 * T / 1024, machine_warnings=[]))
    records.append(dict(records[0], impl="fla", status="skipped", ms=None, tflops=None,
                        frac_peak=None, mem_mb=None,
                        note="skipped: fla-core not installed (pip install fla-core)"))
    with open(path, "a") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return records


def test_targets_and_tables_from_fake_results(tmp_path):
    records = _fake_run(tmp_path / "results.jsonl")
    verdicts = {description: (verdict, detail)
                for description, verdict, detail in evaluate_targets(records, "triton")}
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
    return [dict(run="r", impl=impl, mode=mode, T=T, batch=batch, causal=causal, status="ok",
                 note="", ms=ms, ms_min=lo, ms_max=hi, flops=1e6 * T * batch)
            for T, ms, lo, hi in points]


def test_noise_is_flagged_and_kept_out_of_conclusions():
    steady = _series("torch", "fwd", [(512, 1.0, 0.99, 1.02), (1024, 2.0, 1.98, 2.05),
                                      (2048, 4.1, 4.0, 4.2), (4096, 8.3, 8.2, 8.4)])
    # T=1024 measured slower than T=2048: a contradiction, whatever the spreads
    contradicted = _series("sdpa", "fwd", [(512, 1.0, 0.99, 1.01), (1024, 5.0, 4.9, 5.1),
                                           (2048, 4.0, 3.9, 4.1), (4096, 16.0, 15.9, 16.1)])
    # the last point's runs range over 50% of its median: noisy, left out of the ratio
    noisy_end = _series("reference", "fwd", [(512, 1.0, 0.99, 1.01), (1024, 4.0, 3.9, 4.1),
                                              (2048, 16.0, 15.8, 16.2), (4096, 50.0, 40.0, 65.0)])
    records = steady + contradicted + noisy_end
    flags = stability.point_flags(records)
    assert flags == {("sdpa", "fwd", True, 1024, 1): ["non-monotonic"],
                     ("sdpa", "fwd", True, 2048, 1): ["non-monotonic"],
                     ("reference", "fwd", True, 4096, 1): ["noisy"]}
    lines = stability.growth_conclusions(records)
    assert any(line.startswith("torch: 8x the tokens cost 8.3x the forward time") for line in lines)
    sdpa, = (line for line in lines if line.startswith("sdpa"))
    assert "no conclusion" in sdpa and "1024, 2048" in sdpa and "x the tokens" not in sdpa
    ref, = (line for line in lines if line.startswith("reference"))
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
    assert timing["ms_min"] <= timing["ms_p10"] <= timing["ms"] <= timing["ms_p90"] <= timing["ms_max"]
    assert time_ms(lambda: None, argparse.Namespace(device=torch.device("cpu"), repeats=5,
                                                    max_point_seconds=3.0))["ms_p10"] is None
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
    earlier = [dict(device="CPU X (2 cores, 2 threads)", dtype="float32", tf32=False,
                    peak_tflops=0.194)]
    reference, what = stability.peak_reference("CPU X (2 cores, 2 threads)", "float32", False,
                                               earlier)
    assert reference == pytest.approx(0.6 * 0.194) and "best earlier run" in what
    assert stability.peak_reference("CPU Y", "float32", False, earlier) == (None, "")
    reference, what = stability.peak_reference("NVIDIA H100 80GB HBM3", "bfloat16", False, [])
    assert reference == pytest.approx(0.5 * 989.4) and "datasheet" in what
    assert stability.datasheet_tflops("NVIDIA H100 PCIe", "bfloat16") == 756.0
    assert stability.datasheet_tflops("NVIDIA A100-SXM4-80GB", "float32", tf32=True) == 156.0


def test_log_tick_labels_read_plainly():
    labels = [plots.plain_number(x) for x in (512, 1024, 2048, 65536, 131072, 1048576)]
    assert labels == ["512", "1K", "2K", "64K", "128K", "1M"]
    assert [plots.plain_number(x) for x in (0.2, 1, 5, 20, 200, 2000)] == \
        ["0.2", "1", "5", "20", "200", "2K"]


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
    drawn = []                    # drawing is test_plots_from_fake_results' job (seconds each)
    monkeypatch.setattr(plots, "draw", lambda records, plot_dir: drawn.append(
        (records[0]["run"], plot_dir)) or [])
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
    assert publish.main(argv) == 0                      # twice: nothing more
    assert len(load_results(committed / "results.jsonl")) == len(runs)
    # a run measured on a loaded machine needs --allow-loaded
    loaded = [dict(r, run="20280101T000000-1", machine_warnings=["the machine is loaded"])
              for r in new_cpu]
    with open(new_cpu_file, "a") as f:
        f.writelines(json.dumps(r) + "\n" for r in loaded)
    assert publish.main(argv) == 1
    assert len(load_results(committed / "results.jsonl")) == len(runs)
    assert publish.main(argv + ["--allow-loaded"]) == 0
    assert "20280101T000000-1" in {r["run"] for r in load_results(committed / "results.jsonl")}


def test_readme_section_from_fake_results(tmp_path):
    results = tmp_path / "results.jsonl"
    _fake_run(results, device_type="cpu", run="20250101T000000-1")   # an older CPU run
    _fake_run(results)                                                  # the GPU run
    _fake_run(results, device_type="cpu", run="20270101T000000-1")   # a later CPU smoke run
    target = tmp_path / "README.md"
    before, after = "# Title\n\nIntro.\n\n", "\n\n## Layout\n\nrest\n"
    target.write_text(before + readme.START + "\nold\n" + readme.END + after)
    assert readme.main(["--results", str(results), "--readme", str(target)]) == 0
    text = target.read_text()
    assert text.startswith(before + readme.START) and text.endswith(readme.END + after)
    region = text[text.index(readme.START):text.index(readme.END)]
    assert "old" not in region and "NVIDIA FakeGPU 80GB" in region    # the GPU run is preferred
    assert "20260101T000000-1" in region
    assert "| T | batch | triton ms |" in region and "**PASS**" in region and "**FAIL**" in region
    assert "- `fla`: fla-core not installed" in region
    # --latest takes the CPU smoke run instead; running twice changes nothing more
    assert readme.main(["--results", str(results), "--readme", str(target), "--latest"]) == 0
    assert "20270101T000000-1" in target.read_text()
    assert len(select_run(load_results(results), latest=True)) == len(select_run(load_results(results)))


def test_plots_from_fake_results(tmp_path):
    pytest.importorskip("matplotlib")
    results = tmp_path / "results.jsonl"
    _fake_run(results)
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
    monkeypatch.setitem(sys.modules, "matplotlib", None)           # import matplotlib fails
    assert plots.main(["--results", str(results), "--plot-dir", str(tmp_path / "png")]) == 0
    assert "matplotlib is not installed" in capsys.readouterr().out
    assert not (tmp_path / "png" / plots.PLOT_NAMES[0]).exists()
