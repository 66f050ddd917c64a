"""The long-context comparison (examples/compare_long_context.py, compare_report.py,
publish_compare.py): a tiny sweep's records and curves, the reading of curves at equal
wall-clock and the sentences on where FLASH loses, and the publish step."""

import importlib
import json
import math
import os
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EXAMPLES = os.path.join(ROOT, "examples")
if EXAMPLES not in sys.path:
    sys.path.insert(0, EXAMPLES)
compare = importlib.import_module("compare_long_context")
report = importlib.import_module("compare_report")
publish = importlib.import_module("publish_compare")

OUTPUT_FILES = [
    "compare_long_context.jsonl",
    "compare_long_context.md",
    "compare_long_context.png",
    "compare_long_context.txt",
]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """The tiny preset without the time cap (every model runs all N steps), on the chunked
    PyTorch path ("auto" would be Triton's interpreter under the tests): its records as
    returned and its output folder."""
    out = tmp_path_factory.mktemp("compare")
    threads = torch.get_num_threads()
    records = compare.main(
        ["--preset", "tiny", "--time-cap", "0", "--backend", "torch", "--output-dir", str(out)]
    )
    assert torch.get_num_threads() == threads  # the driver's one thread is undone
    return records, out


def test_tiny_sweep_records_aligned_curves_on_the_same_batches(tiny_run):
    records, out = tiny_run
    tiny = compare.PRESETS["tiny"]
    expected = (
        OUTPUT_FILES
        if importlib.util.find_spec("matplotlib")
        else [name for name in OUTPUT_FILES if not name.endswith(".png")]
    )
    assert sorted(os.listdir(out)) == expected
    assert report.load_records(out / "compare_long_context.jsonl") == json.loads(
        json.dumps(records)
    )
    assert [(r["T"], r["model"]) for r in records] == [
        (T, name) for T in tiny["seq_lens"] for name in compare.MODELS
    ]
    digests = {}
    for r in records:
        steps, k = tiny["steps"], tiny["eval_every"]
        assert r["status"] == "ok" and r["batch"] == tiny["tokens_per_step"] // r["T"]
        assert r["steps_run"] == steps and r["stopped"] == "steps"
        assert len(r["train_loss"]) == len(r["step_seconds"]) == steps
        assert all(math.isfinite(loss) for loss in r["train_loss"])
        # the curve: from (0, 0 s) near ln 256, every k-th step and the last (a slow model may
        # have more), its seconds the sums of the step times before it, finite losses
        curve_steps = [step for step, _, _ in r["curve"]]
        assert curve_steps == sorted(set(curve_steps)) and curve_steps[0] == 0
        assert set(range(0, steps + 1, k)) | {steps} <= set(curve_steps)
        for step, seconds, loss in r["curve"]:
            assert seconds == pytest.approx(sum(r["step_seconds"][:step]), abs=1e-9)
            assert math.isfinite(loss)
        assert abs(r["curve"][0][2] - math.log(256)) < 0.3
        assert r["curve"][-1][2] < r["curve"][0][2]
        # the timed segments cover every step once; their spread brackets the median
        assert sum(seg["steps"] for seg in r["segments"]) == steps
        assert sum(seg["seconds"] for seg in r["segments"]) == pytest.approx(sum(r["step_seconds"]))
        assert r["ms_min"] <= r["ms_per_step"] <= r["ms_max"]
        assert r["load_min"] is None or r["load_min"] <= r["load_max"]
        digests.setdefault(r["T"], set()).add(r["batches_sha1"])
    assert all(len(d) == 1 for d in digests.values()), digests  # the same batches per T
    assert len({d.pop() for d in digests.values()}) == len(tiny["seq_lens"])
    for T in tiny["seq_lens"]:
        params = {r["model"]: r["params"] for r in records if r["T"] == T}
        assert all(abs(n - params["FLASH"]) <= 0.02 * params["FLASH"] for n in params.values())
    rows = report.analyse(records)
    for row in rows:  # equal wall-clock: the shortest curve's end, in all
        assert row["equal_seconds"] == min(r["curve"][-1][1] for r in row["runs"].values())
        assert all(math.isfinite(v) for v in row["at_equal"].values())
    markdown = (out / "compare_long_context.md").read_text()
    for T in tiny["seq_lens"]:
        assert markdown.count(f"| {T} |") == 3  # a row in each table
    assert "Where FLASH loses" in markdown and "Where FLASH wins" in markdown
    assert "**Noise of the initial draws**: At T = 16 FLASH has one chunk" in markdown
    assert "At T = 32 FLASH has one chunk" not in markdown  # C = 16: two chunks


