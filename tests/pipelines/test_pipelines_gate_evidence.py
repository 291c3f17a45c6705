"""The gate's evidence carries how each suite was scored (digest, grader names and versions), in the registry's
schema, and evidence written before that field existed stays valid."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from pydantic import ValidationError

from pipelines.stage_gate import _grader_lines, build_evidence
from server.schemas import EvidenceBody, EvidenceIn
from trainer.config import load_params


def _per_problem(path: Path) -> Path:
    rows = [
        {"suite": s, "role": role, "problem_id": f"p{i}", "k": 2, "n_correct": i % 3, "mean_length": 5.0}
        for s in ("embedded", "tools") for role in ("student", "teacher", "student_base") for i in range(3)
    ]  # fmt: skip
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_evidence_records_each_suites_digest_and_graders(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.chdir(tmp_path)  # build_evidence reads metrics/distill.json relative to the project root
    records = {
        "embedded": {"digest": "a" * 64, "graders": {"math": "1"}},
        "tools": {"digest": "b" * 64, "graders": {"exact": "1", "math": "1"}},
        "dropped": {
            "digest": "c" * 64,
            "graders": {"math": "1"},
        },  # evaluated but not in per_problem: not evidence
    }
    (tmp_path / "suites.json").write_text(json.dumps(records))
    params = load_params(None, {"models.embedded": False})
    evidence = build_evidence(
        params, tmp_path / "store", _per_problem(tmp_path / "pp.jsonl"), tmp_path / "suites.json"
    )
    assert evidence["lineage"]["eval_suites"] == {k: records[k] for k in ("embedded", "tools")}
    # the untrained student's rows are the suite's "base" (the min_gap_closed criterion reads them)
    assert set(evidence["suites"]["embedded"]) == {"candidate", "teacher", "base"}
    assert [r["n_correct"] for r in evidence["suites"]["tools"]["base"]] == [0, 1, 2]
    parsed = EvidenceIn.model_validate(evidence)  # the registry's own schema accepts it and keeps it
    assert parsed.lineage.eval_suites["tools"].graders == {"exact": "1", "math": "1"}
    # stored as the registry stores it (server.gating: an EvidenceBody's JSON payload) and read back
    stored = EvidenceBody(suites=parsed.suites, cost=parsed.cost, lineage=parsed.lineage).model_dump(
        mode="json"
    )
    assert EvidenceBody.model_validate(stored).lineage.eval_suites == parsed.lineage.eval_suites
    assert _grader_lines(evidence["lineage"]["eval_suites"]) == [
        f"- suite embedded: graded by `math` v1 on file `{'a' * 12}`",
        f"- suite tools: graded by `exact` v1, `math` v1 on file `{'b' * 12}`",
    ]
    # an evaluate stage of before (no suites.json): evidence without the record, still valid
    old = build_evidence(params, tmp_path / "store", tmp_path / "pp.jsonl", tmp_path / "missing.json")
    assert old["lineage"]["eval_suites"] == {}
    del old["lineage"]["eval_suites"]
    assert EvidenceIn.model_validate(old).lineage.eval_suites == {}
    # names are allowlisted like every name the registry stores
    evidence["lineage"]["eval_suites"]["tools"]["graders"] = {"../x": "1"}
    with pytest.raises(ValidationError, match="graders"):
        EvidenceIn.model_validate(evidence)
