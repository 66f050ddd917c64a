"""Every Python code block of README.md runs on its own, as a user pasting it would run it: in
a fresh interpreter, from the repository root, without TRITON_INTERPRET (the CPU's "auto"
backend is then the chunked PyTorch path). A block that needs names from another fails here."""

import os
import re
import subprocess
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def python_blocks():
    with open(os.path.join(ROOT, "README.md"), encoding="utf-8") as f:
        text = f.read()
    return re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)


def test_the_readme_has_python_blocks():
    assert len(python_blocks()) >= 5


@pytest.mark.slow
@pytest.mark.parametrize("index", range(len(python_blocks())))
def test_readme_block_runs_alone(index):
    code = python_blocks()[index]
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, "-c", code], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, f"README block {index} failed:\n{code}\n{result.stderr[-3000:]}"
    if "# True" in code:  # a block that says what it prints
        assert "True" in result.stdout and "False" not in result.stdout, result.stdout
