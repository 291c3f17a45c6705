"""AdamW and the warm-up + cosine learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.optim.lr_scheduler import LambdaLR

from trainer.config import OptimConfig

__all__ = ["build_optimizer", "build_scheduler", "lr_factor"]


def build_optimizer(model: nn.Module, cfg: OptimConfig) -> torch.optim.AdamW:
    """AdamW over the trainable parameters. ``fused=None`` picks the fused kernel (CPU and CUDA support it in
    torch >= 2.4): it avoids the single-tensor loop's embedding-sized temporaries, which otherwise set the
    update's peak memory (perf-notes)."""
    params = [p for p in model.parameters() if p.requires_grad]
    fused = cfg.fused if cfg.fused is not None else True
    return torch.optim.AdamW(params, lr=cfg.lr, betas=cfg.betas, weight_decay=cfg.weight_decay, fused=fused)


def lr_factor(step: int, total_steps: int, cfg: OptimConfig) -> float:
    """Multiplier of the peak lr after ``step`` optimizer steps: linear warm-up over ``warmup_ratio * total``
    steps, then constant or cosine decay to ``min_lr_ratio``."""
    warmup = round(cfg.warmup_ratio * total_steps)
    if warmup and step < warmup:
        return (step + 1) / warmup
    if cfg.schedule == "constant":
        return 1.0
    progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
    return cfg.min_lr_ratio + (1.0 - cfg.min_lr_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def build_scheduler(optimizer: torch.optim.Optimizer, total_steps: int, cfg: OptimConfig) -> LambdaLR:
    return LambdaLR(optimizer, lambda s: lr_factor(s, total_steps, cfg))
