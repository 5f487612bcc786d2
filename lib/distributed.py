"""Process-group setup and teardown, and exact reductions of metrics.

Launch under ``torchrun`` for several processes: it sets ``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``. Without those variables every
function here works for a single process and communicates nothing.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch.utils.data import Sampler

logger = logging.getLogger(__name__)


class DistributedError(RuntimeError):
    """Invalid device request or launch environment."""


@dataclass(frozen=True)
class DistContext:
    """The current process's place in the job.

    Args:
        rank: global rank of this process, 0 for a single process.
        world_size: number of processes in the job.
        local_rank: rank on this node, which selects the CUDA device.
        device: the device this process computes on (``cuda:<local_rank>`` or ``cpu``).
        is_distributed: True when a process group was initialised.
    """

    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    is_distributed: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def _read_env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise DistributedError(
            f"environment variable {name}={value!r} is not an integer; "
            "launch with torchrun, which sets it, or unset it for a single process"
        ) from None


def init_distributed(device: str, timeout_minutes: float = 30.0) -> DistContext:
    """Initialise the process group from the torchrun environment, if there is one.

    Uses NCCL when ``device`` is CUDA and Gloo on CPU. Each process takes the CUDA device
    of its local rank.

    Args:
        device: ``"cuda"``, ``"cuda:N"`` or ``"cpu"``.
        timeout_minutes: how long collectives wait for the other processes.

    Raises:
        DistributedError: the device is unknown or CUDA is requested but unavailable.
    """
    device_type = device.split(":", 1)[0]
    if device_type not in ("cuda", "cpu"):
        raise DistributedError(f"unknown device {device!r}; use 'cuda' or 'cpu'")
    if device_type == "cuda" and not torch.cuda.is_available():
        raise DistributedError(
            f"device {device!r} requested but CUDA is not available; pass --device cpu"
        )

    world_size = _read_env_int("WORLD_SIZE", 1)
    rank = _read_env_int("RANK", 0)
    local_rank = _read_env_int("LOCAL_RANK", 0)
    if world_size < 1 or not 0 <= rank < world_size:
        raise DistributedError(
            f"invalid launch environment RANK={rank}, WORLD_SIZE={world_size}; "
            "RANK must lie in [0, WORLD_SIZE)"
        )

    if device_type == "cuda":
        if world_size > 1 or device == "cuda":
            index = local_rank
        else:
            index = int(device.split(":", 1)[1])
        torch.cuda.set_device(index)
        torch_device = torch.device("cuda", index)
    else:
        torch_device = torch.device("cpu")

    is_distributed = world_size > 1
    if is_distributed and not dist.is_initialized():
        backend = "nccl" if device_type == "cuda" else "gloo"
        init_kwargs = {
            "backend": backend,
            "init_method": "env://",
            "rank": rank,
            "world_size": world_size,
            "timeout": datetime.timedelta(minutes=timeout_minutes),
        }
        if device_type == "cuda":
            init_kwargs["device_id"] = torch_device
        dist.init_process_group(**init_kwargs)
        logger.info(
            "initialised process group: backend %s, rank %d of %d, device %s",
            backend, rank, world_size, torch_device,
        )

    return DistContext(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        device=torch_device,
        is_distributed=is_distributed,
    )


def is_initialized() -> bool:
    return dist.is_available() and dist.is_initialized()


def get_rank() -> int:
    return dist.get_rank() if is_initialized() else 0


def get_world_size() -> int:
    return dist.get_world_size() if is_initialized() else 1


def is_main_process() -> bool:
    return get_rank() == 0


def barrier() -> None:
    """Wait for every process; a no-op for a single process."""
    if is_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sum ``tensor`` over all processes in place and return it (unchanged for one process)."""
    if is_initialized():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def broadcast_object(obj: object, src: int = 0) -> object:
    """Return rank ``src``'s ``obj`` on every process (the object itself for one process)."""
    if not is_initialized():
        return obj
    holder = [obj]
    dist.broadcast_object_list(holder, src=src)
    return holder[0]


class ShardSampler(Sampler[int]):
    """Splits dataset indices over processes without padding, for exact evaluation.

    Rank ``r`` of ``n`` takes indices ``r, r + n, r + 2n, ...`` in order, so every index is
    visited exactly once across processes. Ranks may get one index more than others, unlike
    ``torch.utils.data.DistributedSampler``, which repeats indices to equalise them.

    Args:
        dataset_size: number of samples in the dataset.
        rank: rank of this process (default: the current rank).
        world_size: number of processes (default: the current world size).
    """

    def __init__(self, dataset_size: int, rank: int | None = None, world_size: int | None = None) -> None:
        self.dataset_size = dataset_size
        self.rank = get_rank() if rank is None else rank
        self.world_size = get_world_size() if world_size is None else world_size

    def __iter__(self):
        return iter(range(self.rank, self.dataset_size, self.world_size))

    def __len__(self) -> int:
        return len(range(self.rank, self.dataset_size, self.world_size))


def cleanup() -> None:
    """Destroy the process group if this process initialised one."""
    if is_initialized():
        dist.destroy_process_group()
