"""The embedded default task: multi-step integer arithmetic with a worked chain and a ``\\boxed{}`` answer.

A problem is ``55+84-37+74=`` (2 or 3 operations, operands 10-99, ``+``/``-`` uniform, no negative intermediate
result); its gold response is the worked chain ``55+84=139 139-37=102 102+74=176 \\boxed{176}`` followed by EOS.
Everything is deterministic from one integer seed.

This module also builds the task's character-level tokenizer (HF ``tokenizers`` ``WordLevel`` with ``\\boxed{``
as one token, wrapped in :class:`~transformers.PreTrainedTokenizerFast`) and grades responses.

Prompt encoding: ``tokenizer(prompt)`` gives ``[<s>] + chars``. :func:`encode_prompts` left-pads a batch to one
width with ``<pad>`` and returns the attention mask, so any consumer that derives position ids from the mask sees
the same positions as training did. The teacher is also trained with a random number of extra ``<s>`` fillers in
front of the prompt, so the fixed-width trick of the feasibility probe (left-pad with *unmasked* ``<s>`` up to
:data:`PROMPT_WIDTH`, no mask needed) is in-distribution too.
"""

from __future__ import annotations

import random
import re
from collections.abc import Iterator
from dataclasses import dataclass

import torch
from tokenizers import AddedToken, Regex, Tokenizer, decoders, pre_tokenizers, processors
from tokenizers.models import WordLevel
from transformers import PreTrainedTokenizerFast

__all__ = [
    "BOXED",
    "MAX_OPS",
    "PROMPT_WIDTH",
    "Problem",
    "Splits",
    "build_tokenizer",
    "encode_prompts",
    "extract_boxed",
    "grade",
    "iter_problems",
    "make_splits",
    "sample_problem",
]

BOXED = "\\boxed{"
PAD, BOS, EOS, UNK = "<pad>", "<s>", "</s>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
# Ordinary symbols; every character of a prompt or response is one of these (``\boxed{`` is one token).
SYMBOLS = (*"0123456789", "+", "-", "=", " ", BOXED, "}")
MIN_OPERAND, MAX_OPERAND = 10, 99
MIN_OPS, MAX_OPS = 2, 3
PROMPT_WIDTH = 1 + MAX_OPS * 3 + 3
"""Tokens of the longest prompt with its ``<s>``: ``<s>`` + ``dd+dd-dd+dd=`` = 13."""

_BOXED_RE = re.compile(r"\\boxed\{(-?\d+)\}")
_PROMPT_RE = re.compile(r"^\d+([+-]\d+)+=$")


@dataclass(frozen=True)
class Problem:
    """One arithmetic problem.

    Attributes:
        prompt: e.g. ``"55+84-37+74="``.
        answer: the integer result, e.g. ``176``.
        response: the gold worked chain without EOS, e.g. ``"55+84=139 139-37=102 102+74=176 \\boxed{176}"``.
    """

    prompt: str
    answer: int
    response: str


@dataclass(frozen=True)
class Splits:
    """Disjoint problem sets: ``train`` prompts (distillation), ``val`` (checkpoint choice), ``eval`` (held out)."""

    train: list[Problem]
    val: list[Problem]
    eval: list[Problem]


# ------------------------------------------------------------------------------------------------ problems
def _solve(operands: list[int], ops: list[str]) -> tuple[int, list[str]] | None:
    """Evaluate left to right; return (answer, chain steps) or None if an intermediate result is negative."""
    acc = operands[0]
    steps = []
    for op, x in zip(ops, operands[1:], strict=True):
        new = acc + x if op == "+" else acc - x
        if new < 0:
            return None
        steps.append(f"{acc}{op}{x}={new}")
        acc = new
    return acc, steps


def sample_problem(rng: random.Random) -> Problem:
    """Draw one problem: 2 or 3 operations (50/50), operands uniform in [10, 99], ops uniform in ``+ -``.

    Draws that hit a negative intermediate result are rejected and redrawn (so 3-op problems end up slightly
    rarer than 2-op ones).
    """
    while True:
        n_ops = rng.randint(MIN_OPS, MAX_OPS)
        operands = [rng.randint(MIN_OPERAND, MAX_OPERAND) for _ in range(n_ops + 1)]
        ops = [rng.choice("+-") for _ in range(n_ops)]
        solved = _solve(operands, ops)
        if solved is None:
            continue
        answer, steps = solved
        prompt = str(operands[0]) + "".join(f"{o}{x}" for o, x in zip(ops, operands[1:], strict=True)) + "="
        return Problem(prompt=prompt, answer=answer, response=" ".join(steps) + f" {BOXED}{answer}}}")


def iter_problems(seed: int, exclude: set[str] | frozenset[str] = frozenset()) -> Iterator[Problem]:
    """An endless deterministic stream of problems whose prompts are not in ``exclude`` (may repeat otherwise)."""
    rng = random.Random(seed)
    while True:
        p = sample_problem(rng)
        if p.prompt not in exclude:
            yield p