def test_flash_with_one_chunk_is_flash_quad():
    """What the report's noise sentence rests on: at T = C, FLASH (mixed chunk attention, its
    linear part empty) given FLASH-Quad's weights (its two quadratic roles) computes FLASH-Quad's
    logits; at T = 2C it does not (the linear part and the chunk boundary count)."""
    from flash_kernels.nn import FLASHLM

    torch.manual_seed(0)
    C = 16
    flash = FLASHLM(256, 32, 2, s=16, chunk_size=C, backend="torch")
    quad = FLASHLM(256, 32, 2, layer="gau", s=16, max_len=C, quad_scale=1.0 / C, backend="torch")
    with torch.no_grad():
        for layer in flash.layers:  # O(1) role scales, so that attention matters
            layer.scale_offset.gamma.normal_()
            layer.rel_pos.weight.normal_()
        weights = flash.state_dict()
        quad.load_state_dict(
            {
                name: weights[name]
                if weights[name].shape == value.shape
                else weights[name][: value.shape[0]]  # roles quad_q, quad_k
                for name, value in quad.state_dict().items()
            }
        )
        one_chunk = torch.randint(0, 256, (2, C))
        two_chunks = torch.randint(0, 256, (2, 2 * C))
        assert torch.allclose(flash(one_chunk), quad(one_chunk), atol=1e-5)
        assert not torch.allclose(flash(two_chunks), quad(two_chunks), atol=1e-3)


def test_reading_curves_at_equal_wall_clock():
    a = [[0, 0.0, 5.0], [10, 10.0, 3.0], [20, 20.0, 2.0]]
    b = [[0, 0.0, 5.0], [10, 30.0, 2.5]]
    assert report.loss_at(a, 5.0) == pytest.approx(4.0)
    assert report.loss_at(a, 15.0) == pytest.approx(2.5)
    assert report.loss_at(b, 15.0) == pytest.approx(3.75)
    assert report.loss_at(a, 25.0) is None  # nothing beyond the last point
    assert report.time_to_reach(a, 2.5) == pytest.approx(15.0)
    assert report.time_to_reach(b, 3.75) == pytest.approx(15.0)
    assert report.time_to_reach(a, 5.0) == 0.0
    assert report.time_to_reach(b, 2.0) is None
    assert report.best(a) == (2.0, 20.0)


def _record(T, model, ms, curve):
    return {
        "run": "r1",
        "time": "2026-01-01T00:00:00",
        "status": "ok",
        "T": T,
        "batch": 1,
        "model": model,
        "curve": curve,
        "ms_per_step": ms,
        "ms_min": ms,
        "ms_max": ms,
        "load_min": 1.0,
        "load_max": 2.0,
        "steps_run": 2,
        "stopped": "steps",
        "settings": {"steps": 2},
    }


