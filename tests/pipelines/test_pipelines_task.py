"""The embedded arithmetic task: problem format, splits, tokenizer round trip, prompt encoding and grading."""

import random
from pathlib import Path

import pytest
import torch
from transformers import AutoTokenizer, Qwen2Config

from pipelines.task import (
    BOXED,
    PROMPT_WIDTH,
    build_tokenizer,
    encode_prompts,
    extract_boxed,
    grade,
    make_splits,
    sample_problem,
)

torch.set_num_threads(1)


def _evaluate_left_to_right(prompt: str) -> tuple[int, list[int]]:
    tokens = prompt.rstrip("=").replace("-", " - ").replace("+", " + ").split()
    acc, partials = int(tokens[0]), []
    for op, x in zip(tokens[1::2], tokens[2::2], strict=True):
        acc = acc + int(x) if op == "+" else acc - int(x)
        partials.append(acc)
    return acc, partials


def test_sample_problem_gives_worked_chain_and_nonnegative_answer() -> None:
    """Prompts have 2-3 ops on 10-99; the chain recomputes each step and ends in \\boxed{answer}."""
    rng = random.Random(123)
    n_ops_seen = set()
    for _ in range(500):
        p = sample_problem(rng)
        answer, partials = _evaluate_left_to_right(p.prompt)
        assert p.answer == answer and min(partials) >= 0
        steps = p.response.split(" ")
        assert steps[-1] == f"{BOXED}{answer}}}"
        assert [int(s.split("=")[1]) for s in steps[:-1]] == partials
        n_ops_seen.add(len(partials))
        assert all(10 <= int(x) <= 99 for x in p.prompt.rstrip("=").replace("-", "+").split("+"))
    assert n_ops_seen == {2, 3}


def test_make_splits_are_disjoint_sized_and_deterministic() -> None:
    """Train/val/eval have the requested sizes, no prompt twice anywhere, and the same seed gives the same sets."""
    a = make_splits(7, num_train=2000, num_val=200, num_eval=500)
    b = make_splits(7, num_train=2000, num_val=200, num_eval=500)
    assert (len(a.train), len(a.val), len(a.eval)) == (2000, 200, 500)
    prompts = [p.prompt for p in a.train + a.val + a.eval]
    assert len(set(prompts)) == len(prompts)
    assert a == b
    c = make_splits(8, num_train=2000, num_val=200, num_eval=500)
    assert {p.prompt for p in c.eval} != {p.prompt for p in a.eval}


def test_make_splits_eval_does_not_depend_on_train_size() -> None:
    """Growing the train split leaves the held-out eval set unchanged."""
    small = make_splits(0, num_train=10, num_val=20, num_eval=50)
    big = make_splits(0, num_train=3000, num_val=20, num_eval=50)
    assert small.eval == big.eval and small.val == big.val


def test_make_splits_rejects_nonpositive_sizes() -> None:
    """A zero-size split is a configuration error naming the key."""
    with pytest.raises(ValueError, match=r"task\.num_val"):
        make_splits(0, num_train=10, num_val=0, num_eval=5)


def test_tokenizer_roundtrips_save_and_autotokenizer_offline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """After save_pretrained next to a Qwen2 config (as in every model directory), AutoTokenizer reloads (offline)
    the same vocab, specials and ids, and decodes to the same text. Without the config transformers would keep the
    saved pipeline and hide that a ``qwen2`` directory is rebuilt as ``Qwen2Tokenizer``."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    tok = build_tokenizer()
    tok.save_pretrained(tmp_path)
    Qwen2Config(vocab_size=len(tok)).save_pretrained(tmp_path)
    reloaded = AutoTokenizer.from_pretrained(tmp_path)
    assert len(reloaded) == len(tok) == 20
    assert reloaded.get_vocab() == tok.get_vocab()
    assert (reloaded.pad_token_id, reloaded.bos_token_id, reloaded.eos_token_id) == (0, 1, 2)
    assert reloaded.padding_side == "left"
    rng = random.Random(0)
    for _ in range(50):
        p = sample_problem(rng)
        text = p.prompt + p.response
        ids = reloaded(text)["input_ids"]
        assert ids == tok(text)["input_ids"]
        assert ids[0] == reloaded.bos_token_id and reloaded.unk_token_id not in ids
        assert reloaded.decode(ids, skip_special_tokens=True) == text


def test_tokenizer_keeps_boxed_as_one_token() -> None:
    """\\boxed{ is a single token; each other character is its own token."""
    tok = build_tokenizer()
    pieces = tok.convert_ids_to_tokens(tok("1+2=3 \\boxed{3}", add_special_tokens=False)["input_ids"])
    assert pieces == ["1", "+", "2", "=", "3", " ", BOXED, "3", "}"]


def test_encode_prompts_left_pads_to_fixed_width() -> None:
    """Prompts are <s>+chars right-aligned in PROMPT_WIDTH with <pad> masked out on the left."""
    tok = build_tokenizer()
    ids, mask = encode_prompts(tok, ["55+84=", "55+84-37+74="], width=PROMPT_WIDTH)
    assert ids.shape == mask.shape == (2, PROMPT_WIDTH)
    assert mask[1].all() and ids[1, 0] == tok.bos_token_id
    n_pad = PROMPT_WIDTH - 7
    assert (ids[0, :n_pad] == tok.pad_token_id).all() and not mask[0, :n_pad].any()
    assert ids[0, n_pad] == tok.bos_token_id and mask[0, n_pad:].all()
    assert tok.decode(ids[0], skip_special_tokens=True) == "55+84="


def test_encode_prompts_rejects_bad_prompts_and_narrow_width() -> None:
    """Non-task text and a width smaller than a prompt are clear errors."""
    tok = build_tokenizer()
    with pytest.raises(ValueError, match="not a task prompt"):
        encode_prompts(tok, ["what is 2+2?"])
    with pytest.raises(ValueError, match="width=5"):
        encode_prompts(tok, ["55+84-37+74="], width=5)


@pytest.mark.parametrize(
    ("response", "answer", "expected"),
    [
        ("55+84=139 139-37=102 \\boxed{102}", 102, True),
        ("55+84=139 139-37=102 \\boxed{102}", "102", True),
        ("\\boxed{5} then \\boxed{102}", 102, True),
        ("\\boxed{102} then \\boxed{5}", 102, False),
        ("\\boxed{-3}", -3, True),
        ("55+84=139 102", 102, False),
        ("\\boxed{10", 10, False),
        ("", 0, False),
    ],
)
def test_grade_uses_last_boxed_integer(response: str, answer: int | str, expected: bool) -> None:
    """Correct iff the last \\boxed{N} integer equals the answer."""
    assert grade(response, answer) is expected


def test_extract_boxed_returns_none_without_box() -> None:
    """No box -> None (graded wrong, not crashed)."""
    assert extract_boxed("no answer") is None
