"""Shared pytest setup.

- The repository root is importable (for `csrc_ref`) and so is this folder (for `helpers`).
- Without a GPU, Triton kernels run on the CPU under the interpreter: TRITON_INTERPRET=1 must be
  set before triton is first imported, so it is set here, before any test module loads.
"""
import os
import sys

import torch

_TESTS = os.path.dirname(os.path.abspath(__file__))
for path in (os.path.dirname(_TESTS), _TESTS):
    if path not in sys.path:
        sys.path.insert(0, path)

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
