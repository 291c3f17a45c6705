"""The failure bank: ingestion (validation, all-or-nothing, dedupe, deterministic split), the training mix, the
regression suite files, the evidence and the "fixes N of M" record, and the ``oprd-ci failures`` commands."""

from __future__ import annotations

import json
import subprocess
import sys
from collections import Counter
from pathlib import Path

import pytest

from pipelines.failures import (
    FailureBankError,
    add_failures,
    load_bank,
    normalize_prompt,
    problem_key,
    split_of,
    write_regression_suite,
)
from pipelines.suites import load_problems
from trainer.config import Params
from trainer.data import PromptSampler, mix_prompts

ROOT = Path(__file__).resolve().parents[2]


def _write(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def _rows(n: int, start: int = 0, version: int | None = 1) -> list[dict]:
    return [{"prompt": f"{i}+{i}=", "reference": str(2 * i), "grader": "math", "version": version}
            for i in range(start, start + n)]  # fmt: skip


def _add(src: Path, bank: Path, suite: str = "prod", fraction: float = 0.5, **kw):
    return add_failures(src, suite, bank_path=bank, regression_fraction=fraction, **kw)


# --------------------------------------------------------------------------------------------- ingestion
def test_bad_rows_are_named_and_nothing_is_written(tmp_path):
    bank = tmp_path / "failures" / "bank.jsonl"
    _add(_write(tmp_path / "ok.jsonl", _rows(3)), bank)
    before = bank.read_bytes()
    bad = _write(tmp_path / "bad.jsonl", [
        *_rows(2, start=10),                                    # rows 1-2 fine
        {"prompt": "1+1=", "reference": ""},                    # row 3: the grader's check_reference
        {"prompt": "1+2=", "refrence": "3"},                    # row 4: a typo is not dropped silently
        {"prompt": "1+3=", "reference": "4", "grader": "maths"},  # row 5: unknown grader
        {"prompt": "  ", "reference": "4"},                     # row 6: empty prompt
        {"prompt": "1+4=", "reference": "5", "version": "latest"},  # row 7: not a version number
    ])  # fmt: skip
    with pytest.raises(FailureBankError) as info:
        _add(bad, bank)
    msg = str(info.value)
    assert "5 bad row(s), nothing written" in msg and str(bad) in msg
    for row, what in [(3, "non-empty string reference"), (4, "refrence"), (5, "did you mean 'math'"),
                      (6, "prompt must be"), (7, "version")]:  # fmt: skip
        assert f"row {row}: " in msg and what in msg, (row, msg)
    assert "row 1:" not in msg and "row 2:" not in msg
    assert bank.read_bytes() == before  # the two good rows were not written either
    assert not [p for p in bank.parent.iterdir() if p.name.endswith(".tmp")]


def test_dedupe_by_normalized_prompt_within_the_file_and_against_the_bank(tmp_path):
    bank = tmp_path / "bank.jsonl"
    src = _write(tmp_path / "a.jsonl", [
        {"prompt": "What is  2+2?", "reference": "4", "version": 1},
        {"prompt": "what is 2+2?\n", "reference": "4", "version": 2, "source": "ticket-9"},  # same problem
        {"prompt": "What is 3+3?", "reference": "6", "version": 1},
    ])  # fmt: skip
    r = _add(src, bank)
    assert sum(r.added.values()) == 2 and r.merged_in_file == 1
    again = _write(tmp_path / "b.jsonl", [{"prompt": "WHAT IS 2+2?", "reference": "4", "version": 3}])
    r2 = _add(again, bank)
    assert sum(r2.added.values()) == 0 and r2.merged_with_bank == 1
    rows = load_bank(bank).rows
    assert len(rows) == 2
    dup = next(x for x in rows if x.id == problem_key("what is 2+2?")[:16])
    assert dup.versions() == [1, 2, 3]  # one problem, every version that failed it
    # the same prompt with another reference is a conflict, not a silent merge
    conflict = _write(tmp_path / "c.jsonl", [{"prompt": "what is 2+2?", "reference": "5"}])
    with pytest.raises(
        FailureBankError, match=r"row 1: same prompt as bank id .* different grader or reference"
    ):
        _add(conflict, bank)
    # ... and so is the same problem under another suite (it would be in two suites)
    with pytest.raises(FailureBankError, match="in suite 'prod', not 'other'"):
        _add(again, bank, suite="other")


def test_split_is_deterministic_by_hash_and_never_both(tmp_path):
    src = _write(tmp_path / "f.jsonl", _rows(200))
    a, b = tmp_path / "a" / "bank.jsonl", tmp_path / "b" / "bank.jsonl"
    _add(src, a, fraction=0.3)
    _add(_write(tmp_path / "rev.jsonl", list(reversed(_rows(200)))), b, fraction=0.3)  # order-independent
    assert a.read_bytes() == b.read_bytes()
    bank = load_bank(a)
    for r in bank.rows:  # the split is the hash rule, not the row order
        assert r.split == split_of(problem_key(r.prompt), 0.3)
    train = {r.id for r in bank.split("train")}
    reg = {r.id for r in bank.split("regression")}
    assert not train & reg and len(train | reg) == 200
    assert 40 <= len(reg) <= 80  # ~0.3 of 200 (binomial; the hash is fixed, so this is exact every run)
    # A later ingestion with another fraction never moves a recorded problem to the other split
    _add(src, a, fraction=1.0)
    assert {r.id for r in load_bank(a).split("train")} == train
    assert split_of("0" * 64, 0.0) == "train" and split_of("f" * 64, 1.0) == "regression"


def test_normalization():
    assert normalize_prompt("  Ｈello\tWORLD \n") == normalize_prompt("hello world")
    chat = [{"role": "system", "content": "Be brief"}, {"role": "user", "content": "Hi  there"}]
    assert normalize_prompt(chat) == "system: be brief\nuser: hi there"


def test_bank_digest_changes_with_content_and_suite_names_are_checked(tmp_path):
    bank = tmp_path / "bank.jsonl"
    r1 = _add(_write(tmp_path / "a.jsonl", _rows(2)), bank)
    assert load_bank(bank).digest == r1.digest
    r2 = _add(_write(tmp_path / "b.jsonl", _rows(2, start=5)), bank)
    assert r2.digest != r1.digest == r1.digest
    with pytest.raises(FailureBankError, match="already an evaluate suite"):
        _add(
            _write(tmp_path / "c.jsonl", _rows(1, start=9)),
            bank,
            suite="embedded",
            reserved_suites=["embedded"],
        )
    with pytest.raises(FailureBankError, match="suite name"):
        _add(_write(tmp_path / "d.jsonl", _rows(1, start=9)), bank, suite="../x")


# --------------------------------------------------------------------------------------------- training mix
def test_mix_prompts_ratio_and_identity():
    base = [f"b{i}" for i in range(300)]
    extra = ["f0", "f1", "f2"]
    pool = mix_prompts(base, extra, 0.25)
    assert pool[:300] == base and len(pool) == 400  # 100 extras = 0.25 of 400
    assert Counter(pool[300:]) == {"f0": 34, "f1": 33, "f2": 33}
    # what the trainer samples: the failures' share of one epoch of PromptSampler draws is exactly the ratio
    drawn, _, _ = PromptSampler(len(pool), seed=0).take(0, 0, len(pool))
    assert sum(pool[i].startswith("f") for i in drawn) / len(drawn) == 0.25
    assert mix_prompts(base, [], 0.25) is base and mix_prompts(base, extra, 0.0) is base
    with pytest.raises(ValueError, match="ratio"):
        mix_prompts(base, extra, 1.0)


def test_training_prompts_mix_only_the_training_share(tmp_path):
    from pipelines.failures_stages import training_prompts

    base = _write(tmp_path / "train.jsonl", [{"prompt": f"{i}-1="} for i in range(30)])
    bank = tmp_path / "bank.jsonl"
    params = Params.model_validate({"failures": {"bank": str(bank), "train_ratio": 0.5}})
    pool, used = training_prompts(params, base)
    assert used is None and len(pool) == 30  # empty bank: training unchanged
    _add(_write(tmp_path / "f.jsonl", _rows(40)), bank)
    b = load_bank(bank)
    pool, used = training_prompts(params, base)
    assert used is not None and used.digest == b.digest
    assert len(pool) == 60 and set(pool[30:]) == {r.prompt for r in b.split("train")}
    assert not set(pool) & {r.prompt for r in b.split("regression")}  # never trains on a regression problem


# --------------------------------------------------------------------------------------------- evaluate / gate
def test_regression_suite_file_is_an_ordinary_suite(tmp_path):
    bank = tmp_path / "bank.jsonl"
    _add(_write(tmp_path / "f.jsonl", _rows(30)), bank)
    b = load_bank(bank)
    path = write_regression_suite(b, "prod", tmp_path / "prod.jsonl")
    problems = load_problems(path)
    reg = b.split("regression", "prod")
    assert [p.problem_id for p in problems] == [r.id for r in reg]
    assert [p.answer for p in problems] == [r.reference for r in reg]
    rows = [json.loads(x) for x in path.read_text().splitlines()]
    assert all(r["grader"] == "math" and r["versions"] == [1] for r in rows)


def test_recorded_failures_and_fixes_lines(tmp_path):
    from pipelines.failures_stages import fixes_lines

    bank = tmp_path / "bank.jsonl"
    _add(_write(tmp_path / "f.jsonl", _rows(30, version=2) + _rows(10, start=100, version=3)), bank)
    b = load_bank(bank)
    rec = b.recorded_failures("prod")
    assert sorted(rec) == [2, 3]
    assert set(rec[2]) == {r.id for r in b.split("regression") if r.versions() == [2]}
    crit = [{"criterion": "fixed_failures", "suite": "prod", "status": "PASS", "detail": "fixes 2 of 3 failures of v2 (...)"},
            {"criterion": "floor", "suite": "prod", "status": "PASS", "detail": "x"}]  # fmt: skip
    assert fixes_lines(crit) == ["- suite `prod`: fixes 2 of 3 failures of v2 (...) (pass)"]


def test_decision_markdown_says_fixes_n_of_m(tmp_path):
    from pipelines.lineage import lineage_links
    from pipelines.stage_gate import decision_markdown

    stages = ("rollout", "distill", "evaluate", "gate")
    links = lineage_links("", model_name="m", version=4, experiment_id="1", run_ids={s: s for s in stages},
                          model_ids={r: r for r in ("teacher", "student_base", "student")})  # fmt: skip

    decision = {"verdict": "PROMOTE", "model": "m", "version": 4, "policy_version": 1, "policy_digest": "ab" * 32, "id": 9,
                "champion_version": 3, "criteria": [
                    {"criterion": "fixed_failures", "suite": "prod", "status": "PASS", "observed": 0.5,
                     "threshold": 0.5, "detail": "fixes 2 of 4 failures of v3 (50% >= 50%; ...)"}]}  # fmt: skip
    evidence = {"cost": {}, "lineage": {"teacher": "t@abc", "student_base": "def", "dataset_digests": {}}}
    md = decision_markdown(Params(), decision, {"version": {"manifest_sha256": "cd" * 32}}, evidence, links)
    assert "Failure bank:\n- suite `prod`: fixes 2 of 4 failures of v3" in md


# --------------------------------------------------------------------------------------------- CLI
def _cli(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    env = {"PYTHONPATH": str(ROOT), "PATH": str(Path(sys.executable).parent)}
    return subprocess.run([sys.executable, "-m", "oprd_ci", "failures", *args], cwd=cwd, env=env,
                          capture_output=True, text=True, check=False)  # fmt: skip


def test_cli_add_and_show(tmp_path):
    (tmp_path / "params.yaml").write_text("failures:\n  regression_fraction: 0.5\n")
    src = _write(tmp_path / "f.jsonl", _rows(20))
    r = _cli("add", str(src), "--suite", "prod", "--source", "prod logs", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    assert "suite 'prod':" in r.stdout and "git add failures/bank.jsonl" in r.stdout
    bank = load_bank(tmp_path / "failures" / "bank.jsonl")
    assert len(bank.rows) == 20 and all(r.failures[0]["source"] == "prod logs" for r in bank.rows)
    shown = json.loads(_cli("show", "--json", cwd=tmp_path).stdout)
    s = shown["suites"][0]
    assert shown["sha256"] == bank.digest and s["suite"] == "prod"
    assert (s["train"], s["regression"]) == (len(bank.split("train")), len(bank.split("regression")))
    table = _cli("show", cwd=tmp_path)
    assert table.returncode == 0 and "prod" in table.stdout and bank.digest[:12] in table.stdout
    bad = _write(tmp_path / "bad.jsonl", [{"prompt": "x", "reference": ""}])
    r = _cli("add", str(bad), "--suite", "prod", cwd=tmp_path)
    assert r.returncode == 2 and r.stderr.count("\n") == 1 and r.stderr.startswith("error: ")
    assert load_bank(tmp_path / "failures" / "bank.jsonl").digest == bank.digest
    r = _cli("show", "--suite", "nope", cwd=tmp_path)
    assert r.returncode == 2 and "no suite 'nope'" in r.stderr


def test_precheck_reports_a_hand_edited_bank_row(tmp_path):
    from pipelines.precheck import check_params

    bank = tmp_path / "bank.jsonl"
    _add(_write(tmp_path / "f.jsonl", _rows(3)), bank)
    params = Params.model_validate({"failures": {"bank": str(bank)}})
    assert not [p for p in check_params(params, check_tracking=False) if p.startswith("failures.bank")]
    rows = bank.read_text().splitlines()
    broken = json.loads(rows[1])
    broken["reference"] = ""  # a hand edit the grader refuses
    bank.write_text("\n".join([rows[0], json.dumps(broken), *rows[2:]]) + "\n")
    found = [p for p in check_params(params, check_tracking=False) if p.startswith("failures.bank")]
    assert len(found) == 1 and f"id {broken['id']}" in found[0] and "non-empty string reference" in found[0]


# --------------------------------------------------------------------------------------------- collect
def _evaluated(tmp_path: Path, grades: dict[str, list[bool]]) -> tuple[Path, Path]:
    """A suite file and the evaluate stage's outputs for it (the stage's own writers), role ``student``."""
    from pipelines.evaluation import ProblemResult, summarize, write_eval_outputs
    from pipelines.suites import load_suite, suite_record
    from trainer.config import EvalSuite

    suite_file = _write(tmp_path / "traffic.jsonl", [
        {"id": pid, "prompt": f"{i}+{i}=", "reference": str(2 * i), "grader": "math"}
        for i, pid in enumerate(grades)
    ])  # fmt: skip
    suite = load_suite(EvalSuite(name="traffic", path=str(suite_file)), None)
    rows = [ProblemResult(suite="traffic", role="student", problem_id=pid, k=len(ok), n_correct=sum(ok),
                          mean_length=3.0, responses=[f"\\boxed{{{j}}}" for j in range(len(ok))], correct=ok,
                          lengths=[3] * len(ok), grader="math", reasons=[""] * len(ok))
            for pid, ok in grades.items()]  # fmt: skip
    eval_dir = tmp_path / "eval"
    write_eval_outputs({"student": ({"traffic": summarize(rows, k=4, seed=0)}, rows)},
                       tmp_path / "eval.json", eval_dir / "per_problem.jsonl", eval_dir / "responses.jsonl")  # fmt: skip
    (eval_dir / "suites.json").write_text(json.dumps({"traffic": suite_record(suite)}))
    return suite_file, eval_dir


def test_collect_writes_the_failed_problems_as_bank_input(tmp_path):
    T, F = True, False
    grades = {"a": [F, F, F, F], "b": [T, T, F, F], "c": [T, F, F, F], "d": [T, T, T, T]}
    suite_file, eval_dir = _evaluated(tmp_path, grades)
    (tmp_path / "params.yaml").write_text("failures:\n  regression_fraction: 0.5\n")
    out = tmp_path / "incoming" / "v3.jsonl"
    r = _cli("collect", "--from", str(eval_dir), "--suite", "traffic", "--suite-file", str(suite_file),
             "--role", "student", "--version", "3", "--model", "m", "--out", str(out), cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0, r.stderr
    assert "2 of 4 problems of traffic/student failed" in r.stdout
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    # Avg@k below 0.5: a (0/4) and c (1/4); b (2/4) is not a failure at the default threshold
    assert [row["id"] for row in rows] == ["a", "c"]
    assert rows[1] == {"id": "c", "prompt": "2+2=", "grader": "math", "reference": "4", "response": "\\boxed{1}",
                       "source": "evaluate traffic/student: 1 of 4 correct", "version": 3, "model": "m"}  # fmt: skip
    r = _cli("add", str(out), "--suite", "prod", cwd=tmp_path)
    assert r.returncode == 0, r.stderr
    bank = load_bank(tmp_path / "failures" / "bank.jsonl")
    assert sorted(b.failures[0]["external_id"] for b in bank.rows) == ["a", "c"]
    assert all(b.versions() == [3] for b in bank.rows)
    r = _cli("collect", "--from", str(eval_dir), "--suite", "traffic", "--suite-file", str(suite_file),
             "--below", "0.75", "--out", str(tmp_path / "all.jsonl"), cwd=tmp_path)  # fmt: skip
    assert r.returncode == 0 and "3 of 4" in r.stdout


def test_collect_refuses_another_suite_file_or_role(tmp_path):
    suite_file, eval_dir = _evaluated(tmp_path, {"a": [False] * 4, "b": [True] * 4})
    out = tmp_path / "out.jsonl"
    args = ("collect", "--from", str(eval_dir), "--suite", "traffic", "--out", str(out))
    edited = _write(tmp_path / "edited.jsonl", [{"id": "a", "prompt": "9+9=", "reference": "18"},
                                                {"id": "b", "prompt": "1+1=", "reference": "2"}])  # fmt: skip
    r = _cli(*args, "--suite-file", str(edited), cwd=tmp_path)
    assert r.returncode == 2 and "is not the file suite 'traffic' was evaluated on" in r.stderr
    r = _cli(*args, "--suite-file", str(suite_file), "--role", "teacher", cwd=tmp_path)
    assert r.returncode == 2 and "no results for suite 'traffic' role 'teacher'" in r.stderr
    assert "traffic/student" in r.stderr and not out.exists()


def test_toolcall_requests_are_new_distinct_and_deterministic(tmp_path):
    import itertools

    from pipelines.task_toolcall import iter_problems
    from pipelines.toolcall_requests import main

    first = [p.prompt for p in itertools.islice(iter_problems(1), 30)]
    task = tmp_path / "task"
    task.mkdir()
    for name, prompts in (("train", first[:10]), ("val", first[10:20]), ("eval", first[20:])):
        _write(task / f"{name}.jsonl", [{"prompt": p} for p in prompts])
    out = tmp_path / "req.jsonl"
    assert main(["--seed", "1", "--num", "300", "--out", str(out), "--task-dir", str(task)]) == 0
    rows = [json.loads(line) for line in out.read_text().splitlines()]
    prompts = [r["prompt"] for r in rows]
    assert len(rows) == 300 == len(set(prompts)) and not set(prompts) & set(first)
    assert [p.problem_id for p in load_problems(out)] == [f"req-s1-{i:05d}" for i in range(300)]
    again = tmp_path / "again.jsonl"
    main(["--seed", "1", "--num", "300", "--out", str(again), "--task-dir", str(task)])
    assert again.read_bytes() == out.read_bytes()
    (task / "val.jsonl").unlink()
    assert main(["--seed", "1", "--num", "5", "--out", str(out), "--task-dir", str(task)]) == 2
