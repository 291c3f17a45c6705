"""Finding a JSON value in model text and comparing JSON values the way JSON (not Python) does.

Shared by the ``json_schema`` and ``tool_call`` graders.
"""

from __future__ import annotations

import json
import re
from typing import Any

__all__ = ["MAX_JSON_RESPONSE_CHARS", "extract_json", "fenced_blocks", "json_equal", "loads_strict"]

MAX_JSON_RESPONSE_CHARS = 50_000
"""Longest response (characters) searched for JSON; the search is quadratic in the worst case."""

_FENCE = re.compile(r"```[ \t]*([A-Za-z0-9_+-]*)[^\n]*\n(.*?)```", re.DOTALL)


def fenced_blocks(text: str) -> list[tuple[str, str]]:
    """``(language, body)`` of every complete Markdown code fence in ``text``, in order (language lowercased)."""
    return [(m.group(1).lower(), m.group(2)) for m in _FENCE.finditer(text)]


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def loads_strict(text: str) -> Any:
    """``json.loads`` that refuses ``NaN``/``Infinity`` (Python extensions, not JSON)."""
    return json.loads(text, parse_constant=_reject_constant)


_DECODER = json.JSONDecoder(parse_constant=_reject_constant)


def extract_json(text: str, languages: tuple[str, ...] = ("json",)) -> tuple[Any, str]:
    """The JSON value of a response and where it came from; ``ValueError`` saying why when there is none.

    Order: the last fenced block tagged with one of ``languages`` (its whole body must be JSON); else the whole
    stripped text when it is one JSON value; else the last top-level object or array in the text (scanning left to
    right, a value nested in an earlier one is not top-level).
    """
    if len(text) > MAX_JSON_RESPONSE_CHARS:
        raise ValueError(f"response has {len(text)} characters, more than {MAX_JSON_RESPONSE_CHARS}")
    tagged = [body for lang, body in fenced_blocks(text) if lang in languages]
    if tagged:
        try:
            return loads_strict(tagged[-1]), f"the last ```{languages[0]} block"
        except ValueError as exc:
            raise ValueError(f"the last ```{languages[0]} block is not valid JSON: {exc}") from None
    stripped = text.strip()
    if not stripped:
        raise ValueError("response is empty")
    try:
        return loads_strict(stripped), "the whole response"
    except ValueError:
        pass
    found: Any = None
    have = False
    i = 0
    while True:
        starts = [p for p in (stripped.find("{", i), stripped.find("[", i)) if p >= 0]
        if not starts:
            break
        start = min(starts)
        try:
            value, end = _DECODER.raw_decode(stripped, start)
        except (ValueError, RecursionError):
            i = start + 1
            continue
        found, have, i = value, True, end
    if not have:
        raise ValueError("no JSON object or array found in the response")
    return found, "the last JSON value in the response"


def json_equal(a: Any, b: Any) -> bool:
    """Equality of two decoded JSON values by JSON's rules.

    Numbers compare by value (``1`` equals ``1.0``), booleans are not numbers (``true`` is not ``1``), object key
    order is irrelevant, array order matters.
    """
    if isinstance(a, bool) or isinstance(b, bool):
        return isinstance(a, bool) and isinstance(b, bool) and a == b
    if isinstance(a, int | float) and isinstance(b, int | float):
        return a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(json_equal(a[k], b[k]) for k in a)
    if isinstance(a, list | tuple) and isinstance(b, list | tuple):
        return len(a) == len(b) and all(json_equal(x, y) for x, y in zip(a, b, strict=True))
    if a is None or b is None:
        return a is None and b is None
    return type(a) is type(b) and a == b
