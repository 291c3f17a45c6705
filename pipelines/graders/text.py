"""``exact`` and ``regex``: string graders whose reference is a string.

``exact``
    The response and the reference are normalized (surrounding whitespace stripped, every run of whitespace,
    newlines included, collapsed to one space) and compared **case-sensitively**: ``"Paris"`` is not ``"paris"``.
    A suite that wants case-insensitive answers writes a ``regex`` reference with ``(?i)``.

``regex``
    The stripped response must *fully* match the pattern in the reference (``fullmatch``, so ``\\d+`` does not
    accept ``"12 apples"``). Patterns are compiled by the `regex <https://pypi.org/project/regex/>`_ module in its
    ``re``-compatible mode (``VERSION0``), because it can bound a match by time: a pattern that backtracks
    catastrophically on a hostile response (``(a+)+b`` on ``"aaaa...c"``) is stopped after
    :data:`MATCH_TIMEOUT_S` seconds and grades as not correct, with that reason. Responses longer than
    :data:`MAX_RESPONSE_CHARS` characters are refused without matching. A pattern that does not compile is an
    :class:`~pipelines.graders.base.InvalidReference`.
"""

from __future__ import annotations

import re
from typing import Any

import regex

from pipelines.graders.base import Grader, GradeResult, InvalidReference

__all__ = ["MATCH_TIMEOUT_S", "MAX_RESPONSE_CHARS", "ExactGrader", "RegexGrader", "normalize_text"]

MAX_RESPONSE_CHARS = 100_000
"""Longest response (characters) a ``regex`` reference is matched against; longer ones are not correct."""
MATCH_TIMEOUT_S = 1.0
"""Wall-clock bound of one ``regex`` match (seconds); a match still running then is not correct."""

_WHITESPACE = re.compile(r"\s+")


def normalize_text(text: str) -> str:
    """``text`` stripped, with every run of whitespace (newlines, tabs included) replaced by one space."""
    return _WHITESPACE.sub(" ", text).strip()


def _preview(text: str, limit: int = 80) -> str:
    return repr(text if len(text) <= limit else text[:limit] + "...")


class ExactGrader(Grader):
    name = "exact"
    version = "1"

    def grade(self, response: str, reference: Any) -> GradeResult:
        got, want = normalize_text(response), normalize_text(str(reference))
        if got == want:
            return GradeResult(True)
        if got.casefold() == want.casefold():
            return GradeResult(False, f"differs from the reference only in letter case ({_preview(got)})")
        return GradeResult(
            False, f"normalized response {_preview(got)} is not the reference {_preview(want)}"
        )


class RegexGrader(Grader):
    name = "regex"
    version = "1"

    def _compile(self, reference: Any) -> regex.Pattern:
        try:
            return regex.compile(reference, flags=regex.VERSION0)
        except (regex.error, TypeError, ValueError) as exc:
            raise InvalidReference(
                f"regex reference {_preview(str(reference))} does not compile: {exc}"
            ) from None

    def check_reference(self, reference: Any) -> None:
        super().check_reference(reference)
        self._compile(reference)

    def grade(self, response: str, reference: Any) -> GradeResult:
        pattern = self._compile(reference)
        text = response.strip()
        if len(text) > MAX_RESPONSE_CHARS:
            return GradeResult(False, f"response has {len(text)} characters, more than {MAX_RESPONSE_CHARS}")
        try:
            matched = pattern.fullmatch(text, timeout=MATCH_TIMEOUT_S)
        except TimeoutError:
            return GradeResult(
                False, f"pattern match stopped after {MATCH_TIMEOUT_S} s (catastrophic backtracking)"
            )
        if matched is None:
            return GradeResult(
                False, f"response {_preview(text)} does not fully match {_preview(pattern.pattern)}"
            )
        return GradeResult(True)
