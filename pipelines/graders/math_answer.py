"""``math``: the last ``\\boxed{}`` of the response against a reference answer (pipelines/grading.py's rules)."""

from __future__ import annotations

from typing import Any

from pipelines.graders.base import Grader, GradeResult

__all__ = ["MathGrader"]


class MathGrader(Grader):
    name = "math"
    version = "1"

    def grade(self, response: str, reference: Any) -> GradeResult:
        from pipelines.grading import extract_last_boxed, grade_answer  # math-verify/sympy: ~1.5 s to import

        if grade_answer(response, str(reference)):
            return GradeResult(True)
        if extract_last_boxed(response) is None:
            return GradeResult(False, "no \\boxed{} answer in the response")
        return GradeResult(False, "boxed answer differs from the reference")
