"""Triton kernels of mixed chunk attention.

- `chunk_state.py`: the sequential inter-chunk state scan (forward: exclusive prefix of
  k_lin^T v; backward: reverse exclusive suffix of q_lin^T dO).
- `mixed_chunk_fwd.py`: the parallel per-(chunk, query block) output kernel.
- `mixed_chunk_bwd.py`: the query-side (dq, dS, d rel_bias) and key-side (dk, dv) backward kernels.
- `common.py`: the relu^2 score tile shared by all of them.
"""
