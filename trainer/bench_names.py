"""The benchmark's choice lists, importable without torch (the CLI builds its help text from them at start-up)."""

from __future__ import annotations

__all__ = ["DTYPES", "METHODS", "OPTIMIZERS"]

METHODS: tuple[str, ...] = ("oprd", "opd_sampled", "opd_topk", "full_kl", "full_kl_chunked", "floor")
OPTIMIZERS: tuple[str, ...] = ("adamw-fused", "adamw-foreach", "adamw")
DTYPES: tuple[str, ...] = ("fp32", "bf16")
