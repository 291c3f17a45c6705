"""The failure bank: failures a team collected, split once into training prompts and held-out regression suites.

Layout (docs/tasks.md "The failure bank"): the bank is ONE git-tracked JSONL file, ``failures.bank`` (default
``failures/bank.jsonl``, committed, may be empty). It is the single source of truth: the distill stage mixes its
training share into the rollout prompts, the evaluate stage writes its regression share as ordinary suite files
(``artifacts/eval/regression/<suite>.jsonl``) and scores them, the gate stage reads which failures were recorded
against which version. Those stages list the file as a DVC dependency, so ``dvc.lock`` records its md5 and
``dvc repro`` re-runs them when the bank changes; its sha256 is the bank's digest (MLflow dataset input of the
distill run, ``oprd-ci failures show``). It lives in git, not only in the DVC cache: there is no DVC remote.

One bank row per distinct problem (sorted by suite, then id)::

    {"id": "f3a9...", "suite": "toolcall-prod", "split": "regression", "prompt": ..., "grader": "tool_call",
     "reference": ..., "failures": [{"version": 3, "model": "oprd-student", "response": ..., "source": ...,
     "time": ...}]}

* ``id``: the first 16 hex chars of sha256(normalized prompt); normalized = NFKC, case-folded, whitespace
  collapsed (a chat prompt: ``role: content`` per message). Two rows with the same normalized prompt are one
  problem: a second report merges its ``failures`` record into the first (a different grader or reference for
  the same prompt is an error).
* ``split``: ``regression`` when ``int(sha256[:13], 16) / 16**13 < failures.regression_fraction``, else
  ``train``; decided once at ingestion and never recomputed, so changing the fraction later never moves a problem
  the student trained on into a regression suite. A problem is in exactly one split and one suite.
* ``failures``: who failed it (``version`` = the registry version that failed, ``None`` when unknown).

Writing is all-or-nothing: every input row is validated first (its grader's ``check_reference``), and the new
bank replaces the old one with one atomic rename under an exclusive lock.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import re
import unicodedata
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pipelines.graders import DEFAULT_GRADER, InvalidReference, UnknownGrader, check_reference
from pipelines.stage_io import atomic_write_text

__all__ = [
    "INPUT_FIELDS",
    "AddReport",
    "Bank",
    "BankRow",
    "FailureBankError",
    "add_failures",
    "bank_digest",
    "check_bank",
    "load_bank",
    "normalize_prompt",
    "problem_key",
    "read_input_rows",
    "split_of",
    "write_regression_suite",
]

INPUT_FIELDS = ("prompt", "reference", "grader", "model", "version", "response", "source", "time", "id")
"""Keys an input row may carry; anything else is an error (a typo such as ``refrence`` must not be dropped)."""
SUITE_PATTERN = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,127}$")
"""The registry's suite-name rule (server.names.NAME_PATTERN): the suite name is a policy key."""
_MAX_ERRORS_SHOWN = 5


class FailureBankError(ValueError):
    """Bad input or a bad bank file; the message names the file and row(s). Nothing was written."""


# ------------------------------------------------------------------------------------------------ identity
def normalize_prompt(prompt: str | list[dict[str, str]]) -> str:
    """The text two reports of the same problem share: NFKC, case-folded, whitespace runs collapsed to one space.

    A chat prompt (list of ``{"role", "content"}``) becomes ``role: content`` lines of its normalized messages.
    """

    def norm(s: str) -> str:
        return " ".join(unicodedata.normalize("NFKC", s).casefold().split())

    if isinstance(prompt, str):
        return norm(prompt)
    return "\n".join(f"{norm(m['role'])}: {norm(m['content'])}" for m in prompt)


def problem_key(prompt: str | list[dict[str, str]]) -> str:
    """sha256 hex of the normalized prompt: the problem's identity (``id`` = its first 16 chars)."""
    return hashlib.sha256(normalize_prompt(prompt).encode("utf-8")).hexdigest()


def split_of(key: str, regression_fraction: float) -> str:
    """``regression`` or ``train`` for a problem with sha256 ``key``: uniform in [0, 1) from its first 52 bits
    (exact in a float, so fraction 1.0 holds out everything and 0.0 nothing)."""
    return "regression" if int(key[:13], 16) / 16**13 < regression_fraction else "train"


