"""The processes of one training run: this process's rank, how many there are, sums over them, and the work
directory that rank 0 alone prepares. One process (no torchrun) is rank 0 of a world of 1, and nothing here
starts a process group for it."""

from __future__ import annotations

import os
from pathlib import Path

from lora_pipeline.training.checkpoints import last_complete_checkpoint, prepare_work_dir


def under_torchrun() -> bool:
    return "LOCAL_RANK" in os.environ or int(os.environ.get("WORLD_SIZE", "1")) > 1


def process_rank() -> int:
    return int(os.environ.get("RANK", "0"))


def world_size() -> int:
    return int(os.environ.get("WORLD_SIZE", "1"))


def prepare_work_dir_once(work: Path, key: str, world: int, rank: int, cuda: bool) -> Path | None:
    """The checkpoint to resume from. With several processes, rank 0 alone clears or keeps the work directory
    (they would race) while the others wait at a barrier, then read the same checkpoint."""
    if world == 1:
        return prepare_work_dir(work, key)
    import torch.distributed as dist

    if not dist.is_initialized():  # accelerate would start it later; the barrier is needed now
        if cuda:
            import torch

            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group("nccl" if cuda else "gloo")
    resume = prepare_work_dir(work, key) if rank == 0 else None
    dist.barrier()
    return resume if rank == 0 else last_complete_checkpoint(work / "checkpoints")


def sum_over_processes(counts: list[int], world: int) -> list[int]:
    if world == 1:
        return counts
    import torch
    import torch.distributed as dist

    device = "cuda" if dist.get_backend() == "nccl" else "cpu"
    total = torch.tensor(counts, dtype=torch.float64, device=device)
    dist.all_reduce(total)
    return [int(x) for x in total.tolist()]
