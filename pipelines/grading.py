"""Answer grading: the last ``\\boxed{...}`` of a response against a reference answer.

Rules (oprd-method.md section 7 and test vector TV10):

1. **Extraction.** The answer is the content of the *last* complete ``\\boxed{...}`` (brace matching, so
   ``\\boxed{\\frac{1}{2}}`` yields ``\\frac{1}{2}``). ``\\fbox`` and a bare number are *not* answers. When the
   reference itself contains ``\\boxed{}``, its last box is used.
2. **Fast path.** After light normalization (whitespace, surrounding ``$``, ``\\left``/``\\right``, ``\\dfrac``,
   thousands separators, a trailing ``.``), equal strings match, and so do equal exact numbers: integers, decimals and
   simple fractions (``a/b``, ``\\frac{a}{b}``) compare as rationals, so ``142`` = ``142.0`` and ``8,178`` = ``8178``.
3. **math-verify** (``parse``/``verify``) decides everything else (``0.5`` vs ``\\frac{1}{2}``, ``1+x^2`` vs
   ``x^2+1``). It is called with ``parsing_timeout=None`` and ``timeout_seconds=None`` because its own timeouts use
   ``signal.alarm``, which raises outside the main thread (evaluation may run in a worker thread). Without those
   timeouts sympy could hang on hostile input, so :func:`is_pathological` refuses (grades as wrong) answers longer
   than :data:`MAX_ANSWER_CHARS`, nested exponents (power towers), exponents or factorials of 4+ digits. Any
   exception inside math-verify also grades as wrong.
"""

from __future__ import annotations

import logging
import re
from fractions import Fraction

from math_verify import parse, verify

__all__ = ["MAX_ANSWER_CHARS", "extract_last_boxed", "grade_answer", "is_pathological", "normalize_answer"]

MAX_ANSWER_CHARS = 200
"""Longest extracted answer (characters) that is handed to math-verify; longer ones grade as wrong."""

_BOXED = "\\boxed{"


class _DropDisabledTimeoutWarning(logging.Filter):
    """math-verify warns on every call that its timeout is disabled; we disable it on purpose (module docstring)."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "Timeout is disabled" not in record.getMessage()


for _name in ("math_verify.parser", "math_verify.grader"):
    logging.getLogger(_name).addFilter(_DropDisabledTimeoutWarning())


def extract_last_boxed(text: str) -> str | None:
    """Content of the last complete top-level ``\\boxed{...}`` in ``text``, or ``None`` if there is none.

    Boxes are scanned left to right with brace matching; a box nested inside another is part of the outer one. An
    unclosed trailing ``\\boxed{`` is ignored (the previous complete box, if any, is returned).
    """
    last: str | None = None
    i = text.find(_BOXED)
    while i != -1:
        start = i + len(_BOXED)
        depth = 1
        j = start
        while j < len(text) and depth:
            if text[j] == "{":
                depth += 1
            elif text[j] == "}":
                depth -= 1
            j += 1
        if depth:  # unbalanced: nothing after this point can close a box
            break
        last = text[start : j - 1]
        i = text.find(_BOXED, j)
    return last


_THOUSANDS = re.compile(r"^-?\d{1,3}(,\d{3})+(\.\d+)?$")
_FRAC = re.compile(r"^(-?)\\frac\{(-?\d+)\}\{(-?\d+)\}$")
_SLASH = re.compile(r"^(-?\d+)/(\d+)$")
_NUMBER = re.compile(r"^-?(\d+\.?\d*|\.\d+)$")


def normalize_answer(s: str) -> str:
    """Light, meaning-preserving normalization used by the fast path (see module docstring)."""
    s = s.strip()
    while len(s) >= 2 and s[0] == "$" and s[-1] == "$":
        s = s[1:-1].strip()
    s = (
        s.replace("\\left", "")
        .replace("\\right", "")
        .replace("\\dfrac", "\\frac")
        .replace("\\tfrac", "\\frac")
    )
    s = s.replace("\\!", "").replace("\\,", "").replace("\\ ", "")
    s = re.sub(r"\s+", "", s)
    s = s.rstrip(".") if _NUMBER.match(s.rstrip(".")) else s
    if _THOUSANDS.match(s):
        s = s.replace(",", "")
    return s


def _as_rational(s: str) -> Fraction | None:
    """``s`` (already normalized) as an exact rational, or ``None`` if it is not a plain number or fraction."""
    if _NUMBER.match(s):
        return Fraction(s)
    m = _FRAC.match(s)
    if m:
        den = int(m.group(3))
        return None if den == 0 else Fraction(int(m.group(2)), den) * (-1 if m.group(1) else 1)
    m = _SLASH.match(s)
    if m and int(m.group(2)) != 0:
        return Fraction(int(m.group(1)), int(m.group(2)))
    return None


_NESTED_POWER = re.compile(r"\^\s*\{[^{}]*\^|\^\s*\d+\s*\^|\^\s*\{[^}]*\{[^}]*\^")
_HUGE_EXPONENT = re.compile(r"\^\s*\{?\s*-?\d{4,}")
_HUGE_FACTORIAL = re.compile(r"\d{4,}\s*!")


def is_pathological(s: str) -> bool:
    """True for answers math-verify (sympy) may not finish on: too long, power towers, huge exponents/factorials."""
    return (
        len(s) > MAX_ANSWER_CHARS
        or bool(_NESTED_POWER.search(s))
        or bool(_HUGE_EXPONENT.search(s))
        or bool(_HUGE_FACTORIAL.search(s))
    )


def _math_verify_equal(gold: str, pred: str) -> bool:
    if is_pathological(gold) or is_pathological(pred):
        return False
    try:
        gold_parsed = parse(f"\\boxed{{{gold}}}", parsing_timeout=None)
        pred_parsed = parse(f"\\boxed{{{pred}}}", parsing_timeout=None)
        if not gold_parsed or not pred_parsed:
            return False
        return bool(verify(gold_parsed, pred_parsed, timeout_seconds=None))
    except Exception:  # math-verify/sympy raise many exception types on odd LaTeX; a crash is a wrong answer
        return False


def grade_answer(response: str, reference: str) -> bool:
    """Whether ``response`` ends (last ``\\boxed{}``) with an answer equal to ``reference``. Thread-safe."""
    pred = extract_last_boxed(response)
    if pred is None:
        return False
    gold = extract_last_boxed(reference) if _BOXED in reference else reference
    if gold is None:
        return False
    pred_n, gold_n = normalize_answer(pred), normalize_answer(gold)
    if not pred_n or not gold_n:
        return False
    if pred_n == gold_n:
        return True
    pred_q, gold_q = _as_rational(pred_n), _as_rational(gold_n)
    if pred_q is not None and gold_q is not None:
        return pred_q == gold_q
    return _math_verify_equal(gold_n, pred_n)
