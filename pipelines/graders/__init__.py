"""Graders as plug-ins: a registry of named graders that an eval suite (``evaluate.suites[].grader``) selects.

Public entry points (everything else is an implementation detail)::

    grade(grader, response, reference) -> bool
    grade_result(grader, response, reference) -> GradeResult(correct, reason)
    grade_many(grader, pairs, workers=None) -> list[GradeResult]   # in order; parallel where the grader is costly
    check_reference(grader, reference) -> None                      # raises InvalidReference before any model loads
    decode_reference(grader, value) -> reference                    # a JSON string -> object for structured graders
    grader_version(grader) -> str                                   # recorded with every evaluation
    known_graders() -> list[str]

Built in: ``math`` (default; ``\\boxed{}`` + math-verify), ``exact``, ``regex``, ``json_schema``, ``tool_call``,
``code_tests``. ``register`` adds a grader (an instance of :class:`~pipelines.graders.base.Grader`).
"""

from __future__ import annotations

import difflib
from collections.abc import Sequence
from typing import Any

from pipelines.graders.base import Grader, GradeResult, InvalidReference, UnknownGrader
from pipelines.graders.code_tests import CodeTestsGrader
from pipelines.graders.json_schema import JsonSchemaGrader
from pipelines.graders.math_answer import MathGrader
from pipelines.graders.text import ExactGrader, RegexGrader
from pipelines.graders.tool_call import ToolCallGrader

__all__ = [
    "DEFAULT_GRADER",
    "GRADERS",
    "GradeResult",
    "Grader",
    "InvalidReference",
    "UnknownGrader",
    "check_reference",
    "decode_reference",
    "get_grader",
    "grade",
    "grade_many",
    "grade_result",
    "grader_version",
    "known_graders",
    "register",
]

DEFAULT_GRADER = "math"
GRADERS: dict[str, Grader] = {}


def register(grader: Grader) -> Grader:
    """Add ``grader`` under its ``name`` (a second grader of the same name is an error)."""
    if grader.name in GRADERS:
        raise ValueError(f"a grader named {grader.name!r} is already registered")
    GRADERS[grader.name] = grader
    return grader


def known_graders() -> list[str]:
    return sorted(GRADERS)


def get_grader(name: str) -> Grader:
    """The grader registered as ``name``; :class:`UnknownGrader` (with the closest known name) otherwise."""
    try:
        return GRADERS[name]
    except KeyError:
        close = difflib.get_close_matches(str(name), known_graders(), n=1)
        hint = f"; did you mean {close[0]!r}?" if close else ""
        raise UnknownGrader(f"unknown grader {name!r} (known: {', '.join(known_graders())}){hint}") from None


def decode_reference(grader: str, value: Any) -> Any:
    return get_grader(grader).decode_reference(value)


def check_reference(grader: str, reference: Any) -> None:
    g = get_grader(grader)
    g.check_reference(g.decode_reference(reference))


def grader_version(grader: str) -> str:
    return get_grader(grader).version


def grade_result(grader: str, response: str, reference: Any) -> GradeResult:
    g = get_grader(grader)
    return g.grade(response, g.decode_reference(reference))


def grade(grader: str, response: str, reference: Any) -> bool:
    """Whether ``response`` answers the problem whose reference is ``reference``, by the rules of ``grader``."""
    return grade_result(grader, response, reference).correct


def grade_many(
    grader: str, pairs: Sequence[tuple[str, Any]], workers: int | None = None
) -> list[GradeResult]:
    """Grade ``(response, reference)`` pairs, results in input order. ``workers`` bounds parallel graders."""
    g = get_grader(grader)
    many = getattr(g, "grade_many", None)
    if many is not None:
        return many([(r, g.decode_reference(ref)) for r, ref in pairs], workers=workers)
    return [g.grade(r, g.decode_reference(ref)) for r, ref in pairs]


register(MathGrader())
register(ExactGrader())
register(RegexGrader())
register(JsonSchemaGrader())
register(ToolCallGrader())
register(CodeTestsGrader())
