"""The collectives of context parallelism: which device a group moves tensors on, an all-gather
in flight, and `CPCall`, one call as every rank agreed on it with the sums over the ranks'
gathered totals (docs/contract.md section 8; context_parallel.py says why an all-gather)."""

from dataclasses import dataclass

import torch
import torch.distributed as dist


def _backend_name(group):
    return str(dist.get_backend(group)).lower()


def _collective_device(group, device):
    """Where a tensor on `device` goes through the group's collectives: its own device when
    the backend takes it, else the CPU (gloo only moves CPU tensors)."""
    if device.type == "cpu":
        return device
    backend = _backend_name(group)
    if any(name in backend for name in ("nccl", "xccl", "ucc")):
        return device
    return torch.device("cpu")


def _descriptor_device(group):
    """The descriptors travel on the CPU when the group has a CPU backend, else on the current
    CUDA device (NCCL moves only GPU tensors)."""
    backend = _backend_name(group)
    if any(name in backend for name in ("gloo", "mpi", "ucc")):
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


_all_gather_flat_op = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor


def all_gather_flat(output, tensor, group, async_op=False):
    """All-gather the flat `tensor` of every rank into the flat `output` (rank order)."""
    return _all_gather_flat_op(output, tensor, group=group, async_op=async_op)


class _Gathered:
    """An all-gather in flight; wait() returns the (W, *shape) gathered tensors."""

    def __init__(self, tensor, group, world_size, async_op):
        self._shape, self._device = tensor.shape, tensor.device
        # Both buffers flat: gloo rejects a stacked (W, *shape) output and a shaped input
        # ("invalid tensor size"), which NCCL would accept.
        send = tensor.detach().reshape(-1).to(_collective_device(group, tensor.device)).contiguous()
        self._buffer = send.new_empty(world_size * send.numel())
        self._work = all_gather_flat(self._buffer, send, group, async_op=async_op)
        self._send = send  # alive until the collective is done

    def wait(self):
        if self._work is not None:
            self._work.wait()
            self._work = None
        return self._buffer.to(self._device).view(-1, *self._shape)


@dataclass(frozen=True)
class CPCall:
    """One context-parallel call as every rank agreed on it: the group, this rank's place, the
    slice lengths of all ranks and the resolved options."""

    group: object
    rank: int
    world_size: int
    lengths: tuple
    chunk_size: int
    causal: bool
    quad_scale: float
    lin_scale: float

    def all_gather(self, tensor, async_op=False):
        return _Gathered(tensor, self.group, self.world_size, async_op)

    def sum_earlier(self, gathered):
        """sum_{r' < rank} gathered[r'] in rank order, None on rank 0."""
        if self.rank == 0:
            return None
        total = gathered[0].clone()
        for r in range(1, self.rank):
            total += gathered[r]
        return total

    def sum_later(self, gathered):
        """sum_{r' > rank} gathered[r'], from the last rank down (the reverse scan's order),
        None on the last rank."""
        if self.rank == self.world_size - 1:
            return None
        total = gathered[self.world_size - 1].clone()
        for r in range(self.world_size - 2, self.rank, -1):
            total += gathered[r]
        return total

    def sum_all(self, gathered, skip=None):
        """sum_{r'} gathered[r'] in rank order (r' != skip): the same bits on every rank."""
        total = torch.zeros_like(gathered[0])
        for r in range(self.world_size):
            if r != skip:
                total += gathered[r]
        return total

    def offset_and_states(self, gathered, states, reverse=False):
        """What this rank's kernels read after the all-gather of the ranks' totals: (the state
        offset, this rank's own states). Causal, the offset is the earlier ranks' sum (the
        later ranks' in reverse, i.e. the backward) and the own states stay. Non-causal, every
        chunk sees the whole sequence: every rank reads the global sum (the same bits on every
        rank) and its own states, which that sum holds, are zeroed."""
        if self.causal:
            return (self.sum_later(gathered) if reverse else self.sum_earlier(gathered)), states
        return self.sum_all(gathered), (None if states is None else torch.zeros_like(states))
