"""Suite loading: formats, column mapping, limits, and clear errors for malformed files."""

from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from prefix_grader import prefix_grader_fixture  # noqa: F401 (the prefix_grader fixture)

from pipelines.suites import SuiteFormatError, load_problems, load_suite, suite_record, suite_tags
from trainer.config import EvalSuite

BENCH = Path(__file__).resolve().parents[2] / "data" / "benchmarks"


@pytest.mark.parametrize(("name", "count"), [("AIME24", 30), ("AIME25", 30), ("AIMO", 83)])
def test_bundled_benchmarks_load(name: str, count: int) -> None:
    problems = load_problems(BENCH / f"{name}.json")
    assert len(problems) == count
    assert len({p.problem_id for p in problems}) == count
    assert all(p.prompt and p.answer for p in problems)


def test_aime25_without_ids_uses_row_numbers_and_aimo_keeps_float_answers() -> None:
    aime25 = load_problems(BENCH / "AIME25.json")
    assert [p.problem_id for p in aime25[:3]] == ["0", "1", "2"]
    assert aime25[0].answer == "70"
    assert load_problems(BENCH / "AIMO.json")[0].answer == "142.0"


def test_column_aliases_across_formats(tmp_path: Path) -> None:
    rows = [
        {"problem": "1+1=", "solution": "so \\boxed{2}", "unique_id": "a"},
        {"question": "2+2=", "final_answer": 4},
    ]
    jsonl = tmp_path / "s.jsonl"
    jsonl.write_text("\n".join(json.dumps(r) for r in rows) + "\n\n")
    got = load_problems(jsonl)
    assert [(p.problem_id, p.prompt, p.answer) for p in got] == [
        ("a", "1+1=", "so \\boxed{2}"),
        ("1", "2+2=", "4"),
    ]

    wrapped = tmp_path / "s.json"
    wrapped.write_text(json.dumps({"data": rows}))
    assert load_problems(wrapped) == got

    parquet = tmp_path / "s.parquet"
    chat = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "3+3="}]
    chat2 = [{"role": "user", "content": "4+4="}]
    pq.write_table(
        pa.Table.from_pylist([{"prompt": chat, "answer": "6"}, {"prompt": chat2, "answer": "8"}]), parquet
    )
    assert [(p.prompt, p.answer) for p in load_problems(parquet)] == [("3+3=", "6"), ("4+4=", "8")]


def test_limit_and_embedded_suite(tmp_path: Path) -> None:
    eval_jsonl = tmp_path / "eval.jsonl"
    eval_jsonl.write_text(
        "".join(
            json.dumps({"id": f"e{i}", "prompt": f"{i}+1=", "answer": str(i + 1)}) + "\n" for i in range(5)
        )
    )
    suite = load_suite(EvalSuite(name="embedded", limit=2), eval_jsonl)
    assert suite.embedded and [p.problem_id for p in suite.problems] == ["e0", "e1"]
    assert len(suite.digest) == 64
    bench = load_suite(EvalSuite(name="aime24", path=str(BENCH / "AIME24.json"), limit=3), eval_jsonl)
    assert not bench.embedded and len(bench.problems) == 3


@pytest.mark.parametrize(
    ("name", "content", "match"),
    [
        (
            "a.jsonl",
            '{"prompt": "1+1=", "answer": "2"}\n{"prompt": "2+2="}\n',
            r"a\.jsonl: row 2: no answer field",
        ),
        (
            "b.jsonl",
            '{"prompt": "1+1=", "answer": null}\n',
            r"b\.jsonl: row 1: answer field 'answer' is empty",
        ),
        ("c.jsonl", '{"prompt": "1+1=", "answer": "  "}\n', r"row 1: answer field 'answer' is empty"),
        ("d.jsonl", '{"answer": "2"}\n', r"d\.jsonl: row 1: no prompt field \(looked for prompt, problem"),
        ("e.jsonl", '{"prompt": "1+1=", "answer": "2"}\n{oops\n', r"e\.jsonl: line 2: not valid JSON"),
        ("f.json", '{"prompt": "1+1="}', r"f\.json: expected a list of problems or an object"),
        ("g.json", '[{"prompt": "x", "answer": "1"}, [1, 2]]', r"g\.json: row 2: expected an object"),
        ("h.json", "[]", r"h\.json: no problems"),
        (
            "i.json",
            '[{"id": 1, "prompt": "x", "answer": "1"}, {"id": 1, "prompt": "y", "answer": "2"}]',
            "row 2: duplicate id '1'",
        ),
        ("j.csv", "prompt,answer\n", r"unsupported suite format '\.csv'"),
        ("k.jsonl", '{"prompt": "", "answer": "2"}\n', r"row 1: field 'prompt' is empty"),
        ("l.jsonl", '{"prompt": "1+1=", "answer": true}\n', r"row 1: answer field 'answer' is empty or not"),
    ],
)
def test_malformed_files_name_file_row_and_field(tmp_path: Path, name: str, content: str, match: str) -> None:
    path = tmp_path / name
    path.write_text(content)
    with pytest.raises(SuiteFormatError, match=match):
        load_problems(path)


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"nope\.jsonl"):
        load_problems(tmp_path / "nope.jsonl")


