"""Benchmark results: one JSON object per line, each line self-contained (run metadata included).

Where they go: a user's runs go to DEFAULT_DIR, `bench_out/` under the current directory
(git-ignored at the repository root), so the README's commands leave the checkout clean. The
committed results in COMMITTED_DIR (bench/results/) change only through the explicit step
`python -m bench.publish` (or by naming that folder with --output-dir / --results).

Fields of a line: run (id), time (UTC, ISO), device, device_type ("cuda"/"cpu"), dtype, torch,
triton, python, commit, quick (bool), tf32, threads (CPU threads of torch), cpu_count,
load_start and load_end (1-minute load averages; the end includes the run's own threads),
peak_tflops (the matmul peak measured in the same run), peak_what, peak_reference_tflops and
peak_reference_what (what the peak should reach on this machine, null if unknown),
machine_warnings (why the timings may be unreliable; empty when nothing says so); then the
point: impl, mode ("fwd", "bwd", "fwd+bwd"), T, batch, S, E, C, causal, rel_bias, status ("ok",
"skipped" or "error"), note, ms (median), ms_min, ms_max, ms_p10 and ms_p90 (10th and 90th
percentiles, with 10 timed runs or more, else null), reps (timed runs), flops, tflops and
frac_peak (from the median), mem_mb, varlen (null, or "packed"/"padded": the varlen row,
bench/varlen.py), doc_lens (its document lengths), flags ("noisy", "non-monotonic":
bench/stability.py), wall_s. Older lines may lack the newer fields; readers treat them as unknown.
"""

import datetime
import hashlib
import json
import os
import platform
import subprocess

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEFAULT_DIR = "bench_out"
COMMITTED_DIR = os.path.join(REPO, "bench", "results")
RESULTS_NAME = "results.jsonl"


def git_commit():
    """`git describe`-like id of the code: the commit (+"-dirty"), or a hash of the sources.

    FLASH_KERNELS_COMMIT overrides (a GPU machine may get a copy of the tree without .git).
    """
    if os.environ.get("FLASH_KERNELS_COMMIT"):
        return os.environ["FLASH_KERNELS_COMMIT"]
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short=12", "HEAD"],
            cwd=REPO,
            capture_output=True,
            text=True,
            timeout=10,
        )
        if commit.returncode == 0:
            dirty = subprocess.run(
                ["git", "status", "--porcelain", "--untracked-files=no"],
                cwd=REPO,
                capture_output=True,
                text=True,
                timeout=10,
            )
            return commit.stdout.strip() + ("-dirty" if dirty.stdout.strip() else "")
    except (OSError, subprocess.SubprocessError):
        pass
    digest = hashlib.sha1()
    for root, dirs, files in sorted(os.walk(os.path.join(REPO, "flash_kernels"))):
        dirs.sort()
        for name in sorted(files):
            if name.endswith(".py"):
                with open(os.path.join(root, name), "rb") as f:
                    digest.update(name.encode() + f.read())
    return "src-" + digest.hexdigest()[:12]


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    name = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return f"CPU {name} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def run_metadata(device, dtype, quick):
    try:
        import triton

        triton_version = triton.__version__
    except Exception:
        triton_version = None
    now = datetime.datetime.now(datetime.timezone.utc)
    return {
        "run": now.strftime("%Y%m%dT%H%M%S") + f"-{os.getpid()}",
        "time": now.isoformat(timespec="seconds"),
        "device": device_name(device),
        "device_type": device.type,
        "dtype": str(dtype).replace("torch.", ""),
        "torch": torch.__version__,
        "triton": triton_version,
        "cuda": torch.version.cuda,
        "python": platform.python_version(),
        "commit": git_commit(),
        "quick": bool(quick),
    }


def append_results(path, records):
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "a") as f:
        for record in records:
            f.write(json.dumps(record, sort_keys=True) + "\n")


def load_committed_results():
    """The committed records (bench/results/results.jsonl), [] if absent or unreadable."""
    try:
        return load_results(os.path.join(COMMITTED_DIR, RESULTS_NAME))
    except (OSError, ValueError):
        return []


def load_results(path):
    records = []
    with open(path) as f:
        for number, line in enumerate(f, 1):
            line = line.strip()
            if not line:
                continue
            try:
                records.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}:{number}: not JSON ({exc})") from None
    return records


def select_run(records, run=None, latest=False):
    """The records of one run: `run` if given; else the latest run on a GPU if there is one
    (a later CPU smoke run does not replace GPU numbers), else the latest run; `latest=True`
    takes the latest run whatever its device."""
    if not records:
        raise ValueError("no results")
    if run is None:
        candidates = records
        if not latest and any(r.get("device_type") == "cuda" for r in records):
            candidates = [r for r in records if r.get("device_type") == "cuda"]
        run = max(candidates, key=lambda r: (r.get("time", ""), r.get("run", "")))["run"]
    chosen = [r for r in records if r.get("run") == run]
    if not chosen:
        raise ValueError(f"no results for run {run!r}")
    return chosen
