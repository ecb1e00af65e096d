"""Several processes (``accelerate launch --num_processes N``): which one this is, its share of a list, gathering.

forgetpatch splits work only when it was *launched* with more than one process (``WORLD_SIZE`` and the like,
as ``accelerate launch`` / ``torchrun`` / ``mpirun`` set them). A plain run is one process, rank 0, and every
function here is then the identity: it neither builds an ``accelerate`` state nor touches
``torch.distributed``, so single-process results stay bit-identical to a run without this module.

Launched, the process group is ``accelerate``'s (:class:`accelerate.PartialState`; NCCL on GPUs, gloo on CPUs).
The split is by *index*: :func:`share` gives each process a contiguous block of ``n`` items, and
:func:`gather` concatenates every process's results in rank order, so the gathered list is the one a single
process would have made. Every launched process must make the same calls in the same order (they are
collectives); an error on one process leaves the others waiting until ``torch.distributed``'s timeout.

Example:
    >>> from forgetpatch import distributed
    >>> mine = distributed.share(len(prompts))                  # range(0, n) when not launched
    >>> images = distributed.gather([render(prompts[i]) for i in mine])
    >>> if distributed.is_main():
    ...     save(images)
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any, TypeVar

import torch

T = TypeVar("T")

#: Environment variables a launcher sets to the number of processes (torchrun/accelerate, MPI flavours).
_WORLD_VARS = ("WORLD_SIZE", "PMI_SIZE", "OMPI_COMM_WORLD_SIZE", "MV2_COMM_WORLD_SIZE")
#: Elements per all-reduce call when summing many tensors (128 MB of float32).
_BUCKET = 1 << 25


def launched() -> bool:
    """Whether this program was started as one of several processes."""
    return any(int(os.environ.get(name, "1") or 1) > 1 for name in _WORLD_VARS)


def state() -> Any | None:
    """``accelerate``'s :class:`~accelerate.PartialState` when launched with several processes, else ``None``.

    Built on first use with ``cpu=True`` where there is no GPU, so a CPU launch gets a gloo process group.
    """
    if not launched():
        return None
    from accelerate import PartialState

    return PartialState(cpu=not torch.cuda.is_available())


def world_size() -> int:
    """Number of processes (1 when not launched)."""
    s = state()
    return 1 if s is None else int(s.num_processes)


def rank() -> int:
    """This process's index, 0 .. :func:`world_size` - 1."""
    s = state()
    return 0 if s is None else int(s.process_index)


def is_main() -> bool:
    """Whether this is process 0, the one that prints and writes files."""
    return rank() == 0


def device() -> torch.device:
    """This process's device under a launch (``cuda:<local rank>`` or ``cpu``); ``cuda`` if there is a GPU, else
    ``cpu``, when not launched."""
    s = state()
    if s is not None:
        return torch.device(s.device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def share(n: int, block: int = 1) -> range:
    """This process's contiguous part of ``range(n)``, in rank order, cut at multiples of ``block`` (so a batch of
    ``block`` items is never split); the parts differ by at most one block.

    Example:
        >>> share(5)            # rank 0 of 2 -> range(0, 2); rank 1 -> range(2, 5); not launched -> range(0, 5)
        >>> share(10, block=4)  # rank 0 of 2 -> range(0, 4); rank 1 -> range(4, 10)
    """
    size, me, blocks = world_size(), rank(), -(-n // max(1, block))
    return range(min(n, me * blocks // size * block), min(n, (me + 1) * blocks // size * block))


def gather(values: Sequence[T]) -> list[T]:
    """Every process's ``values`` concatenated in rank order, on every process (``list(values)`` when not
    launched). Values are pickled: send arrays or CPU tensors, not models."""
    if state() is None:
        return list(values)
    from accelerate.utils import gather_object

    return list(gather_object(list(values)))


@torch.no_grad()
def all_reduce_sum_(tensors: Sequence[torch.Tensor]) -> None:
    """Replace each tensor by its sum over the processes, in place (nothing when not launched).

    Tensors of one dtype and device are reduced together, in buckets of up to 32 M elements.
    """
    if state() is None or not tensors:
        return
    import torch.distributed as dist

    groups: dict[tuple[torch.dtype, torch.device], list[torch.Tensor]] = {}
    for t in tensors:
        groups.setdefault((t.dtype, t.device), []).append(t)
    for group in groups.values():
        start = 0
        while start < len(group):
            bucket, numel = [], 0
            while start < len(group) and (not bucket or numel + group[start].numel() <= _BUCKET):
                bucket.append(group[start])
                numel += group[start].numel()
                start += 1
            flat = torch.cat([t.reshape(-1) for t in bucket])
            dist.all_reduce(flat, op=dist.ReduceOp.SUM)
            offset = 0
            for t in bucket:
                t.copy_(flat[offset : offset + t.numel()].view_as(t))
                offset += t.numel()


def sum_values(values: dict[str, float]) -> dict[str, float]:
    """``values`` summed key by key over the processes (float64; unchanged when not launched)."""
    if state() is None or not values:
        return dict(values)
    keys = sorted(values)
    flat = torch.tensor([float(values[k]) for k in keys], dtype=torch.float64, device=_reduce_device())
    all_reduce_sum_([flat])
    return {k: float(v) for k, v in zip(keys, flat.cpu().tolist(), strict=True)}


def _reduce_device() -> torch.device:
    """Where small reductions go: NCCL reduces GPU tensors only, gloo CPU tensors."""
    s = state()
    return torch.device(s.device) if s is not None and getattr(s, "backend", None) == "nccl" else torch.device("cpu")


__all__ = [
    "all_reduce_sum_",
    "device",
    "gather",
    "is_main",
    "launched",
    "rank",
    "share",
    "state",
    "sum_values",
    "world_size",
]
