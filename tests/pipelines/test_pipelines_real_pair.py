"""The real-checkpoint path's inputs: the BPE teacher/student pair (stock HF loading, exact round trips,
determinism) and the verl-layout data files as shipped (DAPO-Math-17k prompts, the benchmark files)."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch
from tokenizers import Tokenizer
from transformers import AutoModelForCausalLM, AutoTokenizer

from pipelines.make_pair import CHAT_TEMPLATE, PairSpec, build_pair
from pipelines.suites import load_problems
from trainer.data import encode_prompts, load_prompts
from trainer.models import load_tokenizer

DATA = Path(__file__).resolve().parents[2] / "data"
DAPO = DATA / "dapo-math-17k.parquet"
SMALL = PairSpec(
    tokenizer_rows=1000, train_rows=120, val_rows=8, steps=4, student_step=2, batch_size=4, hidden_size=32,
    intermediate_size=64, num_hidden_layers=2, num_attention_heads=2, num_key_value_heads=1,
)  # fmt: skip
TRICKY = [
    "12+3=15 \\boxed{15}",
    "  leading and trailing spaces  ",
    "Tabs\tand\nnewlines\r\n\n and 'quotes' don't break",
    "Unicode: héllo wörld, 数学, ∑_{i=1}^n i², emoji 🙂",
    "$\\frac{a\\sqrt{b}}{c}$ where $a, b, c$ are pairwise relatively prime integers, find $a + b + c$.",
    "<|im_start|>user\nhi<|im_end|>\n",
]


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("pair")
    return out, build_pair(DAPO, out, SMALL)


def test_stock_autotokenizer_round_trips_text_and_matches_the_trained_bpe(pair) -> None:
    out, _ = pair
    raw = Tokenizer.from_file(str(out / "teacher" / "tokenizer.json"))  # what `tokenizers` trained
    dapo = [m[0]["content"] for m in pq.read_table(DAPO, columns=["prompt"]).column(0).to_pylist()[-200:]]
    for d in ("teacher", "student"):
        tok = AutoTokenizer.from_pretrained(out / d)  # stock loading, as TRL / pipeline() would do it
        assert type(tok).__name__ == "Qwen2Tokenizer" and len(tok) == 4096
        ours = load_tokenizer(out / d)  # the project's loader agrees
        for text in TRICKY + dapo:
            ids = tok(text)["input_ids"]
            assert ids == raw.encode(text).ids == ours(text)["input_ids"], text
            assert tok.decode(ids) == text  # exact round trip, spaces and \boxed{ included
        # Qwen's special tokens are single ids; EOS ends a chat turn, pad is <|endoftext|>; no BOS is added
        assert [tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_start|>", "<|im_end|>")] == [
            0,
            1,
            2,
        ]
        assert (tok.eos_token, tok.pad_token, tok.bos_token) == ("<|im_end|>", "<|endoftext|>", None)


def test_chat_template_renders_chatml_and_round_trips(pair) -> None:
    out, _ = pair
    tok = AutoTokenizer.from_pretrained(out / "teacher")
    assert tok.chat_template == CHAT_TEMPLATE
    chat = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "What is 2+2?"}]
    text = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=False)
    assert (
        text
        == "<|im_start|>system\nBe brief.<|im_end|>\n<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n"
    )
    ids = encode_prompts(tok, [chat])[0]
    assert tok.decode(ids) == text
    assert ids.count(1) == 3 and ids.count(2) == 2  # <|im_start|> x3, <|im_end|> x2, each one token


def test_models_load_with_stock_automodel_tied_and_teacher_is_the_better_lm(pair) -> None:
    out, info = pair
    t = AutoModelForCausalLM.from_pretrained(out / "teacher", use_safetensors=True)
    s = AutoModelForCausalLM.from_pretrained(out / "student", use_safetensors=True)
    assert type(t).__name__ == "Qwen2ForCausalLM" and t.config.tie_word_embeddings
    assert t.lm_head.weight.data_ptr() == t.model.embed_tokens.weight.data_ptr()
    assert t.generation_config.eos_token_id == [2, 0] and t.generation_config.pad_token_id == 0
    # same run, different steps: same shapes, different weights; the later step models held-out prompts better
    assert not torch.equal(t.model.layers[0].mlp.up_proj.weight, s.model.layers[0].mlp.up_proj.weight)
    nll = info["val_nll"]
    assert nll["teacher"] < nll["student"] < nll["init"]
    assert json.loads((out / "pair.json").read_text())["manifest_sha256"] == info["manifest_sha256"]


def test_pair_build_is_deterministic(pair, tmp_path) -> None:
    _, first = pair
    again = build_pair(DAPO, tmp_path, SMALL)
    assert again["manifest_sha256"] == first["manifest_sha256"]


def test_pair_rejects_a_student_step_outside_the_run(tmp_path) -> None:
    with pytest.raises(ValueError, match="student_step"):
        build_pair(DAPO, tmp_path, PairSpec(steps=4, student_step=4))


# ------------------------------------------------------------------------------ the shipped data files
def test_dapo_prompts_load_as_chat_conversations_and_encode_with_the_template(pair) -> None:
    out, _ = pair
    prompts = load_prompts(DAPO)
    assert len(prompts) == 17917
    assert prompts[0][0]["role"] == "user" and prompts[0][0]["content"].startswith("Solve the following math")
    tok = AutoTokenizer.from_pretrained(out / "student")
    ids = encode_prompts(tok, prompts[:2])
    assert all(isinstance(i, int) for i in ids[0])
    assert (
        tok.decode(ids[0])
        == f"<|im_start|>user\n{prompts[0][0]['content']}<|im_end|>\n<|im_start|>assistant\n"
    )


def test_verl_parquet_loads_as_a_suite_with_nested_answer_and_index() -> None:
    problems = load_problems(DAPO, limit=5)
    first = pq.read_table(DAPO).slice(0, 5).to_pylist()
    assert [p.problem_id for p in problems] == [r["extra_info"]["index"] for r in first]
    assert [p.answer for p in problems] == [r["reward_model"]["ground_truth"] for r in first]
    assert problems[0].answer == "34" and problems[0].prompt == first[0]["prompt"][0]["content"]
    assert len({p.problem_id for p in load_problems(DAPO)}) == 17917  # the index is unique over the file


@pytest.mark.parametrize(("name", "ids"), [("AIME24", ["0", "1"]), ("AIME25", ["0", "1"]), ("AIMO", None)])
def test_shipped_benchmarks_load(name: str, ids: list[str] | None) -> None:
    problems = load_problems(DATA / "benchmarks" / f"{name}.json")
    rows = json.loads((DATA / "benchmarks" / f"{name}.json").read_text())
    assert [p.answer for p in problems] == [str(r["answer"]) for r in rows]
    if ids is not None:
        assert [p.problem_id for p in problems[:2]] == ids
    else:
        assert [p.problem_id for p in problems] == [str(r["id"]) for r in rows]
