"""A test-only structured grader, registered for one test and removed after it.

Use: ``from prefix_grader import prefix_grader_fixture  # noqa: F401`` then a ``prefix_grader`` argument.

``prefix_test`` grades a response correct when it starts with ``reference["prefix"]``. Its reference is a JSON
object (``{"prefix": str}``, or the JSON text of one), so suites that use it exercise the structured-reference path
(decode, check, display) without depending on which built-in graders a branch has. ``{"prefix": ""}`` is always
correct and ``{"prefix": "x"}`` never is for the tiny models (``x`` is not in their vocabulary): exact counts.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from pipelines import graders
from pipelines.graders import Grader, GradeResult, InvalidReference

NAME = "prefix_test"
VERSION = "7"


class PrefixGrader(Grader):
    name = NAME
    version = VERSION
    structured = True

    def check_reference(self, reference: Any) -> None:
        if not isinstance(reference, dict) or not isinstance(reference.get("prefix"), str):
            raise InvalidReference(
                f"reference must be an object with a string 'prefix', got {reference!r:.60}"
            )

    def grade(self, response: str, reference: Any) -> GradeResult:
        ok = response.startswith(reference["prefix"])
        return GradeResult(ok, "" if ok else f"does not start with {reference['prefix']!r}")


@pytest.fixture(name="prefix_grader")
def prefix_grader_fixture() -> Iterator[str]:
    """Registers ``prefix_test`` for the test; the registry is left as it was found."""
    graders.register(PrefixGrader())
    try:
        yield NAME
    finally:
        graders.GRADERS.pop(NAME, None)
