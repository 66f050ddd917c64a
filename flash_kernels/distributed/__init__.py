"""Context parallelism: one sequence split across the ranks of a torch.distributed group
(`cp_group=` of both ops; docs/contract.md section 8). context_parallel.py holds the design and
the two backends' paths, agreement.py the check that every rank makes the same call,
collectives.py the all-gathers and the sums over the ranks. Imports the backends and the core;
the public ops (flash_kernels/attention.py) call `context_parallel_attention`."""

from .context_parallel import context_parallel_attention

__all__ = ["context_parallel_attention"]