# ------------------------------------------------------------------------------------------------ the bank
@dataclass
class BankRow:
    """One distinct problem in the bank (see the module docstring for the fields)."""

    id: str
    suite: str
    split: str
    prompt: str | list[dict[str, str]]
    grader: str
    reference: Any
    failures: list[dict[str, Any]] = field(default_factory=list)

    def versions(self) -> list[int]:
        return sorted({f["version"] for f in self.failures if f.get("version") is not None})

    def to_json(self) -> dict[str, Any]:
        return {"id": self.id, "suite": self.suite, "split": self.split, "prompt": self.prompt,
                "grader": self.grader, "reference": self.reference, "failures": self.failures}  # fmt: skip


@dataclass
class Bank:
    """The rows of a bank file, in file order. ``digest`` is the file's sha256 (``""`` for a missing file)."""

    path: Path
    rows: list[BankRow]
    digest: str

    def suites(self) -> list[str]:
        return sorted({r.suite for r in self.rows})

    def split(self, split: str, suite: str | None = None) -> list[BankRow]:
        return [r for r in self.rows if r.split == split and (suite is None or r.suite == suite)]

    def train_prompts(self) -> list[str | list[dict[str, str]]]:
        """The training share's prompts (every suite), in bank order."""
        return [r.prompt for r in self.split("train")]

    def recorded_failures(self, suite: str) -> dict[int, list[str]]:
        """Regression problems of ``suite`` by the registry version recorded as failing them: version -> ids."""
        out: dict[int, list[str]] = {}
        for r in self.split("regression", suite):
            for v in r.versions():
                out.setdefault(v, []).append(r.id)
        return out


def bank_digest(path: str | Path) -> str:
    """sha256 hex of the bank file's bytes (``""`` when it does not exist)."""
    p = Path(path)
    return hashlib.sha256(p.read_bytes()).hexdigest() if p.is_file() else ""


