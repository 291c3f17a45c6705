"""Turn an evaluate stage's per-problem results into failure-bank input rows (``oprd-ci failures collect``).

The evaluate stage writes, per (suite, role, problem), the k sampled responses and their grades
(``artifacts/eval/responses.jsonl``) and, per suite, the sha256 of the suite file it read
(``artifacts/eval/suites.json``). :func:`collect_failures` joins the rows of one suite and one role with that suite
file's problems (prompt, grader, reference) and keeps the problems the role failed: Avg@k = n_correct / k below
``below``. Each kept problem becomes one ``oprd-ci failures add`` input row (:data:`pipelines.failures.INPUT_FIELDS`):
its prompt, grader and reference, the first wrong response, ``version``/``model`` as given (the registry version
that was evaluated: the one the gate's ``fixed_failures`` counts against) and a ``source`` naming the evaluation.

The suite file must be the one the evaluation read (same sha256), so the rows join on the right prompts.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.failures import FailureBankError
from pipelines.suites import load_problems
from trainer.export import file_sha256

__all__ = ["CollectReport", "collect_failures"]

RESPONSES = "responses.jsonl"
SUITES = "suites.json"


@dataclass(frozen=True)
class CollectReport:
    """What :func:`collect_failures` found: problems of (suite, role) scored, the failures written, to ``out``."""

    suite: str
    role: str
    scored: int
    failed: int
    out: Path


def _responses(eval_dir: Path, suite: str, role: str) -> list[dict[str, Any]]:
    path = eval_dir / RESPONSES
    if not path.is_file():
        raise FailureBankError(f"{path}: no such file (run the evaluate stage first)")
    rows, pairs = [], set()
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise FailureBankError(f"{path}: line {n}: not valid JSON ({exc.msg})") from None
        pairs.add((row.get("suite"), row.get("role")))
        if row.get("suite") == suite and row.get("role") == role:
            rows.append(row)
    if not rows:
        have = ", ".join(f"{s}/{r}" for s, r in sorted(pairs)) or "none"
        raise FailureBankError(
            f"{path}: no results for suite {suite!r} role {role!r} (suite/role present: {have})"
        )
    return rows


def collect_failures(
    eval_dir: str | Path,
    suite: str,
    suite_file: str | Path,
    role: str,
    out: str | Path,
    *,
    below: float = 0.5,
    version: int | None = None,
    model: str | None = None,
) -> CollectReport:
    """Write the failures of ``role`` on ``suite`` (evaluated into ``eval_dir``) to ``out`` as bank input JSONL.

    A problem is a failure when ``n_correct / k < below`` (``below`` in (0, 1]; 0.5 = the policy's default
    ``fixed_min_avg_at_k``, so "failed" and "fixed" are the two sides of one threshold). Rows are in suite order.

    Raises :class:`FailureBankError` (nothing written) when the results or the suite file are missing, the suite
    file is not the one evaluated (sha256 differs from ``eval_dir/suites.json``), or a result names a problem the
    suite file does not have.
    """
    if not 0.0 < below <= 1.0:
        raise FailureBankError(f"--below must be in (0, 1], got {below}")
    eval_dir, suite_file = Path(eval_dir), Path(suite_file)
    results = _responses(eval_dir, suite, role)
    if not suite_file.is_file():
        raise FailureBankError(f"{suite_file}: no such suite file")
    records_path = eval_dir / SUITES
    records = json.loads(records_path.read_text()) if records_path.is_file() else {}
    evaluated = (records.get(suite) or {}).get("digest")
    if evaluated is None:
        raise FailureBankError(f"{records_path}: no digest recorded for suite {suite!r}")
    if file_sha256(suite_file) != evaluated:
        raise FailureBankError(
            f"{suite_file} is not the file suite {suite!r} was evaluated on (sha256 differs from {records_path})"
        )
    problems = {p.problem_id: p for p in load_problems(suite_file)}
    order = {pid: i for i, pid in enumerate(problems)}
    unknown = sorted({str(r["problem_id"]) for r in results} - set(problems))
    if unknown:
        raise FailureBankError(f"{suite_file}: no problem(s) {unknown[:5]} that the results name")
    rows = []
    for r in sorted(results, key=lambda r: order[str(r["problem_id"])]):
        correct = list(r["correct"])
        if sum(correct) / len(correct) >= below:
            continue
        p = problems[str(r["problem_id"])]
        wrong = next(resp for resp, ok in zip(r["responses"], correct, strict=True) if not ok)
        row: dict[str, Any] = {"id": p.problem_id, "prompt": p.prompt, "grader": p.grader, "reference": p.reference,
                               "response": wrong,
                               "source": f"evaluate {suite}/{role}: {sum(correct)} of {len(correct)} correct"}  # fmt: skip
        if version is not None:
            row["version"] = version
        if model is not None:
            row["model"] = model
        rows.append(row)
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows), encoding="utf-8")
    return CollectReport(suite, role, len(results), len(rows), out)
