"""Preflight of a GPU run (bench/gpu_runbook.sh runs it first, in a few seconds).

Checks what every Triton launch on the GPU needs, and says exactly what is missing:
- a C compiler ($CC, else gcc, else clang: what Triton's launcher build looks for) that builds a
  tiny extension against Python.h (Triton < 3.7 compiles a C launcher per kernel signature);
- Python.h in the include directory Triton passes to the compiler;
- TRITON_CACHE_DIR set, inside the output folder, writable (a fresh cache: nothing stale);
- one tiny Triton kernel launched and its result checked (on the GPU; under TRITON_INTERPRET=1
  on a CPU, for a dry run).
Records the versions (Python, torch, CUDA, GPU, Triton, numpy, test plugins) on the way.

    python -m bench.gpu_preflight --out OUTDIR [--report FILE]

Prints one line per check and a last line "PREFLIGHT: OK" or "PREFLIGHT: FAILED: <what is
missing>"; exit status 0 or 1.
"""

import argparse
import os
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time


def versions() -> list:
    """(name, version or why not) of the software a GPU run depends on."""
    import platform

    rows = [("python", sys.version.split()[0] + " " + platform.platform())]
    try:
        import torch

        cuda = torch.cuda.is_available()
        rows.append(("torch", f"{torch.__version__} (CUDA {torch.version.cuda}, available {cuda})"))
        if cuda:
            rows.append(
                (
                    "gpu",
                    f"{torch.cuda.get_device_name()} "
                    f"sm_{''.join(map(str, torch.cuda.get_device_capability()))}",
                )
            )
    except Exception as exc:  # noqa: BLE001 - reported, not raised
        rows.append(("torch", f"import failed: {exc}"))
    for name in (
        "triton",
        "numpy",
        "pytest",
        "xdist",
        "pytest_timeout",
        "hypothesis",
        "ninja",
        "matplotlib",
    ):
        try:
            module = __import__(name)
            rows.append((name, getattr(module, "__version__", "present")))
        except Exception as exc:  # noqa: BLE001
            rows.append((name, f"missing ({type(exc).__name__})"))
    return rows


def python_include_dir() -> str:
    """The include directory Triton's launcher build passes to the compiler (its scheme rule)."""
    scheme = sysconfig.get_default_scheme()
    if scheme == "posix_local":
        scheme = "posix_prefix"
    return sysconfig.get_paths(scheme=scheme)["include"]


def find_c_compiler():
    """$CC, else gcc, else clang, as Triton picks its launcher compiler (None if none)."""
    return os.environ.get("CC") or shutil.which("gcc") or shutil.which("clang")


def check_compiler_and_headers():
    """(ok, message): a C compiler exists, Python.h exists, and one builds an extension."""
    compiler = find_c_compiler()
    include = python_include_dir()
    header = os.path.join(include, "Python.h")
    missing = []
    if compiler is None:
        missing.append("a C compiler (no $CC, gcc or clang on PATH: install gcc)")
    if not os.path.exists(header):
        missing.append(f"Python.h (not in {include}: install the python3-dev headers)")
    if missing:
        return False, "missing " + " and ".join(missing)
    with tempfile.TemporaryDirectory() as tmp:
        source = os.path.join(tmp, "probe.c")
        with open(source, "w") as f:
            f.write(
                "#include <Python.h>\n"
                "int flash_kernels_probe(void) { return Py_IsInitialized(); }\n"
            )
        command = [
            compiler,
            source,
            "-O1",
            "-shared",
            "-fPIC",
            f"-I{include}",
            "-o",
            os.path.join(tmp, "probe.so"),
        ]
        proc = subprocess.run(command, capture_output=True, text=True)
    if proc.returncode != 0:
        return False, (
            f"{compiler} cannot build an extension against {header}: "
            f"{(proc.stderr or proc.stdout).strip()[-500:]}"
        )
    return True, f"{compiler} builds against {header}"


def check_cache_dir(out_dir: str):
    """(ok, message): TRITON_CACHE_DIR is set, lies inside `out_dir`, and is writable."""
    cache = os.environ.get("TRITON_CACHE_DIR")
    if not cache:
        return False, "TRITON_CACHE_DIR is not set (the runbook sets it inside OUTDIR)"
    cache, out_dir = os.path.realpath(cache), os.path.realpath(out_dir)
    if os.path.commonpath([cache, out_dir]) != out_dir:
        return False, f"TRITON_CACHE_DIR={cache} is not inside {out_dir}"
    try:
        os.makedirs(cache, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=cache):
            pass
    except OSError as exc:
        return False, f"TRITON_CACHE_DIR={cache} is not writable: {exc}"
    return True, f"TRITON_CACHE_DIR={cache}"


def check_tiny_kernel():
    """(ok, message): one Triton kernel compiles, launches and computes x + 1 correctly (on the
    GPU, or under TRITON_INTERPRET=1 on the CPU)."""
    start = time.perf_counter()
    try:
        import torch
        import triton
        import triton.language as tl

        @triton.jit
        def add_one(x_ptr, y_ptr, n, BLOCK: tl.constexpr):
            offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
            tl.store(y_ptr + offs, tl.load(x_ptr + offs, mask=offs < n) + 1.0, mask=offs < n)

        interpret = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
        if not torch.cuda.is_available() and not interpret:
            return False, "no CUDA device (torch.cuda.is_available() is False)"
        device = "cuda" if torch.cuda.is_available() and not interpret else "cpu"
        x = torch.arange(1000, dtype=torch.float32, device=device)
        y = torch.empty_like(x)
        add_one[(triton.cdiv(1000, 256),)](x, y, 1000, BLOCK=256)
        if device == "cuda":
            torch.cuda.synchronize()
        if not torch.equal(y.cpu(), x.cpu() + 1):
            return False, "the tiny Triton kernel ran but computed a wrong result"
    except Exception as exc:  # noqa: BLE001 - the message is the finding
        return False, f"the tiny Triton kernel failed: {type(exc).__name__}: {str(exc)[:400]}"
    where = "under the interpreter" if device == "cpu" else "on the GPU"
    return (
        True,
        f"tiny Triton kernel correct {where} "
        f"({time.perf_counter() - start:.1f} s with its compile)",
    )


def run(out_dir: str) -> tuple:
    """(ok, report lines) of every check."""
    lines = [f"version {name}: {value}" for name, value in versions()]
    failures = []
    for name, check in (
        ("compiler", check_compiler_and_headers),
        ("cache", lambda: check_cache_dir(out_dir)),
        ("kernel", check_tiny_kernel),
    ):
        ok, message = check()
        lines.append(f"{'ok  ' if ok else 'FAIL'} {name}: {message}")
        if not ok:
            failures.append(message)
    lines.append("PREFLIGHT: OK" if not failures else "PREFLIGHT: FAILED: " + "; ".join(failures))
    return not failures, lines


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", required=True, help="the run's output folder")
    parser.add_argument("--report", help="also write the lines here")
    args = parser.parse_args(argv)
    ok, lines = run(args.out)
    text = "\n".join(lines) + "\n"
    print(text, end="")
    if args.report:
        with open(args.report, "w") as f:
            f.write(text)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