def test_where_flash_loses_and_wins_follows_the_numbers():
    """At T = 256 FLASH's step is twice Transformer++'s and its loss at equal wall-clock higher;
    at 8192 the reverse: the sentences, the crossover and the time-to-best cells say so."""
    records = [
        _record(256, "FLASH", 200.0, [[0, 0.0, 5.5], [1, 0.2, 4.0], [2, 0.4, 3.0]]),
        _record(256, "Transformer++", 100.0, [[0, 0.0, 5.5], [1, 0.1, 3.5], [2, 0.2, 2.5]]),
        _record(8192, "FLASH", 100.0, [[0, 0.0, 5.5], [1, 0.1, 3.0], [2, 0.2, 2.0]]),
        _record(8192, "Transformer++", 300.0, [[0, 0.0, 5.5], [1, 0.3, 3.0], [2, 0.6, 2.6]]),
    ]
    rows = report.analyse(records)
    assert [row["equal_seconds"] for row in rows] == [0.2, 0.2]
    assert rows[0]["at_equal"] == pytest.approx({"FLASH": 4.0, "Transformer++": 2.5})
    assert rows[1]["at_equal"]["Transformer++"] == pytest.approx(5.5 - 2.5 * 2 / 3)
    assert rows[0]["reach"][("FLASH", "Transformer++")] is None  # never gets to 2.5
    assert rows[1]["reach"][("FLASH", "Transformer++")] == pytest.approx(0.1 + 0.1 * 0.4)
    loses, wins = report.verdicts(rows)
    assert len(loses) == 1 and loses[0].startswith("T = 256 against Transformer++")
    assert loses[0].endswith(
        "FLASH is slower per step (its step takes 2.00x as long) and worse "
        "at equal wall-clock (1.500 nats/byte at 0.200 s)."
    )
    assert len(wins) == 1 and wins[0].startswith("T = 8,192 against Transformer++")
    assert report.crossover(rows) == (256, 8192)
    markdown = report.markdown(records)
    assert "from T = 8,192 on (slower at T = 256)" in markdown
    assert "not in 0.400 s" in markdown  # FLASH never reaches 2.5 at 256
    assert "0.150 s (2.67x sooner)" in markdown  # Transformer++ reaches 3.0 at 256
    assert "0.140 s (4.29x sooner)" in markdown  # FLASH reaches 2.6 at 8192
    assert "| 3.000 / 2.500 (step 2) |" in markdown and "| 2.000 / 2.600 (step 2) |" in markdown


def test_publish_copies_the_run_and_regenerates_the_readme_section(tiny_run, tmp_path):
    records, out = tiny_run
    results = out / "compare_long_context.jsonl"
    dest, readme = tmp_path / "results", tmp_path / "README.md"
    readme.write_text(f"before\n{report.START}\nold\n{report.END}\nafter\n")
    argv = ["--results", str(results), "--dest", str(dest), "--readme", str(readme)]
    assert publish.main(argv) == 0
    committed = dest / "compare_long_context.jsonl"
    assert report.load_records(committed) == report.load_records(results)
    text = readme.read_text()
    assert (
        text.startswith(f"before\n{report.START}\n## Long context")
        and text.endswith(f"{report.END}\nafter\n")
        and "\nold\n" not in text
    )
    assert f"Run `{records[0]['run']}`" in text
    assert "| 16 | 4 |" in text and "results/compare_long_context_tiny.png" in text
    snapshot = (committed.read_bytes(), text)
    assert publish.main(argv) == 0  # publishing twice: no change
    assert (committed.read_bytes(), readme.read_text()) == snapshot
    # a later run of the same preset replaces the committed one
    later = [dict(r, run="later", time="2999-01-01T00:00:00") for r in records]
    other = tmp_path / "later.jsonl"
    other.write_text("".join(json.dumps(r) + "\n" for r in later))
    assert (
        publish.main(["--results", str(other), "--dest", str(dest), "--readme", str(readme)]) == 0
    )
    assert {r["run"] for r in report.load_records(committed)} == {"later"}
    no_markers = tmp_path / "plain.md"
    no_markers.write_text("no section\n")
    assert (
        publish.main(["--results", str(results), "--dest", str(dest), "--readme", str(no_markers)])
        == 1
    )
    assert no_markers.read_text() == "no section\n"


def test_presets_are_checked():
    """Every T must divide the tokens per step; the GPU preset (bf16, T up to 8192, within
    the runbook's two minutes) asks for CUDA and names the dry run where there is none."""
    with pytest.raises(SystemExit):
        compare.parse_args(["--preset", "tiny", "--seq-lens", "24"])
    gpu = compare.PRESETS["gpu"]
    assert gpu["dtype"] == "bfloat16" and max(gpu["seq_lens"]) == 8192
    assert 0 < gpu["time_budget"] <= 120
    if not torch.cuda.is_available():
        with pytest.raises(SystemExit):
            compare.parse_args(["--preset", "gpu"])