def make_splits(seed: int, num_train: int, num_val: int, num_eval: int) -> Splits:
    """Draw ``num_eval`` + ``num_val`` + ``num_train`` distinct prompts from ``random.Random(seed)``.

    Eval is drawn first, then val, then train, so the eval set depends only on ``(seed, num_eval)`` and growing
    the train split never changes the held-out problems. No prompt appears twice anywhere.

    Raises:
        ValueError: a size is not positive.
    """
    for name, n in (("num_train", num_train), ("num_val", num_val), ("num_eval", num_eval)):
        if n <= 0:
            raise ValueError(f"task.{name} must be > 0, got {n}")
    rng = random.Random(seed)
    seen: set[str] = set()
    drawn: list[Problem] = []
    # ~6M distinct prompts exist, so this loop terminates quickly for any realistic size.
    while len(drawn) < num_eval + num_val + num_train:
        p = sample_problem(rng)
        if p.prompt not in seen:
            seen.add(p.prompt)
            drawn.append(p)
    return Splits(
        eval=drawn[:num_eval],
        val=drawn[num_eval : num_eval + num_val],
        train=drawn[num_eval + num_val :],
    )


# ----------------------------------------------------------------------------------------------- tokenizer
def build_tokenizer() -> PreTrainedTokenizerFast:
    """The task tokenizer: 20 tokens ``<pad> <s> </s> <unk> 0-9 + - = ␣ \\boxed{ }`` (ids in that order).

    ``tokenizer(text)`` prepends ``<s>``; ``add_special_tokens=False`` gives the bare symbols. Decoding fuses
    tokens back into the exact text. Padding side is left (prompts are left-padded for generation).
    """
    vocab = {tok: i for i, tok in enumerate((*SPECIAL_TOKENS, *SYMBOLS))}
    tk = Tokenizer(WordLevel(vocab=vocab, unk_token=UNK))
    # One piece per character, except that ``\boxed{`` stays whole.
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"\\boxed\{|."), behavior="isolated")
    tk.decoder = decoders.Fuse()
    tk.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A", pair=f"{BOS} $A $B", special_tokens=[(BOS, vocab[BOS])]
    )
    # Stock ``AutoTokenizer`` ignores this pipeline for a ``qwen2`` config: transformers 5 rebuilds the vocabulary
    # as ``Qwen2Tokenizer`` (Qwen's regex split + byte-level), which drops the space and splits ``\boxed{``.
    # Added tokens are matched on the raw text before any pre-tokenizer, so declaring the two symbols it mangles
    # as (non-special) added tokens makes both pipelines give the same ids; the other symbols are single printable
    # ASCII characters, which byte-level maps to themselves. Ids and vocabulary are unchanged.
    tk.add_tokens([AddedToken(t, normalized=False, special=False) for t in (" ", BOXED)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tk,
        bos_token=BOS,
        eos_token=EOS,
        pad_token=PAD,
        unk_token=UNK,
        padding_side="left",
        model_max_length=64,
    )


def encode_prompts(
    tokenizer: PreTrainedTokenizerFast, prompts: list[str], width: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Encode prompts as ``<s>`` + characters, left-padded with ``<pad>`` to a common width.

    Args:
        tokenizer: from :func:`build_tokenizer` (or its saved copy).
        prompts: task prompts such as ``"55+84-37="``.
        width: total width; ``None`` means the longest prompt in the batch. :data:`PROMPT_WIDTH` fits every
            task prompt, which gives fixed shapes across batches.

    Returns:
        ``(input_ids, attention_mask)``, both ``LongTensor [B, width]``; the mask is 0 on padding.

    Raises:
        ValueError: a prompt is not of the form ``d+d-d=`` or is longer than ``width``.
    """
    for p in prompts:
        if not _PROMPT_RE.match(p):
            raise ValueError(f"not a task prompt (expected digits joined by +/- and a final '='): {p!r}")
    ids = [tokenizer(p)["input_ids"] for p in prompts]
    w = max(len(x) for x in ids) if width is None else width
    if max(len(x) for x in ids) > w:
        raise ValueError(f"a prompt needs {max(len(x) for x in ids)} tokens, more than width={w}")
    input_ids = torch.full((len(ids), w), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(ids), w), dtype=torch.long)
    for i, x in enumerate(ids):
        input_ids[i, w - len(x) :] = torch.tensor(x)
        mask[i, w - len(x) :] = 1
    return input_ids, mask


# ----------------------------------------------------------------------------------------------- grading
def extract_boxed(text: str) -> int | None:
    """The integer in the last ``\\boxed{N}`` of ``text``, or None if there is none."""
    matches = _BOXED_RE.findall(text)
    return int(matches[-1]) if matches else None


def grade(response: str, answer: int | str) -> bool:
    """True iff the last ``\\boxed{N}`` in ``response`` equals the integer ``answer``."""
    got = extract_boxed(response)
    return got is not None and got == int(answer)
