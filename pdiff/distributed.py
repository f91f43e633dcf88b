"""torchrun integration: the process group, rank facts, and small collective helpers."""
from __future__ import annotations

import datetime
import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistInfo:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def init(device_preference: str = "auto") -> DistInfo:
    """Join the process group torchrun describes (RANK/WORLD_SIZE/LOCAL_RANK), or run alone.

    NCCL with one GPU per process on CUDA; gloo on the CPU. Multi-node rendezvous is torchrun's
    (``--nnodes N --rdzv-backend c10d --rdzv-endpoint HOST:PORT``)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and device_preference != "cpu"
    device = torch.device("cuda", local) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        dist.init_process_group("nccl" if use_cuda else "gloo", timeout=datetime.timedelta(minutes=30),
                                device_id=device if use_cuda else None)
    return DistInfo(rank, world, local, device)


def active() -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def all_reduce_(t: torch.Tensor, op=None) -> torch.Tensor:
    if active():
        dist.all_reduce(t, op=op or dist.ReduceOp.SUM)
    return t


def any_rank(flag: bool, device: torch.device) -> bool:
    """True if ``flag`` is set on any rank (one tiny collective)."""
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    return bool(all_reduce_(t, dist.ReduceOp.MAX if active() else None).item() > 0)


def barrier() -> None:
    if active():
        dist.barrier()


@torch.no_grad()
def check_replicas_agree(model: torch.nn.Module, device: torch.device) -> float:
    """Largest difference of any parameter between this rank and rank 0 (0 on one process).

    Run after each checkpoint: DDP keeps replicas equal, so anything else is a bug or a fault."""
    if not active():
        return 0.0
    flat = torch.cat([p.detach().reshape(-1).float() for p in model.parameters()])
    ref = flat.clone()
    dist.broadcast(ref, src=0)
    diff = (flat - ref).abs().max()
    dist.all_reduce(diff, op=dist.ReduceOp.MAX)
    return float(diff)


def shutdown() -> None:
    """Leave the process group together: a rank that tears its connections down while a peer is
    still finishing a collective can bring that peer down (gloo aborts it)."""
    if dist.is_available() and dist.is_initialized():
        if dist.get_world_size() > 1:
            dist.barrier()
        gc.collect()   # finished work objects still referenced by cycles go while the group lives
        dist.destroy_process_group()
