"""Training prompts: file formats, clear errors, and a resumable world-size-independent order."""

import json

import pandas as pd
import pytest

from trainer.data import PromptSampler, drop_overlong, encode_prompts, load_prompts


def test_formats(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"prompt": "1+1="}\n\n{"question": "2+2="}\n')
    assert load_prompts(tmp_path / "a.jsonl") == ["1+1=", "2+2="]
    (tmp_path / "b.json").write_text(json.dumps([{"problem": "x"}]))
    assert load_prompts(tmp_path / "b.json") == ["x"]
    chat = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    pd.DataFrame({"prompt": [chat]}).to_parquet(tmp_path / "c.parquet")
    assert load_prompts(tmp_path / "c.parquet") == [chat]  # chat format: the whole conversation
    (tmp_path / "d.jsonl").write_text(json.dumps({"prompt": [{"role": "system", "content": "only"}]}) + "\n")
    with pytest.raises(ValueError, match="row 1: chat prompt has no non-empty user message"):
        load_prompts(tmp_path / "d.jsonl")
    (tmp_path / "e.jsonl").write_text(json.dumps({"prompt": [{"role": "user"}]}) + "\n")
    with pytest.raises(ValueError, match="row 1: chat prompt must be a list of"):
        load_prompts(tmp_path / "e.jsonl")


class _ChatTokenizer:
    """The slice of a HF tokenizer encode_prompts uses: chat templating and text -> ids (one id per char)."""

    chat_template = "chatml"

    def apply_chat_template(self, messages, add_generation_prompt, tokenize):
        assert add_generation_prompt and not tokenize
        body = "".join(f"<{m['role']}>{m['content']}" for m in messages)
        return body + "<assistant>"

    def __call__(self, text, add_special_tokens=True):
        assert not add_special_tokens  # the template already wrote every special token
        return {"input_ids": [ord(c) for c in text]}


def test_encode_prompts_renders_text_and_chat_prompts_with_the_template():
    tok = _ChatTokenizer()
    chat = [{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]
    ids = encode_prompts(tok, ["x", chat])
    assert ["".join(map(chr, i)) for i in ids] == ["<user>x<assistant>", "<system>s<user>u<assistant>"]


def test_encode_prompts_with_a_real_chat_template_gives_token_ids(tiny_pair):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_pair["teacher"])
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}={% endfor %}"
    # transformers 5's apply_chat_template(tokenize=True) returns a BatchEncoding: the ids must still be ints
    assert encode_prompts(tok, ["12+3", [{"role": "user", "content": "4"}]]) == [
        tok("12+3=", add_special_tokens=False)["input_ids"],
        tok("4=", add_special_tokens=False)["input_ids"],
    ]
    tok.chat_template = None
    assert encode_prompts(tok, ["1+1"]) == [tok("1+1")["input_ids"]]  # no template: the tokenizer's own BOS
    with pytest.raises(
        ValueError, match="prompt 0 is a chat conversation but the tokenizer has no chat template"
    ):
        encode_prompts(tok, [[{"role": "user", "content": "4"}]])


def test_drop_overlong_keeps_prompts_that_leave_room_for_the_response():
    assert drop_overlong([[1] * 3, [1] * 5, [1] * 4], 4) == ([0, 2], 1)
    assert drop_overlong([[1] * 9], None) == ([0], 0)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("", "no prompts"),
        ('{"prompt": "ok"}\n{"answer": "3"}\n', "row 2: missing or empty prompt"),
        ('{"prompt": "ok"}\nnot json\n', "row 2: not valid JSON"),
        ('{"prompt": "  "}\n', "row 1: missing or empty prompt"),
    ],
)
def test_bad_prompt_files_name_file_and_row(tmp_path, content, message):
    path = tmp_path / "p.jsonl"
    path.write_text(content)
    with pytest.raises(ValueError, match=message) as info:
        load_prompts(path)
    assert str(path) in str(info.value)


def test_missing_and_unsupported(tmp_path):
    with pytest.raises(FileNotFoundError):
        load_prompts(tmp_path / "nope.jsonl")
    (tmp_path / "p.csv").write_text("prompt\nx\n")
    with pytest.raises(ValueError, match="unsupported prompt file type"):
        load_prompts(tmp_path / "p.csv")


def test_sampler_is_deterministic_resumable_and_covers_each_epoch():
    s = PromptSampler(10, seed=3)
    seen, epoch, cursor = [], 0, 0
    for _ in range(5):
        idx, epoch, cursor = s.take(epoch, cursor, 4)
        seen += idx
    assert sorted(seen[:10]) == list(range(10)) and sorted(seen[10:20]) == list(range(10))
    # resuming from a saved (epoch, cursor) continues the same stream
    _, e2, c2 = s.take(0, 0, 8)
    assert s.take(e2, c2, 4)[0] == seen[8:12]


def test_trainer_leaves_out_prompts_whose_rollout_would_overflow_the_context(capsys):
    from types import SimpleNamespace

    from trainer.config import ConfigError, load_params
    from trainer.train import fit_prompts

    model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=10))
    params = load_params(None, {"rollout.max_new_tokens": 6})  # room for 4 prompt tokens
    assert fit_prompts([[1] * 4, [1] * 5, [2] * 2], model, params) == [[1] * 4, [2] * 2]
    assert "1 of 3 training prompts are longer than 4 tokens" in capsys.readouterr().err
    with pytest.raises(ConfigError, match="no training prompt fits"):
        fit_prompts([[1] * 5], model, params)


def test_prompt_rows_may_carry_a_grader_and_a_reference(tmp_path):
    """Rows of a failure bank's training share or a suite file: the grader and reference are for validation and
    the suites; training reads the prompt only."""
    rows = [
        {"prompt": "1+1=", "grader": "tool_call", "reference": [{"f": {"a": [1]}}]},
        {"prompt": [{"role": "user", "content": "u"}], "reward_model": {"ground_truth": '{"schema": {}}'},
         "grader": "json_schema"},
    ]  # fmt: skip
    (tmp_path / "a.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    assert load_prompts(tmp_path / "a.jsonl") == ["1+1=", [{"role": "user", "content": "u"}]]
    pd.DataFrame({"prompt": ["2+2="], "grader": ["exact"], "reference": ["4"]}).to_parquet(
        tmp_path / "b.parquet"
    )
    assert load_prompts(tmp_path / "b.parquet") == ["2+2="]
