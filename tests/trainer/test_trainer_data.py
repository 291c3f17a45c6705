"""Training prompts: file formats, clear errors, and a resumable world-size-independent order."""

import json

import pandas as pd
import pytest

from trainer.data import PromptSampler, load_prompts


def test_formats(tmp_path):
    (tmp_path / "a.jsonl").write_text('{"prompt": "1+1="}\n\n{"question": "2+2="}\n')
    assert load_prompts(tmp_path / "a.jsonl") == ["1+1=", "2+2="]
    (tmp_path / "b.json").write_text(json.dumps([{"problem": "x"}]))
    assert load_prompts(tmp_path / "b.json") == ["x"]
    pd.DataFrame(
        {"prompt": [[{"role": "system", "content": "s"}, {"role": "user", "content": "u"}]]}
    ).to_parquet(tmp_path / "c.parquet")
    assert load_prompts(tmp_path / "c.parquet") == ["u"]  # chat format: the last user turn


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