def test_verl_layout_and_common_id_columns(tmp_path: Path) -> None:
    rows = [
        {"data_source": "x", "prompt": [{"role": "user", "content": "1+1="}],
         "reward_model": {"ground_truth": "2", "style": "rule"}, "extra_info": {"index": "a-1"}},
        {"data_source": "x", "prompt": [{"role": "user", "content": "2+2="}],
         "reward_model": {"ground_truth": "4", "style": "rule"}, "extra_info": {"index": "a-2"}},
    ]  # fmt: skip
    parquet = tmp_path / "verl.parquet"
    pq.write_table(pa.Table.from_pylist(rows), parquet)
    got = [(p.problem_id, p.prompt, p.answer) for p in load_problems(parquet)]
    assert got == [("a-1", "1+1=", "2"), ("a-2", "2+2=", "4")]
    # a top-level id column wins over extra_info.index; problem_idx is an id column too
    jsonl = tmp_path / "ids.jsonl"
    jsonl.write_text(
        json.dumps({"problem": "p", "answer": "1", "problem_idx": 7}) + "\n"
        + json.dumps({"problem": "q", "answer": "2", "id": "z", "extra_info": {"index": "ignored"}}) + "\n"
    )  # fmt: skip
    assert [p.problem_id for p in load_problems(jsonl)] == ["7", "z"]
    broken = tmp_path / "broken.jsonl"
    broken.write_text(json.dumps({"prompt": "p", "reward_model": {"style": "rule"}}) + "\n")
    with pytest.raises(SuiteFormatError, match="row 1: no answer field"):
        load_problems(broken)


def test_rows_name_their_grader_and_carry_structured_references(tmp_path: Path, prefix_grader: str) -> None:
    rows = [
        {"id": "obj", "prompt": "a", "reference": {"prefix": "1"}},  # a JSON object, the suite's grader
        {"id": "txt", "prompt": "b", "reference": '{"prefix": "2"}'},  # the JSON text of one
        {"id": "m", "prompt": "c", "answer": 3.0, "grader": "math"},  # a row's grader wins over the suite's
        {"id": "verl", "prompt": [{"role": "user", "content": "d"}],  # verl: ground_truth holds JSON text
         "reward_model": {"ground_truth": '{"prefix": "4"}', "style": "rule"}},
    ]  # fmt: skip
    jsonl = tmp_path / "tools.jsonl"
    jsonl.write_text("".join(json.dumps(r) + "\n" for r in rows))
    suite = load_suite(EvalSuite(name="tools", path=str(jsonl), grader=prefix_grader), tmp_path / "unused")
    got = [(p.problem_id, p.prompt, p.grader, p.reference) for p in suite.problems]
    assert got == [
        ("obj", "a", prefix_grader, {"prefix": "1"}),
        ("txt", "b", prefix_grader, {"prefix": "2"}),
        ("m", "c", "math", "3.0"),
        ("verl", "d", prefix_grader, {"prefix": "4"}),
    ]
    assert suite.problems[0].answer == '{"prefix": "1"}'  # the display form of a structured reference
    assert suite.graders == {"math": "1", prefix_grader: "7"}
    record = suite_record(suite)
    assert record == {"digest": suite.digest, "graders": {"math": "1", prefix_grader: "7"}}
    assert suite_tags({"tools": record}) == {
        "oprd.eval.tools.grader": f"math,{prefix_grader}",
        "oprd.eval.tools.grader_version": "1,7",
        "oprd.eval.tools.digest": suite.digest,
    }
    # parquet: a structured reference as JSON text (a struct column would gain the other rows' keys as nulls)
    parquet = tmp_path / "tools.parquet"
    pq.write_table(pa.Table.from_pylist([{"prompt": "a", "reference": '{"prefix": "1"}', "grader": prefix_grader}]),
                   parquet)  # fmt: skip
    assert load_problems(parquet)[0].reference == {"prefix": "1"}


@pytest.mark.parametrize(
    ("row", "match"),
    [
        ({"prompt": "p", "reference": {"prefx": "1"}}, r"grader 'prefix_test': bad reference in 'reference': "
         r"reference must be an object with a string 'prefix'"),
        ({"prompt": "p", "reference": "{not json"}, r"grader 'prefix_test': bad reference.*not valid JSON"),
        ({"prompt": "p", "answer": "1", "grader": "maht"}, r"unknown grader 'maht'.*did you mean 'math'"),
        ({"prompt": "p", "answer": {"x": 1}, "grader": "math"}, r"answer field 'answer' is empty or not a string"),
    ],
)  # fmt: skip
def test_a_bad_reference_names_the_suite_file_row_and_grader_message(
    tmp_path: Path, prefix_grader: str, row: dict, match: str
) -> None:
    path = tmp_path / "tools.jsonl"
    path.write_text(json.dumps({"prompt": "ok", "reference": {"prefix": ""}}) + "\n" + json.dumps(row) + "\n")
    with pytest.raises(SuiteFormatError, match=rf"^suite 'tools': {path}: row 2: {match}"):
        load_suite(EvalSuite(name="tools", path=str(path), grader=prefix_grader), tmp_path / "unused")
