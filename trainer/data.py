"""Training prompts: loading, encoding, and a resumable, world-size-independent sampling order."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import torch
from transformers import PreTrainedTokenizerBase

__all__ = ["PromptSampler", "encode_prompts", "load_prompts"]

PROMPT_COLUMNS = ("prompt", "problem", "question")


def load_prompts(path: str | Path) -> list[str]:
    """Prompt strings from a ``.jsonl`` / ``.json`` / ``.parquet`` file with a ``prompt`` (or ``problem`` /
    ``question``) column. Chat-format prompts (a list of ``{"role", "content"}``) keep their last user turn.

    Errors name the file and the 1-based row: a missing or empty prompt is never silently skipped.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"prompt file not found: {path}")
    if path.suffix == ".parquet":
        rows = pd.read_parquet(path).to_dict("records")
    elif path.suffix == ".jsonl":
        rows = []
        for i, line in enumerate(path.read_text().splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise ValueError(f"{path}: row {i}: not valid JSON ({exc.msg})") from None
    elif path.suffix == ".json":
        data = json.loads(path.read_text())
        rows = data if isinstance(data, list) else data.get("data", data.get("rows"))
        if not isinstance(rows, list):
            raise ValueError(f"{path}: expected a JSON list of rows (or {{'data': [...]}})")
    else:
        raise ValueError(
            f"{path}: unsupported prompt file type {path.suffix!r}; use .jsonl, .json or .parquet"
        )
    prompts = []
    for i, row in enumerate(rows, start=1):
        if not isinstance(row, dict):
            raise ValueError(
                f"{path}: row {i}: expected an object with a 'prompt' field, got {type(row).__name__}"
            )
        col = next((c for c in PROMPT_COLUMNS if c in row), None)
        value = row.get(col) if col else None
        if hasattr(value, "tolist"):
            value = value.tolist()
        if isinstance(value, list):  # chat format
            users = [m.get("content") for m in value if isinstance(m, dict) and m.get("role") == "user"]
            value = users[-1] if users else None
        if not isinstance(value, str) or not value.strip():
            raise ValueError(
                f"{path}: row {i}: missing or empty prompt (looked for columns {', '.join(PROMPT_COLUMNS)})"
            )
        prompts.append(value)
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: list[str]) -> list[list[int]]:
    """Token ids per prompt: the chat template (generation prompt added) when the tokenizer has one, else the
    tokenizer's own special-token convention (e.g. a BOS)."""
    if getattr(tokenizer, "chat_template", None):
        return [
            list(
                tokenizer.apply_chat_template(
                    [{"role": "user", "content": p}], add_generation_prompt=True, tokenize=True
                )
            )
            for p in prompts
        ]
    return [list(ids) for ids in tokenizer(prompts)["input_ids"]]


class PromptSampler:
    """Epoch-wise shuffled prompt order, identical on every rank and for every world size.

    Each step takes the next ``per_step`` prompts of the global order; rank ``r`` of ``W`` uses the slice
    ``[r*per_step/W, (r+1)*per_step/W)``. The position (``epoch``, ``cursor``) is stored in checkpoints.
    """

    def __init__(self, num_prompts: int, seed: int):
        if num_prompts < 1:
            raise ValueError("no training prompts")
        self.n = num_prompts
        self.seed = seed

    def _perm(self, epoch: int) -> list[int]:
        g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
        return torch.randperm(self.n, generator=g).tolist()

    def take(self, epoch: int, cursor: int, per_step: int) -> tuple[list[int], int, int]:
        """The next ``per_step`` global indices and the new ``(epoch, cursor)``."""
        out: list[int] = []
        perm = self._perm(epoch)
        while len(out) < per_step:
            if cursor >= self.n:
                epoch, cursor = epoch + 1, 0
                perm = self._perm(epoch)
            take = min(per_step - len(out), self.n - cursor)
            out.extend(perm[cursor : cursor + take])
            cursor += take
        return out, epoch, cursor
