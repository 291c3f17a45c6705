"""Process-group setup and FSDP2 sharding.

One code path for 1 process, for ``torchrun`` (any number of nodes) and for Ray Train workers: the environment
variables torchrun sets (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``...) decide, or the process group
Ray Train already initialized. Backend ``auto`` is NCCL on CUDA and gloo on
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
    "enable_activation_checkpointing",
    "init_distributed",
    "shard_model",
    "torchrun_command",
    "uses_fsdp_mixed_precision",
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
    """Initialize the default process group from torchrun's environment (idempotent).

    A group that is already initialized is used as it is: Ray Train's ``TorchTrainer`` creates it (``TorchConfig``
    backend) before the worker's loop runs, and sets ``LOCAL_RANK`` for the device; rank and world size then come
    from the group itself.
    """
    if dist.is_initialized():
        world, rank = dist.get_world_size(), dist.get_rank()
    else:
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


def enable_activation_checkpointing(model: nn.Module) -> nn.Module:
    """Non-reentrant activation checkpointing of every decoder layer (Hugging Face's own switch).

    Must run before :func:`shard_model`. transformers checkpoints each layer's ``forward`` (not ``__call__``), so
    FSDP2's all-gather hooks stay outside the recomputed region and run once per layer and pass. Only active
    with grad enabled in train mode: rollouts and no-grad passes keep their KV cache and cost.
    """
    kwargs = {"use_reentrant": False}
    if hasattr(model, "activation_checkpointing_enable"):  # transformers >= 5.2x
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)
    return model


def uses_fsdp_mixed_precision(env: DistEnv, bf16: bool) -> bool:
    """True where :func:`shard_model` applies FSDP2's bf16 ``MixedPrecisionPolicy`` (CUDA, more than 1 rank).

    On CPU the trainer keeps ``torch.autocast``: FSDP2's policy would all-gather bf16 parameters over gloo and run
    every op in bf16, including the ones autocast keeps in fp32 (softmax, norms), for no speed-up on CPU; and a
    world of 1 is not sharded at all, so autocast gives the same fp32-master / bf16-compute contract there.
    """
    return bf16 and env.distributed and env.device.type == "cuda"


def shard_model(
    model: nn.Module, env: DistEnv, *, reshard_after_forward: bool = True, bf16: bool = False
) -> nn.Module:
    """FSDP2: ``fully_shard`` each decoder block, then the root (embeddings, final norm and LM head).

    The root unit keeps tied embedding/LM-head weights together. Callers always invoke the root module's
    forward (see :mod:`trainer.hidden`), so the root's pre-forward hook all-gathers what the backbone needs.
    ``bf16`` on CUDA (see :func:`uses_fsdp_mixed_precision`): parameters stay fp32 shards (the optimizer's
    masters), are all-gathered and computed in bf16, and gradients are reduce-scattered in fp32.
    A world of 1 returns the model unchanged.
    """
    if not env.distributed:
        return model
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    mesh = init_device_mesh(env.device.type, (env.world_size,))
    kw: dict = {"mesh": mesh, "reshard_after_forward": reshard_after_forward}
    if uses_fsdp_mixed_precision(env, bf16):
        kw["mp_policy"] = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    blocks, _ = decoder_parts(model)
    for block in blocks:
        fully_shard(block, **kw)
    fully_shard(model, **kw)
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
