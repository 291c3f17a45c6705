"""``code_tests``: the response's Python code must pass the reference's tests, run in a sandbox.

Reference (HumanEval layout): ``{"tests": "<python defining check(candidate)>", "entry_point": "<name>",
"prompt": "<optional code prepended to the response>"}``. The response's code is the last fenced ```python (or
``py``, or untagged) block, else the raw text; ``prompt`` (when given) is prepended, so a HumanEval completion (a
function body) and a whole function both work. The verdict comes from :func:`pipelines.graders.sandbox.run_tests`
(the tests ran to completion), never from anything the code prints or its exit status. The candidate has the
standard library only (``python -I -S``); arguments and return values cross a process boundary, so they must be
picklable plain data (numbers, strings, bytes, lists, tuples, dicts, sets, None, bool, complex).

``grade_many`` runs responses in parallel threads (each one a sandbox of its own), ``workers`` defaulting to the
number of CPU cores.
"""

from __future__ import annotations

import ast
import os
import threading
from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

from pipelines.graders.base import Grader, GradeResult, InvalidReference
from pipelines.graders.json_values import fenced_blocks
from pipelines.graders.sandbox import SandboxLimits, run_tests, sandbox_mode

_PARSE_LOCK = threading.Lock()
"""CPython 3.11's AST validation keeps its recursion depth in per-interpreter state, so two threads parsing at
once can fail with ``SystemError: AST constructor recursion depth mismatch`` (seen here under ``grade_many``)."""

__all__ = ["CodeTestsGrader", "extract_code"]

_KEYS = {"tests", "entry_point", "prompt"}


def extract_code(response: str) -> str:
    """The last fenced python/py/untagged block of ``response``, else the whole response."""
    blocks = [body for lang, body in fenced_blocks(response) if lang in ("python", "py", "python3", "")]
    return blocks[-1] if blocks else response


class CodeTestsGrader(Grader):
    name = "code_tests"
    version = f"1+{sandbox_mode()}"
    structured = True

    def __init__(self, limits: SandboxLimits | None = None) -> None:
        self.limits = limits or SandboxLimits()

    def check_reference(self, reference: Any) -> None:
        if not isinstance(reference, dict):
            raise InvalidReference(
                'code_tests reference must be an object {"tests": ..., "entry_point": ..., "prompt": <optional>}, '
                f"got {type(reference).__name__}"
            )
        unknown = sorted(set(reference) - _KEYS)
        if unknown:
            raise InvalidReference(
                f"code_tests reference has unknown keys {unknown} (allowed: {sorted(_KEYS)})"
            )
        for key in ("tests", "entry_point"):
            if not isinstance(reference.get(key), str) or not reference[key].strip():
                raise InvalidReference(f"code_tests reference needs a non-empty string {key!r}")
        if not reference["entry_point"].isidentifier():
            raise InvalidReference(
                f"code_tests 'entry_point' {reference['entry_point']!r} is not a Python name"
            )
        for key in ("prompt", "tests"):
            text = reference.get(key) or ""
            if not isinstance(text, str):
                raise InvalidReference(f"code_tests {key!r} must be a string")
            try:
                with _PARSE_LOCK:
                    tree = ast.parse(text, filename=f"<{key}>")
            except SyntaxError as exc:
                raise InvalidReference(
                    f"code_tests {key!r} do not compile: {exc.msg} (line {exc.lineno})"
                ) from None
            if key == "tests" and not any(
                isinstance(node, ast.FunctionDef) and node.name == "check" for node in tree.body
            ):
                raise InvalidReference("code_tests 'tests' must define a top-level function check(candidate)")

    def _program(self, response: str, reference: dict) -> str:
        prompt = reference.get("prompt") or ""
        if prompt and not prompt.endswith("\n"):
            prompt += "\n"
        return prompt + extract_code(response)

    def grade(self, response: str, reference: Any) -> GradeResult:
        self.check_reference(reference)
        return self._run(response, reference)

    def _run(self, response: str, reference: dict) -> GradeResult:
        """Run the (already checked) reference's tests on the response in the sandbox."""
        result = run_tests(
            self._program(response, reference),
            reference["tests"],
            reference["entry_point"],
            prompt=reference.get("prompt") or "",
            limits=self.limits,
        )
        return GradeResult(result.passed, result.reason)

    def grade_many(self, pairs: Sequence[tuple[str, Any]], workers: int | None = None) -> list[GradeResult]:
        for _response, reference in pairs:
            self.check_reference(reference)
        cores = os.cpu_count() or 1
        workers = max(1, min(workers or cores, cores, len(pairs) or 1))
        if workers == 1:
            return [self.grade(r, ref) for r, ref in pairs]
        with ThreadPoolExecutor(max_workers=workers, thread_name_prefix="code_tests") as pool:
            return list(pool.map(lambda pair: self._run(*pair), pairs))  # references checked above
