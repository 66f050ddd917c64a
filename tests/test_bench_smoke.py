"""Smoke tests of the benchmarks (bench/): the quick CPU mode runs and writes its results, the
flop count matches a hand computation, and the plots, README section and target verdicts come
out of a small fake results file. No GPU needed; the quick run takes ~20 s on 2 cores."""
import json
import os
import subprocess
import sys

import pytest

from bench import plots, readme
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


def test_quick_mode_runs_on_cpu(tmp_path):
    """`python -m bench` (the README's main job) on a CPU: quick mode, results in --output-dir."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run(
        [sys.executable, "-m", "bench", "--device", "cpu", "--output-dir", str(tmp_path),
         "--threads", "1", "--no-progress", "--max-dense-gb", "0.2"],
        cwd=REPO, env=env, capture_output=True, text=True, timeout=240)
    output = proc.stdout + proc.stderr
    assert proc.returncode == 0, output[-4000:]
    assert "quick mode" in output and "forward + backward" in output, output[-4000:]
    records = load_results(tmp_path / "results.jsonl")
    ok = {(r["impl"], r["mode"], r["T"]) for r in records if r["status"] == "ok"}
    for impl in ("torch", "reference", "sdpa"):
        for mode in ("fwd", "bwd", "fwd+bwd"):
            assert (impl, mode, 512) in ok, (impl, mode)
    first = records[0]
    assert first["device_type"] == "cpu" and first["quick"] and first["commit"]
    assert first["torch"] and first["peak_tflops"] > 0
    for r in records:
        if r["status"] == "ok":
            assert r["ms"] > 0 and r["tflops"] > 0 and r["frac_peak"] > 0
            assert (r["mem_mb"] is not None) == (r["mode"] != "bwd"), r   # bwd: see fwd+bwd
    # the dense reference is skipped where its memory estimate exceeds --max-dense-gb
    assert any(r["impl"] == "reference" and r["status"] == "skipped" and "memory" in r["note"]
               and r["T"] == 4096 for r in records)
    # the Triton kernels are never timed on a CPU without the interpreter being asked for
    assert all(r["status"] == "skipped" for r in records if r["impl"] == "triton")


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
                                    note="", ms=ms, flops=flops, tflops=tflops,
                                    frac_peak=tflops / 500.0, mem_mb=100.0 * T / 1024))
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