def load_bank(path: str | Path) -> Bank:
    """Read the bank file (missing or empty = an empty bank). Raises :class:`FailureBankError` on a malformed row."""
    p = Path(path)
    if not p.is_file():
        return Bank(p, [], "")
    data = p.read_bytes()
    rows = []
    for n, line in enumerate(data.decode("utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            d = json.loads(line)
            rows.append(BankRow(**d))
        except (json.JSONDecodeError, TypeError) as exc:
            raise FailureBankError(f"{p}: line {n}: not a bank row ({exc}); restore it with git") from None
        if rows[-1].split not in ("train", "regression"):
            raise FailureBankError(f"{p}: line {n}: split must be 'train' or 'regression'")
    return Bank(p, rows, hashlib.sha256(data).hexdigest())


def check_bank(path: str | Path, reserved_suites: Sequence[str] = ()) -> list[str]:
    """Problems of the bank file, one line each (the precheck stage reports them before any model loads): an
    unreadable row, a reference its grader refuses (a hand edit), a suite named like an evaluate suite."""
    try:
        bank = load_bank(path)
    except FailureBankError as exc:
        return [str(exc)]
    problems = []
    for r in bank.rows:
        try:
            check_reference(r.grader, r.reference)
        except (InvalidReference, UnknownGrader) as exc:
            problems.append(f"{path}: id {r.id} (suite {r.suite}): {exc}")
    problems += [
        f"{path}: suite {s!r} is also an evaluate suite name (evaluate.suites); rename one"
        for s in bank.suites()
        if s in reserved_suites
    ]
    return problems


# ------------------------------------------------------------------------------------------------ ingestion
def read_input_rows(path: str | Path) -> list[Any]:
    """Rows of a JSONL file, or of a JSON list (or an object whose ``data``/``rows`` key holds it)."""
    p = Path(path)
    if not p.is_file():
        raise FailureBankError(f"{p}: no such file")
    text = p.read_text(encoding="utf-8")
    if p.suffix.lower() == ".jsonl":
        rows = []
        for n, line in enumerate(text.splitlines(), start=1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as exc:
                    raise FailureBankError(f"{p}: row {n}: not valid JSON ({exc.msg})") from None
        return rows
    if p.suffix.lower() == ".json":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise FailureBankError(f"{p}: not valid JSON ({exc.msg}, line {exc.lineno})") from None
        if isinstance(data, dict):
            data = data.get("data", data.get("rows"))
        if not isinstance(data, list):
            raise FailureBankError(f"{p}: expected a JSON list of failures (or {{'data': [...]}})")
        return data
    raise FailureBankError(f"{p}: unsupported file type {p.suffix!r}; use .jsonl or .json")


def _version(value: Any) -> int | None:
    """``3``, ``"3"`` or ``"v3"`` -> 3; ``None``/``""`` -> None; anything else raises ``ValueError``."""
    if value is None or value == "":
        return None
    if isinstance(value, bool):
        raise ValueError(f"version must be a registry version number, got {value!r}")
    text = str(value).strip()
    text = text[1:] if text[:1] in "vV" else text
    if not text.isdigit() or int(text) < 1:
        raise ValueError(f"version must be a registry version number (e.g. 3 or 'v3'), got {value!r}")
    return int(text)


def _prompt(value: Any) -> str | list[dict[str, str]]:
    if isinstance(value, str) and value.strip():
        return value
    messages = value if isinstance(value, list) else []
    well_formed = all(
        isinstance(m, dict) and isinstance(m.get("role"), str) and isinstance(m.get("content"), str)
        for m in messages
    )
    if messages and well_formed and any(m["role"] == "user" and m["content"].strip() for m in messages):
        return [{"role": m["role"], "content": m["content"]} for m in messages]
    raise ValueError(
        "prompt must be non-empty text or a chat list of {'role', 'content'} strings with a user message"
    )


def _parse(row: Any, default_grader: str) -> tuple[str | list[dict[str, str]], str, Any, dict[str, Any]]:
    """(prompt, grader, reference, failure record) of one input row; ``ValueError`` says what is wrong."""
    if not isinstance(row, dict):
        raise ValueError(f"expected an object with prompt/reference/grader, got {type(row).__name__}")
    unknown = sorted(set(row) - set(INPUT_FIELDS))
    if unknown:
        raise ValueError(f"unknown field(s) {unknown}; allowed: {', '.join(INPUT_FIELDS)}")
    if "prompt" not in row:
        raise ValueError("no 'prompt'")
    if "reference" not in row or row["reference"] is None:
        raise ValueError("no 'reference' (the grader's expected answer)")
    prompt = _prompt(row["prompt"])
    grader = row.get("grader") or default_grader
    if not isinstance(grader, str):
        raise ValueError(f"grader must be a grader name, got {grader!r}")
    reference = row["reference"]
    check_reference(grader, reference)  # InvalidReference / UnknownGrader: both name the problem
    record = {"version": _version(row.get("version"))}
    for key in ("model", "response", "source", "time", "id"):
        if row.get(key) is not None:
            if not isinstance(row[key], (str, int, float)):
                raise ValueError(f"{key} must be text, got {type(row[key]).__name__}")
            record["external_id" if key == "id" else key] = row[key]
    return prompt, grader, reference, record


@dataclass
class AddReport:
    """What ``add_failures`` did: new problems per split, duplicates merged, the new digest."""

    suite: str
    added: dict[str, int]
    merged_in_file: int
    merged_with_bank: int
    digest: str
    dry_run: bool = False


@contextlib.contextmanager
def _locked(bank_path: Path) -> Iterator[None]:
    """An exclusive lock next to the bank: two concurrent ``failures add`` never lose each other's rows."""
    bank_path.parent.mkdir(parents=True, exist_ok=True)
    with open(bank_path.parent / f".{bank_path.name}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        yield


def _dump(rows: Sequence[BankRow]) -> str:
    ordered = sorted(rows, key=lambda r: (r.suite, r.id))
    return "".join(json.dumps(r.to_json(), ensure_ascii=False, sort_keys=True) + "\n" for r in ordered)


def add_failures(
    source: str | Path,
    suite: str,
    *,
    bank_path: str | Path,
    regression_fraction: float,
    source_label: str | None = None,
    default_grader: str = DEFAULT_GRADER,
    reserved_suites: Sequence[str] = (),
    dry_run: bool = False,
) -> AddReport:
    """Validate every row of ``source``, then merge them into the bank as suite ``suite`` (atomically).

    ``source_label`` fills ``source`` where a row has none. ``reserved_suites`` are names the evaluate stage already
    uses (``evaluate.suites``): a regression suite may not shadow them. Raises :class:`FailureBankError` listing the
    bad rows (file and 1-based row) and writes nothing when any row is bad.
    """
    if not 0.0 <= regression_fraction <= 1.0:
        raise FailureBankError(f"regression_fraction must be in [0, 1], got {regression_fraction}")
    if not SUITE_PATTERN.match(suite):
        raise FailureBankError(
            f"suite name {suite!r} must match {SUITE_PATTERN.pattern} (it becomes a policy key)"
        )
    if suite in reserved_suites:
        raise FailureBankError(
            f"suite name {suite!r} is already an evaluate suite (evaluate.suites); pick another name"
        )
    src = Path(source)
    rows = read_input_rows(src)
    if not rows:
        raise FailureBankError(f"{src}: no failures in the file")
    parsed, errors = [], []
    for n, row in enumerate(rows, start=1):
        try:
            parsed.append((n, *_parse(row, default_grader)))
        except (InvalidReference, UnknownGrader, ValueError) as exc:
            errors.append(f"row {n}: {exc}")
    bank_path = Path(bank_path)
    with _locked(bank_path):
        bank = load_bank(bank_path)
        by_key = {r.id: r for r in bank.rows}
        seen_in_file: dict[str, int] = {}
        added = {"train": 0, "regression": 0}
        merged_file = merged_bank = 0
        for n, prompt, grader, reference, record in parsed:
            key = problem_key(prompt)
            pid = key[:16]
            if source_label is not None and "source" not in record:
                record["source"] = source_label
            old = by_key.get(pid)
            if old is not None:
                where = f"row {seen_in_file[pid]} of this file" if pid in seen_in_file else f"bank id {pid}"
                if old.suite != suite and pid not in seen_in_file:
                    errors.append(f"row {n}: same problem as {where} in suite {old.suite!r}, not {suite!r}")
                    continue
                if (old.grader, old.reference) != (grader, reference):
                    errors.append(f"row {n}: same prompt as {where} but a different grader or reference")
                    continue
                if record not in old.failures:
                    old.failures.append(record)
                if pid in seen_in_file:
                    merged_file += 1
                else:
                    merged_bank += 1
                continue
            split = split_of(key, regression_fraction)
            new = BankRow(pid, suite, split, prompt, grader, reference, [record])
            by_key[pid] = new
            seen_in_file[pid] = n
            added[split] += 1
        if errors:
            shown = "; ".join(errors[:_MAX_ERRORS_SHOWN])
            more = f" (and {len(errors) - _MAX_ERRORS_SHOWN} more)" if len(errors) > _MAX_ERRORS_SHOWN else ""
            raise FailureBankError(f"{src}: {len(errors)} bad row(s), nothing written: {shown}{more}")
        text = _dump(list(by_key.values()))
        if not dry_run:
            atomic_write_text(bank_path, text, fsync=True)
        digest = hashlib.sha256(text.encode("utf-8")).hexdigest()
    return AddReport(suite, added, merged_file, merged_bank, digest, dry_run)


# ------------------------------------------------------------------------------------------------ suites
def write_regression_suite(bank: Bank, suite: str, path: str | Path) -> Path:
    """Write the regression share of ``suite`` as an ordinary suite file (``{"id", "prompt", "grader",
    "reference", "versions"}`` JSONL; a ``math`` row also carries its reference as ``answer``, the column every
    suite loader reads). Returns the path."""
    p = Path(path)
    p.parent.mkdir(parents=True, exist_ok=True)
    lines = []
    for r in bank.split("regression", suite):
        row = {"id": r.id, "prompt": r.prompt, "grader": r.grader, "reference": r.reference,
               "versions": r.versions()}  # fmt: skip
        if r.grader == "math":
            row["answer"] = str(r.reference)
        lines.append(json.dumps(row, ensure_ascii=False) + "\n")
    atomic_write_text(p, "".join(lines), fsync=True)
    return p
