"""Evaluation suites: load problems (id, prompt, grader, reference) from the embedded set or a suite file.

Formats, chosen by the file extension:

* ``.jsonl``: one JSON object per line (blank lines skipped).
* ``.json``: a list of objects, or an object whose ``"data"``/``"rows"``/``"problems"`` key holds that list.
* ``.parquet``: one row per problem (read with pyarrow).

Column mapping (the first name present wins; rows are objects):

==========  =================================================================================
prompt      ``prompt``, ``problem``, ``question``, ``input``. A chat-style list of
            ``{"role", "content"}`` messages (verl parquet) gives the last user message.
answer      ``reference``, ``answer``, ``final_answer``, ``ground_truth``, ``gt``, ``target``,
            ``reward_model.ground_truth`` (verl), ``solution`` (a worked ``solution`` is fine: the
            ``math`` grader takes its last ``\\boxed{}``). The grader's reference: a string or number,
            or for structured graders a JSON object/list or the JSON text of one.
grader      ``grader``: the row's grader name (``pipelines.graders``); wins over the suite's
            ``grader`` (default ``math``). One suite may mix graders.
id          ``id``, ``problem_id``, ``problem_idx``, ``unique_id``, ``idx``, ``extra_info.index``
            (verl); else the 0-based row number.
==========  =================================================================================

A dotted name is a path into nested objects: ``reward_model.ground_truth`` is ``row["reward_model"]["ground_truth"]``
(verl's layout, e.g. DAPO-Math-17k: ``{"prompt": [messages], "reward_model": {"ground_truth": ...},
"extra_info": {"index": ...}, "data_source": ...}``).

Numbers as answers are kept as written in the file (``142.0`` stays ``"142.0"``; the grader compares numbers
exactly). A row without a prompt or an answer (missing, null or blank) is an error naming the file, the 1-based row
number and the missing field: problems are never silently skipped. Duplicate ids are an error too (per-problem
results are joined on them). Every reference is decoded and checked by its grader while loading
(``decode_reference`` + ``check_reference``): a bad one (a schema that is not a schema, tests that do not
compile, an unknown grader name) is a :class:`SuiteFormatError` naming the suite, the file, the row and the
grader's message, raised by the ``precheck`` stage before any model loads.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pipelines.graders import (
    DEFAULT_GRADER,
    InvalidReference,
    UnknownGrader,
    decode_reference,
    get_grader,
    grader_version,
)
from trainer.config import EvalSuite
from trainer.export import file_sha256

__all__ = [
    "ANSWER_COLUMNS",
    "ID_COLUMNS",
    "PROMPT_COLUMNS",
    "EvalProblem",
    "LoadedSuite",
    "SuiteFormatError",
    "check_prompt_references",
    "load_problems",
    "load_suite",
    "suite_record",
    "suite_tags",
]

PROMPT_COLUMNS = ("prompt", "problem", "question", "input")
ANSWER_COLUMNS = (
    "reference", "answer", "final_answer", "ground_truth", "gt", "target", "reward_model.ground_truth", "solution"
)  # fmt: skip
ID_COLUMNS = ("id", "problem_id", "problem_idx", "unique_id", "idx", "extra_info.index")
_LIST_KEYS = ("data", "rows", "problems")


class SuiteFormatError(ValueError):
    """A suite file that cannot be read as problems; the message names the file, row and field."""


@dataclass(frozen=True)
class EvalProblem:
    """One problem: ``problem_id`` unique within its suite, ``prompt`` as text, ``grader`` the name of its grader
    and ``reference`` what that grader compares against (decoded: a JSON object/list for structured graders).
    ``answer`` is the reference as a string (the ``math`` grader's input; JSON text for structured references),
    for display. ``reference=None`` means ``answer`` (the constructor of math problems in code)."""

    problem_id: str
    prompt: str
    answer: str
    grader: str = DEFAULT_GRADER
    reference: Any = None

    def __post_init__(self) -> None:
        if self.reference is None:
            object.__setattr__(self, "reference", self.answer)


@dataclass(frozen=True)
class LoadedSuite:
    """A suite ready to evaluate. ``digest`` is the sha256 of the file bytes (dataset identity for lineage).

    ``grader`` is the suite's default grader (rows may name others), ``prompt_suffix`` the suite's own suffix
    (``None``: the evaluate-level rule, see :class:`~trainer.config.EvalSuite`)."""

    name: str
    path: Path
    problems: list[EvalProblem]
    digest: str
    embedded: bool
    grader: str = DEFAULT_GRADER
    prompt_suffix: str | None = None

    @property
    def graders(self) -> dict[str, str]:
        """``{grader name: version}`` of the graders its problems use, sorted by name."""
        return {name: grader_version(name) for name in sorted({p.grader for p in self.problems})}


def _read_rows(path: Path) -> list[Any]:
    suffix = path.suffix.lower()
    if suffix == ".jsonl":
        rows = []
        for lineno, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as exc:
                raise SuiteFormatError(f"{path}: line {lineno}: not valid JSON: {exc.msg}") from None
        return rows
    if suffix == ".json":
        try:
            data = json.loads(path.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise SuiteFormatError(f"{path}: not valid JSON: {exc.msg} (line {exc.lineno})") from None
        if isinstance(data, dict):
            key = next((k for k in _LIST_KEYS if isinstance(data.get(k), list)), None)
            if key is None:
                raise SuiteFormatError(
                    f"{path}: expected a list of problems or an object with one of {list(_LIST_KEYS)} holding it"
                )
            data = data[key]
        if not isinstance(data, list):
            raise SuiteFormatError(f"{path}: expected a list of problems, got {type(data).__name__}")
        return data
    if suffix == ".parquet":
        import pyarrow.parquet as pq  # deferred: pyarrow is heavy and only parquet suites need it

        return pq.read_table(path).to_pylist()
    raise SuiteFormatError(f"{path}: unsupported suite format {suffix!r}; use .json, .jsonl or .parquet")


_MISSING = object()


def _lookup(row: dict[str, Any], name: str) -> Any:
    """``row[name]``, following dots into nested objects; :data:`_MISSING` when any level is absent."""
    node: Any = row
    for part in name.split("."):
        if not isinstance(node, dict) or part not in node:
            return _MISSING
        node = node[part]
    return node


def _first(row: dict[str, Any], names: tuple[str, ...]) -> tuple[str | None, Any]:
    for name in names:
        value = _lookup(row, name)
        if value is not _MISSING:
            return name, value
    return None, None


def _prompt_text(value: Any) -> str | None:
    if isinstance(value, str):
        return value
    if isinstance(value, list) and value and all(isinstance(m, dict) for m in value):
        users = [m.get("content") for m in value if m.get("role") == "user"]
        if users and isinstance(users[-1], str):
            return users[-1]
    return None


def _answer_text(value: Any) -> str | None:
    if isinstance(
        value, bool
    ):  # bool is an int subclass; a True/False answer is almost surely a wrong column
        return None
    if isinstance(value, (int, float)):
        return str(value)
    if isinstance(value, str):
        return value
    return None


def _reference(where: str, grader: str, a_col: str, a_val: Any) -> tuple[str, Any]:
    """``(answer string, decoded reference)`` of one row, checked by its grader; :class:`SuiteFormatError` else."""
    g = get_grader(grader)
    if hasattr(a_val, "tolist"):  # a parquet list/struct cell read through numpy
        a_val = a_val.tolist()
    if g.structured and isinstance(a_val, (dict, list)):
        answer = json.dumps(a_val, sort_keys=True)
    else:
        answer = _answer_text(a_val)
        if answer is None or not answer.strip():
            raise SuiteFormatError(
                f"{where}: answer field '{a_col}' is empty or not a string/number (got {a_val!r:.60})"
            )
        answer = answer.strip() if grader == DEFAULT_GRADER else answer
        a_val = answer
    try:
        reference = decode_reference(grader, a_val)
        g.check_reference(reference)
    except InvalidReference as exc:
        raise SuiteFormatError(f"{where}: grader {grader!r}: bad reference in '{a_col}': {exc}") from None
    return answer, reference


def _parse_row(path: Path, rownum: int, row: Any, grader: str = DEFAULT_GRADER) -> EvalProblem:
    where = f"{path}: row {rownum}"
    if not isinstance(row, dict):
        raise SuiteFormatError(
            f"{where}: expected an object with prompt/answer fields, got {type(row).__name__}"
        )
    p_col, p_val = _first(row, PROMPT_COLUMNS)
    if p_col is None:
        raise SuiteFormatError(
            f"{where}: no prompt field (looked for {', '.join(PROMPT_COLUMNS)}; has {', '.join(sorted(row)) or 'none'})"
        )
    prompt = _prompt_text(p_val)
    if prompt is None or not prompt.strip():
        raise SuiteFormatError(f"{where}: field '{p_col}' is empty or not text (got {p_val!r:.60})")
    a_col, a_val = _first(row, ANSWER_COLUMNS)
    if a_col is None:
        raise SuiteFormatError(
            f"{where}: no answer field (looked for {', '.join(ANSWER_COLUMNS)}; has {', '.join(sorted(row))})"
        )
    row_grader = row.get("grader")
    if row_grader is not None:
        if not isinstance(row_grader, str) or not row_grader.strip():
            raise SuiteFormatError(f"{where}: field 'grader' must be a grader name, got {row_grader!r:.60}")
        grader = row_grader.strip()
    try:
        answer, reference = _reference(where, grader, a_col, a_val)
    except UnknownGrader as exc:
        raise SuiteFormatError(f"{where}: {exc}") from None
    _, id_val = _first(row, ID_COLUMNS)
    problem_id = str(rownum - 1) if id_val is None or str(id_val).strip() == "" else str(id_val)
    return EvalProblem(
        problem_id=problem_id, prompt=prompt, answer=answer, grader=grader, reference=reference
    )


def load_problems(
    path: str | Path, *, limit: int | None = None, grader: str = DEFAULT_GRADER
) -> list[EvalProblem]:
    """Read a suite file into problems (first ``limit`` rows if given); see the module docstring for the rules.

    ``grader`` grades the rows that name none. Every row's reference is decoded and checked by its grader.

    Raises:
        FileNotFoundError: ``path`` does not exist.
        SuiteFormatError: unreadable file, malformed row, missing prompt/answer, unknown grader, bad reference,
            duplicate id, or no rows.
        pipelines.graders.UnknownGrader: ``grader`` itself is not registered.
    """
    path = Path(path)
    get_grader(grader)  # an unknown default is a config error, reported once rather than on every row
    if not path.is_file():
        raise FileNotFoundError(f"eval suite file not found: {path}")
    rows = _read_rows(path)
    if limit is not None:
        rows = rows[:limit]
    problems = [_parse_row(path, i, row, grader) for i, row in enumerate(rows, start=1)]
    if not problems:
        raise SuiteFormatError(f"{path}: no problems in the file")
    seen: dict[str, int] = {}
    for i, p in enumerate(problems, start=1):
        if p.problem_id in seen:
            raise SuiteFormatError(
                f"{path}: row {i}: duplicate id {p.problem_id!r} (first at row {seen[p.problem_id]})"
            )
        seen[p.problem_id] = i
    return problems


def check_prompt_references(path: str | Path) -> int:
    """Check the ``grader``/``reference`` of the rows of a training prompt file that carry them (the others are
    plain prompts); returns how many were checked. Training ignores them; they are what a failure bank's training
    share carries, so a bad one is reported by ``precheck`` like a suite's.

    Raises:
        SuiteFormatError: a row's grader is unknown or its reference is rejected (names the file and the row).
    """
    path = Path(path)
    checked = 0
    for rownum, row in enumerate(_read_rows(path), start=1):
        if not isinstance(row, dict) or ("reference" not in row and "grader" not in row):
            continue
        where = f"{path}: row {rownum}"
        grader = row.get("grader", DEFAULT_GRADER)
        if not isinstance(grader, str) or not grader.strip():
            raise SuiteFormatError(f"{where}: field 'grader' must be a grader name, got {grader!r:.60}")
        a_col, a_val = _first(row, ANSWER_COLUMNS)
        if a_col is None:
            raise SuiteFormatError(f"{where}: names grader {grader!r} but has no reference field")
        try:
            _reference(where, grader.strip(), a_col, a_val)
        except UnknownGrader as exc:
            raise SuiteFormatError(f"{where}: {exc}") from None
        checked += 1
    return checked


def load_suite(suite: EvalSuite, embedded_path: str | Path) -> LoadedSuite:
    """Resolve an :class:`~trainer.config.EvalSuite`: ``path=None`` means the embedded held-out set.

    Raises what :func:`load_problems` raises; a :class:`SuiteFormatError` message starts with the suite's name.
    """
    embedded = suite.path is None
    path = Path(embedded_path if embedded else suite.path)  # type: ignore[arg-type]
    try:
        problems = load_problems(path, limit=suite.limit, grader=suite.grader)
    except SuiteFormatError as exc:
        raise SuiteFormatError(f"suite {suite.name!r}: {exc}") from None
    return LoadedSuite(
        name=suite.name, path=path, problems=problems, digest=file_sha256(path), embedded=embedded,
        grader=suite.grader, prompt_suffix=suite.prompt_suffix,
    )  # fmt: skip


def suite_record(suite: LoadedSuite) -> dict[str, Any]:
    """What an evaluation of ``suite`` is comparable by: ``{"digest": sha256 of the file, "graders": {name:
    version}}`` (two evaluations compare only when both match). Strings only: kept out of metrics files."""
    return {"digest": suite.digest, "graders": suite.graders}


def suite_tags(records: dict[str, dict[str, Any]]) -> dict[str, str]:
    """MLflow tags of ``{suite: suite_record(...)}``: ``oprd.eval.<suite>.grader`` (names, comma-separated when a
    suite mixes graders), ``.grader_version`` (their versions, same order) and ``.digest``."""
    tags: dict[str, str] = {}
    for name, rec in records.items():
        graders = rec["graders"]
        tags[f"oprd.eval.{name}.grader"] = ",".join(graders)
        tags[f"oprd.eval.{name}.grader_version"] = ",".join(graders.values())
        tags[f"oprd.eval.{name}.digest"] = rec["digest"]
    return tags
