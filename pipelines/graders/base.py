"""The grader contract: what a grader is, what it returns, and how a bad reference is reported.

A grader decides whether one model response answers one problem, given the problem's *reference* (the expected
answer in the grader's own format: a string for ``math``/``exact``/``regex``, a JSON object or list for the
structured graders). Graders are pure functions of ``(response, reference)``: deterministic, thread-safe, and they
never execute or ``eval`` the response in the grading process (``code_tests`` runs code in a sandboxed child).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any, ClassVar

__all__ = ["GradeResult", "Grader", "InvalidReference", "UnknownGrader"]


class InvalidReference(ValueError):
    """A reference the grader cannot use (a schema that is not a schema, tests that do not compile, ...).

    The message says what is wrong; callers add where (suite, row) before showing it.
    """


class UnknownGrader(KeyError):
    """A grader name that is not registered; the message lists the known names and the closest match."""

    def __str__(self) -> str:  # KeyError quotes its argument; this message is meant to be read as is
        return str(self.args[0]) if self.args else ""


@dataclass(frozen=True)
class GradeResult:
    """The verdict on one response. ``reason`` says why it is not correct (empty when correct)."""

    correct: bool
    reason: str = ""

    def __bool__(self) -> bool:
        return self.correct


class Grader:
    """Base class of the built-in graders. Subclasses set ``name`` and ``version`` and implement ``grade``.

    ``version`` changes whenever a verdict could change; it is recorded with every evaluation next to the suite's
    digest, so two evaluations are comparable only when both match.
    """

    name: ClassVar[str]
    version: ClassVar[str]
    structured: ClassVar[bool] = False
    """True when the reference is a JSON value (a JSON *string* in a file is decoded by ``decode_reference``)."""

    def decode_reference(self, value: Any) -> Any:
        """The reference as the grader uses it. Structured graders accept the JSON text of their reference."""
        if self.structured and isinstance(value, str):
            try:
                return json.loads(value)
            except json.JSONDecodeError as exc:
                raise InvalidReference(f"reference is a string but not valid JSON: {exc.msg}") from None
        return value

    def check_reference(self, reference: Any) -> None:
        """Raise :class:`InvalidReference` when ``reference`` (already decoded) cannot be graded against."""
        if not isinstance(reference, str) or not reference.strip():
            raise InvalidReference(
                f"grader {self.name!r} needs a non-empty string reference, got {reference!r:.60}"
            )

    def grade(self, response: str, reference: Any) -> GradeResult:
        raise NotImplementedError
