"""Training prompts: loading, encoding, and a resumable, world-size-independent sampling order."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import torch
from transformers import PreTrainedTokenizerBase

__all__ = ["Prompt", "PromptSampler", "drop_overlong", "encode_prompts", "load_prompts", "mix_prompts"]

PROMPT_COLUMNS = ("prompt", "problem", "question")

Prompt = str | list[dict[str, str]]
"""A plain-text prompt, or a chat conversation: ``[{"role": ..., "content": ...}, ...]`` (verl / DAPO layout)."""


def _chat(value: list, where: str) -> list[dict[str, str]] | None:
    """The messages of a chat-format prompt as plain ``{"role", "content"}`` dicts; ``None`` if malformed."""
    messages = []
    for m in value:
        if (
            not isinstance(m, dict)
            or not isinstance(m.get("role"), str)
            or not isinstance(m.get("content"), str)
        ):
            return None
        messages.append({"role": m["role"], "content": m["content"]})
    if not any(m["role"] == "user" and m["content"].strip() for m in messages):
        raise ValueError(f"{where}: chat prompt has no non-empty user message")
    return messages


def load_prompts(path: str | Path) -> list[Prompt]:
    """Prompts from a ``.jsonl`` / ``.json`` / ``.parquet`` file with a ``prompt`` (or ``problem`` / ``question``)
    column.

    A text prompt is returned as a string. A chat-format prompt (a list of ``{"role", "content"}`` messages, as in
    verl-layout parquet such as DAPO-Math-17k) is returned as the whole conversation, system turns included;
    :func:`encode_prompts` renders it with the tokenizer's chat template, as ``apply_chat_template`` users expect.

    Other columns are ignored: rows may carry a ``grader`` and a ``reference`` (suite rows, a failure bank's
    training share), which validation and ``precheck`` use (``pipelines.suites``) and training does not.

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
            messages = _chat(value, f"{path}: row {i}")
            if messages is None:
                raise ValueError(
                    f"{path}: row {i}: chat prompt must be a list of {{'role', 'content'}} strings"
                )
            prompts.append(messages)
            continue
        if not isinstance(value, str) or not value.strip():
            raise ValueError(
                f"{path}: row {i}: missing or empty prompt (looked for columns {', '.join(PROMPT_COLUMNS)})"
            )
        prompts.append(value)
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def mix_prompts(base: list[Prompt], extra: list[Prompt], ratio: float) -> list[Prompt]:
    """``base`` plus ``extra`` repeated cyclically so that extras are ``ratio`` of the returned pool.

    With ``n = len(base)`` the pool gains ``round(ratio * n / (1 - ratio))`` extras (cycling through ``extra`` in
    order, so each appears ``floor`` or ``ceil`` of the average number of times): :class:`PromptSampler` then draws
    them at that share per epoch. ``ratio == 0`` or no ``extra`` returns ``base`` itself (unchanged training).
    """
    if not 0.0 <= ratio < 1.0:
        raise ValueError(f"mixing ratio must be in [0, 1), got {ratio}")
    if not extra or ratio == 0.0:
        return base
    count = round(ratio * len(base) / (1.0 - ratio))
    return [*base, *(extra[i % len(extra)] for i in range(count))]


def encode_prompts(tokenizer: PreTrainedTokenizerBase, prompts: list[Prompt]) -> list[list[int]]:
    """Token ids per prompt.

    With a chat template: a text prompt becomes one user turn, a chat prompt keeps its messages; the template is
    rendered with the generation prompt added and tokenized without extra special tokens (the template wrote
    them). Without one: a text prompt is ``tokenizer(text)`` (its own convention, e.g. a BOS), and a chat prompt is
    an error, since there is no faithful way to render it.
    """
    template = getattr(tokenizer, "chat_template", None)
    out = []
    for i, p in enumerate(prompts):
        if isinstance(p, str) and not template:
            out.append(list(tokenizer(p)["input_ids"]))
            continue
        if not template:
            raise ValueError(
                f"prompt {i} is a chat conversation but the tokenizer has no chat template; use a tokenizer "
                "with one (models.tokenizer) or a prompt file with text prompts"
            )
        messages = [{"role": "user", "content": p}] if isinstance(p, str) else p
        # tokenize=False: transformers 5 returns a BatchEncoding (not ids) from a tokenizing apply_chat_template.
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
        out.append(list(tokenizer(text, add_special_tokens=False)["input_ids"]))
    return out


def drop_overlong(prompt_ids: list[list[int]], max_prompt_tokens: int | None) -> tuple[list[int], int]:
    """Indices of the prompts with at most ``max_prompt_tokens`` tokens, and how many were dropped.

    A prompt that leaves no room for the response inside the model's context cannot be rolled out; like verl's
    ``filter_overlong_prompts`` such prompts are left out of training (the caller reports the count).
    ``None`` keeps everything.
    """
    if max_prompt_tokens is None:
        return list(range(len(prompt_ids))), 0
    keep = [i for i, ids in enumerate(prompt_ids) if len(ids) <= max_prompt_tokens]
    return keep, len(prompt_ids) - len(keep)


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
