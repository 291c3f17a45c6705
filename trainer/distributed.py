"""Process-group setup and FSDP2 sharding.

One code path for 1 process and for ``torchrun`` (any number of nodes): the environment variables torchrun sets
(``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``...) decide. Backend ``auto`` is NCCL on CUDA and gloo on
CPU. With a world of 1 nothing is sharded and no process group is created.
"""

from __future__ import annotations

import os
import sys
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import Tensor, nn

from trainer.config import ParallelConfig
from trainer.hidden import decoder_parts

__all__ = [
    "DistEnv",
    "all_reduce_max",
    "all_reduce_sum",
    "init_distributed",
    "shard_model",
    "torchrun_command",
]


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def barrier(self) -> None:
        if self.distributed:
            dist.barrier()


def init_distributed(cfg: ParallelConfig) -> DistEnv:
    """Initialize the default process group from torchrun's environment (idempotent)."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    use_cuda = torch.cuda.is_available() and cfg.backend != "gloo"
    device = torch.device("cuda", local_rank) if use_cuda else torch.device("cpu")
    if use_cuda:
        torch.cuda.set_device(device)
    if world > 1 and not dist.is_initialized():
        backend = cfg.backend if cfg.backend != "auto" else ("nccl" if use_cuda else "gloo")
        dist.init_process_group(backend=backend, device_id=device if use_cuda else None)
    return DistEnv(rank=rank, world_size=world, local_rank=local_rank, device=device)


def shard_model(model: nn.Module, env: DistEnv, *, reshard_after_forward: bool = True) -> nn.Module:
    """FSDP2: ``fully_shard`` each decoder block, then the root (embeddings, final norm and LM head).

    The root unit keeps tied embedding/LM-head weights together. Callers always invoke the root module's
    forward (see :mod:`trainer.hidden`), so the root's pre-forward hook all-gathers what the backbone needs.
    A world of 1 returns the model unchanged.
    """
    if not env.distributed:
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(env.device.type, (env.world_size,))
    blocks, _ = decoder_parts(model)
    for block in blocks:
        fully_shard(block, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return model


def all_reduce_sum(t: Tensor) -> Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return t


def all_reduce_max(t: Tensor) -> Tensor:
    if dist.is_initialized() and dist.get_world_size() > 1:
        t = t.clone()
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return t


def torchrun_command(cfg: ParallelConfig, module: str, nproc_per_node: int | None = None) -> list[str]:
    """``python -m torch.distributed.run ... -m MODULE`` for this topology: ``--standalone`` on one node without a
    rendezvous endpoint, else c10d rendezvous at ``parallel.rdzv_endpoint``. Append the module's own arguments."""
    nproc = nproc_per_node or cfg.nproc_per_node
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        f"--nproc_per_node={nproc}",
        f"--nnodes={cfg.nnodes}",
    ]
    cmd += (
        [f"--rdzv_endpoint={cfg.rdzv_endpoint}", "--rdzv_backend=c10d"]
        if cfg.rdzv_endpoint
        else ["--standalone"]
    )
    return [*cmd, "-m", module]
