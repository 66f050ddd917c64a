"""The implementations of the ops: `torch` (the dense reference, the chunked path and the
decoding step in tensor code) and `triton` (the kernels, their launchers and custom ops). The
backends import flash_kernels.core only; the ops above pick one per call (core/plan.py)."""
